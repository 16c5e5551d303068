"""DoRA (Liu et al., 2024, arXiv:2402.09353): LoRA's direction update plus a learned per-column
magnitude, W' = m * (W + s B A) / ||W + s B A||_c. PEFT implements it as LoRA with use_dora."""

from __future__ import annotations

from typing import Literal

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, register_method
from tunehub.trainer.methods.lora import LoraMethodConfig, lora_kwargs


class DoraMethodConfig(LoraMethodConfig):
    name: Literal["dora"] = "dora"  # type: ignore[assignment]


def build_dora(cfg: DoraMethodConfig, ctx: BuildContext):
    from peft import LoraConfig

    return LoraConfig(**lora_kwargs(cfg, ctx), use_dora=True)


METHOD = register_method(
    Method(
        name="dora",
        kind=ModuleKind.DORA,
        config_cls=DoraMethodConfig,
        build_peft_config=build_dora,
        description="weight-decomposed LoRA: low-rank direction plus per-column magnitude",
        trainable_tokens=True,
    )
)
