"""Fingerprints of base models and tokenizers, computed from files alone (no torch).

A base fingerprint hashes what decides whether a module fits: the architecture fields of
``config.json`` and the names and shapes of every weight (read from the safetensors headers).
The dtype, the quantization and the path it was loaded from are left out, so a bf16 copy, an
fp32 copy and the same weights loaded in 4-bit share one fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from tunehub.errors import ManifestError

# config keys that change with how a model is stored or run, not with what it is
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "use_cache",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "architectures",
        "auto_map",
        "torchscript",
        "_commit_hash",
    }
)


def _canonical(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, without loading any tensor."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ManifestError(f"{path} is not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise ManifestError(f"{path} has an implausible safetensors header")
        header = json.loads(handle.read(length))
    return {name: list(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def base_shapes(model_dir: Path) -> dict[str, list[int]]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ManifestError(f"{model_dir} holds no .safetensors weights")
    shapes: dict[str, list[int]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    return shapes


def fingerprint_config(config: dict[str, Any], shapes: dict[str, list[int]]) -> str:
    kept = {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(_canonical({"config": kept, "shapes": shapes})).hexdigest()


def base_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a base model folder (``config.json`` plus ``*.safetensors``)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ManifestError(f"{model_dir} has no config.json: it is not a model folder")
    config = json.loads(config_path.read_text())
    return fingerprint_config(config, base_shapes(model_dir))


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> tuple[str, int]:
    """(fingerprint, vocabulary size) of a ``tokenizer.json`` (fast tokenizer) folder."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise ManifestError(f"{tokenizer_dir} has no tokenizer.json")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    vocab = model.get("vocab", {})
    added = data.get("added_tokens", [])
    size = len(vocab) + sum(1 for tok in added if tok.get("content") not in vocab)
    digest = hashlib.sha256(_canonical({"model": model, "added": added, "normalizer": data.get("normalizer")}))
    return digest.hexdigest(), size
