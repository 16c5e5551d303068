"""The parts of `tunehub serve` that need no server: tenants and limits, request validation,
configuration checks, and the SDK client against a fake transport."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from tunehub.errors import (
    ConfigError,
    Forbidden,
    InvalidReference,
    InvalidRequest,
    ModuleNotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
)
from tunehub.server.protocol import parse_request
from tunehub.server.tenants import Tenant, Tenants, hash_key, new_key, parse_tenants


def _tenants(**overrides):
    acme = {"keys": [hash_key("k-acme")], "models": ["acme/*", "base"], "requests_per_minute": 2,
            "tokens_per_minute": 100, "max_tokens": 64}
    acme.update(overrides)
    return {"tenants": {"acme": acme, "beta": {"keys": [hash_key("k-beta")], "models": ["beta/sum"]}}}


def test_tenants_parse_authenticate_and_globs():
    tenants = Tenants(parse_tenants(_tenants()))
    acme = tenants.authenticate("k-acme")
    assert acme.name == "acme" and acme.max_tokens == 64
    assert tenants.authenticate("k-beta").name == "beta"
    assert tenants.authenticate("nope") is None and tenants.authenticate(None) is None
    assert acme.may_use("acme/sum") and acme.may_use("base") and not acme.may_use("beta/sum")
    assert not acme.may_use("acme") and not tenants.authenticate("k-beta").may_use("beta/summary")


def test_tenants_file_problems_are_reported_together():
    bad = _tenants(keys=["plain-text-key"], requests_per_minute=0, colour="red")
    bad["tenants"]["beta"]["models"] = ["beta/sum@3"]
    with pytest.raises(ConfigError) as info:
        parse_tenants(bad)
    text = str(info.value)
    assert "not a key hash" in text and "requests_per_minute" in text and "colour" in text and "@version" in text
    assert len(info.value.problems) == 4
    duplicate = _tenants()
    duplicate["tenants"]["beta"]["keys"] = [hash_key("k-acme")]
    with pytest.raises(ConfigError, match="also listed"):
        parse_tenants(duplicate)
    with pytest.raises(ConfigError, match="tenants"):
        parse_tenants({"users": {}})


def test_rate_limits_slide_and_say_when_to_retry():
    tenants = Tenants(parse_tenants(_tenants()))
    acme = tenants.authenticate("k-acme")
    tenants.admit(acme, now=100.0)
    tenants.admit(acme, now=110.0)
    with pytest.raises(RateLimited) as info:
        tenants.admit(acme, now=130.0)
    assert info.value.retry_after == 30  # the first request leaves the window at 160
    tenants.admit(acme, now=160.5)  # ...and then there is room again
    other = Tenants(parse_tenants(_tenants(requests_per_minute=None)))
    acme = other.authenticate("k-acme")
    other.admit(acme, now=0.0)
    other.charge_tokens(acme, 70, now=1.0)
    other.charge_tokens(acme, 40, now=20.0)
    with pytest.raises(RateLimited, match="tokens per minute") as info:
        other.admit(acme, now=30.0)
    assert info.value.retry_after == 31  # once the 70 tokens of t=1 age out, 40 < 100
    other.admit(acme, now=61.5)


def test_open_tenant_and_keys():
    tenants = Tenants.open()
    assert tenants.authenticate(None).may_use("anything/at-all")
    key = new_key()
    assert key.startswith("th-") and len(key) > 40 and new_key() != key
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert Tenant("x").may_use("a/b")


def test_parse_completion_and_chat_requests():
    parsed = parse_request({"model": "acme/sum@prod", "prompt": ["hello"], "max_tokens": 5, "temperature": 0,
                            "stop": "\n", "seed": 3, "user": "ignored", "stream": True,
                            "stream_options": {"include_usage": True}, "ignore_eos": True}, chat=False)
    assert (parsed.prompt, parsed.max_tokens, parsed.stop, parsed.stream, parsed.include_usage) == (
        "hello", 5, ["\n"], True, True)
    assert parsed.sampling(5) == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 3, "stop": ["\n"],
                                  "stop_token_ids": None, "ignore_eos": True}
    assert parse_request({"model": "m", "prompt": [1, 2, 3]}, chat=False).input_ids == [1, 2, 3]
    chat = parse_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
    ], "max_completion_tokens": 7}, chat=True)
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert chat.max_tokens == 7 and chat.temperature == 1.0


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "x"}, "'model' is required"),
    ({"model": ["a"], "prompt": "x"}, "'model' must be a string"),
    ({"model": "m"}, "'prompt' is required"),
    ({"model": "m", "prompt": ["a", "b"]}, "one prompt per request"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"model": "m", "prompt": "x", "stop": ["a", 3]}, "stop"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
])
def test_bad_completion_requests(body, needle):
    with pytest.raises(InvalidRequest, match=needle):
        parse_request(body, chat=False)


def test_bad_chat_requests_list_every_problem():
    with pytest.raises(InvalidRequest) as info:
        parse_request({"model": "m", "messages": [{"role": "tool", "content": "x"}, {"role": "user"}],
                       "tools": [{"type": "function"}], "n": 2, "temperature": 3}, chat=True)
    text = str(info.value)
    for needle in ("messages[0].role", "messages[1].content", "'tools'", "'n' must be 1", "temperature"):
        assert needle in text


def test_serve_config_checks(tmp_path):
    from tunehub.server.serve import ServeConfig, check_config, read_admin_key

    with pytest.raises(ConfigError) as info:
        check_config(ServeConfig(base=str(tmp_path), host="0.0.0.0", port=80, quantization="fp8"))
    text = str(info.value)
    assert "without --tenants" in text and "--port" in text and "--quantization" in text
    with pytest.raises(ConfigError, match="LitServe binds only these"):
        check_config(ServeConfig(base=str(tmp_path), host="10.1.2.3"))
    with pytest.raises(ConfigError, match="not a model folder"):
        check_config(ServeConfig(base=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump(_tenants()))
    resolved = check_config(ServeConfig(base=str(tmp_path), host="0.0.0.0", tenants=str(tenants)))
    assert resolved.config.host == "0.0.0.0" and resolved.admin_key_hash is None
    key = tmp_path / "admin.key"
    key.write_text("short\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_admin_key(key)
    key.write_text(hash_key("a-long-enough-admin-key") + "\n")
    assert read_admin_key(key) == hash_key("a-long-enough-admin-key")[7:]
    key.write_text("a-long-enough-admin-key\n")
    assert read_admin_key(key) == hash_key("a-long-enough-admin-key")[7:]


def test_cli_hash_key():
    from typer.testing import CliRunner

    from tunehub.sdk.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["tenants", "hash-key", "abc"]).output.strip() == hash_key("abc")
    assert runner.invoke(app, ["tenants", "hash-key", "-"], input="abc\n").output.strip() == hash_key("abc")
    made = runner.invoke(app, ["tenants", "hash-key"]).output.splitlines()
    key = made[0].split()[-1]
    assert made[1].split()[-1] == hash_key(key)


# --- SDK against a fake server -------------------------------------------------------------------


def _fake_server(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content or b"{}")
    auth = request.headers.get("authorization")
    if auth != "Bearer good":
        return httpx.Response(401, json={"error": {"message": "unknown API key", "tunehub_error": "Unauthorized"}})
    model = body.get("model")
    if model == "limited":
        return httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"message": "slow down"}})
    if model == "bad ref":
        return httpx.Response(400, json={"error": {"message": "bad", "tunehub_error": "InvalidReference"}})
    if model == "big":
        return httpx.Response(413, json={"error": {"message": "too big"}})
    if model == "missing":
        return httpx.Response(404, json={"error": {"message": "model 'missing' does not exist"}})
    if model == "boom":
        return httpx.Response(500, text="Internal Server Error")
    if model == "admin-only":
        return httpx.Response(403, json={"error": {"message": "no", "tunehub_error": "Forbidden"}})
    extra = {"module": "acme/sum@3", "base": "tiny", "base_fingerprint": "f" * 64, "request_id": "r1"}
    headers = {"X-Tunehub-Module": "acme/sum@3", "X-Tunehub-Base": "f" * 12, "X-Request-Id": "r1"}
    if body.get("stream"):
        chunks = [
            {"model": "acme/sum@3", "choices": [{"index": 0, "text": "hel", "finish_reason": None}]},
            {"model": "acme/sum@3", "choices": [{"index": 0, "text": "lo", "finish_reason": None}]},
            {"model": "acme/sum@3", "choices": [{"index": 0, "text": "", "finish_reason": "length"}], "tunehub": extra},
            {"model": "acme/sum@3", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
        ]
        if model == "dies":
            chunks = chunks[:1] + [{"error": {"message": "engine fault", "tunehub_error": "ServerError"}}]
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ("data: [DONE]\n\n" if model != "dies" else "")
        return httpx.Response(200, headers={**headers, "content-type": "text/event-stream"}, text=text)
    return httpx.Response(200, headers=headers, json={
        "model": "acme/sum@3", "choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}, "tunehub": extra,
    })


def test_sdk_client_parses_answers_and_streams():
    from tunehub.sdk import Client

    client = Client("http://fake", "good", transport=httpx.MockTransport(_fake_server))
    out = client.complete("acme/sum@prod", "hi", max_tokens=3)
    assert (out.text, out.model, out.module, out.completion_tokens, out.finish_reason) == (
        "hello", "acme/sum@3", "acme/sum@3", 1, "stop")
    with client.stream_complete("acme/sum@prod", "hi") as stream:
        assert stream.module == "acme/sum@3" and stream.base_fingerprint == "f" * 12
        assert [c.text for c in stream] == ["hel", "lo", ""]
    assert stream.completion.text == "hello" and stream.completion.completion_tokens == 2
    with pytest.raises(ServerError, match="engine fault"):
        list(client.stream_complete("dies", "hi"))


@pytest.mark.parametrize("model, error", [
    ("limited", RateLimited), ("bad ref", InvalidReference), ("big", PayloadTooLarge), ("missing", ModuleNotFound),
    ("boom", ServerError), ("admin-only", Forbidden),
])
def test_sdk_maps_http_errors_to_typed_errors(model, error):
    from tunehub.sdk import Client

    client = Client("http://fake", "good", transport=httpx.MockTransport(_fake_server))
    with pytest.raises(error) as info:
        client.complete(model, "x")
    assert info.value.status_code >= 400
    if error is RateLimited:
        assert info.value.retry_after == 7
    with pytest.raises(Unauthorized):
        Client("http://fake", "bad", transport=httpx.MockTransport(_fake_server)).complete("m", "x")


def test_async_client_and_unreachable_server():
    import asyncio

    from tunehub.sdk import AsyncClient, Client

    async def go():
        async with AsyncClient("http://fake", "good", transport=httpx.MockTransport(_fake_server)) as client:
            out = await client.chat("acme/sum", "hi")
            stream = await client.stream_chat("acme/sum", [{"role": "user", "content": "hi"}])
            texts = [c.text async for c in stream]
            with pytest.raises(RateLimited):
                await client.complete("limited", "x")
            return out, texts, stream.completion

    out, texts, completion = asyncio.run(go())
    assert out.model == "acme/sum@3" and texts == ["hel", "lo", ""] and completion.text == "hello"
    with pytest.raises(ServerError, match="cannot reach"):
        Client("http://127.0.0.1:9", timeout=2).complete("m", "x")
    with pytest.raises(Forbidden, match="admin_key"):
        Client("http://fake", "good", transport=httpx.MockTransport(_fake_server)).pool()
