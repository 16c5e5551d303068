"""``tunehub quickstart``: the whole system on embedded defaults, nothing downloaded.

1. build a small Llama-shaped base and give it a short continued pretraining (clm) on the
   documentation of Python's standard library, read at run time from this interpreter;
2. train one SFT module per task (``quickstart_tasks``) on the 4-bit (QLoRA) base, of two kinds
   (LoRA, DoRA);
3. push each to a local registry and promote it to ``prod``;
4. start ``tunehub serve`` on the nf4 base as a real process and send a shuffled mix of requests
   for every task (base alone and module) through the SDK, many rows of different modules
   batched together;
5. print and save (``quickstart.json``) per task: exact match of base and module, the version
   that answered, trainable share, module size, train time.

Everything runs on one torch thread (the server too): the models are too small to gain from more,
and on a busy machine competing OpenMP threads make each step many times slower.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunehub.sdk.quickstart_tasks import TASKS, exact_match, write_task_data

_STDLIB_MODULES = (
    "collections",
    "json",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "itertools",
    "functools",
    "datetime",
    "random",
    "statistics",
    "fractions",
    "decimal",
    "heapq",
    "bisect",
    "shutil",
    "tempfile",
    "csv",
    "argparse",
    "logging",
    "typing",
    "enum",
    "dataclasses",
    "os",
    "io",
    "math",
    "calendar",
    "difflib",
)


@dataclass(frozen=True)
class Sizes:
    preset: str  # of ``tunehub.trainer.base.build_base``
    clm_steps: int
    clm_learning_rate: float
    sft_steps: int
    sft_learning_rate: float
    train_size: int  # generated examples per task
    heldout_size: int  # held-out examples per task, each asked of the base and of the module
    rank: int
    corpus_chars: int


# Measured on 2 busy CPU cores: each module reaches 100% on 100 held-out examples after 160 SFT
# steps (the DoRA one is at 77% after 120); 200 leave a margin. The clm stage is kept short and
# gentle on purpose: at this scale a longer one (60 steps at 3e-3) pulls the base towards
# docstring tokens and halved the held-out accuracy of a topic module trained after it.
FULL = Sizes(
    preset="small",
    clm_steps=10,
    clm_learning_rate=1e-3,
    sft_steps=200,
    sft_learning_rate=5e-3,
    train_size=1200,
    heldout_size=40,
    rank=16,
    corpus_chars=100_000,
)
# a smoke test of the whole pipeline: the accuracy is not the point
FAST = Sizes(
    preset="tiny",
    clm_steps=4,
    clm_learning_rate=1e-3,
    sft_steps=12,
    sft_learning_rate=5e-3,
    train_size=96,
    heldout_size=4,
    rank=8,
    corpus_chars=20_000,
)


def stdlib_corpus(max_chars: int) -> str:
    """Docstrings of standard-library modules and their public members, from this interpreter."""
    pieces: list[str] = []
    size = 0
    for name in _STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [module, *(getattr(module, attr) for attr in sorted(dir(module)) if not attr.startswith("_"))]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
            if doc and len(doc) > 80:
                pieces.append(doc)
                size += len(doc)
                if size >= max_chars:
                    return "\n\n".join(pieces)
    return "\n\n".join(pieces)


class Reporter:
    """Rich output on a terminal, plain lines elsewhere."""

    def __init__(self) -> None:
        self.rich = sys.stdout.isatty()
        if self.rich:
            from rich.console import Console

            self.console = Console()

    def step(self, text: str) -> None:
        if self.rich:
            self.console.print(f"[bold cyan]>[/] {text}")
        else:
            print(f"> {text}", flush=True)

    def table(self, rows: list[dict[str, Any]]) -> None:
        headers = ("task", "kind", "module", "base acc", "module acc", "trainable", "size KiB", "train s")
        cells = [
            (
                r["task"],
                r["kind"],
                r["module"],
                f"{r['base_accuracy']:.0%}",
                f"{r['module_accuracy']:.0%}",
                f"{r['trainable_share']:.2%}",
                f"{r['size_kib']:.0f}",
                f"{r['train_seconds']:.0f}",
            )
            for r in rows
        ]
        if self.rich:
            from rich.table import Table

            table = Table(title="tunehub quickstart")
            for header in headers:
                table.add_column(header)
            for row in cells:
                table.add_row(*row)
            self.console.print(table)
        else:
            widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
            print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
            for row in cells:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _train(config: dict[str, Any]) -> Any:
    from tunehub.trainer.config import validate_run_config
    from tunehub.trainer.run import train

    return train(validate_run_config(config))


def _merge_clm(base_dir: Path, module_dir: Path, out_dir: Path) -> None:
    """Fold the continued-pretraining LoRA into the base weights: the quickstart's new base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunehub.trainer.run import peft_deprecations_silenced

    with peft_deprecations_silenced():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), module_dir).merge_and_unload()
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)


