"""The training run: base + data + method -> a module folder, with transformers' ``Trainer``
as the loop (accumulation, schedules, eval, checkpoints, resume; DDP or FSDP under ``accelerate launch``).

Layout of ``output.dir``::

    checkpoints/    Trainer checkpoints (for --resume); never part of the module
    module/         the module: manifest.json, adapter files, README.md, metrics.json, loss.png
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from tunehub.bases import resolve_base_folder
from tunehub.devices import device_type, load_quantized, use_lean_cpu_allocator
from tunehub.errors import ConfigError, IncompatibleBase, IntegrityError, ManifestError
from tunehub.quantization import bnb_config
from tunehub.registry.manifest import PEFT_TYPES, Manifest, ModuleKind
from tunehub.registry.module import LocalModule
from tunehub.registry.refs import ModuleRef
from tunehub.registry.signing import TrustPolicy
from tunehub.registry.store import ModuleStore, VersionInfo
from tunehub.trainer.config import CHAIN_COMBINATIONS, STACKING_PEFT_TYPES, RunConfig

if TYPE_CHECKING:
    from transformers import BertForPreTraining

log = logging.getLogger("tunehub.trainer")


@dataclass
class TrainResult:
    module_dir: Path
    manifest: Manifest | None  # None on non-zero ranks of a distributed run
    metrics: dict[str, float]
    pushed: VersionInfo | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained PeftModel, still in memory


# --- base model -------------------------------------------------------------------------------
def world_size() -> int:
    """How many processes train together (set by ``accelerate launch`` / ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shards_base(config: RunConfig) -> bool:
    """Whether this run shards the base's weights across its processes (``training.distributed: fsdp``
    under a launcher that started several)."""
    return config.training.distributed == "fsdp" and world_size() > 1


def check_launch(config: RunConfig, *, resume: bool = False) -> None:
    """Refuse launches that would not do what they say, before anything loads."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate shards only on accelerators: on the CPU `--use_fsdp` would silently train DDP,
        # and tunehub's sharding (at load time) and accelerate's would not compose on a GPU either
        raise ConfigError(
            "accelerate launch --use_fsdp: tunehub shards the base itself; launch without --use_fsdp"
            " and set training.distributed: fsdp"
        )
    if resume and shards_base(config):
        raise ConfigError(
            "--resume: a training.distributed: fsdp run's checkpoints hold no optimizer state"
            " (transformers cannot checkpoint it for a base sharded at load time); start the run again"
        )


def resolve_base(config: RunConfig) -> Path:
    """A local folder for ``base.path``: the folder itself, or a Hub snapshot when it is a hub id.

    Raises ConfigError (naming ``base.path``) as :func:`tunehub.bases.resolve_base_folder` does."""
    return resolve_base_folder(config.base.path, revision=config.base.revision, field="base.path")


def load_base_model(base_dir: Path, config: RunConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    objective = config.objective.name
    model_cls: type[BertForPreTraining] | type[AutoModelForMaskedLM] | type[AutoModelForCausalLM]
    if objective == "mlm":
        if config.objective.nsp:
            from transformers import BertForPreTraining

            model_cls = BertForPreTraining
        else:
            model_cls = AutoModelForMaskedLM
    else:
        model_cls = AutoModelForCausalLM
    kwargs: dict[str, Any] = {}
    quantization = config.base.quantization
    if quantization != "none":
        # the same config the server loads the base with (tunehub.quantization): train/serve parity
        kwargs["quantization_config"] = bnb_config(quantization, config.base.compute_dtype)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local_rank if device_type() == "cuda" else "cpu"}
    else:
        kwargs["dtype"] = getattr(torch, config.base.dtype)
    if shards_base(config):
        from transformers import DistributedConfig

        # FSDP2 applied as the weights load, by the architecture's sharding plan in transformers;
        # transformers starts the process group (gloo on the CPU) if nothing has yet
        kwargs["distributed_config"] = DistributedConfig(fsdp_size=world_size())
    try:
        if quantization != "none":
            model = load_quantized(model_cls, base_dir, **kwargs)
        else:
            model = model_cls.from_pretrained(base_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base.path: could not load {base_dir} as a model: {exc}") from None
    if config.data.packing and objective == "sft":
        from tunehub.trainer.attention import use_segment_attention

        use_segment_attention(model)  # each packed example attends to itself, computed alone
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        # checkpointing is switched on below, by the name transformers keeps (PEFT calls the
        # deprecated one, a FutureWarning on every run)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.training.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


@contextlib.contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """Wrapping a model in PEFT reads transformers' deprecated ``is_gradient_checkpointing``
    (renamed in transformers 5): the FutureWarning is about PEFT's code, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass; inputs require grad so gradients flow through
    the frozen embeddings into the checkpointed layers (as PEFT's kbit preparation does). Uses
    ``activation_checkpointing_enable`` where transformers has it (the old name is deprecated
    there), else ``gradient_checkpointing_enable``."""
    model.enable_input_require_grads()
    # no kwargs: transformers' default, non-reentrant checkpointing (torch's recommended one)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def linear_module_names(model: Any) -> tuple[str, ...]:
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return tuple(sorted(names))


# --- data ---------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    collator: Any
    info: Any  # DataInfo


def prepare_data(config: RunConfig, tokenizer: Any) -> PreparedData:
    """The run's examples, split and tokenized. A method that reads task ids (multitask prompt
    tuning) gets every example tagged: with one task per ``data.train`` source, each source is
    prepared (and split) alone, so every task is in the evaluation too."""
    from tunehub.trainer import data as d
    from tunehub.trainer.methods import get_method

    task_ids = get_method(config.method.name).task_ids
    if task_ids is None:
        return _prepare_data(config, tokenizer)
    groups = [[source] for source in config.data.train] if task_ids(config.method) else [list(config.data.train)]
    parts = []
    for group in groups:
        data_cfg = config.data.model_copy(update={"train": group})
        parts.append(_prepare_data(config.model_copy(update={"data": data_cfg}), tokenizer))
    train = [{**e, "task_id": i} for i, part in enumerate(parts) for e in part.train]
    evals = [{**e, "task_id": i} for i, part in enumerate(parts) for e in part.eval]
    sources = list(config.data.train) + list(config.data.eval or [])
    info = d.data_info(
        sources,
        num_examples=sum(p.info.num_examples or 0 for p in parts),
        num_tokens=sum(p.info.num_tokens or 0 for p in parts),
        kind="sft" if config.objective.name == "sft" else "text",
    )
    return PreparedData(train=train, eval=evals, collator=parts[0].collator, info=info)


def _prepare_data(config: RunConfig, tokenizer: Any) -> PreparedData:
    from tunehub.trainer import data as d

    cfg = config.data
    objective = config.objective.name
    sources = list(cfg.train) + list(cfg.eval or [])
    if objective == "sft":
        train_records = d.read_sft_records(cfg.train, cfg.format)
        eval_records = d.read_sft_records(cfg.eval, cfg.format) if cfg.eval else None
        if eval_records is None:
            train_records, eval_records = d.split_records(train_records, cfg.eval_fraction, cfg.seed)
        num_examples = len(train_records) + len(eval_records)
        if tokenizer.pad_token_id is None:
            raise ConfigError("the base tokenizer has no pad token; set one in its tokenizer_config.json")
        train = d.tokenize_sft(train_records, tokenizer, cfg.max_length, config.objective.template)
        evals = d.tokenize_sft(eval_records, tokenizer, cfg.max_length, config.objective.template) if eval_records else []
        if cfg.packing:
            train = d.pack_examples(train, cfg.max_length)
            evals = d.pack_examples(evals, cfg.max_length) if evals else []
        collator = d.SFTCollator(tokenizer.pad_token_id)
    else:
        # raw text is split after it is cut into blocks: a corpus may be one long file
        train_texts = d.read_texts(cfg.train)
        eval_texts = d.read_texts(cfg.eval) if cfg.eval else []
        num_examples = len(train_texts) + len(eval_texts)
        if objective == "clm":
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            train = d.clm_blocks(train_texts, tokenizer, cfg.max_length)
            evals = d.clm_blocks(eval_texts, tokenizer, cfg.max_length) if eval_texts else []
            collator = d.SFTCollator(tokenizer.pad_token_id)
        else:
            nsp = config.objective.nsp
            train = d.mlm_examples(train_texts, tokenizer, cfg.max_length, nsp=nsp, seed=cfg.seed)
            evals = d.mlm_examples(eval_texts, tokenizer, cfg.max_length, nsp=nsp, seed=cfg.seed) if eval_texts else []
            collator = d.mlm_collator(
                tokenizer, config.objective.mlm_probability, config.objective.whole_word, seed=config.training.seed
            )
    if objective != "sft" and not cfg.eval:
        train, evals = d.split_records(train, cfg.eval_fraction, cfg.seed)
    if not train:
        from tunehub.errors import DataError

        raise DataError("no training examples are left after tokenization")
    num_tokens = sum(len(example["input_ids"]) for example in train)
    info = d.data_info(sources, num_examples=num_examples, num_tokens=num_tokens, kind="sft" if objective == "sft" else "text")
    return PreparedData(train=train, eval=evals, collator=collator, info=info)


# --- progress -----------------------------------------------------------------------------------
def progress_callback(total_steps: int) -> Any:
    """Rich progress on a terminal; plain log lines elsewhere (CI, files, pipes): INFO records of
    the ``tunehub.trainer`` logger, shown by the CLI's logging setup (``tunehub.logs``)."""
    from transformers import TrainerCallback

    interactive = sys.stderr.isatty()

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.bar = None
            self.task = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if interactive and state.is_world_process_zero:
                from rich.progress import (
                    BarColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(
                    TextColumn("[bold]training"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(),
                    transient=False,
                )
                self.bar.start()
                self.task = self.bar.add_task("train", total=total_steps, completed=state.global_step, info="")

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not state.is_world_process_zero or not logs:
                return
            shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
            if not shown:
                return
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            if self.bar is not None:
                self.bar.update(self.task, info=text)
            else:
                log.info("step %d/%d %s", state.global_step, total_steps, text)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.stop()

    return Progress()


# --- outputs ------------------------------------------------------------------------------------
def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def choose_optimizer(config: RunConfig) -> str:
    wanted = config.training.optimizer
    cuda = device_type() == "cuda"
    if wanted == "auto":
        wanted = "paged_adamw_8bit" if (config.base.quantization != "none" and cuda) else "adamw_torch"
    if wanted.startswith("paged") and not cuda:
        log.warning("notice: %s needs CUDA; using adamw_torch on this machine", wanted)
        wanted = "adamw_torch"
    return wanted


# --- parent chains (init.parent) ----------------------------------------------------------------
#: the most modules a chain applies (a longer lineage is refused; a cycle cannot loop)
CHAIN_DEPTH = 32
#: the trained adapter's name; PEFT saves the "default" adapter flat, and Trainer's resume reloads it
CHILD_ADAPTER = "default"


def parent_adapter_name(index: int) -> str:
    """The PEFT adapter name of the ``index``-th adapter parent, root first."""
    return f"parent{index}"


@dataclass(frozen=True)
class ParentChain:
    """What ``init.parent`` applies under the trained module, each pulled and verified, root first."""

    ref: str  # the direct parent's exact version, name@N: what the manifest records
    base_tensors: tuple[LocalModule, ...]  # selective modules, loaded into the base's own tensors
    adapters: tuple[LocalModule, ...]  # lora/dora/adalora/ia3 modules, frozen adapters of one PeftModel


def pull_parent_chain(config: RunConfig, base_dir: Path, store: ModuleStore) -> ParentChain:
    """Resolve ``init.parent`` and its own parents (``manifest.parent``, each an exact version),
    check every one against the run (base fingerprint, tokenizer, what can be stacked) from its
    verified manifest, then pull them all under the store's trust policy. Nothing is loaded.

    Raises:
        IncompatibleBase: a module of the chain was trained on another base (or tokenizer).
        ConfigError: a combination tunehub cannot train (see CHAIN_COMBINATIONS), a chain
            longer than CHAIN_DEPTH.
        ManifestError: a parent recorded by alias rather than exact version, or a cycle.
        UntrustedModule, ModuleNotFound, IntegrityError: as the store's pull raises them.
    """
    from tunehub.trainer.export import base_info, tokenizer_info

    if config.init.parent is None:
        raise ConfigError("init.parent is not set: there is no parent chain to pull")
    found: list[tuple[VersionInfo, Manifest]] = []  # the direct parent first
    ref: str | None = config.init.parent
    while ref is not None:
        if len(found) == CHAIN_DEPTH:
            raise ConfigError(f"init.parent: {config.init.parent} has more than {CHAIN_DEPTH} modules in its parent chain")
        info = store.resolve(ref)
        if any(info.ref == seen.ref for seen, _ in found):
            raise ManifestError(f"the parent chain of {config.init.parent} loops back to {info.ref}")
        store.check_trust(info)  # before its manifest is used (the pull below checks again)
        manifest = store.manifest(info.ref)
        found.append((info, manifest))
        ref = manifest.parent
        if ref is not None and ModuleRef.parse(ref).version is None:
            raise ManifestError(
                f"{info.ref} records its parent as {ref!r}, an alias, not an exact version (name@N): which"
                " version it was trained on is unknown, so its chain cannot be applied"
            )
    run_base = base_info(base_dir, config.base.quantization)
    run_tokenizer = tokenizer_info(base_dir)
    for info, manifest in found:
        if manifest.kind is ModuleKind.FULL:
            pulled = store.pull(info.ref)
            raise ConfigError(
                f"init.parent: {info.ref} is a full model, a base of its own, not a module to apply:"
                f" train on it with base.path: {pulled.path} (and no init.parent)"
            )
        _check_parent_base(info.ref, manifest, run_base, run_tokenizer)
    found.reverse()  # root first
    _check_stacking(config, [(info.ref, manifest) for info, manifest in found])
    modules = [store.pull(info.ref) for info, _ in found]
    return ParentChain(
        ref=found[-1][0].ref,
        base_tensors=tuple(m for m in modules if m.manifest.kind is ModuleKind.SELECTIVE),
        adapters=tuple(m for m in modules if m.manifest.kind is not ModuleKind.SELECTIVE),
    )


def _check_parent_base(ref: str, manifest: Manifest, run_base: Any, run_tokenizer: Any) -> None:
    from tunehub.registry.fingerprint import short_fingerprint

    if manifest.base.fingerprint != run_base.fingerprint:
        raise IncompatibleBase(
            f"parent {ref} was trained on base {manifest.base.model_id} (fingerprint"
            f" {short_fingerprint(manifest.base.fingerprint)}), this run trains on {run_base.model_id}"
            f" ({short_fingerprint(run_base.fingerprint)}): train on its base, or pick a parent of this one"
        )
    tokenizer = manifest.tokenizer
    if tokenizer is not None and run_tokenizer is not None and tokenizer.fingerprint != run_tokenizer.fingerprint:
        raise IncompatibleBase(
            f"parent {ref} was trained with another tokenizer (fingerprint {short_fingerprint(tokenizer.fingerprint)})"
            f" than this run's base has ({short_fingerprint(run_tokenizer.fingerprint)})"
        )


def _stacking_type(kind: ModuleKind) -> str | None:
    """The PEFT type a parent of ``kind`` is applied as (AdaLoRA as LoRA weights), or None."""
    peft_type = "LORA" if kind is ModuleKind.ADALORA else PEFT_TYPES.get(kind)
    return peft_type if peft_type in STACKING_PEFT_TYPES else None


def _check_stacking(config: RunConfig, chain: list[tuple[str, Manifest]]) -> None:
    """Refuse, before anything loads, a chain PEFT cannot train as one model."""
    from tunehub.trainer.methods import get_method

    method = config.method.name
    child_type = PEFT_TYPES.get(get_method(method).kind)
    task_type = None if config.objective.name == "mlm" else "CAUSAL_LM"
    problems = []
    for ref, manifest in chain:
        kind = manifest.kind
        if manifest.components:
            problems.append(f"{ref} carries several components ({', '.join(c.kind.value for c in manifest.components)})")
        elif kind is ModuleKind.SELECTIVE:
            if config.base.quantization != "none":
                problems.append(
                    f"{ref} is a selective module: its tensors replace the base's, which a {config.base.quantization}"
                    " base holds quantized (use base.quantization: none)"
                )
        elif _stacking_type(kind) is None:
            problems.append(f"{ref} is a {kind.value} module, which PEFT cannot run under another adapter")
        elif _stacking_type(kind) != child_type:
            problems.append(f"{ref} is a {kind.value} module and method {method} cannot be stacked on it")
        elif manifest.params.get("modules_to_save"):
            problems.append(f"{ref} trains whole modules (modules_to_save), which PEFT cannot keep active under a child")
        elif manifest.task_type != task_type:
            problems.append(f"{ref} has task type {manifest.task_type}, this run {task_type} (objective {config.objective.name})")
    adapters = [m for _, m in chain if m.kind is not ModuleKind.SELECTIVE]
    if adapters and getattr(config.method, "modules_to_save", None):
        problems.append("method.modules_to_save: a child on adapter parents trains adapters only (PEFT keeps one copy active)")
    if problems:
        raise ConfigError([f"init.parent: {p}" for p in problems] + [f"init.parent: supported chains are {CHAIN_COMBINATIONS}"])


def _adalora_as_lora(module: LocalModule, folder: Path) -> Path:
    """Write into ``folder`` the LoRA adapter that computes what the AdaLoRA ``module`` does:
    per layer A' = diag(E) A and B' = B * alpha / (init_r + 1e-5) (PEFT's AdaLoRA scale: a pruned
    layer keeps the ranknum it started with), zero-padded to the largest rank, with LoRA's own
    scale alpha / r = 1. PEFT runs adapters of one type together only, and AdaLoRA is a type of
    its own."""
    import torch
    from peft import LoraConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS_FILE
    from safetensors.torch import load_file, save_file

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(module.path / WEIGHTS_FILE)).items():
        layer, _, param = key.rpartition(".")
        if param not in ("lora_A", "lora_B", "lora_E"):
            raise IntegrityError(f"{module.ref}: {key} is not an AdaLoRA tensor (lora_A, lora_B or lora_E)")
        layers.setdefault(layer, {})[param] = tensor
    alpha = float(module.manifest.params.get("lora_alpha", 8))
    init_r = module.manifest.params.get("init_r")
    deltas = {}
    for layer, parts in sorted(layers.items()):
        if len(parts) != 3:
            raise IntegrityError(f"{module.ref}: AdaLoRA layer {layer} lacks one of lora_A, lora_B, lora_E")
        a, b, e = parts["lora_A"].float(), parts["lora_B"].float(), parts["lora_E"].float().reshape(-1, 1)
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank or e.shape[0] != rank:
            raise IntegrityError(
                f"{module.ref}: AdaLoRA layer {layer} has shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(e.shape)}"
            )
        if rank:  # a layer pruned to rank 0 adds nothing
            ranknum = float(init_r) if isinstance(init_r, int) and init_r >= rank else float(rank)
            deltas[layer] = (a * e, b * (alpha / (ranknum + 1e-5)))
    width = max((a.shape[0] for a, _ in deltas.values()), default=0)
    if not width:
        raise ConfigError(f"init.parent: {module.ref} is an AdaLoRA module pruned to rank 0 everywhere: it changes nothing")
    tensors = {}
    for layer, (a, b) in deltas.items():
        tensors[f"{layer}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, width - a.shape[0])).contiguous()
        tensors[f"{layer}.lora_B.weight"] = torch.nn.functional.pad(b, (0, width - b.shape[1])).contiguous()
    # saved keys are base_model.model.<module name>.lora_*: the module names are what LoRA targets
    targets = sorted(layer.removeprefix("base_model.model.") for layer in deltas)
    config = LoraConfig(r=width, lora_alpha=width, lora_dropout=0.0, target_modules=targets, task_type=module.manifest.task_type)
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def stack_on_parents(model: Any, parents: tuple[LocalModule, ...], child_config: Any, ctx: Any) -> Any:
    """One PeftModel over ``model``: each parent a frozen adapter (``parent0`` the root), the new
    ``default`` adapter trainable, all of them in the forward pass (PEFT sums LoRA deltas and
    multiplies IA3 scales over the active adapters). Saving selects ``default`` alone."""
    import tempfile

    from peft import PeftModel

    names = [parent_adapter_name(i) for i in range(len(parents))]
    with tempfile.TemporaryDirectory(prefix="tunehub-parents-") as scratch, peft_deprecations_silenced():
        folders = [
            _adalora_as_lora(parent, Path(scratch) / name) if parent.manifest.kind is ModuleKind.ADALORA else parent.path
            for name, parent in zip(names, parents)
        ]
        peft_model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0], is_trainable=False)
        for name, folder in zip(names[1:], folders[1:]):
            peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        try:
            peft_model.add_adapter(CHILD_ADAPTER, child_config)
        except ValueError as exc:
            raise _method_error(exc, ctx) from None
    activate_chain(peft_model, len(parents))
    return peft_model


def activate_chain(peft_model: Any, num_parents: int) -> None:
    """Put the child and its ``num_parents`` parent adapters in the forward pass, only the child trainable."""
    parents = [parent_adapter_name(i) for i in range(num_parents)]
    peft_model.set_adapter(CHILD_ADAPTER)  # the PeftModel's own adapter: its config is the active one, it is saved
    # the child first: Trainer's resume reloads the first active adapter as the trainable one
    peft_model.base_model.set_adapter([CHILD_ADAPTER, *parents])
    peft_model.set_requires_grad(parents, requires_grad=False)


def parents_kept_active(peft_model: Any, num_parents: int) -> Any:
    """A callback that puts the parents back in the forward pass when training begins: Trainer's
    resume reloads the adapters and leaves only the trained one active."""
    from transformers import TrainerCallback

    class ParentsActive(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            activate_chain(peft_model, num_parents)
            return control

    return ParentsActive()


# --- the run ------------------------------------------------------------------------------------
def train(
    config: RunConfig,
    *,
    resume: bool = False,
    push: str | None = None,
    registry: str | None = None,
    extra_callbacks: list[Any] | None = None,
    trust: TrustPolicy | None = None,
    sign: str | Path | None = None,
) -> TrainResult:
    """Train one module as ``config`` says; returns where it was written and what was measured.

    ``trust``: ``init.parent`` and its ancestors (and a method's ``init_from``) must pass this
    policy (checked in the registry before anything is loaded). ``sign``: sign the pushed version
    with this elliptic private key."""
    import torch
    from transformers import (
        AutoTokenizer,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from tunehub.trainer.methods import BuildContext, get_method

    started = time.perf_counter()
    check_launch(config, resume=resume)
    set_seed(config.training.seed)
    out_dir = Path(config.output.dir)
    checkpoints = out_dir / "checkpoints"
    module_dir = out_dir / "module"
    if resume and not _has_checkpoint(checkpoints):
        raise ConfigError(f"--resume: no checkpoint in {checkpoints}")

    method = get_method(config.method.name)
    method_cfg = config.method
    init_ref = method.init_module(method_cfg)
    init_module = None
    if init_ref is not None:  # a module the run starts from: pulled and verified before the base loads
        from tunehub.registry.store import open_store

        init_module = open_store(registry or config.output.registry, trust=trust).pull(init_ref)
    base_dir = resolve_base(config)
    chain = None
    if config.init.parent is not None:  # pulled, verified and checked against the base before it loads
        from tunehub.registry.store import open_store

        chain = pull_parent_chain(config, base_dir, open_store(registry or config.output.registry, trust=trust))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    extension = None
    if config.tokenizer is not None:  # the domain's words join the vocabulary: data is tokenized with them
        from tunehub.trainer.tokenizer_module import extend_for_run

        extension = extend_for_run(config, base_dir, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(extension.folder)
    prepared = prepare_data(config, tokenizer)

    tcfg = config.training
    if tcfg.cpu_allocator == "lean" and device_type() == "cpu":
        use_lean_cpu_allocator()  # before the model loads: the load's buffers are large too
    world = world_size()
    sharded = shards_base(config)
    steps_per_epoch = max(1, math.ceil(len(prepared.train) / (tcfg.batch_size * tcfg.gradient_accumulation_steps * world)))
    total_steps = tcfg.max_steps or max(1, math.ceil(steps_per_epoch * tcfg.epochs))

    model = load_base_model(base_dir, config)
    trainable_tokens = None
    if extension is not None:
        from tunehub.trainer.tokenizer_module import add_new_rows

        trainable_tokens = add_new_rows(model, extension, gradient_checkpointing=bool(tcfg.gradient_checkpointing))
    task_type: Literal["CAUSAL_LM"] | None = None if config.objective.name == "mlm" else "CAUSAL_LM"
    ctx = BuildContext(
        task_type=task_type,
        total_steps=total_steps,
        linear_module_names=linear_module_names(model),
        base_path=str(base_dir),
        init_module=init_module,
        num_tasks=len({e["task_id"] for e in prepared.train}) if method.task_ids is not None else 1,
        trainable_tokens=trainable_tokens,
    )
    if chain is not None and chain.base_tensors and sharded:
        raise ConfigError(
            "init.parent: a selective parent is loaded into the base's own tensors, which"
            " training.distributed: fsdp shards; use ddp"
        )
    if chain is not None:
        from tunehub.trainer.methods.selective import apply_selective

        for module in chain.base_tensors:  # root first: a later module's tensor replaces an earlier one's
            apply_selective(model, module.path)
    if method.prepare_model is not None:  # the base's own tensors, not a PEFT adapter
        peft_model = method.prepare_model(method_cfg, model, ctx)
    elif chain is not None and chain.adapters:
        peft_model = stack_on_parents(model, chain.adapters, method.build_peft_config(method_cfg, ctx), ctx)
    else:
        peft_model = _wrap(model, method.build_peft_config(method_cfg, ctx), ctx)

    trainable, total = _count_parameters(peft_model)
    eval_steps = tcfg.eval_steps or max(1, total_steps // 5)
    has_eval = bool(prepared.eval)
    cuda = device_type() == "cuda"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=total_steps,
        per_device_train_batch_size=tcfg.batch_size,
        per_device_eval_batch_size=tcfg.eval_batch_size or tcfg.batch_size,
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type=tcfg.lr_scheduler,
        warmup_steps=int(tcfg.warmup_ratio * total_steps),
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm,
        optim=choose_optimizer(config),
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=tcfg.save_steps or eval_steps,
        save_total_limit=tcfg.save_total_limit,
        # transformers checkpoints no optimizer state for a base sharded at load time (no --resume)
        save_only_model=sharded,
        logging_steps=tcfg.logging_steps,
        seed=tcfg.seed,
        data_seed=tcfg.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_backend="gloo" if (world > 1 and not cuda) else None,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        bf16=cuda and config.base.quantization != "none" and torch.cuda.is_bf16_supported(),
    )
    callbacks = [progress_callback(total_steps), *method.callbacks(method_cfg, peft_model), *(extra_callbacks or [])]
    if chain is not None and chain.adapters:
        callbacks.append(parents_kept_active(peft_model, len(chain.adapters)))
    if tcfg.save_steps is None and world == 1:
        # ranks would disagree on the clock, and a checkpoint only some ranks make deadlocks
        callbacks.append(checkpoint_pacing(tcfg.checkpoint_minutes))
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval or None,
        data_collator=prepared.collator,
        processing_class=tokenizer,  # lets Trainer count non-padding tokens of packed rows
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our progress callback reports instead
    output = trainer.train(resume_from_checkpoint=True if resume else None)
    history = list(trainer.state.log_history)
    metrics: dict[str, float] = {
        "train_loss": float(output.training_loss),
        "steps": float(trainer.state.global_step),
        "trainable_params": float(trainable),
        "total_params": float(total),
        "trainable_share": trainable / total if total else 0.0,
        "train_seconds": float(output.metrics.get("train_runtime", 0.0)),
    }
    last_losses = [h["loss"] for h in history if "loss" in h]
    if last_losses:
        metrics["final_train_loss"] = float(last_losses[-1])
    if has_eval:
        final_evals = [h for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        if final_evals:
            eval_loss = float(final_evals[-1]["eval_loss"])
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])
            history.append({"step": trainer.state.global_step, "eval_loss": eval_loss})
        metrics["eval_loss"] = eval_loss
        metrics["eval_perplexity"] = float(math.exp(min(eval_loss, 50.0)))
    tokens = float(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    metrics["tokens_seen"] = tokens
    if metrics["train_seconds"] > 0:
        metrics["tokens_per_s"] = tokens / metrics["train_seconds"]
    metrics["peak_memory_bytes"] = float(peak_memory_bytes())
    metrics["wall_seconds"] = time.perf_counter() - started

    manifest = None
    pushed = None
    state_dict = full_state_dict(peft_model) if sharded else None  # every rank takes part
    if trainer.is_world_process_zero():
        method.before_save(method_cfg, peft_model)
        # the exact version (name@N) applied, never an alias that may move. A module the run only
        # started from (init_from) is no parent: nothing of it is applied when the module serves;
        # the resolved config records its exact version instead
        parent = chain.ref if chain is not None else None
        started_from = init_module.ref if init_module is not None else None
        if extension is not None:
            metrics["fertility_after_vs_before"] = extension.report.fertility_ratio
        manifest = _write_module(
            module_dir,
            peft_model,
            base_dir,
            config,
            method,
            prepared,
            metrics,
            history,
            parent,
            started_from,
            state_dict,
            extension,
        )
        push = push or config.output.push
        if push:
            # the store directly, not tunehub.sdk: imports flow sdk -> trainer -> registry
            from tunehub.registry.store import open_store, push_signed

            store = open_store(registry or config.output.registry)
            pushed = store.push(module_dir, push) if sign is None else push_signed(store, module_dir, push, sign)
    return TrainResult(
        module_dir=module_dir, manifest=manifest, metrics=metrics, pushed=pushed, log_history=history, model=peft_model
    )


def full_state_dict(model: Any) -> dict[str, Any]:
    """The whole state of a model whose weights FSDP sharded, as plain CPU tensors on rank 0 (an
    empty dict elsewhere). A collective: every rank must call it. The module is then written from
    this, exactly as a one-process run writes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: gathered tensor by tensor into rank 0's memory, never whole on an accelerator
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def checkpoint_pacing(minutes: float) -> Any:
    """A callback that skips the checkpoints of the default cadence (one per evaluation) that
    would come less than ``minutes`` after the previous one. A checkpoint (weights, optimizer
    state, RNG) costs about as much as a few steps: five per run made short runs 7% slower, and a
    run of a few minutes is cheaper to redo than to checkpoint. Long runs still get one about
    every ``minutes``."""
    from transformers import TrainerCallback

    class CheckpointPacing(TrainerCallback):
        def __init__(self) -> None:
            self.interval_s = 60.0 * minutes
            self.last = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if control.should_save:
                now = time.monotonic()
                if now - self.last < self.interval_s:
                    control.should_save = False
                else:
                    self.last = now
            return control

    return CheckpointPacing()


def _wrap(model: Any, peft_config: Any, ctx: Any) -> Any:
    from peft import get_peft_model

    try:
        with peft_deprecations_silenced():
            return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise _method_error(exc, ctx) from None


def _method_error(exc: ValueError, ctx: Any) -> ConfigError:
    """PEFT's refusal of the method's config, as the config problem it is."""
    text = str(exc)
    if "not found in the base model" in text or "Target modules" in text:
        return ConfigError(
            f"method.target_modules matches no layer of the base ({text.splitlines()[0]}); "
            f"its linear layers are: {', '.join(ctx.linear_module_names)}"
        )
    return ConfigError(f"method: {text}")


def _count_parameters(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if hasattr(param, "quant_state") or type(param).__name__ == "Params4bit":
            count *= 2  # 4-bit weights pack two values per byte element
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.startswith("checkpoint-") for p in folder.iterdir())


def _write_module(
    module_dir: Path,
    peft_model: Any,
    base_dir: Path,
    config: RunConfig,
    method: Any,
    prepared: PreparedData,
    metrics: dict[str, float],
    history: list[dict[str, Any]],
    parent: str | None,
    started_from: str | None = None,
    state_dict: dict[str, Any] | None = None,
    extension: Any = None,
) -> Manifest:
    import shutil

    from tunehub.trainer.export import save_peft_module

    if module_dir.exists():
        shutil.rmtree(module_dir)
    module_dir.mkdir(parents=True)
    # metrics.json and loss.png go in first so that the manifest hashes them with the weights
    (module_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    plot_losses(history, module_dir / "loss.png")
    fields: dict[str, Any] = {
        "base_path": base_dir,
        "quantization": config.base.quantization,
        "objective": config.objective.name,
        "task": config.output.task,
        "parent": parent,
        "data": prepared.info,
        "metrics": metrics,
        "config": config.resolved(),
        "description": config.output.description,
    }
    if started_from is not None:  # the exact version the run started from, not the alias it named
        fields["config"]["method"]["init_from"] = started_from
    if extension is not None:  # a tokenizer module, the method's adapter (if any) a component of it
        from tunehub.trainer.tokenizer_module import save_tokenizer_module

        task_type = None if config.objective.name == "mlm" else "CAUSAL_LM"
        return save_tokenizer_module(peft_model, module_dir, extension, method, task_type=task_type, **fields)
    if method.save_module is not None:  # never with a sharded base (refused by the config)
        task_type = None if config.objective.name == "mlm" else "CAUSAL_LM"
        return method.save_module(config.method, peft_model, module_dir, task_type=task_type, **fields)
    return save_peft_module(peft_model, module_dir, kind=method.kind, state_dict=state_dict, **fields)
