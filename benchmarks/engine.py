#!/usr/bin/env python3
"""Engine benchmark: mixed-module batches, cold activation and the module pool, as ratios.

    python benchmarks/engine.py                      # full run (bench-100m, fp32, CPU), ~10-15 min on 2 cores
    python benchmarks/engine.py --quick              # 'small' preset, fewer tokens, about a minute
    python benchmarks/engine.py --quantization nf4   # both sides on the 4-bit (bitsandbytes NF4) base
    python benchmarks/engine.py --profile            # also print per-decode-step op and cold-load profiles
    python benchmarks/engine.py --profile-only       # only the profiles (a few minutes), no verdict
    python benchmarks/engine.py --threads 1          # one torch thread per worker: steadier on a busy machine

What is measured (each part in its own process, so that no part inherits another's allocator
state or resident memory):

1. throughput (bench-100m, batch 8, 32 prompt + 32 new tokens, greedy, no row stops early):
   tunehub with 8 rows on 8 different LoRA modules (rank 16, all linear layers) against tunehub
   with all 8 rows on one module, PEFT's mixed batch (``generate(adapter_names=...)``) and PEFT
   serving one request at a time (``set_adapter`` + 8 generate calls of batch 1).
2. kinds: a tunehub batch mixing LoRA, DoRA, IA3, prompt and prefix rows against the
   single-LoRA batch of part 1; and a batch of one module of every kind the engine mixes (LoRA,
   DoRA, AdaLoRA, IA3, bottleneck, prompt, P-tuning, prefix, and a selective module of BitFit
   biases and LayerNorm weights), 9 rows, against 9 rows on one LoRA (``all_kinds_vs_single_lora``).
   BitFit needs biases, which the Llama presets lack: the base of parts 1-3 is built with a bias
   on every linear layer of its blocks (``build_base(..., biases=True)``; both sides run on it).
   Composed: 8 rows that each apply two modules at once (a LoRA with another LoRA, a DoRA, IA3, a
   prompt, BitFit+norms, a bottleneck or a prefix; a DoRA with an IA3), a request's
   ``module="a+b"``, against the 8 rows on 8 single LoRAs of part 1 (``composed_vs_single``).
3. cold activation: ``pool.acquire`` of a never-seen version (resolve, the registry's blobs read
   once and hashed, manifest checks, materialise) against a bare ``safetensors.torch.load_file``
   of the same weights file, both from a warm page cache. The pool is full (it holds two such
   modules, so each activation evicts one) as the bare side frees its tensors after each load:
   both sides reuse freed memory instead of faulting in fresh pages.
   Signed: the same cold ``pool.acquire`` from a store whose trust policy requires a signature
   by a trusted key (``tunehub serve --trust KEY --require-signed``; the versions pushed with
   ``push(..., sign=key)``) against the store without a policy: the signature check on the cold
   activation path (one ECDSA verification against the digests the read checks anyway).
4. pool under Zipf load: 1,000 registered modules, a byte budget of 64 modules, 5,000
   acquire/release pairs with Zipf popularity (s = 1.1): hit rate and resident-memory growth
   after warm-up. This part uses the 'small' preset (rank 8 modules): the pool's work does not
   depend on the base's size, only the module's.

Decode tokens/s: the time from the first generated token of a batch (prefill done) to its last,
over rows x (new tokens - 1). The same cut is made on both sides: tunehub's first streamed token
event, PEFT's first logits-processor call (both happen right after the prefill's forward pass).

The machine's two cores may be shared with other processes. With two torch threads, a batched
matmul then slows down several-fold while a batch-1 one hardly does (the two OpenMP threads wait
on each other whenever one is descheduled, and batch-1 GEMVs barely use the second thread), so a
busy neighbour biases the ratios against batching. Hence: sides are interleaved round by round
(each round runs every side once, in a rotated order), each timed run first waits (within a time
budget) for the CPUs to be quiet, a disturbed run is repeated while that budget lasts, and the
share of the CPUs other processes used is reported per side. Warm-up round first, then the median
of 3 rounds per side. A second view, less sensitive to neighbours, goes in the figures: tokens/s
from the quickest quarter of all decode steps ("p25-step"). ``--threads 1`` removes the OpenMP
effect altogether (then every side gets the same share of one core).

The last stdout line is one line of JSON: ``{"benchmark": "engine", "ratios": {...}, "figures": {...}}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

BENCHMARK = "engine"
MIB = 1024 * 1024

#: ratio name -> (comparison, target)
TARGETS: dict[str, tuple[str, float]] = {
    "mixed_vs_single": (">=", 0.85),
    "mixed_vs_peft_adapter_names": (">=", 1.3),
    "mixed_vs_peft_sequential": (">=", 4.0),
    "mixed_kinds_vs_single_lora": (">=", 0.75),
    "all_kinds_vs_single_lora": (">=", 0.7),
    "composed_vs_single": (">=", 0.75),
    "cold_load_vs_safetensors": ("<=", 2.0),
    "cold_load_signed_vs_unsigned": ("<=", 1.3),
}
#: figures that carry a target too (they are not ratios of two sides)
FIGURE_TARGETS: dict[str, tuple[str, float]] = {"rss_growth_after_warmup": ("<", 0.05)}


@dataclass(frozen=True)
class Sizes:
    name: str
    preset: str  # base of parts 1-3
    batch: int
    prompt_tokens: int
    new_tokens: int
    rounds: int
    lora_rank: int
    virtual_tokens: int  # prompt and prefix modules
    cold_modules: int
    zipf_preset: str
    zipf_modules: int
    zipf_distinct: int  # distinct weight contents among them (the rest share blobs)
    zipf_rank: int
    zipf_slots: int  # the pool's budget, in modules
    zipf_requests: int
    zipf_warmup: int
    zipf_s: float
    noise_budget_s: float  # total time the throughput part may spend waiting for quiet CPUs or repeating disturbed runs


FULL = Sizes(
    name="full",
    preset="bench-100m",
    batch=8,
    prompt_tokens=32,
    new_tokens=32,
    rounds=3,
    lora_rank=16,
    virtual_tokens=8,
    cold_modules=8,
    zipf_preset="small",
    zipf_modules=1000,
    zipf_distinct=16,
    zipf_rank=8,
    zipf_slots=64,
    zipf_requests=5000,
    zipf_warmup=1000,
    zipf_s=1.1,
    noise_budget_s=90.0,
)
QUICK = Sizes(
    name="quick",
    preset="small",
    batch=8,
    prompt_tokens=16,
    new_tokens=16,
    rounds=3,
    lora_rank=16,
    virtual_tokens=8,
    cold_modules=4,
    zipf_preset="tiny",
    zipf_modules=200,
    zipf_distinct=4,
    zipf_rank=8,
    zipf_slots=32,
    zipf_requests=1000,
    zipf_warmup=200,
    zipf_s=1.1,
    noise_budget_s=10.0,
)

#: the rows of the mixed-kinds batch (part 2): module names pushed by ``setup``
KIND_ROWS = ("lora-0", "lora-1", "dora-0", "dora-1", "ia3-0", "ia3-1", "prompt-0", "prefix-0")
#: the rows of the all-kinds batch: one module of every kind the engine mixes
ALL_KIND_ROWS = ("lora-0", "dora-0", "adalora-0", "ia3-0", "bottleneck-0", "prompt-0", "ptuning-0", "prefix-0", "bitfit-norms-0")
#: the rows of the composed batch: each row applies two modules at once (per-request composition)
COMPOSED_ROWS = (
    "lora-0+lora-1",
    "lora-2+dora-0",
    "lora-3+ia3-0",
    "lora-4+prompt-0",
    "lora-5+bitfit-norms-0",
    "lora-6+bottleneck-0",
    "lora-7+prefix-0",
    "dora-1+ia3-1",
)
NAMESPACE = "bench"


# --- CPU accounting (shared machine) ---------------------------------------------------------------


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, all its threads)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    times = os.times()
    return (sum(fields[:8]) - idle) / ticks, times.user + times.system


class Disturbance:
    """Share of the machine's CPUs that other processes used between start() and stop()."""

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._busy0, self._own0 = _cpu_seconds()

    def stop(self) -> float:
        busy1, own1 = _cpu_seconds()
        wall = max(time.perf_counter() - self._t0, 1e-6)
        return max(0.0, (busy1 - self._busy0) - (own1 - self._own0)) / (wall * (os.cpu_count() or 1))


