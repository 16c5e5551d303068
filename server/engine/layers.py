"""Linear layers that apply each batch row's own module in one pass.

Every linear layer inside the decoder blocks is wrapped in :class:`AdaptedLinear`, and every
normalisation layer in :class:`AdaptedNorm` (whose plans only add after the base). For a batch,
the engine sets a :class:`LayerPlan` per layer that some row's module touches; the layer then
computes, for all rows at once,

    x' = before_k(... before_1(x))                   input transforms of the batch's kind groups
    y  = W x' (+ bias)                               the shared base, one call for all rows
    y' = after_k(layer, x', ... after_1(layer, x', y))   output transforms

where each ``before``/``after`` belongs to one kind group (:mod:`tunehub.server.engine.kinds`)
and holds stacked per-row tensors (rows of other groups get the identity), so a step costs one
batched call per group and layer whatever modules the rows use.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from tunehub.devices import release_file_pages

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class LayerPlan:
    """What the batch's kind groups do at one layer: ``parts`` (group name -> the group's part,
    which holds its stacked tensors) and their ``before``/``after`` callables, in group order."""

    parts: dict[str, Any] = field(default_factory=dict)
    before: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
    after: tuple[Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor], ...] = ()

    @classmethod
    def of(cls, parts: dict[str, Any]) -> "LayerPlan":
        """The plan applying ``parts`` (each with ``before`` and/or ``after``, None when unused)."""
        before = tuple(p.before for p in parts.values() if getattr(p, "before", None) is not None)
        after = tuple(p.after for p in parts.values() if getattr(p, "after", None) is not None)
        return cls(parts=parts, before=before, after=after)


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


def use_onednn_linears(model: PreTrainedModel) -> int:
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


#: at most this many tokens in a call: a decode step's (or a short prefill's) delta ops
SMALL_CALL_TOKENS = 64


class _SingleThreaded:
    """Run the ops inside on one CPU thread, then restore torch's thread count.

    A decode step's delta ops are tiny (a (rows, in) x (rows, in, r) bmm is microseconds of
    work), and on the CPU each parallel region of OpenMP wakes the other threads of its team. On
    a machine with as many cores as torch threads, once two threads have run parallel regions
    (the thread that loaded the model, and the engine's loop) GNU OpenMP stops spinning between
    regions, so each wake-up costs a futex round trip: a 10 us bmm took 100 us on the engine's
    thread. One thread keeps them at their cost; the base's own matmuls, which need the cores,
    run outside."""

    __slots__ = ("threads",)

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.threads > 1:
            torch.set_num_threads(self.threads)


def _small_cpu_call(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() <= SMALL_CALL_TOKENS * x.shape[-1]


def delta_ops_context(x: torch.Tensor) -> AbstractContextManager[None]:
    """The context a layer runs its plan's delta ops in for input ``x``: one thread for a small
    CPU call (see :class:`_SingleThreaded`), as they come otherwise."""
    return _SingleThreaded() if _small_cpu_call(x) else nullcontext()


class AdaptedLinear(nn.Module):
    def __init__(self, name: str, base: nn.Module, state: BatchState):
        super().__init__()
        self.name = name
        self.base = base
        self.state = state
        # Linear4bit and OneDNNLinear keep the logical shape on the module, not on their weight
        self.in_features = int(getattr(base, "in_features", 0) or _weight(base).shape[1])
        self.out_features = int(getattr(base, "out_features", 0) or _weight(base).shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.state.layers.get(self.name)
        if plan is None:
            return self.base(x)
        if plan.before:
            with delta_ops_context(x):
                for transform in plan.before:
                    x = transform(x)
        y = self.base(x)
        with delta_ops_context(x):
            for after in plan.after:
                y = after(self, x, y)
        return y


class AdaptedNorm(nn.Module):
    """A normalisation layer (LayerNorm, RMSNorm and their variants) whose batch plan adds each
    row's own weight and bias deltas after the base: the selective kind's LayerNorm tuning."""

    def __init__(self, name: str, base: nn.Module, state: BatchState):
        super().__init__()
        self.name = name
        self.base = base
        self.state = state
        self.in_features = self.out_features = int(_weight(base).shape[-1])
        # a copy of the base whose weight is one larger, kept out of the module tree (it is no
        # parameter of the model); made on first use
        self._shifted: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.state.layers.get(self.name)
        if plan is None:
            return y
        with delta_ops_context(x):
            for after in plan.after:
                y = after(self, x, y)
        return y

    def normalized(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """n(x), the base's normalised input before its weight, given y = base(x).

        Every normalisation layer's output is affine in its weight with slope n(x): w * n(x) + b
        (LayerNorm, RMSNorm) or (1 + w) * n(x) (Gemma's RMSNorm). So the same layer with its
        weight plus one, minus y, is n(x) whatever the layer's formula, and a row whose weight
        changed by d gets y + d * n(x)."""
        if not self._shifted:
            shifted = copy.deepcopy(self.base)
            with torch.no_grad():
                _weight(shifted).add_(1.0)
            self._shifted.append(shifted)
        return self._shifted[0](x) - y


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1


def patch_norm_layers(model: nn.Module, state: BatchState) -> dict[str, AdaptedNorm]:
    """Wrap every normalisation layer that has a weight vector (in the blocks and the final one)."""
    patched = {}
    for name, module in [(n, m) for n, m in model.named_modules() if _is_norm(m)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = AdaptedNorm(name, module, state)
        setattr(parent, child, wrapper)
        patched[name] = wrapper
    return patched


def _weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight (nn.Module types its attributes as Tensor | Module)."""
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}.weight is not a tensor")
    return weight


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


def build_plan(
    rows: list[Any], layers: Mapping[str, AdaptedLinear | AdaptedNorm], device: Any, dtype: Any
) -> dict[str, LayerPlan]:
    """Per-layer plans for a batch whose row i uses module ``rows[i]`` (a LoadedModule or a
    Composition, or None for the base alone): at each layer some module touches, every kind
    group present in the batch contributes its part (``ServedKind.plan_layer``), groups in
    the order kinds.groups() gives (by order, then registration)."""
    from tunehub.server.engine import kinds

    # per row: group -> that group's per-layer deltas (a composition has several groups)
    row_groups: list[dict[int, dict[str, Any]]] = [
        {} if m is None else {id(group): group_layers for group, group_layers in m.group_layers} for m in rows
    ]
    if not any(row_groups):
        return {}
    touched: set[str] = set()
    for groups in row_groups:
        for group_layers in groups.values():
            touched.update(group_layers)
    shared = len({id(m) for m in rows}) == 1  # every row on one module
    present = {key for groups in row_groups for key in groups}
    batch_groups = [g for g in kinds.groups() if id(g) in present]
    plans: dict[str, LayerPlan] = {}
    for name in touched:
        layer = layers[name]
        parts: dict[str, Any] = {}
        for group in batch_groups:
            # each group sees only its own rows' deltas; other rows (other groups, the base) get None
            deltas = [groups[id(group)].get(name) if id(group) in groups else None for groups in row_groups]
            if all(d is None for d in deltas):
                continue
            part = group.plan_layer(deltas, layer, shared, device, dtype)
            if part is not None:
                parts[group.name] = part
        plans[name] = LayerPlan.of(parts)
    return plans
