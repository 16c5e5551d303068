"""Selective fine-tuning: train some of the base's own tensors, freeze the rest, and store only the
trained tensors (safetensors, under their names in the base).

Selectors (any combination; at least one):

- ``layers: [0, 3]``: every tensor of those transformer blocks;
- ``patterns: ["*.mlp.down_proj.weight"]``: tensor names (``fnmatch``);
- ``bitfit: true``: every bias (Ben Zaken et al., 2022, arXiv:2106.10199);
- ``layernorm: true``: the weights and biases of every normalisation layer (LayerNorm, RMSNorm).

It trains a full-precision base (``base.quantization: none``): transformers' Trainer trains a
quantized base only through an adapter. :func:`apply_selective` puts a module's tensors into a
loaded base (what the trained model computed).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunehub.errors import ConfigError, IntegrityError
from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method

WEIGHTS_FILE = "adapter_model.safetensors"  # one weights file name for every kind (the engine reads it)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


class SelectiveMethodConfig(MethodConfig):
    name: Literal["selective"] = "selective"
    layers: list[int] = Field(default_factory=list, description="indices of the transformer blocks to train whole")
    patterns: list[str] = Field(default_factory=list, description="tensor names to train (fnmatch patterns)")
    bitfit: bool = Field(default=False, description="train every bias")
    layernorm: bool = Field(default=False, description="train every normalisation layer's weight and bias")


def check_selective(cfg: SelectiveMethodConfig, run: Any) -> list[str]:
    problems = []
    if not (cfg.layers or cfg.patterns or cfg.bitfit or cfg.layernorm):
        problems.append("method: choose what to train: layers, patterns, bitfit and/or layernorm")
    if any(i < 0 for i in cfg.layers):
        problems.append("method.layers: block indices start at 0")
    if run.base.quantization != "none":
        # transformers' Trainer trains a quantized base only through an adapter, and its linear
        # weights cannot take gradients: the norms and biases alone would need a trainer of our own
        problems.append(
            f"base.quantization: selective fine-tuning trains the base's own tensors, so it needs base.quantization: none"
            f" (on a {run.base.quantization} base, ia3 rescales the same activations through an adapter)"
        )
    return problems


def _is_norm(module: Any) -> bool:
    return "norm" in type(module).__name__.lower()


def selected_names(cfg: SelectiveMethodConfig, model: Any) -> list[str]:
    """The names of the tensors ``cfg`` selects in ``model`` (parameters, in model order)."""
    norms = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if _is_norm(module)
        for name, _ in module.named_parameters(recurse=False)
    }
    chosen = []
    for name, _ in model.named_parameters():
        block = _BLOCK.search(name)
        if (
            (cfg.layers and block is not None and int(block.group(1)) in cfg.layers)
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.patterns)
            or (cfg.bitfit and name.endswith(".bias"))
            or (cfg.layernorm and name in norms)
        ):
            chosen.append(name)
    return chosen


def prepare_selective(cfg: SelectiveMethodConfig, model: Any, ctx: BuildContext) -> Any:
    names = selected_names(cfg, model)
    if not names:
        raise ConfigError(
            "method: the selectors match no tensor of this base (a Llama base has no biases: bitfit needs one that has)"
        )
    blocks = {int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))}
    missing = sorted(set(cfg.layers) - blocks)
    if missing:
        raise ConfigError(
            f"method.layers: the base has blocks {min(blocks, default=0)}..{max(blocks, default=-1)}, not {missing}"
        )
    params = dict(model.named_parameters())
    quantized = [
        n for n in names if not params[n].is_floating_point() or type(params[n]).__name__ in ("Params4bit", "Int8Params")
    ]
    if quantized:
        raise ConfigError(f"method: these tensors are quantized and cannot be trained: {', '.join(quantized[:6])}")
    model.requires_grad_(False)
    for name in names:
        params[name].requires_grad_(True)
    model.tunehub_selected = names  # what save_selective stores
    return model


def save_selective(cfg: SelectiveMethodConfig, model: Any, out_dir: Path, **manifest_fields: Any) -> Any:
    """Store the trained tensors and the manifest (kind ``selective``)."""
    from safetensors.torch import save_file

    from tunehub.trainer.export import save_module_files

    params = dict(model.named_parameters())
    names = list(model.tunehub_selected)
    tensors = {name: params[name].detach().to("cpu").contiguous().clone() for name in names}
    out_dir = Path(out_dir)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    selected = {"layers": cfg.layers, "patterns": cfg.patterns, "bitfit": cfg.bitfit, "layernorm": cfg.layernorm}
    numel = sum(t.numel() for t in tensors.values())
    return save_module_files(
        out_dir,
        kind=ModuleKind.SELECTIVE,
        params={"selected": selected, "tensors": len(tensors), "parameters": numel},
        **manifest_fields,
    )


def apply_selective(model: Any, module_dir: str | Path) -> Any:
    """Load a selective module's tensors into ``model`` (a base loaded as the module's manifest
    says); every tensor must name one of the model's, with its shape. Returns ``model``."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(Path(module_dir) / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        target = params.get(name)
        if target is None or tuple(target.shape) != tuple(tensor.shape):
            raise IntegrityError(f"{module_dir}: tensor {name} {tuple(tensor.shape)} does not fit this base")
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    return model


METHOD = register_method(
    Method(
        name="selective",
        kind=ModuleKind.SELECTIVE,
        config_cls=SelectiveMethodConfig,
        build_peft_config=lambda cfg, ctx: None,
        check=check_selective,
        description="some of the base's own tensors (blocks, name patterns, BitFit biases, norms); stores only those",
        prepare_model=prepare_selective,
        save_module=save_selective,
        quantized_base=False,
    )
)
