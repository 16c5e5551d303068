"""Materialising a verified module folder into the engine's batched form.

Every kind is reduced at load time to what one mixed forward pass needs:

- lora, dora, adalora: per layer ``A`` (r x in), ``B`` (out x r) and a scale, AdaLoRA's ``E``
  folded into ``A``; DoRA's per-output magnitude over the row norm of ``W + s B A``
  precomputed as ``dora_gain`` (PEFT detaches that norm, so it is a constant at inference).
- ia3: per layer a scaling vector applied to the layer's input (feed-forward layers) or output.
- prompt, ptuning, multitask_prompt: one matrix of virtual-token embeddings (n x hidden).
- prefix: per decoder layer a key and a value prefix (kv_heads x n x head_dim).

A kind the engine cannot mix is refused with :class:`UnsupportedModule`, never served wrong.
Weights that cannot be served (not a safetensors file, NaN or Inf values, tensors of shapes that
do not fit the base) are refused at load with :class:`InvalidModuleWeights` or
:class:`~tunehub.errors.IncompatibleBase`, naming the module and the tensor: the request that
asked for the module fails (a 4xx), nothing else does.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunehub.errors import IncompatibleBase, IntegrityError, TunehubError
from tunehub.registry.manifest import Manifest, ModuleKind
from tunehub.registry.module import LocalModule, ModuleContent

WEIGHTS_FILE = "adapter_model.safetensors"
LOW_RANK_KINDS = {ModuleKind.LORA, ModuleKind.DORA, ModuleKind.ADALORA}
PROMPT_KINDS = {ModuleKind.PROMPT, ModuleKind.PTUNING, ModuleKind.MULTITASK_PROMPT}
MIXABLE_KINDS = LOW_RANK_KINDS | PROMPT_KINDS | {ModuleKind.IA3, ModuleKind.PREFIX}


class UnsupportedModule(TunehubError, ValueError):
    """A module the engine cannot apply in a mixed batch (kind, targets or size)."""

    http_status = 422


class InvalidModuleWeights(TunehubError, ValueError):
    """A module whose weights cannot be served: not a readable safetensors file, NaN or Inf
    values, tensors of impossible shapes. Its bytes matched their sha256 (the reader checks
    that before a parse error counts), so the module is at fault, not the store: the request
    for it is refused (422), never a server error."""

    http_status = 422


@dataclass
class LayerDelta:
    """What one module does to one linear layer."""

    lora_a: Any = None  # (r, in)
    lora_b: Any = None  # (out, r)
    scale: float = 0.0
    dora_gain: Any = None  # (out,): magnitude / ||W + s B A||_row
    in_scale: Any = None  # (in,): IA3 on feed-forward layers scales the input
    out_scale: Any = None  # (out,): IA3 elsewhere scales the output

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else int(self.lora_a.shape[0])


@dataclass
class LoadedModule:
    key: str  # "repo@version": one key per immutable version
    kind: ModuleKind
    manifest: Manifest
    layers: dict[str, LayerDelta] = field(default_factory=dict)
    prompt: Any = None  # (n_virtual, hidden)
    prefix: list[tuple[Any, Any]] | None = None  # per decoder layer (keys, values): (kv_heads, n, head_dim)
    nbytes: int = 0
    uid: int = 0  # distinguishes a reload of the same key in plan caches

    @property
    def num_virtual_tokens(self) -> int:
        if self.prompt is not None:
            return int(self.prompt.shape[0])
        if self.prefix is not None:
            return int(self.prefix[0][0].shape[1])
        return 0

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.layers.values()), default=0)


def _tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def parse_weights(files: dict[str, bytes | memoryview], name: str = "module") -> dict[str, Any]:
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
    for (begin, _, key, dtype, shape), piece in zip(entries, pieces):
        if (start + begin) % dtype.itemsize:  # a misaligned view would be slow or refused: copy
            piece = piece.clone()
        tensors[key] = piece.view(dtype).view(shape)
    return tensors


def _parse_module_weights(files: dict[str, bytes | memoryview], name: str) -> dict[str, Any]:
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


def _check_finite(tensors: dict[str, Any], name: str, what: str = "tensor") -> None:
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


def _check_ndim(tensor: Any, ndim: int, key: str, name: str) -> None:
    if tensor.dim() != ndim:
        raise InvalidModuleWeights(f"{name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")


_PEFT_PREFIX = re.compile(r"^base_model\.model\.")


def _layer_and_param(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' ->
    ('model.layers.0.self_attn.q_proj', 'lora_A')"""
    name = _PEFT_PREFIX.sub("", key)
    name = name.removesuffix(".weight")
    layer, _, param = name.rpartition(".")
    if param == "default":  # some PEFT versions keep the adapter name in keys
        layer, _, param = layer.rpartition(".")
    return layer, param


