"""Prometheus metrics and the per-request audit log of the HTTP process.

Request, token and latency figures are counted where every response passes: the HTTP process.
The module pool lives in the inference worker, so its figures (resident bytes, evictions, hits)
are a snapshot the ``/metrics`` handler fetches from the worker before each scrape.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
NO_MODULE = "-"  # label for requests that never reached a module (bad input, 401, 429...)


@dataclass
class CallRecord:
    """What one request did, for metrics and the audit line."""

    endpoint: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    tenant: str | None = None
    model: str | None = None  # what the caller asked for
    module: str | None = None  # what answered: "ns/name@3" or the base's name
    base_fingerprint: str | None = None
    stream: bool = False
    status: int = 200
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None
    cold_load: bool = False
    replica: str | None = None  # which replica answered, when several serve (Ray Serve)

    def mark_first_token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started

    @property
    def latency_s(self) -> float:
        return time.perf_counter() - self.started


class _PoolCollector:
    """Exposes the latest pool snapshot fetched from the inference worker."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot
        if not snap:
            return
        resident = GaugeMetricFamily("tunehub_pool_resident_bytes", "Bytes of modules resident in the pool")
        resident.add_metric([], snap.get("resident_bytes", 0))
        yield resident
        budget = GaugeMetricFamily("tunehub_pool_budget_bytes", "Byte budget of the module pool")
        budget.add_metric([], snap.get("budget_bytes", 0))
        yield budget
        per_module = GaugeMetricFamily(
            "tunehub_module_resident_bytes", "Bytes each resident module holds", labels=["module", "pinned"]
        )
        for entry in snap.get("modules", []):
            per_module.add_metric([entry["module"], str(bool(entry["pinned"])).lower()], entry["bytes"])
        yield per_module
        evictions = CounterMetricFamily("tunehub_module_evictions", "Modules evicted from the pool", labels=["module"])
        for module, count in sorted(snap.get("evictions_by_module", {}).items()):
            evictions.add_metric([module], count)
        yield evictions
        loads = CounterMetricFamily("tunehub_pool_loads", "Modules loaded into the pool (cold loads)", labels=["module"])
        for module, count in sorted(snap.get("loads_by_module", {}).items()):
            loads.add_metric([module], count)
        yield loads
        for name, key, doc in (
            ("tunehub_pool_hits", "hits", "Pool lookups that found the module resident"),
            ("tunehub_pool_misses", "misses", "Pool lookups that had to load the module"),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], snap.get(key, 0))
            yield counter
        active = GaugeMetricFamily("tunehub_engine_active_requests", "Requests the engine is generating for now")
        active.add_metric([], snap.get("active_requests", 0))
        yield active


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["tenant", "module"]
        self.requests = Counter(
            "tunehub_requests", "Requests answered", ["tenant", "module", "endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("tunehub_prompt_tokens", "Prompt tokens processed", labels, registry=self.registry)
        self.completion_tokens = Counter(
            "tunehub_completion_tokens", "Completion tokens generated", labels, registry=self.registry
        )
        self.latency = Histogram(
            "tunehub_request_duration_seconds",
            "Time from request to last byte",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "tunehub_time_to_first_token_seconds",
            "Time from request to the first generated token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cold_loads = Counter(
            "tunehub_module_cold_loads", "Requests that had to load their module first", labels, registry=self.registry
        )
        self.pool = _PoolCollector()
        self.registry.register(self.pool)

    def observe(self, call: CallRecord) -> None:
        tenant = call.tenant or "-"
        module = call.module or NO_MODULE
        self.requests.labels(tenant, module, call.endpoint, str(call.status)).inc()
        if call.module is None:
            return
        self.latency.labels(tenant, module).observe(call.latency_s)
        if call.prompt_tokens:
            self.prompt_tokens.labels(tenant, module).inc(call.prompt_tokens)
        if call.completion_tokens:
            self.completion_tokens.labels(tenant, module).inc(call.completion_tokens)
        if call.first_token_s is not None:
            self.first_token.labels(tenant, module).observe(call.first_token_s)
        if call.cold_load:
            self.cold_loads.labels(tenant, module).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AuditLog:
    """One JSON line per request: time, tenant, module@version, tokens, latency, status.

    ``path`` None or ``-`` writes to stderr; a path is appended to (created if missing)."""

    def __init__(self, path: str | Path | None = None):
        self._lock = threading.Lock()
        self._stream: IO[str]
        if path is None or path == "-":
            self._own = False
            self._stream = sys.stderr
        else:
            self._own = True
            self._stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, call: CallRecord) -> None:
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": call.request_id,
            "tenant": call.tenant,
            "endpoint": call.endpoint,
            "model": call.model[:200] if isinstance(call.model, str) else None,
            "module": call.module,
            "base": call.base_fingerprint[:12] if call.base_fingerprint else None,
            "stream": call.stream,
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "latency_ms": round(call.latency_s * 1000, 1),
            "status": call.status,
            "finish_reason": call.finish_reason,
        }
        if call.replica:
            line["replica"] = call.replica
        if call.error:
            line["error"] = call.error[:300]
        text = json.dumps(line, separators=(",", ":"))
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._own:
            self._stream.close()
