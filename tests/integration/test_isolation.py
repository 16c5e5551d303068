"""One tenant's bad requests fail only themselves, through the real `tunehub serve`: tenant
acme sends a corpus of bad requests (token ids outside the vocabulary, a seed past 64 bits,
modules with NaN weights or impossible shapes or no safetensors file) while tenant other sends
good ones at the same time. Every bad request gets its own 4xx with an OpenAI-shaped body; every
good one answers exactly what it answers alone. One server start (test_serve's fixtures)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.test_serve import KEYS, server, world  # noqa: F401 - fixtures, used by name
from tests.unit.test_engine_isolation import BAD_MODULES, push_unchecked, rewrite_weights

pytestmark = pytest.mark.integration

#: which bad modules to push as acme/<name>, and the HTTP status each must get
MODULE_CASES = {"nan-weights": 422, "not-safetensors": 422, "wrong-width": 422, "vector-a": 422}


@pytest.fixture(scope="module")
def bad_modules(world):  # noqa: F811 - test_serve's fixture
    """The bad modules in the server's registry, pushed as a store without weight checks took them."""
    root = world["root"]
    source = root / "modules" / "acme-sum-1"  # a LoRA of the tiny base (test_serve's world)
    for name in MODULE_CASES:
        change = BAD_MODULES[name][0]
        push_unchecked(world["store"], rewrite_weights(source, root / "bad" / name, change), f"acme/{name}")
    return MODULE_CASES


def _bad_corpus() -> list[tuple[dict | bytes, int, str]]:
    """(body, status, a piece of the message)."""
    cases: list[tuple[dict | bytes, int, str]] = [
        (
            {"model": "acme/qa", "prompt": [1, 999999], "max_tokens": 4},
            400,
            "input_ids must be token ids from 0 to 511, got 999999",
        ),
        ({"model": "acme/sum@1", "prompt": [3, 70000, 5], "max_tokens": 4}, 400, "got 70000"),
        ({"model": "acme/qa", "prompt": "x", "temperature": 0.7, "seed": 2**70}, 400, "must be an integer from 0 to 2**64 - 1"),
        (
            {"model": "acme/qa", "prompt": "x", "stop_token_ids": [4, 100000]},
            400,
            "stop_token_ids must be token ids from 0 to 511, got 100000",
        ),
        (b'{"model": "acme/qa", "prompt": "x", "temperature": NaN}', 400, "'temperature' must be a number from 0 to 2"),
    ]
    for name, status in MODULE_CASES.items():
        message = {
            "nan-weights": "holds NaN or Inf values",
            "not-safetensors": "is not a readable safetensors file",
            "wrong-width": "has shapes (4, 7)/",
            "vector-a": "expected 2 dimensions",
        }[name]
        cases.append(
            (
                {"model": f"acme/{name}", "prompt": "the river", "max_tokens": 6, "temperature": 0.9, "seed": 1},
                status,
                f"acme/{name}@1: ",
            )
        )
        cases.append(({"model": f"acme/{name}", "prompt": "we", "max_tokens": 6}, status, message))
    return cases


def _good_requests() -> list[dict]:
    prompts = ["the river runs", "she reads a book", "seven apples", "a small red house near the", "we", "they walked"]
    good = []
    for i in range(12):
        body = {
            "model": "other/secret" if i % 3 else "other/secret@1",
            "prompt": prompts[i % len(prompts)],
            "max_tokens": 10 + i % 4,
            "ignore_eos": True,
            "temperature": 0,
        }
        if i % 4 == 0:
            body.update(temperature=0.8, top_p=0.9, seed=40 + i)
        good.append(body)
    return good


def _post(url: str, key: str, body: dict | bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[key]}"}
    if isinstance(body, bytes):
        return httpx.post(
            url + "/v1/completions", content=body, headers={**headers, "Content-Type": "application/json"}, timeout=120
        )
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)


def test_one_tenants_bad_requests_fail_alone(server, bad_modules):  # noqa: F811
    good = _good_requests()
    alone = []
    for body in good:
        response = _post(server.url, "other", body)
        assert response.status_code == 200, response.text
        alone.append(response.json()["choices"][0]["text"])
    bad = _bad_corpus() * 2  # twice: the second round finds the modules refused again, not cached
    jobs = []
    for i in range(max(len(good), len(bad))):  # interleaved, sent by 8 threads at once
        if i < len(good):
            jobs.append(("other", good[i], ("good", i)))
        if i < len(bad):
            jobs.append(("acme", bad[i][0], ("bad", i)))
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: _post(server.url, job[0], job[1]), jobs))
    failed_good = [
        (job[1], r.status_code, r.text) for job, r in zip(jobs, responses) if job[0] == "other" and r.status_code != 200
    ]
    assert failed_good == []
    for (_tenant, body, (kind, i)), response in zip(jobs, responses):
        if kind == "good":
            assert response.json()["choices"][0]["text"] == alone[i], body
            continue
        _, status, needle = bad[i]
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert {"message", "type", "code"} <= set(error) and error["type"] == "invalid_request_error", error
        assert needle in error["message"], (body, error)
    # the worker logged the refusals without tracebacks, and is still serving
    assert _post(server.url, "other", good[1]).json()["choices"][0]["text"] == alone[1]
    log = server.err_path.read_text()
    assert "Traceback" not in log, log[-4000:]


def test_a_tiny_temperature_or_top_p_answers_greedily(server):  # noqa: F811
    base = {"model": "acme/sum@1", "prompt": "the river runs", "max_tokens": 8, "ignore_eos": True}
    greedy = _post(server.url, "acme", {**base, "temperature": 0}).json()["choices"][0]["text"]
    for extra in ({"temperature": 1e-300, "seed": 3}, {"temperature": 0.8, "top_p": 1e-300, "seed": 3}):
        response = _post(server.url, "acme", {**base, **extra})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == greedy, json.dumps(extra)