class QuietGate:
    """Waits (within a total budget) until other processes leave the CPUs alone."""

    def __init__(self, budget_s: float, threshold: float = 0.10) -> None:
        self.budget_s = budget_s
        self.threshold = threshold
        self.waited_s = 0.0

    def wait(self) -> None:
        probe = Disturbance()
        while self.budget_s > 0:
            started = time.monotonic()
            probe.start()
            time.sleep(0.5)
            if probe.stop() < self.threshold:
                return
            time.sleep(1.5)
            spent = time.monotonic() - started
            self.budget_s -= spent
            self.waited_s += spent


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- workers: common ---------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@dataclass
class Timed:
    """One timed generation of a whole batch."""

    decode_s: float  # first generated token -> last
    total_s: float  # submit -> last
    decode_tokens: int
    total_tokens: int
    tokens: list[list[int]]  # generated ids per row
    step_s: list[float]  # each decode step's duration (token i -> token i + 1)
    rows_per_step: int  # tokens one decode step makes
    disturbed: float = 0.0  # share of the CPUs other processes used meanwhile

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s

    @property
    def total_tps(self) -> float:
        return self.total_tokens / self.total_s


class NotOneBatch(RuntimeError):
    """The engine did not run the submitted rows as one batch (they were admitted in parts)."""


def run_engine(engine: Any, prompts: list[list[int]], modules: list[str | None], new_tokens: int) -> Timed:
    """Submit every row at once and time the batch through the public streaming API."""
    from tunehub.server.engine.engine import GenerationRequest, SamplingParams

    # built before the submits, so that nothing between two submits can hand the GIL to the engine thread
    requests = [
        GenerationRequest(
            input_ids=p, module=m, params=SamplingParams(max_tokens=new_tokens, stop_token_ids=[])
        )  # []: never stop early
        for p, m in zip(prompts, modules)
    ]
    # let the engine finish retiring the previous batch's rows first, so that this batch starts
    # from an idle engine (it then gathers the submits for a moment and prefills them together)
    gc.collect()
    time.sleep(0.05)
    steps_before = engine.steps
    switch = sys.getswitchinterval()
    # the engine thread wakes on the first submit: a precaution so that it does not get the GIL
    # before all rows are queued (whether it admitted them together is checked below)
    sys.setswitchinterval(1.0)
    started = time.perf_counter()
    try:
        handles = [engine.submit(r) for r in requests]
    finally:
        sys.setswitchinterval(switch)
    stamps = [time.perf_counter() for event in handles[0] if event.token_id >= 0]  # row 0's tokens come with every step
    results = [h.result() for h in handles]
    ended = time.perf_counter()
    if not stamps:
        raise RuntimeError("the engine produced no token")
    steps = engine.steps - steps_before
    counts = [r.completion_tokens for r in results]
    if steps != new_tokens - 1 or any(c != new_tokens for c in counts):
        raise NotOneBatch(f"{steps} decode steps for {len(prompts)} rows of {new_tokens} tokens (completions {counts})")
    rows = len(prompts)
    return Timed(
        ended - stamps[0],
        ended - started,
        rows * (new_tokens - 1),
        rows * new_tokens,
        [list(r.token_ids) for r in results],
        _diffs(stamps),
        rows,
    )


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _diffs(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _step_clock() -> tuple[Any, list[float]]:
    """A logits processor that records when generate() calls it: first right after the prefill,
    then after each decode step's forward pass."""
    from transformers import LogitsProcessor

    stamps: list[float] = []

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            stamps.append(time.perf_counter())
            return scores

    return StepClock(), stamps


def run_peft(
    model: Any,
    prompts: list[list[int]],
    new_tokens: int,
    pad_id: int,
    adapter_names: list[str] | None = None,
    *,
    collect: bool = True,
) -> Timed:
    import torch
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts)
    clock, stamps = _step_clock()
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    if collect:
        gc.collect()  # as before an engine run: no collection of earlier garbage inside the timing
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
            **extra,
        )
    ended = time.perf_counter()
    generated = out[:, ids.shape[1] :].tolist()
    if any(len(g) != new_tokens for g in generated):
        raise RuntimeError(f"PEFT generated {[len(g) for g in generated]} tokens, expected {new_tokens}")
    rows = len(prompts)
    return Timed(ended - stamps[0], ended - started, rows * (new_tokens - 1), rows * new_tokens, generated, _diffs(stamps), rows)


def run_peft_sequential(model: Any, prompts: list[list[int]], adapters: list[str], new_tokens: int, pad_id: int) -> Timed:
    """One request at a time: set_adapter, then a batch-1 generate; phases summed over requests."""
    decode = total = 0.0
    tokens: list[list[int]] = []
    steps: list[float] = []
    gc.collect()
    for prompt, adapter in zip(prompts, adapters):
        started = time.perf_counter()
        model.set_adapter(adapter)
        one = run_peft(model, [prompt], new_tokens, pad_id, collect=False)
        total += time.perf_counter() - started
        decode += one.decode_s
        tokens += one.tokens
        steps += one.step_s
    rows = len(prompts)
    return Timed(decode, total, rows * (new_tokens - 1), rows * new_tokens, tokens, steps, 1)


def make_prompts(rows: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # ids from the trained part of the vocabulary, clear of the special tokens at 0..3
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(rows)]


# --- worker: throughput (parts 1 and 2) ----------------------------------------------------------------


