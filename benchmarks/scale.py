#!/usr/bin/env python3
"""Scale benchmark: many modules per replica, as ratios.

    python benchmarks/scale.py            # full run (bench-100m, fp32, CPU), a few minutes on 2 cores
    python benchmarks/scale.py --quick    # 'small' preset, fewer requests, about a minute

What is measured, in one process on one engine (the serving engine of ``tunehub serve``):

1. ``throughput_512_vs_1_modules``: 8 clients each send requests one after another (a closed
   loop: a client sends its next request when the last one finished), 16 prompt + 16 new tokens,
   greedy. The requests name modules drawn from a Zipf(1.0) popularity over 512 distinct
   registered LoRA modules while the pool's byte budget holds 64 of them; the same stream
   naming one module is the baseline. Decode tokens per second over the whole stream after a
   warm-up (target >= 0.8: S-LoRA's nearly flat curve). A module that is not in the pool is
   loaded by the engine's loader threads while the batch keeps decoding.
2. ``p99_ttft_miss_vs_hit``: in the 512-module stream, the 99th percentile of time to first
   token of the requests whose module was not in the pool when they were sent, against those
   whose module was (target <= 3).
3. ``decode_vs_bandwidth_roofline`` (a figure): a batch-8 decode step on 8 different modules
   against the time this machine takes to copy the bytes that step must read (every base weight
   a decode step reads: the linear layers, norms and LM head, not the input embedding's unused
   rows; plus the 8 rows' module tensors), copied in the same run. A per-step profile of the
   engine's ops says where the rest goes.
4. ``affinity_hit_rate_vs_random`` (when Ray is installed: ``pip install "tunehub[ray]"``): on a
   local Ray cluster, ``tunehub serve --ray``'s application with 2 replicas whose pools hold 32
   modules each; the pool hit rate of a Zipf(1.0) stream over 128 of the modules with the
   module-affinity router against uniform random routing (target >= 1.5). See
   ``benchmarks/scale_ray.py``, which also runs it alone, and why about 1.3 is its ceiling here.

The last stdout line is one line of JSON: ``{"benchmark": "scale", "ratios": {...}, "figures": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_ray  # noqa: E402  (the affinity section)
from engine import _log, _quiet_libraries, make_prompts, zipf_draws  # noqa: E402  (the engine benchmark's helpers)

BENCHMARK = "scale"
TARGETS = {"throughput_512_vs_1_modules": (">=", 0.8), "p99_ttft_miss_vs_hit": ("<=", 3.0)}
NAMESPACE = "scale"


@dataclass(frozen=True)
class Sizes:
    name: str
    preset: str
    modules: int
    distinct: int  # distinct weight contents among the modules (the rest share blobs)
    rank: int
    budget_modules: int
    clients: int
    prompt_tokens: int
    new_tokens: int
    requests: int
    warmup: int
    zipf_s: float


FULL = Sizes("full", "bench-100m", 512, 32, 16, 64, 8, 16, 16, 480, 64, 1.0)
QUICK = Sizes("quick", "small", 512, 16, 8, 64, 8, 16, 8, 240, 48, 1.0)


def setup(work: Path, sizes: Sizes) -> dict[str, Any]:
    """A base and ``sizes.modules`` registered LoRA modules; reused when ``work`` holds them."""
    marker = work / f"setup-{sizes.name}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    from tunehub.registry.local import LocalStore
    from tunehub.trainer.base import build_base
    from tunehub.trainer.testing import make_peft_module

    _log(f"building the base ({sizes.preset}) and {sizes.distinct} module contents")
    base = build_base(work / f"base-{sizes.preset}", sizes.preset, overwrite=True)
    store = LocalStore(work / "registry", cache_dir=work / "cache-setup")
    contents = []
    for i in range(sizes.distinct):
        folder = work / "modules" / f"content-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        make_peft_module(base, folder, "lora", seed=i, r=sizes.rank)
        contents.append(folder)
    _log(f"registering {sizes.modules} modules")
    for i in range(sizes.modules):
        store.push(contents[i % len(contents)], f"{NAMESPACE}/m-{i:04d}")
    info = {"base": str(base), "registry": str(work / "registry")}
    marker.write_text(json.dumps(info))
    return info


def run_stream(engine: Any, refs: list[str], prompts: list[list[int]], sizes: Sizes) -> dict[str, Any]:
    """The closed loop: ``sizes.clients`` clients send ``refs`` in order (one request each at a
    time). Returns decode tokens/s after the warm-up and each request's time to first token."""
    from tunehub.server.engine.engine import GenerationRequest, SamplingParams

    lock = threading.Lock()
    order = iter(enumerate(refs))
    records: list[dict[str, Any]] = []

    def client() -> None:
        while True:
            with lock:
                try:
                    index, ref = next(order)
                except StopIteration:
                    return
            key = engine.pool.resolve_key(ref)
            resident = key in engine.pool
            request = GenerationRequest(
                input_ids=prompts[index % len(prompts)],
                module=ref,
                params=SamplingParams(max_tokens=sizes.new_tokens, stop_token_ids=[]),
            )
            sent = time.perf_counter()
            handle = engine.submit(request)
            first = None
            for event in handle:
                if first is None and event.token_id >= 0:
                    first = time.perf_counter()
            ended = time.perf_counter()
            result = handle.result()
            with lock:
                records.append(
                    {
                        "index": index,
                        "hit": resident,
                        "sent": sent,
                        "ttft": (first or ended) - sent,
                        "ended": ended,
                        "tokens": result.completion_tokens,
                    }
                )

    threads = [threading.Thread(target=client) for _ in range(sizes.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records.sort(key=lambda r: r["index"])
    measured = [r for r in records if r["index"] >= sizes.warmup]
    start = min(r["sent"] for r in measured)
    end = max(r["ended"] for r in measured)
    return {
        "tokens_per_s": sum(r["tokens"] for r in measured) / (end - start),
        "ttft_hit_s": [r["ttft"] for r in measured if r["hit"]],
        "ttft_miss_s": [r["ttft"] for r in measured if not r["hit"]],
        "requests": len(measured),
    }


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def step_tensors(engine: Any, modules: list[Any]) -> list[Any]:
    """The tensors a decode step reads: every weight of the base (parameters, buffers, and tensors
    layers keep as attributes, e.g. oneDNN's packed weights) but the input embedding (a step reads
    only its rows' tokens; tied to the head, the head reads it whole), plus the rows' module
    tensors."""
    import torch

    model = engine.model
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding
    found: dict[int, Any] = {}
    for layer in model.modules():
        own = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
        own += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
        for tensor in own:
            if tensor is not embedding or tied:
                found.setdefault(id(tensor), tensor)
    for module in modules:
        for tensor in _flatten(module.layers):
            if isinstance(tensor, torch.Tensor):
                found.setdefault(id(tensor), tensor)
    return list(found.values())


def copy_seconds(tensors: list[Any]) -> float:
    """The time to copy ``tensors``, one by one into buffers of their own (best of 5)."""
    import torch

    sources = [t.to_dense() if t.layout != torch.strided else t for t in tensors]
    targets = [torch.empty_like(t) for t in sources]
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return best


def _flatten(value: Any) -> list[Any]:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _flatten(getattr(value, f.name))]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return [value]


def decode_profile(engine: Any, refs: list[str], prompts: list[list[int]], steps: int = 16) -> tuple[float, str]:
    """Median decode-step seconds of a batch of ``refs`` and its ops per step (self CPU time).

    The steps run in this thread, through the engine's own admission and decode step (as
    benchmarks/engine.py profiles them), so that the profiler sees every op."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunehub.server.engine.engine import GenerationRequest, RequestHandle, SamplingParams

    handles = [
        RequestHandle(GenerationRequest(input_ids=p, module=r, params=SamplingParams(max_tokens=10**6, stop_token_ids=[])))
        for p, r in zip(prompts, refs, strict=True)
    ]
    times = []
    with engine._lock, torch.no_grad():
        engine._admit(handles)
        for _ in range(3):  # warm: plans built, allocator primed
            engine._decode_step()
        for _ in range(steps):
            started = time.perf_counter()
            engine._decode_step()
            times.append(time.perf_counter() - started)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine._decode_step()
        for row in list(engine._rows):  # leave the engine empty and the pool balanced
            engine._release(row)
        engine._rows, engine._cache, engine._mask = [], None, None
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000 / steps
    lines = [f"    all ops: {total:.2f} ms of self CPU time per step; the largest (ms/step, calls/step):"]
    lines += [f"    {e.key[:52]:<52} {e.self_cpu_time_total / 1000 / steps:7.2f} {e.count / steps:7.1f}" for e in rows]
    return statistics.median(times), "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="'small' preset, fewer requests: about a minute")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (the base and registry are reused)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunehub-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    _quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        info = setup(work, sizes)
        from tunehub.registry.local import LocalStore
        from tunehub.server.engine.base import load_base
        from tunehub.server.engine.engine import Engine

        base = load_base(info["base"], quantization="none")
        names = [f"{NAMESPACE}/m-{i:04d}" for i in range(sizes.modules)]
        prompts = make_prompts(64, sizes.prompt_tokens, len(base.tokenizer), seed=7)

        def fresh_engine() -> Any:
            store = LocalStore(info["registry"], cache_dir=work / f"cache-{time.monotonic_ns()}")
            engine = Engine(base, store, max_batch=sizes.clients, pool_bytes=1 << 40, cpu_allocator="auto")
            probe = engine.pool.acquire(names[0])
            engine.pool.release(probe)
            engine.pool.unload(names[0])
            engine.pool.budget_bytes = sizes.budget_modules * probe.nbytes
            return engine

        draws = zipf_draws(sizes.modules, sizes.zipf_s, sizes.requests, seed=2026)
        many = [names[i] for i in draws]
        one = [names[0]] * sizes.requests
        _log(f"streams: {sizes.requests} requests ({sizes.warmup} warm-up), {sizes.clients} clients, interleaved twice")
        results: dict[str, list[dict[str, Any]]] = {"one": [], "many": []}
        for round_ in range(2):  # interleaved: a drift of the machine hits both sides
            for side, refs in (("one", one), ("many", many)) if round_ == 0 else (("many", many), ("one", one)):
                engine = fresh_engine()
                results[side].append(run_stream(engine, refs, prompts, sizes))
                if side == "many":
                    results[side][-1]["pool"] = {k: v for k, v in engine.pool.status().items() if k != "modules"}
                engine.close()
                _log(f"  round {round_ + 1} {side}: {results[side][-1]['tokens_per_s']:.1f} decode tok/s")
        one_tps = statistics.median(r["tokens_per_s"] for r in results["one"])
        many_tps = statistics.median(r["tokens_per_s"] for r in results["many"])
        hits = [t for r in results["many"] for t in r["ttft_hit_s"]]
        misses = [t for r in results["many"] for t in r["ttft_miss_s"]]
        p99_hit, p99_miss = p99(hits), p99(misses)

        _log("roofline: a batch-8 decode step on 8 modules against a copy of the bytes it reads")
        engine = fresh_engine()
        engine.pool.budget_bytes = 1 << 40
        batch_refs = names[: sizes.clients]
        step_s, profile_table = decode_profile(engine, batch_refs, prompts[: sizes.clients])
        held = [engine.pool.acquire(r) for r in batch_refs]
        tensors = step_tensors(engine, held)
        read_bytes = sum(t.numel() * t.element_size() for t in tensors)
        copy_s = copy_seconds(tensors)
        for module in held:
            engine.pool.release(module)
        engine.close()

        affinity = None
        if scale_ray.ray_available():
            _log("affinity: module-aware against random routing across 2 Ray Serve replicas")
            requests, warmup = (600, 200) if args.quick else (2400, 400)
            affinity = scale_ray.measure(info["base"], info["registry"], names, requests=requests, warmup=warmup, work=work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def entry(name: str, value: float | None) -> dict[str, Any]:
        op, target = TARGETS[name]
        passed = value is not None and (value >= target if op == ">=" else value <= target)
        return {"value": None if value is None else round(value, 4), "target": f"{op} {target}", "pass": passed}

    ratios = {
        "throughput_512_vs_1_modules": entry("throughput_512_vs_1_modules", many_tps / one_tps),
        "p99_ttft_miss_vs_hit": entry("p99_ttft_miss_vs_hit", p99_miss / p99_hit if p99_miss is not None and p99_hit else None),
    }
    if affinity is not None:
        ratios["affinity_hit_rate_vs_random"] = scale_ray.entry(affinity)
    figures = {
        "sizes": asdict(sizes),
        "decode_tokens_per_s": {"one_module": round(one_tps, 2), f"{sizes.modules}_modules": round(many_tps, 2)},
        "p99_ttft_s": {"hit": p99_hit, "miss": p99_miss},
        "median_ttft_s": {
            "hit": statistics.median(hits) if hits else None,
            "miss": statistics.median(misses) if misses else None,
        },
        "requests_hit_miss": [len(hits), len(misses)],
        "pool": results["many"][-1].get("pool"),
        "decode_vs_bandwidth_roofline": round(copy_s / step_s, 4),
        "decode_step_ms": round(1000 * step_s, 2),
        "step_bytes_mb": round(read_bytes / (1 << 20), 1),
        "copy_ms": round(1000 * copy_s, 2),
        "copy_gb_per_s": round(read_bytes / copy_s / 1e9, 2),
        "affinity_hit_rate_vs_random": affinity if affinity is not None else 'not measured: pip install "tunehub[ray]"',
    }
    print(f"\nscale benchmark ({sizes.name}: {sizes.preset}, {sizes.modules} modules, pool of {sizes.budget_modules})")
    print(f"  decode tok/s: one module {one_tps:.1f}, {sizes.modules} modules {many_tps:.1f}")
    print(f"  time to first token p99: hit {p99_hit}, miss {p99_miss} (s); requests hit/miss {len(hits)}/{len(misses)}")
    print(
        f"  roofline: decode step {1000 * step_s:.1f} ms reads {read_bytes / (1 << 20):.0f} MB;"
        f" copying them takes {1000 * copy_s:.1f} ms ({read_bytes / copy_s / 1e9:.1f} GB/s): {copy_s / step_s:.0%} of the roofline"
    )
    print("  where a decode step's time goes:")
    print(profile_table)
    for name, value in ratios.items():
        verdict = "PASS" if value["pass"] else "FAIL"
        print(f"  {name}: {value['value']} (target {value['target']}) {verdict}")
    if affinity is None:
        print('  affinity_hit_rate_vs_random: not measured (needs Ray Serve: pip install "tunehub[ray]")')
    else:
        for router, r in affinity["routers"].items():
            print(f"  {router} routing: pool hit rate {r['hit_rate']:.3f} ({r['misses']} loads)")
    print(json.dumps({"benchmark": BENCHMARK, "ratios": ratios, "figures": figures}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
