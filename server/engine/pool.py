"""The module pool: modules pulled from the registry on first use, verified, materialised, and
kept under a byte budget with LRU eviction, pins and reference counts.

- A reference with an explicit version is cached forever (versions are immutable). An alias or
  ``latest`` is re-resolved after ``alias_ttl_s``, so a promotion takes effect without a restart;
  requests already holding the old version keep it until they release it.
- A module in use (reference count above zero) or pinned is never evicted. Eviction drops every
  reference the pool holds, and ``on_drop`` tells the owner of anything built from the module
  (the engine's batch plans) to drop it too, so the module's tensors are freed.
- A module that adds tokens (a tokenizer module) gets a range of token ids of its own beyond the
  base's vocabulary (:class:`TokenRanges`), so that rows of different tokenizer modules in one
  batch never share an id; the range is freed when the module leaves the pool. When no range is
  free, modules not in use that hold ranges are evicted (least recently used first) to make room,
  and a load that still finds none fails alone with :class:`~tunehub.errors.VocabularyFull`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, cast

from tunehub.errors import ModuleNotFound, VocabularyFull
from tunehub.registry.module import LocalModule, ModuleContent
from tunehub.registry.refs import ModuleRef, parse_ref
from tunehub.server.engine.modules import WEIGHTS_FILE, LoadedModule


class ModuleSource(Protocol):
    """Where modules come from: a registry store (``resolve`` + ``read``) or anything alike.

    A source without ``read`` (only ``pull``, which gives a verified folder) works too: see
    :class:`FolderSource`."""

    def resolve(self, ref: str | ModuleRef) -> Any: ...  # -> VersionInfo-like with .repo, .version, .ref

    def read(
        self, ref: str | ModuleRef, files: list[str] | None = None, *, check: Any = None, parse: Any = None
    ) -> ModuleContent: ...


class FolderSource(Protocol):
    """A source without ``read``: ``pull`` gives a verified local folder, read from there."""

    def resolve(self, ref: str | ModuleRef) -> Any: ...  # -> VersionInfo-like with .repo, .version, .ref

    def pull(self, ref: str) -> LocalModule: ...


class NotResident(LookupError):
    """``acquire(ref, load=False)``: the module is not in the pool (or its alias is not resolved
    yet); loading it is for a thread that may wait."""


class TokenRanges:
    """Disjoint ranges of token ids in ``[start, start + capacity)``, one per module key (first
    fit: ranges are freed in any order). Not thread-safe: the pool calls it under its lock."""

    def __init__(self, start: int, capacity: int):
        if capacity < 0:
            raise ValueError(f"the id capacity must be >= 0, got {capacity}")
        self.start = start
        self.capacity = capacity
        self._taken: dict[str, tuple[int, int]] = {}  # key -> (first id, count)

    def allocate(self, key: str, count: int) -> int | None:
        """The first id of a free range of ``count`` ids for ``key`` (its range if it has one), or
        None when no gap is that large."""
        if key in self._taken:
            return self._taken[key][0]
        cursor = self.start
        for first, taken in sorted(self._taken.values()):
            if first - cursor >= count:
                break
            cursor = max(cursor, first + taken)
        if cursor + count > self.start + self.capacity:
            return None
        self._taken[key] = (cursor, count)
        return cursor

    def free(self, key: str) -> None:
        self._taken.pop(key, None)

    @property
    def used(self) -> int:
        return sum(count for _, count in self._taken.values())

    def ranges(self) -> dict[str, tuple[int, int]]:
        """key -> (first id, count), for status and tests."""
        return dict(self._taken)


@dataclass
class PoolEntry:
    module: LoadedModule
    refcount: int = 0
    pinned: bool = False
    hits: int = 0
    loaded_at: float = field(default_factory=time.time)


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    cold_load_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ModulePool:
    def __init__(
        self,
        source: ModuleSource | FolderSource,
        materialize: Callable[[LocalModule | ModuleContent, str], LoadedModule],
        *,
        check: Callable[[Any, str], None] | None = None,
        budget_bytes: int = 1 << 30,
        alias_ttl_s: float = 5.0,
        on_event: Callable[[str, str], None] | None = None,
        on_drop: Callable[[LoadedModule], None] | None = None,
        token_ids: TokenRanges | None = None,
        files: list[str] | None = None,
    ):
        """``on_event(event, key)``: "load" and "evict" notices (metrics). ``on_drop(module)``:
        ``module`` left the pool (evicted or unloaded); called with the pool's lock held, so it
        must not call back into the pool. ``token_ids``: where modules that add tokens get their
        ids (None: no room, and such a module fails with VocabularyFull). ``files``: what a
        load reads of a module (those it has): the weights by default."""
        self.source = source
        self.materialize = materialize
        self.check = check  # check(manifest, key) before any weights are read
        self.budget_bytes = budget_bytes
        self.alias_ttl_s = alias_ttl_s
        self.on_event = on_event or (lambda event, key: None)
        self.on_drop = on_drop or (lambda module: None)
        self.stats = PoolStats()
        self._entries: OrderedDict[str, PoolEntry] = OrderedDict()  # LRU order: oldest first
        self._aliases: dict[str, tuple[str, float]] = {}  # ref text -> (key, expires)
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Event] = {}
        self.token_ids = token_ids if token_ids is not None else TokenRanges(0, 0)
        self.files = list(files) if files is not None else [WEIGHTS_FILE]

    # --- resolution ----------------------------------------------------------------------------
    def resolve_key(self, ref: str | ModuleRef, *, cached_only: bool = False) -> str:
        """``repo@version`` for a reference (aliases resolved, cached for ``alias_ttl_s``).

        ``cached_only``: raise :class:`NotResident` instead of asking the source (which may
        read a disk or the network) when an alias's resolution is not cached."""
        parsed = parse_ref(ref)
        if parsed.version is not None:
            return str(parsed)
        text = str(parsed)
        now = time.monotonic()
        with self._lock:
            cached = self._aliases.get(text)
            if cached and cached[1] > now:
                return cached[0]
        if cached_only:
            raise NotResident(text)
        info = self.source.resolve(parsed)
        key = f"{info.repo}@{info.version}"
        with self._lock:
            self._aliases[text] = (key, now + self.alias_ttl_s)
        return key

    def refresh(self) -> None:
        """Forget cached alias resolutions (an admin 'reload')."""
        with self._lock:
            self._aliases.clear()

    # --- acquire / release ---------------------------------------------------------------------
    def acquire(self, ref: str | ModuleRef, *, load: bool = True) -> LoadedModule:
        """The loaded module for ``ref``, with its reference count raised; pair with release().

        ``load=False``: only a module already in the pool, without waiting for anything (a
        decode loop asks so, and leaves the loading to a thread that may wait); else
        :class:`NotResident`. A load is shared: threads that ask for a module being loaded
        wait for that load."""
        key = self.resolve_key(ref, cached_only=not load)
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.refcount += 1
                    entry.hits += 1
                    self.stats.hits += 1
                    self._entries.move_to_end(key)
                    return entry.module
                if not load:
                    raise NotResident(key)
                waiter = self._loading.get(key)
                if waiter is None:
                    self._loading[key] = threading.Event()
                    break
            waiter.wait()  # another thread is loading this key; then look again
        try:
            started = time.perf_counter()
            read = getattr(self.source, "read", None)
            if read is not None:
                # materialised while the bytes are still being hashed, and kept only if they match
                module = read(key, self.files, check=self._checker(key), parse=self._materializer(key)).parsed
            else:
                # a source without read pulls (FolderSource)
                module = self.materialize(cast(FolderSource, self.source).pull(key), key)
            elapsed = time.perf_counter() - started
        except BaseException:
            with self._lock:
                self._loading.pop(key).set()
            raise
        with self._lock:
            try:
                self._place_tokens(module)
            except BaseException:
                self._loading.pop(key).set()
                raise
            self.stats.misses += 1
            self.stats.cold_load_seconds += elapsed
            self._entries[key] = PoolEntry(module=module, refcount=1)
            self._loading.pop(key).set()
            self._evict_over_budget()
        self.on_event("load", key)
        return module

    def _place_tokens(self, module: LoadedModule) -> None:
        """Give a module that adds tokens its id range (under the lock), evicting modules not in
        use that hold ranges, least recently used first, while none is free."""
        vocab = module.vocab
        if vocab is None:
            return
        while (first := self.token_ids.allocate(module.key, vocab.added)) is None:
            holders = [k for k, e in self._entries.items() if e.module.vocab is not None and not e.refcount and not e.pinned]
            if not holders:
                raise VocabularyFull(
                    f"{module.key} adds {vocab.added} tokens and this server has no id range that large left: "
                    f"{self.token_ids.used} of its {self.token_ids.capacity} ids belong to tokenizer modules in use"
                    " or pinned; send the request again when they are released"
                )
            self._drop(holders[0])
        vocab.first_id = first

    def _drop(self, key: str) -> PoolEntry:
        """Remove ``key``'s entry (under the lock): its id range is freed and ``on_drop`` told."""
        entry = self._entries.pop(key)
        self.token_ids.free(key)
        self.stats.evictions += 1
        self.on_drop(entry.module)
        self.on_event("evict", key)
        return entry

    def _materializer(self, key: str) -> Callable[[Any, dict[str, memoryview]], LoadedModule]:
        return lambda manifest, files: self.materialize(ModuleContent(manifest=manifest, files=files, ref=key), key)

    def _checker(self, key: str) -> Callable[[Any], None] | None:
        check = self.check
        if check is None:
            return None
        return lambda manifest: check(manifest, key)

    def release(self, module: LoadedModule) -> None:
        with self._lock:
            entry = self._entries.get(module.key)
            if entry is not None and entry.module is module and entry.refcount > 0:
                entry.refcount -= 1
            self._evict_over_budget()

    # --- pins and unload -----------------------------------------------------------------------
    def pin(self, ref: str | ModuleRef) -> str:
        module = self.acquire(ref)
        with self._lock:
            self._entries[module.key].pinned = True
        self.release(module)
        return module.key

    def unpin(self, ref: str | ModuleRef) -> str:
        key = self.resolve_key(ref)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise ModuleNotFound(f"{key} is not loaded")
            entry.pinned = False
            self._evict_over_budget()
        return key

    def unload(self, ref: str | ModuleRef) -> bool:
        """Drop a module now unless a request uses it (then it goes when released and evicted)."""
        key = self.resolve_key(ref)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.pinned = False
            if entry.refcount > 0:
                return False
            self._drop(key)
        return True

    # --- accounting ----------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.module.nbytes for e in self._entries.values())

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget_bytes": self.budget_bytes,
                "resident_bytes": sum(e.module.nbytes for e in self._entries.values()),
                "hits": self.stats.hits,
                "misses": self.stats.misses,
                "evictions": self.stats.evictions,
                "hit_rate": self.stats.hit_rate,
                "added_token_ids": {"capacity": self.token_ids.capacity, "used": self.token_ids.used},
                "modules": [_entry_status(key, e) for key, e in self._entries.items()],
            }

    def _evict_over_budget(self) -> None:
        total = sum(e.module.nbytes for e in self._entries.values())
        if total <= self.budget_bytes:
            return
        for key in list(self._entries):
            if total <= self.budget_bytes:
                break
            entry = self._entries[key]
            if entry.refcount or entry.pinned:
                continue
            self._drop(key)
            total -= entry.module.nbytes


def _entry_status(key: str, entry: PoolEntry) -> dict[str, Any]:
    status: dict[str, Any] = {
        "module": key,
        "kind": entry.module.kind.value,
        "bytes": entry.module.nbytes,
        "in_use": entry.refcount,
        "pinned": entry.pinned,
        "hits": entry.hits,
    }
    vocab = entry.module.vocab
    if vocab is not None:  # the engine ids its added tokens have (first, last)
        status["token_ids"] = [vocab.first_id, vocab.first_id + vocab.added - 1]
    return status
