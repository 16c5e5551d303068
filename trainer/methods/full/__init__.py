"""Full fine-tuning: every weight of the base is trained, and the module is a whole model
(transformers' folder: config, sharded safetensors, tokenizer) with tunehub's manifest. It cannot
be mixed into another base's batches; ``tunehub serve --base REF`` serves it as the base.

A 4-bit or 8-bit base cannot be fully fine-tuned (its weights are quantized): refused, with
QLoRA as what to do instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.methods import BuildContext, Method, MethodConfig, register_method


class FullMethodConfig(MethodConfig):
    name: Literal["full"] = "full"
    max_shard_size: str = Field(default="2GB", pattern=r"^[0-9]+(KB|MB|GB)$", description="largest safetensors shard")


def check_full(cfg: FullMethodConfig, run: Any) -> list[str]:
    if run.base.quantization != "none":
        return [
            f"base.quantization: full fine-tuning trains every weight, which a {run.base.quantization} base holds"
            " quantized; use base.quantization: none, or train lora on the 4-bit base (QLoRA)"
        ]
    return []


def prepare_full(cfg: FullMethodConfig, model: Any, ctx: BuildContext) -> Any:
    model.requires_grad_(True)
    return model


def save_full(cfg: FullMethodConfig, model: Any, out_dir: Path, **fields: Any) -> Any:
    """The trained model as a transformers folder (sharded safetensors, its tokenizer) plus the
    manifest (kind ``full``). Its config names the module, never the machine's base path."""
    from transformers import AutoTokenizer

    from tunehub.trainer.export import base_display_name, save_module_files

    out_dir = Path(out_dir)
    task = fields.get("task")
    model.config._name_or_path = f"{base_display_name(fields['base_path'])}-{task or 'full'}"
    model.save_pretrained(out_dir, max_shard_size=cfg.max_shard_size)
    AutoTokenizer.from_pretrained(fields["base_path"]).save_pretrained(out_dir)
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    numel = sum(p.numel() for p in model.parameters())
    return save_module_files(out_dir, kind=ModuleKind.FULL, params={"parameters": numel, "shards": shards}, **fields)


METHOD = register_method(
    Method(
        name="full",
        kind=ModuleKind.FULL,
        config_cls=FullMethodConfig,
        build_peft_config=lambda cfg, ctx: None,
        check=check_full,
        description="every weight of the base; the module is a whole model, served as a base",
        prepare_model=prepare_full,
        save_module=save_full,
        quantized_base=False,
    )
)
