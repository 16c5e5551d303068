#!/usr/bin/env python3
"""Training benchmark: QLoRA memory, trainer throughput and packing, as side-by-side ratios.

    python benchmarks/train_memory.py            # full run (bench-300m for memory), ~15-20 min on 2 CPU cores
    python benchmarks/train_memory.py --quick    # 'small' preset everywhere, a few minutes at most
    python benchmarks/train_memory.py --no-gradient-checkpointing   # memory runs without checkpointing

Every measured run is its own process (this script re-run with a hidden ``--_worker`` flag), so
that no run inherits another's allocator state, page cache mappings or imported kernels:

1. memory: the same LoRA run (rank 16, all-linear, clm, 2 x 256 tokens a step, gradient
   checkpointing on as QLoRA's recipe has it and the lean CPU allocator, in all three runs alike)
   through tunehub's ``train()`` on an nf4 base (QLoRA; tunehub's defaults for nf4), a bf16 base
   and an fp32 base, all loaded from one bf16 checkpoint of bench-300m;
2. throughput: tunehub's ``train()`` against a plain ``transformers.Trainer`` + PEFT script
   written below, on the identical model (bench-100m; 'small' as an extra figure), LoRA config,
   data, order, batch, steps and optimizer; the per-step losses come out equal;
3. packing: SFT with ``data.packing: true`` against dynamic padding (same 'small' model, batch
   and examples), on prompt/completion data whose tokenized lengths are uniform in [16, 512].

The ratios are the verdict; absolute figures go in the JSON's ``figures``. The last stdout line
is one line of JSON: ``{"benchmark": "train_memory", "ratios": {...}, "figures": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHMARK = "train_memory"
MIB = 1024 * 1024
TILE_BYTES = 4 * MIB  # largest transient fp32 operand tile of bf16_matmul_mode

#: ratio name -> (comparison, target)
TARGETS: dict[str, tuple[str, float]] = {
    "qlora_vs_fp32_memory": ("<=", 0.45),
    "qlora_vs_bf16_memory": ("<=", 0.70),
    "tunehub_vs_trainer_tokens": (">=", 0.95),
    "packing_vs_padding_tokens": (">=", 1.5),
}


@dataclass(frozen=True)
class Sizes:
    name: str
    memory_preset: str
    memory_steps: int
    memory_batch: int
    memory_seq: int
    speed_preset: str
    speed_steps: int
    speed_batch: int
    speed_seq: int
    speed_rounds: int  # interleaved repeats; the fastest of each run is kept
    small_speed_steps: int | None  # also time the 'small' preset (a figure: loop overhead dominates)
    pack_preset: str
    pack_examples: int
    pack_batch: int
    pack_min_len: int
    pack_max_len: int


# Step counts stay low. Memory: Adam's state appears at the end of step 1, so the steady peak
# (activations + gradients + optimizer state) shows from step 2 on; a third step shows whether it
# still creeps (allocator fragmentation). Per-step peaks are reported. Throughput leaves step 1
# out of the timing (one-time kernel and optimizer setup).
FULL = Sizes(
    name="full",
    memory_preset="bench-300m",
    memory_steps=3,
    memory_batch=2,
    memory_seq=256,
    speed_preset="bench-100m",
    speed_steps=10,
    speed_batch=2,
    speed_seq=256,
    speed_rounds=2,
    small_speed_steps=12,
    pack_preset="small",
    pack_examples=192,
    pack_batch=8,
    pack_min_len=16,
    pack_max_len=512,
)
QUICK = Sizes(
    name="quick",
    memory_preset="small",
    memory_steps=2,
    memory_batch=2,
    memory_seq=256,
    speed_preset="small",
    speed_steps=8,
    speed_batch=2,
    speed_seq=256,
    speed_rounds=1,
    small_speed_steps=None,
    pack_preset="small",
    pack_examples=48,
    pack_batch=8,
    pack_min_len=16,
    pack_max_len=512,
)

LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


# --- memory probe (runs inside the workers) --------------------------------------------------------
#
# What is counted: resident memory (RSS) of the whole process, anonymous AND file-backed pages,
# minus the RSS held right after the imports (baseline). File-backed pages must count: when the
# load dtype equals the checkpoint dtype, transformers 5 maps the safetensors file and the model's
# parameters ARE those mapped pages (zero copy; checked for the bf16 run below), so anonymous-only
# accounting would make the bf16 base look almost free. The flip side is that a conversion load
# (bf16 file -> fp32 or nf4 weights) transiently has mapped checkpoint pages resident next to the
# converted copy. The checkpoint is therefore saved in bf16, the format bases ship in: the bf16 run
# maps it, the fp32 run upcasts it, the nf4 run quantizes it, and the transient pages are at most
# one bf16 copy. Peaks are reported per phase (load = train() start to on_train_begin, train =
# on_train_begin to on_train_end), and the headline is the larger one. The module-writing after
# training (matplotlib, safetensors export) is outside both windows.
#
# How the peak is read: the kernel's high-water mark (VmHWM, the same counter ru_maxrss reports)
# is exact, unlike a sampler that can miss a short spike; writing "5" to /proc/self/clear_refs
# resets it, which gives an exact peak per phase. A 5 ms sampler thread reading /proc/self/statm
# adds the split into anonymous and file-backed pages at the peak (informative only).


def _statm_bytes() -> tuple[int, int]:
    """(resident, file-backed + shmem resident) of this process, in bytes."""
    fields = Path("/proc/self/statm").read_text().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, int(fields[2]) * page


def _hwm_bytes() -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match:
        return int(match.group(1)) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        return True
    except OSError:
        return False


class MemoryProbe:
    """Exact per-phase RSS peaks (kernel high-water mark) plus a sampled anon/file split."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.phase = "load"
        self.baseline = 0
        self.baseline_anon = 0
        self.peaks: dict[str, int] = {}
        self.step_peaks: list[int] = []
        self.sampled: dict[str, dict[str, int]] = {}
        self.hwm_resettable = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        gc.collect()
        rss, shared = _statm_bytes()
        self.baseline, self.baseline_anon = rss, rss - shared
        self.hwm_resettable = _reset_hwm()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, shared = _statm_bytes()
            best = self.sampled.setdefault(self.phase, {"rss": 0, "anon": 0, "file": 0})
            if rss > best["rss"]:
                best.update(rss=rss, anon=rss - shared, file=shared)
            self._stop.wait(self.interval_s)

    def end_step(self) -> None:
        """Record the peak since the last step (or the start of training) and restart the mark."""
        self.step_peaks.append(_hwm_bytes())
        _reset_hwm()

    def end_phase(self, next_phase: str | None) -> None:
        """Close the current phase (its exact peak is the high-water mark since the last reset)."""
        self.peaks[self.phase] = max([_hwm_bytes(), *(self.step_peaks if self.phase == "train" else [])])
        if next_phase is None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            return
        _reset_hwm()  # if it cannot be reset, the train peak spans both phases: still an exact run peak
        self.phase = next_phase

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "baseline_rss_mb": self.baseline / MIB,
            "hwm_resettable": self.hwm_resettable,
        }
        for phase, peak in self.peaks.items():
            out[f"{phase}_peak_mb"] = (peak - self.baseline) / MIB
            sample = self.sampled.get(phase)
            if sample:
                out[f"{phase}_sampled_anon_mb"] = (sample["anon"] - self.baseline_anon) / MIB
                out[f"{phase}_sampled_file_mb"] = sample["file"] / MIB
        out["step_peaks_mb"] = [round((p - self.baseline) / MIB, 1) for p in self.step_peaks]
        out["peak_mb"] = max(out.get("load_peak_mb", 0.0), out.get("train_peak_mb", 0.0))
        return out