def worker_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    _quiet_libraries()
    import torch
    from peft import PeftModel

    from tunehub.registry.local import LocalStore
    from tunehub.server.engine.base import load_base
    from tunehub.server.engine.engine import Engine

    sizes = Sizes(**spec["sizes"])
    work = Path(spec["work"])
    store = LocalStore(spec["registry"], cache_dir=work / f"cache-throughput-{os.getpid()}")
    folders: dict[str, str] = spec["folders"]
    loras = [f"lora-{i}" for i in range(sizes.batch)]

    base = load_base(spec["base"], quantization=spec["quantization"])
    rows_max = max(sizes.batch, len(ALL_KIND_ROWS))
    engine = Engine(base, store, max_batch=rows_max, pool_bytes=1 << 34, cpu_allocator="auto")  # as tunehub serve
    # PEFT gets its own, unpatched copy of the identical base (same loader, same quantization)
    peft_base = load_base(spec["base"], quantization=spec["quantization"])
    peft = PeftModel.from_pretrained(peft_base.model, folders[loras[0]], adapter_name=loras[0])
    for name in loras[1:]:
        peft.load_adapter(folders[name], adapter_name=name)
    peft.eval()
    pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    prompts = make_prompts(sizes.batch, sizes.prompt_tokens, len(base.tokenizer))
    all_kinds_prompts = make_prompts(len(ALL_KIND_ROWS), sizes.prompt_tokens, len(base.tokenizer), seed=1)
    n = sizes.new_tokens
    ref = lambda name: f"{NAMESPACE}/{name}"  # noqa: E731

    def peft_single() -> Timed:
        peft.set_adapter(loras[0])
        return run_peft(peft, prompts, n, pad_id)

    sides: dict[str, Callable[[], Timed]] = {
        "tunehub_single": lambda: run_engine(engine, prompts, [ref(loras[0])] * sizes.batch, n),
        "tunehub_mixed": lambda: run_engine(engine, prompts, [ref(m) for m in loras], n),
        "tunehub_mixed_kinds": lambda: run_engine(engine, prompts, [ref(m) for m in KIND_ROWS], n),
        "tunehub_all_kinds": lambda: run_engine(engine, all_kinds_prompts, [ref(m) for m in ALL_KIND_ROWS], n),
        "tunehub_single_all_kinds_rows": lambda: run_engine(engine, all_kinds_prompts, [ref(loras[0])] * len(ALL_KIND_ROWS), n),
        "tunehub_composed": lambda: run_engine(
            engine, prompts, ["+".join(ref(part) for part in row.split("+")) for row in COMPOSED_ROWS], n
        ),
        "peft_single": peft_single,
        "peft_adapter_names": lambda: run_peft(peft, prompts, n, pad_id, adapter_names=loras),
        "peft_sequential": lambda: run_peft_sequential(peft, prompts, loras, n, pad_id),
    }
    gate = QuietGate(sizes.noise_budget_s)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    outputs: dict[str, list[list[int]]] = {}
    split_batches = repeated = 0

    def timed(name: str, *, measured: bool = True, attempts: int = 3) -> Timed:
        nonlocal split_batches, repeated
        best: Timed | None = None
        for _ in range(attempts):
            if measured:
                gate.wait()
            probe = Disturbance()
            probe.start()
            try:
                result = sides[name]()
            except NotOneBatch as exc:
                split_batches += 1
                print(f"  {name}: {exc}; repeating", flush=True)
                continue
            result.disturbed = probe.stop()
            if best is None or result.disturbed < best.disturbed:
                best = result
            if not measured or result.disturbed <= gate.threshold or gate.budget_s <= 0:
                break
            gate.budget_s -= result.total_s  # a repeat costs time too: it comes out of the same budget
            repeated += 1
        if best is None:
            raise RuntimeError(f"{name}: the engine never ran the rows as one batch")
        return best

    if spec.get("profile_only"):
        profiles = {"profile": profile_decode(engine, peft, prompts, loras, pad_id, all_kinds_prompts)}
        engine.close()
        return profiles
    order = list(sides)
    for name in order:  # warm-up: loads every module into the pool, first-call costs, caches
        outputs[name] = timed(name, measured=False).tokens
    for round_ in range(sizes.rounds):
        rotated = order[round_ % len(order) :] + order[: round_ % len(order)]
        for name in rotated:
            one = timed(name)
            runs[name].append(
                {
                    "decode_tps": one.decode_tps,
                    "total_tps": one.total_tps,
                    "decode_s": one.decode_s,
                    "total_s": one.total_s,
                    "disturbed": one.disturbed,
                    "step_s": one.step_s,
                    "rows_per_step": one.rows_per_step,
                }
            )
            print(
                f"  round {round_ + 1} {name}: {one.decode_tps:.1f} decode tok/s (others used {one.disturbed:.0%} of the CPUs)",
                flush=True,
            )

    summary = {
        name: {
            "decode_tps": statistics.median(r["decode_tps"] for r in rs),
            "total_tps": statistics.median(r["total_tps"] for r in rs),
            "decode_tps_runs": [round(r["decode_tps"], 2) for r in rs],
            "max_disturbed": max(r["disturbed"] for r in rs),
            # the quickest quarter of all decode steps of the 3 runs: what a step costs when the
            # neighbours leave the CPUs alone (a robust view on a shared machine; not the verdict)
            "p25_step_tps": rs[0]["rows_per_step"] / _quantile([x for r in rs for x in r["step_s"]], 0.25),
        }
        for name, rs in runs.items()
    }
    for rs in runs.values():
        for r in rs:
            r["step_ms"] = [round(1000 * x, 2) for x in r.pop("step_s")]
    same = lambda a, b: sum(x == y for x, y in zip(outputs[a], outputs[b])) / len(outputs[a])  # noqa: E731
    result: dict[str, Any] = {
        "sides": summary,
        "runs": runs,
        "same_tokens": {
            "tunehub_mixed_vs_peft_adapter_names": same("tunehub_mixed", "peft_adapter_names"),
            "tunehub_mixed_vs_peft_sequential": same("tunehub_mixed", "peft_sequential"),
            "tunehub_single_vs_peft_single": same("tunehub_single", "peft_single"),
        },
        "split_batches_retried": split_batches,
        "gate_waited_s": round(gate.waited_s, 1),
        "disturbed_runs_repeated": repeated,
        "torch_threads": torch.get_num_threads(),
        # OneDNNLinear on an fp32 CPU base (Engine's cpu_linear="auto"); PEFT runs torch's Linear
        "tunehub_base_linear": type(next(iter(engine.layers.values())).base).__name__,
    }
    if spec.get("profile"):
        result["profile"] = profile_decode(engine, peft, prompts, loras, pad_id, all_kinds_prompts)
    engine.close()
    return result


# --- profile (optional) ----------------------------------------------------------------------------------


