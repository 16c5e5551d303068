"""The module format: a typed ``manifest.json``, the one source of truth of a task module.

A module is a folder::

    manifest.json               this file (typed, schema_version, validated on read)
    adapter_config.json         PEFT's config, written from the manifest where PEFT can load the kind
    adapter_model.safetensors   weights; safetensors only, pickles are refused everywhere
    README.md                   model card with Hub-style YAML front matter
    metrics.json, loss.png      what training measured (optional)

``files`` in the manifest records the sha256 of every other file, so a module is verified as a
whole. Dispatch is always on ``kind``; nothing sniffs which files exist.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunehub.errors import ManifestError, UnsupportedSchemaVersion

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MODEL_CARD_FILE = "README.md"


class ModuleKind(str, Enum):
    LORA = "lora"
    DORA = "dora"
    ADALORA = "adalora"
    IA3 = "ia3"
    BOTTLENECK = "bottleneck"
    PROMPT = "prompt"
    PREFIX = "prefix"
    PTUNING = "ptuning"
    MULTITASK_PROMPT = "multitask_prompt"
    SELECTIVE = "selective"
    FULL = "full"
    TOKENIZER = "tokenizer"
    TEMPLATE = "template"


#: kinds PEFT loads with ``PeftModel.from_pretrained``, and their ``peft_type``
PEFT_TYPES: dict[ModuleKind, str] = {
    ModuleKind.LORA: "LORA",
    ModuleKind.DORA: "LORA",
    ModuleKind.ADALORA: "ADALORA",
    ModuleKind.IA3: "IA3",
    # not one of PEFT's own: tunehub registers it with PEFT (tunehub.peft_methods), so PEFT loads
    # it in a process that imported tunehub.trainer
    ModuleKind.BOTTLENECK: "BOTTLENECK",
    ModuleKind.PROMPT: "PROMPT_TUNING",
    ModuleKind.PREFIX: "PREFIX_TUNING",
    ModuleKind.PTUNING: "P_TUNING",
    ModuleKind.MULTITASK_PROMPT: "MULTITASK_PROMPT_TUNING",
}

Objective = Literal["sft", "clm", "mlm"]
Quantization = Literal["nf4", "int8", "none"]


class _Strict(BaseModel):
    # extra="forbid": a manifest with keys we do not know is an error, never silently dropped
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseInfo(_Strict):
    """The base model a module was trained against."""

    model_id: str = Field(description="local path or hub id the base was loaded from")
    revision: str | None = Field(default=None, description="hub commit of the base, when known")
    fingerprint: str = Field(
        description="identifies the base's weights: 'hub1:' (Hub commit) or 'w1:' (content hash), see registry/fingerprint.py"
    )
    quantization: Quantization = "none"
    architecture: str | None = None
    vocab_size: int | None = None


class TokenizerInfo(_Strict):
    fingerprint: str
    vocab_size: int
    added_tokens: list[str] = Field(default_factory=list)


class DataInfo(_Strict):
    sha256: str
    sources: list[str] = Field(default_factory=list)
    num_examples: int | None = None
    num_tokens: int | None = None


class Component(_Strict):
    """One part of a module that carries several (e.g. a tokenizer plus a LoRA)."""

    kind: ModuleKind
    params: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    kind: ModuleKind
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's parameters, in PEFT's vocabulary where PEFT has the method",
    )
    components: list[Component] = Field(default_factory=list)
    base: BaseInfo
    tokenizer: TokenizerInfo | None = None
    objective: Objective | None = None
    task: str | None = None
    task_type: str | None = Field(default="CAUSAL_LM", description="PEFT task type; None for encoder bases")
    parent: str | None = Field(default=None, description="reference of the module this one was trained on")
    data: DataInfo | None = None
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256 of every file")
    metrics: dict[str, float] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict, description="the resolved training config")
    description: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    library_versions: dict[str, str] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _check_file_entries(cls, files: dict[str, str]) -> dict[str, str]:
        from tunehub.registry.files import check_relative_path, is_sha256

        for path, digest in files.items():
            check_relative_path(path)
            if path == MANIFEST_FILE:
                raise ValueError("manifest.json cannot list itself in files")
            if not is_sha256(digest):
                raise ValueError(f"files[{path!r}] is not a sha256 hex digest")
        return files

    @model_validator(mode="after")
    def _kind_matches_params(self) -> "Manifest":
        if self.kind is ModuleKind.LORA and self.params.get("use_dora"):
            raise ValueError("kind is lora but params.use_dora is true: a DoRA module has kind dora")
        if self.kind is ModuleKind.DORA and self.params.get("use_dora") is False:
            raise ValueError("kind is dora but params.use_dora is false")
        return self

    # --- serialisation -------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest.json") -> "Manifest":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{source} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, source)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "manifest.json") -> "Manifest":
        if not isinstance(raw, dict):
            raise ManifestError(f"{source} must hold a JSON object")
        version = raw.get("schema_version")
        if version is None:
            raise ManifestError(f"{source} has no schema_version")
        if version != SCHEMA_VERSION:
            raise UnsupportedSchemaVersion(
                f"{source} has schema_version {version!r}; this tunehub reads version {SCHEMA_VERSION}"
                + (" (upgrade tunehub)" if isinstance(version, int) and version > SCHEMA_VERSION else "")
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())
            raise ManifestError(f"{source} is invalid: {problems}") from None

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"{folder} has no {MANIFEST_FILE}: it is not a tunehub module") from None
        return cls.from_json(text, str(path))

    # --- derived views -------------------------------------------------------------------------
    @property
    def peft_loadable(self) -> bool:
        return self.kind in PEFT_TYPES

    def peft_component(self) -> Component | None:
        """The one component PEFT loads from this module's ``adapter_config.json`` (a tokenizer
        module's LoRA), for a kind PEFT has no type for; else None."""
        if self.kind in PEFT_TYPES:
            return None
        parts = [part for part in self.components if part.kind in PEFT_TYPES]
        return parts[0] if len(parts) == 1 else None

    def adapter_config(self) -> dict[str, Any] | None:
        """PEFT's ``adapter_config.json`` for this module (or for its PEFT component), or None
        where PEFT has no such kind."""
        kind, params = self.kind, self.params
        component = self.peft_component()
        if component is not None:
            kind, params = component.kind, component.params
        peft_type = PEFT_TYPES.get(kind)
        if peft_type is None:
            return None
        config = dict(params)
        config["peft_type"] = peft_type
        config["task_type"] = self.task_type
        config["base_model_name_or_path"] = self.base.model_id
        config["revision"] = self.base.revision
        config["inference_mode"] = True
        if kind is ModuleKind.DORA:
            config["use_dora"] = True
        return config

    def with_updates(self, **changes: Any) -> "Manifest":
        return self.model_validate({**self.model_dump(), **changes})


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
