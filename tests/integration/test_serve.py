"""`tunehub serve` as users run it: a real process on a loopback port, the official `openai`
client and the tunehub SDK against it, tenant rules, alias promotion mid-stream, clients that
vanish, bad input (never a 5xx, always the OpenAI error body), and SIGTERM ending in-flight
streams cleanly and leaving no process (and no warning) behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tunehub.errors import (
    InvalidReference,
    InvalidRequest,
    ModuleNotFound,
    RateLimited,
    Unauthorized,
)
from tunehub.server.tenants import hash_key

pytestmark = pytest.mark.integration

KEYS = {
    "acme": "acme-key-0123456789",
    "limited": "limited-key-0123456789",
    "tokens": "tokens-key-0123456789",
    "capped": "capped-key-0123456789",
    "other": "other-key-0123456789",
    "budget": "budget-key-0123456789",
    "base-only": "base-only-key-0123456789",
}
ADMIN_KEY = "admin-key-0123456789abcdef"
BASE_NAME = "tiny-llama"  # the name the session's base folder gives the base model
LONG = 400  # tokens for streams that must still run while something else happens


# --- processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table = _proc_table()
    found, frontier = set(), {pid}
    while frontier:
        children = {p for p, (ppid, _) in table.items() if ppid in frontier and p not in found}
        found |= children
        frontier = children
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def _tunehub() -> list[str]:
    script = shutil.which("tunehub")
    return [script] if script else [sys.executable, "-m", "tunehub.sdk.cli"]


class Server:
    """`tunehub serve ...` in its own session, with its output in files."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = open(workdir / f"serve-{self.port}.out", "w")  # noqa: SIM115
        self.err_path = workdir / f"serve-{self.port}.err"
        self.err = open(self.err_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*_tunehub(), "serve", *args, "--port", str(self.port)],
            stdout=self.out,
            stderr=self.err,
            start_new_session=True,
            cwd=workdir,
            env={**os.environ, **(env or {})},
        )
        self.known: set[int] = set()

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tunehub serve exited with {self.proc.returncode}:\n{self.err_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.known = _descendants(self.proc.pid)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"tunehub serve was not ready after {timeout} s:\n{self.err_path.read_text()}")

    def stop(self) -> None:
        """SIGTERM, then make sure nothing is left even if the server misbehaved."""
        self.known |= _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for pid in _alive(self.known | {self.proc.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tiny_llama_path, tmp_path_factory):
    """A registry with a few modules of the tiny base, a tenants file and an admin key."""
    from tunehub.registry.local import LocalStore
    from tunehub.trainer.testing import make_peft_module

    assert tiny_llama_path.name == BASE_NAME
    root = tmp_path_factory.mktemp("serve")
    store = LocalStore(root / "registry", cache_dir=root / "cache")
    # BASE_NAME: a registry module that happens to have the base's name (a grant of the base is not one of it)
    for name, kind, seed in [
        ("acme/sum", "lora", 1),
        ("acme/sum", "lora", 2),
        ("acme/qa", "prompt", 3),
        ("other/secret", "lora", 4),
        (BASE_NAME, "lora", 5),
    ]:
        folder = make_peft_module(tiny_llama_path, root / "modules" / f"{name.replace('/', '-')}-{seed}", kind, seed=seed)
        store.push(folder, name)
    store.promote("acme/sum@1", "prod")
    from tunehub.registry.template import parse_template
    from tunehub.trainer.templates import write_template_module

    for name, raw in [
        ("acme/reverse-template", {"format": "text", "text": "Reverse: {words}\nAnswer:"}),
        ("acme/chat-template", {"format": "chat", "messages": [{"role": "system", "content": "You reverse {what}."}]}),
    ]:
        folder = root / "modules" / name.replace("/", "-")
        write_template_module(folder, parse_template(json.dumps(raw)), tiny_llama_path, task="reverse")
        store.push(folder, name)
    tenants = {
        "tenants": {
            "acme": {"keys": [hash_key(KEYS["acme"])], "models": ["acme/*", BASE_NAME], "max_tokens": 480},
            "limited": {"keys": [hash_key(KEYS["limited"])], "models": ["acme/qa"], "requests_per_minute": 3, "max_tokens": 16},
            "tokens": {"keys": [hash_key(KEYS["tokens"])], "models": ["acme/qa"], "tokens_per_minute": 20},
            "capped": {"keys": [hash_key(KEYS["capped"])], "models": ["acme/qa"], "max_tokens": 16},
            "other": {"keys": [hash_key(KEYS["other"])], "models": ["other/*"]},
            "budget": {"keys": [hash_key(KEYS["budget"])], "models": ["acme/qa"], "tokens_per_minute": 40},
            "base-only": {"keys": [hash_key(KEYS["base-only"])], "models": [BASE_NAME]},
        }
    }
    import yaml

    (root / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    (root / "admin.key").write_text(ADMIN_KEY + "\n")
    return {"root": root, "store": store, "base": tiny_llama_path}


@pytest.fixture(scope="module")
def server(world):
    root = world["root"]
    srv = Server(
        [
            "--base",
            str(world["base"]),
            "--quantization",
            "none",
            "--registry",
            f"file://{root / 'registry'}",
            "--tenants",
            str(root / "tenants.yaml"),
            "--admin-key-file",
            str(root / "admin.key"),
            "--audit-log",
            str(root / "audit.jsonl"),
            "--alias-ttl",
            "1",
            "--max-body-bytes",
            "65536",
            "--max-batch",
            "16",
        ],
        root,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _openai(server, tenant="acme"):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def _sdk(server, tenant="acme"):
    from tunehub.sdk import Client

    return Client(server.url, KEYS[tenant], admin_key=ADMIN_KEY)


def _post(server, path, body=None, key=KEYS["acme"], content=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        return httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


# --- OpenAI client and SDK ---------------------------------------------------------------------


def test_openai_client_completions_chat_streaming_and_models(server):
    client = _openai(server)
    raw = client.completions.with_raw_response.create(
        model="acme/sum@prod", prompt="the river runs", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    completion = raw.parse()
    assert raw.headers["x-tunehub-module"] == "acme/sum@1"
    assert len(raw.headers["x-tunehub-base"]) == 12
    assert completion.model == "acme/sum@1"
    assert completion.system_fingerprint == "tunehub-" + raw.headers["x-tunehub-base"]
    assert completion.usage.completion_tokens == 6 and completion.usage.prompt_tokens > 0
    assert completion.choices[0].finish_reason == "length"
    assert completion.model_extra["tunehub"]["module"] == "acme/sum@1"

    chat = client.chat.completions.create(
        model=BASE_NAME,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.model == BASE_NAME and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 5
    assert chat.model_extra["tunehub"]["module"] is None

    pieces, usage, models = [], None, set()
    for chunk in client.chat.completions.create(
        model="acme/qa",
        messages=[{"role": "user", "content": "what is a river"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        models.add(chunk.model)
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert models == {"acme/qa@1"} and usage.completion_tokens == 8
    streamed = "".join(pieces)
    again = client.chat.completions.create(
        model="acme/qa@1",
        messages=[{"role": "user", "content": "what is a river"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].message.content == streamed  # greedy: streaming changes nothing

    text_stream = client.completions.create(
        model="acme/sum@2", prompt="seven apples", max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert {c.model for c in text_stream} == {"acme/sum@2"}

    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {BASE_NAME, "acme/sum", "acme/qa", "acme/reverse-template", "acme/chat-template"}  # never other/secret
    assert listed["acme/reverse-template"].model_extra["tunehub"]["kind"] == "template"
    assert listed["acme/sum"].model_extra["tunehub"]["version"] == 2
    assert listed["acme/sum"].model_extra["tunehub"]["aliases"] == {"prod": 1}
    assert listed["acme/sum"].model_extra["root"] == BASE_NAME
    assert "parent" in listed["acme/sum"].model_extra
    assert {m.id for m in _openai(server, "other").models.list()} == {"other/secret"}


def test_sdk_sync_async_streaming_and_module_switching(server):
    with _sdk(server) as client:
        results = {
            ref: client.complete(ref, "a small red house near the", max_tokens=6, temperature=0, ignore_eos=True)
            for ref in ("acme/sum@1", "acme/sum@2", "acme/qa", BASE_NAME)
        }
        assert {ref: r.model for ref, r in results.items()} == {
            "acme/sum@1": "acme/sum@1",
            "acme/sum@2": "acme/sum@2",
            "acme/qa": "acme/qa@1",
            BASE_NAME: BASE_NAME,
        }
        assert results[BASE_NAME].module is None and results["acme/qa"].module == "acme/qa@1"
        assert all(r.completion_tokens == 6 and r.base_fingerprint for r in results.values())
        assert len({r.text for r in results.values()}) > 1  # the modules change the answer

        with client.stream_complete(
            "acme/sum@2", "a small red house near the", max_tokens=6, temperature=0, ignore_eos=True
        ) as stream:
            assert stream.module == "acme/sum@2"  # known from the headers, before any token
            text = "".join(chunk.text for chunk in stream)
        assert text == results["acme/sum@2"].text
        assert stream.completion.completion_tokens == 6 and stream.completion.module == "acme/sum@2"

        chat = client.chat("acme/sum", "hello", max_tokens=4, temperature=0, ignore_eos=True)
        assert chat.model == "acme/sum@2" and chat.completion_tokens == 4  # no alias: latest

    async def concurrently():
        from tunehub.sdk import AsyncClient

        async with AsyncClient(server.url, KEYS["acme"]) as client:
            refs = ["acme/sum@1", "acme/sum@2", "acme/qa", BASE_NAME] * 3
            answers = await asyncio.gather(
                *[
                    client.complete(ref, "a small red house near the", max_tokens=6, temperature=0, ignore_eos=True)
                    for ref in refs
                ]
            )
            stream = await client.stream_chat("acme/qa", "hi", max_tokens=3, temperature=0, ignore_eos=True)
            async with stream:
                chunks = [c async for c in stream]
            return refs, answers, stream, chunks

    with _sdk(server) as admin:
        steps_before = admin.pool()["engine_steps"]
        refs, answers, stream, chunks = asyncio.run(concurrently())
        steps = admin.pool()["engine_steps"] - steps_before
    for ref, answer in zip(refs, answers):
        assert answer.model == results[ref].model and answer.completion_tokens == 6
    assert stream.completion.completion_tokens == 3 and chunks
    # 12 requests of 6 tokens, one at a time, would take 12 x 5 decode steps; batched far fewer
    assert steps < 40, steps


def test_cli_generate(server):
    env = {**os.environ, "TUNEHUB_API_KEY": KEYS["acme"]}
    out = subprocess.run(
        [*_tunehub(), "generate", "--url", server.url, "--model", "acme/qa", "the river", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "[acme/qa@1, base " in out.stderr
    streamed = subprocess.run(
        [
            *_tunehub(),
            "generate",
            "--url",
            server.url,
            "--model",
            "acme/sum@prod",
            "hi",
            "--chat",
            "--stream",
            "--max-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert streamed.returncode == 0 and "[acme/sum@1, base " in streamed.stderr, streamed.stderr
    denied = subprocess.run(
        [*_tunehub(), "generate", "--url", server.url, "--model", "other/secret", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert denied.returncode != 0 and "Traceback" not in denied.stderr
    assert "does not exist or this API key may not use it" in denied.stderr


# --- tenants -----------------------------------------------------------------------------------


def test_unknown_or_missing_key_is_401(server):
    for key in (None, "not-a-key"):
        response = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x"}, key=key)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    import openai

    with pytest.raises(openai.AuthenticationError):
        _openai(server).with_options(api_key="wrong").completions.create(model="acme/qa", prompt="x", max_tokens=2)
    from tunehub.sdk import Client

    with pytest.raises(Unauthorized) as info:
        Client(server.url, "wrong").complete("acme/qa", "x", max_tokens=2)
    assert info.value.status_code == 401


def test_forbidden_and_missing_modules_look_the_same(server):
    def answer(model):
        response = _post(server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2})
        assert response.status_code == 404, response.text
        return response.json()["error"], dict(response.headers)

    bodies = {}
    for model in ("other/secret", "other/secret@1", "other/nothing", "acme/nothing", "acme/sum@99", "acme/sum@nope"):
        error, headers = answer(model)
        bodies[model] = json.dumps(error).replace(model, "MODEL")
        assert "x-tunehub-module" not in headers
    assert len(set(bodies.values())) == 1, bodies  # exists-but-not-yours reads exactly as does-not-exist
    with pytest.raises(ModuleNotFound):
        _sdk(server).complete("other/secret", "x")
    # the owner does get it
    assert _sdk(server, "other").complete("other/secret", "x", max_tokens=2).model == "other/secret@1"


def test_rate_limits_answer_429_with_retry_after(server):
    for _ in range(3):
        assert (
            _post(
                server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 2}, key=KEYS["limited"]
            ).status_code
            == 200
        )
    response = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 2}, key=KEYS["limited"])
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(RateLimited) as info:
        _sdk(server, "limited").complete("acme/qa", "x", max_tokens=2)
    assert info.value.retry_after and info.value.retry_after >= 1

    # tokens per minute: one request spends the budget, the next one waits
    first = _post(
        server,
        "/v1/completions",
        {"model": "acme/qa", "prompt": "one two three four five six", "max_tokens": 16, "ignore_eos": True},
        key=KEYS["tokens"],
    )
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 20
    second = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x"}, key=KEYS["tokens"])
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert "tokens per minute" in second.json()["error"]["message"]


def test_max_tokens_limit(server):
    over = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 17}, key=KEYS["capped"])
    assert over.status_code == 400 and "above this API key's limit of 16" in over.json()["error"]["message"]
    default = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "ignore_eos": True}, key=KEYS["capped"])
    assert default.status_code == 200 and default.json()["usage"]["completion_tokens"] == 16  # capped, not refused
    with pytest.raises(InvalidRequest):
        _sdk(server).complete("acme/qa", "x", max_tokens=1000)


def test_server_metadata_needs_a_key_when_tenants_are_configured(server):
    for path in ("/", "/info"):
        refused = httpx.get(server.url + path)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["message"] == "missing API key: send 'Authorization: Bearer <key>'"
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {KEYS['acme']}"}).status_code == 200
        assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    info = httpx.get(server.url + "/info", headers={"Authorization": f"Bearer {KEYS['acme']}"}).json()
    assert info["model"]["server"] == "tunehub"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_admin_endpoints_need_the_admin_key(server):
    assert _post(server, "/admin/reload", {}, key=None).status_code == 401
    assert _post(server, "/admin/reload", {}, key=KEYS["acme"]).status_code == 403
    assert _post(server, "/admin/reload", {}, key="nope").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    with _sdk(server) as client:
        assert client.pin("acme/sum@2")["module"] == "acme/sum@2"
        pool = client.pool()
        entry = next(m for m in pool["modules"] if m["module"] == "acme/sum@2")
        assert entry["pinned"] and entry["bytes"] > 0 and pool["resident_bytes"] >= entry["bytes"]
        assert client.unpin("acme/sum@2")["pinned"] is False
        assert client.load("acme/qa@1")["module"] == "acme/qa@1"
        assert client.unload("other/secret@1")["module"] == "other/secret@1"
        with pytest.raises(ModuleNotFound):
            client.load("acme/none")
        with pytest.raises(InvalidReference):
            client.pin("Not A Ref")


# --- promotion, disconnects, bad input ---------------------------------------------------------


def test_promotion_mid_stream_keeps_the_old_version_for_that_stream(server, world):
    store = world["store"]
    with _sdk(server) as client:
        stream = client.stream_complete("acme/sum@prod", "the river", max_tokens=LONG, temperature=0, ignore_eos=True)
        chunks = iter(stream)
        next(chunks)  # the stream is running on prod = v1
        assert stream.module == "acme/sum@1"
        store.promote("acme/sum@2", "prod")
        client.reload()  # re-resolve aliases now instead of waiting for the TTL
        during = client.complete("acme/sum@prod", "x", max_tokens=2)
        assert during.model == "acme/sum@2"
        pool = {m["module"]: m for m in client.pool()["modules"]}
        assert pool["acme/sum@1"]["in_use"] >= 1  # the old version is still serving the stream
        rest = list(chunks)
        assert stream.completion.module == "acme/sum@1" and stream.completion.completion_tokens == LONG
        assert rest and stream.completion.finish_reason == "length"
        # rolling back reaches the server through the alias TTL alone (1 s here), no reload
        store.rollback("acme/sum", "prod")
        deadline = time.monotonic() + 10
        while client.complete("acme/sum@prod", "x", max_tokens=1).model != "acme/sum@1":
            assert time.monotonic() < deadline, "the rollback never reached the server"
            time.sleep(0.3)


def test_client_killed_mid_stream_frees_the_slot(server):
    with _sdk(server) as admin:
        before = admin.pool()["cancelled_requests"]
        body = {"model": "acme/sum@2", "prompt": "go", "max_tokens": LONG, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {KEYS['acme']}"}
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", server.url + "/v1/completions", headers=headers, json=body) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # the connection is closed: the server cancels the engine handle within a moment
        deadline = time.monotonic() + 10
        while True:
            pool = admin.pool()
            if pool["active_requests"] == 0 and pool["engine_rows"] == 0:
                break
            assert time.monotonic() < deadline, pool
            time.sleep(0.1)
        assert pool["cancelled_requests"] == before + 1
        assert all(m["in_use"] == 0 for m in pool["modules"])
        assert admin.complete("acme/sum@2", "still there", max_tokens=3).completion_tokens >= 1


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server):
    cases = [
        ({"content": b"{not json"}, 400, "not valid JSON"),
        ({"content": b""}, 400, "empty"),
        ({"body": ["a list"]}, 400, "JSON object"),
        ({"body": {"prompt": "x"}}, 400, "'model' is required"),
        ({"body": {"model": 42, "prompt": "x"}}, 400, "'model' must be a string"),
        ({"body": {"model": "acme/qa", "prompt": "x", "max_tokens": 100000}}, 400, "limit of 480"),
        ({"body": {"model": "acme/qa", "prompt": "x", "max_tokens": "ten", "temperature": -1}}, 400, "temperature"),
        ({"body": {"model": BASE_NAME, "prompt": "river " * 700}}, 400, "context holds"),
        ({"body": {"model": "acme/qa", "prompt": "x" * 70000}}, 413, "at most 65536"),
        ({"body": {"model": "Acme/../qa", "prompt": "x"}}, 400, "reference"),
        ({"body": {"model": "acme/qa@", "prompt": "x"}}, 400, "names no version"),
        ({"body": {"model": "acme/qa", "prompt": "x", "n": 3}}, 400, "'n' must be 1"),
        ({"body": {"model": "acme/qa", "messages": "hi"}, "path": "/v1/chat/completions"}, 400, "messages"),
        (
            {"body": {"model": "acme/qa", "messages": [{"role": "robot", "content": "x"}]}, "path": "/v1/chat/completions"},
            400,
            "role",
        ),
        ({"body": {"model": BASE_NAME, "prompt": "river " * 700, "stream": True}}, 400, "context holds"),
    ]
    for case, status, needle in cases:
        path = case.get("path", "/v1/completions")
        response = _post(server, path, case.get("body"), content=case.get("content"))
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert needle in error["message"], (case, error)
    ok = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["model"] == "acme/qa@1"


def test_metrics_health_and_audit_lines(server, world):
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(server.url + "/health").status_code == 200
    answer = _post(
        server, "/v1/completions", {"model": "acme/sum@1", "prompt": "audit me", "max_tokens": 3, "ignore_eos": True}
    ).json()
    assert _post(server, "/v1/completions", {"model": "other/secret", "prompt": "x"}).status_code == 404
    assert _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x"}, key="bad").status_code == 401
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(name, **labels):
        found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert found, (name, labels)
        return sum(found)

    mine = {"tenant": "acme", "module": "acme/sum@1"}
    assert value("tunehub_requests_total", endpoint="completions", status="200", **mine) >= 1
    assert value("tunehub_completion_tokens_total", **mine) >= 3
    assert value("tunehub_prompt_tokens_total", **mine) >= 1
    assert value("tunehub_request_duration_seconds_count", **mine) >= 1
    assert value("tunehub_time_to_first_token_seconds_count", tenant="acme") >= 1
    assert value("tunehub_module_cold_loads_total") >= 1
    assert value("tunehub_requests_total", status="404", tenant="acme") >= 1
    assert value("tunehub_requests_total", status="401") >= 1
    assert value("tunehub_pool_resident_bytes") > 0
    assert value("tunehub_module_resident_bytes", module="acme/sum@1") > 0
    assert value("tunehub_pool_loads_total") >= 1
    lines = [json.loads(line) for line in (world["root"] / "audit.jsonl").read_text().splitlines()]
    line = next(line for line in lines if line["request_id"] == answer["tunehub"]["request_id"])
    assert line["tenant"] == "acme" and line["module"] == "acme/sum@1" and line["status"] == 200
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 3 and line["latency_ms"] > 0
    assert {"time", "base", "endpoint", "model"} <= set(line)
    assert any(line["status"] == 401 for line in lines) and any(line["status"] == 404 for line in lines)


def _error_of(response: httpx.Response) -> dict:
    """The OpenAI-shaped error object of an answer (and that it has that shape)."""
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    return error


def test_no_input_gets_a_5xx_and_every_error_has_the_openai_body(server):
    nested_field = b'{"model": "acme/qa", "prompt": "x", "max_tokens": ' + b"[" * 500 + b"]" * 500 + b"}"
    chat = "/v1/chat/completions"
    cases = [  # (method, path, body or raw bytes, key, status, code, param)
        ("POST", "/v1/completions", b"[" * 60000, KEYS["acme"], 400, "invalid_request", None),
        ("POST", "/v1/completions", nested_field, KEYS["acme"], 400, "invalid_request", "max_tokens"),
        (
            "POST",
            "/v1/completions",
            {"model": "acme/qa", "prompt": "x", "seed": 2**70},
            KEYS["acme"],
            400,
            "invalid_request",
            "seed",
        ),
        (
            "POST",
            "/v1/completions",
            {"model": "acme/qa", "prompt": "x", "seed": -1},
            KEYS["acme"],
            400,
            "invalid_request",
            "seed",
        ),
        (
            "POST",
            "/v1/completions",
            b'{"model": "acme/qa", "prompt": "x", "temperature": NaN}',
            KEYS["acme"],
            400,
            "invalid_request",
            "temperature",
        ),
        (
            "POST",
            "/v1/completions",
            b'{"model": "acme/qa", "prompt": "x", "top_p": 1e999}',
            KEYS["acme"],
            400,
            "invalid_request",
            "top_p",
        ),
        (
            "POST",
            "/v1/completions",
            {"model": "acme/qa", "prompt": "x", "max_tokens": 2**70},
            KEYS["acme"],
            400,
            "invalid_request",
            "max_tokens",
        ),
        ("POST", "/v1/completions", {"model": "acme/qa", "prompt": [2**70]}, KEYS["acme"], 400, "invalid_request", "prompt"),
        ("POST", "/v1/completions", {"model": "acme/qa", "prompt": [5, -1]}, KEYS["acme"], 400, "invalid_request", "prompt"),
        (
            "POST",
            "/v1/completions",
            {"model": "acme/qa", "prompt": "x", "stop_token_ids": [2**70]},
            KEYS["acme"],
            400,
            "invalid_request",
            "stop_token_ids",
        ),
        (
            "POST",
            "/v1/completions",
            {"model": "acme/qa", "prompt": "x", "stop": ["s"] * 17},
            KEYS["acme"],
            400,
            "invalid_request",
            "stop",
        ),
        ("POST", "/v1/completions", b'{"model": "acme/qa", "prompt": "\\ud800"}', KEYS["acme"], 400, "invalid_request", "prompt"),
        (
            "POST",
            chat,
            {"model": "acme/qa", "messages": [{"role": ["user"], "content": "x"}]},
            KEYS["acme"],
            400,
            "invalid_request",
            "messages",
        ),
        ("POST", "/v1/completions", {"model": "acme/qa@\u0661", "prompt": "x"}, KEYS["acme"], 400, "invalid_reference", "model"),
        (
            "POST",
            chat,
            {"model": "acme/qa@\u00b2", "messages": [{"role": "user", "content": "x"}]},
            KEYS["acme"],
            400,
            "invalid_reference",
            "model",
        ),
        ("POST", "/admin/load", {"model": "acme/qa@\u00b2"}, ADMIN_KEY, 400, "invalid_reference", None),
        ("GET", "/v1/models/acme/qa@\u00b2", None, KEYS["acme"], 404, "module_not_found", None),
        ("GET", "/v1/nothing", None, KEYS["acme"], 404, "invalid_request", None),
        ("POST", "/v1/embeddings", {"model": "acme/qa", "input": "x"}, KEYS["acme"], 404, "invalid_request", None),
        ("GET", "/v1/completions", None, KEYS["acme"], 405, "invalid_request", None),
        ("DELETE", "/v1/models", None, KEYS["acme"], 405, "invalid_request", None),
    ]
    log_before = server.err_path.read_text()
    for method, path, body, key, status, code, param in cases:
        content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        response = httpx.request(
            method,
            server.url + path,
            content=content,
            timeout=60,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert response.status_code == status, (method, path, response.text[:300])
        error = _error_of(response)
        assert (error["code"], error["param"]) == (code, param), (path, body if not isinstance(body, bytes) else "", error)
    assert _error_of(httpx.get(server.url + "/v1/nothing"))["message"] == "no such endpoint: GET /v1/nothing"
    assert _error_of(httpx.get(server.url + "/v1/completions"))["message"] == (
        "method not allowed: GET /v1/completions; use POST"
    )
    # the client's mistakes leave no traceback in the server's log, and the server keeps serving
    assert "Traceback" not in server.err_path.read_text()[len(log_before) :]
    assert _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_token_limits_hold_at_admission_and_failed_requests_are_refunded(server):
    key = KEYS["budget"]  # 40 tokens a minute, acme/qa only
    big = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 500}, key=key)
    assert big.status_code == 429, big.text[:300]
    assert _error_of(big)["message"] == (
        "max_tokens 500 is more than tenant 'budget''s limit of 40 tokens per minute; ask for at most 40"
    )
    assert "retry-after" not in big.headers  # waiting would not help
    # reserved 40 at admission, failed before generating: all 40 come back
    failed = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "river " * 700, "max_tokens": 40}, key=key)
    assert failed.status_code == 400 and "context holds" in _error_of(failed)["message"]
    done = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 38, "ignore_eos": True}, key=key)
    assert done.status_code == 200, done.text[:300]
    assert done.json()["usage"]["completion_tokens"] == 38
    over = _post(server, "/v1/completions", {"model": "acme/qa", "prompt": "x", "max_tokens": 1}, key=key)
    assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
    assert _error_of(over)["message"] == "tenant 'budget' is over its limit of 40 tokens per minute"


def test_a_grant_of_the_base_name_is_not_a_grant_of_a_module_so_named(server):
    key = KEYS["base-only"]  # models: [BASE_NAME]; the registry also holds a module named BASE_NAME
    assert (
        _post(server, "/v1/completions", {"model": BASE_NAME, "prompt": "x", "max_tokens": 2}, key=key).json()["model"]
        == BASE_NAME
    )
    for model in (f"{BASE_NAME}@1", BASE_NAME + "@latest"):
        denied = _post(server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2}, key=key)
        assert denied.status_code == 404, denied.text[:300]
        assert _error_of(denied)["message"] == f"model {model!r} does not exist or this API key may not use it"
    listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert [(m["id"], m["tunehub"].get("base")) for m in listed] == [(BASE_NAME, True)]
    assert httpx.get(server.url + f"/v1/models/{BASE_NAME}@1", headers={"Authorization": f"Bearer {key}"}).status_code == 404
    # granted by a pattern that is not just the base's name, the module is served
    open_module = _sdk(server, "acme").complete("acme/qa", "x", max_tokens=1)
    assert open_module.model == "acme/qa@1"


def test_models_answer_for_the_versioned_ids_that_answers_carry(server, world):
    def get(model_id, tenant="acme"):
        return httpx.get(server.url + f"/v1/models/{model_id}", headers={"Authorization": f"Bearer {KEYS[tenant]}"})

    answer = _post(server, "/v1/completions", {"model": "acme/sum@2", "prompt": "x", "max_tokens": 1}).json()
    for model_id, version in (
        (answer["model"], 2),
        ("acme/sum@1", 1),
        ("acme/qa", 1),
        ("acme/sum@prod", world["store"].resolve("acme/sum@prod").version),
    ):
        response = get(model_id)
        assert response.status_code == 200, (model_id, response.text[:300])
        entry = response.json()
        assert (entry["id"], entry["tunehub"]["version"], entry["root"]) == (model_id, version, BASE_NAME)
        assert entry["tunehub"]["ref"] == f"{model_id.split('@')[0]}@{version}"
    assert _openai(server).models.retrieve("acme/sum@1").id == "acme/sum@1"
    assert get("other/secret@1", "other").json()["id"] == "other/secret@1"
    bodies = set()
    for model_id in ("other/secret@1", "other/secret", "acme/nothing@1", "acme/sum@99", "acme/sum@nope"):
        response = get(model_id)
        assert response.status_code == 404, (model_id, response.text[:300])
        bodies.add(json.dumps(_error_of(response)).replace(model_id, "MODEL"))
    assert len(bodies) == 1, bodies  # not yours reads exactly as does not exist


def test_a_template_module_is_rendered_with_the_slots_and_runs_on_the_base(server):
    def complete(body):
        return _post(server, "/v1/completions", {"max_tokens": 5, "temperature": 0, "ignore_eos": True, **body})

    direct = complete({"model": BASE_NAME, "prompt": "Reverse: apple pear\nAnswer:"}).json()
    by_prompt = complete({"model": "acme/reverse-template", "prompt": "apple pear"})
    by_slots = complete({"model": "acme/reverse-template@1", "prompt": "", "slots": {"words": "apple pear"}})
    for answer in (by_prompt, by_slots):
        assert answer.status_code == 200, answer.text[:300]
        assert answer.headers["x-tunehub-module"] == "acme/reverse-template@1"
        assert answer.json()["choices"][0]["text"] == direct["choices"][0]["text"]
        assert answer.json()["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]

    chat = _post(
        server,
        "/v1/chat/completions",
        {
            "model": "acme/chat-template",
            "messages": [{"role": "user", "content": "pear"}],
            "slots": {"what": "words"},
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    direct_chat = _post(
        server,
        "/v1/chat/completions",
        {
            "model": BASE_NAME,
            "messages": [{"role": "system", "content": "You reverse words."}, {"role": "user", "content": "pear"}],
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert chat.status_code == 200, chat.text[:300]
    assert chat.json()["choices"][0]["message"]["content"] == direct_chat.json()["choices"][0]["message"]["content"]

    for body, message in [
        ({"model": "acme/reverse-template", "prompt": "", "slots": {"wrods": "x"}}, "missing words; unknown wrods"),
        ({"model": "acme/reverse-template", "prompt": "x", "slots": {"words": "x"}}, "not both"),
        ({"model": "acme/reverse-template", "prompt": [1, 2, 3]}, "a template's prompt is text"),
        ({"model": "acme/reverse-template", "prompt": "x", "slots": ["words"]}, "'slots' must be an object"),
    ]:
        refused = complete(body)
        assert refused.status_code == 400 and message in _error_of(refused)["message"], refused.text[:300]
    wrong_endpoint = _post(
        server, "/v1/chat/completions", {"model": "acme/reverse-template", "messages": [{"role": "user", "content": "x"}]}
    )
    assert wrong_endpoint.status_code == 400 and "text template" in _error_of(wrong_endpoint)["message"]
    assert complete({"model": "acme/sum@1", "prompt": "still serving"}).status_code == 200


def test_a_request_composes_modules_with_weights_and_a_template_and_tenant_rules_hold_for_every_part(server, world):
    from tunehub.server.engine import Engine, GenerationRequest, SamplingParams, load_base

    def complete(body, key=KEYS["acme"]):
        return _post(server, "/v1/completions", {"max_tokens": 6, "temperature": 0, "ignore_eos": True, **body}, key=key)

    engine = Engine(load_base(world["base"], quantization="none"), world["store"])
    try:

        def expected(prompt, **modules):
            request = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=6, stop_token_ids=[]), **modules)
            return engine.generate([request])[0].text

        cases = [
            ({"model": "acme/sum@1+acme/qa", "prompt": "the river"}, "acme/sum@1+acme/qa@1", {"module": "acme/sum@1+acme/qa@1"}),
            (
                {"modules": [{"model": "acme/sum@1", "weight": 0.7}, {"model": "acme/sum@2", "weight": 0.3}], "prompt": "seven"},
                "acme/sum@1*0.7+acme/sum@2*0.3",
                {"modules": [("acme/sum@1", 0.7), ("acme/sum@2", 0.3)]},
            ),
        ]
        for body, answered_by, modules in cases:
            answer = complete(body)
            assert answer.status_code == 200, answer.text[:300]
            assert answer.headers["x-tunehub-module"] == answered_by and answer.json()["model"] == answered_by
            assert answer.json()["choices"][0]["text"] == expected(body["prompt"], **modules)
        # a template with a module: the template renders the prompt, the module answers it
        templated = complete({"model": "acme/reverse-template+acme/sum@1", "prompt": "apple pear"})
        assert templated.status_code == 200, templated.text[:300]
        assert templated.headers["x-tunehub-module"] == "acme/reverse-template@1+acme/sum@1"
        assert templated.json()["choices"][0]["text"] == expected("Reverse: apple pear\nAnswer:", module="acme/sum@1")
    finally:
        engine.close()

    # every part passes the tenant's rules, and a refusal names none of them
    for body, key in [
        ({"model": "acme/sum@1+other/secret", "prompt": "x"}, KEYS["acme"]),
        ({"model": "other/secret+acme/sum@1", "prompt": "x"}, KEYS["other"]),
        ({"modules": [{"model": "other/secret"}, {"model": "acme/qa"}], "prompt": "x"}, KEYS["other"]),
    ]:
        refused = complete(body, key=key)
        assert refused.status_code == 404 and "does not exist or this API key may not use it" in _error_of(refused)["message"]
    for body, message in [
        ({"model": "acme/sum+acme/sum@9", "prompt": "x"}, "does not exist or this API key may not use it"),
        ({"model": "acme/qa+acme/qa@1", "prompt": "x"}, "named twice"),
        ({"model": f"{BASE_NAME}+acme/sum", "prompt": "x"}, "is the base model"),
        ({"model": "acme/sum", "modules": [{"model": "acme/qa"}], "prompt": "x"}, "'model' must name the same modules"),
        ({"modules": [{"model": "acme/sum", "weight": "heavy"}], "prompt": "x"}, "modules[0].weight must be a number"),
        ({"modules": [{"model": "acme/sum+acme/qa"}], "prompt": "x"}, "modules[0].model must be one module reference"),
        ({"modules": [], "prompt": "x"}, "'modules' must be a list of 1 to 8"),
        ({"model": "acme/reverse-template+acme/chat-template", "prompt": "x"}, "both templates"),
    ]:
        refused = complete(body)
        assert 400 <= refused.status_code < 500 and message in _error_of(refused)["message"], (body, refused.text[:300])
    assert complete({"model": "acme/sum@1", "prompt": "still serving"}).status_code == 200


# --- open mode, nf4, SIGTERM -------------------------------------------------------------------


def test_open_mode_refuses_a_public_host(world):
    out = subprocess.run(
        [*_tunehub(), "serve", "--base", str(world["base"]), "--host", "0.0.0.0", "--port", "18999"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2 and "without --tenants" in out.stderr and "Traceback" not in out.stderr


def test_nf4_open_server_and_sigterm_leaves_no_process(world):
    root = world["root"]
    # no drain period: a stream still running at SIGTERM is ended at once, so its outcome is known
    srv = Server(
        ["--base", str(world["base"]), "--quantization", "nf4", "--registry", str(root / "registry")],
        root,
        env={"TUNEHUB_SERVE_DRAIN_S": "0"},
    )
    try:
        srv.wait_ready()
        from tunehub.sdk import Client

        assert httpx.get(srv.url + "/info").status_code == 200  # open mode: metadata needs no key either
        with Client(srv.url) as client:  # open mode: no key needed
            answer = client.complete("acme/sum@2", "the river", max_tokens=4, temperature=0, ignore_eos=True)
            assert answer.model == "acme/sum@2" and answer.completion_tokens == 4
            assert {m["id"] for m in client.models()} >= {BASE_NAME, "acme/sum", "other/secret"}
            assert client.models()[0]["tunehub"]["quantization"] == "nf4"
            processes = _descendants(srv.proc.pid)
            assert len(processes) >= 3  # LitServe main, its API server, the inference worker, ...
            body = {"model": BASE_NAME, "prompt": "the river", "max_tokens": 480, "ignore_eos": True, "stream": True}
            with httpx.Client(timeout=60) as http, http.stream("POST", srv.url + "/v1/completions", json=body) as response:
                events = (line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: "))
                assert json.loads(next(events))["choices"][0]["finish_reason"] is None  # it is generating
                started = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                rest = list(events)  # the server ends the stream: no cut connection, no hang
            assert rest[-1] == "[DONE]"
            assert json.loads(rest[-2]) == {
                "error": {
                    "message": "the server is shutting down and this request did not finish in time",
                    "type": "server_error",
                    "param": None,
                    "code": "server_error",
                    "tunehub_error": "ServerError",
                }
            }
            tokens = [json.loads(event) for event in rest[:-2]]
            assert all(t["choices"][0]["finish_reason"] is None for t in tokens)  # cut short, no final chunk
            assert srv.proc.wait(timeout=10) == 0
            while _alive(processes) and time.monotonic() - started < 10:
                time.sleep(0.1)
            assert not _alive(processes), f"left behind: {_alive(processes)}"
            assert time.monotonic() - started < 10
        # a clean stop says nothing alarming: the worker exits after its multiprocessing
        # finalizers ran (no semaphores left to the resource tracker), no traceback, no abort
        log = srv.err_path.read_text()
        for alarm in ("leaked semaphore", "Traceback", "terminate called"):
            assert alarm not in log, log[-3000:]
    finally:
        srv.stop()
