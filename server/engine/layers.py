"""Linear layers that apply each batch row's own module in one pass.

For row i with module m_i, a patched layer computes (PEFT's equations, batched):

    x_i' = x_i * in_scale_i                                   IA3 on feed-forward inputs
    y_i  = W x_i' (+ bias)                                    the shared base, one call for all rows
    y_i  = y_i * out_scale_i                                  IA3 elsewhere
    d_i  = s_i * B_i A_i x_i                                  LoRA / AdaLoRA, one bmm over rows
    out  = y_i + d_i                                          LoRA
    out  = y_i + (g_i - 1) (y_i - bias) + g_i d_i             DoRA, g_i = m_i / ||W + s_i B_i A_i||

Rows without a delta at a layer get zero matrices (ranks are zero-padded to the batch's
largest), so one bmm serves modules of different ranks and target layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunehub.devices import release_file_pages


@dataclass
class LayerPlan:
    in_scale: torch.Tensor | None = None  # (B, 1, in)
    out_scale: torch.Tensor | None = None  # (B, 1, out)
    lora_a: torch.Tensor | None = None  # (B, in, R), or (in, R) when every row shares one module
    lora_b: torch.Tensor | None = None  # (B, R, out), or (R, out)
    row_scale: torch.Tensor | None = None  # (B, 1, 1): s_i, 0 for rows without a delta here
    dora_gain: torch.Tensor | None = None  # (B, 1, out): 1 for rows that are not DoRA


class BatchState:
    """The plan of the batch being computed; set by the engine around each forward pass."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerPlan] = {}


class OneDNNLinear(nn.Module):
    """An fp32 CPU linear layer whose weight oneDNN reordered once, at load, into its blocked
    layout. aten's linear repacks the weight on every call; for the few rows of a decode step
    that repacking costs more than the product (3-4x the time at 8 rows on a 768 x 2048 layer).
    The dense weight is not kept (it would double the base's memory): only its row norms, which
    DoRA needs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.row_norms_squared = torch.linalg.vector_norm(weight, dim=1).square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def times_weight_t(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ without the bias."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")


@functools.lru_cache(maxsize=1)
def onednn_linear_works() -> bool:
    """Whether this torch build has oneDNN's prepacked linear and it computes x Wᵀ + b."""
    try:
        rng = torch.Generator().manual_seed(0)  # leaves the global generator alone
        weight, bias, x = (torch.randn(*shape, generator=rng) for shape in ((24, 16), (24,), (3, 16)))
        layer = nn.utils.skip_init(nn.Linear, 16, 24)  # nn.Linear's own init draws from it
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        got = OneDNNLinear(layer)(x)
        return bool(torch.allclose(got, x @ weight.t() + bias, atol=1e-5))
    except Exception:  # absent or renamed in this build: the plain linear serves
        return False


def use_onednn_linears(model: nn.Module) -> int:
    """Replace the fp32 CPU linear layers of the decoder blocks and the LM head by
    :class:`OneDNNLinear`; returns how many were replaced. An LM head tied to the input
    embeddings stays as it is (packing it would hold the matrix twice)."""
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    targets = [(name, m) for name, m in _decoder_linears(model) if type(m) is nn.Linear]
    if head is not None and type(head) is nn.Linear and not tied:
        targets.append((next(n for n, m in model.named_modules() if m is head), head))
    targets = [(n, m) for n, m in targets if m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, OneDNNLinear(module))
    # the dense weights may live in a mapped checkpoint that stays mapped for the embeddings:
    # the pages read while reordering would otherwise stay resident
    release_file_pages([module.weight for _, module in targets])
    return len(targets)


