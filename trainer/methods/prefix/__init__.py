"""Prefix tuning (Li and Liang, 2021, arXiv:2101.00190): learned keys and values put before every
layer's attention. With ``projection: true`` the prefix is trained through a two-layer MLP (the
paper's reparameterisation, steadier); the module stores the projected prefix, so loading it
needs no MLP."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method
from tunehub.trainer.methods.prompt import check_prompt_learning


class PrefixMethodConfig(MethodConfig):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(default=20, gt=0, le=512, description="prefix length, per layer")
    projection: bool = Field(default=False, description="train the prefix through an MLP (reparameterisation)")
    encoder_hidden_size: int | None = Field(default=None, gt=0, description="the MLP's hidden size (default: the base's)")


def check_prefix(cfg: PrefixMethodConfig, run: Any) -> list[str]:
    problems = check_prompt_learning(cfg, run)
    if run.training.gradient_checkpointing:
        problems.append("training.gradient_checkpointing: PEFT's prefix tuning cannot train with it; leave it unset or false")
    if cfg.encoder_hidden_size is not None and not cfg.projection:
        problems.append("method.encoder_hidden_size is the MLP's size: it needs projection: true")
    return problems


def build_prefix(cfg: PrefixMethodConfig, ctx: BuildContext) -> Any:
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(
        task_type=ctx.task_type, num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.projection
    )
    if cfg.encoder_hidden_size:  # else PEFT takes the base's hidden size
        config.encoder_hidden_size = cfg.encoder_hidden_size
    return config


METHOD = register_method(
    Method(
        name="prefix",
        kind=ModuleKind.PREFIX,
        config_cls=PrefixMethodConfig,
        build_peft_config=build_prefix,
        check=check_prefix,
        description="learned keys and values before every attention layer",
        gradient_checkpointing=False,
    )
)
