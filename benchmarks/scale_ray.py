#!/usr/bin/env python3
"""``affinity_hit_rate_vs_random`` of the scale benchmark: module-aware routing against uniform
random routing across Ray Serve replicas (``tunehub serve --ray``), as a ratio of pool hit rates.

    python benchmarks/scale_ray.py            # alone: its own base and 128 modules
    python benchmarks/scale_ray.py --quick    # fewer requests, about two minutes
    python benchmarks/scale.py                # as the scale benchmark's last section (Ray installed)

On a local Ray cluster (this machine's CPUs), the Ray Serve application of ``tunehub serve --ray``
runs with 2 replicas, each with a pool budget of 32 modules, first with the module-affinity
router, then with a uniform random router. The same stream goes through the HTTP ingress each
time: requests naming modules drawn from a Zipf(1.0) popularity over 128 registered LoRA modules
(1 new token each, 4 clients in a closed loop). The figure is the pool hit rate (lookups that
found the module resident, over all replicas, after a warm-up) with affinity over that with
random routing (target >= 1.5).

What bounds it: at best the affinity router splits the modules between the replicas, so the two
pools act as one of 64 modules, while random routing has each pool hold the same hottest 32. For
LRU pools under Zipf(1.0) over 128 modules that best case is a hit-rate ratio of about 1.28 (an
LRU simulation: 0.82 against 0.64), so the figure also reports the miss-rate ratio (random over
affinity; about 2 at best), which measures the same effect as the loads saved.

The last stdout line (run alone) is one line of JSON, as every benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import _log, _quiet_libraries, zipf_draws  # noqa: E402  (the engine benchmark's helpers)

BENCHMARK = "scale"
TARGET = (">=", 1.5)
MODULES = 128
BUDGET_MODULES = 32
REPLICAS = 2
CLIENTS = 4
ADMIN_KEY = "bench-admin-key-0123456789"


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None


def module_bytes(base_path: str, registry: str, name: str) -> int:
    """Bytes one module takes in a pool (every module of the benchmark has the same shape)."""
    from tunehub.registry.local import LocalStore
    from tunehub.server.engine.base import load_base
    from tunehub.server.engine.engine import Engine

    with tempfile.TemporaryDirectory(prefix="tunehub-probe-") as cache:
        engine = Engine(load_base(base_path, quantization="none"), LocalStore(registry, cache_dir=cache), max_batch=1)
        try:
            module = engine.pool.acquire(name)
            nbytes = int(module.nbytes)
            engine.pool.release(module)
        finally:
            engine.close()
    return nbytes


def measure(
    base_path: str, registry: str, names: list[str], *, requests: int, warmup: int, work: Path, seed: int = 2026
) -> dict[str, Any]:
    """Both routers on the same Zipf stream over ``names``; their pool hit rates and the ratios."""
    import httpx
    import ray
    from ray import serve

    from tunehub.server.ray_app import build_app

    names = names[:MODULES]
    per_module = module_bytes(base_path, registry, names[0])
    draws = [names[i] for i in zipf_draws(len(names), 1.0, warmup + requests, seed=seed)]
    key_file = work / "bench-admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    cpus = os.cpu_count() or 1
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=cpus,
        object_store_memory=128 << 20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for router in ("affinity", "random"):
            _log(f"affinity: {REPLICAS} replicas, {router} routing, pools of {BUDGET_MODULES} x {per_module} bytes")
            app = build_app(
                {
                    "base": base_path,
                    "registry": registry,
                    "quantization": "none",
                    "replicas": REPLICAS,
                    "router": router,
                    "pool_bytes": BUDGET_MODULES * per_module,
                    "max_batch": 8,
                    "replica_cpus": cpus / REPLICAS,
                    "admin_key_file": str(key_file),
                }
            )
            serve.run(app, name="tunehub-bench", route_prefix="/")
            with httpx.Client(timeout=120) as client:
                _wait_running(client, url, headers)
                _stream(client, url, draws[:warmup])
                before = client.get(url + "/admin/pool", headers=headers).json()
                started = time.perf_counter()
                failures = _stream(client, url, draws[warmup:])
                elapsed = time.perf_counter() - started
                after = client.get(url + "/admin/pool", headers=headers).json()
            hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
            results[router] = {
                # each request finds its module resident or loads it once (a miss); the pools' hit
                # counters also count the engine's own lookups of modules already held
                "hit_rate": 1.0 - misses / requests,
                "pool_lookups": {"hits": hits, "misses": misses},
                "misses": misses,
                "failed_requests": failures,
                "requests_per_s": round(requests / elapsed, 2),
                "replicas": len(after["replicas"]),
            }
            _log(f"  {router}: hit rate {results[router]['hit_rate']:.3f} ({misses} loads for {requests} requests)")
            serve.delete("tunehub-bench")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    affinity, uniform = results["affinity"], results["random"]
    ratio = affinity["hit_rate"] / uniform["hit_rate"] if uniform["hit_rate"] else None
    miss_affinity = 1 - affinity["hit_rate"]
    return {
        "ratio": ratio,
        "miss_rate_random_vs_affinity": (1 - uniform["hit_rate"]) / miss_affinity if miss_affinity else None,
        "routers": results,
        "stream": {"modules": len(names), "zipf_s": 1.0, "requests": requests, "warmup": warmup, "clients": CLIENTS},
        "pool_budget_modules": BUDGET_MODULES,
        "replicas": REPLICAS,
    }


def entry(result: dict[str, Any] | None) -> dict[str, Any]:
    """The ratio's entry in the benchmark's JSON line."""
    value = None if result is None else result["ratio"]
    op, target = TARGET
    return {
        "value": None if value is None else round(value, 4),
        "target": f"{op} {target}",
        "pass": value is not None and value >= target,
    }


def _wait_running(client: Any, url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if (
                client.get(url + "/health").status_code == 200
                and len(client.get(url + "/admin/pool", headers=headers).json()["replicas"]) == REPLICAS
            ):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise RuntimeError("the Ray Serve application did not start within 300 s")


def _stream(client: Any, url: str, refs: list[str]) -> int:
    """``refs`` in order through :data:`CLIENTS` closed-loop clients; the number that failed."""
    lock = threading.Lock()
    position = [0]
    failed = [0]

    def run() -> None:
        while True:
            with lock:
                if position[0] >= len(refs):
                    return
                ref = refs[position[0]]
                position[0] += 1
            response = client.post(url + "/v1/completions", json={"model": ref, "prompt": "Hello", "max_tokens": 1})
            if response.status_code != 200:
                with lock:
                    failed[0] += 1

    threads = [threading.Thread(target=run) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: about two minutes")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (the base and registry are reused)")
    args = parser.parse_args(argv)
    if not ray_available():
        print('needs Ray Serve: pip install "tunehub[ray]"', file=sys.stderr)
        return 2
    from scale import NAMESPACE, Sizes, setup

    sizes = Sizes("affinity", "tiny", MODULES, 16, 8, BUDGET_MODULES, CLIENTS, 8, 1, 0, 0, 1.0)
    requests, warmup = (600, 200) if args.quick else (2400, 400)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunehub-bench-affinity-"))
    work.mkdir(parents=True, exist_ok=True)
    _quiet_libraries()
    try:
        info = setup(work, sizes)
        names = [f"{NAMESPACE}/m-{i:04d}" for i in range(MODULES)]
        result = measure(info["base"], info["registry"], names, requests=requests, warmup=warmup, work=work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = entry(result)
    print(f"\naffinity_hit_rate_vs_random: {ratio['value']} (target {ratio['target']}) {'PASS' if ratio['pass'] else 'FAIL'}")
    for router, r in result["routers"].items():
        print(f"  {router}: pool hit rate {r['hit_rate']:.3f} ({r['misses']} loads), {r['requests_per_s']} req/s")
    print(f"  miss rate, random over affinity: {result['miss_rate_random_vs_affinity']:.2f}")
    print(
        json.dumps(
            {"benchmark": BENCHMARK, "ratios": {"affinity_hit_rate_vs_random": ratio}, "figures": {"affinity": result}},
            default=float,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