class AdaptedLinear(nn.Module):
    def __init__(self, name: str, base: nn.Module, state: BatchState):
        super().__init__()
        self.name = name
        self.base = base
        self.state = state
        # Linear4bit and OneDNNLinear keep the logical shape on the module, not on their weight
        self.in_features = int(getattr(base, "in_features", 0) or base.weight.shape[1])
        self.out_features = int(getattr(base, "out_features", 0) or base.weight.shape[0])

    def dora_norms(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        """Row norms of W + scale * B A in fp32: DoRA's denominator, (out,)."""
        if isinstance(self.base, OneDNNLinear):
            # W is held only in oneDNN's layout: expand the square,
            # ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2s sum_r B_ir (A W^T)_ri + s^2 B_i (A A^T) B_i^T
            a, b = lora_a.float(), lora_b.float()
            cross = (b * self.base.times_weight_t(a).t()).sum(dim=1)
            own = ((b @ (a @ a.t())) * b).sum(dim=1)
            squared = self.base.row_norms_squared + 2 * scale * cross + scale * scale * own
            return squared.clamp_min(0).sqrt()
        from peft.utils.integrations import dequantize_module_weight

        weight = dequantize_module_weight(self.base).float()  # dequantized for 4-bit/8-bit bases
        return (weight + scale * (lora_b.float() @ lora_a.float())).norm(p=2, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.state.layers.get(self.name)
        if plan is None:
            return self.base(x)
        if plan.in_scale is not None:
            x = x * plan.in_scale
        y = self.base(x)
        if plan.out_scale is not None:
            y = y * plan.out_scale
        if plan.lora_a is None:
            return y
        if plan.lora_a.dim() == 2:  # one module for every row: plain matmuls
            delta = (x @ plan.lora_a) @ plan.lora_b
        else:
            delta = torch.bmm(torch.bmm(x, plan.lora_a), plan.lora_b)
        delta = delta * plan.row_scale
        if plan.dora_gain is None:
            return y + delta
        bias = getattr(self.base, "bias", None)
        plain = y if bias is None else y - bias
        return y + (plan.dora_gain - 1) * plain + plan.dora_gain * delta


def _decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers inside the decoder blocks (not the LM head or embeddings)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if (".layers." in f".{name}." or ".h." in f".{name}.")
        and (isinstance(module, (nn.Linear, OneDNNLinear)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"))
    ]


def patch_linear_layers(model: nn.Module, state: BatchState) -> dict[str, AdaptedLinear]:
    """Wrap every linear layer inside the decoder blocks (not the LM head or embeddings)."""
    patched = {}
    for name, module in _decoder_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = AdaptedLinear(name, module, state)
        setattr(parent, child, wrapper)
        patched[_peft_name(name)] = wrapper
    return patched


def _peft_name(name: str) -> str:
    # PEFT keys are relative to the causal LM (model.layers.0...), as named_modules() gives them
    return name


def build_plan(rows: list[Any], layers: dict[str, AdaptedLinear], device: Any, dtype: Any) -> dict[str, LayerPlan]:
    """Per-layer stacked tensors for a batch whose row i uses module ``rows[i]`` (or None)."""
    batch = len(rows)
    modules = [m for m in rows if m is not None]
    if not modules:
        return {}
    touched: set[str] = set()
    for module in modules:
        touched.update(module.layers)
    shared = len({id(m) for m in rows}) == 1  # every row on one module
    plans: dict[str, LayerPlan] = {}
    for name in touched:
        layer = layers[name]
        deltas = [None if m is None else m.layers.get(name) for m in rows]
        plan = LayerPlan()
        if any(d is not None and d.in_scale is not None for d in deltas):
            scale = torch.ones(batch, 1, layer.in_features)
            for i, d in enumerate(deltas):
                if d is not None and d.in_scale is not None:
                    scale[i, 0] = d.in_scale
            plan.in_scale = scale.to(device=device, dtype=dtype)
        if any(d is not None and d.out_scale is not None for d in deltas):
            scale = torch.ones(batch, 1, layer.out_features)
            for i, d in enumerate(deltas):
                if d is not None and d.out_scale is not None:
                    scale[i, 0] = d.out_scale
            plan.out_scale = scale.to(device=device, dtype=dtype)
        ranks = [d.rank if d is not None else 0 for d in deltas]
        max_rank = max(ranks)
        if max_rank:
            if shared:
                d = deltas[0]
                plan.lora_a = d.lora_a.t().contiguous().to(device=device, dtype=dtype)
                plan.lora_b = d.lora_b.t().contiguous().to(device=device, dtype=dtype)
            else:
                a = torch.zeros(batch, layer.in_features, max_rank)
                b = torch.zeros(batch, max_rank, layer.out_features)
                for i, d in enumerate(deltas):
                    if d is not None and d.rank:
                        a[i, :, : d.rank] = d.lora_a.t()
                        b[i, : d.rank, :] = d.lora_b.t()
                plan.lora_a = a.to(device=device, dtype=dtype)
                plan.lora_b = b.to(device=device, dtype=dtype)
            plan.row_scale = torch.tensor(
                [d.scale if d is not None and d.rank else 0.0 for d in deltas], dtype=dtype, device=device
            ).view(batch, 1, 1)
            if any(d is not None and d.dora_gain is not None for d in deltas):
                gain = torch.ones(batch, 1, layer.out_features)
                for i, d in enumerate(deltas):
                    if d is not None and d.dora_gain is not None:
                        gain[i, 0] = d.dora_gain
                plan.dora_gain = gain.to(device=device, dtype=dtype)
        plans[name] = plan
    return plans
