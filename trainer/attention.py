"""Attention for packed rows: each packed example attends only to itself, computed alone.

transformers (5.x) sees a packed row from its restarting ``position_ids`` and builds a
block-diagonal causal mask for the whole row; SDPA then scores every pair of the row's tokens
(L^2) and, given an explicit mask, cannot skip the upper triangle. A row holding examples of
lengths l_1..l_k needs only sum(l_i^2)/2 of those scores: ``segment_attention`` runs SDPA once
per example with ``is_causal=True``, which is what flash attention's variable-length kernel does
on CUDA, here for any device and any SDPA backend.

Registered with transformers' ``AttentionInterface`` as ``tunehub_segments``, with a mask function
that builds SDPA's mask only when there is a padding mask: packed batches (no ``attention_mask``)
reach ``segment_attention`` with ``position_ids`` alone; anything else (a padding mask, a cache,
no positions, a non-causal model) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.nn import functional as F

NAME = "tunehub_segments"


_last_bounds: tuple[Any, int, int, list[list[tuple[int, int]]]] | None = None


def _bounds_for_forward(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """:func:`segment_bounds`, computed once per forward pass: every layer (and a gradient
    checkpoint's recomputation) gets the same ``position_ids`` tensor, and reading it on the
    host would wait for the device each time."""
    global _last_bounds
    if _last_bounds is not None:
        ref, version, rows, bounds = _last_bounds
        if ref() is position_ids and version == position_ids._version and rows == batch:
            return bounds
    bounds = segment_bounds(position_ids, batch)
    _last_bounds = (weakref.ref(position_ids), position_ids._version, batch, bounds)
    return bounds


def segment_bounds(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each segment: a segment starts wherever a position is not
    the previous one plus 1 (transformers' rule for packed rows)."""
    positions = position_ids.detach().to("cpu")
    if positions.shape[0] != batch:  # positions may be given once for every row
        positions = positions.expand(batch, -1)
    length = positions.shape[1]
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    bounds = []
    for row in starts:
        first = row.nonzero().flatten().tolist()
        bounds.append(list(zip(first, first[1:] + [length])))
    return bounds


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, H, L, D), key/value (B, H_kv, L, D);
    returns (B, L, H, D) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (
        attention_mask is not None
        or position_ids is None
        or not causal
        or query.shape[2] != key.shape[2]  # a cache: generation, not a packed training row
        or kwargs.get("output_attentions")
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dropout_p = dropout if module.training else 0.0
    # split, not slice: a slice's backward writes its gradient into a zeroed full-size tensor
    # (one per segment), a split's backward is one concatenation
    rows = []
    for q_row, k_row, v_row, bounds in zip(
        query.split(1), key.split(1), value.split(1), _bounds_for_forward(position_ids, query.shape[0])
    ):
        lengths = [end - start for start, end in bounds]
        parts = [
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scaling)
            for q, k, v in zip(q_row.split(lengths, dim=2), k_row.split(lengths, dim=2), v_row.split(lengths, dim=2))
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def segment_attention_mask(**kwargs: Any) -> torch.Tensor | None:
    """No mask for unpadded batches (packed rows are told apart by their positions); SDPA's
    mask, built as for ``sdpa``, when a padding mask is given."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


def use_segment_attention(model: Any) -> None:
    """Switch a transformers model (not yet wrapped by PEFT) to :func:`segment_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, segment_attention_mask)
    model.set_attn_implementation(NAME)
