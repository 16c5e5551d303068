"""Helpers that make real (untrained but non-trivial) modules for tests, examples and benchmarks.

A freshly initialised LoRA has B = 0 and so changes nothing; tests of loading, serving and
mixing need modules whose effect is visible, so the B matrices get small random values here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence, cast

from tunehub.errors import ConfigError
from tunehub.registry.manifest import ModuleKind

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

#: standard deviation of the random LoRA B entries: visible in the logits, far from saturating them
B_INIT_STD = 0.05


def _architecture(base_path: Path) -> str:
    config = json.loads((Path(base_path) / "config.json").read_text())
    return (config.get("architectures") or [""])[0]


def load_base(base_path: str | Path) -> PreTrainedModel:
    """The base model of ``base_path`` with its LM head (causal or masked), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    path = Path(base_path)
    auto = AutoModelForMaskedLM if _architecture(path).endswith("ForMaskedLM") else AutoModelForCausalLM
    return auto.from_pretrained(path).eval()


def task_type_for(base_path: str | Path) -> str:
    # PEFT has no masked-LM task type; FEATURE_EXTRACTION wraps an encoder without touching its head
    return "FEATURE_EXTRACTION" if _architecture(Path(base_path)).endswith("ForMaskedLM") else "CAUSAL_LM"