# --- bf16 matmuls on CPUs without native bf16 (inside the memory workers) -------------------------


def bf16_matmul_mode() -> Any:
    """A dispatch mode that runs CPU bf16 ``mm`` as fp32 GEMMs on bounded tiles.

    Without AVX512-BF16/AMX, PyTorch's CPU bf16 GEMM is 2-4x slower than fp32 when one operand is
    column-major and ~20x slower when both are row-major (the ``grad_output @ weight`` of every
    Linear backward, and bitsandbytes' 4-bit backward): one nf4 step of the 300M model did not
    finish in 6 minutes. bf16 GEMMs accumulate in fp32 and round the result to bf16, so computing
    each output tile as an fp32 product of upcast operand tiles gives the same product; the
    autograd graph is unchanged (the mode sits below autograd), and the only memory it adds is
    the transient fp32 tiles, capped at ``TILE_BYTES`` each (a few MB next to peaks of GB).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    mm = torch.ops.aten.mm.default
    tile_elems = TILE_BYTES // 4

    class Bf16Matmul(TorchDispatchMode):
        rerouted = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if func is mm and not kwargs and len(args) == 2:
                a, b = args
                if a.dtype == b.dtype == torch.bfloat16 and a.device.type == "cpu" and a.dim() == b.dim() == 2:
                    Bf16Matmul.rerouted += 1
                    (m, k), n = a.shape, b.shape[1]
                    out = torch.empty((m, n), dtype=torch.bfloat16)
                    cols = max(1, min(n, tile_elems // max(k, 1)))
                    rows = max(1, min(m, tile_elems // max(k, 1)))
                    for j in range(0, n, cols):
                        b_tile = b[:, j : j + cols].float()
                        for i in range(0, m, rows):
                            out[i : i + rows, j : j + cols] = a[i : i + rows].float() @ b_tile
                    return out
            return func(*args, **(kwargs or {}))

    return Bf16Matmul()


# --- step clock (a Trainer callback, inside the workers) -----------------------------------------


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, all threads)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    times = os.times()
    return (sum(fields[:8]) - idle) / ticks, times.user + times.system


@dataclass
class StepClock:
    """Timestamps of on_step_end (after every other callback's), tokens seen and losses.

    Each entry also carries the machine's and this process's CPU seconds, so that the report can
    say how much CPU other processes took while a run was timed (a busy neighbour on 2 cores
    slows a run several-fold and would make any ratio meaningless)."""

    # (time, step, tokens seen, machine busy CPU s, own CPU s)
    steps: list[tuple[float, int, float, float, float]] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    probe: MemoryProbe | None = None
    params_in_mmap: float | None = None
    param_bytes: int | None = None


def make_clock_callback(clock: StepClock, tokens_per_step: int | None = None) -> Any:
    """``tokens_per_step`` for runs whose Trainer does not count tokens (the plain baseline)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if clock.probe is not None:
                clock.probe.end_phase("train")
                clock.params_in_mmap = _share_of_params_in_mapped_files(model)
                # storage bytes (4-bit weights are packed two to a byte): what the weights hold
                clock.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            seen = state.global_step * tokens_per_step if tokens_per_step else state.num_input_tokens_seen
            clock.steps.append((time.perf_counter(), state.global_step, float(seen), *_cpu_seconds()))
            if clock.probe is not None:
                clock.probe.end_step()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                clock.losses[state.global_step] = float(logs["loss"])

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if clock.probe is not None:
                clock.probe.end_phase(None)

    return Clock()


def _share_of_params_in_mapped_files(model: Any) -> float:
    """Share of parameter elements whose storage lies in a file mapping (zero-copy safetensors)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            spans.append((start, end))
    total = mapped = 0
    for param in model.parameters():
        total += param.numel()
        if any(start <= param.data_ptr() < end for start, end in spans):
            mapped += param.numel()
    return mapped / total if total else 0.0


def steady_rate(steps: list[tuple[float, ...]]) -> dict[str, float]:
    """Tokens/s from the end of step 1 to the end of the last step, plus what disturbed it.

    Step 1 is left out of both sides alike: it carries one-time costs (optimizer state creation,
    first-use kernel setup) that say nothing about the loop. Everything between two on_step_end
    calls counts: data loading, forward, backward, optimizer, logging, checkpoint saves.
    """
    if len(steps) < 2:
        raise RuntimeError("need at least 2 training steps to time the loop")
    (t0, s0, k0, busy0, own0), (t1, s1, k1, busy1, own1) = steps[0][:5], steps[-1][:5]
    seconds = t1 - t0
    durations = sorted(b[0] - a[0] for a, b in zip(steps, steps[1:]))
    others = max(0.0, (busy1 - busy0) - (own1 - own0))
    return {
        "tokens_per_s": round((k1 - k0) / seconds, 2),
        "timed_steps": int(s1 - s0),
        "tokens_timed": k1 - k0,
        "seconds_per_step": round(seconds / (s1 - s0), 4),
        "median_seconds_per_step": round(durations[len(durations) // 2], 4),
        "other_processes_cpu_share": round(others / (seconds * (os.cpu_count() or 1)), 3),
        # less sensitive to neighbours than wall time (but OpenMP spin-waits still inflate it)
        "tokens_per_cpu_s": round((k1 - k0) / max(own1 - own0, 1e-9), 2),
    }


# --- workers ---------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _import_training_stack() -> None:
    """Everything train() imports lazily, so that the memory baseline is taken after all imports
    (bitsandbytes too, in every run: its import must not count against QLoRA alone)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import peft.tuners.lora.bnb  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer  # noqa: F401

    import tunehub.trainer.data  # noqa: F401
    import tunehub.trainer.export  # noqa: F401
    import tunehub.trainer.run  # noqa: F401
    from tunehub.trainer.methods import discover

    discover()


def worker_tunehub(spec: dict[str, Any]) -> dict[str, Any]:
    _import_training_stack()
    _quiet_transformers()
    from tunehub.devices import cpu_has_fast_bf16
    from tunehub.trainer.config import validate_run_config
    from tunehub.trainer.run import train

    config = validate_run_config(spec["config"])
    clock = StepClock(probe=MemoryProbe() if spec.get("memory") else None)
    # only where it is needed, and in all three memory runs alike (it passes fp32 through)
    bf16_mode = bf16_matmul_mode() if spec.get("memory") and not cpu_has_fast_bf16() else None
    if clock.probe is not None:
        clock.probe.start()
    with bf16_mode if bf16_mode is not None else contextlib.nullcontext():
        result = train(config, extra_callbacks=[make_clock_callback(clock)])
    out: dict[str, Any] = {
        "metrics": result.metrics,
        "losses": clock.losses,
        "steps": [list(s) for s in clock.steps],
        "params_in_mmap": clock.params_in_mmap,
        "param_bytes": clock.param_bytes,
    }
    if clock.probe is not None:
        out["memory"] = clock.probe.report()
    out["bf16_mm_rerouted"] = type(bf16_mode).rerouted if bf16_mode is not None else None
    return out


def worker_plain_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline: a plain transformers Trainer + PEFT script on the same config dict.

    Written the way one would by hand (tokenize, cut 256-token blocks, LoRA, Trainer), reading
    every hyperparameter from the tunehub config so that the two runs cannot drift apart."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    _quiet_transformers()
    raw = spec["config"]
    base, data, lora, tr = raw["base"]["path"], raw["data"], raw["method"], raw["training"]
    seed = tr.get("seed", 0)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = [Path(p).read_text(encoding="utf-8") for p in data["train"]]
    block = data["max_length"]
    stream: list[int] = []
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        stream += ([tokenizer.eos_token_id] if i else []) + list(ids)  # eos between documents
    blocks = [{"input_ids": stream[i : i + block]} for i in range(0, len(stream), block)]
    blocks = [b for b in blocks if len(b["input_ids"]) >= 2]
    if any(len(b["input_ids"]) != block for b in blocks):
        raise RuntimeError("the benchmark's text must cut into full blocks (tokens are counted per step)")

    # the identity check is not timed: the same token ids as tunehub's own clm tokenization
    from tunehub.trainer.data import clm_blocks

    identical = [b["input_ids"] for b in blocks] == [b["input_ids"] for b in clm_blocks(texts, tokenizer, block)]

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, raw["base"].get("dtype", "float32")))
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(Path(raw["output"]["dir"]) / "checkpoints"),
        max_steps=tr["max_steps"],
        per_device_train_batch_size=tr["batch_size"],
        learning_rate=tr["learning_rate"],
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=tr["logging_steps"],
        save_strategy="steps",
        save_steps=tr.get("save_steps") or 500,  # Trainer's default unless the config sets one
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=True,  # PrinterCallback prints the log lines, as tunehub's progress does
        remove_unused_columns=False,
        use_cpu=True,
    )
    clock = StepClock()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=blocks,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[make_clock_callback(clock, tokens_per_step=tr["batch_size"] * block)],
    )
    output = trainer.train()
    return {
        "metrics": {"train_seconds": float(output.metrics["train_runtime"]), "train_loss": float(output.training_loss)},
        "losses": clock.losses,
        "steps": [list(s) for s in clock.steps],
        "data_identical": identical,
    }


