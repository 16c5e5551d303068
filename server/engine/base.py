"""The base model, loaded once: 4-bit NF4 (bitsandbytes, CPU and CUDA alike), bf16 or fp32."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunehub.devices import ComputeDtype, load_quantized
from tunehub.errors import ConfigError
from tunehub.quantization import bnb_config
from tunehub.registry.fingerprint import (
    base_fingerprint,
    folder_tokenizer_fingerprint,
    hub_snapshot,
)

Quantization = Literal["nf4", "int8", "none"]


@dataclass
class LoadedBase:
    path: Path
    model: Any  # a transformers causal LM, in eval mode
    tokenizer: Any
    fingerprint: str
    quantization: str
    device: Any
    dtype: Any  # dtype of activations (embeddings) the model computes in
    vocab_size: int
    max_positions: int
    name: str
    # what the manifest of a module served on it must record (see registry/fingerprint.py):
    # the tokenizer's fingerprint, None when the folder has no tokenizer.json
    tokenizer_fingerprint: str | None = None

    @property
    def config(self) -> Any:
        return self.model.config


def load_base(
    path: str | Path,
    *,
    quantization: Quantization = "nf4",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: str | None = None,
    compute_dtype: ComputeDtype = "auto",
) -> LoadedBase:
    """Load a causal LM folder once for serving. ``dtype`` is the activation dtype; 4-bit
    matmuls compute in ``compute_dtype`` (auto: bf16 where the hardware does it natively, as
    QLoRA trains them; fp32 on CPUs without native bf16, where it is the faster of the two)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a model folder (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization != "none":
        # the same config the trainer loads the base with (tunehub.quantization): train/serve parity
        kwargs["quantization_config"] = bnb_config(quantization, compute_dtype, device)
        kwargs["device_map"] = {"": device}
    if quantization == "none":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = load_quantized(AutoModelForCausalLM, path, **kwargs)
    if quantization == "none":
        # transformers wraps Module.to with functools.wraps, whose stub types the call as unbound
        # (the device is taken for ``self``): a stub gap, the call is Module.to(model, device)
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    snapshot = hub_snapshot(path)
    # a hub snapshot's folder is named by its commit: the repo id says more
    name = json.loads((path / "config.json").read_text()).get("_name_or_path") or (snapshot.repo_id if snapshot else path.name)
    return LoadedBase(
        path=path,
        model=model,
        tokenizer=tokenizer,
        fingerprint=base_fingerprint(path),
        quantization=quantization,
        device=torch.device(device),
        dtype=model.get_input_embeddings().weight.dtype,
        vocab_size=int(config.vocab_size),
        max_positions=int(getattr(config, "max_position_embeddings", 2048)),
        name=str(name),
        tokenizer_fingerprint=folder_tokenizer_fingerprint(path),
    )