def make_lora_model(
    base_path: str | Path,
    *,
    r: int = 4,
    alpha: int = 8,
    seed: int = 0,
    target_modules: str | Sequence[str] = "all-linear",
    kind: Literal["lora", "dora"] | ModuleKind = "lora",
) -> PeftModel:
    """An in-memory ``PeftModel`` over the base at ``base_path`` with random non-zero LoRA B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from tunehub.trainer.run import peft_deprecations_silenced

    kind = ModuleKind(kind)
    if kind not in (ModuleKind.LORA, ModuleKind.DORA):
        raise ConfigError(f"make_lora_model makes lora or dora modules, not {kind.value}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_dora=kind is ModuleKind.DORA,
        task_type=task_type_for(base_path),
    )
    base = load_base(base_path)
    # PEFT draws the A matrices from the global RNG: seed it, without leaking into the caller's state
    with torch.random.fork_rng(devices=[]), peft_deprecations_silenced():
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
            if isinstance(module, LoraLayer):
                for layer in module.lora_B.values():
                    # a Parameter: Module.__getattr__ is typed Tensor | Module
                    weight = cast("torch.Tensor", layer.weight)
                    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * B_INIT_STD
                    weight.copy_(noise.to(weight.dtype))
    return model.eval()


def make_lora_module(
    base_path: str | Path,
    out_dir: str | Path,
    *,
    r: int = 4,
    alpha: int = 8,
    seed: int = 0,
    target_modules: str | Sequence[str] = "all-linear",
    kind: Literal["lora", "dora"] | ModuleKind = "lora",
    task: str | None = None,
) -> Path:
    """Write a verified lora/dora module for ``base_path`` into ``out_dir``; different seeds differ."""
    from tunehub.trainer.export import save_peft_module

    model = make_lora_model(base_path, r=r, alpha=alpha, seed=seed, target_modules=target_modules, kind=kind)
    save_peft_module(
        model,
        out_dir,
        base_path=base_path,
        kind=ModuleKind(kind),
        task=task,
        description=f"random {ModuleKind(kind).value} module (seed {seed}) for tests",
        config={"r": r, "alpha": alpha, "seed": seed, "target_modules": target_modules},
    )
    return Path(out_dir)


def make_peft_model(
    base_path: str | Path,
    kind: str | ModuleKind,
    *,
    seed: int = 0,
    r: int = 4,
    num_virtual_tokens: int = 4,
    target_modules: str | Sequence[str] | None = None,
    placement: Literal["houlsby", "pfeiffer"] = "houlsby",
    reduction_factor: int = 8,
    non_linearity: str = "gelu",
) -> PeftModel:
    """An in-memory PEFT model of any kind the engine mixes, with random non-trivial weights,
    as training would leave it (LoRA B, IA3 vectors, AdaLoRA's E and bottleneck up projections
    all away from their identity). ``placement``, ``reduction_factor`` and ``non_linearity`` shape
    bottleneck modules (``target_modules`` overrides the placement)."""
    import torch
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoraConfig,
        MultitaskPromptTuningConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        get_peft_model,
    )

    from tunehub.peft_methods.bottleneck import BottleneckConfig
    from tunehub.trainer.run import peft_deprecations_silenced

    kind = ModuleKind(kind)
    task_type = task_type_for(base_path)
    # PEFT's configs take a str or a list
    targets: str | list[str] = (target_modules if isinstance(target_modules, str) else list(target_modules or [])) or "all-linear"
    configs = {
        ModuleKind.LORA: lambda: LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type=task_type),
        ModuleKind.DORA: lambda: LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, use_dora=True, task_type=task_type
        ),
        ModuleKind.ADALORA: lambda: AdaLoraConfig(
            init_r=r,
            target_r=max(1, r // 2),
            lora_alpha=2 * r,
            target_modules=targets,
            total_step=10,
            tinit=1,
            tfinal=1,
            task_type=task_type,
        ),
        ModuleKind.IA3: lambda: IA3Config(
            target_modules=targets if target_modules else ["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type=task_type,
        ),
        ModuleKind.PROMPT: lambda: PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type),
        ModuleKind.PTUNING: lambda: PromptEncoderConfig(
            num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=32, task_type=task_type
        ),
        ModuleKind.MULTITASK_PROMPT: lambda: MultitaskPromptTuningConfig(
            num_virtual_tokens=num_virtual_tokens, num_tasks=2, task_type=task_type
        ),
        ModuleKind.PREFIX: lambda: PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type),
        ModuleKind.BOTTLENECK: lambda: BottleneckConfig(
            target_modules=targets if target_modules else None,
            placement=placement,
            reduction_factor=reduction_factor,
            non_linearity=non_linearity,
            task_type=task_type,
        ),
    }
    if kind not in configs:
        raise ConfigError(f"make_peft_model cannot make {kind.value} modules")
    base = load_base(base_path)
    with torch.random.fork_rng(devices=[]), peft_deprecations_silenced():
        torch.manual_seed(seed)
        model = get_peft_model(base, configs[kind]())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "lora_B" in name or "lora_E" in name:
                param.copy_(noise * B_INIT_STD)
            elif "ia3_l" in name:
                param.copy_(1.0 + 0.5 * noise)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * noise.abs())
            elif "bottleneck_" in name:
                if name.endswith("bottleneck_down.default.weight"):
                    param.add_(noise * B_INIT_STD)  # the down projection keeps its init, moved a little
                else:  # the up projection (zero at init) and both biases
                    param.copy_(noise * (2 * B_INIT_STD if name.endswith("weight") else B_INIT_STD))
            elif "prefix_task" in name:
                param.copy_(1.0 + 0.3 * noise)
            elif "embedding" in name or "prompt" in name:
                param.copy_(noise * 0.5)
    return model.eval()


def make_peft_module(
    base_path: str | Path, out_dir: str | Path, kind: str | ModuleKind, *, seed: int = 0, task: str | None = None, **options: Any
) -> Path:
    """Write a verified module of ``kind`` (any kind the engine mixes) for ``base_path``."""
    from tunehub.trainer.export import save_peft_module

    kind = ModuleKind(kind)
    model = make_peft_model(base_path, kind, seed=seed, **options)
    save_peft_module(
        model,
        out_dir,
        base_path=base_path,
        kind=kind,
        task=task,
        description=f"random {kind.value} module (seed {seed}) for tests",
    )
    return Path(out_dir)


def make_selective_module(
    base_path: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    bitfit: bool = False,
    layernorm: bool = False,
    layers: Sequence[int] = (),
    patterns: Sequence[str] = (),
    scale: float = 0.2,
) -> Path:
    """Write a selective module for ``base_path`` whose selected tensors (as the selective
    method's selectors choose them) are the base's plus seeded noise of std ``scale``; norm
    weights are scaled by (1 + noise) instead, as training moves them."""
    import torch

    from tunehub.trainer.methods.selective import SelectiveMethodConfig, save_selective, selected_names

    config = SelectiveMethodConfig(bitfit=bitfit, layernorm=layernorm, layers=list(layers), patterns=list(patterns))
    model = load_base(base_path)
    names = selected_names(config, model)
    if not names:
        raise ConfigError(f"the selectors match no tensor of {base_path}")
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            noise = torch.randn(params[name].shape, generator=generator) * scale
            if name.endswith(".weight") and params[name].dim() == 1:
                params[name].mul_(1.0 + noise)
            else:
                params[name].add_(noise)
    cast(Any, model).tunehub_selected = names  # what save_selective stores
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_selective(
        config, model, out, base_path=base_path, task_type=task_type_for(base_path),
        description=f"random selective module (seed {seed}) for tests",
    )  # fmt: skip
    return out


__all__ = [
    "B_INIT_STD",
    "load_base",
    "make_lora_model",
    "make_lora_module",
    "make_peft_model",
    "make_peft_module",
    "make_selective_module",
    "task_type_for",
]
