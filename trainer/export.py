"""Turn a trained PEFT model into a tunehub module folder (weights + manifest + PEFT config + card).

The manifest is the one source of truth: PEFT's own ``adapter_config.json`` is rewritten from
it by ``write_module``, so the parameters recorded here must be exactly what PEFT needs to load
the module again (``peft_params``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from enum import Enum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Mapping

from tunehub.errors import ConfigError
from tunehub.registry.fingerprint import (
    base_fingerprint,
    hub_snapshot,
    tokenizer_fingerprint,
)
from tunehub.registry.manifest import (
    PEFT_TYPES,
    SCHEMA_VERSION,
    BaseInfo,
    DataInfo,
    Manifest,
    ModuleKind,
    Objective,
    Quantization,
    TokenizerInfo,
)
from tunehub.registry.module import write_module

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

#: keys of PEFT's config that ``Manifest.adapter_config()`` regenerates from the manifest itself
REGENERATED_KEYS = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"})

_PEFT_README = "README.md"


def _json_safe(value: Any, where: str) -> Any:
    """A JSON-representable copy of ``value``; refuses what it cannot represent faithfully."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"config value {where} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, Enum):
        return _json_safe(value.value, where)
    if isinstance(value, (set, frozenset)):
        # sets: sorted so that the same config always serialises (and hashes) the same way
        return sorted((_json_safe(item, where) for item in value), key=lambda item: json.dumps(item))
    if isinstance(value, (list, tuple)):
        return [_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item, f"{where}.{key}") for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_safe(dataclasses.asdict(value), where)
    if isinstance(value, PurePath):
        return str(value)
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    raise ConfigError(f"config value {where} has type {type(value).__name__}, which tunehub cannot record")


def peft_params(peft_config: PeftConfig | Mapping[str, Any]) -> dict[str, Any]:
    """PEFT's config as a JSON-safe dict, without the keys the manifest regenerates.

    ``Manifest(params=peft_params(cfg), ...).adapter_config()`` is then a config PEFT loads.
    """
    raw = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    return {key: _json_safe(value, key) for key, value in raw.items() if key not in REGENERATED_KEYS}


def _read_config(base_path: Path) -> dict[str, Any]:
    config_path = base_path / "config.json"
    try:
        return json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{base_path} has no config.json: it is not a model folder") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None


def base_info(
    base_path: str | Path,
    quantization: Quantization = "none",
    *,
    model_id: str | None = None,
    revision: str | None = None,
) -> BaseInfo:
    """Describe the base model folder ``base_path``: fingerprint, architecture, vocabulary size.

    ``model_id`` overrides the recorded id (e.g. a hub id whose files sit in a local snapshot).
    A Hugging Face cache snapshot folder records its repo id and commit unless they are given.
    """
    path = Path(base_path)
    config = _read_config(path)
    architectures = config.get("architectures") or []
    # multimodal configs nest the language model's vocabulary under text_config
    vocab_size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    snapshot = hub_snapshot(path)  # its folder is named by the commit: the repo id says more
    return BaseInfo(
        model_id=model_id or (snapshot.repo_id if snapshot else base_display_name(path)),
        revision=revision or (snapshot.revision if snapshot else None),
        fingerprint=base_fingerprint(path),
        quantization=quantization,
        architecture=architectures[0] if architectures else config.get("model_type"),
        vocab_size=vocab_size,
    )


def base_display_name(base_path: str | Path) -> str:
    """The name a local base is recorded under: its folder's name, never the path.

    A path would leak the user's directories into every manifest, ``adapter_config.json`` and
    model card that leaves the machine (and the Hub refuses a card whose ``base_model`` is a
    path); the folder's name is also the name ``tunehub serve`` gives that base.
    """
    return Path(base_path).expanduser().resolve().name


def tokenizer_info(path: str | Path) -> TokenizerInfo | None:
    """Fingerprint of the fast tokenizer in ``path``, or None when it holds no ``tokenizer.json``."""
    tokenizer_file = Path(path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    fingerprint, size = tokenizer_fingerprint(path)
    data = json.loads(tokenizer_file.read_text())
    # special tokens belong to the tokenizer's design; the non-special added ones are domain additions
    added = [tok["content"] for tok in data.get("added_tokens", []) if not tok.get("special", False)]
    return TokenizerInfo(fingerprint=fingerprint, vocab_size=size, added_tokens=added)


def _library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import tunehub

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tunehub": tunehub.__version__,
    }


def _check_kind(kind: ModuleKind, peft_config: Any) -> None:
    expected = PEFT_TYPES.get(kind)
    peft_type = _json_safe(getattr(peft_config, "peft_type", None), "peft_type")
    if expected is not None and peft_type != expected:
        raise ConfigError(f"a {kind.value} module needs a {expected} PEFT config, got {peft_type}")
    use_dora = bool(getattr(peft_config, "use_dora", False))
    if kind is ModuleKind.DORA and not use_dora:
        raise ConfigError("a dora module needs a LoraConfig with use_dora=True")
    if kind is ModuleKind.LORA and use_dora:
        raise ConfigError("this LoraConfig has use_dora=True: save it as kind 'dora', not 'lora'")


