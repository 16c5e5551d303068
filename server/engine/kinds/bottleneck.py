"""bottleneck: a residual block after a linear layer's output, as tunehub's PEFT method
(:mod:`tunehub.peft_methods.bottleneck`) applies it:

    y_i' = y_i + f_i(y_i D_i + d_i) U_i + u_i      D_i: (out, m_i), U_i: (m_i, out), f_i the module's non-linearity

In a batch the down and up projections are gathered per row, zero-padded to the batch's widest
bottleneck (one bmm each for the rows that have a block). When only some rows have one (a
bottleneck composed into one row of a batch), only those rows are computed: their outputs are
gathered, and the blocks' outputs added back at their rows; the other rows pass unchanged. Rows of
different non-linearities get each their own (relu, gelu, silu and tanh all map 0 to 0, so a padded
column stays 0 through any of them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunehub.errors import IncompatibleBase, IntegrityError
from tunehub.peft_methods import install as install_peft_methods
from tunehub.registry.manifest import ModuleKind
from tunehub.server.engine.kinds import ServedKind, register_kind
from tunehub.server.engine.layers import AdaptedLinear
from tunehub.server.engine.modules import (
    InvalidModuleWeights,
    LoadedModule,
    ModuleMaterializer,
    UnsupportedModule,
    check_ndim,
)

# the engine's process registers the method with PEFT too (a client comparing against PEFT, a
# tool loading a module beside the server): on peft's import, never importing it here
install_peft_methods()

#: the non-linearities by the name the module's config records: the functions the PEFT method uses
NON_LINEARITIES = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<layer>.+)\.bottleneck_(?P<part>down|up)(?:\.default)?\.(?P<param>weight|bias)$")


@dataclass
class BottleneckDelta:
    """What one bottleneck module does after one linear layer."""

    down: Any  # (m, out)
    down_bias: Any  # (m,)
    up: Any  # (out, m)
    up_bias: Any  # (out,)
    non_linearity: str = "relu"

    @property
    def width(self) -> int:
        return int(self.down.shape[0])


class BottleneckPart:
    """A batch's bottleneck blocks at one layer, added after the base."""

    __slots__ = ("down", "down_bias", "up", "up_bias", "activations", "rows")

    def __init__(
        self,
        down: torch.Tensor,
        down_bias: torch.Tensor,
        up: torch.Tensor,
        up_bias: torch.Tensor,
        activations: Any,
        rows: torch.Tensor | None = None,
    ):
        self.down = down  # (K, out, M) for the K rows with a block, or (out, M) when every row shares one module
        self.down_bias = down_bias  # (K, 1, M), or (M,)
        self.up = up  # (K, M, out), or (M, out)
        self.up_bias = up_bias  # (K, 1, out), or (out,)
        # one name for the whole batch, or (name, (K, 1, 1) bool mask of its rows) per non-linearity
        self.activations = activations
        self.rows = rows  # (K,) batch indices of the rows with a block; None when every row has one

    def after(self, layer: AdaptedLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return y + self._blocks(y)
        # a block costs its weights' bytes per row: rows without one skip it
        return y.index_add(0, self.rows, self._blocks(y.index_select(0, self.rows)))

    def _blocks(self, y: torch.Tensor) -> torch.Tensor:
        """f(y D + d) U + u for the rows of ``y``, which are this part's rows."""
        if self.down.dim() == 2:  # one module for every row: plain matmuls
            h = y @ self.down + self.down_bias
        else:
            h = torch.baddbmm(self.down_bias, y, self.down)
        if isinstance(self.activations, str):
            h = NON_LINEARITIES[self.activations](h)
        else:  # each row through its own non-linearity
            mixed = torch.zeros_like(h)
            for name, rows in self.activations:
                mixed = torch.where(rows, NON_LINEARITIES[name](h), mixed)
            h = mixed
        if self.up.dim() == 2:
            return h @ self.up + self.up_bias
        return torch.baddbmm(self.up_bias, h, self.up)


class Bottleneck(ServedKind):
    name = "bottleneck"
    kinds = (ModuleKind.BOTTLENECK,)

    def materialize(self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        params = loaded.manifest.params
        if params.get("modules_to_save"):
            raise UnsupportedModule(f"{name} trains whole modules ({params['modules_to_save']}); the engine mixes deltas only")
        non_linearity = params.get("non_linearity", "relu")
        if non_linearity not in NON_LINEARITIES:
            raise UnsupportedModule(
                f"{name}: non-linearity {non_linearity!r} is not one the engine applies ({', '.join(NON_LINEARITIES)})"
            )
        grouped: dict[str, dict[str, Any]] = {}
        for key, tensor in weights.items():
            match = _KEY.match(key)
            if match is None:
                raise UnsupportedModule(f"{name}: unexpected bottleneck tensor {key}")
            grouped.setdefault(match["layer"], {})[f"{match['part']}.{match['param']}"] = tensor
        for layer, tensors in grouped.items():
            missing = {"down.weight", "down.bias", "up.weight", "up.bias"} - set(tensors)
            if missing:
                raise IntegrityError(f"{name}: layer {layer} lacks bottleneck {', '.join(sorted(missing))}")
            target = materializer.target_layer(layer, name)
            for part, ndim in (("down.weight", 2), ("down.bias", 1), ("up.weight", 2), ("up.bias", 1)):
                check_ndim(tensors[part], ndim, f"{layer}.bottleneck_{part}", name)
            down, up = tensors["down.weight"].float(), tensors["up.weight"].float()
            width, out = int(down.shape[0]), target.out_features
            if width > materializer.max_rank:
                raise UnsupportedModule(
                    f"{name}: bottleneck width {width} at {layer} is above this server's maximum of {materializer.max_rank}"
                )
            shapes = (tuple(down.shape), tuple(tensors["down.bias"].shape), tuple(up.shape), tuple(tensors["up.bias"].shape))
            if shapes != ((width, out), (width,), (out, width), (out,)):
                raise IncompatibleBase(
                    f"{name}: {layer} has bottleneck shapes {'/'.join(str(s) for s in shapes)}; the base layer gives {out} features"
                )
            if width == 0:
                raise InvalidModuleWeights(f"{name}: the bottleneck at {layer} has width 0")
            loaded.layers[layer] = BottleneckDelta(
                down=down.contiguous(),
                down_bias=tensors["down.bias"].float().contiguous(),
                up=up.contiguous(),
                up_bias=tensors["up.bias"].float().contiguous(),
                non_linearity=non_linearity,
            )

    def plan_layer(self, deltas: list[Any], layer: AdaptedLinear, shared: bool, device: Any, dtype: Any) -> BottleneckPart | None:
        present = [d for d in deltas if d is not None]
        if not present:
            return None
        out = layer.out_features
        if shared:
            d = present[0]
            return BottleneckPart(
                d.down.t().contiguous().to(device=device, dtype=dtype),
                d.down_bias.to(device=device, dtype=dtype),
                d.up.t().contiguous().to(device=device, dtype=dtype),
                d.up_bias.to(device=device, dtype=dtype),
                d.non_linearity,
            )
        count, width = len(present), max(d.width for d in present)
        down = torch.zeros(count, out, width)
        down_bias = torch.zeros(count, 1, width)
        up = torch.zeros(count, width, out)
        up_bias = torch.zeros(count, 1, out)
        for i, d in enumerate(present):
            down[i, :, : d.width] = d.down.t()
            down_bias[i, 0, : d.width] = d.down_bias
            up[i, : d.width, :] = d.up.t()
            up_bias[i, 0] = d.up_bias
        names = sorted({d.non_linearity for d in present})
        activations: Any = names[0]
        if len(names) > 1:
            activations = [
                (name, torch.tensor([d.non_linearity == name for d in present], device=device).view(count, 1, 1))
                for name in names
            ]
        rows = None
        if count < len(deltas):
            rows = torch.tensor([i for i, d in enumerate(deltas) if d is not None], device=device)
        return BottleneckPart(
            down.to(device=device, dtype=dtype),
            down_bias.to(device=device, dtype=dtype),
            up.to(device=device, dtype=dtype),
            up_bias.to(device=device, dtype=dtype),
            activations,
            rows,
        )


register_kind(Bottleneck())
