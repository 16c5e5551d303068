"""ia3: per layer a learned vector that scales the layer's input (feed-forward layers) or its
output (elsewhere), as PEFT applies it:

    x_i' = x_i * in_scale_i          before the base, on feed-forward layers
    y_i  = y_i * out_scale_i         after the base, elsewhere

Rows of other modules get ones, so one elementwise product serves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tunehub.errors import IncompatibleBase
from tunehub.registry.manifest import ModuleKind
from tunehub.server.engine.kinds import ServedKind, combine_vectors, register_kind, stacked_row_vectors
from tunehub.server.engine.layers import AdaptedLinear
from tunehub.server.engine.modules import (
    InvalidModuleWeights,
    LoadedModule,
    ModuleMaterializer,
    UnsupportedModule,
    layer_and_param,
)


@dataclass
class IA3Delta:
    """What one IA3 module does to one linear layer (one of the two is set)."""

    in_scale: Any = None  # (in,): IA3 on feed-forward layers scales the input
    out_scale: Any = None  # (out,): IA3 elsewhere scales the output


class IA3Part:
    """A batch's IA3 vectors at one layer; ``before``/``after`` are None where no row scales
    (the layer then skips them)."""

    before: Callable[[torch.Tensor], torch.Tensor] | None
    after: Callable[[AdaptedLinear, torch.Tensor, torch.Tensor], torch.Tensor] | None

    def __init__(self, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None):
        self.in_scale = in_scale  # (B, 1, in)
        self.out_scale = out_scale  # (B, 1, out)
        self.before = None
        self.after = None
        if in_scale is not None:

            def scale_input(x: torch.Tensor) -> torch.Tensor:
                return x * in_scale

            self.before = scale_input
        if out_scale is not None:

            def scale_output(layer: AdaptedLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return y * out_scale

            self.after = scale_output


def _matches(names: set[str], layer: str) -> bool:
    return any(layer == n or layer.endswith("." + n) for n in names)


class IA3(ServedKind):
    name = "ia3"
    kinds = (ModuleKind.IA3,)
    # last: composed with other kinds in one row, IA3 rescales the whole adapted layer (its input
    # before every group, its output after every other delta), as when it is trained on top of them
    order = 10

    def materialize(self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        feedforward = set(loaded.manifest.params.get("feedforward_modules") or [])
        for key, tensor in weights.items():
            layer, param = layer_and_param(key)
            if param != "ia3_l":
                raise UnsupportedModule(f"{name}: unexpected IA3 tensor {key}")
            target = materializer.target_layer(layer, name)
            if tensor.dim() == 0:
                raise InvalidModuleWeights(f"{name}: tensor {key!r} is a scalar, not an IA3 vector")
            vector = tensor.float().reshape(-1)
            is_ff = tensor.shape[0] == 1 or _matches(feedforward, layer)
            if is_ff:
                if vector.numel() != target.in_features:
                    raise IncompatibleBase(
                        f"{name}: IA3 vector at {layer} has {vector.numel()} entries, the layer takes {target.in_features}"
                    )
                loaded.layers[layer] = IA3Delta(in_scale=vector.contiguous())
            else:
                if vector.numel() != target.out_features:
                    raise IncompatibleBase(
                        f"{name}: IA3 vector at {layer} has {vector.numel()} entries, the layer gives {target.out_features}"
                    )
                loaded.layers[layer] = IA3Delta(out_scale=vector.contiguous())

    def combine(self, members: list[tuple[LoadedModule, float]], name: str) -> dict[str, Any]:
        # PEFT multiplies the vectors of active IA3 adapters; a weight w scales a vector's
        # departure from identity (1 + w (l - 1)): w = 1 is the module, w = 0 no change
        def fold(so_far: Any, vector: Any, weight: float) -> Any:
            scaled = 1 + weight * (vector - 1)
            return scaled if so_far is None else so_far * scaled

        return combine_vectors(members, IA3Delta, ("in_scale", "out_scale"), fold)

    def plan_layer(self, deltas: list[Any], layer: AdaptedLinear, shared: bool, device: Any, dtype: Any) -> IA3Part | None:
        in_scale = stacked_row_vectors(deltas, "in_scale", layer.in_features, device, dtype)
        out_scale = stacked_row_vectors(deltas, "out_scale", layer.out_features, device, dtype)
        if in_scale is None and out_scale is None:
            return None
        return IA3Part(in_scale, out_scale)


register_kind(IA3())
