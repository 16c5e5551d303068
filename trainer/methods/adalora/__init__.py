"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): SVD-shaped deltas P diag(E) Q whose rank budget
shrinks from init_r to target_r during training, pruning the least important singular values.

The budget moves in ``update_and_allocate`` after every optimizer step (while gradients still
exist), between ``tinit`` warm-up steps and the final ``tfinal`` steps."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunehub.errors import ConfigError
from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method


class AdaLoraMethodConfig(MethodConfig):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(default=12, gt=0, description="starting rank of every layer")
    target_r: int = Field(default=4, gt=0, description="average rank the budget ends at")
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    tinit: int | None = Field(default=None, ge=0, description="warm-up steps before pruning (default 10% of steps)")
    tfinal: int | None = Field(default=None, ge=0, description="final steps at the target budget (default 20%)")
    delta_t: int = Field(default=1, gt=0, description="steps between budget updates")
    beta1: float = Field(default=0.85, gt=0, lt=1)
    beta2: float = Field(default=0.85, gt=0, lt=1)
    orth_reg_weight: float = Field(default=0.5, ge=0)


def check_adalora(cfg: AdaLoraMethodConfig, run: Any) -> list[str]:
    problems = []
    if cfg.target_r > cfg.init_r:
        problems.append(f"adalora target_r ({cfg.target_r}) must not exceed init_r ({cfg.init_r})")
    steps = run.training.max_steps
    if steps is not None and cfg.tinit is not None and cfg.tfinal is not None and cfg.tinit + cfg.tfinal >= steps:
        problems.append(f"adalora tinit + tfinal ({cfg.tinit + cfg.tfinal}) must be below training.max_steps ({steps})")
    return problems


def build_adalora(cfg: AdaLoraMethodConfig, ctx: BuildContext) -> Any:
    from peft import AdaLoraConfig

    total = ctx.total_steps
    tinit = cfg.tinit if cfg.tinit is not None else max(0, total // 10)
    tfinal = cfg.tfinal if cfg.tfinal is not None else max(0, total // 5)
    if tinit + tfinal >= total:
        raise ConfigError(f"adalora needs more steps than tinit + tfinal ({tinit} + {tfinal}); the run has {total}")
    return AdaLoraConfig(
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        # peft annotates lora_alpha as int, but only divides by it (scaling = alpha / r): a float is right
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=cfg.delta_t,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=total,
        task_type=ctx.task_type,
    )


def adalora_callbacks(cfg: AdaLoraMethodConfig, model: Any) -> list[Any]:
    from transformers import TrainerCallback

    class RankBudget(TrainerCallback):
        """Moves AdaLoRA's rank budget after each optimizer step, before gradients are zeroed."""

        def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
            peft_model = getattr(model, "module", model)  # unwrap DDP
            peft_model.base_model.update_and_allocate(state.global_step)

    return [RankBudget()]


METHOD = register_method(
    Method(
        name="adalora",
        kind=ModuleKind.ADALORA,
        config_cls=AdaLoraMethodConfig,
        build_peft_config=build_adalora,
        check=check_adalora,
        callbacks=adalora_callbacks,
        description="SVD-shaped low-rank deltas whose rank budget adapts during training",
    )
)
