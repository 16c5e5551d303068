"""prompt, ptuning, multitask_prompt: virtual-token embeddings (n x hidden) that the prefill puts
before the row's own tokens. P-tuning's encoder output is what PEFT saves, and a multitask prompt
is reduced at load to its task's embeddings (``task_id`` in the manifest's params), so all three
are one matrix at serve time and touch no linear layer.
"""

from __future__ import annotations

from typing import Any

import torch

from tunehub.errors import IncompatibleBase, IntegrityError
from tunehub.registry.manifest import ModuleKind
from tunehub.server.engine.kinds import ServedKind, register_kind
from tunehub.server.engine.modules import (
    WEIGHTS_FILE,
    LoadedModule,
    ModuleMaterializer,
    UnsupportedModule,
    check_finite,
    check_ndim,
)


class Prompt(ServedKind):
    name = "prompt"
    kinds = (ModuleKind.PROMPT, ModuleKind.PTUNING, ModuleKind.MULTITASK_PROMPT)

    def materialize(self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        prompt = weights.get("prompt_embeddings")
        if prompt is None:
            raise IntegrityError(f"{name}: no prompt_embeddings in {WEIGHTS_FILE}")
        check_ndim(prompt, 2, "prompt_embeddings", name)
        materializer.check_virtual_tokens(int(prompt.shape[0]), name)
        prompt = prompt.float()
        if loaded.kind is ModuleKind.MULTITASK_PROMPT:
            cols, rows = weights.get("prefix_task_cols"), weights.get("prefix_task_rows")
            if cols is None or rows is None:
                raise IntegrityError(f"{name}: multitask prompt lacks its task factors")
            task = int(loaded.manifest.params.get("task_id", 0) or 0)
            if not 0 <= task < cols.shape[0]:
                raise UnsupportedModule(f"{name}: task_id {task} is outside the module's {cols.shape[0]} tasks")
            prompt = prompt * (cols[task].float() @ rows[task].float())
        hidden = materializer.base.model.get_input_embeddings().weight.shape[1]
        if prompt.shape[1] != hidden:
            raise IncompatibleBase(f"{name}: virtual tokens have width {prompt.shape[1]}, the base's embeddings {hidden}")
        loaded.data = prompt.contiguous()
        # the task product of finite factors can still overflow
        check_finite({"prompt": loaded.data}, name, "the computed")

    def virtual_embeddings(self, module: LoadedModule) -> torch.Tensor | None:
        return module.data


register_kind(Prompt())
