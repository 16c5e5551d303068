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
from tunehub.server.protocol import error_body, parse_request
from tunehub.server.tenants import Tenant, Tenants, hash_key, new_key, parse_tenants


def _tenants(**overrides):
    acme = {
        "keys": [hash_key("k-acme")],
        "models": ["acme/*", "base"],
        "requests_per_minute": 2,
        "tokens_per_minute": 100,
        "max_tokens": 64,
    }
    acme.update(overrides)
    return {"tenants": {"acme": acme, "beta": {"keys": [hash_key("k-beta")], "models": ["beta/sum"]}}}


def test_tenants_parse_authenticate_and_globs():
    tenants = Tenants(parse_tenants(_tenants()))
    acme = tenants.authenticate("k-acme")
    assert acme.name == "acme" and acme.max_tokens == 64
    assert tenants.authenticate("k-beta").name == "beta"
    assert tenants.authenticate("nope") is None and tenants.authenticate(None) is None
    assert acme.may_use_module("acme/sum", "base") and acme.may_use_base("base")
    assert not acme.may_use_module("beta/sum", "base") and not acme.may_use_module("acme", "base")
    assert not tenants.authenticate("k-beta").may_use_module("beta/summary", "base")
    assert not tenants.authenticate("k-beta").may_use_base("base")


def test_a_grant_of_the_base_name_grants_the_base_only():
    acme = Tenants(parse_tenants(_tenants())).authenticate("k-acme")  # models: acme/*, base
    assert acme.may_use_base("base")
    assert not acme.may_use_module("base", "base")  # a registry module named like the base
    assert acme.may_use_module("acme/base", "base")
    everything = Tenant("x", models=("*",))
    assert everything.may_use_module("base", "base") and everything.may_use_base("base")


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
    other.settle(other.admit(acme, 10, now=1.0), 70, now=2.0)  # prompts are not reserved: 70 used
    other.settle(other.admit(acme, 10, now=20.0), 40, now=21.0)
    with pytest.raises(RateLimited, match="over its limit of 100 tokens per minute") as info:
        other.admit(acme, 1, now=30.0)
    assert info.value.retry_after == 31  # once the 70 tokens of t=1 age out, 40 + 1 <= 100
    other.admit(acme, 1, now=61.5)


def test_token_limits_reserve_max_tokens_at_admission_and_refund_the_rest():
    tenants = Tenants(parse_tenants(_tenants(requests_per_minute=None)))  # 100 tokens a minute
    acme = tenants.authenticate("k-acme")
    with pytest.raises(RateLimited) as info:
        tenants.admit(acme, 500, now=0.0)  # could never fit: refused, not clamped
    assert str(info.value) == ("max_tokens 500 is more than tenant 'acme''s limit of 100 tokens per minute; ask for at most 100")
    assert info.value.retry_after is None  # waiting would not help
    first = tenants.admit(acme, 60, now=1.0)
    with pytest.raises(RateLimited, match="over its limit of 100 tokens per minute") as info:
        tenants.admit(acme, 50, now=2.0)  # 60 reserved + 50 > 100, though nothing finished yet
    assert info.value.retry_after == 59  # the reservation of t=1 leaves the window at 61
    tenants.settle(first, 12, now=3.0)  # it used 12: 48 come back
    second = tenants.admit(acme, 50, now=4.0)
    tenants.settle(first, 100, now=5.0)  # only the first settlement counts
    third = tenants.admit(acme, 38, now=6.0)  # 12 + 50 + 38 = 100
    with pytest.raises(RateLimited):
        tenants.admit(acme, 1, now=7.0)
    tenants.settle(second, 0, now=8.0)  # failed or cancelled before generating: all refunded
    tenants.settle(third, 38, now=9.0)
    tenants.admit(acme, 50, now=10.0)  # 12 + 38 + 50 = 100
    late = tenants.admit(acme, 0, now=11.0)
    tenants.settle(late, 5, now=200.0)  # long after: the window has moved on, nothing breaks
    tenants.admit(acme, 95, now=200.5)


def test_open_tenant_and_keys():
    tenants = Tenants.open()
    assert tenants.authenticate(None).may_use_module("anything/at-all", "base")
    key = new_key()
    assert key.startswith("th-") and len(key) > 40 and new_key() != key
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert Tenant("x").may_use_module("a/b") and Tenant("x").may_use_base("base")


