"""``tunehub inspect``: what a module is, where it came from, and how much of its rank it uses.

For a low-rank module (lora, dora, adalora) every layer's delta ``W = scale * B @ A`` is reduced to
its singular values without ever forming the ``out x in`` matrix: with ``B = Q_b R_b`` and
``A^T = Q_a R_a`` (reduced QR), ``W = Q_b (scale * R_b R_a^T) Q_a^T`` and the outer factors are
orthonormal, so the singular values of ``W`` are those of the small ``r x r`` core. The effective
rank at a share of the energy is the smallest ``k`` whose top-``k`` squared singular values hold
that share of their sum: a layer of rank 16 whose delta is 99% in 3 directions could have been
trained with a smaller ``r``.

Other kinds have no spectrum; their tensors are listed (name, shape, numel) and summarised per
layer kind. The weights are untrusted input: every file is verified against the manifest and
checked as safetensors first, and a tensor of the wrong rank or shape is refused with
:class:`~tunehub.errors.InvalidModuleWeights`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tunehub.errors import ConfigError, InvalidModuleWeights, InvalidReference, ManifestError, TunehubError
from tunehub.registry.files import check_safetensors_file
from tunehub.registry.fingerprint import short_fingerprint
from tunehub.registry.manifest import ADAPTER_CONFIG_FILE, MANIFEST_FILE, Manifest, ModuleKind
from tunehub.registry.module import verify_module

if TYPE_CHECKING:
    import torch

    from tunehub.registry.signing import TrustPolicy
    from tunehub.sdk.registry import Registry

#: the kinds whose weights are low-rank deltas of linear layers
LOW_RANK_KINDS = frozenset({ModuleKind.LORA, ModuleKind.DORA, ModuleKind.ADALORA})
#: a parent chain longer than this is cut (a cycle is cut where it closes)
LINEAGE_DEPTH = 32
#: energy shares the effective ranks are reported at
ENERGY_SHARES = (0.90, 0.99)

# PEFT's tensor names for the factors of a low-rank delta, by role (embedding layers use their own)
_FACTOR_ROLES = {
    "lora_A": "A",
    "lora_embedding_A": "A",
    "lora_B": "B",
    "lora_embedding_B": "B",
    "lora_E": "E",
    "lora_magnitude_vector": "magnitude",
}
_PEFT_PREFIX = "base_model.model."
# method parameters worth a place in the one-line summary (the JSON has them all)
_SUMMARY_PARAMS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "init_r",
    "target_r",
    "target_modules",
    "feedforward_modules",
    "num_virtual_tokens",
    "reduction_factor",
    "placement",
)
# the floor of the plot's log axis: a rank-deficient delta's zero singular values sit there
_PLOT_FLOOR = 1e-8


@dataclass(frozen=True)
class FileEntry:
    """One file of the module."""

    name: str
    size_bytes: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the module's weights."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    file: str


@dataclass(frozen=True)
class TensorGroup:
    """The tensors of one layer kind (the tensor name with its layer indices as ``*``)."""

    layer_kind: str
    tensors: int
    numel: int
    shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class LineageStep:
    """One ancestor: the parent reference as recorded, and what it resolved to (or why not)."""

    ref: str
    resolved: str | None = None
    kind: str | None = None
    task: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class LayerSpectrum:
    """The singular values of one layer's delta ``scale * B @ A`` (largest first)."""

    layer: str
    rank: int  # nominal: the rank of the stored factors
    out_features: int
    in_features: int
    scale: float
    singular_values: tuple[float, ...]
    effective_rank_90: int
    effective_rank_99: int

    @property
    def top_singular_value(self) -> float:
        return self.singular_values[0] if self.singular_values else 0.0

    @property
    def energy(self) -> float:
        """The sum of squared singular values: the squared Frobenius norm of the delta."""
        return math.fsum(value * value for value in self.singular_values)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "top_singular_value": self.top_singular_value, "energy": self.energy}


