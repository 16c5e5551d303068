"""prefix: per decoder layer a key and a value prefix (kv_heads x n x head_dim) that the row's
tokens attend to as if they were already in the cache. PEFT runs prefix rows that way, so the
row's own tokens start at position n; the engine's prefill lays the prefixes into the batch's
cache (left-padded, masked per row).
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
    check_ndim,
)


class Prefix(ServedKind):
    name = "prefix"
    kinds = (ModuleKind.PREFIX,)

    def materialize(self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        prompt = weights.get("prompt_embeddings")
        if prompt is None:
            raise IntegrityError(f"{name}: no prompt_embeddings in {WEIGHTS_FILE}")
        params = loaded.manifest.params
        config = materializer.base.model.config
        layers = int(params.get("num_layers") or config.num_hidden_layers)
        heads = int(params.get("num_attention_heads") or getattr(config, "num_key_value_heads", config.num_attention_heads))
        token_dim = int(params.get("token_dim") or config.hidden_size)
        check_ndim(prompt, 2, "prompt_embeddings", name)
        n = int(prompt.shape[0])
        materializer.check_virtual_tokens(n, name)
        if layers != config.num_hidden_layers or prompt.shape[1] != layers * 2 * token_dim:
            raise IncompatibleBase(f"{name}: prefix of shape {tuple(prompt.shape)} does not fit this base")
        kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if heads != kv_heads or token_dim != heads * head_dim:
            raise IncompatibleBase(
                f"{name}: prefix heads {heads} x {token_dim // heads} do not match the base's {kv_heads} x {head_dim}"
            )
        # PEFT's layout: (n, layers * 2 * heads * head_dim) -> per layer (keys, values) of (heads, n, head_dim)
        split = prompt.float().view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
        loaded.data = [(split[2 * i].contiguous(), split[2 * i + 1].contiguous()) for i in range(layers)]

    def cache_prefix(self, module: LoadedModule) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        return module.data


register_kind(Prefix())
