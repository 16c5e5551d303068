"""Tokenizer: train only the rows of the tokens a run's ``tokenizer: {extend: ...}`` section adds
(input embedding and output head), with PEFT's trainable tokens (``TrainableTokensConfig``);
every base weight stays frozen. The module (kind ``tokenizer``) holds the extended tokenizer and
those rows alone (see ``tunehub.trainer.tokenizer_module``). To train a LoRA or DoRA with the new
rows, keep that method and add the ``tokenizer`` section: the module then carries it as a
component.
"""

from __future__ import annotations

from typing import Any, Literal

from tunehub.errors import ConfigError
from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method


class TokenizerMethodConfig(MethodConfig):
    name: Literal["tokenizer"] = "tokenizer"


def build_trainable_tokens(cfg: TokenizerMethodConfig, ctx: BuildContext) -> Any:
    from peft import TrainableTokensConfig

    if not ctx.trainable_tokens:
        raise ConfigError("method: tokenizer trains new tokens' rows: the run needs a tokenizer: {extend: ...} section")
    layers = list(ctx.trainable_tokens)
    ids = ctx.trainable_tokens[layers[0]]
    # one id list for every layer (PEFT's config takes one): the input embedding and an untied
    # head; a tied head follows the embedding's adapter (PEFT ties it)
    return TrainableTokensConfig(token_indices=list(ids), target_modules=layers, task_type=ctx.task_type)


METHOD = register_method(
    Method(
        name="tokenizer",
        kind=ModuleKind.TOKENIZER,
        config_cls=TokenizerMethodConfig,
        build_peft_config=build_trainable_tokens,
        description="the new rows (embedding and head) of an extended vocabulary, nothing else (tokenizer: {extend: ...})",
        trainable_tokens=True,
    )
)