def _save_adapter_files(peft_model: PeftModel, adapter: str, out_dir: Path, state_dict: dict[str, Any] | None = None) -> None:
    # PEFT writes a non-default adapter into a subfolder named after it; save aside and move the
    # files up so every module has one flat layout whatever the adapter was called
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".peft-save-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True, selected_adapters=[adapter], state_dict=state_dict)
        source = staging if adapter == "default" else staging / adapter
        for item in source.iterdir():
            if item.name == _PEFT_README or item.is_dir():
                continue  # our model card replaces PEFT's README
            shutil.move(str(item), out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_peft_module(
    peft_model: PeftModel,
    out_dir: str | Path,
    *,
    base_path: str | Path,
    kind: ModuleKind | str,
    quantization: Quantization = "none",
    objective: Objective | None = None,
    task: str | None = None,
    parent: str | None = None,
    data: DataInfo | dict[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    config: dict[str, Any] | None = None,
    description: str | None = None,
    adapter_name: str | None = None,
    base_model_id: str | None = None,
    tokenizer_path: str | Path | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Manifest:
    """Save the active (or ``adapter_name``) adapter of ``peft_model`` as a module in ``out_dir``.

    The folder then passes ``verify_module`` and loads with ``peft.PeftModel.from_pretrained``.
    ``tokenizer_path`` (default: ``base_path``) is the tokenizer the module was trained with.
    ``state_dict``: the model's full state (as ``peft_model.state_dict()`` keys it) to take the
    adapter's tensors from, for a model whose own tensors are sharded (FSDP).
    Returns the written manifest (with ``files`` filled in).
    """
    try:
        kind = ModuleKind(kind)
    except ValueError:
        raise ConfigError(f"unknown module kind {kind!r}; kinds: {', '.join(k.value for k in ModuleKind)}") from None
    adapter = adapter_name or peft_model.active_adapter
    if adapter not in peft_model.peft_config:
        raise ConfigError(f"the PEFT model has no adapter {adapter!r}; it has {sorted(peft_model.peft_config)}")
    peft_config = peft_model.peft_config[adapter]
    _check_kind(kind, peft_config)
    # None is PEFT's own choice for encoders (masked LM): the module then loads as a plain PeftModel
    task_type = _json_safe(peft_config.task_type, "task_type")

    out_dir = Path(out_dir)
    _save_adapter_files(peft_model, adapter, out_dir, state_dict)
    return save_module_files(
        out_dir,
        kind=kind,
        params=peft_params(peft_config),
        task_type=task_type,
        base_path=base_path,
        quantization=quantization,
        objective=objective,
        task=task,
        parent=parent,
        data=data,
        metrics=metrics,
        config=config,
        description=description,
        base_model_id=base_model_id,
        tokenizer_path=tokenizer_path,
    )


def save_module_files(
    out_dir: str | Path,
    *,
    kind: ModuleKind,
    params: dict[str, Any],
    base_path: str | Path,
    task_type: str | None = "CAUSAL_LM",
    quantization: Quantization = "none",
    objective: Objective | None = None,
    task: str | None = None,
    parent: str | None = None,
    data: DataInfo | dict[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    config: dict[str, Any] | None = None,
    description: str | None = None,
    base_model_id: str | None = None,
    tokenizer_path: str | Path | None = None,
    components: list[dict[str, Any]] | None = None,
) -> Manifest:
    """Finish a module folder whose weights are already in ``out_dir``: the manifest (base
    fingerprint, tokenizer, data, metrics, resolved config), PEFT's config where the kind (or
    its one PEFT component, in ``components``: ``{"kind", "params"}``) has one, the model card,
    every file hashed. Returns the written manifest."""
    raw = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "params": params,
        "components": components or [],
        "base": base_info(base_path, quantization, model_id=base_model_id),
        "tokenizer": tokenizer_info(tokenizer_path if tokenizer_path is not None else base_path),
        "objective": objective,
        "task": task,
        "task_type": task_type,
        "parent": parent,
        "data": data,
        "metrics": {key: float(value) for key, value in (metrics or {}).items()},
        "config": _json_safe(config or {}, "config"),
        "description": description,
        "library_versions": _library_versions(),
    }
    manifest = Manifest.from_dict(raw, source=f"manifest for {out_dir}")
    return write_module(Path(out_dir), manifest)


__all__ = [
    "REGENERATED_KEYS",
    "base_display_name",
    "base_info",
    "peft_params",
    "save_module_files",
    "save_peft_module",
    "tokenizer_info",
]
