"""Modules load off the decode loop: a request whose module is not in the pool waits for it on its
own while the running batch keeps decoding; requests waiting for one module share its load; a
load that fails or a request cancelled meanwhile ends only that request."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tunehub.errors import ConfigError, IntegrityError, RequestCancelled
from tunehub.registry.local import LocalStore
from tunehub.server.engine import Engine, GenerationRequest, SamplingParams, load_base
from tunehub.trainer.testing import make_peft_module


class GatedStore:
    """A store whose reads of ``gated`` modules wait for ``gate`` (a slow disk, a Hub pull)."""

    def __init__(self, store: LocalStore, gated: set[str], fail: set[str] | None = None):
        self.store = store
        self.gated = gated
        self.fail = fail or set()
        self.gate = threading.Event()
        self.reads: list[str] = []
        self.reading = threading.Event()

    def resolve(self, ref: Any) -> Any:
        return self.store.resolve(ref)

    def read(self, ref: Any, files: Any = None, **kwargs: Any) -> Any:
        repo = str(ref).split("@")[0]
        self.reads.append(repo)
        if repo in self.gated:
            self.reading.set()
            assert self.gate.wait(30), "the test never opened the gate"
        if repo in self.fail:
            raise IntegrityError(f"{ref}: its blob is damaged")
        return self.store.read(ref, files, **kwargs)


@pytest.fixture(scope="module")
def store(tiny_llama_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    store = LocalStore(root / "reg", cache_dir=root / "cache")
    for seed, name in enumerate(("warm", "cold", "broken"), start=1):
        store.push(make_peft_module(tiny_llama_path, root / name, "lora", seed=seed), f"t/{name}")
    return store


@pytest.fixture(scope="module")
def base(tiny_llama_path):
    return load_base(tiny_llama_path)


def _request(module: str | None, tokens: int) -> GenerationRequest:
    return GenerationRequest(input_ids=[5, 6, 7, 8], module=module, params=SamplingParams(max_tokens=tokens, stop_token_ids=[]))


def test_a_cold_load_does_not_stall_the_running_batch(base, store):
    gated = GatedStore(store, {"t/cold"})
    engine = Engine(base, gated)
    try:
        engine.pool.release(engine.pool.acquire("t/warm"))  # in the pool before the test
        running = engine.submit(_request("t/warm", 40))
        first = next(iter(running))  # decoding
        assert first.token_id >= 0
        waiting = engine.submit(_request("t/cold", 3))
        assert gated.reading.wait(10)
        # the cold module's read is blocked, yet the running request decodes to its end
        result = running.result(timeout=20)  # the gate stays shut 30 s: a loop waiting for it would miss this
        assert result.completion_tokens == 40 and result.module == "t/warm@1"
        assert engine.waiting["loading"] == 1 and not waiting._done.is_set()
        # a request for a module in the pool still gets in while the other waits
        assert engine.submit(_request(None, 2)).result(timeout=30).completion_tokens == 2
        gated.gate.set()
        assert waiting.result(timeout=30).module == "t/cold@1"
        assert engine.waiting == {"queued": 0, "loading": 0, "ready": 0}
    finally:
        gated.gate.set()
        engine.close()


def test_requests_waiting_for_one_module_share_its_load(base, store):
    gated = GatedStore(store, {"t/cold"})
    engine = Engine(base, gated, loader_threads=3)
    try:
        handles = [engine.submit(_request("t/cold", 2)) for _ in range(4)]
        assert gated.reading.wait(10)
        time.sleep(0.2)  # every request has reached the pool by now
        gated.gate.set()
        assert [h.result(timeout=30).module for h in handles] == ["t/cold@1"] * 4
        assert gated.reads.count("t/cold") == 1 and engine.pool.stats.misses == 1
    finally:
        gated.gate.set()
        engine.close()


def test_a_failed_load_and_a_request_cancelled_while_loading_end_only_themselves(base, store):
    gated = GatedStore(store, {"t/cold"}, fail={"t/broken"})
    engine = Engine(base, gated)
    try:
        engine.pool.release(engine.pool.acquire("t/warm"))
        broken = engine.submit(_request("t/broken", 2))
        cancelled = engine.submit(_request("t/cold", 2))
        fine = engine.submit(_request("t/warm", 5))
        assert gated.reading.wait(10)
        cancelled.cancel()
        gated.gate.set()
        with pytest.raises(IntegrityError, match="damaged"):
            broken.result(timeout=30)
        with pytest.raises(RequestCancelled):
            cancelled.result(timeout=30)
        assert fine.result(timeout=30).completion_tokens == 5
        deadline = time.monotonic() + 10
        while engine.waiting != {"queued": 0, "loading": 0, "ready": 0} and time.monotonic() < deadline:
            time.sleep(0.01)
        # the cancelled request's module was loaded, then released: nothing holds it
        assert all(m["in_use"] == 0 for m in engine.pool.status()["modules"])
    finally:
        gated.gate.set()
        engine.close()


def test_an_engine_needs_a_loader_thread(base, store):
    with pytest.raises(ConfigError, match="loader_threads"):
        Engine(base, store, loader_threads=0)


@pytest.mark.parametrize("join_wait_s", [0.0, 30.0])
def test_rows_ready_one_by_one_join_a_running_batch_together_within_join_wait(base, store, join_wait_s):
    """A prefill reads every weight once however many rows it has, and the running rows wait for
    it: rows that become ready one after another wait (join_wait_s at most) to join together."""
    engine = Engine(base, store, max_batch=8, join_wait_s=join_wait_s)  # rows join 2 at a time
    joined: list[int] = []
    prefill = engine._prefill_and_join

    def counted(rows):
        joined.append(len(rows))
        return prefill(rows)

    engine._prefill_and_join = counted
    try:
        running = engine.submit(_request(None, 500))  # runs all along (the context holds 512)
        next(iter(running))
        late = [engine.submit(_request(None, 3))]
        time.sleep(0.3)  # the first late row is ready long before the second arrives
        late.append(engine.submit(_request(None, 3)))
        assert [h.result(timeout=60).completion_tokens for h in late] == [3, 3]
        assert joined == ([1, 1, 1] if join_wait_s == 0 else [1, 2])
        assert not running._done.is_set()  # they joined a running batch
        running.cancel()
    finally:
        engine.close()


def test_a_lone_ready_row_joins_once_join_wait_is_over(base, store):
    engine = Engine(base, store, join_wait_s=0.2)
    try:
        running = engine.submit(_request(None, 500))
        next(iter(running))
        started = time.monotonic()
        assert engine.submit(_request(None, 2)).result(timeout=30).completion_tokens == 2
        assert time.monotonic() - started >= 0.2  # it waited for company, then joined alone
        running.cancel()
    finally:
        engine.close()


@pytest.mark.parametrize("join_steps", [0, 32])
def test_ready_rows_wait_for_a_row_about_to_end_to_join_with_its_successor(base, store, join_steps):
    """A row that ends within join_steps frees its slot soon: rows ready meanwhile wait for it, and
    join in one prefill with the next request its client sends (which arrives as it ends)."""
    # gather_s: an idle engine waits that long for more requests (here: the successor) to start with
    engine = Engine(base, store, max_batch=8, gather_s=0.5, join_wait_s=0.0, join_steps=join_steps)
    joined: list[tuple[int, int]] = []  # (rows joining, rows running) per prefill
    prefill = engine._prefill_and_join

    def counted(rows):
        joined.append((len(rows), len(engine._rows)))
        return prefill(rows)

    engine._prefill_and_join = counted
    try:
        ending = engine.submit(_request(None, 24))
        next(iter(ending))
        waiting = engine.submit(_request(None, 2))  # ready at once: the base needs no load
        assert ending.result(timeout=60).completion_tokens == 24
        successor = engine.submit(_request(None, 2))  # the ended row's client sends its next request
        assert waiting.result(timeout=60).completion_tokens == 2 and successor.result(timeout=60).completion_tokens == 2
        if join_steps:  # it waited for the row's end, then started with the successor
            assert joined == [(1, 0), (2, 0)]
        else:  # it joined the running row at once; the successor came later, alone
            assert joined[:2] == [(1, 0), (1, 1)] and len(joined) == 3
    finally:
        engine.close()


def test_a_ready_row_waits_for_a_slow_load_join_steps_at_most(base, store):
    """While a module loads, ready rows wait for it to join with them, but no longer than
    join_steps decode steps: a load that takes long delays only its own request."""
    gated = GatedStore(store, {"t/cold"})
    engine = Engine(base, gated, join_wait_s=0.0, join_steps=6)
    try:
        running = engine.submit(_request(None, 400))
        next(iter(running))
        engine.submit(_request("t/cold", 2))
        assert gated.reading.wait(10)
        before = engine.steps
        ready = engine.submit(_request(None, 2))
        assert ready.result(timeout=20).completion_tokens == 2  # the gate stays shut
        # it waited for the load (6 steps at most), then joined and decoded its 2 tokens (1 step more)
        assert 6 <= engine.steps - before <= 6 + 4
        running.cancel()
    finally:
        gated.gate.set()
        engine.close()
