"""selective: a module of the base's own tensors, mixed when every tensor is a vector the base adds
or scales with (BitFit biases, LayerNorm tuning's norm weights and biases):

    y_i = y_i + (b'_i - b)                       a linear layer's bias (BitFit)
    y_i = y_i + (w'_i - w) * n(x_i) + (b'_i - b)  a normalisation layer's weight and bias

where ``n(x)`` is the norm's input normalised before its weight (see
:meth:`~tunehub.server.engine.layers.AdaptedNorm.normalized`). Each row's deltas are stacked into
one (rows, 1, width) tensor per layer, zeros for rows of other modules, so one addition serves the
batch. A module that replaces whole weight matrices (blocks, name patterns) changes what every
row computes at that layer: the engine refuses it and says how to serve it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tunehub.errors import IncompatibleBase
from tunehub.registry.manifest import ModuleKind
from tunehub.server.engine.kinds import ServedKind, combine_vectors, register_kind
from tunehub.server.engine.modules import InvalidModuleWeights, LoadedModule, ModuleMaterializer, UnsupportedModule

#: what to do with a selective module whose tensors the engine cannot mix (the one place)
SERVE_WHOLE_TENSORS_AS_BASE = (
    "load its tensors into the base (tunehub.trainer.methods.selective.apply_selective), save that"
    " model and serve it as the base (tunehub serve --base DIR)"
)


@dataclass
class VectorDelta:
    """What one selective module changes at one layer: vectors to add, None where unchanged."""

    bias: Any = None  # (out,): added to the output (a linear or norm layer's bias delta)
    weight: Any = None  # (width,): a norm layer's weight delta, times the normalised input


def _stacked(deltas: list[Any], attr: str, width: int, device: Any, dtype: Any) -> torch.Tensor | None:
    """(rows, width) of each row's ``attr`` delta, zeros where a row has none; None when no row has one."""
    if not any(d is not None and getattr(d, attr) is not None for d in deltas):
        return None
    stacked = torch.zeros(len(deltas), width)
    for i, delta in enumerate(deltas):
        vector = getattr(delta, attr) if delta is not None else None
        if vector is not None:
            stacked[i] = vector
    return stacked.to(device=device, dtype=dtype)


def _per_row(vectors: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows, width) vectors shaped to broadcast over ``y`` (rows, ..., width): a norm inside
    attention (per head) sees (rows, tokens, heads, head_dim)."""
    return vectors.view(vectors.shape[0], *([1] * (y.dim() - 2)), vectors.shape[1])


class SelectivePart:
    """A batch's selective deltas at one layer."""

    before: Callable[[torch.Tensor], torch.Tensor] | None = None
    after: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None

    def __init__(self, bias: torch.Tensor | None, weight: torch.Tensor | None):
        self.bias = bias  # (rows, out)
        self.weight = weight  # (rows, width), norm layers only

        def add_deltas(layer: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = y
            if weight is not None:  # first: normalized() needs the base's own output
                out = out + layer.normalized(x, y) * _per_row(weight, y)
            if bias is not None:
                out = out + _per_row(bias, y)
            return out

        self.after = add_deltas


class Selective(ServedKind):
    name = "selective"
    kinds = (ModuleKind.SELECTIVE,)
    mixes_only = "biases, norms only"

    def materialize(self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        if not weights:
            raise InvalidModuleWeights(f"{name}: a selective module with no tensors")
        for key, tensor in weights.items():
            layer, _, param = key.rpartition(".")
            linear = materializer.linear_layers.get(layer)
            norm = materializer.norm_layers.get(layer)
            if linear is not None and param == "bias":
                base_value = getattr(linear.base, "bias", None)
            elif norm is not None and param in ("weight", "bias"):
                base_value = getattr(norm.base, param, None)
            else:
                raise UnsupportedModule(
                    f"{name}: its tensor {key} is not a bias of a linear layer nor a normalisation layer's weight or"
                    f" bias, so it cannot be served in mixed batches; {SERVE_WHOLE_TENSORS_AS_BASE}"
                )
            if not isinstance(base_value, torch.Tensor):
                raise IncompatibleBase(f"{name}: its tensor {key} has no counterpart: this base's {layer} has no {param}")
            if tuple(tensor.shape) != tuple(base_value.shape):
                raise IncompatibleBase(
                    f"{name}: tensor {key} has shape {tuple(tensor.shape)}, this base's has {tuple(base_value.shape)}"
                )
            if not tensor.is_floating_point():
                raise InvalidModuleWeights(f"{name}: tensor {key} holds {tensor.dtype} values, not floating-point ones")
            # the pool keeps modules on the CPU; plans move the stacked deltas to the base's device
            delta = tensor.float() - base_value.detach().to(device="cpu", dtype=torch.float32)
            entry = loaded.layers.setdefault(layer, VectorDelta())
            setattr(entry, "weight" if param == "weight" else "bias", delta.contiguous())

    def combine(self, members: list[tuple[LoadedModule, float]], name: str) -> dict[str, Any]:
        def fold(so_far: Any, vector: Any, weight: float) -> Any:  # deltas add up, each weighted
            return weight * vector if so_far is None else so_far + weight * vector

        return combine_vectors(members, VectorDelta, ("bias", "weight"), fold)

    def plan_layer(self, deltas: list[Any], layer: Any, shared: bool, device: Any, dtype: Any) -> SelectivePart | None:
        bias = _stacked(deltas, "bias", layer.out_features, device, dtype)
        weight = _stacked(deltas, "weight", layer.out_features, device, dtype)
        if bias is None and weight is None:
            return None
        return SelectivePart(bias, weight)


register_kind(Selective())