def run_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec["kind"] == "tunehub":
        out = worker_tunehub(spec)
    else:
        out = worker_plain_trainer(spec)
    Path(spec["result"]).write_text(json.dumps(out, default=float))


# --- data generation (parent) --------------------------------------------------------------------


def _tokenizer_for(base: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(base / "tokenizer.json"))


def _count(tok: Any, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def _pad_words(tok: Any, text: str, target: int) -> str:
    """``text`` plus " the" repeats until it tokenizes to exactly ``target`` tokens (each " the"
    is one token of these byte-level BPE tokenizers, so the count moves one at a time)."""
    have = _count(tok, text)
    text += " the" * (target - have)
    if _count(tok, text) != target:
        raise RuntimeError(f"could not size a text to {target} tokens")
    return text


def write_clm_text(base: Path, path: Path, blocks: int, block_size: int, seed: int = 0) -> Path:
    """Generated English-like text that tokenizes to exactly ``blocks * block_size`` tokens, so that
    every training block is full and tokens per step are exact on both sides of a comparison."""
    from tunehub.trainer.base import synthetic_corpus

    tok = _tokenizer_for(base)
    target = blocks * block_size
    lines: list[str] = []
    count = 0
    corpus = iter(synthetic_corpus(blocks * block_size // 8 + 100, seed=seed))
    while count < target - 64:
        lines.append(next(corpus))
        count = _count(tok, "\n".join(lines))
    while count > target:
        lines.pop()
        count = _count(tok, "\n".join(lines))
    path.write_text(_pad_words(tok, "\n".join(lines), target), encoding="utf-8")
    return path


def _text_of_length(tok: Any, sentences: list[str], rng: random.Random, length: int) -> str:
    text = ""
    while _count(tok, text) < length:
        text = (text + " " + rng.choice(sentences)).strip()
    ids = tok.encode(text, add_special_tokens=False).ids
    for cut in range(length, 0, -1):
        trimmed = tok.decode(ids[:cut])
        if _count(tok, trimmed) <= length:
            return _pad_words(tok, trimmed, length)
    return _pad_words(tok, "", length)


def write_sft_data(base: Path, path: Path, n: int, low: int, high: int, seed: int = 0) -> dict[str, float]:
    """Prompt/completion JSONL whose tunehub tokenization ([bos] prompt completion [eos]) has a
    length drawn uniformly from [low, high]; about a quarter of each example is the prompt."""
    from tunehub.trainer.base import synthetic_corpus

    tok = _tokenizer_for(base)
    rng = random.Random(seed)
    sentences = synthetic_corpus(2000, seed=seed + 1)
    lengths = []
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            total = rng.randint(low, high)
            body = total - 2  # bos and eos
            prompt_len = max(1, body // 4)
            prompt = _text_of_length(tok, sentences, rng, prompt_len)
            completion = _text_of_length(tok, sentences, rng, body - prompt_len)
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            lengths.append(total)
    return {"examples": n, "min_len": min(lengths), "mean_len": sum(lengths) / n, "max_len": max(lengths)}


# --- runs (parent) ---------------------------------------------------------------------------------


def tunehub_config(
    base: Path,
    out: Path,
    *,
    objective: str,
    data: Path,
    max_length: int,
    batch: int,
    steps: int | None,
    quantization: str = "none",
    dtype: str = "float32",
    packing: bool = False,
    save_steps: int | None = None,
    gradient_checkpointing: bool = False,
    cpu_allocator: str = "default",
) -> dict[str, Any]:
    training: dict[str, Any] = {
        "batch_size": batch,
        "learning_rate": 2e-4,
        "optimizer": "adamw_torch",  # what "auto" picks on CPU; named so the baseline matches it
        "logging_steps": 1,
        "seed": 0,
        "gradient_checkpointing": gradient_checkpointing,
        "cpu_allocator": cpu_allocator,
    }
    if steps:
        training["max_steps"] = steps
    if save_steps:
        training["save_steps"] = save_steps
    return {
        "base": {"path": str(base), "quantization": quantization, "dtype": dtype},
        "method": dict(LORA),
        "objective": {"name": objective},
        "data": {"train": [str(data)], "eval_fraction": 0.0, "max_length": max_length, "packing": packing},
        "training": training,
        "output": {"dir": str(out)},
    }


def spawn(work: Path, label: str, kind: str, config: dict[str, Any], *, memory: bool = False) -> dict[str, Any]:
    """Run one measured run in its own process; returns what the worker wrote."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    spec = {"kind": kind, "config": config, "memory": memory, "result": str(work / f"{slug}.result.json")}
    spec_path = work / f"{slug}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{slug}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{label}: worker exited with {proc.returncode}; log {log_path}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["process_seconds"] = time.perf_counter() - started
    return result


class QuietGate:
    """Keeps timed runs away from busy neighbours, within a total waiting budget.

    On a 2-core machine another process's load slows a run several-fold (the two OpenMP threads
    wait on each other whenever one is descheduled), so a timed run first waits until other
    processes leave the CPUs alone, and is repeated when they disturbed it anyway."""

    def __init__(self, budget_s: float, threshold: float = 0.1) -> None:
        self.budget_s = budget_s
        self.threshold = threshold

    @staticmethod
    def others_share(window_s: float = 2.0) -> float:
        busy0, own0 = _cpu_seconds()
        time.sleep(window_s)
        busy1, own1 = _cpu_seconds()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (window_s * (os.cpu_count() or 1))

    def wait(self) -> None:
        while self.budget_s > 0:
            started = time.monotonic()
            share = self.others_share()
            if share < self.threshold:
                return
            print(f"  waiting: other processes use {share:.0%} of the CPUs", file=sys.stderr, flush=True)
            time.sleep(3)
            self.budget_s -= time.monotonic() - started


def spawn_timed(work: Path, gate: QuietGate, label: str, kind: str, config: dict[str, Any], attempts: int = 3) -> dict[str, Any]:
    """``spawn`` for a timed run: after a quiet wait, and again (at most ``attempts`` in all) when
    other processes took more than the gate's threshold of the CPUs during the timed steps; the
    least disturbed attempt is kept."""
    best: dict[str, Any] | None = None
    for attempt in range(1, attempts + 1):
        gate.wait()
        result = spawn(work, label if attempt == 1 else f"{label} (attempt {attempt})", kind, config)
        result["rate"] = steady_rate_from(result)
        result["attempts"] = attempt
        disturbed = result["rate"]["other_processes_cpu_share"]
        if best is None or disturbed < best["rate"]["other_processes_cpu_share"]:
            best = result
        if disturbed <= gate.threshold or gate.budget_s <= 0:
            break
        print(f"  other processes took {disturbed:.0%} of the CPUs during the run: repeating", file=sys.stderr)
    assert best is not None
    return best


def model_params(base: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return sum(p.numel() for p in model.parameters())


def bench_memory(work: Path, sizes: Sizes, gradient_checkpointing: bool) -> dict[str, Any]:
    from tunehub.trainer.base import build_base

    base = work / f"base-{sizes.memory_preset}-bf16"
    if not base.exists():
        build_base(base, sizes.memory_preset, dtype="bfloat16")
    data = write_clm_text(base, work / "memory.txt", blocks=64, block_size=sizes.memory_seq)
    runs = {}
    for label, quantization, dtype in (("nf4", "nf4", "float32"), ("bf16", "none", "bfloat16"), ("fp32", "none", "float32")):
        config = tunehub_config(
            base,
            work / f"out-mem-{label}",
            objective="clm",
            data=data,
            max_length=sizes.memory_seq,
            batch=sizes.memory_batch,
            steps=sizes.memory_steps,
            quantization=quantization,
            dtype=dtype,
            save_steps=10**6,  # only the final checkpoint, after on_train_end: not in the window
            gradient_checkpointing=gradient_checkpointing,
            cpu_allocator="lean",  # the same allocator policy in all three runs (nf4's default)
        )
        runs[label] = spawn(work, f"memory {label}", "tunehub", config, memory=True)
    return {"preset": sizes.memory_preset, "params": model_params(base), "runs": runs}


def bench_speed(work: Path, gate: QuietGate, preset: str, sizes: Sizes, steps: int, rounds: int) -> dict[str, Any]:
    """tunehub's train() against the plain Trainer + PEFT script, ``rounds`` times interleaved.

    "tunehub" is train() as a user gets it; "tunehub_no_ckpt" sets training.save_steps past the
    end, so that it checkpoints as rarely as the plain script (Trainer's default: every 500 steps):
    the gap between the two is the cost of tunehub's default checkpoint cadence. Each run keeps its
    fastest round: neighbours and noise only ever slow a run down."""
    from tunehub.trainer.base import build_base

    base = work / f"base-{preset}-fp32"
    if not base.exists():
        build_base(base, preset)
    data = write_clm_text(base, work / f"speed-{preset}.txt", blocks=64, block_size=sizes.speed_seq)
    variants = (("tunehub", "tunehub", None), ("trainer", "trainer", None), ("tunehub_no_ckpt", "tunehub", 10**6))
    runs: dict[str, dict[str, Any]] = {}
    every: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for round_ in range(1, rounds + 1):
        for label, kind, save_steps in variants:
            config = tunehub_config(
                base,
                work / f"out-speed-{preset}-{label}",
                objective="clm",
                data=data,
                max_length=sizes.speed_seq,
                batch=sizes.speed_batch,
                steps=steps,
                save_steps=save_steps,
            )
            name = f"throughput {preset} {label}" + (f" round {round_}" if rounds > 1 else "")
            result = spawn_timed(work, gate, name, kind, config)
            every[label].append(result["rate"]["tokens_per_s"])
            if label not in runs or result["rate"]["tokens_per_s"] > runs[label]["rate"]["tokens_per_s"]:
                runs[label] = result
    for label, rates in every.items():
        runs[label]["rate"]["rounds_tokens_per_s"] = rates
    return {"preset": preset, "params": model_params(base), "steps": steps, "runs": runs}


def bench_packing(work: Path, sizes: Sizes, gate: QuietGate) -> dict[str, Any]:
    from tunehub.trainer.base import build_base

    base = work / f"base-{sizes.pack_preset}-fp32"
    if not base.exists():
        build_base(base, sizes.pack_preset)
    data = work / "sft.jsonl"
    stats = write_sft_data(base, data, sizes.pack_examples, sizes.pack_min_len, sizes.pack_max_len)
    runs = {}
    for label, packing in (("packing", True), ("padding", False)):
        config = tunehub_config(
            base,
            work / f"out-pack-{label}",
            objective="sft",
            data=data,
            max_length=sizes.pack_max_len,
            batch=sizes.pack_batch,
            steps=None,
            packing=packing,
            save_steps=10**6,
        )
        runs[label] = spawn_timed(work, gate, f"sft {label}", "tunehub", config)
    return {"preset": sizes.pack_preset, "params": model_params(base), "data": stats, "runs": runs}


# --- report ----------------------------------------------------------------------------------------


def ratio_entry(name: str, value: float) -> dict[str, Any]:
    op, target = TARGETS[name]
    passed = value <= target if op == "<=" else value >= target
    return {"value": round(value, 4), "target": f"{op} {target}", "pass": passed}


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def summarize(
    sizes: Sizes,
    memory: dict[str, Any],
    speed: dict[str, Any],
    small: dict[str, Any] | None,
    packing: dict[str, Any],
    gate: QuietGate,
    gradient_checkpointing: bool,
) -> dict[str, Any]:
    mem = {label: run["memory"] for label, run in memory["runs"].items()}

    def rates_of(part: dict[str, Any]) -> dict[str, Any]:
        return {label: run["rate"] | {"attempts": run["attempts"]} for label, run in part["runs"].items()}

    def rate(rates: dict[str, Any], a: str, b: str) -> float:
        return rates[a]["tokens_per_s"] / rates[b]["tokens_per_s"]

    def speed_figures(part: dict[str, Any]) -> dict[str, Any]:
        rates = rates_of(part)
        losses = {label: run["losses"] for label, run in part["runs"].items()}
        return {
            "model": part["preset"],
            "params": part["params"],
            "batch": f"{sizes.speed_batch}x{sizes.speed_seq}",
            "steps": part["steps"],
            "timed": "on_step_end(1) .. on_step_end(last), wall clock, fastest of the rounds",
            **rates,
            "tunehub_vs_trainer_tokens": round(rate(rates, "tunehub", "trainer"), 4),
            "tunehub_no_ckpt_vs_trainer_tokens": round(rate(rates, "tunehub_no_ckpt", "trainer"), 4),
            "losses_equal": losses["tunehub"] == losses["trainer"] == losses["tunehub_no_ckpt"],
            "data_identical": part["runs"]["trainer"].get("data_identical"),
        }

    speed_fig = speed_figures(speed)
    pack_rates = rates_of(packing)
    ratios = {
        "qlora_vs_fp32_memory": ratio_entry("qlora_vs_fp32_memory", mem["nf4"]["peak_mb"] / mem["fp32"]["peak_mb"]),
        "qlora_vs_bf16_memory": ratio_entry("qlora_vs_bf16_memory", mem["nf4"]["peak_mb"] / mem["bf16"]["peak_mb"]),
        "tunehub_vs_trainer_tokens": ratio_entry("tunehub_vs_trainer_tokens", speed_fig["tunehub_vs_trainer_tokens"]),
        "packing_vs_padding_tokens": ratio_entry("packing_vs_padding_tokens", rate(pack_rates, "packing", "padding")),
    }
    timed = {"throughput": speed_fig, "packing": pack_rates}
    small_fig = speed_figures(small) if small is not None else None
    if small_fig is not None:
        timed["throughput_small"] = small_fig
    disturbed = sorted(
        f"{part}/{label}"
        for part, rates in timed.items()
        for label, r in rates.items()
        if isinstance(r, dict) and "other_processes_cpu_share" in r and r["other_processes_cpu_share"] > gate.threshold
    )
    figures: dict[str, Any] = {
        "sizes": sizes.name,
        "memory": {
            "model": memory["preset"],
            "params": memory["params"],
            "checkpoint_dtype": "bfloat16",
            "batch": f"{sizes.memory_batch}x{sizes.memory_seq}",
            "steps": sizes.memory_steps,
            "objective": "clm",
            "gradient_checkpointing": gradient_checkpointing,
            "counted": "peak process RSS (anon + file-backed) minus RSS after imports, max of load and train phases",
            **{
                label: {k: _round(v) for k, v in m.items()}
                | {
                    "param_mb": round((memory["runs"][label].get("param_bytes") or 0) / MIB, 1),
                    "params_in_mapped_file": memory["runs"][label].get("params_in_mmap"),
                    "bf16_mm_rerouted": memory["runs"][label].get("bf16_mm_rerouted"),
                }
                for label, m in mem.items()
            },
        },
        "throughput": speed_fig,
        "packing": {
            "model": packing["preset"],
            "params": packing["params"],
            "batch": sizes.pack_batch,
            "data": packing["data"],
            "timed": "on_step_end(1) .. on_step_end(last), non-padding tokens, wall clock",
            **pack_rates,
        },
        "disturbed_runs": disturbed,
    }
    if small_fig is not None:
        figures["throughput_small"] = small_fig
    return {"benchmark": BENCHMARK, "ratios": ratios, "figures": figures}


def steady_rate_from(run: dict[str, Any]) -> dict[str, Any]:
    rate = steady_rate([tuple(s) for s in run["steps"]])
    rate["train_runtime_s"] = round(float(run["metrics"].get("train_seconds", 0.0)), 3)
    return rate


def _model_label(section: dict[str, Any]) -> str:
    size = section["params"] / 1e6
    return f"{section['model']} ({size:.0f}M)" if size >= 10 else f"{section['model']} ({size:.1f}M)"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    fig = report["figures"]
    table = Table(title=f"train_memory ({fig['sizes']} run): measurements")
    for col in ("part", "run", "model", "measure", "value", "others' CPU"):
        table.add_column(col)
    mem = fig["memory"]
    checkpointing = "on" if mem["gradient_checkpointing"] else "off"
    for label in ("nf4", "bf16", "fp32"):
        m = mem[label]
        table.add_row(
            "memory",
            f"lora r16 on {label} base",
            _model_label(mem),
            f"peak RSS over baseline: load / train (weights), grad ckpt {checkpointing}",
            f"{m['peak_mb']:.0f} MB: {m['load_peak_mb']:.0f} / {m['train_peak_mb']:.0f} ({m['param_mb']:.0f})",
            "",
        )
    parts = [("throughput", ("tunehub", "trainer", "tunehub_no_ckpt"), "tokens/s")]
    if "throughput_small" in fig:
        parts.append(("throughput_small", ("tunehub", "trainer", "tunehub_no_ckpt"), "tokens/s"))
    parts.append(("packing", ("packing", "padding"), "non-padding tokens/s"))
    for part, names, measure in parts:
        section = fig[part]
        for label in names:
            r = section[label]
            table.add_row(
                part,
                label,
                _model_label(section),
                f"{measure} over {r['timed_steps']} steps",
                f"{r['tokens_per_s']:.1f}",
                f"{r['other_processes_cpu_share']:.0%}",
            )
    console.print(table)

    verdicts = Table(title="ratios (the verdict)")
    for col in ("ratio", "value", "target", "result"):
        verdicts.add_column(col)
    for name, entry in report["ratios"].items():
        verdicts.add_row(name, f"{entry['value']:.3f}", entry["target"], "[green]pass" if entry["pass"] else "[red]FAIL")
    console.print(verdicts)
    for part in ("throughput", "throughput_small"):
        if part in fig:
            thr = fig[part]
            console.print(
                f"{part} ({thr['model']}): tunehub/trainer {thr['tunehub_vs_trainer_tokens']:.3f}, with checkpoints "
                f"as rare as the plain script {thr['tunehub_no_ckpt_vs_trainer_tokens']:.3f}; per-step losses equal: "
                f"{thr['losses_equal']}; token ids identical: {thr['data_identical']}"
            )
    if fig["disturbed_runs"]:
        console.print(f"[yellow]warning: other processes loaded the CPUs during {', '.join(fig['disturbed_runs'])}")
    if fig["sizes"] == "quick":
        console.print(f"note: --quick measures memory on the '{mem['model']}' preset, not a 300M model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (memory on the 'small' preset)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (bases, logs, results)")
    parser.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="memory runs without gradient checkpointing (default on, as tunehub does for quantized bases)",
    )
    parser.add_argument("--only", choices=("memory", "throughput", "packing"), help="run one part (no verdict)")
    parser.add_argument(
        "--max-wait", type=float, help="seconds timed runs may wait in all for quiet CPUs (default 600, quick 60)"
    )
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        run_worker(args._worker)
        return 0
    sizes = QUICK if args.quick else FULL
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunehub-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def part(name: str, run: Any) -> Any:
        """A part's result; with --keep, a part already measured in DIR is reused (said on stderr)."""
        saved = work / f"part-{name}.json"
        if args.keep and saved.exists():
            print(f"[reuse] {name}: {saved} (delete it to measure again)", file=sys.stderr, flush=True)
            return json.loads(saved.read_text())
        result = run()
        saved.write_text(json.dumps(result, default=float))
        return result

    gate = QuietGate(budget_s=args.max_wait if args.max_wait is not None else (60 if args.quick else 600))
    parts = {
        "memory": lambda: bench_memory(work, sizes, args.gradient_checkpointing),
        "throughput": lambda: bench_speed(work, gate, sizes.speed_preset, sizes, sizes.speed_steps, sizes.speed_rounds),
        "throughput_small": (
            (lambda: bench_speed(work, gate, "small", sizes, sizes.small_speed_steps, sizes.speed_rounds))
            if sizes.small_speed_steps
            else None
        ),
        "packing": lambda: bench_packing(work, sizes, gate),
    }
    try:
        if args.only:
            print(
                json.dumps(
                    {"benchmark": BENCHMARK, "part": args.only, "result": part(args.only, parts[args.only])}, default=float
                )
            )
            return 0
        results = {name: (part(name, run) if run is not None else None) for name, run in parts.items()}
        report = summarize(
            sizes,
            results["memory"],
            results["throughput"],
            results["throughput_small"],
            results["packing"],
            gate,
            args.gradient_checkpointing,
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
