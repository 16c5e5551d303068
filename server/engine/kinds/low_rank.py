"""lora, dora, adalora: low-rank deltas of linear layers.

At load, per layer ``A`` (r x in), ``B`` (out x r) and a scale; AdaLoRA's ``E`` is folded into
``A``; DoRA's per-output magnitude over the row norm of ``W + s B A`` is precomputed as
``dora_gain`` (PEFT detaches that norm, so it is a constant at inference) and folded into ``B``'s rows.

In a batch, for row i with module m_i (PEFT's equations, batched):

    d_i  = s_i * B_i A_i x_i                                  one bmm over rows
    out  = y_i + d_i                                          LoRA, AdaLoRA
    out  = y_i + (g_i - 1) (y_i - bias) + d_i                 DoRA, g_i = m_i / ||W + s_i B_i A_i||, B_i = g_i B

A composition of several low-rank modules in one row (weights w_k) is one delta of their ranks
side by side, as PEFT applies active adapters one after the other: A = [A_1; A_2],
B = [w_1 s_1 B_1, w_2 s_2 B_2], s = 1; a DoRA among them scales the base and the deltas before
it by 1 + w_k (g_k - 1) (see ``combine``).

Rows without a delta at a layer get zero matrices (ranks are zero-padded to the batch's
largest), so one bmm serves modules of different ranks and target layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from tunehub.errors import IncompatibleBase, IntegrityError
from tunehub.registry.manifest import ModuleKind
from tunehub.server.engine.kinds import ServedKind, register_kind, stacked_row_vectors
from tunehub.server.engine.layers import AdaptedLinear, OneDNNLinear
from tunehub.server.engine.modules import (
    LoadedModule,
    ModuleMaterializer,
    UnsupportedModule,
    check_finite,
    check_ndim,
    layer_and_param,
)


@dataclass
class LayerDelta:
    """What one low-rank module does to one linear layer."""

    lora_a: Any = None  # (r, in)
    lora_b: Any = None  # (out, r)
    scale: float = 0.0  # 1 once materialised: the scale is folded into lora_b
    dora_gain: Any = None  # (out,): magnitude / ||W + s B A||_row, already folded into lora_b

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else int(self.lora_a.shape[0])


class LowRankPart:
    """A batch's low-rank deltas at one layer: added after the base. Built once per batch
    composition, so what does not depend on x is folded in here: each row's scale into its B,
    DoRA's gain minus one and that times the bias (the step then costs two bmm and three
    in-place element-wise ops)."""

    __slots__ = ("lora_a", "lora_b", "gain_minus_one", "gain_bias")

    def __init__(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, gain_minus_one: torch.Tensor | None, gain_bias: torch.Tensor | None
    ):
        self.lora_a = lora_a  # (B, in, R), or (in, R) when every row shares one module
        self.lora_b = lora_b  # (B, R, out), or (R, out): scaled by each row's s_i (0 for rows without a delta)
        self.gain_minus_one = gain_minus_one  # (B, 1, out): DoRA's g_i - 1, 0 for rows that are not DoRA
        self.gain_bias = gain_bias  # (B, 1, out): (g_i - 1) * bias, None when the layer has no bias

    def after(self, layer: AdaptedLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.lora_a.dim() == 2:  # one module for every row: plain matmuls
            delta = (x @ self.lora_a) @ self.lora_b
        else:
            delta = torch.bmm(torch.bmm(x, self.lora_a), self.lora_b)
        if delta.dtype != y.dtype:  # the steps below write into delta, a tensor of this call's own
            delta = delta.to(y.dtype)
        if self.gain_minus_one is not None:  # DoRA: y + (g - 1)(y - bias) + d, the gain being in B already
            delta.addcmul_(self.gain_minus_one, y)
            if self.gain_bias is not None:
                delta.sub_(self.gain_bias)
        return delta.add_(y)


def dora_norms(layer: AdaptedLinear, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of W + scale * B A in fp32 for ``layer``'s base weight: DoRA's denominator, (out,)."""
    base = layer.base
    if isinstance(base, OneDNNLinear):
        # W is held only in oneDNN's layout: expand the square,
        # ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2s sum_r B_ir (A W^T)_ri + s^2 B_i (A A^T) B_i^T
        a, b = lora_a.float(), lora_b.float()
        cross = (b * base.times_weight_t(a).t()).sum(dim=1)
        own = ((b @ (a @ a.t())) * b).sum(dim=1)
        squared = base.row_norms_squared + 2 * scale * cross + scale * scale * own
        return squared.clamp_min(0).sqrt()
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(base).float()  # dequantized for 4-bit/8-bit bases
    return (weight + scale * (lora_b.float() @ lora_a.float())).norm(p=2, dim=1)


