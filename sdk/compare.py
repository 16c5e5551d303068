"""``tunehub compare CONFIG``: every fine-tuning method trained on one base and one task, measured
side by side: the seed's comparison table with numbers instead of ticks.

1. The base: a preset built with a bias on every linear layer (so BitFit has tensors to train)
   and, with ``base.pretrain_steps``, a short continued pretraining on generated general text
   (full fine-tuning, ``clm``), so that it knows something it can forget; or an existing folder.
2. The task's data (:mod:`tunehub.sdk.quickstart_tasks`): training prompts from one pool of frames,
   phrases and words, held-out prompts from another that no training prompt uses; held-out
   general text (``synthetic_corpus`` lines no pretraining line equals) that no run trains on.
3. One run per method through :func:`tunehub.trainer.run.train`, each in a fresh process, so its
   ``peak_memory_bytes`` is its own (the process peak only grows): ``full``, ``selective``,
   ``bottleneck``, ``lora``, ``qlora`` (lora on the nf4 base), ``dora``, ``adalora``, ``ia3``,
   ``prompt``, ``prefix``, ``ptuning``; ``template``, a few-shot hard prompt (zero parameters);
   ``chain``, a LoRA trained with ``clm`` on unlabeled task-domain text (DAPT) and then the
   ``lora`` row's SFT on top of it (``init.parent``), to set against ``lora`` alone.
4. Every module is pushed to a registry in the output folder and scored through the serving
   engine: exact match of the greedy answer on the held-out prompts, and the change in loss on
   the held-out general text (module minus base: forgetting). A full fine-tune is served as the
   base it is; the template is rendered and run on the base.

A method that fails (in training, pushing or scoring) is reported as failed with a one-line
reason, and the rest run on. Problems in the config are all reported at once, before anything is
trained.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunehub.errors import ConfigError, Conflict
from tunehub.sdk.quickstart_tasks import TASKS, exact_match, write_task_data

#: every row ``methods`` may name, in the order of the table
METHODS: tuple[str, ...] = (
    "full",
    "selective",
    "bottleneck",
    "lora",
    "qlora",
    "dora",
    "adalora",
    "ia3",
    "prompt",
    "prefix",
    "ptuning",
    "template",
    "chain",
)
#: the seed's families (its comparison table's rows) each method belongs to
FAMILIES: dict[str, str] = {
    "base": "none: the base alone",
    "full": "full fine-tuning",
    "selective": "selective",
    "bottleneck": "adapters (additive)",
    "ia3": "adapters (additive)",
    "lora": "LoRA / QLoRA / DoRA",
    "qlora": "LoRA / QLoRA / DoRA",
    "dora": "LoRA / QLoRA / DoRA",
    "adalora": "LoRA / QLoRA / DoRA",
    "prompt": "soft prompting",
    "prefix": "soft prompting",
    "ptuning": "soft prompting",
    "template": "hard prompt",
    "chain": "UFT (DAPT) -> SFT",
}
#: the trainer method behind a row, where the row's name is not one
TRAINER_METHOD: dict[str, str] = {"qlora": "lora", "chain": "lora"}
#: rows that take ``options`` (the template trains nothing; the chain takes the lora row's options)
OPTION_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in ("template", "chain"))
#: learning rates per method: soft prompts, IA3 scales and selected biases and norms move slowly
#: at the adapters' rate; a user's ``learning_rates`` is merged over these
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "full": 1e-3,
    "selective": 3e-2,
    "bottleneck": 5e-3,
    "lora": 5e-3,
    "qlora": 5e-3,
    "dora": 5e-3,
    "adalora": 1e-2,
    "ia3": 3e-2,
    "prompt": 3e-2,
    "prefix": 3e-2,
    "ptuning": 1e-2,
    "chain": 5e-3,
}
#: the registry namespace the modules are pushed under
NAMESPACE = "compare"
#: the greedy answer: a few tokens, up to the end of the line (answers are one word)
ANSWER_TOKENS = 8
#: general-text lines scored together in one engine pass
LOSS_BATCH = 8
#: what the training processes' fork server imports once (see _process_context)
PRELOAD = ("torch", "transformers.trainer", "peft", "tunehub.trainer.config", "tunehub.trainer.run")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompareBaseConfig(_Section):
    """The base every method trains on: a preset to build, or an existing folder."""

    preset: str | None = Field(default=None, description="build this tunehub.trainer.base preset (a Llama-shaped one)")
    path: str | None = Field(default=None, description="or: an existing causal LM folder (or Hub id)")
    seed: int = Field(default=0, description="weights and tokenizer of a preset base")
    pretrain_steps: int = Field(
        default=0, ge=0, description="continued pretraining (full, clm) on general text first, so there is something to forget"
    )
    pretrain_learning_rate: float = Field(default=1e-3, gt=0)
    pretrain_lines: int = Field(default=4000, gt=0, description="lines of generated general text to pretrain on")

    @model_validator(mode="after")
    def _one_source(self) -> CompareBaseConfig:
        from tunehub.trainer.base import PRESETS

        if (self.preset is None) == (self.path is None):
            raise ValueError("give preset (a base to build) or path (an existing one), one of them")
        if self.preset is not None:
            spec = PRESETS.get(self.preset)
            llama = sorted(name for name, p in PRESETS.items() if p.architecture == "llama")
            if spec is None or spec.architecture != "llama":
                raise ValueError(f"preset {self.preset!r} is not a causal LM preset; choose one of {', '.join(llama)}")
        return self


class CompareConfig(_Section):
    """What ``tunehub compare`` trains and measures (see the module docstring)."""

    base: CompareBaseConfig
    task: str = Field(default="sentiment", description="one of the quickstart's tasks: " + ", ".join(TASKS))
    methods: list[str] = Field(default_factory=lambda: list(METHODS), description="rows to measure (default: all)")
    steps: int = Field(default=100, gt=0, description="training steps of every method")
    method_steps: dict[str, int] = Field(default_factory=dict, description="steps of some methods instead of `steps`")
    learning_rates: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_LEARNING_RATES), description="per method, merged over the defaults"
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="method parameters per method (r, num_virtual_tokens, ...), as in a run YAML"
    )
    rank: int = Field(default=8, gt=0, description="rank of the lora, qlora, dora and chain modules (adalora starts there)")
    num_virtual_tokens: int = Field(default=16, gt=0, description="of prompt, prefix and ptuning")
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=64, ge=8, description="tokens of an example, and of a block of general or domain text")
    train_size: int = Field(default=1200, gt=0, description="generated training examples")
    heldout_size: int = Field(default=40, gt=0, description="held-out prompts, each asked of every module")
    general_size: int = Field(default=48, gt=0, description="lines of held-out general text (forgetting)")
    template_shots: int = Field(default=4, ge=0, description="training examples written into the hard-prompt template")
    dapt_steps: int = Field(default=30, gt=0, description="chain: clm steps on unlabeled task-domain text")
    dapt_learning_rate: float = Field(default=1e-3, gt=0)
    dapt_size: int = Field(default=2000, gt=0, description="chain: lines of unlabeled task-domain text")
    seed: int = 0
    threads: int = Field(default=1, gt=0, description="torch threads per process (small models gain nothing from more)")
    workers: int = Field(default=1, gt=0, description="methods trained at once, each in its own process")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"{value!r} is not a task; choose one of {', '.join(TASKS)}")
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        problems = _unknown_methods(value, METHODS)
        twice = sorted({m for m in value if value.count(m) > 1})
        if twice:
            problems.append(f"{', '.join(twice)} named more than once")
        if not value:
            problems.append(f"name at least one method: {', '.join(METHODS)}")
        return _valid(value, problems)

    @field_validator("method_steps")
    @classmethod
    def _positive_steps(cls, value: dict[str, int]) -> dict[str, int]:
        problems = _unknown_methods(value, METHODS)
        problems += [f"{m}: steps must be > 0, not {n}" for m, n in value.items() if n <= 0]
        return _valid(value, problems)

    @field_validator("learning_rates")
    @classmethod
    def _merged_learning_rates(cls, value: dict[str, float]) -> dict[str, float]:
        problems = _unknown_methods(value, tuple(DEFAULT_LEARNING_RATES))
        problems += [f"{m}: must be finite and > 0, not {lr}" for m, lr in value.items() if not (math.isfinite(lr) and lr > 0)]
        return _valid({**DEFAULT_LEARNING_RATES, **value}, problems)

    @field_validator("options")
    @classmethod
    def _valid_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from tunehub.trainer.methods import get_method

        problems = _unknown_methods(value, OPTION_METHODS, note=" (template trains nothing; chain takes options.lora)")
        for method, options in value.items():
            if method not in OPTION_METHODS:
                continue
            if "name" in options:
                problems.append(f"{method}.name: set by the row; leave it out")
                continue
            config_cls = get_method(TRAINER_METHOD.get(method, method)).config_cls
            try:
                config_cls.model_validate({**options, "name": config_cls.model_fields["name"].default})
            except ValidationError as exc:
                problems += [f"{method}.{_where(err['loc'])}: {_message(err)}" for err in exc.errors()]
        return _valid(value, problems)

    def steps_of(self, method: str) -> int:
        return self.method_steps.get(method, self.steps)


def _unknown_methods(names: Sequence[str] | dict[str, Any], allowed: tuple[str, ...], note: str = "") -> list[str]:
    unknown = [name for name in names if name not in allowed]
    if not unknown:
        return []
    return [f"{', '.join(map(repr, unknown))}: not a method here; choose from {', '.join(allowed)}{note}"]


def _valid(value: Any, problems: list[str]) -> Any:
    """``value``, or one ValueError listing every problem a validator found (pydantic reports it
    with the other fields' errors)."""
    if problems:
        raise ValueError("; ".join(problems))
    return value


def _where(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "config"


def _message(err: Any) -> str:
    return "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")


def compare_config(raw: Any, source: str = "config") -> CompareConfig:
    """Validate a raw mapping; every problem at once, as one :class:`~tunehub.errors.ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping (base, task, methods, steps, learning_rates, ...)")
    try:
        return CompareConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([f"{_where(err['loc'])}: {_message(err)}" for err in exc.errors()]) from None


def load_compare_config(path: str | Path) -> CompareConfig:
    """Read a comparison YAML; a relative ``base.path`` is taken relative to the YAML's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    base = raw.get("base") if isinstance(raw, dict) else None
    if isinstance(base, dict) and isinstance(base.get("path"), str):
        anchored = path.parent / base["path"]
        if not Path(base["path"]).is_absolute() and anchored.exists():
            base["path"] = str(anchored.resolve())
    return compare_config(raw if raw is not None else {}, str(path))


#: ``--preset quick``: every method and the chain on the ``small`` base, the same 240 steps each,
#: two at a time, end to end in under 15 minutes on 2 CPU cores (examples/compare/quick.yaml is the
#: same config, as a file). The base's pretraining is short on purpose: measured, 150 steps at 2e-3
#: left it so set in its ways that no adapter learned the task in 160 steps (full fine-tuning did),
#: while 60 steps at 5e-4 take its loss on general text from 7.6 (uniform) to 4.9 and leave it
#: trainable.
QUICK = CompareConfig(
    base=CompareBaseConfig(preset="small", pretrain_steps=60, pretrain_learning_rate=5e-4, pretrain_lines=2000),
    task="sentiment",
    steps=240,
    workers=2,
)
PRESETS: dict[str, CompareConfig] = {"quick": QUICK}


def preset_config(name: str) -> CompareConfig:
    """A built-in config by name (``quick``); ConfigError naming the presets otherwise."""
    try:
        return PRESETS[name].model_copy(deep=True)
    except KeyError:
        raise ConfigError(f"--preset {name!r} is not a preset; choose one of {', '.join(PRESETS)}") from None


# --- the report ----------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One row: what training measured (the trainer's metrics) and what the engine scored."""

    method: str
    family: str
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None  # the one-line reason of a failed row
    module: str | None = None  # the registry reference the engine served (name@N)
    module_dir: str | None = None
    quantization: str = "none"  # of the base it trained and was scored on
    trainable_params: int | None = None
    trainable_share: float | None = None
    size_bytes: int | None = None  # weight files (safetensors, template.json): what a server loads
    peak_memory_bytes: int | None = None  # the trainer's peak_memory_bytes (process peak RSS on the CPU)
    memory_baseline_bytes: int | None = None  # the same measure just before training began
    steps: int | None = None
    train_seconds: float | None = None
    seconds_per_step: float | None = None
    correct: int | None = None
    heldout_examples: int | None = None
    exact_match: float | None = None
    general_loss: float | None = None  # mean token loss on the held-out general text, with the module
    forgetting: float | None = None  # general_loss minus the same base's without a module
    notes: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        if self.status == "ok":  # the first failure is the reason; later steps of a failed row are skipped
            self.status, self.error = "failed", reason


COLUMNS = (
    "method",
    "family",
    "trainable params",
    "share",
    "module size",
    "peak memory",
    "s/step",
    "held-out exact match",
    "forgetting (Δ loss)",
    "notes",
)


@dataclass
class ComparisonReport:
    task: str
    config: CompareConfig
    rows: list[MethodResult]
    base: dict[str, Any]  # what the base is: source, path, pretraining, its loss on the general text
    machine: dict[str, Any]
    command: str | None
    out_dir: str
    wall_seconds: float

    def table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """Header and rows of strings, as comparison.md and the CLI show them."""
        cells: list[tuple[str, ...]] = []
        for r in self.rows:
            notes = "; ".join(([f"failed: {r.error}"] if r.status == "failed" else []) + r.notes)
            em = f"{r.exact_match:.0%} ({r.correct}/{r.heldout_examples})" if r.exact_match is not None else "—"
            cells.append(
                (
                    r.method,
                    r.family,
                    _count(r.trainable_params),
                    f"{r.trainable_share:.3%}" if r.trainable_share is not None else "—",
                    _size(r.size_bytes),
                    _size(r.peak_memory_bytes),
                    f"{r.seconds_per_step:.3f}" if r.seconds_per_step is not None else "—",
                    em,
                    f"{r.forgetting:+.3f}" if r.forgetting is not None else "—",
                    notes,
                )
            )
        return COLUMNS, cells

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "command": self.command,
            "config": self.config.model_dump(mode="json"),
            "base": self.base,
            "machine": self.machine,
            "out_dir": self.out_dir,
            "wall_seconds": self.wall_seconds,
            "columns": list(COLUMNS),
            "rows": [asdict(r) for r in self.rows],
        }

    def to_markdown(self) -> str:
        header, rows = self.table()
        m = self.machine
        base = self.base
        pretrain = (
            f" + {base['pretrain_steps']} steps of continued pretraining (full, clm) on generated general text"
            if base.get("pretrain_steps")
            else ""
        )
        failed = [r for r in self.rows if r.status == "failed"]

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = [
            f"# tunehub compare: {self.task}",
            "",
            f"- command: `{self.command or 'tunehub.sdk.compare.run_comparison(config, out_dir)'}`",
            f"- machine: {m['platform']}, {m['cpus']} CPUs, {m['device']}; Python {m['python']}, torch {m['torch']},"
            f" transformers {m['transformers']}, peft {m['peft']}",
            f"- wall time: {self.wall_seconds:.0f} s, end to end",
            f"- base: {base['source']}{pretrain}; {base['parameters']:,} parameters; loss on the held-out general"
            f" text {_fmt(base.get('general_loss'), '.3f')}"
            + (f" (fp32), {base['general_loss_nf4']:.3f} (nf4)" if base.get("general_loss_nf4") is not None else ""),
            f"- task: {self.task} ({TASKS[self.task].description}); {self.config.train_size} training examples,"
            f" {self.config.heldout_size} held-out prompts whose frames, phrases and neutral words no training prompt uses",
            f"- {len(self.rows) - 1 - len(failed)} of {len(self.rows) - 1} methods measured"
            + (f"; failed: {', '.join(r.method for r in failed)}" if failed else ""),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows),
            "",
            "Columns: trainable parameters and their share of the base's; module size: its weight files on disk (what a"
            " server loads); peak memory: the training process's peak (resident set on the CPU, allocated on CUDA),"
            f" {_size(_min_baseline(self.rows))} of it already held before training began (Python, torch and the libraries);"
            " s/step: training seconds per optimizer step; held-out exact match: the greedy answer's first line equals"
            " the label, served by the engine; forgetting: mean token loss on held-out general text with the module,"
            " minus the base's (positive: it forgot).",
            "",
            "The config:",
            "",
            "```yaml",
            yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False).rstrip(),
            "```",
            "",
        ]
        return "\n".join(lines)


