"""P-tuning (Liu et al., 2021, arXiv:2103.10385): virtual tokens produced by a prompt encoder (an
MLP or a bidirectional LSTM) and put before every input. The module stores the encoded prompt,
so serving it is serving a soft prompt: no encoder at inference."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method
from tunehub.trainer.methods.prompt import check_prompt_learning


class PtuningMethodConfig(MethodConfig):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(default=20, gt=0, le=512)
    encoder: Literal["mlp", "lstm"] = Field(default="mlp", description="the prompt encoder")
    encoder_hidden_size: int | None = Field(default=None, gt=0, description="default: the base's hidden size")
    encoder_num_layers: int = Field(default=2, gt=0, le=8)
    encoder_dropout: float = Field(default=0.0, ge=0, lt=1)


def build_ptuning(cfg: PtuningMethodConfig, ctx: BuildContext) -> Any:
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType

    encoder = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}[cfg.encoder]
    config = PromptEncoderConfig(
        task_type=ctx.task_type,
        num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_reparameterization_type=encoder,
        encoder_num_layers=cfg.encoder_num_layers,
        encoder_dropout=cfg.encoder_dropout,
    )
    if cfg.encoder_hidden_size:  # else PEFT takes the base's hidden size
        config.encoder_hidden_size = cfg.encoder_hidden_size
    return config


METHOD = register_method(
    Method(
        name="ptuning",
        kind=ModuleKind.PTUNING,
        config_cls=PtuningMethodConfig,
        build_peft_config=build_ptuning,
        check=check_prompt_learning,
        description="virtual tokens from a trained prompt encoder (MLP or LSTM); stores the encoded prompt",
    )
)
