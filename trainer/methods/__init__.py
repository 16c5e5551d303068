"""Training methods, one folder each. A folder's ``__init__`` calls :func:`register_method`;
:func:`discover` imports every folder here, so adding a method is adding a folder.

A method says which module ``kind`` it produces, which typed config it takes (the ``method:``
section of a run YAML), how to turn that into a PEFT config, what it checks across sections
before any model loads, and which callbacks the loop must run (AdaLoRA's rank budget).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict

from tunehub.errors import ConfigError
from tunehub.registry.manifest import ModuleKind

if TYPE_CHECKING:
    from tunehub.trainer.config import RunConfig


class MethodConfig(BaseModel):
    """Base of every method's config: ``name`` plus the method's own typed fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


@dataclass(frozen=True)
class BuildContext:
    """What a method needs to know about the run to build its PEFT config."""

    task_type: Literal["CAUSAL_LM"] | None  # None for encoder (masked LM) bases
    total_steps: int
    linear_module_names: tuple[str, ...]  # leaf names of the base's linear layers, for messages
    base_path: str = ""  # the base's folder (its tokenizer initialises a prompt from text)
    init_module: Any = None  # the verified module (LocalModule) ``Method.init_module`` named
    num_tasks: int = 1  # how many task ids the data carries (Method.task_ids)
    #: a run with a ``tokenizer`` section: layer name (input embedding, and an untied output
    #: head) -> the added tokens' ids, whose rows PEFT trains (``trainable_token_indices``)
    trainable_tokens: dict[str, list[int]] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    kind: ModuleKind
    config_cls: type[MethodConfig]
    build_peft_config: Callable[[Any, BuildContext], Any]
    check: Callable[[Any, "RunConfig"], list[str]] = field(default=lambda cfg, run: [])
    callbacks: Callable[[Any, Any], list[Any]] = field(default=lambda cfg, model: [])
    description: str = ""
    #: whether the method trains with activation checkpointing (PEFT's prefix tuning cannot);
    #: a run that leaves training.gradient_checkpointing unset gets it only where it works
    gradient_checkpointing: bool = True
    #: whether it trains on a 4-bit (nf4) or 8-bit base (QLoRA-style): PEFT methods all do
    quantized_base: bool = True
    #: None: examples carry no task id. Else ``task_ids(cfg)`` says how they are tagged: True,
    #: each ``data.train`` source is one task (its index); False, every example is task 0
    task_ids: Callable[[Any], bool] | None = None
    #: ``init_module(cfg)``: the registry reference the run starts from (pulled, verified and
    #: given to ``build_peft_config`` as ``BuildContext.init_module``), or None
    init_module: Callable[[Any], str | None] = field(default=lambda cfg: None)
    #: ``before_save(cfg, peft_model)``: make the saved PEFT config stand alone (no local paths)
    before_save: Callable[[Any, Any], None] = field(default=lambda cfg, model: None)
    #: a method that trains the base's own tensors (not a PEFT adapter): ``prepare_model(cfg,
    #: model, ctx)`` returns the model to train, ``save_module(cfg, model, out_dir, **manifest
    #: fields)`` writes the module; ``build_peft_config`` is then unused
    prepare_model: Callable[[Any, Any, BuildContext], Any] | None = None
    save_module: Callable[..., Any] | None = None
    #: whether a run's ``tokenizer`` section can extend the vocabulary under it: the method's
    #: PEFT config trains the new rows (``BuildContext.trainable_tokens``) beside its adapter
    trainable_tokens: bool = False


#: what to do instead, for each module kind no method trains yet (a method that trains one
#: takes it off this list: tests/unit/test_train_config.py walks ModuleKind)
NOT_TRAINABLE: dict[ModuleKind, str] = {
    ModuleKind.TEMPLATE: "a template trains nothing: write one with `tunehub template init DIR --base BASE --text TEXT`"
    " and push it",
}


def not_trainable_message(name: str) -> str | None:
    """Why ``name`` (a module kind no method trains yet) is refused, and what to do instead."""
    try:
        kind = ModuleKind(name)
    except ValueError:
        return None
    instead = NOT_TRAINABLE.get(kind)
    return f"{name} modules cannot be trained by tunehub yet; {instead}" if instead else None


_METHODS: dict[str, Method] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_method(method: Method) -> Method:
    """Add a method; refuses bad or duplicate names and configs that do not carry the name."""
    if not _NAME.fullmatch(method.name):
        raise ValueError(f"method name {method.name!r} must be lowercase letters, digits and '_'")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    name_field = method.config_cls.model_fields.get("name")
    if name_field is None or name_field.default != method.name:
        raise ValueError(f"{method.config_cls.__name__}.name must default to {method.name!r}")
    _METHODS[method.name] = method
    return method


def discover() -> None:
    """Import every method folder under this package (each registers itself)."""
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    discover()
    return sorted(_METHODS)


def method_config_classes() -> list[type[MethodConfig]]:
    """Every registered method's config class, by method name (the run config's union)."""
    discover()
    return [_METHODS[name].config_cls for name in sorted(_METHODS)]


def method_table() -> list[dict[str, Any]]:
    """One row per method: name, the module kind it makes, what it trains, whether it trains on
    a 4-bit base (``tunehub train --list-methods`` adds whether the engine mixes the kind)."""
    discover()
    return [
        {"method": m.name, "kind": m.kind.value, "trains": m.description, "4bit_base": m.quantized_base}
        for m in sorted(_METHODS.values(), key=lambda m: m.name)
    ]


def get_method(name: str) -> Method:
    discover()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


__all__ = [
    "BuildContext",
    "Method",
    "MethodConfig",
    "discover",
    "get_method",
    "method_config_classes",
    "method_names",
    "method_table",
    "register_method",
]
