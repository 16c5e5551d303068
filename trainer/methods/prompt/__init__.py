"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691): ``num_virtual_tokens`` learned input
embeddings put in front of every input; the base is untouched. Initialised at random, from
embeddings of tokens sampled from the vocabulary, or from the embeddings of a text
(``init: text``, ``init_text: "Summarize the following:"``), which trains faster and steadier.

Shared by every prompt-learning method (prompt, prefix, P-tuning): virtual tokens come before
each example, so packed rows (several examples per row, told apart by ``position_ids``, which
PEFT's prompt learning drops) would mix examples; and PEFT prepends them only for causal LMs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method


def check_prompt_learning(cfg: Any, run: Any) -> list[str]:
    """What every prompt-learning method refuses before a model loads."""
    problems = []
    if run.data.packing:
        problems.append(
            f"data.packing: {cfg.name} puts virtual tokens before each example, so rows cannot be packed; set data.packing: false"
        )
    if run.objective.name == "mlm":
        problems.append(f"objective.name: {cfg.name} trains causal LMs (sft, clm); for masked LM use lora, dora, adalora or ia3")
    return problems


class PromptMethodConfig(MethodConfig):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(default=20, gt=0, le=512, description="learned tokens put before every input")
    init: Literal["random", "vocab", "text"] = Field(
        default="random", description="random, embeddings of sampled vocabulary tokens, or of init_text"
    )
    init_text: str | None = Field(default=None, description="with init: text, the text whose embeddings start the prompt")


def check_prompt(cfg: PromptMethodConfig, run: Any) -> list[str]:
    problems = check_prompt_learning(cfg, run)
    if cfg.init == "text" and not (cfg.init_text and cfg.init_text.strip()):
        problems.append("method.init_text: init: text needs the text whose embeddings start the prompt")
    if cfg.init != "text" and cfg.init_text is not None:
        problems.append("method.init_text is used only with init: text")
    return problems


def build_prompt(cfg: PromptMethodConfig, ctx: BuildContext) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    init = {"random": PromptTuningInit.RANDOM, "vocab": PromptTuningInit.SAMPLE_VOCAB, "text": PromptTuningInit.TEXT}[cfg.init]
    text = cfg.init == "text"
    return PromptTuningConfig(
        task_type=ctx.task_type,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=init,
        prompt_tuning_init_text=cfg.init_text if text else None,
        tokenizer_name_or_path=ctx.base_path if text else None,
    )


METHOD = register_method(
    Method(
        name="prompt",
        kind=ModuleKind.PROMPT,
        config_cls=PromptMethodConfig,
        build_peft_config=build_prompt,
        check=check_prompt,
        description="learned input embeddings put before every input (soft prompt)",
    )
)
