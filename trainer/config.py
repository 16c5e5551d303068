"""Run configuration: typed classes that a YAML file maps onto.

``load_run_config(path, overrides)`` reports every unknown key, bad value and invalid
combination at once, as one :class:`~tunehub.errors.ConfigError`, before any model loads. The
resolved config (every default filled in) is stored in the module's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model, field_validator

from tunehub.errors import ConfigError
from tunehub.registry.manifest import PEFT_TYPES
from tunehub.registry.refs import ModuleRef
from tunehub.trainer.methods import MethodConfig, get_method, method_config_classes, method_names, not_trainable_message

#: PEFT types whose adapters PEFT runs together when several are active (LoRA sums the deltas,
#: IA3 multiplies the scales): the ones a child adapter is trained on top of, frozen, in one PeftModel
STACKING_PEFT_TYPES = frozenset({"LORA", "IA3"})
#: what init.parent supports, for messages
CHAIN_COMBINATIONS = (
    "lora, dora or adalora parents under a lora or dora child; ia3 parents under an ia3 child;"
    " selective parents (base.quantization: none) under any method"
)


def stacks_on_adapters(method_name: str) -> bool:
    """Whether ``method_name`` trains an adapter PEFT can stack on parent adapters (lora, dora, ia3)."""
    return PEFT_TYPES.get(get_method(method_name).kind) in STACKING_PEFT_TYPES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(_Section):
    path: str = Field(description="local model folder or hub id")
    revision: str | None = Field(default=None, description="hub revision (hub ids only)")
    quantization: Literal["nf4", "int8", "none"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="weights dtype for unquantized bases")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="what nf4 layers compute in; auto: bf16 (QLoRA) where the hardware does bf16 natively, else fp32",
    )


class ObjectiveConfig(_Section):
    name: Literal["sft", "clm", "mlm"]
    template: str | None = Field(default=None, description="sft chat template: a built-in name or None for the tokenizer's")
    mlm_probability: float = Field(default=0.15, gt=0, lt=1)
    whole_word: bool = False
    nsp: bool = Field(default=False, description="mlm: add next-sentence pairs built from the text (BERT)")


class DataConfig(_Section):
    train: list[str] = Field(description="files or folders: JSONL for sft, text for clm/mlm")
    eval: list[str] | None = None
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    format: Literal["auto", "prompt_completion", "chat"] = "auto"
    max_length: int = Field(default=512, ge=8)
    packing: bool = False
    seed: int = 0

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainingConfig(_Section):
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=4, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = "auto"
    eval_steps: int | None = Field(default=None, gt=0, description="default: about 5 evaluations per run")
    save_steps: int | None = Field(
        default=None, gt=0, description="checkpoint interval; default: at evaluations, at most one per checkpoint_minutes"
    )
    checkpoint_minutes: float = Field(
        default=10.0, gt=0, description="with save_steps unset: the least time between two checkpoints (one process runs)"
    )
    save_total_limit: int = Field(default=2, gt=0)
    logging_steps: int = Field(default=10, gt=0)
    gradient_checkpointing: bool | None = Field(
        default=None, description="recompute activations in backward; default: on for nf4/int8 bases (QLoRA), off otherwise"
    )
    cpu_allocator: Literal["auto", "lean", "default"] = Field(
        default="auto",
        description="CPU training only: lean returns freed activation memory to the OS (lower peak, some speed);"
        " auto: lean for nf4/int8 bases (QLoRA is for memory), default otherwise",
    )
    seed: int = 0
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="several processes (accelerate launch, torchrun): ddp keeps the whole base on each; fsdp shards"
        " the base's weights across them (transformers' FSDP2, full-precision bases), the trained adapter stays whole"
        " on each; ignored by one process",
    )


class InitConfig(_Section):
    """What the run starts from besides the base."""

    parent: str | None = Field(
        default=None,
        description="registry reference of a module (and its own parents) applied, frozen, under the trained one;"
        " the manifest records its exact version as the parent",
    )

    @field_validator("parent")
    @classmethod
    def _valid_ref(cls, value: str | None) -> str | None:
        if value is not None:
            ModuleRef.parse(value)
        return value


class TokenizerExtendConfig(_Section):
    """Extend the base's tokenizer with a domain's words before training (``tunehub tokenizer
    extend``'s choice); the run then trains the new rows and writes a ``tokenizer`` module."""

    corpus: list[str] = Field(description="UTF-8 domain text, one document per line: files or folders")
    max_new: int = Field(gt=0, le=1_000_000, description="add at most this many tokens")
    heldout: str | None = Field(
        default=None, description="a file of held-out domain text to measure on; null: 10% of the corpus's lines"
    )
    init: Literal["subword-mean", "mean"] = Field(
        default="subword-mean", description="new rows start as the mean of the token's old pieces' rows, or of all rows"
    )
    min_frequency: int = Field(default=2, ge=1, description="add only words seen at least this often")

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TokenizerConfig(_Section):
    extend: TokenizerExtendConfig


class OutputConfig(_Section):
    dir: str
    task: str | None = None
    description: str | None = None
    push: str | None = Field(default=None, description="push the result to this name ([namespace/]name)")
    registry: str | None = Field(default=None, description="registry of output.push and init.parent (default: TUNEHUB_REGISTRY)")

    @field_validator("push")
    @classmethod
    def _valid_ref(cls, value: str | None) -> str | None:
        if value is not None:
            ModuleRef.parse(value)
        return value


class RunConfig(_Section):
    """A whole run. Build it with :func:`validate_run_config` or :func:`load_run_config`: they
    validate ``method`` as the discriminated union (on ``name``) of every registered method's
    config, so ``config.method`` is that method's typed config (``LoraMethodConfig``, ...)."""

    base: BaseModelConfig
    # SerializeAsAny: dumps carry the concrete method's fields, not only MethodConfig's `name`
    method: SerializeAsAny[MethodConfig] = Field(description="name: lora|dora|adalora|..., plus the method's parameters")
    objective: ObjectiveConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    tokenizer: TokenizerConfig | None = Field(
        default=None, description="extend: {corpus, max_new, heldout, init}: a domain vocabulary trained with the method"
    )
    output: OutputConfig

    def resolved(self) -> dict[str, Any]:
        """Every field with defaults filled in (method included), JSON-safe."""
        return json.loads(self.model_dump_json())


_RUN_CONFIG_CLASSES: dict[tuple[type[MethodConfig], ...], type[RunConfig]] = {}


def run_config_class() -> type[RunConfig]:
    """:class:`RunConfig` with ``method`` typed as the union of the registered methods' configs,
    told apart by ``name``. Built once per set of methods (a method registered later gets a new
    class), so a method folder is all it takes to make a new ``method.name`` valid."""
    classes = tuple(method_config_classes())
    cls = _RUN_CONFIG_CLASSES.get(classes)
    if cls is None:
        union: Any = Annotated[Union[classes], Field(discriminator="name")]  # built at run time from the registry
        cls = create_model(
            "RunConfig",
            __base__=RunConfig,
            method=(union, Field(description="name: " + "|".join(method_names()) + ", plus the method's parameters")),
        )
        _RUN_CONFIG_CLASSES[classes] = cls
    return cls


#: what a config that still names output.parent is told (it only recorded a name; init.parent applies the module)
OUTPUT_PARENT_MOVED = "moved to init.parent: the parent module is now applied, frozen, while training"


def _format_errors(exc: ValidationError) -> list[str]:
    tags = method_names()
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        if len(loc) > 1 and loc[0] == "method" and loc[1] in tags:
            del loc[1]  # the union's branch: "method.r", as the YAML spells it
        where = ".".join(str(p) for p in loc)
        message = err["msg"]
        if err["type"] == "extra_forbidden" and loc == ["output", "parent"]:
            problems.append(f"output.parent {OUTPUT_PARENT_MOVED}")
            continue
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "union_tag_invalid":
            where = "method.name"
            name = err["input"].get("name")
            refusal = not_trainable_message(name) if isinstance(name, str) else None
            message = refusal or f"{name!r} is not a method; choose one of {', '.join(tags)}"
        elif err["type"] == "union_tag_not_found":
            where = "method.name"
            message = f"missing; choose one of {', '.join(tags)}"
        problems.append(f"{where}: {message}")
    return problems


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply ``key.path=value`` strings in place (values parsed as YAML); returns problems."""
    problems = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    return problems


def validate_run_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a raw mapping; all problems at once, as one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source} must be a mapping of sections (base, method, objective, data, training, init, tokenizer, output)"
        )
    try:
        config = run_config_class().model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    problems = combination_problems(config)
    if problems:
        raise ConfigError(problems)
    quantized = config.base.quantization != "none"
    if config.training.gradient_checkpointing is None:  # resolved here, so the manifest records it
        config.training.gradient_checkpointing = quantized and get_method(config.method.name).gradient_checkpointing
    if config.training.cpu_allocator == "auto":
        config.training.cpu_allocator = "lean" if quantized else "default"
    return config


def combination_problems(config: RunConfig) -> list[str]:
    """Checks across sections, made before any model loads."""
    problems = []
    objective = config.objective.name
    if config.data.packing and objective == "mlm":
        problems.append("data.packing: packing applies to sft and clm, not mlm")
    if objective != "mlm" and (config.objective.nsp or config.objective.whole_word):
        problems.append("objective.nsp/whole_word: only for the mlm objective")
    if objective != "sft" and config.objective.template:
        problems.append("objective.template: only for the sft objective")
    if config.training.optimizer.startswith("paged") and config.base.quantization == "none":
        problems.append("training.optimizer: paged optimizers are for quantized (nf4/int8) bases; use adamw_torch")
    problems += [f"method: {p}" for p in get_method(config.method.name).check(config.method, config)]
    if config.training.distributed == "fsdp":
        if config.base.quantization != "none":
            problems.append(
                f"training.distributed: fsdp shards full-precision weights; a {config.base.quantization} base's"
                " bitsandbytes weights cannot be sharded (use ddp, or base.quantization: none)"
            )
        if get_method(config.method.name).prepare_model is not None:
            problems.append(
                f"training.distributed: fsdp trains adapters on a sharded base; {config.method.name} trains the"
                " base's own tensors (use ddp)"
            )
    if config.init.parent and config.base.quantization != "none" and not stacks_on_adapters(config.method.name):
        # a quantized base takes no selective parent, and only these methods stack on adapter parents
        problems.append(
            f"init.parent: on a {config.base.quantization} base a chain stacks adapters only ({CHAIN_COMBINATIONS});"
            f" {config.method.name} cannot be trained on a parent there"
        )
    problems += _tokenizer_problems(config)
    for key in ("train", "eval"):
        for source in getattr(config.data, key) or []:
            if not Path(source).exists():
                problems.append(f"data.{key}: {source} does not exist")
    base_dir = Path(config.base.path)
    if base_dir.exists():
        arch = _architecture(base_dir)
        if arch is None:
            problems.append(f"base.path: {base_dir} is not a model folder (no config.json)")
        else:
            is_encoder = arch.endswith(("MaskedLM", "ForPreTraining")) or arch.startswith(("Bert", "Roberta"))
            if objective == "mlm" and not is_encoder:
                problems.append(f"objective mlm needs an encoder (masked LM) base; {base_dir} is {arch}")
            if objective in ("sft", "clm") and is_encoder:
                problems.append(f"objective {objective} needs a causal LM base; {base_dir} is {arch}")
            if config.objective.nsp and not arch.startswith("Bert"):
                problems.append("objective.nsp: next-sentence prediction needs a BERT-style base")
    elif base_dir.is_absolute() or config.base.path.startswith((".", "~")) or config.base.path.count("/") > 1:
        problems.append(f"base.path: {config.base.path} does not exist")
    return problems


def _tokenizer_problems(config: RunConfig) -> list[str]:
    """A ``tokenizer`` section: what it combines with (the extended vocabulary is trained by
    PEFT's trainable tokens beside the method's adapter, on a causal LM)."""
    method = get_method(config.method.name)
    if config.tokenizer is None:
        if config.method.name == "tokenizer":
            return ["method: tokenizer trains the rows of new tokens: add tokenizer: {extend: {corpus: PATH, max_new: N}}"]
        return []
    problems = []
    able = sorted(name for name in method_names() if get_method(name).trainable_tokens)
    if not method.trainable_tokens:
        problems.append(
            f"tokenizer: method {config.method.name} cannot train new tokens' rows beside its adapter;"
            f" use one of {', '.join(able)} (tokenizer: the new rows alone)"
        )
    if config.objective.name not in ("clm", "sft"):
        problems.append(
            f"tokenizer: extending the vocabulary trains a causal LM's new rows (objective clm or sft), not {config.objective.name}"
        )
    if config.init.parent is not None:
        problems.append(
            "tokenizer: a run that extends the vocabulary cannot train on an init.parent chain (its parents know no new tokens)"
        )
    if config.training.distributed == "fsdp":
        problems.append("tokenizer: PEFT's trainable tokens do not train on a base FSDP shards; use training.distributed: ddp")
    extend = config.tokenizer.extend
    for source in [*extend.corpus, *([extend.heldout] if extend.heldout else [])]:
        if not Path(source).exists():
            problems.append(f"tokenizer.extend: {source} does not exist")
    return problems


def _architecture(base_dir: Path) -> str | None:
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(architectures[0])


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML, apply ``--set`` overrides, validate everything at once.

    Relative data and output paths are taken relative to the YAML file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    problems = apply_overrides(raw, overrides or [])
    if problems:
        raise ConfigError(problems)
    _anchor_paths(raw, path.parent)
    return validate_run_config(raw, str(path))


def _anchor_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make relative file paths in the YAML relative to the YAML's folder, as users expect."""

    def anchor(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            return str((folder / value).resolve())
        return value

    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if isinstance(data.get(key), list):
                data[key] = [anchor(v) for v in data[key]]
            else:
                data[key] = anchor(data.get(key))
    base = raw.get("base")
    if isinstance(base, dict):
        base["path"] = anchor(base.get("path"))
    tokenizer = raw.get("tokenizer")
    extend = tokenizer.get("extend") if isinstance(tokenizer, dict) else None
    if isinstance(extend, dict):
        corpus = extend.get("corpus")
        extend["corpus"] = [anchor(v) for v in corpus] if isinstance(corpus, list) else anchor(corpus)
        extend["heldout"] = anchor(extend.get("heldout"))
