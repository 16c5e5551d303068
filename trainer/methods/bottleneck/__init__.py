"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2021,
arXiv:2005.00247): after a sublayer's output projection, y + W_up f(W_down y + b_down) + b_up, a
residual block of width hidden // reduction_factor.

``placement: houlsby`` adapts the attention and the feed-forward outputs (``o_proj`` and
``down_proj`` of a Llama-style base, ``attention.output.dense`` and ``output.dense`` of a
BERT-style one); ``pfeiffer`` the feed-forward output only. ``target_modules`` names other layers
instead. ``init: zeros`` (the default) starts at the base exactly. The PEFT method itself is
:mod:`tunehub.peft_methods.bottleneck` (PEFT has none); ``import tunehub.trainer`` registers it,
so ``PeftModel.from_pretrained`` loads these modules.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method


class BottleneckMethodConfig(MethodConfig):
    name: Literal["bottleneck"] = "bottleneck"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        default="pfeiffer", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only"
    )
    reduction_factor: int = Field(default=16, gt=0, le=4096, description="bottleneck width = hidden size // reduction_factor")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    init: Literal["zeros", "bert", "houlsby"] = Field(
        default="zeros",
        description="zeros: up projection zero, starts at the base; bert: N(0, 0.02^2) weights;"
        " houlsby: N(0, 0.01^2) truncated at 2 std",
    )
    target_modules: list[str] | None = Field(
        default=None,
        description="leaf names of the linear layers the adapters follow (overrides placement);"
        " default: the placement's layers for the architecture",
    )


def check_bottleneck(cfg: BottleneckMethodConfig, run: Any) -> list[str]:
    if cfg.target_modules is not None and not cfg.target_modules:
        return ["method.target_modules is empty: leave it out to adapt the placement's layers"]
    return []


def build_bottleneck(cfg: BottleneckMethodConfig, ctx: BuildContext) -> Any:
    from tunehub.peft_methods.bottleneck import BottleneckConfig

    return BottleneckConfig(
        target_modules=list(cfg.target_modules) if cfg.target_modules is not None else None,
        placement=cfg.placement,
        reduction_factor=cfg.reduction_factor,
        non_linearity=cfg.non_linearity,
        init=cfg.init,
        task_type=ctx.task_type,
    )


METHOD = register_method(
    Method(
        name="bottleneck",
        kind=ModuleKind.BOTTLENECK,
        config_cls=BottleneckMethodConfig,
        build_peft_config=build_bottleneck,
        check=check_bottleneck,
        description="bottleneck adapters (down, non-linearity, up, residual) after attention and/or feed-forward outputs",
    )
)