def profile_decode(
    engine: Any,
    peft: Any,
    prompts: list[list[int]],
    loras: list[str],
    pad_id: int,
    all_kinds_prompts: list[list[int]],
    *,
    steps: int = 8,
    rounds: int = 3,
) -> dict[str, str]:
    """Per-decode-step profiles of tunehub and PEFT batches: ops (torch.profiler) and Python (cProfile).

    torch.profiler and cProfile record only the thread that started them, and the engine decodes
    in its own thread; so for tunehub the engine's two phases (admission with prefill, then the
    decode steps) are driven from this thread through its internal methods, with the engine
    thread idle, and only the decode steps are recorded. For PEFT, generate() runs whole and the
    events before its first logits-processor call (the prefill) are left out of the op table.
    On a shared machine every figure here is the least disturbed of ``rounds`` interleaved
    runs. Diagnostic only: the timed figures use the public API."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import LogitsProcessor, LogitsProcessorList

    from tunehub.server.engine.engine import GenerationRequest, RequestHandle, SamplingParams

    if not all(hasattr(engine, a) for a in ("_admit", "_decode_step", "_release", "_lock", "_rows")):
        return {"note": "the engine's internals changed; profile skipped"}
    marker = "## prefill done ##"

    class Nothing:
        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    class PyProfile(Nothing):
        def __init__(self) -> None:
            self.profile = cProfile.Profile()

        def __enter__(self) -> None:
            self.profile.enable()

        def __exit__(self, *exc: Any) -> None:
            self.profile.disable()

    def engine_batch(modules: list[str], rows: list[list[int]] = prompts) -> Callable[[Any], float]:
        def run(recorder: Any) -> float:
            handles = [
                RequestHandle(
                    GenerationRequest(input_ids=p, module=m, params=SamplingParams(max_tokens=10**6, stop_token_ids=[]))
                )
                for p, m in zip(rows, modules, strict=True)
            ]
            with engine._lock, torch.no_grad():
                engine._admit(handles)
                with record_function(marker):  # the op table starts here: decode steps only
                    pass
                with recorder:
                    started = time.perf_counter()
                    for _ in range(steps):
                        engine._decode_step()
                    elapsed = time.perf_counter() - started
                for row in list(engine._rows):  # leave the engine empty and the pool balanced
                    engine._release(row)
                engine._rows, engine._kv, engine._mask = [], [], None
            return elapsed

        return run

    def peft_batch(rows: list[list[int]], adapter: str | None, adapter_names: list[str] | None = None) -> Callable[[Any], float]:
        def run(recorder: Any) -> float:
            if adapter is not None:
                peft.set_adapter(adapter)
            ids = torch.tensor(rows)
            stamps: list[float] = []

            class Mark(LogitsProcessor):
                def __call__(self, input_ids: Any, scores: Any) -> Any:
                    if not stamps:
                        with record_function(marker):
                            pass
                    stamps.append(time.perf_counter())
                    return scores

            extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
            with recorder, torch.no_grad():
                peft.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=steps + 1,
                    min_new_tokens=steps + 1,
                    do_sample=False,
                    pad_token_id=pad_id,
                    logits_processor=LogitsProcessorList([Mark()]),
                    **extra,
                )
            return stamps[-1] - stamps[0]

        return run

    cases = {
        "tunehub_single": engine_batch([f"{NAMESPACE}/{loras[0]}"] * len(prompts)),
        "tunehub_mixed": engine_batch([f"{NAMESPACE}/{m}" for m in loras]),
        "tunehub_mixed_kinds": engine_batch([f"{NAMESPACE}/{m}" for m in KIND_ROWS]),
        "tunehub_all_kinds": engine_batch([f"{NAMESPACE}/{m}" for m in ALL_KIND_ROWS], all_kinds_prompts),
        "tunehub_composed": engine_batch(["+".join(f"{NAMESPACE}/{part}" for part in row.split("+")) for row in COMPOSED_ROWS]),
        "peft_single": peft_batch(prompts, loras[0]),
        "peft_adapter_names": peft_batch(prompts, None, loras),
        "peft_one_row (a step of peft_sequential)": peft_batch(prompts[:1], loras[1]),
    }
    best: dict[str, dict[str, Any]] = {name: {} for name in cases}
    for run in cases.values():
        run(Nothing())  # warm
    for _ in range(rounds):
        for name, run in cases.items():
            keep = best[name]
            wall = run(Nothing())
            keep["wall"] = min(keep.get("wall", wall), wall)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                wall = run(Nothing())
            if wall < keep.get("ops_wall", float("inf")):
                keep["ops_wall"], keep["ops"] = wall, _per_step_ops(prof.events(), marker, steps)
            py = PyProfile()
            wall = run(py)
            if wall < keep.get("py_wall", float("inf")):
                stream = io.StringIO()
                pstats.Stats(py.profile, stream=stream).sort_stats("tottime").print_stats(12)
                keep["py_wall"], keep["py"] = wall, _trim_pstats(stream.getvalue())
    tables: dict[str, str] = {}
    for name, keep in best.items():
        scope = "decode steps only" if name.startswith("tunehub") else f"whole generate() with {steps + 1} new tokens"
        tables[name] = (
            f"decode wall {1000 * keep['wall'] / steps:.1f} ms/step (unprofiled, best of {rounds}; profiled:"
            f" {1000 * keep['ops_wall'] / steps:.1f} ms/step)\n{keep['ops']}\n"
            f"-- cProfile, Python functions by self time ({scope}; totals over {steps} decode steps) --\n{keep['py']}"
        )
    return tables


def _per_step_ops(events: Any, marker: str, steps: int, limit: int = 16) -> str:
    """Ops by self CPU time per decode step, leaving out whatever ran before ``marker`` (a prefill)."""
    since = min((e.time_range.start for e in events if e.name == marker), default=None)
    totals: dict[str, list[float]] = {}
    for event in events:
        if since is not None and event.time_range.start < since:
            continue
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += event.self_cpu_time_total
        entry[1] += 1
    totals.pop(marker, None)
    total_ms = sum(t for t, _ in totals.values()) / 1000 / steps
    rows = sorted(totals.items(), key=lambda item: -item[1][0])[:limit]
    lines = [f"ops: {total_ms:.1f} ms self CPU per step in all ops; top ops (ms/step, calls/step):"]
    lines += [f"  {name[:56]:<56} {t / 1000 / steps:8.2f} {n / steps:8.1f}" for name, (t, n) in rows]
    return "\n".join(lines)


def _trim_pstats(text: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("ncalls"):
            return "\n".join(lines[i - 2 if i >= 2 else 0 :])
    return text


# --- worker: cold activation (part 3) -----------------------------------------------------------------


def worker_cold(spec: dict[str, Any]) -> dict[str, Any]:
    _quiet_libraries()
    import hashlib

    from safetensors.torch import load, load_file

    from tunehub.registry.files import sha256_file
    from tunehub.registry.local import LocalStore
    from tunehub.registry.manifest import Manifest
    from tunehub.registry.module import ModuleContent
    from tunehub.registry.signing import TrustPolicy, generate_key_pair
    from tunehub.registry.store import open_store
    from tunehub.sdk.registry import Registry
    from tunehub.server.engine.base import load_base
    from tunehub.server.engine.engine import Engine

    sizes = Sizes(**spec["sizes"])
    work = Path(spec["work"])
    cache = work / f"cache-cold-{os.getpid()}"  # empty: every pull copies from the blobs
    store = LocalStore(spec["registry"], cache_dir=cache)
    folders: dict[str, str] = spec["folders"]
    base = load_base(spec["base"], quantization=spec["quantization"])
    engine = Engine(base, store, pool_bytes=1 << 34, cpu_allocator="auto")  # as tunehub serve
    names = [f"lora-{i}" for i in range(sizes.cold_modules)]
    # the signed side: a store of the same registry whose policy requires a trusted signature (as
    # tunehub serve --trust KEY --require-signed), on an engine sharing the loaded base
    signing_key = work / f"cold-signing-{os.getpid()}"
    generate_key_pair(signing_key)
    policy = TrustPolicy.from_paths([f"{signing_key}.pub"], require_signed=True)
    signed_store = open_store(f"file://{spec['registry']}", trust=policy, cache_dir=work / f"cache-cold-signed-{os.getpid()}")
    signed_engine = Engine(base, signed_store, pool_bytes=1 << 34, cpu_allocator="auto")
    signer = Registry(f"file://{spec['registry']}", cache_dir=cache)

    def blobs(folder: Path) -> tuple[list[Path], Path]:
        """(every blob a pull of this module reads, the weights blob) in the store's layout."""
        manifest = Manifest.read(folder)
        digests = dict(manifest.files)
        digests["manifest.json"] = sha256_file(folder / "manifest.json")
        path = lambda d: store.root / "blobs" / "sha256" / d[:2] / d  # noqa: E731  (documented layout)
        return [path(d) for d in digests.values()], path(digests["adapter_model.safetensors"])

    def warm(paths: list[Path]) -> None:
        for p in paths:
            p.read_bytes()  # into the page cache: both sides then read from memory, not disk

    def fresh_version(name: str) -> str:
        # a new version of identical content: its blobs are shared (and warm), the version unseen
        return store.push(folders[name], f"{NAMESPACE}/{name}").ref

    def fresh_signed_version(name: str) -> str:
        return signer.push(folders[name], f"{NAMESPACE}/{name}", sign=signing_key).ref

    # warm-up: first-call costs (imports, allocator) on both sides, outside the timings
    all_blobs, weights = blobs(Path(folders[names[0]]))
    warm(all_blobs)
    # the pool runs full, as a serving pool does: it holds two of these modules, so each cold
    # activation evicts one, as the bare side frees its tensors after each load. A pool that kept
    # every module would time the kernel's first touch of fresh pages on one side only (on this
    # VM about 5 us per 4 KiB page, 8 ms for a 7 MB module: more than the load itself).
    engine.pool.budget_bytes = int(2.5 * weights.stat().st_size)
    engine.pool.release(engine.pool.acquire(fresh_version(names[0])))
    signed_engine.pool.budget_bytes = engine.pool.budget_bytes
    signed_engine.pool.release(signed_engine.pool.acquire(fresh_signed_version(names[0])))
    load_file(str(weights))

    def one_pass(weights: Path) -> None:
        # a reference for what a verified cold load can cost: the weights read once, their sha256
        # checked on those bytes, tensors built from the same bytes (no copy, no second hash)
        data = weights.read_bytes()
        hashlib.sha256(data).hexdigest()
        load(data)

    pool_s: list[float] = []
    signed_s: list[float] = []
    bare_s: list[float] = []
    one_pass_s: list[float] = []
    for i, name in enumerate(names * 2):  # each module twice, as two fresh versions: 16 samples a side
        all_blobs, weights = blobs(Path(folders[name]))
        ref = fresh_version(name)
        signed_ref = fresh_signed_version(name)  # the same blobs, another fresh version, signed
        warm(all_blobs)
        sides = ["pool", "signed", "bare", "one_pass"]
        sides = sides if i % 2 == 0 else sides[::-1]  # alternate who goes first
        for side in sides:
            gc.collect()
            if side == "pool":
                started = time.perf_counter()
                module = engine.pool.acquire(ref)
                pool_s.append(time.perf_counter() - started)
                engine.pool.release(module)
            elif side == "signed":
                started = time.perf_counter()
                module = signed_engine.pool.acquire(signed_ref)
                signed_s.append(time.perf_counter() - started)
                signed_engine.pool.release(module)
            elif side == "bare":
                started = time.perf_counter()
                tensors = load_file(str(weights))
                bare_s.append(time.perf_counter() - started)
                tensors.clear()  # freed after the timing, not inside it
            elif side == "one_pass":
                started = time.perf_counter()
                one_pass(weights)
                one_pass_s.append(time.perf_counter() - started)

    # where the pool's time goes: its steps timed one by one on fresh versions. The pool
    # materialises while the bytes are hashed; the last two figures are those parts alone.
    steps: dict[str, list[float]] = {
        "resolve": [], "read + sha256 (materialised meanwhile)": [], "sha256 alone": [], "parse + materialise alone": [],
        "signature check alone": [],
    }  # fmt: skip
    for name in names:
        all_blobs, weights = blobs(Path(folders[name]))
        ref = fresh_version(name)
        warm(all_blobs)
        gc.collect()
        t0 = time.perf_counter()
        store.resolve(ref)
        t1 = time.perf_counter()
        content = store.read(
            ref,
            ["adapter_model.safetensors"],
            check=lambda m, ref=ref: engine.materializer.admit(m, ref),
            parse=engine.pool._materializer(ref),
        )
        t2 = time.perf_counter()
        data = bytearray(weights.read_bytes())
        t3 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t4 = time.perf_counter()
        engine.materializer.load(
            ModuleContent(manifest=content.manifest, files={"adapter_model.safetensors": memoryview(data)}), ref
        )
        t5 = time.perf_counter()
        signed_info = signed_store.resolve(fresh_signed_version(name))
        t6 = time.perf_counter()
        policy.check(signed_info.ref, dict(signed_info.files), signed_info.signatures)
        t7 = time.perf_counter()
        for key, value in zip(steps, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t7 - t6)):
            steps[key].append(value)
        del content

    profile_text = None
    if spec.get("profile"):
        import cProfile
        import io
        import pstats

        py = cProfile.Profile()
        for name in names:
            all_blobs, _ = blobs(Path(folders[name]))
            ref = fresh_version(name)
            warm(all_blobs)
            py.enable()
            engine.pool.release(engine.pool.acquire(ref))
            py.disable()
        stream = io.StringIO()
        pstats.Stats(py, stream=stream).sort_stats("tottime").print_stats(16)
        profile_text = f"cProfile of {len(names)} cold pool.acquire calls\n" + _trim_pstats(stream.getvalue())

    engine.close()
    signed_engine.close()
    weights_bytes = blobs(Path(folders[names[0]]))[1].stat().st_size
    return {
        "pool_ms": [round(1000 * s, 3) for s in pool_s],
        "signed_pool_ms": [round(1000 * s, 3) for s in signed_s],
        "signed_pool_median_ms": 1000 * statistics.median(signed_s),
        "safetensors_ms": [round(1000 * s, 3) for s in bare_s],
        "pool_median_ms": 1000 * statistics.median(pool_s),
        "safetensors_median_ms": 1000 * statistics.median(bare_s),
        "one_pass_read_hash_load_median_ms": 1000 * statistics.median(one_pass_s),
        "breakdown_median_ms": {k: round(1000 * statistics.median(v), 3) for k, v in steps.items()},
        "weights_mb": weights_bytes / MIB,
        "profile": profile_text,
    }


