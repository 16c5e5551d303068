"""Multitask prompt tuning (Wang et al., 2023, arXiv:2303.02861): a soft prompt shared by several
tasks, times a low-rank task-specific matrix (``num_ranks``), learned in a source run over all
the tasks at once; a target run on a new task starts from the source module's prompt (the
average of its tasks, or one of them) instead of from scratch.

- Source run: every ``data.train`` source is one task (its index is the task id); no
  ``init_from``.
- Target run: ``init_from: acme/mpt-source@1`` (a registry reference; pulled and verified, under
  the run's trust policy) and one task; the manifest's config records the source's exact version
  (``method.init_from``). The source is no ``parent``: the target starts from its prompt but is
  served alone.

The saved module stands alone: its PEFT config says ``RANDOM`` init (the weights are in the
file), so loading it needs neither the source nor the path it was pulled to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunehub.errors import ConfigError
from tunehub.registry.manifest import ModuleKind
from tunehub.registry.refs import ModuleRef
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method
from tunehub.trainer.methods.prompt import check_prompt_learning


class MultitaskPromptMethodConfig(MethodConfig):
    name: Literal["multitask_prompt"] = "multitask_prompt"
    num_virtual_tokens: int = Field(default=20, gt=0, le=512)
    num_ranks: int = Field(default=1, gt=0, le=64, description="rank of each task's prompt matrix")
    init: Literal["random", "text", "average", "task"] = Field(
        default="random",
        description="source runs: random or text; target runs (init_from): average of the source's tasks, or one task",
    )
    init_text: str | None = None
    init_from: str | None = Field(default=None, description="registry reference of a source multitask_prompt module")
    init_task: int = Field(default=0, ge=0, description="with init: task, the source task to start from")

    def source_run(self) -> bool:
        return self.init_from is None


def check_multitask(cfg: MultitaskPromptMethodConfig, run: Any) -> list[str]:
    problems = check_prompt_learning(cfg, run)
    if cfg.init_from is not None:
        try:
            ModuleRef.parse(cfg.init_from)
        except ValueError as exc:
            problems.append(f"method.init_from: {exc}")
        if cfg.init not in ("average", "task"):
            problems.append("method.init: a target run (init_from) starts from the source: average or task")
    else:
        if cfg.init not in ("random", "text"):
            problems.append(f"method.init: {cfg.init} needs method.init_from (a source module)")
        if len(run.data.train) < 2:
            problems.append(
                "data.train: a source run learns a prompt shared by several tasks: give one source per task (two or more)"
            )
        if run.data.eval:
            problems.append("data.eval: a source run splits each task's source (data.eval_fraction); leave data.eval unset")
    if cfg.init == "text" and not (cfg.init_text and cfg.init_text.strip()):
        problems.append("method.init_text: init: text needs the text whose embeddings start the prompt")
    return problems


def build_multitask(cfg: MultitaskPromptMethodConfig, ctx: BuildContext) -> Any:
    from peft import MultitaskPromptTuningConfig, MultitaskPromptTuningInit

    common: dict[str, Any] = {
        "task_type": ctx.task_type,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_ranks": cfg.num_ranks,
    }
    if cfg.source_run():
        if cfg.init == "text":
            return MultitaskPromptTuningConfig(
                **common,
                num_tasks=_num_tasks(ctx),
                prompt_tuning_init=MultitaskPromptTuningInit.TEXT,
                prompt_tuning_init_text=cfg.init_text,
                tokenizer_name_or_path=ctx.base_path,
            )
        return MultitaskPromptTuningConfig(
            **common, num_tasks=_num_tasks(ctx), prompt_tuning_init=MultitaskPromptTuningInit.RANDOM
        )
    source = ctx.init_module
    if source is None or source.manifest.kind is not ModuleKind.MULTITASK_PROMPT:
        kind = source.manifest.kind.value if source is not None else "nothing"
        raise ConfigError(f"method.init_from: {cfg.init_from} is a {kind} module, not a multitask_prompt source")
    params = source.manifest.params
    if params.get("num_virtual_tokens") != cfg.num_virtual_tokens or params.get("num_ranks", 1) != cfg.num_ranks:
        raise ConfigError(
            f"method.init_from: {cfg.init_from} has {params.get('num_virtual_tokens')} virtual tokens and"
            f" {params.get('num_ranks', 1)} ranks; set method.num_virtual_tokens and method.num_ranks to match"
        )
    if cfg.init == "task" and cfg.init_task >= int(params.get("num_tasks", 1)):
        raise ConfigError(f"method.init_task: {cfg.init_from} has {params.get('num_tasks')} tasks (0-based)")
    init = (
        MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS if cfg.init == "average" else MultitaskPromptTuningInit.EXACT_SOURCE_TASK
    )
    return MultitaskPromptTuningConfig(
        **common,
        num_tasks=1,
        prompt_tuning_init=init,
        prompt_tuning_init_task=cfg.init_task,
        prompt_tuning_init_state_dict_path=str(Path(source.path) / "adapter_model.safetensors"),
    )


def _num_tasks(ctx: BuildContext) -> int:
    if ctx.num_tasks < 2:
        raise ConfigError("a multitask_prompt source run needs two or more tasks (data.train sources)")
    return ctx.num_tasks


def standalone_config(cfg: MultitaskPromptMethodConfig, peft_model: Any) -> None:
    from peft import MultitaskPromptTuningInit

    for config in peft_model.peft_config.values():
        config.prompt_tuning_init = MultitaskPromptTuningInit.RANDOM
        config.prompt_tuning_init_state_dict_path = None
        config.prompt_tuning_init_text = None
        config.tokenizer_name_or_path = None


METHOD = register_method(
    Method(
        name="multitask_prompt",
        kind=ModuleKind.MULTITASK_PROMPT,
        config_cls=MultitaskPromptMethodConfig,
        build_peft_config=build_multitask,
        check=check_multitask,
        description="a soft prompt shared by several tasks (source run); new tasks start from it (init_from)",
        task_ids=lambda cfg: cfg.source_run(),
        init_module=lambda cfg: cfg.init_from,
        before_save=standalone_config,
    )
)
