"""Helpers that make real (untrained but non-trivial) modules for tests, examples and benchmarks.

A freshly initialised LoRA has B = 0 and so changes nothing; tests of loading, serving and
mixing need modules whose effect is visible, so the B matrices get small random values here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
            if isinstance(module, LoraLayer):
                for adapter, layer in module.lora_B.items():
                    weight = layer.weight
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


__all__ = ["B_INIT_STD", "load_base", "make_lora_model", "make_lora_module", "task_type_for"]