# --- worker: pool under Zipf load (part 4) -------------------------------------------------------------


def zipf_draws(n_items: int, s: float, count: int, seed: int) -> list[int]:
    """``count`` item indices with P(rank k) proportional to 1 / k**s, ranks shuffled onto items."""
    rng = random.Random(seed)
    weights = [1.0 / (k**s) for k in range(1, n_items + 1)]
    ranked = list(range(n_items))
    rng.shuffle(ranked)  # popularity must not follow the names' (or contents') order
    return [ranked[k] for k in rng.choices(range(n_items), weights=weights, k=count)]


def worker_zipf(spec: dict[str, Any]) -> dict[str, Any]:
    _quiet_libraries()
    from tunehub.registry.local import LocalStore
    from tunehub.server.engine.base import load_base
    from tunehub.server.engine.engine import Engine
    from tunehub.server.engine.pool import PoolStats

    sizes = Sizes(**spec["sizes"])
    work = Path(spec["work"])
    store = LocalStore(spec["registry"], cache_dir=work / f"cache-zipf-{os.getpid()}")
    base = load_base(spec["base"], quantization="none")  # the pool's work does not touch base weights for LoRA
    engine = Engine(base, store, pool_bytes=1 << 34, cpu_allocator="auto")  # as tunehub serve
    pool = engine.pool
    names = [f"zipf/m-{i:04d}" for i in range(sizes.zipf_modules)]

    # the budget: exactly zipf_slots modules (all modules have one shape, so one size)
    probe = pool.acquire(names[0])
    module_bytes = probe.nbytes
    pool.release(probe)
    pool.unload(names[0])
    pool.budget_bytes = sizes.zipf_slots * module_bytes
    pool.stats = PoolStats()

    draws = zipf_draws(sizes.zipf_modules, sizes.zipf_s, sizes.zipf_requests, seed=1234)
    top = {index for index, _ in Counter(draws).most_common(sizes.zipf_slots)}
    rss: list[tuple[int, int]] = [(0, _rss_bytes())]
    hit_us: list[float] = []
    miss_ms: list[float] = []
    warm_stats = (0, 0)
    started = time.perf_counter()
    for i, index in enumerate(draws, start=1):
        misses = pool.stats.misses
        t0 = time.perf_counter()
        module = pool.acquire(names[index])
        pool.release(module)
        elapsed = time.perf_counter() - t0
        del module  # the loop must not hold the last module alive past its eviction
        if pool.stats.misses > misses:
            miss_ms.append(1000 * elapsed)
        else:
            hit_us.append(1e6 * elapsed)
        if i == sizes.zipf_warmup:
            gc.collect()
            warm_stats = (pool.stats.hits, pool.stats.misses)
            rss.append((i, _rss_bytes()))
        elif i % 500 == 0 or i == len(draws):
            gc.collect()
            rss.append((i, _rss_bytes()))
    elapsed_s = time.perf_counter() - started
    rss_warm = dict(rss)[sizes.zipf_warmup]
    rss_end = rss[-1][1]
    hits_after = pool.stats.hits - warm_stats[0]
    misses_after = pool.stats.misses - warm_stats[1]
    result = {
        "preset": sizes.zipf_preset,
        "modules": sizes.zipf_modules,
        "distinct_contents": sizes.zipf_distinct,
        "module_kb": module_bytes / 1024,
        "budget_modules": sizes.zipf_slots,
        "requests": sizes.zipf_requests,
        "warmup_requests": sizes.zipf_warmup,
        "zipf_s": sizes.zipf_s,
        "hit_rate": pool.stats.hit_rate,
        "hit_rate_after_warmup": hits_after / max(1, hits_after + misses_after),
        "ideal_static_top_hit_rate": sum(d in top for d in draws) / len(draws),  # the 64 most drawn, pinned
        "misses": pool.stats.misses,
        "evictions": pool.stats.evictions,
        "resident_modules_end": len(pool),
        "resident_bytes_end": pool.resident_bytes,
        "hit_us_median": statistics.median(hit_us) if hit_us else None,
        "miss_ms_median": statistics.median(miss_ms) if miss_ms else None,
        "seconds": elapsed_s,
        "rss_mb": [(i, round(b / MIB, 2)) for i, b in rss],
        "rss_growth_after_warmup": (rss_end - rss_warm) / rss_warm,
        "rss_growth_after_warmup_mb": (rss_end - rss_warm) / MIB,
    }
    engine.close()
    return result


