"""The module pool through its production path: a LocalStore's ``read`` (one read, hashed while
read), the pool's ``check`` on the manifest before any weight is read, and ``parse`` building the
module from the verified bytes (the engine's safetensors parser). Only what the engine's
materialiser adds (the base's layers) is left out: modules here are their parsed tensors."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

from tests.helpers import FAKE_FINGERPRINT, make_fake_module
from tunehub.errors import IncompatibleBase, ModuleNotFound
from tunehub.registry.local import LocalStore
from tunehub.server.engine.modules import LayerDelta, LoadedModule, parse_weights
from tunehub.server.engine.pool import ModulePool

MODULE_BYTES = 65_536


class Materializer:
    """The pool's ``materialize``: the module's tensors, parsed from the bytes the store read."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, content, key: str) -> LoadedModule:
        with self._lock:
            self.calls.append(key)
        tensors = parse_weights(content.files, key)
        (payload,) = tensors.values()
        return LoadedModule(
            key=key,
            kind=content.manifest.kind,
            manifest=content.manifest,
            layers={"payload": LayerDelta(lora_a=payload)},
            nbytes=payload.numel() * payload.element_size(),
        )


def refuse_other_bases(manifest, key: str) -> None:
    if manifest.base.fingerprint != FAKE_FINGERPRINT:
        raise IncompatibleBase(f"{key} is for another base")


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")


def push(store: LocalStore, tmp_path: Path, name: str, size: int = MODULE_BYTES, **options) -> str:
    folder = make_fake_module(tmp_path / "src" / f"{name}-{os.urandom(4).hex()}", payload=os.urandom(size), **options)
    return store.push(folder, name).ref


def pool_for(store: LocalStore, **options) -> tuple[ModulePool, Materializer]:
    materialize = Materializer()
    return ModulePool(store, materialize, check=refuse_other_bases, **options), materialize


def test_lru_eviction_under_budget(store, tmp_path):
    for name in "abcde":
        push(store, tmp_path, f"t/{name}")
    pool, materialize = pool_for(store, budget_bytes=3 * MODULE_BYTES)
    for name in "abcd":
        pool.release(pool.acquire(f"t/{name}@1"))
    assert [e["module"] for e in pool.status()["modules"]] == ["t/b@1", "t/c@1", "t/d@1"]  # a, the oldest, left
    pool.release(pool.acquire("t/b@1"))  # a hit: b becomes the most recent
    pool.release(pool.acquire("t/e@1"))
    assert [e["module"] for e in pool.status()["modules"]] == ["t/d@1", "t/b@1", "t/e@1"]
    assert (pool.stats.hits, pool.stats.misses, pool.stats.evictions) == (1, 5, 2)
    assert materialize.calls == ["t/a@1", "t/b@1", "t/c@1", "t/d@1", "t/e@1"]  # the hit read nothing
    assert pool.resident_bytes == 3 * MODULE_BYTES


def test_in_use_and_pinned_modules_are_never_evicted(store, tmp_path):
    for name in ["held", "pinned", *(f"other{i}" for i in range(4))]:
        push(store, tmp_path, f"t/{name}")
    pool, _ = pool_for(store, budget_bytes=2 * MODULE_BYTES)
    held = pool.acquire("t/held@1")
    assert pool.pin("t/pinned") == "t/pinned@1"
    for i in range(4):
        other = pool.acquire(f"t/other{i}@1")
        assert {e["module"] for e in pool.status()["modules"]} == {"t/held@1", "t/pinned@1", f"t/other{i}@1"}
        pool.release(other)  # over budget: the released one goes, the held and pinned stay
        assert {e["module"] for e in pool.status()["modules"]} == {"t/held@1", "t/pinned@1"}
    pool.release(held)
    pool.unpin("t/pinned@1")
    pool.release(pool.acquire("t/other0@1"))
    assert [e["module"] for e in pool.status()["modules"]] == ["t/pinned@1", "t/other0@1"]
    assert not pool.unload("t/nothing@1")


