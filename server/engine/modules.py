"""Materialising a verified module folder into the engine's batched form.

What a module becomes is decided by its kind's group in :mod:`tunehub.server.engine.kinds`
(one file per group: low-rank deltas, IA3 vectors, virtual-token prompts, key/value prefixes);
this file reads and checks the weights every kind shares, and holds the result
(:class:`LoadedModule`).

A kind no group serves is refused with :class:`UnsupportedModule`, never served wrong.
Weights that cannot be served (not a safetensors file, NaN or Inf values, tensors of shapes that
do not fit the base) are refused at load with :class:`InvalidModuleWeights` or
:class:`~tunehub.errors.IncompatibleBase`, naming the module and the tensor: the request that
asked for the module fails (a 4xx), nothing else does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunehub.errors import (  # the module errors live in tunehub.errors; imported here under their old names
    IncompatibleBase,
    IntegrityError,
    InvalidModuleWeights,
    TunehubError,
    UnsupportedModule,
)
from tunehub.registry.manifest import Manifest, ModuleKind
from tunehub.registry.module import LocalModule, ModuleContent
from tunehub.server.engine import kinds

WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class LoadedModule:
    key: str  # "repo@version": one key per immutable version
    kind: ModuleKind
    manifest: Manifest
    layers: dict[str, Any] = field(default_factory=dict)  # linear (or norm) layer name -> the kind group's delta there
    data: Any = None  # whatever else the kind group keeps (virtual tokens, key/value prefixes)
    nbytes: int = 0
    uid: int = 0  # distinguishes a reload of the same key in plan caches
    served: kinds.ServedKind | None = None  # the group that applies its layers
    vocab: Any = None  # a tokenizer module's vocabulary (kinds.tokenizer.ModuleVocab): its tokens, rows, id range

    @property
    def group_layers(self) -> list[tuple[kinds.ServedKind, dict[str, Any]]]:
        """(kind group, its per-layer deltas) for each group the module uses: its own group (a
        :class:`~tunehub.server.engine.compose.Composition` may have several)."""
        return [] if self.served is None else [(self.served, self.layers)]

    def virtual_embeddings(self) -> Any:
        """(n, hidden) embeddings the prefill puts before the row's tokens, or None."""
        return None if self.served is None else self.served.virtual_embeddings(self)

    def cache_prefix(self) -> list[tuple[Any, Any]] | None:
        """Per decoder layer (keys, values), (kv_heads, n, head_dim), the row's tokens attend to first, or None."""
        return None if self.served is None else self.served.cache_prefix(self)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the module adds before the prompt (prepended embeddings or a cache prefix)."""
        embeddings = self.virtual_embeddings()
        if embeddings is not None:
            return int(embeddings.shape[0])
        prefix = self.cache_prefix()
        if prefix:
            return int(prefix[0][0].shape[1])
        return 0


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or dataclasses, dicts, lists, tuples of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def __getattr__(name: str) -> Any:
    # LayerDelta (a low-rank layer delta) moved to the low-rank group; older imports still find it
    if name == "LayerDelta":
        from tunehub.server.engine.kinds.low_rank import LayerDelta

        return LayerDelta
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_weights(files: Mapping[str, bytes | bytearray | memoryview], name: str = "module") -> dict[str, Any]:
    """The module's tensors from the bytes of its files (no mmap: a pool that loads and evicts
    thousands of modules must not keep file mappings around)."""
    data = files.get(WEIGHTS_FILE)
    if data is None:
        raise IntegrityError(f"{name} has no {WEIGHTS_FILE}")
    return tensors_from_safetensors(data, f"{name}: {WEIGHTS_FILE}")


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def tensors_from_safetensors(data: bytes | bytearray | memoryview, where: str) -> dict[str, Any]:
    """Tensors viewing ``data`` (a safetensors file in memory) without copying it.

    safetensors' own ``load(bytes)`` copies every tensor out of the buffer; a cold activation
    already holds the verified bytes, so the tensors view them instead (one allocation per
    module, half the peak memory, no copy on the activation path). The header is checked as
    strictly as safetensors checks it: known dtypes, shapes that match their byte ranges, ranges
    that tile the data exactly. Read-only data (``bytes``) is copied once into a writable buffer."""
    import torch

    if sys.byteorder != "little":  # the format is little-endian; let the library swap bytes
        from safetensors.torch import load

        return load(bytes(data))

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{where} is not a readable safetensors file: {why}")

    buffer = memoryview(data).cast("B")
    if buffer.readonly:
        buffer = memoryview(bytearray(buffer))
    if len(buffer) < 8:
        raise bad("shorter than its header size")
    header_size = int.from_bytes(buffer[:8], "little")
    if header_size > min(len(buffer) - 8, _MAX_HEADER_BYTES):
        raise bad(f"its header claims {header_size} bytes")
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_size]))
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + header_size
    entries = []
    for key, info in header.items():
        try:
            dtype = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} has no valid dtype, shape and data_offsets") from None
        if any(d < 0 for d in shape):
            raise bad(f"tensor {key!r} has a negative dimension")
        entries.append((begin, end, key, dtype, shape))
    entries.sort(key=lambda entry: entry[:2])
    expected_begin = 0
    for begin, end, key, dtype, shape in entries:
        if begin != expected_begin or end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {key!r} does not fill bytes {begin}..{end} of the data exactly")
        expected_begin = end
    if start + expected_begin != len(buffer):
        raise bad(f"its tensors cover {expected_begin} of {len(buffer) - start} data bytes")
    if not entries:
        return {}
    # one view of the whole buffer, split in one call: a view per tensor costs microseconds each
    whole = torch.frombuffer(buffer, dtype=torch.uint8)
    pieces = torch.split(whole[start:], [end - begin for begin, end, *_ in entries])
    tensors: dict[str, Any] = {}
    for (begin, _, key, dtype, shape), piece in zip(entries, pieces, strict=True):
        if (start + begin) % dtype.itemsize:  # a misaligned view would be slow or refused: copy
            piece = piece.clone()
        tensors[key] = piece.view(dtype).view(shape)
    return tensors


def _parse_module_weights(files: Mapping[str, bytes | bytearray | memoryview], name: str) -> dict[str, Any]:
    try:
        return parse_weights(files, name)
    except IntegrityError as exc:  # a malformed module, not a damaged copy (see InvalidModuleWeights)
        raise InvalidModuleWeights(str(exc)) from None


def _load_weights(module: LocalModule | ModuleContent, name: str) -> dict[str, Any]:
    if isinstance(module, ModuleContent):
        if module.parsed is not None:  # parsed by the reader, after its hashes matched
            return module.parsed
        return _parse_module_weights(module.files, name)
    try:  # into a writable buffer, which the tensors then view (bytes would be copied once more)
        with open(module.path / WEIGHTS_FILE, "rb", buffering=0) as stream:
            data = bytearray(os.fstat(stream.fileno()).st_size)
            if stream.readinto(data) != len(data):
                raise OSError("short read")
    except OSError:
        raise IntegrityError(f"{name} has no readable {WEIGHTS_FILE}") from None
    return _parse_module_weights({WEIGHTS_FILE: data}, name)


def _read_files(module: LocalModule | ModuleContent, rels: list[str], name: str) -> dict[str, Any]:
    """The verified bytes of ``rels`` (files the module's manifest lists)."""
    if isinstance(module, ModuleContent):
        missing = [rel for rel in rels if rel not in module.files]
        if missing:
            raise IntegrityError(f"{name}: {', '.join(missing)} was not read")
        return {rel: module.files[rel] for rel in rels}
    try:
        return {rel: (module.path / rel).read_bytes() for rel in rels}
    except OSError:
        raise IntegrityError(f"{name}: one of {', '.join(rels)} is not readable") from None


def check_finite(tensors: dict[str, Any], name: str, what: str = "tensor") -> None:
    """Refuse NaN and Inf: one such value in a row's delta makes that row's logits NaN.

    A tensor whose sum is finite holds neither (NaN and Inf propagate through a sum, and
    Inf - Inf is NaN), and a sum reads the tensor once without writing a mask: 4-6x faster than
    ``isfinite(t).all()``, which was most of a small module's load. A non-finite sum (NaN, Inf,
    or finite values that overflow it) is then checked exactly, to name the tensor or let it pass."""
    import torch

    sums_by_dtype: dict[Any, list[Any]] = {}
    for tensor in tensors.values():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            sums_by_dtype.setdefault(tensor.dtype, []).append(tensor.sum())
    if all(bool(torch.stack(sums).isfinite().all()) for sums in sums_by_dtype.values()):
        return
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidModuleWeights(f"{name}: {what} {key!r} holds NaN or Inf values")


_check_finite = check_finite  # its older name


def check_ndim(tensor: Any, ndim: int, key: str, name: str) -> None:
    """Refuse (InvalidModuleWeights) a tensor ``key`` of module ``name`` without ``ndim`` dimensions."""
    if tensor.dim() != ndim:
        raise InvalidModuleWeights(f"{name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")


_PEFT_PREFIX = re.compile(r"^base_model\.model\.")


def layer_and_param(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' ->
    ('model.layers.0.self_attn.q_proj', 'lora_A')"""
    name = _PEFT_PREFIX.sub("", key)
    name = name.removesuffix(".weight")
    layer, _, param = name.rpartition(".")
    if param == "default":  # some PEFT versions keep the adapter name in keys
        layer, _, param = layer.rpartition(".")
    return layer, param


class ModuleMaterializer:
    """Turns verified module folders into :class:`LoadedModule` for one loaded base; what a
    kind's tensors become is its group's business (:mod:`tunehub.server.engine.kinds`)."""

    def __init__(
        self, base: Any, linear_layers: dict[str, Any], *, max_rank: int = 256, norm_layers: dict[str, Any] | None = None
    ):
        self.base = base
        self.linear_layers = linear_layers  # qualified name -> the patched layer (AdaptedLinear)
        self.norm_layers = norm_layers or {}  # qualified name -> the patched normalisation layer (AdaptedNorm)
        self.max_rank = max_rank
        self._uid = 0

    def check_base(self, manifest: Manifest, name: str) -> None:
        from tunehub.registry.fingerprint import (
            is_legacy_fingerprint,
            short_fingerprint,
        )

        expected, actual = manifest.base.fingerprint, self.base.fingerprint
        if expected != actual:
            # an old manifest's fingerprint (shapes only) cannot tell this base from another of its shape
            legacy = (
                (
                    " (an older tunehub's fingerprint of the weights' shapes only, which cannot say which"
                    " weights it was trained on: train it again)"
                )
                if is_legacy_fingerprint(expected)
                else ""
            )
            raise IncompatibleBase(
                f"{name} was trained for base {manifest.base.model_id} (fingerprint {short_fingerprint(expected)})"
                f"{legacy}; this server runs {self.base.name} (fingerprint {short_fingerprint(actual)})"
            )
        tokenizer = manifest.tokenizer
        carries_tokenizer = kinds.carries_tokenizer(manifest)
        served_tokenizer = self.base.tokenizer_fingerprint
        # a module with its own tokenizer brings it; every other one runs on the base's tokenizer
        if tokenizer is not None and not carries_tokenizer and tokenizer.fingerprint != served_tokenizer:
            raise IncompatibleBase(
                f"{name} was trained with the tokenizer of base {manifest.base.model_id} (tokenizer fingerprint"
                f" {short_fingerprint(tokenizer.fingerprint)}); this server runs {self.base.name} with tokenizer"
                f" fingerprint {short_fingerprint(served_tokenizer)}"
            )
        if manifest.base.vocab_size not in (None, self.base.vocab_size):
            raise IncompatibleBase(
                f"{name} expects a vocabulary of {manifest.base.vocab_size}, the base has {self.base.vocab_size}"
            )

    def admit(self, manifest: Manifest, name: str) -> None:
        """Refuse, from the manifest alone, a module this engine cannot serve: IncompatibleBase
        (another base or tokenizer), UnsupportedModule (a kind no group serves, with what to do
        instead)."""
        self.check_base(manifest, name)
        if kinds.served_kind(manifest.kind) is None:
            raise UnsupportedModule(kinds.refusal(manifest.kind, name))

    def load(self, module: LocalModule | ModuleContent, key: str) -> LoadedModule:
        """Materialise a verified module under ``key`` ("repo@version").

        Raises IncompatibleBase and UnsupportedModule (see :meth:`admit`, checked before any
        tensor is read), InvalidModuleWeights (unreadable, non-finite or ill-shaped tensors)."""
        manifest = module.manifest
        name = module.ref or key
        # the base check comes first: no tensor of a module for another base is ever read
        self.admit(manifest, name)
        kind = manifest.kind
        group = kinds.served_kind(kind)
        if group is None:  # unregistered since admit (a test's own kind): refused the same way
            raise UnsupportedModule(kinds.refusal(kind, name))
        # a tokenizer module may have no adapter weights (its rows are a file of their own)
        weights = _load_weights(module, name) if WEIGHTS_FILE in manifest.files or not group.reads else {}
        check_finite(weights, name)
        files = _read_files(module, [rel for rel in group.reads if rel in manifest.files], name)
        loaded = LoadedModule(key=key, kind=kind, manifest=manifest, uid=self.next_uid(), served=group)
        try:
            group.materialize_files(self, loaded, weights, files, name)
        except TunehubError:
            raise
        except (ArithmeticError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
            # the checks above name what they know; any other shape a module's tensors can take
            # that torch refuses is still the module's fault, never a server error
            raise InvalidModuleWeights(f"{name}: its tensors do not form a {kind.value} module for this base ({exc})") from None
        loaded.nbytes = _tensor_bytes(loaded.layers) + _tensor_bytes(loaded.data) + _tensor_bytes(loaded.vocab)
        if loaded.vocab is not None:
            check_finite({"embed rows": loaded.vocab.embed_rows, "head rows": loaded.vocab.head_rows}, name)
            loaded.nbytes += loaded.vocab.tokenizer_bytes
        return loaded

    @staticmethod
    def files_to_read() -> list[str]:
        """Every file a module of a served kind may need (a store reads those the module has)."""
        return list(dict.fromkeys([WEIGHTS_FILE, *(rel for group in kinds.groups() for rel in group.reads)]))

    def next_uid(self) -> int:
        """A number no loaded module or composition has had (plans are cached by it)."""
        self._uid += 1
        return self._uid

    def check_virtual_tokens(self, count: int, name: str) -> None:
        """Refuse (UnsupportedModule) a count of virtual tokens the base's context cannot hold."""
        if not 0 < count < self.base.max_positions:
            raise UnsupportedModule(
                f"{name}: {count} virtual tokens; this base's context holds {self.base.max_positions} positions"
            )

    def target_layer(self, layer: str, name: str) -> Any:
        """The patched linear layer ``layer`` of the base; UnsupportedModule when there is none."""
        target = self.linear_layers.get(layer)
        if target is None:
            raise UnsupportedModule(f"{name} adapts {layer}, which is not a linear layer the engine can mix")
        return target


def read_adapter_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())