def _pattern(pattern: dict[str, Any], layer: str, default: Any) -> Any:
    # PEFT matches rank/alpha patterns by key suffix
    for key, value in pattern.items():
        if layer == key or layer.endswith("." + key) or re.fullmatch(key, layer):
            return value
    return default


class LowRank(ServedKind):
    name = "low_rank"
    kinds = (ModuleKind.LORA, ModuleKind.DORA, ModuleKind.ADALORA)

    def materialize(self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        params = loaded.manifest.params
        if params.get("modules_to_save"):
            raise UnsupportedModule(f"{name} trains whole modules ({params['modules_to_save']}); the engine mixes deltas only")
        grouped: dict[str, dict[str, Any]] = {}
        for key, tensor in weights.items():
            layer, param = layer_and_param(key)
            grouped.setdefault(layer, {})[param] = tensor
        alpha = float(params.get("lora_alpha", 8))
        alpha_pattern = params.get("alpha_pattern") or {}
        rslora = bool(params.get("use_rslora", False))
        adalora = loaded.kind is ModuleKind.ADALORA
        for layer, tensors in grouped.items():
            if "lora_A" not in tensors or "lora_B" not in tensors:
                raise IntegrityError(f"{name}: layer {layer} lacks lora_A or lora_B")
            target = materializer.target_layer(layer, name)
            check_ndim(tensors["lora_A"], 2, f"{layer}.lora_A", name)
            check_ndim(tensors["lora_B"], 2, f"{layer}.lora_B", name)
            a = tensors["lora_A"].float()
            b = tensors["lora_B"].float()
            rank = int(a.shape[0])
            if rank > materializer.max_rank:
                raise UnsupportedModule(
                    f"{name}: rank {rank} at {layer} is above this server's maximum of {materializer.max_rank}"
                )
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features or b.shape[1] != rank:
                raise IncompatibleBase(
                    f"{name}: {layer} has shapes {tuple(a.shape)}/{tuple(b.shape)}, the base layer is"
                    f" {target.in_features} -> {target.out_features}"
                )
            if adalora:
                e = tensors.get("lora_E")
                if e is None:
                    raise IntegrityError(f"{name}: AdaLoRA layer {layer} lacks lora_E")
                if e.numel() != rank:
                    raise IncompatibleBase(f"{name}: {layer}.lora_E has shape {tuple(e.shape)}, the layer's rank is {rank}")
                a = a * e.float().reshape(rank, 1)  # fold the singular values into A
                # PEFT divides by ranknum, which stays the initial rank when training prunes a layer
                # (a loaded module's layers are built at init_r, then cut to the saved rank)
                scale = alpha / (float(params.get("init_r") or rank) + 1e-5)
            else:
                # the tensor's own rank is the layer's rank (rank_pattern is already applied to it)
                layer_alpha = float(_pattern(alpha_pattern, layer, alpha))
                # rank 0 (AdaLoRA-style pruning, or an empty layer): no delta, and no division by zero
                scale = layer_alpha / (math.sqrt(rank) if rslora else rank) if rank else 0.0
            magnitude = tensors.get("lora_magnitude_vector")
            gain = None
            if loaded.kind is ModuleKind.DORA:
                if magnitude is None:
                    raise IntegrityError(f"{name}: DoRA layer {layer} lacks its magnitude vector")
                if magnitude.numel() != target.out_features:
                    raise IncompatibleBase(
                        f"{name}: {layer}.lora_magnitude_vector has {magnitude.numel()} entries, the layer gives {target.out_features}"
                    )
                with torch.no_grad():
                    norm = dora_norms(target, a, b, scale)
                gain = (magnitude.float().reshape(-1) / norm).contiguous()
                b = gain.unsqueeze(1) * b
            # the scale folded into B, and both kept transposed in memory (views give the usual
            # shapes): a batch's plan stacks A^T and B^T, which is then a plain copy of each
            b_t = torch.empty(b.shape[1], b.shape[0])
            torch.mul(b.t(), scale, out=b_t)  # one pass: scaled and transposed
            loaded.layers[layer] = LayerDelta(lora_a=a.t().contiguous().t(), lora_b=b_t.t(), scale=1.0, dora_gain=gain)
        # what load computed from finite weights can still overflow (DoRA's gain over a zero norm)
        for layer, delta in loaded.layers.items():
            check_finite({"dora_gain": delta.dora_gain}, name, f"the computed {layer}")

    def combine(self, members: list[tuple[LoadedModule, float]], name: str) -> dict[str, Any]:
        # as PEFT applies active adapters, in order: a LoRA adds its delta; a DoRA (gain g, weight
        # w) scales everything before it, base and earlier deltas, by f = 1 + w (g - 1), then adds
        # its own. So the gains multiply, and earlier deltas' rows are rescaled by later gains.
        combined: dict[str, LayerDelta] = {}
        for layer in dict.fromkeys(layer for module, _ in members for layer in module.layers):
            lora_a: list[torch.Tensor] = []
            lora_b: list[torch.Tensor] = []
            gain: torch.Tensor | None = None
            for module, weight in members:
                delta = module.layers.get(layer)
                if delta is None or not delta.rank:
                    continue
                if delta.dora_gain is not None:
                    factor = 1 + weight * (delta.dora_gain - 1)
                    lora_b = [factor.unsqueeze(1) * b for b in lora_b]
                    gain = factor if gain is None else gain * factor
                lora_a.append(delta.lora_a)
                lora_b.append(delta.lora_b * (weight * delta.scale))
            if lora_a:
                # kept transposed in memory, as materialised deltas are (see materialize)
                combined[layer] = LayerDelta(
                    lora_a=torch.cat([a.t() for a in lora_a], dim=1).t(),
                    lora_b=torch.cat([b.t() for b in lora_b]).t(),
                    scale=1.0,
                    dora_gain=gain,
                )
        return combined

    def plan_layer(self, deltas: list[Any], layer: AdaptedLinear, shared: bool, device: Any, dtype: Any) -> LowRankPart | None:
        batch = len(deltas)
        ranks = [d.rank if d is not None else 0 for d in deltas]
        max_rank = max(ranks)
        if not max_rank:
            return None
        scales = [d.scale if d is not None and d.rank else 0.0 for d in deltas]
        unscaled = all(scale == 1.0 for scale in scales)  # materialised deltas carry their scale in B
        if shared:
            d = deltas[0]
            lora_a = d.lora_a.t().contiguous().to(device=device, dtype=dtype)
            lora_b = d.lora_b.t() if unscaled else d.lora_b.t() * scales[0]
            lora_b = lora_b.contiguous().to(device=device, dtype=dtype)
        elif all(rank == max_rank for rank in ranks):
            # every row has a delta of one rank (a batch's usual case): one copy per matrix (the
            # transposes are contiguous in memory, see materialize)
            lora_a = torch.stack([d.lora_a.t() for d in deltas]).to(device=device, dtype=dtype)
            lora_b = torch.stack([d.lora_b.t() for d in deltas]).to(device=device, dtype=dtype)
            if not unscaled:
                lora_b.mul_(torch.tensor(scales, device=device, dtype=dtype).view(batch, 1, 1))
        else:
            a = torch.zeros(batch, layer.in_features, max_rank)
            b = torch.zeros(batch, max_rank, layer.out_features)
            for i, d in enumerate(deltas):
                if d is not None and d.rank:
                    a[i, :, : d.rank] = d.lora_a.t()
                    torch.mul(d.lora_b.t(), scales[i], out=b[i, : d.rank, :])
            lora_a = a.to(device=device, dtype=dtype)
            lora_b = b.to(device=device, dtype=dtype)
        gain = stacked_row_vectors(deltas, "dora_gain", layer.out_features, device, torch.float32)
        gain_minus_one = gain_bias = None
        if gain is not None:
            gain_minus_one = gain - 1
            bias = getattr(layer.base, "bias", None)
            if bias is not None:
                gain_bias = (gain_minus_one * bias.detach().to(device=device, dtype=torch.float32)).to(dtype)
            gain_minus_one = gain_minus_one.to(dtype)
        return LowRankPart(lora_a, lora_b, gain_minus_one, gain_bias)


register_kind(LowRank())