def test_parse_completion_and_chat_requests():
    parsed = parse_request(
        {
            "model": "acme/sum@prod",
            "prompt": ["hello"],
            "max_tokens": 5,
            "temperature": 0,
            "stop": "\n",
            "seed": 3,
            "user": "ignored",
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        },
        chat=False,
    )
    assert (parsed.prompt, parsed.max_tokens, parsed.stop, parsed.stream, parsed.include_usage) == (
        "hello",
        5,
        ["\n"],
        True,
        True,
    )
    assert parsed.sampling(5) == {
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 3,
        "stop": ["\n"],
        "stop_token_ids": None,
        "ignore_eos": True,
    }
    assert parse_request({"model": "m", "prompt": [1, 2, 3]}, chat=False).input_ids == [1, 2, 3]
    chat = parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 7,
        },
        chat=True,
    )
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert chat.max_tokens == 7 and chat.temperature == 1.0


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": "x"}, "'model' is required"),
        ({"model": ["a"], "prompt": "x"}, "'model' must be a string"),
        ({"model": "m"}, "'prompt' is required"),
        ({"model": "m", "prompt": ["a", "b"]}, "one prompt per request"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"model": "m", "prompt": "x", "stop": ["a", 3]}, "stop"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ],
)
def test_bad_completion_requests(body, needle):
    with pytest.raises(InvalidRequest, match=needle):
        parse_request(body, chat=False)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seed", 2**70, "'seed' must be an integer from 0 to 2**64 - 1, got 1180591620717411303424"),
        ("seed", -1, "'seed' must be an integer from 0 to 2**64 - 1, got -1"),
        ("seed", 2**64, "'seed' must be an integer from 0 to 2**64 - 1, got 18446744073709551616"),
        ("seed", 1.5, "'seed' must be an integer from 0 to 2**64 - 1, got 1.5"),
        ("temperature", float("nan"), "'temperature' must be a number from 0 to 2, got nan"),
        ("temperature", float("inf"), "'temperature' must be a number from 0 to 2, got inf"),
        ("temperature", 10**400, "'temperature' must be a number from 0 to 2, got an integer of 1329 bits"),
        ("top_p", float("nan"), "'top_p' must be a number in (0, 1], got nan"),
        ("top_p", "high", "'top_p' must be a number in (0, 1], got 'high'"),
        ("max_tokens", 2**40, "'max_tokens' must be an integer from 1 to 2147483647, got 1099511627776"),
        ("max_tokens", 0, "'max_tokens' must be an integer from 1 to 2147483647, got 0"),
        ("stop", ["s"] * 17, "'stop' must be a string or a list of at most 16 non-empty strings of at most 256 characters"),
        ("stop", "s" * 257, "'stop' must be a string or a list of at most 16 non-empty strings of at most 256 characters"),
        ("stop_token_ids", [2**40], "'stop_token_ids' must be a list of token ids (integers >= 0)"),
        ("stop_token_ids", [-1], "'stop_token_ids' must be a list of token ids (integers >= 0)"),
        ("prompt", [-1, 2], "'prompt' must be a string or a non-empty list of token ids (integers >= 0)"),
        ("prompt", [2**70], "'prompt' must be a string or a non-empty list of token ids (integers >= 0)"),
        ("prompt", [], "'prompt' must be a string or a non-empty list of token ids (integers >= 0)"),
        ("prompt", "\ud800", "'prompt' is not valid Unicode text (it holds a lone surrogate escape)"),
        ("model", "x" * 2100, "'model' is longer than 2048 characters"),
        ("model", "acme/\udfff", "'model' is not valid Unicode text, got 'acme/\\udfff'"),
        ("stream", "yes", "'stream' must be true or false"),
    ],
)
def test_every_sampling_field_is_checked_for_type_and_range(field, value, message):
    body = {"model": "m", "prompt": "x", field: value}
    with pytest.raises(InvalidRequest) as info:
        parse_request(body, chat=False)
    assert str(info.value) == message
    assert info.value.param == field
    assert error_body(info.value, 400)["error"]["param"] == field


