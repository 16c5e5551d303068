"""IA3 (Liu et al., 2022, arXiv:2205.05638): learned vectors that rescale the keys, the values and
the feed-forward activations, l * x; about 0.01% of the base's parameters, nothing added to the
forward pass but an elementwise product. The vectors start at one, so training starts at the base."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method


class Ia3MethodConfig(MethodConfig):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(
        default=None, description="leaf module names to rescale; default: PEFT's choice for the architecture (keys, values, FFN)"
    )
    feedforward_modules: list[str] | None = Field(
        default=None, description="which of target_modules are feed-forward (rescaled on their input, not output)"
    )


def check_ia3(cfg: Ia3MethodConfig, run: Any) -> list[str]:
    if cfg.feedforward_modules is not None and cfg.target_modules is None:
        return ["method.feedforward_modules needs method.target_modules (it names a subset of them)"]
    if cfg.feedforward_modules and cfg.target_modules and not set(cfg.feedforward_modules) <= set(cfg.target_modules):
        extra = ", ".join(sorted(set(cfg.feedforward_modules) - set(cfg.target_modules)))
        return [f"method.feedforward_modules must be a subset of method.target_modules (not in it: {extra})"]
    return []


def build_ia3(cfg: Ia3MethodConfig, ctx: BuildContext) -> Any:
    from peft import IA3Config

    return IA3Config(target_modules=cfg.target_modules, feedforward_modules=cfg.feedforward_modules, task_type=ctx.task_type)


METHOD = register_method(
    Method(
        name="ia3",
        kind=ModuleKind.IA3,
        config_cls=Ia3MethodConfig,
        build_peft_config=build_ia3,
        check=check_ia3,
        description="learned rescaling vectors on keys, values and feed-forward activations",
    )
)