@dataclass(frozen=True)
class ModuleReport:
    """What ``tunehub inspect`` found: the manifest's summary, the lineage, parameter counts and,
    for low-rank kinds, every layer's spectrum. ``to_dict()`` is the ``--json`` output."""

    source: str  # "registry" or "folder"
    ref: str | None  # the exact version (name@N) for a registry module
    path: str  # the verified folder that was read
    manifest: Manifest
    files: tuple[FileEntry, ...]
    lineage: tuple[LineageStep, ...]
    lineage_cut: str | None  # why the walk stopped early (depth, cycle), None when it reached the root
    module_params: int
    base_params: int | None  # None: the trainer recorded no total_params (the base is not loaded)
    tensors: tuple[TensorEntry, ...]
    tensor_groups: tuple[TensorGroup, ...]
    layers: tuple[LayerSpectrum, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return self.ref or self.path

    @property
    def share_of_base(self) -> float | None:
        return self.module_params / self.base_params if self.base_params else None

    @property
    def median_effective_rank_90(self) -> float | None:
        return statistics.median(layer.effective_rank_90 for layer in self.layers) if self.layers else None

    @property
    def median_effective_rank_99(self) -> float | None:
        return statistics.median(layer.effective_rank_99 for layer in self.layers) if self.layers else None

    @property
    def layers_under_half_rank(self) -> int:
        """Layers whose delta holds 90% of its energy in fewer than half its nominal rank."""
        return sum(1 for layer in self.layers if layer.effective_rank_90 < layer.rank / 2)

    def to_dict(self) -> dict[str, Any]:
        manifest = self.manifest
        return {
            "source": self.source,
            "ref": self.ref,
            "path": self.path,
            "kind": manifest.kind.value,
            "params": manifest.params,
            "base": {
                "model_id": manifest.base.model_id,
                "fingerprint": manifest.base.fingerprint,
                "fingerprint_short": short_fingerprint(manifest.base.fingerprint),
                "quantization": manifest.base.quantization,
            },
            "objective": manifest.objective,
            "task": manifest.task,
            "created_at": manifest.created_at.isoformat(),
            "parent": manifest.parent,
            "files": [asdict(entry) for entry in self.files],
            "lineage": [asdict(step) for step in self.lineage],
            "lineage_cut": self.lineage_cut,
            "parameters": {"module": self.module_params, "base": self.base_params, "share_of_base": self.share_of_base},
            "tensors": [asdict(entry) for entry in self.tensors],
            "tensor_groups": [asdict(group) for group in self.tensor_groups],
            "layers": [layer.to_dict() for layer in self.layers],
            "summary": {
                "layers": len(self.layers),
                "median_effective_rank_90": self.median_effective_rank_90,
                "median_effective_rank_99": self.median_effective_rank_99,
                "layers_under_half_rank": self.layers_under_half_rank,
            },
            "notes": list(self.notes),
            "manifest": json.loads(manifest.to_json()),
        }


# --- linear algebra --------------------------------------------------------------------------------


def low_rank_singular_values(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The singular values (descending, float64) of ``scale * lora_b @ lora_a`` for ``lora_a``
    (r x in) and ``lora_b`` (out x r), from the QR factors of both: O((out + in) r^2), never the
    O(out * in) product itself."""
    import torch

    a = lora_a.detach().to(dtype=torch.float64, device="cpu")
    b = lora_b.detach().to(dtype=torch.float64, device="cpu")
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, r_b = torch.linalg.qr(b, mode="reduced")  # b = Q_b R_b
    _, r_a = torch.linalg.qr(a.T, mode="reduced")  # a^T = Q_a R_a, so a = R_a^T Q_a^T
    return torch.linalg.svdvals(scale * (r_b @ r_a.T))


def effective_rank(singular_values: Iterable[float], share: float) -> int:
    """The smallest ``k`` whose ``k`` largest squared singular values hold ``share`` of their sum
    (0 for a zero delta)."""
    energies = sorted((float(value) ** 2 for value in singular_values), reverse=True)
    total = math.fsum(energies)
    if total <= 0.0:
        return 0
    held = 0.0
    for k, energy in enumerate(energies, 1):
        held += energy
        if held >= share * total * (1 - 1e-12):  # rounding must not push a full share past the last k
            return k
    return len(energies)


# --- reading a module ------------------------------------------------------------------------------


def inspect_module(
    path_or_ref: str | Path,
    *,
    registry: Registry | str | None = None,
    trust: TrustPolicy | Iterable[str | Path] | None = None,
    require_signed: bool = False,
) -> ModuleReport:
    """Inspect a module: a registry reference (pulled, verified, into the registry's own cache;
    no folder of the user's is written) or an existing module folder (verified in place).

    Args:
        path_or_ref: ``[namespace/]name[@version|@alias]``, or a module folder (a ``Path``, or a
            string naming an existing folder).
        registry: a :class:`~tunehub.sdk.registry.Registry` or its URI (default: the default
            registry). It resolves the reference and the lineage (``manifest.parent``).
        trust: public keys (as ``pull``'s): signatures by them are verified before anything is
            fetched; a version they refuse is not read.
        require_signed: refuse a version without a valid signature by a ``trust`` key.

    Returns:
        The report: manifest summary, lineage, parameter counts, tensors, and the singular values
        of every layer's delta for lora, dora and adalora modules.

    Raises:
        InvalidReference: ``path_or_ref`` is neither a folder nor a valid reference.
        ModuleNotFound: no such module, version or alias (VersionNotFound, AliasNotFound).
        ManifestError: a folder without a valid manifest, or an adapter_config.json that is not
            a valid PEFT config.
        IntegrityError: a file that does not match its sha256, or weights that are not valid
            safetensors (or hold NaN/Inf).
        InvalidModuleWeights: a low-rank factor of the wrong rank or shape, or a missing one.
        UntrustedModule: the trust policy refuses the version.
        ConfigError: ``trust`` given for a folder (signatures live in the registry).
    """
    from tunehub.sdk.registry import Registry

    def open_registry() -> Registry:
        if isinstance(registry, Registry):
            if trust is not None or require_signed:
                raise ConfigError("give the trust keys when opening the Registry, or pass its URI with trust=")
            return registry
        return Registry(registry, trust=trust, require_signed=require_signed)

    folder = Path(path_or_ref)
    if isinstance(path_or_ref, Path) or folder.is_dir():
        if trust is not None or require_signed:
            raise ConfigError(
                f"{folder} is a folder: signatures are kept in the registry, so --trust and --require-signed"
                " apply to registry references only (push it, then inspect NAME@VERSION)"
            )
        module = verify_module(folder)
        path, ref, source = module.path, None, "folder"
        lineage_registry: Registry | None = None
    else:
        text = str(path_or_ref)
        lineage_registry = open_registry()
        try:
            info = lineage_registry.resolve(text)
        except InvalidReference as exc:
            raise InvalidReference(f"{text!r} is neither a module folder nor a registry reference: {exc}") from None
        # the store's own pull: verified files, the trust policy checked first. A module whose
        # lineage is broken is still read (the walk below says which ancestor is missing);
        # the exact version, even if an alias moves meanwhile
        module = lineage_registry.store.pull(info.ref)
        path, ref, source = module.path, info.ref, "registry"
    manifest = module.manifest
    label = ref or str(path)

    lineage: list[LineageStep] = []
    cut: str | None = None
    if manifest.parent:
        if lineage_registry is None:
            lineage_registry = open_registry()
        lineage, cut = _walk_lineage(lineage_registry, manifest.parent, ref)

    weight_files = sorted(rel for rel in manifest.files if rel.lower().endswith(".safetensors"))
    for rel in weight_files:
        check_safetensors_file(path / rel, f"{label}: {rel}")  # format and finite values, before any parse
    tensors = _tensor_table(path, weight_files, label)
    layers: tuple[LayerSpectrum, ...] = ()
    notes: list[str] = []
    if manifest.kind in LOW_RANK_KINDS:
        config = _adapter_config(path, label)
        layers, low_rank_notes = _spectra(path, manifest.kind, config, tensors, label)
        notes += low_rank_notes
    else:
        notes.append(f"{manifest.kind.value}: not a low-rank delta, so no singular values; its tensors by layer kind are listed")
    return ModuleReport(
        source=source,
        ref=ref,
        path=str(path),
        manifest=manifest,
        files=_file_entries(path, manifest),
        lineage=tuple(lineage),
        lineage_cut=cut,
        module_params=sum(entry.numel for entry in tensors),
        base_params=_base_params(manifest),
        tensors=tuple(tensors),
        tensor_groups=_tensor_groups(tensors),
        layers=layers,
        notes=tuple(notes),
    )


def _walk_lineage(registry: Registry, parent: str, start: str | None) -> tuple[list[LineageStep], str | None]:
    """The parent chain from ``parent``; an ancestor that cannot be read ends it, listed with why."""
    steps: list[LineageStep] = []
    seen = {start} if start else set()
    next_parent: str | None = parent
    while next_parent:
        if len(steps) >= LINEAGE_DEPTH:
            return steps, f"cut at depth {LINEAGE_DEPTH} (the chain goes on at {next_parent})"
        try:
            info = registry.resolve(next_parent)
            ancestor = registry.manifest(info.ref)
        except (TunehubError, OSError) as exc:
            steps.append(LineageStep(ref=next_parent, error=str(exc) or type(exc).__name__))
            return steps, None
        if info.ref in seen:
            steps.append(
                LineageStep(
                    ref=next_parent, resolved=info.ref, kind=info.kind, task=info.task, error="cycle: already in this lineage"
                )
            )
            return steps, f"cycle at {info.ref}"
        seen.add(info.ref)
        steps.append(LineageStep(ref=next_parent, resolved=info.ref, kind=info.kind, task=info.task))
        next_parent = ancestor.parent
    return steps, None


def _file_entries(path: Path, manifest: Manifest) -> tuple[FileEntry, ...]:
    names = sorted([MANIFEST_FILE, *manifest.files])
    return tuple(FileEntry(name=rel, size_bytes=(path / rel).stat().st_size) for rel in names)


def _base_params(manifest: Manifest) -> int | None:
    total = manifest.metrics.get("total_params")
    if total is None or not math.isfinite(total) or total <= 0:
        return None
    trainable = manifest.metrics.get("trainable_params")
    # a PEFT model's count includes the adapter on top of the base; a selective or full module
    # trains the base's own tensors, so there the total is the base
    if manifest.peft_loadable and trainable is not None and 0 < trainable < total:
        return int(total - trainable)
    return int(total)


def _tensor_table(path: Path, weight_files: list[str], label: str) -> list[TensorEntry]:
    from safetensors import SafetensorError, safe_open

    entries: list[TensorEntry] = []
    for rel in weight_files:
        try:
            with safe_open(str(path / rel), framework="pt") as handle:
                for name in sorted(handle.keys()):
                    view = handle.get_slice(name)
                    shape = tuple(int(size) for size in view.get_shape())
                    entries.append(TensorEntry(name, shape, str(view.get_dtype()), math.prod(shape), rel))
        except (SafetensorError, OSError) as exc:
            raise InvalidModuleWeights(f"{label}: {rel} cannot be read as safetensors: {exc}") from None
    return entries


def _layer_kind(tensor_name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in tensor_name.removeprefix(_PEFT_PREFIX).split("."))


def _tensor_groups(tensors: list[TensorEntry]) -> tuple[TensorGroup, ...]:
    grouped: dict[str, list[TensorEntry]] = {}
    for entry in tensors:
        grouped.setdefault(_layer_kind(entry.name), []).append(entry)
    return tuple(
        TensorGroup(
            layer_kind=kind,
            tensors=len(entries),
            numel=sum(e.numel for e in entries),
            shapes=tuple(sorted({e.shape for e in entries})),
        )
        for kind, entries in sorted(grouped.items())
    )


def _natural_key(name: str) -> list[Any]:
    # layers.2 before layers.10
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


# --- low-rank deltas -------------------------------------------------------------------------------


def _adapter_config(path: Path, label: str) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{label}: {ADAPTER_CONFIG_FILE} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{label}: {ADAPTER_CONFIG_FILE} must hold a JSON object")
    for key in ("lora_alpha", "r"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ManifestError(f"{label}: {ADAPTER_CONFIG_FILE} has {key}={value!r}; it must be a number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ManifestError(f"{label}: {ADAPTER_CONFIG_FILE} has a {key} that is not an object")
    return config


def _pattern_value(pattern: dict[str, Any], layer: str, default: Any) -> Any:
    # PEFT matches a pattern key against the end of the module's name, at a dot boundary
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", layer):
                return value
        except re.error:
            if layer == key or layer.endswith("." + key):
                return value
    return default


def _layer_scale(kind: ModuleKind, config: dict[str, Any], layer: str, rank: int, label: str) -> float:
    """PEFT's scaling of ``layer``'s delta: lora_alpha / r (alpha / sqrt(r) with use_rslora);
    AdaLoRA divides by ``ranknum``, which stays the initial rank ``init_r`` when training prunes a
    layer (PEFT builds a loaded module's layers at init_r, then cuts them to the saved rank)."""
    alpha = float(config.get("lora_alpha", 8))
    if kind is ModuleKind.ADALORA:
        init_r = config.get("init_r")
        ranknum = float(init_r) if isinstance(init_r, int) and init_r >= rank else float(rank)
        return (alpha if alpha > 0 else float(rank)) / (ranknum + 1e-5)
    layer_alpha = _pattern_value(config.get("alpha_pattern") or {}, layer, alpha)
    configured = _pattern_value(config.get("rank_pattern") or {}, layer, config.get("r", 8))
    for key, value in (("alpha", layer_alpha), ("rank", configured)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{label}: {ADAPTER_CONFIG_FILE} gives {layer} the {key} {value!r}, not a number")
    if configured != rank:
        raise InvalidModuleWeights(
            f"{label}: {layer} has factors of rank {rank}, but {ADAPTER_CONFIG_FILE} gives it r={configured}:"
            " PEFT cannot load this module"
        )
    if rank == 0:
        return 0.0
    return float(layer_alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _split_factor_name(name: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' ->
    ('model.layers.0.self_attn.q_proj', 'lora_A'); None for a tensor that is no factor."""
    parts = name.removeprefix(_PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):
        if part in _FACTOR_ROLES:
            return ".".join(parts[:i]), part
    return None


def _spectra(
    path: Path, kind: ModuleKind, config: dict[str, Any], tensors: list[TensorEntry], label: str
) -> tuple[tuple[LayerSpectrum, ...], list[str]]:
    from safetensors import SafetensorError, safe_open

    by_layer: dict[str, dict[str, TensorEntry]] = {}
    others = 0
    for entry in tensors:
        split = _split_factor_name(entry.name)
        if split is None:
            others += 1
            continue
        layer, param = split
        role = _FACTOR_ROLES[param]
        held = by_layer.setdefault(layer, {})
        if role in held:
            raise InvalidModuleWeights(f"{label}: {layer} has two {role} factors ({held[role].name!r} and {entry.name!r})")
        held[role] = entry

    layers: list[LayerSpectrum] = []
    with ExitStack() as open_files:
        handles: dict[str, Any] = {}
        try:
            for layer in sorted(by_layer, key=_natural_key):
                factors = by_layer[layer]
                for role in ("A", "B"):
                    if role not in factors:
                        have = ", ".join(sorted(entry.name.removeprefix(_PEFT_PREFIX) for entry in factors.values()))
                        raise InvalidModuleWeights(f"{label}: layer {layer} has {have} but no lora_{role}")
                loaded = {}
                for role, entry in factors.items():
                    if entry.file not in handles:
                        handles[entry.file] = open_files.enter_context(safe_open(str(path / entry.file), framework="pt"))
                    loaded[role] = handles[entry.file].get_tensor(entry.name)
                layers.append(_layer_spectrum(kind, config, layer, loaded, label))
        except SafetensorError as exc:
            raise InvalidModuleWeights(f"{label}: a weights file cannot be read as safetensors: {exc}") from None

    notes: list[str] = []
    if kind is ModuleKind.DORA:
        notes.append(
            "dora: singular values of the low-rank direction update scale * B @ A; the magnitude vector then"
            " rescales each output channel of W + scale * B @ A (the paper's columns of W), which they do not include"
        )
    elif kind is ModuleKind.ADALORA:
        notes.append(
            "adalora: delta = scale * P diag(E) Q (lora_B, lora_E, lora_A) with scale = lora_alpha / rank;"
            " its exact singular values (E are they only where P and Q are orthonormal; pruned triplets have E = 0)"
        )
    if others:
        notes.append(f"{others} tensors are not low-rank factors (e.g. modules_to_save): counted, not analysed")
    if not layers:
        notes.append("no low-rank factors (lora_A, lora_B) in the weights")
    return tuple(layers), notes


def _layer_spectrum(kind: ModuleKind, config: dict[str, Any], layer: str, factors: dict[str, Any], label: str) -> LayerSpectrum:
    a, b = factors["A"], factors["B"]
    for role, tensor in factors.items():
        if not tensor.is_floating_point():
            raise InvalidModuleWeights(f"{label}: {layer} factor {role} has dtype {tensor.dtype}; low-rank factors are floats")
    if a.dim() != 2 or b.dim() != 2:
        raise InvalidModuleWeights(
            f"{label}: {layer} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: both must be matrices"
            " (A: r x in, B: out x r)"
        )
    rank = int(a.shape[0])
    if int(b.shape[1]) != rank:
        raise InvalidModuleWeights(
            f"{label}: {layer} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: B's columns must match"
            f" A's rows (r = {rank})"
        )
    out_features, in_features = int(b.shape[0]), int(a.shape[1])
    e = factors.get("E")
    if kind is ModuleKind.ADALORA:
        if e is None:
            raise InvalidModuleWeights(f"{label}: AdaLoRA layer {layer} has no lora_E (its singular values)")
        if e.dim() > 2 or e.numel() != rank:
            raise InvalidModuleWeights(
                f"{label}: {layer} has lora_E {tuple(e.shape)}; its rank is {rank}, so it must hold {rank} values"
            )
        a = a * e.reshape(rank, 1).to(a.dtype)  # P diag(E) Q = B @ (E * A)
    elif e is not None:
        raise InvalidModuleWeights(f"{label}: a {kind.value} module carries lora_E at {layer} (only AdaLoRA has it)")
    magnitude = factors.get("magnitude")
    if kind is ModuleKind.DORA:
        if magnitude is None:
            raise InvalidModuleWeights(f"{label}: DoRA layer {layer} has no lora_magnitude_vector")
        if magnitude.dim() > 2 or magnitude.numel() != out_features:
            raise InvalidModuleWeights(
                f"{label}: {layer} has a magnitude vector of shape {tuple(magnitude.shape)}; the layer has {out_features} outputs"
            )
    elif magnitude is not None:
        raise InvalidModuleWeights(f"{label}: a {kind.value} module carries a DoRA magnitude vector at {layer}")
    scale = _layer_scale(kind, config, layer, rank, label)
    values = tuple(float(v) for v in low_rank_singular_values(a, b, scale))
    return LayerSpectrum(
        layer=layer,
        rank=rank,
        out_features=out_features,
        in_features=in_features,
        scale=scale,
        singular_values=values,
        effective_rank_90=effective_rank(values, ENERGY_SHARES[0]),
        effective_rank_99=effective_rank(values, ENERGY_SHARES[1]),
    )


# --- presentation ----------------------------------------------------------------------------------


def _size(size_bytes: int) -> str:
    return f"{size_bytes} B" if size_bytes < 1024 else f"{size_bytes / 1024:.1f} KiB"


def _short_value(value: Any) -> str:
    # PEFT records "all-linear" as every matched layer's name: a long list says little on one line
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(map(str, value[:3]))}, ... {len(value)} in all]"
    return str(value)


def summary_lines(report: ModuleReport) -> list[str]:
    """The report's head as ``key  value`` lines: manifest, files, parameters, lineage."""
    manifest = report.manifest
    params = ", ".join(
        f"{key}={_short_value(manifest.params[key])}" for key in _SUMMARY_PARAMS if manifest.params.get(key) not in (None, False)
    )
    base = manifest.base
    if report.base_params is not None:
        share = f"{report.module_params:,} ({report.share_of_base:.4%} of the base's {report.base_params:,})"
    else:
        share = f"{report.module_params:,} (share of the base unknown: the trainer recorded no total_params)"
    lines = [
        f"module     {report.label}",
        f"kind       {manifest.kind.value}" + (f" ({params})" if params else ""),
        f"base       {base.model_id} ({short_fingerprint(base.fingerprint)}, quantization {base.quantization})",
        f"objective  {manifest.objective or '-'}, task {manifest.task or '-'}",
        f"created    {manifest.created_at.isoformat(timespec='seconds')}",
        "files      " + ", ".join(f"{entry.name} ({_size(entry.size_bytes)})" for entry in report.files),
        f"parameters {share}",
    ]
    if not report.lineage:
        lines.append("lineage    none (no parent)")
    for i, step in enumerate(report.lineage):
        head = "lineage    " if i == 0 else "           "
        if step.resolved is None:
            lines.append(f"{head}{step.ref}: unavailable ({step.error})")
        else:
            also = f" ({step.error})" if step.error else ""
            lines.append(f"{head}{step.resolved} ({step.kind}, task {step.task or '-'}){also}")
    if report.lineage_cut:
        lines.append(f"           ... {report.lineage_cut}")
    return lines


def layer_table(report: ModuleReport) -> tuple[list[str], list[list[str]]]:
    """The per-layer table: columns and rows. Low-rank kinds: one row per layer with its ranks
    and singular values; other kinds: one row per layer kind with its tensors."""
    if report.layers:
        header = ["layer", "rank", "eff. rank 90%", "eff. rank 99%", "top singular value", "sum of squares"]
        rows = [
            [
                layer.layer,
                str(layer.rank),
                str(layer.effective_rank_90),
                str(layer.effective_rank_99),
                f"{layer.top_singular_value:.4g}",
                f"{layer.energy:.4g}",
            ]
            for layer in report.layers
        ]
        return header, rows
    header = ["layer kind", "tensors", "parameters", "shapes"]
    rows = [
        [
            group.layer_kind,
            str(group.tensors),
            f"{group.numel:,}",
            ", ".join("x".join(map(str, s)) or "scalar" for s in group.shapes),
        ]
        for group in report.tensor_groups
    ]
    return header, rows


def rank_summary(report: ModuleReport) -> str | None:
    """One line: the median effective ranks and how many layers use less than half their rank."""
    if not report.layers:
        return None
    nominal = statistics.median(layer.rank for layer in report.layers)
    return (
        f"median effective rank {report.median_effective_rank_90:g} (90% energy), {report.median_effective_rank_99:g}"
        f" (99%), of a nominal {nominal:g}; {report.layers_under_half_rank} of {len(report.layers)} layers hold 90%"
        " of their energy in less than half their rank"
    )


def plot_spectrum(report: ModuleReport, path: str | Path) -> Path:
    """Write a PNG of every layer's singular values, each divided by its largest (log scale),
    one line per layer, coloured by layer kind. Returns the path written.

    Raises:
        ConfigError: the module has no low-rank layers, or ``path`` cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not report.layers:
        raise ConfigError(
            f"{report.label} is of kind {report.manifest.kind.value}: no low-rank layers, so no spectrum to plot"
            " (--plot is for lora, dora and adalora modules)"
        )
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--plot {target} is a folder; give a file name such as spectrum.png")
    if not target.parent.is_dir():
        raise ConfigError(f"--plot {target}: the folder {target.parent} does not exist")
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)  # rendered by Agg into the file: no display, no global backend
    axes = figure.add_subplot()
    kinds = sorted({_layer_kind(layer.layer) for layer in report.layers})
    colours = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    labelled: set[str] = set()
    zero = 0
    for layer in report.layers:
        top = layer.top_singular_value
        if top <= 0:
            zero += 1
            continue
        kind = _layer_kind(layer.layer)
        values = [max(v / top, _PLOT_FLOOR) for v in layer.singular_values]
        axes.semilogy(
            range(1, len(values) + 1),
            values,
            marker="o",
            markersize=3,
            alpha=0.7,
            color=colours[kind],
            label=None if kind in labelled else kind,
        )
        labelled.add(kind)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("k (singular value index)")
    axes.set_ylabel("singular value / largest")
    title = f"{report.label}: spectrum of each layer's delta ({len(report.layers)} layers)"
    if zero:
        title += f"; {zero} zero deltas not drawn"
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    if labelled:
        axes.legend(fontsize=7, loc="best")
    try:
        figure.savefig(target, format="png")
    except OSError as exc:
        raise ConfigError(f"--plot {target} cannot be written: {exc}") from None
    return target


__all__ = [
    "ENERGY_SHARES",
    "LINEAGE_DEPTH",
    "LOW_RANK_KINDS",
    "FileEntry",
    "LayerSpectrum",
    "LineageStep",
    "ModuleReport",
    "TensorEntry",
    "TensorGroup",
    "effective_rank",
    "inspect_module",
    "layer_table",
    "low_rank_singular_values",
    "plot_spectrum",
    "rank_summary",
    "summary_lines",
]
