"""Bottleneck adapters as a PEFT method: ``peft_type`` BOTTLENECK, registered with
``peft.utils.peft_types.register_peft_method`` (PEFT has no such method; the ``adapters`` library
pins an old transformers).

A bottleneck adapter (Houlsby et al., 2019, arXiv:1902.00751) adds, after a sublayer's output
projection, a small residual block

    y' = y + W_up f(W_down y + b_down) + b_up        W_down: (m, d), W_up: (d, m), m = d // reduction_factor

- placement ``houlsby``: after the attention block and after the feed-forward block (the output
  projections ``o_proj`` / ``down_proj`` of a Llama-style decoder, ``attention.output.dense`` /
  ``output.dense`` of a BERT-style encoder); ``pfeiffer`` (Pfeiffer et al., 2021,
  arXiv:2005.00247): after the feed-forward block only. ``target_modules`` overrides both.
- ``non_linearity`` f: relu, gelu (exact, erf), silu, tanh.
- ``init``: ``zeros`` (default): W_down as ``nn.Linear`` initialises it, W_up and both biases zero,
  so the adapted model starts exactly at the base; ``bert``: both weights N(0, 0.02^2) (BERT's
  initializer_range), biases zero; ``houlsby``: both weights N(0, 0.01^2) truncated at two
  standard deviations, biases zero (the paper's near-identity init).

The block is non-linear: it cannot be merged into the base weights (``merge_and_unload`` refuses;
``unload`` gives the base back).

This is the ONE file where tunehub touches PEFT's internals, because PEFT's extension design
requires it: ``PeftType`` gains the BOTTLENECK member (``register_peft_method`` accepts only enum
members, and an enum has no public way to gain one), and the tuner overrides BaseTuner's
underscore hooks (``_create_and_replace``, ``_prepare_adapter_config``, ``_prepare_model``,
``_check_merge_allowed``) and calls ``_replace_module`` and
``_move_adapter_to_device_of_base_layer``, as PEFT's own methods do. tests/unit/test_bottleneck.py
checks all of it against the installed peft (pyproject.toml pins the range it was checked on).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

NAME = "bottleneck"
PEFT_TYPE = "BOTTLENECK"
PREFIX = "bottleneck_"
PLACEMENTS = ("houlsby", "pfeiffer")
INITS = ("zeros", "bert", "houlsby")

#: the non-linearities, by the name the config records (the engine applies the same functions)
NON_LINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

#: target modules per placement, for the decoder and encoder layouts tunehub's presets use. A list
#: matches module names by suffix; a string is a regular expression matched against the whole name
#: (BERT's attention output is ``...attention.output.dense`` and its feed-forward output
#: ``...layer.N.output.dense``: a suffix cannot tell them apart)
LAYOUTS: dict[str, dict[str, Union[list[str], str]]] = {
    "llama": {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]},
    "bert": {
        "houlsby": r".*\.layer\.\d+\.(attention\.)?output\.dense",
        "pfeiffer": r".*\.layer\.\d+\.output\.dense",
    },
}


def bottleneck_size(features: int, reduction_factor: int) -> int:
    """Width m of the bottleneck for a layer of ``features`` outputs (at least 1)."""
    return max(1, features // reduction_factor)


# --- PeftType.BOTTLENECK ------------------------------------------------------------------------


def _add_peft_type() -> Any:
    """PeftType.BOTTLENECK, added to the enum if this peft lacks it (a private operation: an
    Enum gains members through none of its public API)."""
    existing = PeftType.__members__.get(PEFT_TYPE)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, PEFT_TYPE)
    member._name_ = PEFT_TYPE
    member._value_ = PEFT_TYPE
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    PeftType._member_map_[PEFT_TYPE] = member
    PeftType._value2member_map_[PEFT_TYPE] = member
    PeftType._member_names_.append(PEFT_TYPE)
    type.__setattr__(PeftType, PEFT_TYPE, member)  # EnumType.__setattr__ refuses member names
    return member


BOTTLENECK = _add_peft_type()


# --- config ---------------------------------------------------------------------------------------


@dataclass
class BottleneckConfig(PeftConfig):
    """PEFT config of bottleneck adapters (see the module's docstring for the fields' meaning)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "modules whose output the adapter follows: names matched by suffix, or one regular expression;"
            " None: the placement's modules for Llama- and BERT-style layouts"
        },
    )
    placement: str = field(default="pfeiffer", metadata={"help": "houlsby (attention and FFN outputs) or pfeiffer (FFN)"})
    reduction_factor: int = field(default=16, metadata={"help": "bottleneck width = output features // reduction_factor"})
    non_linearity: str = field(default="relu", metadata={"help": "relu, gelu, silu or tanh"})
    init: str = field(default="zeros", metadata={"help": "zeros (starts at the base), bert or houlsby"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules trained and saved whole"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)


def resolve_target_modules(model: nn.Module, placement: str) -> Union[list[str], str]:
    """The placement's target modules for ``model``'s layout (Llama- or BERT-style); ValueError
    for another layout (set target_modules then)."""
    names = [name for name, _ in model.named_modules()]
    if any(name.endswith(".o_proj") for name in names) and any(name.endswith(".down_proj") for name in names):
        return LAYOUTS["llama"][placement]
    if any(re.fullmatch(r".*\.layer\.\d+\.attention\.output\.dense", name) for name in names):
        return LAYOUTS["bert"][placement]
    raise ValueError(
        f"bottleneck adapters: cannot tell where this model's attention and feed-forward outputs are (placement {placement});"
        " set target_modules to the output projections' names"
    )


# --- the layer ------------------------------------------------------------------------------------


def _out_features(layer: nn.Module) -> int:
    features = getattr(layer, "out_features", None)
    if isinstance(features, int) and features > 0:
        return features
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    raise ValueError(f"bottleneck adapters follow linear layers; {type(layer).__name__} is not one")


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A linear layer followed by one bottleneck block per adapter (applied in turn)."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_non_linearity",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features = _out_features(base_layer)
        self.in_features = int(getattr(base_layer, "in_features", 0) or 0)
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_non_linearity: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        width = bottleneck_size(self.out_features, config.reduction_factor)
        down = nn.Linear(self.out_features, width)
        up = nn.Linear(width, self.out_features)
        with torch.no_grad():
            if config.init == "zeros":
                nn.init.zeros_(up.weight)  # W_down keeps nn.Linear's init: gradients reach W_up at once
            else:
                std = 0.02 if config.init == "bert" else 0.01
                for weight in (down.weight, up.weight):
                    if config.init == "bert":
                        nn.init.normal_(weight, mean=0.0, std=std)
                    else:
                        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_non_linearity[adapter_name] = config.non_linearity
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def block(self, adapter_name: str, y: torch.Tensor) -> torch.Tensor:
        """y + up(f(down(y))) for one adapter, computed in the adapter's dtype, returned in y's."""
        down = self.bottleneck_down[adapter_name]
        up = self.bottleneck_up[adapter_name]
        act = NON_LINEARITIES[self.bottleneck_non_linearity[adapter_name]]
        weight = down.weight
        assert isinstance(weight, torch.Tensor)
        h = y.to(weight.dtype)
        return (h + up(act(down(h)))).to(y.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        for adapter_name in self.active_adapters:
            if adapter_name in self.bottleneck_down:
                y = self.block(adapter_name, y)
        return y

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError("bottleneck adapters are non-linear: they cannot be merged into the base weights")

    def unmerge(self) -> None:
        return None  # never merged


# --- the tuner ------------------------------------------------------------------------------------


class BottleneckModel(BaseTuner):
    """Wraps the target linear layers of a model in :class:`BottleneckLayer`."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}  # resolved from the model's layout instead

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict[str, Any]) -> Any:
        return peft_config  # target_modules None is resolved in _prepare_model, which sees the model

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        if peft_config.target_modules is None:
            peft_config.target_modules = resolve_target_modules(model, peft_config.placement)

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("bottleneck adapters follow modules, not parameters (target_parameters)")
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        layer = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an added adapter that is not active is not trained
        self._replace_module(parent, target_name, layer, target)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "bottleneck adapters are non-linear: they cannot be merged into the base weights (unload() removes them)"
        )


# --- registration ---------------------------------------------------------------------------------

_LOCK = threading.Lock()


def is_registered() -> bool:
    """Whether PEFT maps BOTTLENECK to this module's config and tuner."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return (
        PEFT_TYPE_TO_CONFIG_MAPPING.get(BOTTLENECK) is BottleneckConfig
        and PEFT_TYPE_TO_TUNER_MAPPING.get(BOTTLENECK) is BottleneckModel
    )


def register() -> None:
    """Register bottleneck adapters with PEFT; idempotent."""
    with _LOCK:
        if not is_registered():
            register_peft_method(name=NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=PREFIX)


register()

__all__ = [
    "BOTTLENECK",
    "INITS",
    "LAYOUTS",
    "NON_LINEARITIES",
    "PLACEMENTS",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "bottleneck_size",
    "is_registered",
    "register",
    "resolve_target_modules",
]