def test_bad_values_are_quoted_short_and_never_recursed_into():
    nested: list = []
    for _ in range(5000):  # deeper than repr() could go
        nested = [nested]
    with pytest.raises(InvalidRequest) as info:
        parse_request({"model": "m", "prompt": "x", "max_tokens": nested, "top_p": "y" * 100000}, chat=False)
    assert str(info.value) == (
        "'max_tokens' must be an integer from 1 to 2147483647, got a list of 1;"
        " 'top_p' must be a number in (0, 1], got 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy'... (100000 characters)"
    )
    with pytest.raises(InvalidRequest) as info:  # a list as a role used to be an unhashable-type 500
        parse_request(
            {"model": "m", "messages": [{"role": ["user"], "content": "x"}, {"role": "user", "content": "\udc80"}]}, chat=True
        )
    assert str(info.value) == (
        "messages[0].role must be one of ['assistant', 'system', 'user'], got a list of 1;"
        " messages[1].content is not valid Unicode text (it holds a lone surrogate escape)"
    )
    parsed = parse_request(
        {"model": "m", "prompt": [0, 2**31 - 1], "seed": 2**64 - 1, "temperature": 2, "top_p": 1e-9, "stop": ["s" * 256] * 16},
        chat=False,
    )
    assert parsed.input_ids == [0, 2**31 - 1] and parsed.seed == 2**64 - 1 and len(parsed.stop) == 16


def test_error_bodies_have_the_openai_shape():
    body = error_body(RateLimited("slow down", retry_after=3), 429)
    assert body == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limited",
            "tunehub_error": "RateLimited",
        }
    }
    assert error_body(ServerError("boom"), 503)["error"]["type"] == "server_error"


def test_shutdown_clock_is_shared_with_forked_processes():
    import os

    from tunehub.server.spec import ShutdownClock

    clock = ShutdownClock()
    assert not clock.started and not clock.expired()
    pid = os.fork()
    if pid == 0:  # the child stands for LitServe's main process, which receives SIGTERM
        clock.start(0.0)
        os._exit(0)
    os.waitpid(pid, 0)
    assert clock.started and clock.expired()
    clock.start(3600.0)
    assert clock.started and not clock.expired()


def test_bad_chat_requests_list_every_problem():
    with pytest.raises(InvalidRequest) as info:
        parse_request(
            {
                "model": "m",
                "messages": [{"role": "tool", "content": "x"}, {"role": "user"}],
                "tools": [{"type": "function"}],
                "n": 2,
                "temperature": 3,
            },
            chat=True,
        )
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


def test_the_drain_period_comes_from_the_environment_and_is_checked(tmp_path, monkeypatch):
    from tunehub.server.serve import DRAIN_S, ServeConfig, check_config, grace_s

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.delenv("TUNEHUB_SERVE_DRAIN_S", raising=False)
    assert ServeConfig(base=str(tmp_path)).drain_s == DRAIN_S and grace_s(DRAIN_S) == 8.0
    monkeypatch.setenv("TUNEHUB_SERVE_DRAIN_S", "0")
    assert check_config(ServeConfig(base=str(tmp_path))).config.drain_s == 0.0
    for bad in ("soon", "-1", "61"):
        monkeypatch.setenv("TUNEHUB_SERVE_DRAIN_S", bad)
        with pytest.raises(ConfigError) as info:
            check_config(ServeConfig(base=str(tmp_path)))
        assert str(info.value) == "TUNEHUB_SERVE_DRAIN_S must be a number of seconds from 0 to 60"


def test_an_unexpected_failure_is_one_log_line_with_the_request_id(caplog):
    import logging

    from tunehub.server.metrics import CallRecord
    from tunehub.server.spec import TunehubSpec

    call = CallRecord(endpoint="completions", request_id="abc123")
    with caplog.at_level(logging.INFO, logger="tunehub.server"):
        try:
            raise RecursionError("maximum recursion depth exceeded")
        except RecursionError as exc:
            error = TunehubSpec._unexpected(call, exc)
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records] == [
        ("ERROR", "request abc123 (completions): unexpected RecursionError: maximum recursion depth exceeded", None)
    ]
    assert isinstance(error, ServerError) and str(error) == "internal error (RecursionError); request id abc123"


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


def _error(exc) -> httpx.Response:
    """The server's own error answer (status, headers, body) for ``exc``, as httpx sees it."""
    from tunehub.server.spec import error_response

    answer = error_response(exc, request_id="r1")
    return httpx.Response(answer.status_code, headers=dict(answer.headers), content=answer.body)