def run_quickstart(workdir: str | Path | None = None, *, fast: bool = False, keep: bool = False) -> dict[str, Any]:
    """Run the quickstart in ``workdir`` and return what ``quickstart.json`` holds."""
    with _one_torch_thread():
        return _run(workdir, FAST if fast else FULL, keep)


def _run(workdir: str | Path | None, sizes: Sizes, keep: bool) -> dict[str, Any]:
    from tunehub.sdk.client import Client
    from tunehub.sdk.registry import Registry
    from tunehub.trainer.base import build_base

    started = time.perf_counter()
    say = Reporter()
    work = Path(workdir or Path.cwd() / "tunehub-quickstart").resolve()
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    registry_uri = f"file://{work / 'registry'}"
    registry = Registry(registry_uri)

    say.step(f"building a {sizes.preset} Llama-shaped base in {work / 'base-init'}")
    base_init = build_base(work / "base-init", sizes.preset, overwrite=True)

    say.step("continued pretraining (clm) on the standard library's documentation")
    corpus = work / "data" / "stdlib.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text(stdlib_corpus(sizes.corpus_chars))
    clm = _train(
        {
            "base": {"path": str(base_init)},
            "method": {"name": "lora", "r": sizes.rank, "alpha": 2 * sizes.rank, "dropout": 0.0},
            "objective": {"name": "clm"},
            "data": {"train": str(corpus), "max_length": 128, "eval_fraction": 0.05},
            "training": {
                "max_steps": sizes.clm_steps,
                "batch_size": 8,
                "learning_rate": sizes.clm_learning_rate,
                "logging_steps": 5,
                "save_steps": sizes.clm_steps,
                "gradient_checkpointing": False,
            },
            "output": {"dir": str(work / "runs" / "stdlib-clm"), "task": "stdlib-clm"},
        }
    )
    registry.push(clm.module_dir, "quickstart/stdlib-clm")
    base = work / "base"
    if base.exists():
        shutil.rmtree(base)
    _merge_clm(base_init, clm.module_dir, base)

    rows: list[dict[str, Any]] = []
    heldouts: dict[str, list[dict[str, str]]] = {}
    for task in TASKS.values():
        say.step(f"training {task.name} ({task.kind}, nf4 base): {task.description}")
        train_path, heldout = write_task_data(task, work / "data", train_size=sizes.train_size, heldout_size=sizes.heldout_size)
        heldouts[task.name] = heldout
        result = _train(
            {
                "base": {"path": str(base), "quantization": "nf4"},
                "method": {"name": task.kind, "r": sizes.rank, "alpha": 2 * sizes.rank, "dropout": 0.0},
                "objective": {"name": "sft"},
                # unpacked: an example is about 45 tokens, so packing saves no padding here and its
                # block-diagonal attention mask makes each step about twice as slow
                "data": {"train": str(train_path), "max_length": 64, "eval_fraction": 0.05, "packing": False},
                "training": {
                    "max_steps": sizes.sft_steps,
                    "batch_size": 16,
                    "learning_rate": sizes.sft_learning_rate,
                    "lr_scheduler": "cosine",
                    "warmup_ratio": 0.05,
                    "logging_steps": 20,
                    # one checkpoint, at the end: nothing here resumes; no recomputation: the
                    # activations of these small models fit in memory many times over
                    "save_steps": sizes.sft_steps,
                    "gradient_checkpointing": False,
                },
                "output": {"dir": str(work / "runs" / task.name), "task": task.name},
            }
        )
        info = registry.push(result.module_dir, f"quickstart/{task.name}")
        registry.promote(info.ref, "prod")
        size = sum(f.stat().st_size for f in result.module_dir.iterdir() if f.name.startswith("adapter_model"))
        rows.append(
            {
                "task": task.name,
                "kind": task.kind,
                "module": info.ref,
                "trainable_share": result.metrics["trainable_share"],
                "size_kib": size / 1024,
                "train_seconds": result.metrics["train_seconds"],
            }
        )

    port = _free_port()
    say.step(f"starting tunehub serve on 127.0.0.1:{port} (nf4 base, registry {registry_uri})")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunehub.sdk.cli",
            "serve",
            "--base",
            str(base),
            "--quantization",
            "nf4",
            "--registry",
            registry_uri,
            "--port",
            str(port),
            "--max-batch",
            "16",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "serve.log", "w"),
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        client = Client(f"http://127.0.0.1:{port}", timeout=300)
        deadline = time.monotonic() + 180
        while not client.health():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tunehub serve did not start; see {work / 'serve.log'}")
            time.sleep(0.5)
        base_name = next(m["id"] for m in client.models() if "@" not in m["id"])
        jobs = [
            (task, mode, example) for task, examples in heldouts.items() for example in examples for mode in ("base", "module")
        ]
        random.Random(0).shuffle(jobs)
        say.step(f"sending {len(jobs)} requests (shuffled across tasks, base and modules) through the SDK")

        def ask(job: tuple[str, str, dict[str, str]]) -> tuple[str, str, bool, str | None]:
            task, mode, example = job
            model = base_name if mode == "base" else f"quickstart/{task}@prod"
            answer = client.complete(model, example["prompt"], max_tokens=8, temperature=0.0, stop=["\n"])
            return task, mode, exact_match(answer.text, example["answer"]), answer.module

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(ask, jobs))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)

    for row in rows:
        base_hits = [ok for task, mode, ok, _ in answers if task == row["task"] and mode == "base"]
        module_hits = [ok for task, mode, ok, _ in answers if task == row["task"] and mode == "module"]
        answered_by = {module for task, mode, _, module in answers if task == row["task"] and mode == "module"}
        row["heldout_examples"] = len(module_hits)
        row["base_accuracy"] = sum(base_hits) / len(base_hits)
        row["module_accuracy"] = sum(module_hits) / len(module_hits)
        row["answered_by"] = sorted(m for m in answered_by if m)
    report = {
        "tasks": rows,
        "wall_seconds": time.perf_counter() - started,
        "workdir": str(work),
        "registry": registry_uri,
        "base": str(base),
    }
    (work / "quickstart.json").write_text(json.dumps(report, indent=2) + "\n")
    say.table(rows)
    say.step(f"done in {report['wall_seconds']:.0f} s; everything is in {work}")
    print(
        "\nTry it again yourself:\n"
        f"  export TUNEHUB_REGISTRY={registry_uri}\n"
        "  tunehub ls\n"
        f"  tunehub push {work / 'runs' / 'sentiment' / 'module'} quickstart/sentiment   # a new version\n"
        "  tunehub pull quickstart/sentiment@prod --dest ./sentiment\n"
        f"  tunehub serve --base {base} --quantization nf4 --port 8000 &\n"
        "  tunehub generate --url http://127.0.0.1:8000 --model quickstart/sentiment@prod "
        "$'Review: the meal was lovely.\\nSentiment:'\n",  # bash $'...' quoting: the prompt's newline
        flush=True,
    )
    return report
