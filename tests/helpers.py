"""Small builders shared by tests that need no torch."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from tunehub.registry.manifest import BaseInfo, Manifest, ModuleKind
from tunehub.registry.module import write_module

FAKE_FINGERPRINT = "ab" * 32


def safetensors_bytes(payload: bytes, name: str = "payload") -> bytes:
    """A valid safetensors file holding ``payload`` as one U8 tensor (push checks weights' format)."""
    header = json.dumps({name: {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(header)) + header + payload


def make_fake_module(
    folder: Path,
    *,
    kind: str = "lora",
    task: str | None = "demo",
    payload: bytes | None = None,
    base_id: str = "tiny-base",
    fingerprint: str = FAKE_FINGERPRINT,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """A valid module folder whose weights are ``payload`` (random by default) stored as one
    U8 tensor of a well-formed safetensors file (registry tests never load them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = payload if payload is not None else os.urandom(2048)
    (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(raw))
    for rel, data in (extra_files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    manifest = Manifest(
        kind=ModuleKind(kind),
        params={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        base=BaseInfo(model_id=base_id, fingerprint=fingerprint, quantization="nf4"),
        objective="sft",
        task=task,
    )
    write_module(folder, manifest)
    return folder