def run_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    workers = {"throughput": worker_throughput, "cold": worker_cold, "zipf": worker_zipf}
    out = workers[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(out, default=float))


# --- setup (parent) ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def setup(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Bases, module folders and registries; reused when ``work`` already holds them (``--keep``)."""
    marker = work / f"setup-{sizes.name}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    _quiet_libraries()
    from tunehub.registry.local import LocalStore
    from tunehub.trainer.base import build_base
    from tunehub.trainer.testing import make_peft_module, make_selective_module

    _log(f"building bases ({sizes.preset}, {sizes.zipf_preset})")
    base = build_base(work / f"base-{sizes.preset}-biased", sizes.preset, overwrite=True, biases=True)
    zipf_base = build_base(work / f"base-{sizes.zipf_preset}", sizes.zipf_preset, overwrite=True)

    _log("making modules (LoRA x8, DoRA x2, IA3 x2, prompt, prefix, AdaLoRA, bottleneck, P-tuning, BitFit+norms)")
    folders: dict[str, str] = {}
    plan = [(f"lora-{i}", "lora", i, {"r": sizes.lora_rank}) for i in range(max(sizes.batch, sizes.cold_modules))]
    plan += [(f"dora-{i}", "dora", 100 + i, {"r": sizes.lora_rank}) for i in range(2)]
    plan += [(f"ia3-{i}", "ia3", 200 + i, {}) for i in range(2)]
    plan += [("prompt-0", "prompt", 300, {"num_virtual_tokens": sizes.virtual_tokens})]
    plan += [("prefix-0", "prefix", 400, {"num_virtual_tokens": sizes.virtual_tokens})]
    plan += [("adalora-0", "adalora", 500, {"r": sizes.lora_rank})]
    plan += [("bottleneck-0", "bottleneck", 600, {"placement": "houlsby"})]
    plan += [("ptuning-0", "ptuning", 700, {"num_virtual_tokens": sizes.virtual_tokens})]
    registry = LocalStore(work / "registry", cache_dir=work / "cache-setup")
    for name, kind, seed, options in plan:
        folder = work / "modules" / name
        shutil.rmtree(folder, ignore_errors=True)
        make_peft_module(base, folder, kind, seed=seed, **options)
        registry.push(folder, f"{NAMESPACE}/{name}")
        folders[name] = str(folder)
    folder = work / "modules" / "bitfit-norms-0"
    shutil.rmtree(folder, ignore_errors=True)
    make_selective_module(base, folder, seed=800, bitfit=True, layernorm=True)
    registry.push(folder, f"{NAMESPACE}/bitfit-norms-0")
    folders["bitfit-norms-0"] = str(folder)

    _log(f"registering {sizes.zipf_modules} modules for the Zipf run ({sizes.zipf_distinct} distinct contents)")
    zipf_store = LocalStore(work / "zipf-registry", cache_dir=work / "cache-setup")
    distinct = []
    for i in range(sizes.zipf_distinct):
        folder = work / "zipf-modules" / f"content-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        make_peft_module(zipf_base, folder, "lora", seed=1000 + i, r=sizes.zipf_rank)
        distinct.append(folder)
    started = time.perf_counter()
    for i in range(sizes.zipf_modules):
        zipf_store.push(distinct[i % len(distinct)], f"zipf/m-{i:04d}")
    push_s = time.perf_counter() - started
    info = {
        "base": str(base),
        "zipf_base": str(zipf_base),
        "folders": folders,
        "registry": str(work / "registry"),
        "zipf_registry": str(work / "zipf-registry"),
        "zipf_push_ms": 1000 * push_s / sizes.zipf_modules,
    }
    marker.write_text(json.dumps(info))
    return info


