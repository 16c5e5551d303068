"""Module-affinity routing across replicas, as pure functions (no Ray here: ``ray_app.py``'s
request router feeds them what the replicas report and what it sent since).

A replica reports (``api.InferenceWorker.routing_stats``) the module versions resident in its
pool, the references it last served with each, and its pressure: pool bytes used of the budget,
loads under way on its load thread, and requests in it against its batch capacity. The policy:

1. among the replicas that hold the request's modules (most parts held first) and are not
   overloaded, the least pressured;
2. otherwise the least pressured replica, where replicas within half a batch of it count as
   equally pressured and are ordered by rendezvous hashing of the modules: a module nobody holds
   goes back to the same replica (its home) each time it returns after an eviction, so the
   replicas' pools hold different modules rather than each the same hottest ones;
3. the rest follow in order of pressure, for when the first choices refuse (full queues).

A replica is overloaded when its requests (waiting or running) reach its batch capacity: a new
row would wait for a free slot however warm its module is. Requests of different modules still
share a replica's batches: the policy only ranks replicas, it never splits a batch by module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunehub.errors import InvalidReference
from tunehub.registry.refs import parse_ref

#: replicas whose pressures differ by less than this (half a batch of requests) count as equally
#: loaded: a module nobody holds then goes to its hashed home, so each module keeps one home and
#: the pools hold different modules instead of all the same hot ones
PRESSURE_TIE = 0.5
#: weights of the pressure's parts: requests per batch slot, loads queued per slot, pool fullness
LOADING_WEIGHT = 0.5
POOL_WEIGHT = 0.1


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the router sees it."""

    replica: str
    modules: frozenset[str] = frozenset()  # resident versions, "repo@N"
    refs: Mapping[str, str] = field(default_factory=dict)  # reference as requested -> "repo@N" resident
    used_bytes: int = 0
    budget_bytes: int = 0
    loading: int = 0  # loads under way or queued on the load thread
    requests: int = 0  # generate requests in the replica (waiting for a module or decoding)
    capacity: int = 16  # rows the engine decodes together (max_batch)

    @classmethod
    def from_stats(
        cls,
        replica: str,
        stats: Mapping[str, Any] | None,
        *,
        own_now: int = 0,
        own_at_report: int = 0,
        placed: Sequence[str] = (),
    ) -> ReplicaLoad:
        """From a replica's ``routing_stats`` (None or {} before its first report), corrected by
        what the router knows better than the (up to a period old) report: its own requests in
        the replica now (``own_now``) instead of those it had there when the report was made
        (``own_at_report``; the rest of the reported requests came from other routers), and the
        references it ``placed`` there lately (their modules are loading or loaded)."""
        stats = stats or {}
        refs = dict(stats.get("refs") or {})
        for ref in placed:
            refs.setdefault(ref, ref)
        return cls(
            replica=replica,
            modules=frozenset(stats.get("modules") or ()) | frozenset(placed),
            refs=refs,
            used_bytes=int(stats.get("used_bytes") or 0),
            budget_bytes=int(stats.get("budget_bytes") or 0),
            loading=int(stats.get("loading") or 0),
            requests=own_now + max(0, int(stats.get("requests") or 0) - own_at_report),
            capacity=max(1, int(stats.get("capacity") or 16)),
        )

    def holds(self, ref: str) -> bool:
        """Whether ``ref`` (as a request names it) is resident here: served under that very
        reference, or an exact version resident; an alias never served here matches any resident
        version of its repo (an alias moves rarely, and the version it moved from often stays)."""
        if ref in self.refs or ref in self.modules:
            return True
        try:
            parsed = parse_ref(ref)
        except InvalidReference:
            return False
        if parsed.version is not None:
            return str(parsed) in self.modules
        prefix = f"{parsed.repo}@"
        return any(key.startswith(prefix) for key in self.modules)

    @property
    def pressure(self) -> float:
        """Requests per batch slot, plus queued loads and pool fullness at lower weights."""
        pool = self.used_bytes / self.budget_bytes if self.budget_bytes > 0 else 0.0
        return (self.requests + LOADING_WEIGHT * self.loading) / self.capacity + POOL_WEIGHT * min(pool, 1.0)

    @property
    def overloaded(self) -> bool:
        return self.requests >= self.capacity