class ModuleMaterializer:
    """Turns verified module folders into :class:`LoadedModule` for one loaded base."""

    def __init__(self, base: Any, linear_layers: dict[str, Any], *, max_rank: int = 256):
        self.base = base
        self.linear_layers = linear_layers  # qualified name -> the patched layer (AdaptedLinear)
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
            legacy = (" (an older tunehub's fingerprint of the weights' shapes only, which cannot say which"
                      " weights it was trained on: train it again)") if is_legacy_fingerprint(expected) else ""
            raise IncompatibleBase(
                f"{name} was trained for base {manifest.base.model_id} (fingerprint {short_fingerprint(expected)})"
                f"{legacy}; this server runs {self.base.name} (fingerprint {short_fingerprint(actual)})"
            )
        tokenizer = manifest.tokenizer
        carries_tokenizer = manifest.kind is ModuleKind.TOKENIZER or any(
            part.kind is ModuleKind.TOKENIZER for part in manifest.components
        )
        served_tokenizer = self.base.tokenizer_fingerprint
        # a module with its own tokenizer brings it; every other one runs on the base's tokenizer
        if tokenizer is not None and not carries_tokenizer and tokenizer.fingerprint != served_tokenizer:
            raise IncompatibleBase(
                f"{name} was trained with the tokenizer of base {manifest.base.model_id} (tokenizer fingerprint"
                f" {short_fingerprint(tokenizer.fingerprint)}); this server runs {self.base.name} with tokenizer"
                f" fingerprint {short_fingerprint(served_tokenizer)}"
            )
        if manifest.base.vocab_size not in (None, self.base.vocab_size):
            raise IncompatibleBase(f"{name} expects a vocabulary of {manifest.base.vocab_size}, the base has {self.base.vocab_size}")

    def admit(self, manifest: Manifest, name: str) -> None:
        """Refuse, from the manifest alone, a module this engine cannot serve."""
        self.check_base(manifest, name)
        if manifest.kind not in MIXABLE_KINDS:
            raise UnsupportedModule(f"{name}: modules of kind {manifest.kind.value} cannot be served in mixed batches yet")

    def load(self, module: LocalModule | ModuleContent, key: str) -> LoadedModule:
        manifest = module.manifest
        name = module.ref or key
        # the base check comes first: no tensor of a module for another base is ever read
        self.admit(manifest, name)
        kind = manifest.kind
        weights = _load_weights(module, name)
        _check_finite(weights, name)
        self._uid += 1
        loaded = LoadedModule(key=key, kind=kind, manifest=manifest, uid=self._uid)
        try:
            if kind in LOW_RANK_KINDS:
                self._load_low_rank(loaded, weights, name)
            elif kind is ModuleKind.IA3:
                self._load_ia3(loaded, weights, name)
            elif kind in PROMPT_KINDS:
                self._load_prompt(loaded, weights, name)
            else:
                self._load_prefix(loaded, weights, name)
        except TunehubError:
            raise
        except (ArithmeticError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
            # the checks above name what they know; any other shape a module's tensors can take
            # that torch refuses is still the module's fault, never a server error
            raise InvalidModuleWeights(f"{name}: its tensors do not form a {kind.value} module for this base ({exc})") from None
        # what load computed from finite weights can still overflow (DoRA's gain over a zero norm)
        for layer, delta in loaded.layers.items():
            _check_finite({"dora_gain": delta.dora_gain}, name, f"the computed {layer}")
        _check_finite({"prompt": loaded.prompt}, name, "the computed")
        loaded.nbytes = sum(
            _tensor_bytes(t)
            for delta in loaded.layers.values()
            for t in (delta.lora_a, delta.lora_b, delta.dora_gain, delta.in_scale, delta.out_scale)
        ) + _tensor_bytes(loaded.prompt) + sum(_tensor_bytes(k) + _tensor_bytes(v) for k, v in loaded.prefix or [])
        return loaded

    def _check_virtual_tokens(self, count: int, name: str) -> None:
        if not 0 < count < self.base.max_positions:
            raise UnsupportedModule(
                f"{name}: {count} virtual tokens; this base's context holds {self.base.max_positions} positions"
            )

    # --- low rank ------------------------------------------------------------------------------
    def _layer(self, layer: str, name: str) -> Any:
        target = self.linear_layers.get(layer)
        if target is None:
            raise UnsupportedModule(f"{name} adapts {layer}, which is not a linear layer the engine can mix")
        return target

    def _load_low_rank(self, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        import torch

        params = loaded.manifest.params
        if params.get("modules_to_save"):
            raise UnsupportedModule(f"{name} trains whole modules ({params['modules_to_save']}); the engine mixes deltas only")
        grouped: dict[str, dict[str, Any]] = {}
        for key, tensor in weights.items():
            layer, param = _layer_and_param(key)
            grouped.setdefault(layer, {})[param] = tensor
        alpha = float(params.get("lora_alpha", 8))
        alpha_pattern = params.get("alpha_pattern") or {}
        rslora = bool(params.get("use_rslora", False))
        adalora = loaded.kind is ModuleKind.ADALORA
        for layer, tensors in grouped.items():
            if "lora_A" not in tensors or "lora_B" not in tensors:
                raise IntegrityError(f"{name}: layer {layer} lacks lora_A or lora_B")
            target = self._layer(layer, name)
            _check_ndim(tensors["lora_A"], 2, f"{layer}.lora_A", name)
            _check_ndim(tensors["lora_B"], 2, f"{layer}.lora_B", name)
            a = tensors["lora_A"].float()
            b = tensors["lora_B"].float()
            rank = int(a.shape[0])
            if rank > self.max_rank:
                raise UnsupportedModule(f"{name}: rank {rank} at {layer} is above this server's maximum of {self.max_rank}")
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features or b.shape[1] != rank:
                raise IncompatibleBase(
                    f"{name}: {layer} has shapes {tuple(a.shape)}/{tuple(b.shape)}, the base layer is"
                    f" {target.in_features} -> {target.out_features}"
                )
            if adalora:
                e = tensors.get("lora_E")
                if e is None:
                    raise IntegrityError(f"{name}: AdaLoRA layer {layer} lacks lora_E")
                if e.numel() != rank:
                    raise IncompatibleBase(f"{name}: {layer}.lora_E has shape {tuple(e.shape)}, the layer's rank is {rank}")
                a = a * e.float().reshape(rank, 1)  # fold the singular values into A
                scale = alpha / (float(rank) + 1e-5)  # PEFT divides by the live rank (ranknum)
            else:
                # the tensor's own rank is the layer's rank (rank_pattern is already applied to it)
                layer_alpha = float(_pattern(alpha_pattern, layer, alpha))
                # rank 0 (AdaLoRA-style pruning, or an empty layer): no delta, and no division by zero
                scale = layer_alpha / (math.sqrt(rank) if rslora else rank) if rank else 0.0
            delta = LayerDelta(lora_a=a.contiguous(), lora_b=b.contiguous(), scale=scale)
            magnitude = tensors.get("lora_magnitude_vector")
            if loaded.kind is ModuleKind.DORA:
                if magnitude is None:
                    raise IntegrityError(f"{name}: DoRA layer {layer} lacks its magnitude vector")
                if magnitude.numel() != target.out_features:
                    raise IncompatibleBase(
                        f"{name}: {layer}.lora_magnitude_vector has {magnitude.numel()} entries, the layer gives {target.out_features}"
                    )
                with torch.no_grad():
                    norm = target.dora_norms(a, b, scale)
                delta.dora_gain = (magnitude.float().reshape(-1) / norm).contiguous()
            loaded.layers[layer] = delta

    # --- ia3 -----------------------------------------------------------------------------------
    def _load_ia3(self, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        feedforward = set(loaded.manifest.params.get("feedforward_modules") or [])
        for key, tensor in weights.items():
            layer, param = _layer_and_param(key)
            if param != "ia3_l":
                raise UnsupportedModule(f"{name}: unexpected IA3 tensor {key}")
            target = self._layer(layer, name)
            if tensor.dim() == 0:
                raise InvalidModuleWeights(f"{name}: tensor {key!r} is a scalar, not an IA3 vector")
            vector = tensor.float().reshape(-1)
            is_ff = tensor.shape[0] == 1 or _matches(feedforward, layer)
            if is_ff:
                if vector.numel() != target.in_features:
                    raise IncompatibleBase(f"{name}: IA3 vector at {layer} has {vector.numel()} entries, the layer takes {target.in_features}")
                loaded.layers[layer] = LayerDelta(in_scale=vector.contiguous())
            else:
                if vector.numel() != target.out_features:
                    raise IncompatibleBase(f"{name}: IA3 vector at {layer} has {vector.numel()} entries, the layer gives {target.out_features}")
                loaded.layers[layer] = LayerDelta(out_scale=vector.contiguous())

    # --- prompt family -------------------------------------------------------------------------
    def _load_prompt(self, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        prompt = weights.get("prompt_embeddings")
        if prompt is None:
            raise IntegrityError(f"{name}: no prompt_embeddings in {WEIGHTS_FILE}")
        _check_ndim(prompt, 2, "prompt_embeddings", name)
        self._check_virtual_tokens(int(prompt.shape[0]), name)
        prompt = prompt.float()
        if loaded.kind is ModuleKind.MULTITASK_PROMPT:
            cols, rows = weights.get("prefix_task_cols"), weights.get("prefix_task_rows")
            if cols is None or rows is None:
                raise IntegrityError(f"{name}: multitask prompt lacks its task factors")
            task = int(loaded.manifest.params.get("task_id", 0) or 0)
            if not 0 <= task < cols.shape[0]:
                raise UnsupportedModule(f"{name}: task_id {task} is outside the module's {cols.shape[0]} tasks")
            prompt = prompt * (cols[task].float() @ rows[task].float())
        hidden = self.base.model.get_input_embeddings().weight.shape[1]
        if prompt.shape[1] != hidden:
            raise IncompatibleBase(f"{name}: virtual tokens have width {prompt.shape[1]}, the base's embeddings {hidden}")
        loaded.prompt = prompt.contiguous()

    def _load_prefix(self, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        prompt = weights.get("prompt_embeddings")
        if prompt is None:
            raise IntegrityError(f"{name}: no prompt_embeddings in {WEIGHTS_FILE}")
        params = loaded.manifest.params
        config = self.base.model.config
        layers = int(params.get("num_layers") or config.num_hidden_layers)
        heads = int(params.get("num_attention_heads") or getattr(config, "num_key_value_heads", config.num_attention_heads))
        token_dim = int(params.get("token_dim") or config.hidden_size)
        _check_ndim(prompt, 2, "prompt_embeddings", name)
        n = int(prompt.shape[0])
        self._check_virtual_tokens(n, name)
        if layers != config.num_hidden_layers or prompt.shape[1] != layers * 2 * token_dim:
            raise IncompatibleBase(f"{name}: prefix of shape {tuple(prompt.shape)} does not fit this base")
        kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if heads != kv_heads or token_dim != heads * head_dim:
            raise IncompatibleBase(f"{name}: prefix heads {heads} x {token_dim // heads} do not match the base's {kv_heads} x {head_dim}")
        # PEFT's layout: (n, layers * 2 * heads * head_dim) -> per layer (keys, values) of (heads, n, head_dim)
        split = prompt.float().view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
        loaded.prefix = [(split[2 * i].contiguous(), split[2 * i + 1].contiguous()) for i in range(layers)]


def _pattern(pattern: dict[str, Any], layer: str, default: Any) -> Any:
    # PEFT matches rank/alpha patterns by key suffix
    for key, value in pattern.items():
        if layer == key or layer.endswith("." + key) or re.fullmatch(key, layer):
            return value
    return default


def _matches(names: set[str], layer: str) -> bool:
    return any(layer == n or layer.endswith("." + n) for n in names)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())