def _min_baseline(rows: list[MethodResult]) -> int | None:
    values = [r.memory_baseline_bytes for r in rows if r.memory_baseline_bytes]
    return min(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _count(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def plot_comparison(report: ComparisonReport, path: str | Path) -> Path:
    """``comparison.png``: held-out exact match against trainable share (left), forgetting per
    method (right). Failed rows are left out and named under the plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    measured = [r for r in report.rows if r.status == "ok" and r.method != "base"]
    failed = [r.method for r in report.rows if r.status == "failed"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.5), dpi=110)
    families = sorted({r.family for r in measured})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    points = sorted(
        (100 * r.exact_match, 100 * r.trainable_share, r.method, r.family)
        for r in measured
        if r.exact_match is not None and r.trainable_share is not None
    )
    for score, share, _, family in points:
        left.scatter(share, score, s=60, color=colours[family], label=family, zorder=3)
    # one label per cluster (same score, shares within a factor of 1.6), alternately above and below
    clusters: list[list[tuple[float, float, str, str]]] = []
    for point in points:
        last = clusters[-1][0] if clusters else None
        if last is not None and last[0] == point[0] and point[1] <= max(last[1] * 1.6, 1e-3):
            clusters[-1].append(point)
        else:
            clusters.append([point])
    for i, cluster in enumerate(clusters):
        score, share = cluster[0][0], cluster[0][1]
        above = i == 0 or clusters[i - 1][0][0] != score or i % 2 == 0
        left.annotate(
            ", ".join(p[2] for p in cluster),
            (share, score),
            textcoords="offset points",
            xytext=(6, 5 if above else -13),
            fontsize=9,
        )
    base = next((r for r in report.rows if r.method == "base"), None)
    if base is not None and base.exact_match is not None:
        left.axhline(100 * base.exact_match, color="grey", linestyle="--", linewidth=1, label="base alone")
    left.set_xscale("symlog", linthresh=1e-3)
    left.set_xlim(left=0, right=300)
    left.set_ylim(-5, 108)
    left.set_xlabel("trainable parameters (% of the base, symlog)")
    left.set_ylabel("held-out exact match (%)")
    left.set_title(f"{report.task}: score against trainable share")
    left.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    left.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)

    scored = [r for r in measured if r.forgetting is not None]
    names = [r.method for r in scored]
    values = [r.forgetting or 0.0 for r in scored]
    right.barh(names, values, color=["tab:red" if v > 0 else "tab:green" for v in values])
    right.axvline(0, color="black", linewidth=0.8)
    right.invert_yaxis()
    right.set_xlabel("loss on held-out general text, module minus base (positive: forgot)")
    right.set_title("forgetting")
    right.grid(axis="x", alpha=0.3)
    if failed:
        fig.text(0.01, 0.01, f"failed (see comparison.md): {', '.join(failed)}", fontsize=9, color="tab:red")
    fig.tight_layout(rect=(0, 0.04 if failed else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


# --- running it ----------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Where everything goes in the output folder."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def registry(self) -> Path:
        return self.out / "registry"

    def run_dir(self, method: str) -> Path:
        return self.runs / method


@dataclass
class _Plan:
    """Everything decided before training: data files, the base, each row's run configs."""

    base_path: Path  # what the methods train on (after pretraining)
    base_info: dict[str, Any]
    heldout: list[dict[str, str]]
    general_lines: list[str]
    train_path: Path
    pretrain: dict[str, Any] | None  # the run config of the continued pretraining, if any
    runs: dict[str, list[dict[str, Any]]]  # per method: its run configs in order (the chain: DAPT, then SFT)
    template_text: str | None


def run_comparison(
    config: CompareConfig,
    out_dir: str | Path,
    *,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ComparisonReport:
    """Train and measure every method ``config`` names; write ``comparison.md``,
    ``comparison.json``, ``comparison.png`` and the modules into ``out_dir`` (new or empty).

    Raises:
        Conflict: ``out_dir`` exists and is not an empty folder (nothing is written then).
        ConfigError: every problem of the run configs the methods would train with, found
            before any training (what was written for the check is removed again).
    """
    say = progress or (lambda text: None)
    started = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Conflict(f"{out} exists and is not an empty folder; tunehub compare writes into a new or empty one")
    layout = _Layout(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with _progress_bars_off():
        try:
            plan = _plan(config, layout, say)
        except BaseException:
            # only what this call wrote goes: the folder was new, or empty
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for child in out.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
        rows = _train_and_score(config, plan, layout, say)
    report = ComparisonReport(
        task=config.task,
        config=config,
        rows=list(rows.values()),
        base=plan.base_info,
        machine=machine_info(),
        command=command,
        out_dir=str(out),
        wall_seconds=time.perf_counter() - started,
    )
    (out / "comparison.md").write_text(report.to_markdown())
    (out / "comparison.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot_comparison(report, out / "comparison.png")
    say(f"done in {report.wall_seconds:.0f} s")
    return report


def _train_and_score(config: CompareConfig, plan: _Plan, layout: _Layout, say: Callable[[str], None]) -> dict[str, MethodResult]:
    registry_uri = f"file://{layout.registry}"
    rows = {m: MethodResult(method=m, family=FAMILIES[m]) for m in ["base", *config.methods]}
    if plan.pretrain is not None:
        say(f"continued pretraining of the base ({config.base.pretrain_steps} steps, full, clm on general text)")
        # it runs alone: the threads of every worker are its
        alone = config.model_copy(update={"threads": config.threads * config.workers, "workers": 1})
        outcome = _run_jobs({"pretrain": [plan.pretrain]}, alone, registry_uri)["pretrain"]
        if outcome["ok"]:
            metrics = outcome["stages"][0]["metrics"]
            plan.base_info["pretrain_seconds"] = metrics.get("train_seconds")
            plan.base_info["pretrain_final_loss"] = metrics.get("final_train_loss")
        else:  # no base to compare on: every row says why, and the report is still written
            for row in rows.values():
                row.fail(f"the base's continued pretraining failed: {outcome['error']}")
    trained = [m for m in config.methods if m != "template" and rows[m].status == "ok"]
    for method in trained:
        for raw in plan.runs[method]:
            raw["base"]["path"] = str(plan.base_path)
    if trained:
        count = f"{len(trained)} method{'s' if len(trained) > 1 else ''}"
        say(f"training {count} ({', '.join(trained)}), {config.workers} at a time, each in its own process")
        outcomes = _run_jobs({m: plan.runs[m] for m in trained}, config, registry_uri, say)
        for method in trained:
            _record_training(rows[method], outcomes[method], method)
    if "template" in config.methods and rows["template"].status == "ok":
        _write_template(rows["template"], plan, config, layout)
    _push(rows, layout, say)
    _score(rows, plan, config, layout, say)
    return rows


@contextmanager
def _progress_bars_off() -> Iterator[None]:
    """No transformers progress bar per weight load and save (dozens of them in a comparison)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def machine_info() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _plan(config: CompareConfig, layout: _Layout, say: Callable[[str], None]) -> _Plan:
    """Build the base, write the data, make every run config and validate them all together."""
    from tunehub.bases import resolve_base_folder
    from tunehub.trainer.base import build_base, synthetic_corpus
    from tunehub.trainer.config import validate_run_config

    task = TASKS[config.task]
    layout.data.mkdir(parents=True)
    if config.base.preset is not None:
        say(f"building a {config.base.preset} base with biases (BitFit trains them)")
        initial = build_base(layout.out / "base-init", config.base.preset, seed=config.base.seed, biases=True)
        source = f"preset {config.base.preset} (seed {config.base.seed}, a bias on every linear layer)"
    else:
        initial = resolve_base_folder(config.base.path or "", field="base.path")  # set: one of preset/path is
        source = f"{config.base.path}"
    train_path, heldout = write_task_data(
        task, layout.data, train_size=config.train_size, heldout_size=config.heldout_size, seed=config.seed
    )
    # general text: the pretraining lines and, apart from them, the held-out lines no run trains on
    pretrain_lines = synthetic_corpus(config.base.pretrain_lines, seed=config.seed + 1) if config.base.pretrain_steps else []
    seen = set(pretrain_lines)
    general = [line for line in synthetic_corpus(config.general_size * 2, seed=config.seed + 2) if line not in seen]
    general = general[: config.general_size]
    (layout.data / "general-heldout.txt").write_text("\n".join(general) + "\n")
    pretrain = None
    base_path = initial
    if config.base.pretrain_steps:
        corpus = layout.data / "general-pretrain.txt"
        corpus.write_text("\n".join(pretrain_lines) + "\n")
        pretrain = _run_config(
            config,
            layout,
            "pretrain",
            base=initial,
            method={"name": "full"},
            objective="clm",
            data=corpus,
            steps=config.base.pretrain_steps,
            learning_rate=config.base.pretrain_learning_rate,
        )
        base_path = layout.run_dir("pretrain") / "module"

    runs: dict[str, list[dict[str, Any]]] = {}
    has_bias = _has_biases(initial)
    for method in config.methods:
        if method == "template":
            continue
        quantization = "nf4" if method == "qlora" else "none"
        section = {**_method_section(method, config, initial, has_bias), **config.options.get(method, {})}
        sft = _run_config(
            config,
            layout,
            method,
            base=initial,
            method=section,
            objective="sft",
            data=train_path,
            steps=config.steps_of(method),
            learning_rate=config.learning_rates[method],
            quantization=quantization,
        )
        if method != "chain":
            runs[method] = [sft]
            continue
        domain = layout.data / "domain.txt"
        domain.write_text("\n".join(_domain_text(config)) + "\n")
        dapt = _run_config(
            config,
            layout,
            "chain-dapt",
            base=initial,
            method=section,
            objective="clm",
            data=domain,
            steps=config.dapt_steps,
            learning_rate=config.dapt_learning_rate,
        )
        dapt["output"]["task"] = f"{config.task}-domain"
        sft["init"] = {"parent": f"{NAMESPACE}/chain-dapt"}  # the exact version pushed replaces it before training
        sft["output"]["registry"] = f"file://{layout.registry}"
        runs[method] = [dapt, sft]

    problems = []
    checks = [("pretrain", pretrain)] if pretrain is not None else []
    checks += [(method, raw) for method, raws in runs.items() for raw in raws]
    for method, raw in checks:
        try:
            validate_run_config(json.loads(json.dumps(raw)), method)
        except ConfigError as exc:
            problems += [f"{method}: {p}" for p in exc.problems]
    if problems:
        raise ConfigError(problems)

    template_text = _template_text(config, train_path) if "template" in config.methods else None
    info = {
        "source": source,
        "path": str(base_path),
        "initial_path": str(initial),
        "pretrain_steps": config.base.pretrain_steps,
        "biases": has_bias,
        "parameters": _parameter_count(initial),
    }
    return _Plan(
        base_path=base_path,
        base_info=info,
        heldout=heldout,
        general_lines=general,
        train_path=train_path,
        pretrain=pretrain,
        runs=runs,
        template_text=template_text,
    )


def _run_config(
    config: CompareConfig,
    layout: _Layout,
    name: str,
    *,
    base: Path,
    method: dict[str, Any],
    objective: str,
    data: Path,
    steps: int,
    learning_rate: float,
    quantization: str = "none",
) -> dict[str, Any]:
    """One run config, in the quickstart's style (sdk/quickstart.py)."""
    return {
        "base": {"path": str(base), "quantization": quantization},
        "method": dict(method),
        "objective": {"name": objective},
        # unpacked (prompt-learning methods need it, and the other rows train on the same batches);
        # no evaluation split: held-out scoring is done by the engine afterwards
        "data": {"train": str(data), "max_length": config.max_length, "eval_fraction": 0.0, "packing": False},
        "training": {
            "max_steps": steps,
            "batch_size": config.batch_size,
            "learning_rate": learning_rate,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.05,
            "logging_steps": max(1, steps // 5),
            # no checkpoints (nothing resumes) and no recomputation (small models fit many times over)
            "checkpoint_minutes": 600.0,
            "gradient_checkpointing": False,
            "seed": config.seed,
        },
        "output": {"dir": str(layout.run_dir(name)), "task": config.task},
    }


def _method_section(method: str, config: CompareConfig, base: Path, has_bias: bool) -> dict[str, Any]:
    """The method section a row trains with before the user's ``options`` are merged over it."""
    rank = config.rank
    low_rank = {"r": rank, "alpha": 2 * rank, "dropout": 0.0}
    virtual = config.num_virtual_tokens
    sections: dict[str, dict[str, Any]] = {
        "full": {"name": "full"},
        # BitFit where the base has biases, and every norm: the base's own tensors, a small share
        "selective": {"name": "selective", "bitfit": has_bias, "layernorm": True},
        "bottleneck": {"name": "bottleneck"},
        "lora": {"name": "lora", **low_rank},
        "qlora": {"name": "lora", **low_rank},
        "chain": {"name": "lora", **low_rank, **config.options.get("lora", {})},
        "dora": {"name": "dora", **low_rank},
        "adalora": {"name": "adalora", "init_r": rank, "target_r": max(1, rank // 2)},
        "ia3": {"name": "ia3"},
        "prompt": {"name": "prompt", "num_virtual_tokens": virtual, "init": "text", "init_text": TASKS[config.task].description},
        "prefix": {"name": "prefix", "num_virtual_tokens": virtual},
        "ptuning": {"name": "ptuning", "num_virtual_tokens": virtual},
    }
    return sections[method]


def _domain_text(config: CompareConfig) -> list[str]:
    """Unlabeled text of the task's domain for the chain's DAPT stage: training prompts without
    their question line, drawn from the training pools only (the held-out rule holds)."""
    task = TASKS[config.task]
    rng = random.Random(f"{task.name}-domain-{config.seed}")
    return [task.make(rng, False)[0].rsplit("\n", 1)[0] for _ in range(config.dapt_size)]


def _template_text(config: CompareConfig, train_path: Path) -> str:
    """A few-shot hard prompt: ``template_shots`` training examples, then the prompt's slot."""
    shots: list[str] = []
    with train_path.open() as handle:
        for line in handle:
            if len(shots) == config.template_shots:
                break
            example = json.loads(line)
            shot = f"{example['prompt']}{example['completion'].rstrip()}"
            shots.append(shot.replace("{", "{{").replace("}", "}}"))
    return "\n".join([*shots, "{prompt}"])


def _has_biases(base: Path) -> bool:
    """Whether the base's weights hold any bias (names read from the safetensors headers)."""
    from safetensors import safe_open

    for weights in sorted(base.glob("*.safetensors")):
        with safe_open(str(weights), framework="np") as handle:
            if any(name.endswith(".bias") for name in handle.keys()):
                return True
    return False


def _parameter_count(base: Path) -> int:
    from safetensors import safe_open

    total = 0
    for weights in sorted(base.glob("*.safetensors")):
        with safe_open(str(weights), framework="np") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


# --- training, one process per method ------------------------------------------------------------


def _train_job(raws: list[dict[str, Any]], threads: int, registry_uri: str, environ: dict[str, str]) -> dict[str, Any]:
    """Run in a fresh process: train ``raws`` in order. A chain's first run (DAPT) is pushed to
    the comparison's registry and the next names its exact version as ``init.parent``. Returns
    plain data (never raises: the reason of a failure travels back as a line of text).

    ``environ``: the caller's environment now (TUNEHUB_HOME, HF_*), which a fork server started
    earlier may not have."""
    try:
        os.environ.clear()
        os.environ.update(environ)
        import torch

        torch.set_num_threads(threads)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per weight load and save, from every process
        from tunehub.trainer.config import validate_run_config
        from tunehub.trainer.run import peak_memory_bytes, train

        baseline = peak_memory_bytes()  # the interpreter, torch and friends: before any run
        stages = []
        parent: str | None = None
        for i, raw in enumerate(raws):
            if parent is not None:
                raw["init"] = {"parent": parent}
            push = f"{NAMESPACE}/{Path(raw['output']['dir']).name}" if i < len(raws) - 1 else None
            result = train(validate_run_config(raw), push=push, registry=registry_uri)
            parent = result.pushed.ref if result.pushed is not None else None
            shutil.rmtree(Path(raw["output"]["dir"]) / "checkpoints", ignore_errors=True)
            stages.append({"module_dir": str(result.module_dir), "metrics": result.metrics, "pushed": parent})
        return {"ok": True, "stages": stages, "memory_baseline": baseline}
    except Exception as exc:  # noqa: BLE001 - a method's failure is its row's, reported as one line
        return {"ok": False, "error": one_line(exc)}


def one_line(exc: BaseException) -> str:
    """An exception as the one line a failed row shows: its type and first line, shortened."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def _run_jobs(
    jobs: dict[str, list[dict[str, Any]]],
    config: CompareConfig,
    registry_uri: str,
    say: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each job in a fresh process, ``config.workers`` at a time."""
    context = _process_context()

    def run(name: str) -> dict[str, Any]:
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            try:
                outcome = pool.submit(_train_job, jobs[name], config.threads, registry_uri, dict(os.environ)).result()
            except Exception as exc:  # noqa: BLE001 - the process died (killed, out of memory)
                outcome = {"ok": False, "error": f"the training process died ({one_line(exc)})"}
        if say is not None:
            state = "trained" if outcome["ok"] else f"failed: {outcome['error']}"
            say(f"{name}: {state} ({time.perf_counter() - started:.0f} s)")
        return outcome

    with ThreadPoolExecutor(max_workers=config.workers) as threads:
        return dict(zip(jobs, threads.map(run, jobs)))


def _process_context() -> Any:
    """Where the training processes come from. A fork server where there is one: it imports
    :data:`PRELOAD` once, before torch starts any thread, and each run is a fresh fork of it, a
    process of its own without ten seconds of imports. Elsewhere, spawned processes. Never a fork
    of this process, which may hold torch's threads."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(PRELOAD))
        return context
    return multiprocessing.get_context("spawn")


def _record_training(row: MethodResult, outcome: dict[str, Any], method: str) -> None:
    if not outcome["ok"]:
        row.fail(outcome["error"])
        return
    stages = outcome["stages"]
    last = stages[-1]
    metrics = last["metrics"]
    row.module_dir = last["module_dir"]
    row.quantization = "nf4" if method == "qlora" else "none"
    row.trainable_params = int(metrics["trainable_params"])
    row.trainable_share = float(metrics["trainable_share"])
    row.steps = int(metrics["steps"])
    row.train_seconds = float(metrics["train_seconds"])
    row.seconds_per_step = row.train_seconds / row.steps if row.steps else None
    row.peak_memory_bytes = int(max(s["metrics"]["peak_memory_bytes"] for s in stages))
    row.memory_baseline_bytes = int(outcome["memory_baseline"])
    row.size_bytes = sum(_weights_size(Path(s["module_dir"])) for s in stages)
    if method == "qlora":
        row.notes.append("nf4 base: scored and compared with the nf4 base")
    if method == "ptuning":
        row.notes.append("trains a prompt encoder (counted); the module stores the prompt it encodes")
    if method == "chain":
        dapt = stages[0]
        row.notes.append(
            f"lora SFT on {dapt['pushed']} (lora, {int(dapt['metrics']['steps'])} clm steps on unlabeled task-domain"
            " text), applied frozen; params and s/step: the SFT stage; size: both modules"
        )


def _weights_size(module_dir: Path) -> int:
    """Bytes of what a server loads: the weight files (and a template's text)."""
    return sum(
        p.stat().st_size
        for p in module_dir.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "template.json")
    )


def _write_template(row: MethodResult, plan: _Plan, config: CompareConfig, layout: _Layout) -> None:
    from tunehub.registry.template import parse_template
    from tunehub.trainer.templates import write_template_module

    folder = layout.run_dir("template") / "module"
    try:
        template = parse_template(json.dumps({"format": "text", "text": plan.template_text}), "the few-shot template")
        write_template_module(folder, template, plan.base_path, task=config.task)
    except Exception as exc:  # noqa: BLE001 - reported in its row
        row.fail(one_line(exc))
        return
    row.module_dir = str(folder)
    row.trainable_params, row.trainable_share, row.steps = 0, 0.0, 0
    row.size_bytes = _weights_size(folder)
    row.forgetting = 0.0
    row.notes.append(f"{config.template_shots}-shot prompt of training examples, run on the base; it changes no weight")


def _push(rows: dict[str, MethodResult], layout: _Layout, say: Callable[[str], None]) -> None:
    from tunehub.registry.local import LocalStore

    store = LocalStore(layout.registry, cache_dir=layout.out / "cache")
    for row in rows.values():
        if row.status != "ok" or row.module_dir is None:
            continue
        try:
            row.module = store.push(row.module_dir, f"{NAMESPACE}/{row.method}").ref
        except Exception as exc:  # noqa: BLE001 - reported in its row
            row.fail(f"push: {one_line(exc)}")
    say(f"pushed the modules to file://{layout.registry}")


# --- scoring through the engine ------------------------------------------------------------------


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score(
    rows: dict[str, MethodResult], plan: _Plan, config: CompareConfig, layout: _Layout, say: Callable[[str], None]
) -> None:
    """Exact match on the held-out prompts and loss on the general text, per engine: the fp32
    base (every module trained on it, the template, the base row), the nf4 base (qlora), and
    each full fine-tune served as its own base."""
    from tunehub.registry.local import LocalStore

    store = LocalStore(layout.registry, cache_dir=layout.out / "cache")
    groups: dict[tuple[str, str], list[MethodResult]] = {}
    for row in rows.values():
        if row.status != "ok":
            continue
        if row.method == "full":
            key = (str(row.module_dir), "none")
        else:
            key = (str(plan.base_path), row.quantization)
        groups.setdefault(key, []).append(row)
    if "qlora" in rows and rows["qlora"].status == "ok":
        groups[(str(plan.base_path), "nf4")].insert(0, MethodResult(method="base-nf4", family=FAMILIES["base"]))
    with _torch_threads(config.threads):
        for (base_path, quantization), members in groups.items():
            label = "a full fine-tune served as its base" if base_path != str(plan.base_path) else f"the {quantization} base"
            say(f"scoring {', '.join(r.method for r in members if r.method != 'base-nf4')} through the engine on {label}")
            _score_group(Path(base_path), quantization, members, plan, store, config.max_length)
    base_loss = rows["base"].general_loss
    plan.base_info["general_loss"] = base_loss
    nf4 = next((r for g in groups.values() for r in g if r.method == "base-nf4"), None)
    plan.base_info["general_loss_nf4"] = nf4.general_loss if nf4 is not None else None
    if nf4 is not None and nf4.status == "failed":
        rows["qlora"].fail(f"the nf4 base could not be scored: {nf4.error}")
    for row in rows.values():
        if row.status != "ok" or row.method in ("base", "template"):
            continue
        reference = nf4.general_loss if (row.quantization == "nf4" and nf4 is not None) else base_loss
        if row.general_loss is not None and reference is not None:
            row.forgetting = row.general_loss - reference
    if rows["base"].status == "ok":
        rows["base"].forgetting = 0.0
        rows["base"].trainable_params, rows["base"].trainable_share = 0, 0.0


def _score_group(base_path: Path, quantization: str, rows: list[MethodResult], plan: _Plan, store: Any, max_length: int) -> None:
    import torch

    from tunehub.server.engine import Engine, GenerationRequest, SamplingParams, load_base

    try:
        engine = Engine(load_base(base_path, quantization=quantization), store, max_batch=32)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - every row of this base fails with the reason
        for row in rows:
            row.fail(f"scoring: {one_line(exc)}")
        return
    try:
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, stop=["\n"])
        template = None
        if plan.template_text is not None:
            from tunehub.registry.template import parse_template

            template = parse_template(json.dumps({"format": "text", "text": plan.template_text}))
        handles = {}
        for row in rows:
            module = None if row.method in ("base", "base-nf4", "full", "template") else row.module
            prompts = [e["prompt"] for e in plan.heldout]
            if row.method == "template" and template is not None:
                prompts = [template.render_text({"prompt": p}) for p in prompts]
            handles[row.method] = [engine.submit(GenerationRequest(prompt=p, module=module, params=params)) for p in prompts]
        for row in rows:
            try:
                answers = [h.result() for h in handles[row.method]]
            except Exception as exc:  # noqa: BLE001 - this row's requests failed; the others stand
                row.fail(f"scoring: {one_line(exc)}")
                continue
            row.correct = sum(exact_match(a.text, e["answer"]) for a, e in zip(answers, plan.heldout))
            row.heldout_examples = len(plan.heldout)
            row.exact_match = row.correct / row.heldout_examples
        ids = [engine.tokenizer(line, truncation=True, max_length=max_length)["input_ids"] for line in plan.general_lines]
        for row in rows:
            if row.status != "ok" or row.method == "template":
                continue
            module = None if row.method in ("base", "base-nf4", "full") else row.module
            try:
                row.general_loss = _mean_token_loss(engine, ids, module, torch)
            except Exception as exc:  # noqa: BLE001
                row.fail(f"general-text loss: {one_line(exc)}")
    finally:
        engine.close()
        del engine
        gc.collect()


def _mean_token_loss(engine: Any, ids: list[list[int]], module: str | None, torch: Any) -> float:
    """Mean next-token cross-entropy over every token of ``ids`` (each row its own sequence)."""
    total, count = 0.0, 0
    for start in range(0, len(ids), LOSS_BATCH):
        chunk = [row for row in ids[start : start + LOSS_BATCH] if len(row) > 1]
        if not chunk:
            continue
        for row, logits in zip(chunk, engine.logits([(row, module) for row in chunk])):
            target = torch.tensor(row[1:], dtype=torch.long)
            total += float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))
            count += len(row) - 1
    return total / count if count else math.nan


__all__ = [
    "COLUMNS",
    "CompareBaseConfig",
    "CompareConfig",
    "ComparisonReport",
    "DEFAULT_LEARNING_RATES",
    "METHODS",
    "MethodResult",
    "PRESETS",
    "QUICK",
    "compare_config",
    "load_compare_config",
    "machine_info",
    "one_line",
    "plot_comparison",
    "preset_config",
    "run_comparison",
]