def _fake_server(request: httpx.Request) -> httpx.Response:
    from tunehub.server.protocol import error_body
    from tunehub.server.spec import sse_event

    body = json.loads(request.content or b"{}")
    auth = request.headers.get("authorization")
    if auth != "Bearer good":
        return _error(Unauthorized("unknown API key"))
    model = body.get("model")
    if model == "limited":
        return _error(RateLimited("slow down", retry_after=7))
    if model == "bad ref":
        return _error(InvalidReference("bad"))
    if model == "big":
        return _error(PayloadTooLarge("too big"))
    if model == "missing":
        return _error(ModuleNotFound("model 'missing' does not exist"))
    if model == "boom":
        return httpx.Response(500, text="Internal Server Error")  # a proxy's answer, not the server's
    if model == "admin-only":
        return _error(Forbidden("no"))
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
            chunks = chunks[:1] + [error_body(ServerError("engine fault"), 500)]
        text = "".join(sse_event(c) for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, headers={**headers, "content-type": "text/event-stream"}, text=text)
    return httpx.Response(
        200,
        headers=headers,
        json={
            "model": "acme/sum@3",
            "choices": [{"index": 0, "text": "hello", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
            "tunehub": extra,
        },
    )


def test_sdk_client_parses_answers_and_streams():
    from tunehub.sdk import Client

    client = Client("http://fake", "good", transport=httpx.MockTransport(_fake_server))
    out = client.complete("acme/sum@prod", "hi", max_tokens=3)
    assert (out.text, out.model, out.module, out.completion_tokens, out.finish_reason) == (
        "hello",
        "acme/sum@3",
        "acme/sum@3",
        1,
        "stop",
    )
    with client.stream_complete("acme/sum@prod", "hi") as stream:
        assert stream.module == "acme/sum@3" and stream.base_fingerprint == "f" * 12
        assert [c.text for c in stream] == ["hel", "lo", ""]
    assert stream.completion.text == "hello" and stream.completion.completion_tokens == 2
    with pytest.raises(ServerError, match="engine fault"):
        list(client.stream_complete("dies", "hi"))


@pytest.mark.parametrize(
    "model, error",
    [
        ("limited", RateLimited),
        ("bad ref", InvalidReference),
        ("big", PayloadTooLarge),
        ("missing", ModuleNotFound),
        ("boom", ServerError),
        ("admin-only", Forbidden),
    ],
)
def test_sdk_maps_http_errors_to_typed_errors(model, error):
    from tunehub.sdk import Client

    client = Client("http://fake", "good", transport=httpx.MockTransport(_fake_server))
    with pytest.raises(error) as info:
        client.complete(model, "x")
    assert info.value.status_code >= 400
    if error is RateLimited:
        assert info.value.retry_after == 7
    if model != "boom":  # the typed error carries the server's own message
        assert str(info.value) in {"slow down", "bad", "too big", "model 'missing' does not exist", "no"}
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


@pytest.mark.parametrize("header", ["²", "١٢", "1.5", "-3", ""])
def test_sdk_reads_only_ascii_seconds_from_retry_after(header):
    from tunehub.errors import RateLimited
    from tunehub.sdk.client import error_from_response

    body = json.dumps({"error": {"message": "slow down", "type": "rate_limited"}})
    exc = error_from_response(429, body, httpx.Headers([(b"Retry-After", header.encode())]))
    assert isinstance(exc, RateLimited) and exc.retry_after is None


def test_sdk_reads_retry_after_seconds():
    from tunehub.sdk.client import error_from_response

    body = json.dumps({"error": {"message": "slow down", "type": "rate_limited"}})
    assert error_from_response(429, body, httpx.Headers({"Retry-After": "12"})).retry_after == 12


def test_the_http_layer_limits_compositions_as_the_engine_does():
    # the HTTP process checks compositions without loading torch; its limits must be the engine's
    from tunehub.server import protocol
    from tunehub.server.engine import compose

    assert (protocol.MAX_MODULES, protocol.MAX_MODULE_WEIGHT) == (compose.MAX_PARTS, compose.MAX_WEIGHT)
    parsed = protocol.parse_request(
        {"modules": [{"model": "acme/a", "weight": 0.7}, {"model": "acme/b@2"}], "prompt": "x"}, chat=False
    )
    assert parsed.model == "acme/a+acme/b@2" and parsed.weights == [0.7, 1.0]
