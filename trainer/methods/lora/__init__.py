"""LoRA (Hu et al., 2021, arXiv:2106.09685): W x + (alpha / r) * B A x, with A, B of rank r.

rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead, which keeps high ranks stable.
QLoRA is this method on an nf4 base (``base.quantization: nf4``), not a method of its own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method


class LoraMethodConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0, le=4096, description="rank")
    alpha: float = Field(default=16, gt=0, description="scale numerator: alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="leaf module names (q_proj, v_proj, ...) or all-linear"
    )
    rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None


def lora_kwargs(cfg: Any, ctx: BuildContext) -> dict[str, Any]:
    """PEFT LoraConfig keyword arguments shared by LoRA and DoRA (with the new tokens' rows of
    a run that extends the vocabulary: PEFT's ``trainable_token_indices``)."""
    kwargs: dict[str, Any] = {} if ctx.trainable_tokens is None else {"trainable_token_indices": ctx.trainable_tokens}
    return kwargs | {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.rslora,
        "bias": cfg.bias,
        "modules_to_save": cfg.modules_to_save,
        "task_type": ctx.task_type,
    }


def build_lora(cfg: LoraMethodConfig, ctx: BuildContext) -> Any:
    from peft import LoraConfig

    return LoraConfig(**lora_kwargs(cfg, ctx))


METHOD = register_method(
    Method(
        name="lora",
        kind=ModuleKind.LORA,
        config_cls=LoraMethodConfig,
        build_peft_config=build_lora,
        description="low-rank deltas on linear layers (QLoRA on an nf4 base)",
        trainable_tokens=True,
    )
)