def test_unload_waits_for_release_and_frees_the_module(store, tmp_path):
    push(store, tmp_path, "t/x")
    dropped = []
    pool, _ = pool_for(store, on_drop=dropped.append)
    module = pool.acquire("t/x@1")
    assert pool.unload("t/x@1") is False and "t/x@1" in pool  # in use: stays until released
    pool.release(module)
    assert pool.unload("t/x@1") is True and "t/x@1" not in pool
    assert dropped == [module] and pool.stats.evictions == 1


def test_alias_ttl_and_refresh(store, tmp_path):
    push(store, tmp_path, "t/m")
    push(store, tmp_path, "t/m")
    store.promote("t/m@1", "prod")
    pool, _ = pool_for(store, alias_ttl_s=3600)
    first = pool.acquire("t/m@prod")
    store.promote("t/m@2", "prod")
    assert pool.acquire("t/m@prod") is first  # the cached resolution, within the TTL
    pool.refresh()
    second = pool.acquire("t/m@prod")
    assert (first.key, second.key) == ("t/m@1", "t/m@2")
    assert "t/m@1" in pool and "t/m@2" in pool  # the old version lives while in use


def test_concurrent_first_use_loads_once(store, tmp_path):
    push(store, tmp_path, "t/same")
    pool, materialize = pool_for(store)
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.acquire("t/same@1"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert materialize.calls == ["t/same@1"] and len({id(m) for m in got}) == 1 and len(got) == 8
    assert pool.status()["modules"][0]["in_use"] == 8


def test_failed_loads_are_reported_and_not_cached(store, tmp_path):
    push(store, tmp_path, "t/foreign", fingerprint="cd" * 32)
    pool, materialize = pool_for(store)
    with pytest.raises(ModuleNotFound):
        pool.acquire("t/missing@1")
    with pytest.raises(IncompatibleBase, match="^t/foreign@1 is for another base$"):
        pool.acquire("t/foreign@1")
    assert materialize.calls == []  # refused from the manifest: no weight was read
    assert len(pool) == 0 and pool.stats.misses == 0
    push(store, tmp_path, "t/later")
    assert pool.acquire("t/later@1").key == "t/later@1"  # the pool still loads after failures


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_a_thousand_loads_and_evictions_leave_no_growth(store, tmp_path):
    # 24 modules of 256 KiB cycled through a budget of 16: every load is a miss, and evicts one
    size = 262_144
    names = [push(store, tmp_path, f"t/m{i}", size=size) for i in range(24)]
    pool, _ = pool_for(store, budget_bytes=16 * size)
    for i in range(200):  # warm up allocator pools
        pool.release(pool.acquire(names[i % 24]))
    gc.collect()
    before, misses = _rss_bytes(), pool.stats.misses
    for i in range(200, 1200):  # the cycle goes on: the 16 most recent are resident, the next is not
        pool.release(pool.acquire(names[i % 24]))
    gc.collect()
    growth = _rss_bytes() - before
    assert len(pool) == 16 and pool.stats.misses - misses == 1000 and pool.resident_bytes == 16 * size
    assert growth < 8 * size, f"resident memory grew by {growth / 1e6:.1f} MB"


def test_token_ranges_are_disjoint_first_fit_and_reused_when_freed():
    from tunehub.server.engine.pool import TokenRanges

    ranges = TokenRanges(start=1000, capacity=100)
    assert ranges.allocate("a", 40) == 1000
    assert ranges.allocate("b", 30) == 1040
    assert ranges.allocate("a", 40) == 1000  # a key keeps its range
    assert ranges.allocate("c", 31) is None  # 30 ids left
    assert ranges.allocate("c", 30) == 1070
    assert ranges.used == 100
    ranges.free("a")
    assert ranges.allocate("d", 41) is None  # the gap a left holds 40
    assert ranges.allocate("d", 25) == 1000  # first fit
    assert ranges.allocate("e", 15) == 1025
    spans = sorted(ranges.ranges().values())
    assert all(first + count <= nxt for (first, count), (nxt, _) in zip(spans, spans[1:]))
    assert TokenRanges(0, 0).allocate("x", 1) is None
    with pytest.raises(ValueError):
        TokenRanges(0, -1)
