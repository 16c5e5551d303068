"""Fingerprints of base models and tokenizers, computed from files alone (no torch).

A base fingerprint identifies the base's weights, so that a module is only ever served on the
weights it was trained on. It has two forms, each with a visible scheme prefix:

- ``hub1:<sha256>`` for a Hugging Face Hub snapshot (a folder ``.../models--org--name/snapshots/
  <commit>/`` as ``snapshot_download`` returns it): the Hub commit of the snapshot, combined with
  the architecture fields of ``config.json``. Nothing is read but ``config.json``.
- ``w1:<sha256>`` for any other (local) folder: the architecture fields of ``config.json`` and,
  for every tensor of every ``*.safetensors`` file, its name, shape and a sha256 of its values.
  Float tensors (F64, F32, F16, BF16) are hashed as their values rounded to bfloat16 (round to
  nearest even, as torch casts), so an fp32 folder and the bf16 copy ``.to(torch.bfloat16)``
  makes of it share one fingerprint, and a module trained on either serves on both. The hash
  does not depend on how the tensors are split into files. An fp16 copy rounds differently and
  is, in general, another base; so are pre-quantized checkpoints (their int tensors are hashed
  as stored). The digests are computed once per file and cached by file identity (device,
  inode, size, mtime_ns) in ``<tunehub home>/cache/weight-digests.json``: a second fingerprint
  of an unchanged folder only stats its files (a file modified in the last 2 seconds is not
  cached yet: a same-size rewrite within one mtime tick would keep its identity).

Neither form covers the quantization a base is loaded in (4-bit, 8-bit or none: the same folder,
the same fingerprint), the path it is loaded from, nor the tokenizer, which has its own
fingerprint (:func:`tokenizer_fingerprint`) checked separately. A hub snapshot and a local copy
of the same files have different fingerprints (one names a commit, the other hashes content).

Fingerprints written by tunehub before these schemes (64 hex digits, no prefix) hashed only the
architecture and the weights' names and shapes: they cannot tell two bases of one shape apart,
never equal a new fingerprint, and :func:`is_legacy_fingerprint` tells them apart so that the
refusal can say so.

The cache file is untrusted input: anything in it that does not parse or validate is ignored (and
the file rewritten), and it is replaced atomically. Whoever can write it could make a folder look
like another base; that user could equally change the weights themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunehub.errors import ManifestError
from tunehub.registry.files import SAFETENSORS_DTYPE_SIZES, SafetensorsTensor, read_safetensors_layout

#: scheme prefixes of the two fingerprint forms (see the module docstring)
CONTENT_SCHEME = "w1"
HUB_SCHEME = "hub1"

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

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# float dtypes hashed canonically (as bfloat16 values); numpy dtype of each
_FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_CHUNK_BYTES = 16 << 20  # bounds the memory a large tensor takes while it is hashed
_CACHE_VERSION = 1  # bump with any change to how a tensor is hashed: old digests then never match
_CACHE_MAX_BYTES = 64 << 20  # a bigger cache file is not ours: ignored
_CACHE_MAX_ENTRIES = 2048  # oldest entries (files long gone, most likely) are dropped beyond this
_JUST_WRITTEN_NS = 2_000_000_000  # coarser than any local filesystem's mtime resolution


def _canonical(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


def _layout(handle: Any, path: Path) -> tuple[list[SafetensorsTensor], int]:
    """The tensors of a base's weight file (the registry's one safetensors reader)."""
    size = os.fstat(handle.fileno()).st_size
    return read_safetensors_layout(handle, size, lambda why: ManifestError(f"{path} is not a valid safetensors file: {why}"))


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, without loading any tensor."""
    with open(path, "rb") as handle:
        tensors, _ = _layout(handle, Path(path))
    return {tensor.name: list(tensor.shape) for tensor in tensors}


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ManifestError(f"{model_dir} holds no .safetensors weights")
    return files


