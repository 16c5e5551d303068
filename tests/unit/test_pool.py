import gc
import threading
from dataclasses import dataclass

import pytest
import torch

from tunehub.errors import ModuleNotFound
from tunehub.registry.manifest import ModuleKind
from tunehub.server.engine.modules import LayerDelta, LoadedModule
from tunehub.server.engine.pool import ModulePool


@dataclass
class Info:
    repo: str
    version: int


class FakeSource:
    """Modules by name; an alias table that tests can move."""

    def __init__(self):
        self.aliases = {}
        self.pulls = 0

    def resolve(self, ref):
        text = str(ref)
        repo, _, selector = text.partition("@")
        if repo.startswith("missing"):
            raise ModuleNotFound(f"no module {repo!r}")
        if selector and not selector.isdigit():
            return Info(repo, self.aliases[(repo, selector)])
        return Info(repo, int(selector) if selector else 1)

    def pull(self, ref, dest=None):
        self.resolve(ref)
        self.pulls += 1
        return str(ref)


def materialize(numel=16_384):
    def build(local, key):
        delta = LayerDelta(lora_a=torch.randn(numel // 2), lora_b=torch.randn(numel // 2), scale=1.0)
        return LoadedModule(key=key, kind=ModuleKind.LORA, manifest=None, layers={"l": delta}, nbytes=numel * 4)

    return build


def test_lru_eviction_under_budget():
    source = FakeSource()
    pool = ModulePool(source, materialize(), budget_bytes=3 * 65_536)
    for name in "abcd":
        pool.release(pool.acquire(f"m{name}@1"))
    assert len(pool) == 3 and "ma@1" not in pool and pool.stats.evictions == 1
    pool.release(pool.acquire("mb@1"))  # b becomes most recent
    pool.release(pool.acquire("me@1"))
    assert "mb@1" in pool and "mc@1" not in pool
    assert pool.stats.hits == 1 and pool.stats.misses == 5
    assert pool.resident_bytes <= pool.budget_bytes


def test_in_use_and_pinned_modules_are_never_evicted():
    pool = ModulePool(FakeSource(), materialize(), budget_bytes=2 * 65_536)
    held = pool.acquire("held@1")
    pool.pin("pinned@1")
    for i in range(5):
        pool.release(pool.acquire(f"other{i}@1"))
    assert "held@1" in pool and "pinned@1" in pool
    assert pool.resident_bytes > pool.budget_bytes or len(pool) == 2
    pool.release(held)
    pool.unpin("pinned@1")
    pool.release(pool.acquire("last@1"))
    pool.release(pool.acquire("last2@1"))
    assert "held@1" not in pool and "pinned@1" not in pool
    assert not pool.unload("nothing@1")


def test_unload_waits_for_release():
    pool = ModulePool(FakeSource(), materialize(), budget_bytes=1 << 30)
    module = pool.acquire("x@1")
    assert pool.unload("x@1") is False  # in use: stays until released
    pool.release(module)
    assert pool.unload("x@1") is True and "x@1" not in pool


def test_alias_ttl_and_refresh():
    source = FakeSource()
    source.aliases[("m", "prod")] = 1
    pool = ModulePool(source, materialize(), budget_bytes=1 << 30, alias_ttl_s=3600)
    first = pool.acquire("m@prod")
    source.aliases[("m", "prod")] = 2
    assert pool.acquire("m@prod").key == "m@1"  # cached resolution within the TTL
    pool.refresh()
    second = pool.acquire("m@prod")
    assert second.key == "m@2" and first.key == "m@1"  # the old version lives while in use


def test_concurrent_first_use_loads_once():
    source = FakeSource()
    pool = ModulePool(source, materialize(), budget_bytes=1 << 30)
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.acquire("same@1"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert source.pulls == 1 and len({id(m) for m in got}) == 1
    assert pool.status()["modules"][0]["in_use"] == 8


def test_failed_load_is_reported_and_not_cached():
    pool = ModulePool(FakeSource(), materialize(), budget_bytes=1 << 30)
    with pytest.raises(ModuleNotFound):
        pool.acquire("missing@1")
    assert len(pool) == 0


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def test_two_thousand_loads_and_evictions_leave_no_growth():
    # 256 KiB modules, a budget of 16: 2,000 loads evict 1,984 modules
    pool = ModulePool(FakeSource(), materialize(numel=65_536), budget_bytes=16 * 262_144)
    for i in range(200):  # warm up allocator pools
        pool.release(pool.acquire(f"warm{i}@1"))
    gc.collect()
    before = _rss_bytes()
    for i in range(2000):
        pool.release(pool.acquire(f"m{i}@1"))
    gc.collect()
    growth = _rss_bytes() - before
    assert len(pool) == 16 and pool.stats.evictions >= 2000
    assert growth < 8 * 262_144, f"resident memory grew by {growth / 1e6:.1f} MB"