def spawn(work: Path, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one part in its own process; returns what the worker wrote."""
    spec = {**spec, "kind": kind, "work": str(work), "result": str(work / f"{kind}.result.json")}
    spec_path = work / f"{kind}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{kind}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    _log(f"{kind} ...")
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_worker", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # progress to stderr as it comes, everything to the log
            log.write(line)
            if line.startswith("  round"):
                print(line.rstrip(), file=sys.stderr, flush=True)
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}: worker exited with {proc.returncode}; log {log_path}:\n{log_path.read_text()[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


# --- report ----------------------------------------------------------------------------------------------


def _verdict(op: str, target: float, value: float) -> bool:
    return {">=": value >= target, "<=": value <= target, "<": value < target, ">": value > target}[op]


def ratio_entry(name: str, value: float) -> dict[str, Any]:
    op, target = TARGETS[name]
    return {"value": round(value, 4), "target": f"{op} {target}", "pass": _verdict(op, target, value)}


def summarize(
    sizes: Sizes, quantization: str, info: dict[str, Any], thr: dict[str, Any], cold: dict[str, Any], zipf: dict[str, Any]
) -> dict[str, Any]:
    tps = {name: side["decode_tps"] for name, side in thr["sides"].items()}
    p25 = {name: side["p25_step_tps"] for name, side in thr["sides"].items()}
    ratios = {
        "mixed_vs_single": ratio_entry("mixed_vs_single", tps["tunehub_mixed"] / tps["tunehub_single"]),
        "mixed_vs_peft_adapter_names": ratio_entry(
            "mixed_vs_peft_adapter_names", tps["tunehub_mixed"] / tps["peft_adapter_names"]
        ),
        "mixed_vs_peft_sequential": ratio_entry("mixed_vs_peft_sequential", tps["tunehub_mixed"] / tps["peft_sequential"]),
        "mixed_kinds_vs_single_lora": ratio_entry(
            "mixed_kinds_vs_single_lora", tps["tunehub_mixed_kinds"] / tps["tunehub_single"]
        ),
        "all_kinds_vs_single_lora": ratio_entry(
            "all_kinds_vs_single_lora", tps["tunehub_all_kinds"] / tps["tunehub_single_all_kinds_rows"]
        ),
        "composed_vs_single": ratio_entry("composed_vs_single", tps["tunehub_composed"] / tps["tunehub_mixed"]),
        "cold_load_vs_safetensors": ratio_entry(
            "cold_load_vs_safetensors", cold["pool_median_ms"] / cold["safetensors_median_ms"]
        ),
        "cold_load_signed_vs_unsigned": ratio_entry(
            "cold_load_signed_vs_unsigned", cold["signed_pool_median_ms"] / cold["pool_median_ms"]
        ),
    }
    growth = zipf["rss_growth_after_warmup"]
    op, target = FIGURE_TARGETS["rss_growth_after_warmup"]
    figures: dict[str, Any] = {
        "pool_hit_rate": round(zipf["hit_rate"], 4),
        "rss_growth_after_warmup": round(growth, 5),
        "rss_growth_after_warmup_target": f"{op} {target}",
        "rss_growth_after_warmup_pass": _verdict(op, target, growth),
        "sizes": sizes.name,
        "model": sizes.preset,
        "model_biases": "every linear layer of the blocks (BitFit trains them)",
        "quantization": quantization,
        "batch": sizes.batch,
        "prompt_tokens": sizes.prompt_tokens,
        "new_tokens": sizes.new_tokens,
        "lora_rank": sizes.lora_rank,
        "timed": "decode phase: first generated token -> last, rows x (new_tokens - 1) tokens; median of "
        f"{sizes.rounds} interleaved rounds after a warm-up round",
        "decode_tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "p25_step_tokens_per_s": {k: round(v, 2) for k, v in p25.items()},
        "ratios_from_p25_steps": {
            "mixed_vs_single": round(p25["tunehub_mixed"] / p25["tunehub_single"], 4),
            "mixed_vs_peft_adapter_names": round(p25["tunehub_mixed"] / p25["peft_adapter_names"], 4),
            "mixed_vs_peft_sequential": round(p25["tunehub_mixed"] / p25["peft_sequential"], 4),
            "mixed_kinds_vs_single_lora": round(p25["tunehub_mixed_kinds"] / p25["tunehub_single"], 4),
            "all_kinds_vs_single_lora": round(p25["tunehub_all_kinds"] / p25["tunehub_single_all_kinds_rows"], 4),
            "composed_vs_single": round(p25["tunehub_composed"] / p25["tunehub_mixed"], 4),
        },
        "prefill_plus_decode_tokens_per_s": {k: round(s["total_tps"], 2) for k, s in thr["sides"].items()},
        "decode_tokens_per_s_runs": {k: s["decode_tps_runs"] for k, s in thr["sides"].items()},
        "max_others_cpu_share_in_timed_runs": {k: round(s["max_disturbed"], 3) for k, s in thr["sides"].items()},
        "same_greedy_tokens_share": thr["same_tokens"],
        "kinds_batch_rows": list(KIND_ROWS),
        "all_kinds_batch_rows": list(ALL_KIND_ROWS),
        "composed_batch_rows": list(COMPOSED_ROWS),
        "torch_threads": thr["torch_threads"],
        "tunehub_base_linear": thr["tunehub_base_linear"],
        "split_batches_retried": thr["split_batches_retried"],
        "gate_waited_s": thr["gate_waited_s"],
        "disturbed_runs_repeated": thr["disturbed_runs_repeated"],
        "cold": {k: v for k, v in cold.items() if k != "profile"},
        "zipf": {
            **{k: v for k, v in zipf.items() if k != "rss_mb"},
            "rss_mb_by_request": zipf["rss_mb"],
            "push_ms_per_module": round(info["zipf_push_ms"], 2),
        },
        "process_seconds": {
            "throughput": thr["process_seconds"],
            "cold": cold["process_seconds"],
            "zipf": zipf["process_seconds"],
        },
    }
    return {"benchmark": BENCHMARK, "ratios": ratios, "figures": figures}


def print_report(report: dict[str, Any], profiles: dict[str, str] | None, cold_profile: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    fig = report["figures"]
    table = Table(
        title=f"engine throughput ({fig['sizes']} run: {fig['model']}, {fig['quantization']}, batch {fig['batch']},"
        f" {fig['prompt_tokens']}+{fig['new_tokens']} tokens, greedy)"
    )
    for col in ("side", "rows", "decode tok/s", "prefill+decode tok/s", "runs (decode tok/s)", "p25-step tok/s"):
        table.add_column(col)
    rows = {
        "tunehub_single": "8 rows, one LoRA",
        "tunehub_mixed": "8 rows, 8 LoRAs",
        "tunehub_mixed_kinds": "LoRA+DoRA+IA3+prompt+prefix",
        "tunehub_all_kinds": "one of each: LoRA DoRA AdaLoRA IA3 bottleneck prompt P-tuning prefix BitFit+norms",
        "tunehub_single_all_kinds_rows": f"{len(ALL_KIND_ROWS)} rows, one LoRA",
        "tunehub_composed": "8 rows, each two modules at once (LoRA + another kind)",
        "peft_single": "one adapter, batch 8",
        "peft_adapter_names": "adapter_names, 8 adapters",
        "peft_sequential": "set_adapter, 8 x batch 1",
    }
    for key, label in rows.items():
        table.add_row(
            key,
            label,
            f"{fig['decode_tokens_per_s'][key]:.1f}",
            f"{fig['prefill_plus_decode_tokens_per_s'][key]:.1f}",
            ", ".join(f"{v:.1f}" for v in fig["decode_tokens_per_s_runs"][key]),
            f"{fig['p25_step_tokens_per_s'][key]:.1f}",
        )
    console.print(table)

    cold, zipf = fig["cold"], fig["zipf"]
    other = Table(title="cold activation and pool")
    for col in ("measure", "value"):
        other.add_column(col)
    other.add_row("cold pool.acquire, median", f"{cold['pool_median_ms']:.2f} ms ({cold['weights_mb']:.1f} MB weights)")
    other.add_row(
        "cold pool.acquire, signed (policy requires a trusted signature), median", f"{cold['signed_pool_median_ms']:.2f} ms"
    )
    other.add_row("bare safetensors load_file, median", f"{cold['safetensors_median_ms']:.2f} ms")
    other.add_row(
        "reference: read once + sha256 + load(bytes)",
        f"{cold['one_pass_read_hash_load_median_ms']:.2f} ms"
        f" (x{cold['one_pass_read_hash_load_median_ms'] / cold['safetensors_median_ms']:.2f} of load_file)",
    )
    other.add_row("acquire steps, median", ", ".join(f"{k} {v:.2f} ms" for k, v in cold["breakdown_median_ms"].items()))
    other.add_row(
        f"Zipf pool ({zipf['preset']}, {zipf['modules']} modules, budget {zipf['budget_modules']})",
        f"hit rate {zipf['hit_rate']:.3f} (after warm-up {zipf['hit_rate_after_warmup']:.3f};"
        f" static top-{zipf['budget_modules']} would be {zipf['ideal_static_top_hit_rate']:.3f})",
    )
    other.add_row(
        "acquire+release latency", f"hit {zipf['hit_us_median']:.0f} us, miss {zipf['miss_ms_median']:.2f} ms (medians)"
    )
    other.add_row(
        "RSS after warm-up -> end",
        f"{zipf['rss_mb_by_request'][1][1]:.1f} -> {zipf['rss_mb_by_request'][-1][1]:.1f} MB"
        f" ({zipf['rss_growth_after_warmup_mb']:+.2f} MB)",
    )
    console.print(other)

    verdicts = Table(title="verdict (decode-phase medians; last column: the same ratio from the quickest quarter of steps)")
    for col in ("ratio / figure", "value", "target", "result", "p25-step ratio"):
        verdicts.add_column(col)
    robust = fig["ratios_from_p25_steps"]
    for name, entry in report["ratios"].items():
        verdicts.add_row(
            name,
            f"{entry['value']:.3f}",
            entry["target"],
            "[green]PASS" if entry["pass"] else "[red]FAIL",
            f"{robust[name]:.3f}" if name in robust else "",
        )
    verdicts.add_row(
        "rss_growth_after_warmup",
        f"{fig['rss_growth_after_warmup']:.4f}",
        fig["rss_growth_after_warmup_target"],
        "[green]PASS" if fig["rss_growth_after_warmup_pass"] else "[red]FAIL",
    )
    verdicts.add_row("pool_hit_rate", f"{fig['pool_hit_rate']:.3f}", "(figure)", "")
    console.print(verdicts)
    shares = fig["max_others_cpu_share_in_timed_runs"]
    if max(shares.values()) > 0.10:
        console.print(
            f"note: other processes used up to {max(shares.values()):.0%} of the CPUs during the timed runs;"
            " batched sides suffer more from that than batch-1 ones"
            + ("" if fig["torch_threads"] == 1 else " (with 2+ torch threads; --threads 1 is steadier)")
        )
    if fig["sizes"] == "quick":
        console.print(
            f"note: --quick runs the '{fig['model']}' preset with {fig['new_tokens']} new tokens; the targets are set for bench-100m"
        )
    print_profiles(profiles, cold_profile)


def print_profiles(profiles: dict[str, str] | None, cold_profile: str | None) -> None:
    from rich.console import Console

    console = Console(width=160)
    for name, text in (profiles or {}).items():
        console.rule(f"profile: {name}")
        console.print(text, markup=False, highlight=False)
    if cold_profile:
        console.rule("profile: cold pool.acquire")
        console.print(cold_profile, markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes ('small' preset, 16+16 tokens), about a minute")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none", help="the base for parts 1-3 (default: fp32)")
    parser.add_argument("--profile", action="store_true", help="also print per-decode-step and cold-load profiles")
    parser.add_argument("--profile-only", action="store_true", help="only the profiles (no timed runs, no verdict)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in the workers (default: torch's choice)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (bases, modules, registries are reused)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        run_worker(args._worker)
        return 0
    sizes = QUICK if args.quick else FULL
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunehub-bench-engine-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = setup(work, sizes)
        common = {
            "sizes": asdict(sizes),
            "registry": info["registry"],
            "folders": info["folders"],
            "base": info["base"],
            "quantization": args.quantization,
            "profile": args.profile or args.profile_only,
            "profile_only": args.profile_only,
            "threads": args.threads,
        }
        if args.profile_only:
            thr = spawn(work, "throughput", common)
            cold = spawn(work, "cold", common)
            print_profiles(thr.get("profile"), cold.get("profile"))
            print(json.dumps({"benchmark": BENCHMARK, "ratios": {}, "figures": {"profile_only": True}}))
            return 0
        thr = spawn(work, "throughput", common)
        cold = spawn(work, "cold", common)
        zipf = spawn(work, "zipf", {**common, "registry": info["zipf_registry"], "base": info["zipf_base"]})
        report = summarize(sizes, args.quantization, info, thr, cold, zipf)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report, thr.get("profile"), cold.get("profile"))
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