def base_shapes(model_dir: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in _weight_files(Path(model_dir)):
        shapes.update(safetensors_shapes(file))
    return shapes


def _read_config(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ManifestError(f"{model_dir} has no config.json: it is not a model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{config_path} does not hold a JSON object")
    return config


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}


# --- hub snapshots -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSnapshot:
    """A folder that is one commit of a Hub model repo in the Hugging Face cache."""

    repo_id: str
    revision: str  # the commit sha (40 hex digits)


def hub_snapshot(model_dir: str | Path) -> HubSnapshot | None:
    """The repo and commit of a Hugging Face cache snapshot folder, or None for any other folder.

    The cache layout (``<cache>/models--<org>--<name>/snapshots/<commit>/``, which is what
    ``snapshot_download`` returns) names the commit; ``try_to_load_from_cache`` confirms that
    the cache resolves that repo and commit to this very folder.
    """
    folder = Path(model_dir).resolve()
    repo_folder = folder.parent.parent
    if folder.parent.name != "snapshots" or not _COMMIT.fullmatch(folder.name):
        return None
    if not repo_folder.name.startswith("models--"):
        return None
    repo_id = repo_folder.name.removeprefix("models--").replace("--", "/")
    if not repo_id or repo_id.count("/") > 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(
            repo_id, "config.json", cache_dir=repo_folder.parent, revision=folder.name, repo_type="model"
        )
    except (ValueError, OSError):  # an id the library refuses (HFValidationError): not its snapshot
        return None
    if not isinstance(cached, str) or Path(cached).parent.resolve() != folder:
        return None
    return HubSnapshot(repo_id=repo_id, revision=folder.name)


# --- content digests -----------------------------------------------------------------------------


def _bfloat16_bits(raw: bytes, dtype: str) -> Any:
    """Float values as bfloat16 bit patterns (a bytes-like object): round to nearest even, as
    torch casts, and every NaN as 0x7FC0 (torch's own casts disagree on NaN bits)."""
    import numpy as np

    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2")
        nan = (bits & 0x7FFF) > 0x7F80
        return np.where(nan, np.uint16(0x7FC0), bits).astype("<u2") if nan.any() else raw
    values = np.frombuffer(raw, dtype=_FLOAT_DTYPES[dtype])
    if dtype != "F32":
        # fp16 widens exactly; fp64 narrows to fp32 first, as torch's cast to bfloat16 does
        with np.errstate(over="ignore"):
            values = values.astype("<f4")
    bits = values.view("<u4")
    # in place, one temporary: (bits + 0x7FFF + lowest kept bit) >> 16
    rounding = bits >> 16
    rounding &= 1
    rounding += np.uint32(0x7FFF)
    rounding += bits
    rounding >>= 16
    rounded = rounding.astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def hash_weight_file(path: Path) -> dict[str, list[Any]]:
    """Tensor name -> [kind, shape, sha256 of its values] for one safetensors file (reads it all).

    ``kind`` is "float" for float tensors (hashed as bfloat16 values), else the stored dtype.
    """
    tensors: dict[str, list[Any]] = {}
    with open(path, "rb") as handle:
        layout, data_start = _layout(handle, path)
        for tensor in layout:
            name, dtype, shape = tensor.name, tensor.dtype, tensor.shape
            digest = hashlib.sha256()
            handle.seek(data_start + tensor.begin)
            remaining = tensor.end - tensor.begin
            step = _CHUNK_BYTES - _CHUNK_BYTES % SAFETENSORS_DTYPE_SIZES[dtype]
            while remaining:
                raw = handle.read(min(step, remaining))
                if not raw:
                    raise ManifestError(f"{path} ended inside tensor {name!r}")
                remaining -= len(raw)
                digest.update(_bfloat16_bits(raw, dtype) if dtype in _FLOAT_DTYPES else raw)
            tensors[name] = ["float" if dtype in _FLOAT_DTYPES else dtype, shape, digest.hexdigest()]
    return tensors


def _identity(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _valid_tensors(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    for name, record in value.items():
        if not (isinstance(name, str) and isinstance(record, list) and len(record) == 3):
            return False
        kind, shape, digest = record
        if not (isinstance(kind, str) and isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            return False
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            return False
    return True


def weight_digest_cache_path() -> Path:
    from tunehub.registry.store import tunehub_home

    return tunehub_home() / "cache" / "weight-digests.json"


def _load_cache(path: Path) -> dict[str, dict[str, list[Any]]]:
    """The valid entries of the cache file; anything unreadable or malformed is left out."""
    try:
        if path.stat().st_size > _CACHE_MAX_BYTES:
            return {}
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not JSON: start afresh
        return {}
    if not isinstance(raw, dict) or raw.get("version") != _CACHE_VERSION or not isinstance(raw.get("entries"), dict):
        return {}
    return {key: value for key, value in raw["entries"].items() if isinstance(key, str) and _valid_tensors(value)}


def _store_cache(path: Path, new_entries: dict[str, dict[str, list[Any]]]) -> None:
    """Merge ``new_entries`` into the cache file, atomically; a cache that cannot be written is skipped."""
    entries = _load_cache(path)  # re-read: another process may have added entries meanwhile
    for key, value in new_entries.items():
        entries.pop(key, None)
        entries[key] = value  # newest last: the oldest are dropped first
    kept = dict(list(entries.items())[-_CACHE_MAX_ENTRIES:])
    text = json.dumps({"version": _CACHE_VERSION, "entries": kept}, separators=(",", ":"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".weight-digests-", suffix=".tmp")
    except OSError:  # a read-only home: fingerprints still work, they are computed again next time
        return
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(staging, path)  # readers see the old file or the new one, never a part
    except OSError:
        try:
            os.unlink(staging)
        except OSError:
            pass


def _file_tensors(
    path: Path, cache: dict[str, dict[str, list[Any]]], fresh: dict[str, dict[str, list[Any]]]
) -> dict[str, list[Any]]:
    for _ in range(3):
        before = os.stat(path)
        key = _identity(before)
        if key in cache:
            return cache[key]
        tensors = hash_weight_file(path)
        if _identity(os.stat(path)) == key:  # unchanged while it was read: the digests are its own
            # a file written within the timestamps' resolution could be rewritten, same size, with
            # the same mtime: trust its identity only once it is older than that (as git does)
            if time.time_ns() - before.st_mtime_ns >= _JUST_WRITTEN_NS:
                fresh[key] = tensors
            return tensors
    raise ManifestError(f"{path} kept changing while it was being hashed")


def weights_fingerprint(model_dir: str | Path, *, cache_path: Path | None = None) -> str:
    """The ``w1:`` content fingerprint of a folder (see the module docstring)."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    cache_path = cache_path or weight_digest_cache_path()
    cache = _load_cache(cache_path)
    fresh: dict[str, dict[str, list[Any]]] = {}
    tensors: dict[str, list[Any]] = {}
    for file in _weight_files(model_dir):
        for name, record in _file_tensors(file, cache, fresh).items():
            if name in tensors:
                raise ManifestError(f"{model_dir}: tensor {name!r} is in more than one weight file")
            tensors[name] = record
    if fresh:
        _store_cache(cache_path, fresh)
    payload = {"scheme": CONTENT_SCHEME, "config": _architecture(config), "tensors": tensors}
    return f"{CONTENT_SCHEME}:{hashlib.sha256(_canonical(payload)).hexdigest()}"


def base_fingerprint(model_dir: str | Path, *, cache_path: Path | None = None) -> str:
    """Fingerprint of a base model folder: ``hub1:`` for a Hub snapshot, else ``w1:`` of its content."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    snapshot = hub_snapshot(model_dir)
    if snapshot is None:
        return weights_fingerprint(model_dir, cache_path=cache_path)
    payload = {"scheme": HUB_SCHEME, "revision": snapshot.revision, "config": _architecture(config)}
    return f"{HUB_SCHEME}:{hashlib.sha256(_canonical(payload)).hexdigest()}"


def is_legacy_fingerprint(fingerprint: str) -> bool:
    """True for a fingerprint of the old scheme (architecture and weight shapes only)."""
    return bool(_HEX64.fullmatch(fingerprint))


def short_fingerprint(fingerprint: str | None) -> str:
    """The scheme and 12 hex digits: what messages and headers show."""
    if not fingerprint:
        return "none"
    scheme, sep, digest = fingerprint.rpartition(":")
    return f"{scheme}{sep}{digest[:12]}"


# --- tokenizers ----------------------------------------------------------------------------------


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


def folder_tokenizer_fingerprint(folder: str | Path) -> str | None:
    """The tokenizer fingerprint of a model folder, or None when it has no ``tokenizer.json``."""
    return tokenizer_fingerprint(folder)[0] if (Path(folder) / "tokenizer.json").is_file() else None
