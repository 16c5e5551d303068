"""The hf:// store and `tunehub hub serve`: a real server process, the real huggingface_hub client
over real HTTP, PEFT loading from it, offline reads, concurrent pushers and hostile input."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub reads these when it is imported
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import httpx
import pytest

from tests.helpers import make_fake_module
from tunehub.errors import (
    Conflict,
    IntegrityError,
    InvalidReference,
    ModuleNotFound,
    StoreError,
    VersionNotFound,
)
from tunehub.sdk import Registry

pytestmark = pytest.mark.integration

TOKEN = "hub-test-token-0123456789"
MAX_BODY = 2 * 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Hub:
    url: str
    root: Path
    log: Path
    proc: subprocess.Popen


def _start_hub(tmp: Path, tokens: str = f"# accepted tokens\n{TOKEN}\nanother-token\n") -> Hub:
    root, log = tmp / "hub-root", tmp / "hub.log"
    token_file = tmp / "tokens.txt"
    token_file.write_text(tokens)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tunehub.sdk.cli",
                "hub",
                "serve",
                "--root",
                str(root),
                "--port",
                "0",
                "--token-file",
                str(token_file),
                "--max-body-bytes",
                str(MAX_BODY),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            cwd=REPO_ROOT,
        )
    deadline = time.monotonic() + 60
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"hub server exited early:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            if " on http://" in line:
                url = line.split(" on ", 1)[1].split()[0]
        if url:
            try:
                if httpx.get(f"{url}/api/models", timeout=2).status_code == 200:
                    return Hub(url=url, root=root, log=log, proc=proc)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    pytest.fail(f"hub server did not answer in time:\n{log.read_text()}")


@contextmanager
def _running_hub(root: Path, tokens: str | None = None) -> Iterator[Hub]:
    """A `tunehub hub serve` process for the module's tests; stopped after them, its log clean."""
    server = _start_hub(root, tokens=tokens) if tokens is not None else _start_hub(root)
    # what a program using the SDK against a private hub does once (the CLI does it for its users):
    # huggingface_hub may have been imported by an earlier test, before the variable was set
    from tunehub.registry.hf import prepare_environment

    prepare_environment(server.url)
    try:
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    log = server.log.read_text()
    assert "internal error" not in log and "Traceback" not in log, log


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    with _running_hub(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture
def env(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for client processes: our hub, a fresh HF cache and TUNEHUB_HOME, the token."""
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_TOKEN": TOKEN,
        "TUNEHUB_HOME": str(tmp_path / "home"),
        "TUNEHUB_USER": "tester",
        "PYTHONPATH": str(REPO_ROOT),
    }


def _registry(hub: Hub, cache: Path, token: str | None = TOKEN) -> Registry:
    return Registry("hf://acme", endpoint=hub.url, token=token, cache_dir=cache)


def _run(code: str, env: dict[str, str], *args: object, timeout: int = 180) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _cli(env: dict[str, str], *args: object, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "tunehub.sdk.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO_ROOT,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc


def _api(hub: Hub, token: str | None = TOKEN):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=token if token else False)


# --- the store, end to end ---------------------------------------------------------------------
def test_push_promote_rollback_list_and_pull_by_version_alias_and_commit(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    reg = _registry(hub, tmp_path / "hf-cache")
    modules = [make_fake_module(tmp_path / f"m{i}", task="summarize") for i in range(3)]
    infos = [reg.push(m, "acme/sum") for m in modules]
    assert [i.ref for i in infos] == ["acme/sum@1", "acme/sum@2", "acme/sum@3"]
    commits = [i.commit for i in infos]
    assert all(c and len(c) == 40 for c in commits) and len(set(commits)) == 3
    reg.push(make_fake_module(tmp_path / "cls", kind="dora", task="classify", base_id="other-base"), "cls")

    api = _api(hub)
    refs = api.list_repo_refs("acme/sum")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": commits[0], "v2": commits[1], "v3": commits[2]}
    card = api.model_info("acme/sum").card_data
    assert card.library_name == "peft" and card.base_model == "tiny-base" and "tunehub" in card.tags

    assert reg.promote("sum@2", "prod").to_version == 2
    assert reg.promote("acme/sum@3", "prod").from_version == 2
    branches = {b.name: b.target_commit for b in api.list_repo_refs("acme/sum").branches}
    assert branches["prod"] == commits[2]
    move = reg.rollback("sum", "prod")
    assert (move.from_version, move.to_version) == (3, 2)
    branches = {b.name: b.target_commit for b in api.list_repo_refs("acme/sum").branches}
    assert branches["prod"] == commits[1]  # the branch moved back too
    assert [(m.action, m.to_version) for m in reg.alias_history("sum", "prod")] == [
        ("promote", 2),
        ("promote", 3),
        ("rollback", 2),
    ]
    resolved = reg.resolve("acme/sum@prod")
    assert (resolved.version, resolved.commit, resolved.aliases) == (2, commits[1], ("prod",))

    assert sorted(i.ref for i in reg.list()) == ["acme/cls@1", "acme/sum@3"]
    assert [i.ref for i in reg.list(kind="dora")] == ["acme/cls@1"]
    assert [i.ref for i in reg.list(task="summarize")] == ["acme/sum@3"]
    assert [i.ref for i in reg.list(base="other-base")] == ["acme/cls@1"]
    assert reg.list(namespace="someone-else") == []

    def payload(module: Path) -> bytes:
        return (module / "adapter_model.safetensors").read_bytes()

    by_version = reg.pull("acme/sum@1", tmp_path / "out1")
    assert by_version.version == 1 and payload(by_version.path) == payload(modules[0])
    by_alias = reg.pull("sum@prod")
    assert by_alias.version == 2 and payload(by_alias.path) == payload(modules[1])
    assert not any(p.is_symlink() for p in by_alias.path.rglob("*"))  # plain files, not cache links
    by_commit = reg.pull(f"acme/sum@{commits[2]}", tmp_path / "out3")
    assert by_commit.version == 3 and payload(by_commit.path) == payload(modules[2])
    assert reg.manifest("sum@3").task == "summarize"
    content = reg.store.read("sum@prod", ["adapter_model.safetensors"])  # what a server activates
    assert content.version == 2 and content.files == {"adapter_model.safetensors": payload(modules[1])}

    # the alias branch is readable by the plain client, as PEFT or vLLM would read it
    from huggingface_hub import hf_hub_download

    got = hf_hub_download(
        "acme/sum", "adapter_model.safetensors", revision="prod", endpoint=hub.url, cache_dir=tmp_path / "plain-cache"
    )
    assert Path(got).read_bytes() == payload(modules[1])

    reg.yank("sum@3", "broken")
    assert reg.resolve("sum").version == 2
    with pytest.raises(VersionNotFound, match="yanked"):
        reg.pull("sum@3", tmp_path / "yanked")
    assert reg.delete("sum@1") == [1]
    assert "v1" not in {t.name for t in api.list_repo_refs("acme/sum").tags}
    with pytest.raises(VersionNotFound, match="deleted"):
        reg.resolve("sum@1")
    assert reg.push(modules[0], "sum").version == 4  # numbers are never reused
    with pytest.raises(InvalidReference, match="namespace"):
        reg.resolve("other/sum")
    with pytest.raises(ModuleNotFound):
        reg.resolve("acme/nothing-here")


def test_cli_verbs_accept_an_hf_registry(hub, env, tmp_path):
    module = make_fake_module(tmp_path / "mod", task="cli-task")
    assert "pushed acme/cli-mod@1" in _cli(env, "push", module, "acme/cli-mod", "--registry", "hf://acme").stdout
    _cli(env, "push", module, "cli-mod", "--registry", "hf://acme")
    assert _cli(env, "promote", "cli-mod@1", "prod", "-r", "hf://acme").stdout.strip() == "prod: unset -> 1"
    infos = json.loads(_cli(env, "versions", "cli-mod", "--json", "-r", "hf://acme").stdout)
    assert [(i["version"], i["aliases"]) for i in infos] == [(1, ["prod"]), (2, [])]
    assert all(len(i["commit"]) == 40 for i in infos)
    listed = json.loads(_cli(env, "ls", "--task", "cli-task", "--json", "-r", "hf://acme").stdout)
    assert [i["ref"] for i in listed] == ["acme/cli-mod@2"]
    out = _cli(env, "pull", "cli-mod@prod", "--dest", tmp_path / "pulled", "-r", "hf://acme").stdout
    assert "pulled acme/cli-mod@1" in out
    shown = json.loads(_cli(env, "show", "cli-mod@2", "-r", "hf://acme").stdout)
    assert shown["_registry"]["uri"] == "hf://acme"
    err = _cli(env, "pull", "cli-mod@9", "-r", "hf://acme", ok=False).stderr
    assert "no version 9" in err
    # and through TUNEHUB_REGISTRY, as every verb reads it
    via_env = _cli({**env, "TUNEHUB_REGISTRY": "hf://acme"}, "versions", "cli-mod", "--json").stdout
    assert [i["ref"] for i in json.loads(via_env)] == ["acme/cli-mod@1", "acme/cli-mod@2"]


def test_lost_tags_are_repaired_and_foreign_repos_are_not_touched(hub, tmp_path):
    from tunehub.errors import Conflict

    reg = _registry(hub, tmp_path / "hf-cache")
    api = _api(hub)
    first = reg.push(make_fake_module(tmp_path / "m1"), "acme/repair")
    api.delete_tag("acme/repair", tag="v1")  # as if the push had died between its commit and its tag
    assert reg.resolve("repair@1").commit is None
    assert reg.pull("repair@1", tmp_path / "untagged").version == 1  # readers find it by its commit title
    second = reg.push(make_fake_module(tmp_path / "m2"), "acme/repair")  # the next writer repairs it
    tags = {t.name: t.target_commit for t in api.list_repo_refs("acme/repair").tags}
    assert tags == {"v1": first.commit, "v2": second.commit}
    reg.promote("repair@1", "prod")
    api.delete_branch("acme/repair", branch="prod")
    reg.promote("repair@2", "canary")  # any state change brings the alias branches back
    branches = {b.name: b.target_commit for b in api.list_repo_refs("acme/repair").branches}
    assert branches["prod"] == first.commit and branches["canary"] == second.commit

    api.create_repo("acme/foreign")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="acme/foreign")
    with pytest.raises(Conflict, match="not a tunehub module"):
        reg.push(make_fake_module(tmp_path / "m3"), "acme/foreign")
    with pytest.raises(ModuleNotFound):
        reg.resolve("acme/foreign")
    assert api.list_repo_files("acme/foreign") == [".gitattributes", "config.json"]


# --- interoperability ----------------------------------------------------------------------------
PEFT_CHECK = """
    import json, sys, torch
    from peft import PeftModel
    from tunehub.trainer.testing import load_base
    base_path, local_v2 = sys.argv[1], sys.argv[2]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    def logits(source, revision=None):
        kwargs = {"revision": revision} if revision else {}
        model = PeftModel.from_pretrained(load_base(base_path), source, **kwargs).eval()
        with torch.no_grad():
            return model(input_ids=ids).logits
    hub_v2 = logits("acme/peft-lora", "v2")
    hub_v1 = logits("acme/peft-lora", "v1")
    local = logits(local_v2)
    print(json.dumps({"max_diff": (hub_v2 - local).abs().max().item(),
                      "v1_vs_v2": (hub_v1 - hub_v2).abs().max().item()}))
"""


def test_peft_from_pretrained_loads_a_version_from_our_hub(hub, env, tmp_path, lora_module, tiny_llama_path):
    reg = _registry(hub, tmp_path / "hf-cache")
    first, second = lora_module(seed=0), lora_module(seed=1)
    assert reg.push(first, "acme/peft-lora").version == 1
    assert reg.push(second, "acme/peft-lora").version == 2
    result = json.loads(_run(PEFT_CHECK, env, tiny_llama_path, second).strip().splitlines()[-1])
    assert result["max_diff"] == 0.0  # the same weights, byte for byte: the same logits
    assert result["v1_vs_v2"] > 1e-4  # and revision= really chose the version


SNAPSHOT = """
    import sys
    from pathlib import Path
    from huggingface_hub import snapshot_download
    path = Path(snapshot_download("acme/offline", revision="v1"))
    print(path.name, (path / "adapter_model.safetensors").read_bytes().hex()[:64])
"""


def test_snapshot_download_of_a_tag_works_offline_after_one_online_pull(hub, env, tmp_path):
    module = make_fake_module(tmp_path / "mod")
    info = _registry(hub, Path(env["HF_HUB_CACHE"])).push(module, "acme/offline")
    online = _run(SNAPSHOT, env).split()
    assert online[0] == info.commit
    _cli(env, "pull", "acme/offline@1", "--dest", tmp_path / "online", "-r", "hf://acme")

    offline_env = {**env, "HF_HUB_OFFLINE": "1"}
    assert _run(SNAPSHOT, offline_env).split() == online
    # the store too: resolve and pull from the cache and the last state seen online
    out = _cli(offline_env, "pull", "acme/offline@1", "--dest", tmp_path / "offline", "-r", "hf://acme").stdout
    assert "pulled acme/offline@1" in out
    assert (tmp_path / "offline" / "adapter_model.safetensors").read_bytes() == (
        module / "adapter_model.safetensors"
    ).read_bytes()
    err = _cli(offline_env, "push", module, "acme/offline", "-r", "hf://acme", ok=False).stderr
    assert "HF_HUB_OFFLINE" in err


# --- concurrency ---------------------------------------------------------------------------------
PUSHER = """
    import sys, time
    from pathlib import Path
    from tunehub.sdk import Registry
    reg = Registry("hf://acme")
    barrier = Path(sys.argv[3])
    (barrier / sys.argv[4]).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # start pushing together, so that the pushes really race
    for _ in range(int(sys.argv[2])):
        print(reg.push(sys.argv[1], "acme/race").version, flush=True)
"""


def test_two_processes_pushing_one_name_get_distinct_versions(hub, env, tmp_path):
    modules = [make_fake_module(tmp_path / f"m{i}", payload=os.urandom(4096)) for i in range(2)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PUSHER), str(m), "4", barrier, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "HF_HOME": str(tmp_path / f"hf{i}")},
            cwd=REPO_ROOT,
        )
        for i, m in enumerate(modules)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append([int(v) for v in out.split()])
    assert sorted(outputs[0] + outputs[1]) == list(range(1, 9))
    reg = _registry(hub, tmp_path / "check-cache")
    expected = [hashlib.sha256((m / "manifest.json").read_bytes()).hexdigest() for m in modules]
    for pusher, versions in enumerate(outputs):
        for version in versions:
            assert reg.resolve(f"race@{version}").manifest_sha256 == expected[pusher]
    tags = {t.name for t in _api(hub).list_repo_refs("acme/race").tags}
    assert tags == {f"v{n}" for n in range(1, 9)}


# --- refusals ------------------------------------------------------------------------------------
def test_writes_need_a_token_reads_do_not(hub, tmp_path):
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"}):
        answer = httpx.post(f"{hub.url}/api/repos/create", json={"name": "noauth", "organization": "acme"}, headers=headers)
        assert answer.status_code in (401, 403), answer.text
        assert "error" in answer.json()
    assert httpx.get(f"{hub.url}/api/models/acme/noauth").status_code == 404

    module = make_fake_module(tmp_path / "mod")
    with pytest.raises(StoreError, match="refused"):
        _registry(hub, tmp_path / "c1", token="wrong-token").push(module, "acme/noauth")
    with pytest.raises(ModuleNotFound):
        _registry(hub, tmp_path / "c2").resolve("acme/noauth")
    assert httpx.get(f"{hub.url}/api/models/acme/noauth").headers["X-Error-Code"] == "RepoNotFound"

    _registry(hub, tmp_path / "c3").push(module, "acme/authed")
    anonymous = _api(hub, token=None)
    assert {t.name for t in anonymous.list_repo_refs("acme/authed").tags} == {"v1"}  # reads need no token
    with pytest.raises(Exception) as refused:
        anonymous.create_tag("acme/authed", tag="sneaky", revision="main")
    assert refused.value.response.status_code == 401
    assert {t.name for t in anonymous.list_repo_refs("acme/authed").tags} == {"v1"}


def test_tampered_blob_on_the_hub_is_detected_on_pull(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    module = make_fake_module(tmp_path / "mod", payload=os.urandom(8192))
    _registry(hub, tmp_path / "push-cache").push(module, "acme/tamper")
    digest = json.loads((module / "manifest.json").read_text())["files"]["adapter_model.safetensors"]
    blob = hub.root / "objects" / "sha256" / digest[:2] / digest
    original = blob.read_bytes()
    damaged = bytearray(original)
    damaged[100] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    reader = _registry(hub, tmp_path / "fresh-cache")
    try:
        with pytest.raises(IntegrityError, match="damaged"):
            reader.pull("acme/tamper@1", tmp_path / "out")
        assert not (tmp_path / "out").exists()  # nothing half-written
    finally:
        blob.write_bytes(original)
    # the bad copy was evicted from the HF cache: once the hub is repaired, a pull succeeds
    pulled = reader.pull("acme/tamper@1", tmp_path / "out")
    assert (pulled.path / "adapter_model.safetensors").read_bytes() == original


def test_signed_versions_on_the_hub_verify_and_each_refusal_has_its_own_message(hub, tmp_path, monkeypatch):
    from tunehub.errors import SignatureMismatch, UnsignedModule, UntrustedSigner
    from tunehub.registry.signing import generate_key_pair

    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    generate_key_pair(tmp_path / "team")
    generate_key_pair(tmp_path / "stranger")
    writer = _registry(hub, tmp_path / "push-cache")
    writer.push(make_fake_module(tmp_path / "a"), "acme/signed", sign=tmp_path / "team")  # 1
    writer.push(make_fake_module(tmp_path / "b"), "acme/signed")  # 2: unsigned
    writer.push(make_fake_module(tmp_path / "c"), "acme/signed", sign=tmp_path / "stranger")  # 3
    writer.push(make_fake_module(tmp_path / "d"), "acme/signed", sign=tmp_path / "team")  # 4: re-written below
    trusted = [tmp_path / "team.pub"]
    strict = Registry("hf://acme", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c1", trust=trusted, require_signed=True)
    assert strict.pull("acme/signed@1", tmp_path / "one").ref == "acme/signed@1"
    assert writer.verify("acme/signed@1", trusted).verified
    # someone with write access points v4's record at v2's files (matching hashes) and keeps the signature
    from huggingface_hub import CommitOperationAdd, hf_hub_download

    state_path = hf_hub_download("acme/signed", ".tunehub/state.json", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c2")
    state = json.loads(Path(state_path).read_text())
    state["versions"]["4"] = {**state["versions"]["2"], "version": 4}
    _api(hub).create_commit(
        "acme/signed",
        [CommitOperationAdd(".tunehub/state.json", json.dumps(state).encode())],
        commit_message="re-written",
    )
    fresh = Registry("hf://acme", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c3", trust=trusted, require_signed=True)
    for ref, error, message in [
        ("acme/signed@2", UnsignedModule, "not signed"),
        ("acme/signed@3", UntrustedSigner, "not trusted"),
        ("acme/signed@4", SignatureMismatch, "changed after signing"),
    ]:
        with pytest.raises(error, match=message):
            fresh.pull(ref, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    # signing an existing version on the hub is a state change like a yank
    assert writer.sign("acme/signed@2", tmp_path / "team").signatures
    assert fresh.pull("acme/signed@2", tmp_path / "two").ref == "acme/signed@2"


def test_pull_dest_never_touches_the_users_files(hub, tmp_path, monkeypatch):
    # the same rule as the file:// store (tests/unit/test_store_safety.py), through the hub
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    reg = _registry(hub, tmp_path / "hf-cache")
    first = make_fake_module(tmp_path / "m1", extra_files={"tokenizer/vocab.txt": b"a b"})
    reg.push(first, "acme/pulldest")
    reg.push(make_fake_module(tmp_path / "m2"), "acme/pulldest")
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}\n")
    (folder / "notes.txt").write_text("keep\n")
    with pytest.raises(Conflict, match="not a pulled copy of this module.*--force"):
        reg.pull("acme/pulldest@1", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "notes.txt"]
    assert (folder / "manifest.json").read_text() == "{}\n"
    reg.pull("acme/pulldest@1", folder, force=True)
    assert (folder / "notes.txt").read_text() == "keep\n" and (folder / "tokenizer" / "vocab.txt").read_bytes() == b"a b"

    earlier = tmp_path / "earlier"
    reg.pull("acme/pulldest@1", earlier)
    reg.pull("acme/pulldest@2", earlier)  # exactly an earlier pull of this module: replaced
    assert sorted(p.relative_to(earlier).as_posix() for p in earlier.rglob("*") if p.is_file()) == sorted(
        p.relative_to(tmp_path / "m2").as_posix() for p in (tmp_path / "m2").rglob("*") if p.is_file()
    )


# --- hostile input to the server ------------------------------------------------------------------
def _raw(hub: Hub, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (httpx would normalise '..' and reject odd bytes)."""
    host, port = hub.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
                if len(body) >= int(headers.get("Content-Length", 0)):
                    return int(head.split()[1]), headers, body
    raise AssertionError(f"no complete answer: {data[:200]!r}")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "tmp" and p.name != ".lock"
    }


def _ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def test_bad_input_gets_clear_4xx_answers_and_writes_nothing(hub, tmp_path):
    api = _api(hub)
    api.create_repo("acme/target", exist_ok=True)
    head = api.list_repo_refs("acme/target").branches[0].target_commit
    before = _files(hub.root)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    commit_url = f"{hub.url}/api/models/acme/target/commit/main"
    header = {"key": "header", "value": {"summary": "evil"}}

    def file_line(path: str, content: bytes = b"x") -> dict:
        return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"}}

    def expect(answer: httpx.Response | tuple, status: int, code: str | None = None) -> None:
        if isinstance(answer, tuple):
            got, headers, body = answer
        else:
            got, headers, body = answer.status_code, answer.headers, answer.content
        assert got == status, body[:300]
        assert "error" in json.loads(body)
        if code:
            assert headers.get("X-Error-Code") == code

    # path traversal in repo names and file paths, raw so nothing normalises them away
    for target in (
        "/api/models/acme/..%2F..%2Fetc",
        "/api/models/..%2F..%2Fetc/passwd/refs",
        "/api/models/acme/bad%00name",
        "/api/models/acme/a%5Cb/refs",
        "/acme/target/resolve/main/../../../../etc/passwd",
        "/acme/target/resolve/main/%2e%2e/%2e%2e/repos/models/acme/target/refs.json",
        "/acme/target/resolve/main/..%5C..%5Crefs.json",
        "/acme/target/resolve/main/%2Fetc%2Fpasswd",
        "/acme/target/resolve/main/a%00b",
        "/..%2F..%2Fetc/target/resolve/main/x",
        "/api/models/acme/target/tree/main/..%2F..",
    ):
        status, headers, body = _raw(hub, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status == 400, (target, body)
        assert "error" in json.loads(body)
    for name in ("../evil", "a\\b", ".", "x" * 200, "ok\x00no"):
        expect(httpx.post(f"{hub.url}/api/repos/create", json={"name": name, "organization": "acme"}, headers=auth), 400)
    expect(httpx.post(f"{hub.url}/api/repos/create", json={"name": "fine", "organization": ".."}, headers=auth), 400)
    for path in ("../../escape.txt", "/etc/passwd", "a\\b.txt", "a\x00b", "dir/../../x", ".git/config", ""):
        expect(httpx.post(commit_url, content=_ndjson(header, file_line(path)), headers=auth), 400)

    # malformed commits
    expect(httpx.post(commit_url, content=b"this is not json\n", headers=auth), 400)
    expect(httpx.post(commit_url, content=_ndjson(file_line("a.txt")), headers=auth), 400)  # no header
    expect(
        httpx.post(commit_url, content=_ndjson(header, {"key": "file", "value": {"path": "a", "content": "!!"}}), headers=auth),
        400,
    )
    expect(httpx.post(commit_url, content=_ndjson(header, {"key": "teleport", "value": {"path": "a"}}), headers=auth), 400)
    lfs = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "ab" * 32, "size": 3}}
    expect(httpx.post(commit_url, content=_ndjson(header, lfs), headers=auth), 400)  # never uploaded
    stale = {"key": "header", "value": {"summary": "late", "parentCommit": "0" * 40}}
    expect(httpx.post(commit_url, content=_ndjson(stale, file_line("a.txt")), headers=auth), 412)
    expect(
        httpx.post(f"{hub.url}/api/models/acme/target/commit/v9", content=_ndjson(header), headers=auth), 404, "RevisionNotFound"
    )
    expect(httpx.post(f"{hub.url}/api/repos/create", content=b"{not json", headers=auth), 400)
    expect(httpx.post(f"{hub.url}/api/repos/create", content=b"[1, 2]", headers=auth), 400)
    expect(httpx.post(f"{hub.url}/api/models/acme/target/preupload/main", json={"files": "nope"}, headers=auth), 400)
    expect(
        httpx.post(
            f"{hub.url}/acme/target.git/info/lfs/objects/batch",
            json={"operation": "upload", "objects": [{"oid": "../x", "size": 1}]},
            headers=auth,
        ),
        400,
    )
    expect(httpx.put(f"{hub.url}/acme/target.git/info/lfs/objects/{'ab' * 32}", content=b"abc"), 403)  # unsigned
    expect(
        httpx.put(f"{hub.url}/acme/target.git/info/lfs/objects/{'ab' * 32}?size=3&expires=9999999999&sig=00", content=b"abc"), 403
    )

    # unknown repos, revisions and files: the Hub's error codes
    expect(httpx.get(f"{hub.url}/api/models/acme/target/revision/nope"), 404, "RevisionNotFound")
    expect(httpx.get(f"{hub.url}/api/models/acme/target/tree/nope"), 404, "RevisionNotFound")
    expect(httpx.get(f"{hub.url}/api/models/acme/missing"), 404, "RepoNotFound")
    expect(httpx.get(f"{hub.url}/acme/missing/resolve/main/x.json"), 404, "RepoNotFound")
    missing_file = httpx.get(f"{hub.url}/acme/target/resolve/main/none.json")
    expect(missing_file, 404, "EntryNotFound")
    assert missing_file.headers["X-Repo-Commit"] == head
    assert httpx.head(f"{hub.url}/acme/target/resolve/{'1' * 40}/x").headers["X-Error-Code"] == "RevisionNotFound"
    expect(httpx.delete(f"{hub.url}/api/models/acme/target/branch/main", headers=auth), 403)
    expect(httpx.delete(f"{hub.url}/api/models/acme/target/tag/nope", headers=auth), 404, "RevisionNotFound")
    expect(httpx.post(f"{hub.url}/api/models/acme/target/tag/main", json={"tag": "../x"}, headers=auth), 400)
    expect(httpx.get(f"{hub.url}/api/models?limit=abc"), 400)

    # oversized bodies: declared, and chunked with no length
    big = b"x" * (MAX_BODY + 1024)
    expect(httpx.post(commit_url, content=big, headers=auth), 413)
    expect(httpx.post(commit_url, content=iter([big[: MAX_BODY // 2]] * 3), headers=auth), 413)
    status, _, body = _raw(
        hub,
        b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n",
    )
    assert status == 400

    # nothing of the above left a trace, and the server still serves
    assert _files(hub.root) == before
    assert not list((hub.root / "tmp").iterdir())
    assert api.list_repo_refs("acme/target").branches[0].target_commit == head


def test_malformed_requests_get_400_without_a_token_and_no_internal_error(hub):
    """`tunehub hub serve` as a process: malformed heads and bodies are 400s (these were 500s
    or 401s); the module fixture then checks the server log holds no internal error."""
    api = _api(hub)
    api.create_repo("acme/strict", exist_ok=True)
    start = b"HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    nested = b"[" * 100_000
    for request in (
        b"GET /api/models?limit=%C2%B2 " + start + b"\r\n",  # '²': isdigit() but not int()
        b"GET /api/models/acme/strict/tree/main?cursor=" + b"9" * 5000 + b" " + start + b"\r\n",
        b"POST /api/repos/create " + start + b"Authorization: Bearer\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /api/models/acme/strict/commit/main " + start + b"Content-Length: \xb2\r\n\r\n",
        b"GET /acme/strict/resolve/main/.gitattributes " + start + b"Range: bytes=\xb2-\r\n\r\n",
        b"POST /api/validate-yaml " + start + b"Content-Length: %d\r\n\r\n" % len(nested) + nested,
    ):
        status, _, body = _raw(hub, request)
        assert status == 400, (request[:60], body[:200])
        if b"Content-Length: \xb2" not in request:  # refused by uvicorn while framing it: its plain-text 400
            assert isinstance(json.loads(body)["error"], str)
    assert api.list_repo_refs("acme/strict").branches[0].name == "main"  # and the real client still works


# --- scoped tokens (YAML token file), private namespaces, the audit log ---------------------------
SCOPED_TOKENS = {"ci-acme": "hub-ci-acme-token", "ops": "hub-ops-token", "viewer": "hub-viewer-token"}


def _scoped_yaml() -> str:
    def sha(name: str) -> str:
        return hashlib.sha256(SCOPED_TOKENS[name].encode()).hexdigest()

    return textwrap.dedent(
        f"""\
        anonymous:
          "*": read
          secret: none
        tokens:
          - name: ci-acme
            sha256: {sha("ci-acme")}
            access: {{"acme/*": write, "*": read}}
          - name: ops
            sha256: {sha("ops")}
            access: {{"*": write}}
            admin: true
          - name: viewer
            sha256: {sha("viewer")}
            access: {{"*": read}}
        """
    )


@pytest.fixture(scope="module")
def scoped_hub(tmp_path_factory: pytest.TempPathFactory):
    with _running_hub(tmp_path_factory.mktemp("scoped-hub"), tokens=_scoped_yaml()) as server:
        yield server


def _scoped_api(hub: Hub, name: str | None):
    return _api(hub, token=SCOPED_TOKENS[name] if name else None)


def _audit_lines(hub: Hub) -> list[dict]:
    path = hub.root / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_scoped_tokens_with_the_real_client(scoped_hub, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    hub = scoped_hub
    ci, ops, viewer, anonymous = (_scoped_api(hub, n) for n in ("ci-acme", "ops", "viewer", None))
    assert ci.whoami()["name"] == "ci-acme"
    before = len(_audit_lines(hub))

    # its own namespace: create, upload (a regular file and an LFS one), tag
    ci.create_repo("acme/scoped")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(4096))
    first = ci.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="acme/scoped")
    second = ci.upload_file(path_or_fileobj=str(weights), path_in_repo="w.safetensors", repo_id="acme/scoped")
    ci.create_tag("acme/scoped", tag="v1")

    # another namespace: 403 for every write, nothing changes there
    ops.create_repo("other/shared")
    for write in (
        lambda: ci.create_repo("other/new"),
        lambda: ci.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="other/shared"),
        lambda: ci.create_tag("other/shared", tag="sneaky"),
        lambda: ci.delete_repo("acme/scoped"),  # its own namespace, but deleting needs admin
    ):
        with pytest.raises(HfHubHTTPError) as refused:
            write()
        assert refused.value.response.status_code == 403, refused.value
    assert {f.rfilename for f in viewer.model_info("other/shared").siblings} == {".gitattributes"}
    with pytest.raises(HfHubHTTPError) as refused:
        viewer.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="acme/scoped")
    assert refused.value.response.status_code == 403 and "'acme'" in str(refused.value)

    # a private namespace: anonymous clients cannot tell its repos from missing ones
    ops.create_repo("secret/plans")
    ops.upload_file(path_or_fileobj=b"top secret", path_in_repo="plan.txt", repo_id="secret/plans")
    for call in (
        lambda: anonymous.model_info("secret/plans"),
        lambda: anonymous.list_repo_refs("secret/plans"),
        lambda: anonymous.list_repo_files("secret/plans"),
    ):
        with pytest.raises(RepositoryNotFoundError):
            call()
    hidden = httpx.get(f"{hub.url}/api/models/secret/plans")
    missing = httpx.get(f"{hub.url}/api/models/secret/nothing")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.headers["X-Error-Code"] == missing.headers["X-Error-Code"] == "RepoNotFound"
    assert "secret/plans" not in {m.id for m in anonymous.list_models()}
    assert "secret/plans" in {m.id for m in viewer.list_models()}
    assert viewer.model_info("secret/plans").sha is not None
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("secret/plans", "plan.txt", endpoint=hub.url, token=SCOPED_TOKENS["viewer"], cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"top secret"

    # an admin deletes
    ops.delete_repo("other/shared")
    with pytest.raises(RepositoryNotFoundError):
        viewer.model_info("other/shared")

    lines = _audit_lines(hub)[before:]
    assert [(r["who"], r["action"], r["repo"]) for r in lines] == [
        ("ci-acme", "create_repo", "acme/scoped"),
        ("ci-acme", "commit", "acme/scoped"),
        ("ci-acme", "lfs_upload", "acme/scoped"),
        ("ci-acme", "commit", "acme/scoped"),
        ("ci-acme", "create_tag", "acme/scoped"),
        ("ops", "create_repo", "other/shared"),
        ("ops", "create_repo", "secret/plans"),
        ("ops", "commit", "secret/plans"),
        ("ops", "delete_repo", "other/shared"),
    ]
    assert lines[1]["commit"] == first.oid and lines[3]["commit"] == second.oid
    assert lines[2]["oid"] == hashlib.sha256(weights.read_bytes()).hexdigest()
