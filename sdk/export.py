"""Export a module for servers that read plain transformers models and plain PEFT LoRA adapters
only (vLLM, LoRAX, TGI).

- :func:`export_merged` writes a standalone transformers model: the base (full precision) with
  the module, and the modules it was trained on top of (``manifest.parent``, parent first),
  merged into its weights. lora, dora, adalora and ia3 merge with PEFT's ``merge_and_unload``;
  selective modules put their tensors into the base (:func:`apply_selective`); a full module
  already is a model. The written model is loaded back and its logits compared with the
  unmerged module's before it is moved into place.
- :func:`export_as_lora` writes a plain LoRA module (``adapter_config.json`` +
  ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads, with tunehub's
  manifest, kind ``lora``). Each adapted linear layer's exact weight delta is factorised by a
  truncated SVD at the chosen rank, and the error is reported per layer and on the logits. PEFT's
  own ``convert_to_lora`` (peft >= 0.18) applies to none of these kinds: it refuses AdaLoRA and
  IA3 layers, and for DoRA it factorises ``s * B A`` alone, dropping the magnitude vector, so
  the converted adapter would not be the module. A LoRA module is copied as it is.

Nothing is ever written over a user's files: the output folder must be new or empty, and
everything is written beside it first, checked, then moved in.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunehub.errors import ConfigError, Conflict, IncompatibleBase, IntegrityError, InvalidReference, StoreError
from tunehub.registry.files import new_output_folder
from tunehub.registry.manifest import MANIFEST_FILE, Manifest, ModuleKind
from tunehub.registry.module import LocalModule, verify_module
from tunehub.registry.refs import ModuleRef
from tunehub.registry.signing import TrustPolicy

if TYPE_CHECKING:
    import torch

    from tunehub.sdk.registry import Registry

#: merged logits may differ from the unmerged module's by this much (fp32), relative to the
#: largest logit when that is above 1: the same sums, added up in another order
MERGE_TOLERANCE = 1e-4
#: the token ids both logit checks run on: rows x tokens, drawn from the vocabulary with a fixed seed
CHECK_SHAPE = (2, 12)
#: --as-lora's rank where the module has none of its own (ia3, selective)
DEFAULT_LORA_RANK = 16
#: the longest parent chain followed (a longer one, or a loop, is refused)
MAX_CHAIN = 32
#: the adapter name PEFT gives a module it loads
_ADAPTER = "default"

MERGEABLE_KINDS = frozenset(
    {ModuleKind.LORA, ModuleKind.DORA, ModuleKind.ADALORA, ModuleKind.IA3, ModuleKind.SELECTIVE, ModuleKind.FULL}
)
#: kinds --as-lora turns into a LoRA (lora itself is copied)
LORA_CONVERTIBLE_KINDS = frozenset({ModuleKind.LORA, ModuleKind.DORA, ModuleKind.ADALORA, ModuleKind.IA3, ModuleKind.SELECTIVE})

_VIRTUAL_TOKENS = {
    ModuleKind.PROMPT: "adds virtual tokens (learned embeddings put before every prompt)",
    ModuleKind.PTUNING: "adds virtual tokens (a prompt encoder's embeddings put before every prompt)",
    ModuleKind.MULTITASK_PROMPT: "adds virtual tokens (a shared soft prompt, scaled per task, put before every prompt)",
    ModuleKind.PREFIX: "adds virtual tokens (learned keys and values put before every prompt, in every layer)",
}
#: what each kind that is not a weight change does, for the refusals
_NOT_A_WEIGHT_CHANGE = {
    **_VIRTUAL_TOKENS,
    ModuleKind.BOTTLENECK: "adds a non-linear residual branch (down projection, non-linearity, up projection) after layers",
    ModuleKind.TEMPLATE: "is a hard-prompt template: text the server fills in per request, with no weights at all",
    ModuleKind.TOKENIZER: "brings its own tokenizer (a new vocabulary and its embeddings)",
}


@dataclass
class ExportReport:
    """What an export wrote and how close it is to the module (``to_dict()`` for JSON).

    ``max_logit_diff``: the largest absolute difference between the written model's (or LoRA's)
    logits and the original module's, on ``token_ids`` (rows of ids drawn with a fixed seed), in fp32. For ``--as-lora``,
    ``layer_errors`` holds each layer's relative Frobenius error ``||dW - B A|| / ||dW||``."""

    mode: str  # "merge" or "lora"
    module: str  # the exact reference (name@N) or the folder exported
    kind: str
    out: Path
    base: Path
    base_fingerprint: str
    method: str  # how it was done, in words
    #: merge: every module merged, parent first, as "ref (kind)"
    chain: list[str] = field(default_factory=list)
    #: merge: each module's own check (its merged logits against it unmerged on what came before)
    steps: list[dict[str, Any]] = field(default_factory=list)
    dtype: str | None = None  # the merged model's dtype
    rank: int | None = None  # the LoRA's rank
    layer_errors: dict[str, float] = field(default_factory=dict)
    max_error: float | None = None
    mean_error: float | None = None
    max_logit_diff: float | None = None
    tolerance: float | None = None  # merge: the largest difference accepted
    token_ids: list[list[int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["base"] = str(self.base)
        return data


# --- where modules come from ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    module: LocalModule
    name: str  # name@N, or the folder

    @property
    def manifest(self) -> Manifest:
        return self.module.manifest

    @property
    def label(self) -> str:
        return f"{self.name} ({self.manifest.kind.value})"


class _Modules:
    """The module to export and its parents: a local folder (verified) or registry versions
    (pulled into the store's cache, every file checked; signatures checked against ``trust``).
    The registry is opened only when a reference needs it."""

    def __init__(self, registry: Registry | str | None, trust: TrustPolicy | Iterable[str | Path] | None):
        from tunehub.sdk.registry import trust_policy

        self._registry = registry
        self._policy = trust_policy(trust)

    def registry(self) -> Registry:
        from tunehub.sdk.registry import Registry

        if not isinstance(self._registry, Registry):
            self._registry = Registry(self._registry)
        return self._registry

    def open(self, ref_or_path: str | Path) -> _Source:
        if _is_folder(ref_or_path):
            folder = Path(ref_or_path).expanduser()
            return _Source(verify_module(folder), str(ref_or_path))
        return self.fetch(str(ref_or_path))

    def fetch(self, ref: str) -> _Source:
        registry = self.registry()
        info = registry.resolve(ref)
        if self._policy is not None:
            info.provenance(self._policy)  # raises what the policy refuses, before any file is fetched
        module = registry.pull(info.ref)
        return _Source(module, info.ref)


def _is_folder(ref_or_path: str | Path) -> bool:
    """A folder, not a registry reference: a Path, a path that exists, or text that starts like a path."""
    if isinstance(ref_or_path, Path):
        return True
    text = str(ref_or_path)
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..") or os.path.isdir(text)


def _lineage(source: _Source, modules: _Modules) -> list[_Source]:
    """``source`` and the modules it was trained on top of (``manifest.parent``, each an exact
    version), parent first."""
    chain = [source]
    seen = {source.name}
    parent = source.manifest.parent
    while parent:
        child = chain[-1].name
        try:
            ref = ModuleRef.parse(parent)
        except InvalidReference as exc:
            raise InvalidReference(f"{child} records its parent as {parent!r}, which is not a module reference ({exc})") from None
        if ref.version is None:
            raise ConfigError(
                f"{child} records its parent as {parent!r}, which names no exact version (an alias or latest"
                " moves, so which version it was trained on is unknown); export merges exact versions only:"
                " record the parent as NAME@N (init.parent) and train it again"
            )
        if len(chain) >= MAX_CHAIN:
            raise ConfigError(f"{source.name}: its parent chain is longer than {MAX_CHAIN} modules; export stops there")
        fetched = modules.fetch(parent)
        if fetched.name in seen:
            raise IntegrityError(f"{source.name}: its parent chain comes back to {fetched.name}, a loop")
        seen.add(fetched.name)
        chain.append(fetched)
        parent = fetched.manifest.parent
    return chain[::-1]


def _carries_tokenizer(manifest: Manifest) -> bool:
    return manifest.kind is ModuleKind.TOKENIZER or any(part.kind is ModuleKind.TOKENIZER for part in manifest.components)


def _check_base(chain: list[_Source], base_dir: Path) -> str:
    """The base's fingerprint, once every module of ``chain`` was found to be trained on it."""
    from tunehub.registry.fingerprint import (
        base_fingerprint,
        folder_tokenizer_fingerprint,
        is_legacy_fingerprint,
        short_fingerprint,
    )

    fingerprint = base_fingerprint(base_dir)
    tokenizer = folder_tokenizer_fingerprint(base_dir)
    for source in chain:
        expected = source.manifest.base
        if expected.fingerprint != fingerprint:
            legacy = (
                " (an older tunehub's fingerprint of the weights' shapes only, which cannot say which weights it"
                " was trained on: train it again)"
                if is_legacy_fingerprint(expected.fingerprint)
                else ""
            )
            raise IncompatibleBase(
                f"{source.name} was trained for base {expected.model_id} (fingerprint"
                f" {short_fingerprint(expected.fingerprint)}){legacy}; --base {base_dir} has fingerprint"
                f" {short_fingerprint(fingerprint)}: give the base it was trained on"
            )
        trained_with = source.manifest.tokenizer
        if trained_with is not None and tokenizer is not None and trained_with.fingerprint != tokenizer:
            raise IncompatibleBase(
                f"{source.name} was trained with another tokenizer (fingerprint"
                f" {short_fingerprint(trained_with.fingerprint)}) than the one in --base {base_dir}"
                f" ({short_fingerprint(tokenizer)}): give the base it was trained with"
            )
    return fingerprint


def _quantization_note(source: _Source, merged: bool) -> str | None:
    quantization = source.manifest.base.quantization
    if quantization == "none":
        return None
    if merged:
        return (
            f"{source.name} was trained on a {quantization} (4-bit or 8-bit) base; it is merged into the"
            " full-precision base, so the merged model is full precision (float32) and its outputs differ"
            f" slightly from the {quantization} model it was trained with"
        )
    return (
        f"{source.name} was trained on a {quantization} base; its weight deltas are computed against the"
        " base's full-precision weights"
    )


# --- the output folder ----------------------------------------------------------------------------


def _staging(out: Path) -> Path:
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise StoreError(f"cannot write beside {out}: {exc}") from None
    return staging


def _place(staging: Path, out: Path) -> None:
    """Move the checked files from ``staging`` to ``out``: a rename when ``out`` is new; into the
    empty folder ``out`` otherwise, each file linked under a name that must still be free."""
    if not os.path.lexists(out):
        try:
            os.rename(staging, out)
        except OSError as exc:
            raise Conflict(f"{out} appeared while the export was written; nothing was written there ({exc.strerror})") from None
        return
    placed: list[Path] = []
    try:
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
            if entry.is_dir():
                if os.path.lexists(target):
                    raise FileExistsError(f"{target} exists")
                os.rename(entry, target)
            else:
                _add_file(entry, target)
            placed.append(target)
    except OSError as exc:
        for target in placed:  # ours alone: the names were free when we took them
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        raise Conflict(f"{out} changed while the export was written ({exc}); nothing was written there") from None


def _add_file(source: Path, target: Path) -> None:
    """``source`` at ``target``, a name that must be free: never replaces a file someone wrote there."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: an exclusive create does the same
        with open(source, "rb") as reader, open(target, "xb") as writer:
            shutil.copyfileobj(reader, writer)


# --- models ---------------------------------------------------------------------------------------


def _load_model(folder: Path) -> Any:
    """The model in ``folder`` in float32, with its LM head (masked LM for encoders), in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    try:
        architectures = AutoConfig.from_pretrained(folder).architectures or []
        masked = any(name.endswith("ForMaskedLM") for name in architectures)
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        return auto.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: could not load it as a model: {exc}") from None


def _check_ids(model: Any) -> torch.Tensor:
    import torch

    vocabulary = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocabulary, CHECK_SHAPE, generator=torch.Generator().manual_seed(0))


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _load_peft(model: Any, folder: Path) -> Any:
    from peft import PeftModel

    from tunehub.trainer.run import peft_deprecations_silenced

    with peft_deprecations_silenced():
        return PeftModel.from_pretrained(model, str(folder), adapter_name=_ADAPTER).eval()


# --- merge ------------------------------------------------------------------------------------------


def _refuse_merge(source: _Source) -> None:
    manifest = source.manifest
    kind = manifest.kind
    if kind in MERGEABLE_KINDS and not _carries_tokenizer(manifest):
        return
    why = _NOT_A_WEIGHT_CHANGE.get(kind, _NOT_A_WEIGHT_CHANGE[ModuleKind.TOKENIZER])
    if kind is ModuleKind.TEMPLATE:
        instead = "serve it with tunehub serve, which renders it per request on the base"
    elif manifest.peft_loadable and kind is not ModuleKind.BOTTLENECK:
        instead = "serve it with tunehub serve (one base, the module applied per request), or load it with peft.PeftModel.from_pretrained"
    else:
        instead = "serve it with tunehub serve (one base, the module applied per request)"
    raise ConfigError(
        f"{source.name} is a {kind.value} module: it {why}, so it cannot be merged into the base's weights; {instead}"
    )


def export_merged(
    ref_or_path: str | Path,
    out: str | Path,
    base: str | Path,
    *,
    registry: Registry | str | None = None,
    trust: TrustPolicy | Iterable[str | Path] | None = None,
) -> ExportReport:
    """Write a standalone transformers model to ``out``: the base ``base`` in full precision
    (float32, safetensors, the base's config and tokenizer) with the module merged into its weights.

    A module trained on top of another (``manifest.parent``, an exact version ``name@N``) is
    merged after its parent, recursively, parent first; each is checked against the base. Each
    merge is checked (its logits against the module unmerged on the model so far), and so is the
    written model, loaded back: its logits must equal the unmerged module's within
    :data:`MERGE_TOLERANCE` on a few token ids, else nothing is written.

    Args:
        ref_or_path: a registry reference (``[namespace/]name[@version|@alias]``) or a module folder
            (a Path, or text that starts with ``/``, ``./``, ``../`` or ``~``, or names a folder that
            exists).
        out: the folder to write: new, or empty.
        base: the base model folder (or Hub id) the module was trained on; its fingerprint must
            equal every merged module's ``manifest.base.fingerprint``.
        registry: a :class:`~tunehub.sdk.registry.Registry` or its URI (default: the default registry),
            for the reference and the parents.
        trust: public keys (or a :class:`TrustPolicy`): each version pulled must pass them.

    Raises:
        ConfigError: a kind that cannot merge (prompt, ptuning, multitask_prompt, prefix, bottleneck,
            template, tokenizer; the message says why and what to do instead), a parent that is not
            an exact version, a base that cannot be loaded.
        IncompatibleBase: ``base`` is not the base a module was trained on.
        Conflict: ``out`` exists and is not an empty folder (it is left as it is).
        IntegrityError: the written model's logits differ from the module's (nothing written), a
            module's files do not match their hashes, a parent chain that loops.
        ModuleNotFound, UntrustedModule, ManifestError: as :meth:`Registry.pull` and ``verify_module``.
    """
    from tunehub.bases import resolve_base_folder

    out = new_output_folder(out, "export")
    modules = _Modules(registry, trust)
    source = modules.open(ref_or_path)
    chain = _lineage(source, modules)
    for step in chain:
        _refuse_merge(step)
    base_dir = resolve_base_folder(base, field="--base")
    fingerprint = _check_base(chain, base_dir)
    notes = [note for step in chain if (note := _quantization_note(step, merged=True))]

    # a full module's weights replace every tensor: the chain starts again from it
    starts = [i for i, step in enumerate(chain) if step.manifest.kind is ModuleKind.FULL]
    start = starts[-1] if starts else None
    if start is not None and start > 0:
        notes.append(
            f"{chain[start].name} is a whole model: its weights replace every tensor of the base, so the modules"
            " before it in the chain are already in them"
        )
    model = _load_model(chain[start].module.path if start is not None else base_dir)
    ids = _check_ids(model)
    reference = _logits(model, ids)
    steps = []
    for step in chain if start is None else chain[start + 1 :]:
        model, reference, diff = _merge_step(model, step, ids)
        steps.append({"module": step.name, "kind": step.manifest.kind.value, "max_logit_diff": diff})
        if not diff <= _tolerance(reference):  # also refuses NaN
            raise IntegrityError(
                f"merging {step.name} changed the logits by {diff:.3g} compared with applying it unmerged (more than"
                f" {_tolerance(reference):.3g}); nothing was written to {out}"
            )
    if start is not None:
        steps.insert(0, {"module": chain[start].name, "kind": "full", "max_logit_diff": 0.0})

    tolerance = _tolerance(reference)
    staging = _staging(out)
    try:
        model.save_pretrained(staging)
        del model
        _save_tokenizer(base_dir, staging, notes)
        written = _logits(_load_model(staging), ids)
        diff = _max_diff(written, reference)
        if not diff <= tolerance:  # also refuses NaN
            raise IntegrityError(
                f"the merged model's logits differ from the unmerged module's by {diff:.3g} (more than {tolerance:.3g});"
                f" nothing was written to {out}"
            )
        _place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    methods = {
        ModuleKind.SELECTIVE: "the selected tensors put into the base (apply_selective)",
        ModuleKind.FULL: "the whole model saved",
    }
    merged_by = "PEFT's merge_and_unload on the full-precision base"
    method = "; ".join(dict.fromkeys(methods.get(step.manifest.kind, merged_by) for step in chain[start or 0 :]))
    return ExportReport(
        mode="merge",
        module=source.name,
        kind=source.manifest.kind.value,
        out=out,
        base=Path(base_dir),
        base_fingerprint=fingerprint,
        method=method,
        chain=[step.label for step in chain],
        steps=steps,
        dtype="float32",
        max_logit_diff=diff,
        tolerance=tolerance,
        token_ids=ids.tolist(),
        notes=notes,
    )


def _tolerance(reference: torch.Tensor) -> float:
    """The largest logit difference a merge may make: :data:`MERGE_TOLERANCE`, relative to the
    largest logit when that is above 1 (fp32 rounds relative to magnitude)."""
    return MERGE_TOLERANCE * max(1.0, float(reference.abs().max()))


def _merge_step(model: Any, source: _Source, ids: torch.Tensor) -> tuple[Any, torch.Tensor, float]:
    """Merge ``source`` into ``model``: (the merged model, the unmerged module's logits, how far
    the merged logits are from them)."""
    if source.manifest.kind is ModuleKind.SELECTIVE:
        from tunehub.trainer.methods.selective import apply_selective

        # the module's tensors replace the base's: applying it is merging it
        apply_selective(model, source.module.path)
        return model, _logits(model, ids), 0.0
    peft_model = _load_peft(model, source.module.path)
    unmerged = _logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    return merged, unmerged, _max_diff(_logits(merged, ids), unmerged)


def _save_tokenizer(base_dir: Path, out: Path, notes: list[str]) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        notes.append(f"the base has no tokenizer to copy ({exc}); add one to the merged model's folder")
        return
    tokenizer.save_pretrained(out)


# --- as a LoRA ------------------------------------------------------------------------------------


def _refuse_lora(source: _Source) -> None:
    manifest = source.manifest
    kind = manifest.kind
    name = source.name
    if kind is ModuleKind.FULL:
        raise ConfigError(
            f"{name} is a full module: a whole model, not a weight delta, so no LoRA holds it; its folder already is"
            " a transformers model that other servers read, and --merge writes a clean copy of it"
        )
    if kind not in LORA_CONVERTIBLE_KINDS or _carries_tokenizer(manifest):
        why = _NOT_A_WEIGHT_CHANGE.get(kind, _NOT_A_WEIGHT_CHANGE[ModuleKind.TOKENIZER])
        if kind in _VIRTUAL_TOKENS:
            instead = "PEFT loads it as it is (peft.PeftModel.from_pretrained), and tunehub serve serves it"
        elif kind is ModuleKind.TEMPLATE:
            instead = "serve it with tunehub serve, which renders it per request"
        else:
            instead = "serve it with tunehub serve"
        raise ConfigError(
            f"{name} is a {kind.value} module: it {why}, not a weight delta on linear layers, so no LoRA adapter"
            f" can express it; {instead}"
        )
    if kind is ModuleKind.LORA:
        return
    params = manifest.params
    extras = []
    if params.get("modules_to_save"):
        extras.append(f"whole trained copies of {', '.join(map(str, params['modules_to_save']))} (modules_to_save)")
    if params.get("bias", "none") != "none" or params.get("lora_bias"):
        extras.append("trained biases")
    if extras:
        raise ConfigError(
            f"{name} carries {' and '.join(extras)} besides its weight deltas, which a plain LoRA adapter cannot hold;"
            " export it with --merge instead"
        )


def _own_rank(manifest: Manifest) -> int:
    params = manifest.params
    if manifest.kind is ModuleKind.ADALORA:
        return int(params.get("init_r") or params.get("r") or DEFAULT_LORA_RANK)
    if manifest.kind in (ModuleKind.DORA, ModuleKind.LORA):
        pattern = params.get("rank_pattern") or {}
        return max([int(params.get("r") or DEFAULT_LORA_RANK), *(int(r) for r in pattern.values())])
    return DEFAULT_LORA_RANK


def export_as_lora(
    ref_or_path: str | Path,
    out: str | Path,
    base: str | Path,
    *,
    rank: int | None = None,
    registry: Registry | str | None = None,
    trust: TrustPolicy | Iterable[str | Path] | None = None,
) -> ExportReport:
    """Write the module to ``out`` as a plain LoRA module (kind ``lora``: ``adapter_config.json``
    and ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads, with tunehub's
    manifest, so it can be pushed).

    For each adapted linear layer the module's exact weight delta dW is computed against the
    base's weights (DoRA: ``m * (W + s B A) / ||W + s B A||_row - W``; AdaLoRA: ``P diag(E) Q``
    scaled; IA3: ``W diag(l) - W``, or ``diag(l) W - W`` where it scales outputs; selective: the
    module's linear weights minus the base's), then factorised by a truncated SVD at ``rank``:
    ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T``, scale 1 (``lora_alpha = r``). The report gives
    each layer's relative error ``||dW - B A|| / ||dW||`` (max and mean) and the largest logit
    difference against the original module. A LoRA module is copied as it is.

    The module alone is exported (as tunehub serve applies it): a parent it was trained on top of
    is not folded in (the report notes it; --merge merges a chain).

    Args:
        ref_or_path: a registry reference or a module folder (as :func:`export_merged`).
        out: the folder to write: new, or empty.
        base: the base model folder the module was trained on (its fingerprint is checked).
        rank: the LoRA's rank; default the module's own (dora, adalora), else 16.
        registry, trust: as :func:`export_merged`.

    Raises:
        ConfigError: a kind that is not a weight delta on linear layers (prompt family, prefix,
            bottleneck, template, tokenizer, full, selective modules of biases, norms or embeddings,
            IA3 scaling the output of a layer with a bias), extras a LoRA cannot hold
            (modules_to_save, trained biases), a rank below 1.
        IncompatibleBase, Conflict, IntegrityError, ModuleNotFound, UntrustedModule: as :func:`export_merged`.
    """
    from tunehub.bases import resolve_base_folder

    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1, not {rank}")
    out = new_output_folder(out, "export")
    modules = _Modules(registry, trust)
    source = modules.open(ref_or_path)
    _refuse_lora(source)
    base_dir = resolve_base_folder(base, field="--base")
    fingerprint = _check_base([source], base_dir)
    manifest = source.manifest
    notes = [note for note in [_quantization_note(source, merged=False)] if note]
    if manifest.parent:
        notes.append(
            f"{source.name} was trained on top of {manifest.parent}; the adapter carries {source.name} alone, as"
            " tunehub serve applies it (--merge merges the chain into one model)"
        )
    report = ExportReport(
        mode="lora",
        module=source.name,
        kind=manifest.kind.value,
        out=out,
        base=Path(base_dir),
        base_fingerprint=fingerprint,
        method="copied as it is",
        notes=notes,
    )
    if manifest.kind is ModuleKind.LORA:
        _copy_module(source.module, out)
        report.rank = _own_rank(manifest)
        report.max_logit_diff = 0.0
        return report

    rank = rank or _own_rank(manifest)
    model = _load_model(base_dir)
    ids = _check_ids(model)
    if manifest.kind is ModuleKind.SELECTIVE:
        reference, deltas = _selective_deltas(model, source, ids)
    else:
        peft_model = _load_peft(model, source.module.path)
        reference = _logits(peft_model, ids)
        deltas = _peft_deltas(peft_model, source)
        model = peft_model.unload()  # the base's own layers back, unchanged
    if not deltas:
        raise ConfigError(f"{source.name} adapts no linear layer: there is nothing to export as a LoRA")
    factors, errors = _factorise(deltas, rank)

    staging = _staging(out)
    try:
        lora = _lora_model(model, factors, rank, manifest)
        errors_max, errors_mean = max(errors.values()), sum(errors.values()) / len(errors)
        _save_lora(lora, staging, base_dir, source, rank, errors_max, errors_mean)
        loaded = _load_peft(lora.unload(), staging)  # what a PEFT user gets from the folder
        diff = _max_diff(_logits(loaded, ids), reference)
        _place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.method = f"exact weight deltas, truncated SVD at rank {rank} (B = U S^1/2, A = S^1/2 V^T, lora_alpha = r)"
    report.rank = rank
    report.layer_errors = errors
    report.max_error = errors_max
    report.mean_error = errors_mean
    report.max_logit_diff = diff
    report.token_ids = ids.tolist()
    return report


def _copy_module(module: LocalModule, out: Path) -> None:
    staging = _staging(out)
    try:
        for rel in [*sorted(module.manifest.files), MANIFEST_FILE]:
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(module.path / rel, target)
        verify_module(staging)  # the copy is the module, byte for byte
        _place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _peft_deltas(peft_model: Any, source: _Source) -> dict[str, torch.Tensor]:
    """Each adapted layer's exact weight delta (float64), by the module's kind."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    kind = source.manifest.kind
    deltas: dict[str, torch.Tensor] = {}
    not_linear, scaled_biases = [], []
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        layer: Any = module  # an IA3 or LoRA-family layer, by the module's kind
        base_layer = layer.get_base_layer()
        if not isinstance(base_layer, torch.nn.Linear):
            not_linear.append(f"{name} ({type(base_layer).__name__})")
            continue
        weight = base_layer.weight.detach().double()
        if kind is ModuleKind.IA3:
            scale = layer.ia3_l[_ADAPTER].detach().double()  # (1, in) on inputs, (out, 1) on outputs
            if not layer.is_feedforward and base_layer.bias is not None and bool((scale != 1).any()):
                scaled_biases.append(name)
            deltas[name] = weight * (scale - 1)
        elif kind is ModuleKind.DORA:
            low_rank = layer.get_delta_weight(_ADAPTER).detach().double()  # s * B A
            magnitude = layer.lora_magnitude_vector[_ADAPTER].weight.detach().double()
            factor = (magnitude / torch.linalg.norm(weight + low_rank, dim=1)).unsqueeze(1)
            # m / ||W + sBA|| * (W + sBA) - W, without subtracting two nearly equal matrices
            deltas[name] = (factor - 1) * weight + factor * low_rank
        else:  # adalora: P diag(E) Q * alpha / ranknum
            deltas[name] = layer.get_delta_weight(_ADAPTER).detach().double()
    if not_linear:
        raise ConfigError(
            f"{source.name} adapts layers that are not linear: {', '.join(not_linear[:6])}; a LoRA export handles"
            " linear layers only: export it with --merge"
        )
    if scaled_biases:
        raise ConfigError(
            f"{source.name} rescales the outputs of layers that have a bias ({', '.join(scaled_biases[:6])}), which"
            " changes the bias too, and a plain LoRA adapter cannot change a bias: export it with --merge"
        )
    return deltas


def _selective_deltas(model: Any, source: _Source, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The module's logits and the weight delta of each linear layer it changes; ``model`` is
    left as it was."""
    import torch
    from safetensors.torch import load_file

    from tunehub.trainer.methods.selective import WEIGHTS_FILE, apply_selective

    tensors = load_file(str(source.module.path / WEIGHTS_FILE))
    linear = {f"{name}.weight": name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    other = sorted(name for name in tensors if name not in linear)
    if other:
        raise ConfigError(
            f"{source.name} changes tensors that are not weights of linear layers ({', '.join(other[:6])}"
            f"{', ...' if len(other) > 6 else ''}: biases, norms or embeddings), which a LoRA adapter cannot"
            " carry: export it with --merge"
        )
    params = dict(model.named_parameters())
    originals = {name: params[name].detach().clone() for name in tensors}
    deltas = {}
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise IntegrityError(f"{source.name}: tensor {name} {tuple(tensor.shape)} does not fit this base")
        deltas[linear[name]] = tensor.double() - params[name].detach().double()
    apply_selective(model, source.module.path)
    reference = _logits(model, ids)
    with torch.no_grad():
        for name, original in originals.items():
            params[name].copy_(original)
    return reference, deltas


def _factorise(
    deltas: dict[str, torch.Tensor], rank: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """(B, A) in float32 for each layer, of ``rank`` columns/rows (zero-padded where the layer is
    smaller), and each layer's relative Frobenius error ||dW - B A|| / ||dW||."""
    import torch

    factors, errors = {}, {}
    for name, delta in sorted(deltas.items()):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        kept = min(rank, s.numel())
        root = s[:kept].sqrt()
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float32)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float32)
        b[:, :kept] = (u[:, :kept] * root).float()
        a[:kept] = (root.unsqueeze(1) * vh[:kept]).float()
        norm = float(torch.linalg.norm(delta))
        residual = float(torch.linalg.norm(delta - b.double() @ a.double()))
        factors[name] = (b, a)
        errors[name] = residual / norm if norm > 0 else 0.0
    return factors, errors


def _lora_model(model: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, manifest: Manifest) -> Any:
    """A PEFT LoRA model over ``model`` whose layers hold ``factors`` (scale 1)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunehub.trainer.run import peft_deprecations_silenced

    names = set(factors)
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    same_leaf = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves
    }
    # leaf names (q_proj, v_proj) where they select exactly these layers: what other servers expect
    targets = sorted(leaves) if same_leaf == names else sorted(names)
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none", task_type=manifest.task_type
    )
    with peft_deprecations_silenced():
        lora = get_peft_model(model, config, adapter_name=_ADAPTER)
    adapted = lora.get_base_model()
    with torch.no_grad():
        for name, (b, a) in factors.items():
            layer: Any = adapted.get_submodule(name)  # a LoRA layer now
            layer.lora_A[_ADAPTER].weight.copy_(a)
            layer.lora_B[_ADAPTER].weight.copy_(b)
    return lora.eval()


def _save_lora(lora: Any, out: Path, base_dir: Path, source: _Source, rank: int, max_error: float, mean_error: float) -> None:
    from tunehub.trainer.export import save_peft_module

    manifest = source.manifest
    save_peft_module(
        lora,
        out,
        base_path=base_dir,
        kind=ModuleKind.LORA,
        quantization=manifest.base.quantization,
        objective=manifest.objective,
        task=manifest.task,
        parent=manifest.parent,
        data=manifest.data,
        metrics={"export_max_relative_error": max_error, "export_mean_relative_error": mean_error},
        config={"export": {"from": source.name, "kind": manifest.kind.value, "rank": rank}},
        description=f"rank-{rank} LoRA export of {source.name} ({manifest.kind.value})",
        base_model_id=manifest.base.model_id,
    )
    verify_module(out)


__all__ = [
    "CHECK_SHAPE",
    "DEFAULT_LORA_RANK",
    "LORA_CONVERTIBLE_KINDS",
    "MERGEABLE_KINDS",
    "MERGE_TOLERANCE",
    "ExportReport",
    "export_as_lora",
    "export_merged",
]