class OwnRequests:
    """The requests one router sent, per replica: which are still running now, and which were
    at a given time (a replica's report counts those too)."""

    def __init__(self, keep_s: float = 60.0, lost_s: float = 3600.0):
        self.keep_s = keep_s  # how long an ended request is remembered (reports are younger)
        self.lost_s = lost_s  # a request not ended after this is taken as lost (its end never told)
        self._requests: dict[str, tuple[str, float, float | None]] = {}  # id -> (replica, sent, ended)

    def sent(self, request_id: str, replica: str, at: float) -> None:
        self._requests[request_id] = (replica, at, None)
        for old, (_, began, ended) in list(self._requests.items()):
            if (ended is not None and ended < at - self.keep_s) or (ended is None and began < at - self.lost_s):
                del self._requests[old]

    def ended(self, request_id: str, at: float) -> None:
        entry = self._requests.get(request_id)
        if entry is not None:
            self._requests[request_id] = (entry[0], entry[1], at)

    def running(self, replica: str, at: float | None = None) -> int:
        """Requests in ``replica`` now (``at`` None) or at time ``at``."""
        return sum(
            1
            for where, began, ended in self._requests.values()
            if where == replica and (ended is None if at is None else began <= at and (ended is None or ended > at))
        )


def request_refs(payload: Any) -> list[str]:
    """The module references a worker payload names (``spec.py``'s generate message); []: none."""
    if not isinstance(payload, Mapping) or payload.get("op") != "generate":
        return []
    parts = payload.get("parts") or []
    return [str(part["model"]) for part in parts if isinstance(part, Mapping) and "model" in part]


def rendezvous(refs: Sequence[str], replica: str) -> int:
    """Highest-random-weight hash of a request's modules on a replica (stable across processes)."""
    digest = hashlib.blake2b(("\0".join(sorted(refs)) + "\1" + replica).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_replicas(refs: Sequence[str], replicas: Sequence[ReplicaLoad]) -> list[str]:
    """Replica ids, most preferred first (see the module docstring); [] for no replicas."""
    if not replicas:
        return []
    least = min(r.pressure for r in replicas)

    def by_pressure(r: ReplicaLoad) -> tuple[float, int, str]:
        # replicas within PRESSURE_TIE of the least loaded form one band, ordered by the hash
        band = 0.0 if r.pressure - least < PRESSURE_TIE else r.pressure
        return (band, -rendezvous(refs, r.replica) if refs else 0, r.replica)

    order = sorted(replicas, key=by_pressure)
    if refs:
        held = {r.replica: sum(1 for ref in refs if r.holds(ref)) for r in replicas}
        best = max(held.values())
        if best > 0:
            holders = sorted(
                (r for r in replicas if held[r.replica] == best and not r.overloaded), key=lambda r: (r.pressure, r.replica)
            )
            first = [r.replica for r in holders]
            return first + [r.replica for r in order if r.replica not in first]
    return [r.replica for r in order]


_SUMMED = ("budget_bytes", "resident_bytes", "hits", "misses", "evictions", "active_requests", "cancelled_requests")


def merge_statuses(statuses: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One pool status (``/admin/pool``, ``/metrics``) for several replicas: counts summed,
    per-module entries merged (bytes summed, pinned if pinned anywhere, ``replicas`` holding
    it), and each replica's own status under ``replicas``."""
    merged: dict[str, Any] = {key: 0 for key in _SUMMED}
    per_module: dict[str, dict[str, Any]] = {}
    by_module: dict[str, dict[str, int]] = {"loads_by_module": {}, "evictions_by_module": {}}
    cold_s = 0.0
    for replica, status in sorted(statuses.items()):
        for key in _SUMMED:
            merged[key] += int(status.get(key) or 0)
        cold_s += float(status.get("cold_load_seconds") or 0.0)
        for name, counts in by_module.items():
            for module, count in (status.get(name) or {}).items():
                counts[module] = counts.get(module, 0) + int(count)
        for entry in status.get("modules") or []:
            into = per_module.setdefault(
                entry["module"], {**entry, "bytes": 0, "in_use": 0, "hits": 0, "pinned": False, "replicas": []}
            )
            into["bytes"] += int(entry.get("bytes") or 0)
            into["in_use"] += int(entry.get("in_use") or 0)
            into["hits"] += int(entry.get("hits") or 0)
            into["pinned"] = bool(into["pinned"] or entry.get("pinned"))
            into["replicas"].append(replica)
    lookups = merged["hits"] + merged["misses"]
    merged["hit_rate"] = merged["hits"] / lookups if lookups else 0.0
    merged["cold_load_seconds"] = round(cold_s, 4)
    merged["modules"] = list(per_module.values())
    merged.update(by_module)
    merged["replicas"] = {replica: dict(status) for replica, status in sorted(statuses.items())}
    return merged
