"""The one builder of the bitsandbytes quantization config, shared by training and serving.

A module trained against a 4-bit base must be served on the same 4-bit base: the trainer
(``tunehub.trainer.run.load_base_model``) and the engine (``tunehub.server.engine.base.load_base``)
both build their ``BitsAndBytesConfig`` here, so their parity never rests on two copies.
Importing this module does not import torch or transformers.
"""

from __future__ import annotations

from typing import Any, Literal

from tunehub.devices import ComputeDtype, resolve_compute_dtype
from tunehub.errors import ConfigError

Quantization = Literal["nf4", "int8", "none"]
QUANTIZATIONS: tuple[str, ...] = ("nf4", "int8", "none")


def bnb_config(quantization: str, compute_dtype: ComputeDtype = "auto", device: str | None = None) -> Any:
    """The ``transformers.BitsAndBytesConfig`` for ``quantization``, or None for ``"none"``.

    ``nf4`` is QLoRA's recipe: NF4 weights, double quantization, 4-bit matmuls computing in
    ``compute_dtype`` (``auto``: bf16 where ``device`` does it natively, see
    :func:`tunehub.devices.resolve_compute_dtype`; ``device`` None means this machine's).
    ``int8`` is bitsandbytes' LLM.int8().

    Raises :class:`~tunehub.errors.ConfigError` for any other quantization name."""
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=resolve_compute_dtype(compute_dtype, device),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def keep_4bit_layout(model: Any) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in the layout ``dequantize_4bit`` reads;
    returns how many layers it set.

    On a CPU with AVX512-BF16, bitsandbytes (0.48 on) repacks a ``Linear4bit``'s weight for its
    CPU kernel on the first forward in eval mode, and changes the quantization state with it.
    Everything that dequantizes the weight afterwards (PEFT's DoRA norms and merges, the
    engine's DoRA gains, ``export --merge``) then reads the repacked bytes as if they were NF4
    and gets wrong values. Turning that repacking off (the layer's own switch) keeps one layout
    for the layer's whole life; its matmuls compute as on any other CPU."""
    count = 0
    for layer in model.modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
            count += 1
    return count


__all__ = ["QUANTIZATIONS", "Quantization", "bnb_config", "keep_4bit_layout"]
