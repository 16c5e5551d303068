"""Module kinds the engine serves, one file per group. A group's file defines a
:class:`ServedKind` and calls :func:`register_kind`; :func:`discover` imports every file here,
so adding a kind is adding a file (the engine core names no kind).

A group says, for its :class:`~tunehub.registry.manifest.ModuleKind` values:

- ``materialize``: how a verified module's tensors become what the engine keeps (a
  :class:`~tunehub.server.engine.modules.LoadedModule`'s per-layer ``layers`` and its ``data``),
  with the group's validation; the materialiser has already refused non-finite weights;
- ``plan_layer``: what the group contributes, at one linear layer, to a mixed batch's plan: a
  part whose ``before(x)`` / ``after(layer, x, y)`` the patched layer calls around the base
  (see :class:`~tunehub.server.engine.layers.LayerPlan`); built once per batch composition;
- ``virtual_embeddings`` / ``cache_prefix``: the prefill hooks, embeddings prepended to a row's
  tokens and per-layer key/value prefixes that a row's tokens attend to.

A kind no group registers is refused with :class:`~tunehub.server.engine.modules.UnsupportedModule`
and the message :func:`refusal` writes (the one place that says what to do instead).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import threading
from typing import TYPE_CHECKING, Any

from tunehub.registry.manifest import Manifest, ModuleKind

if TYPE_CHECKING:
    import torch

    from tunehub.server.engine.modules import LoadedModule, ModuleMaterializer


class ServedKind:
    """One group of kinds the engine serves. Subclass it, set ``name`` and ``kinds``, override
    ``materialize`` and whichever hooks the group uses (the defaults contribute nothing)."""

    name: str = ""
    kinds: tuple[ModuleKind, ...] = ()
    #: when only some modules of the group's kinds can be mixed, which (e.g. "biases, norms only")
    mixes_only: str = ""
    #: where the group's part applies at a layer among the others' (lower first; registration
    #: order breaks ties): it decides what a row composing several groups' modules computes
    order: int = 0
    #: files of the module the group reads besides ``adapter_model.safetensors`` (see
    #: ``materialize_files``)
    reads: tuple[str, ...] = ()

    def materialize(self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str) -> None:
        """Fill ``loaded.layers`` (layer name -> this group's delta) and/or ``loaded.data`` from
        ``weights`` (finite tensors of the verified module ``name``).

        Raises UnsupportedModule, IncompatibleBase, InvalidModuleWeights or IntegrityError naming
        the module; any other error torch raises on the tensors becomes InvalidModuleWeights."""
        raise NotImplementedError

    def materialize_files(
        self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], files: dict[str, Any], name: str
    ) -> None:
        """As :meth:`materialize`, for a group that reads more files (``reads``): ``files`` maps
        each of them the module has to its verified bytes. The default ignores them."""
        self.materialize(materializer, loaded, weights, name)

    def plan_layer(self, deltas: list[Any], layer: Any, shared: bool, device: Any, dtype: Any) -> Any | None:
        """This group's part of one layer's plan, or None. ``layer``: the patched layer, an
        :class:`~tunehub.server.engine.layers.AdaptedLinear` (or an ``AdaptedNorm``, for a group
        whose modules name normalisation layers). ``deltas[i]``: row i's delta at this
        layer when row i's module is of this group, else None (at least one is not None).
        ``shared``: every row of the batch uses one module. The part has ``before`` and/or
        ``after`` callables (None when unused)."""
        return None

    def combine(self, members: list[tuple[LoadedModule, float]], name: str) -> dict[str, Any]:
        """Per-layer deltas (as in ``LoadedModule.layers``) that apply ``members`` (modules of this
        group, each with its weight) together in one row: a composition or a chain (``name``
        names it in errors). The default takes one module at weight 1 and refuses the rest with
        UnsupportedModule; groups whose deltas add up override it."""
        from tunehub.errors import UnsupportedModule

        if len(members) > 1:
            raise UnsupportedModule(
                f"{name}: {len(members)} modules of the {self.name} group cannot be applied together; a composition takes one"
            )
        module, weight = members[0]
        if weight != 1.0:
            raise UnsupportedModule(f"{name}: {module.key} ({module.kind.value}) takes no weight: it must be 1, not {weight:g}")
        return module.layers

    def virtual_embeddings(self, module: LoadedModule) -> torch.Tensor | None:
        """(n, hidden) embeddings prefilled before the row's own tokens, or None."""
        return None

    def cache_prefix(self, module: LoadedModule) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per decoder layer (keys, values) of shape (kv_heads, n, head_dim) that the row's tokens
        attend to as if already in the cache (its tokens start at position n), or None."""
        return None


#: kinds no group serves yet, and what to do with such a module instead (the one place)
NOT_SERVABLE: dict[ModuleKind, str] = {
    ModuleKind.FULL: "it is a whole model: serve it as the base (tunehub serve --base REF)",
    ModuleKind.TEMPLATE: "a template is applied to the prompt by tunehub serve (model=TEMPLATE_REF with the slot values),"
    " not by the engine",
}

_GROUPS: dict[str, ServedKind] = {}
_BY_KIND: dict[ModuleKind, ServedKind] = {}
_LOCK = threading.Lock()  # registration may race the engine thread's look-ups in tests
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_discovered = False


def register_kind(group: ServedKind) -> ServedKind:
    """Add ``group`` for its kinds (order of registration is the order in which groups apply at
    a layer). Raises ValueError for a bad name or a kind another group already serves."""
    if not _NAME.fullmatch(group.name or ""):
        raise ValueError(f"kind group name {group.name!r} must be lowercase letters, digits and '_'")
    with _LOCK:
        if group.name in _GROUPS and _GROUPS[group.name] is not group:
            raise ValueError(f"kind group {group.name!r} is registered twice")
        for kind in group.kinds:
            owner = _BY_KIND.get(kind)
            if owner is not None and owner is not group:
                raise ValueError(f"kind {kind.value} is already served by group {owner.name!r}")
        _GROUPS[group.name] = group
        for kind in group.kinds:
            _BY_KIND[kind] = group
    return group


def unregister_kind(group: ServedKind) -> None:
    """Remove ``group`` (tests that register a kind of their own)."""
    with _LOCK:
        if _GROUPS.get(group.name) is group:
            del _GROUPS[group.name]
        for kind in [k for k, g in _BY_KIND.items() if g is group]:
            del _BY_KIND[kind]


def discover() -> None:
    """Import every group file under this package (each registers itself), once."""
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def served_kind(kind: ModuleKind) -> ServedKind | None:
    """The group that serves ``kind``, or None when the engine cannot serve it."""
    discover()
    return _BY_KIND.get(kind)


def groups() -> list[ServedKind]:
    """The registered groups in the order their parts apply at a layer: by ``order``, then
    registration."""
    discover()
    with _LOCK:
        registered = list(_GROUPS.values())
    return sorted(registered, key=lambda group: group.order)  # stable: registration breaks ties


def stacked_row_vectors(deltas: list[Any], attr: str, width: int, device: Any, dtype: Any) -> Any:
    """A (rows, 1, width) tensor of each row's ``attr`` vector (ones where a row has none), or
    None when no row has one: how per-row scales and gains enter a batched plan."""
    import torch

    if not any(d is not None and getattr(d, attr) is not None for d in deltas):
        return None
    stacked = torch.ones(len(deltas), 1, width)
    for i, delta in enumerate(deltas):
        vector = getattr(delta, attr) if delta is not None else None
        if vector is not None:
            stacked[i, 0] = vector
    return stacked.to(device=device, dtype=dtype)


def combine_vectors(members: list[tuple[LoadedModule, float]], make: Any, attrs: tuple[str, ...], fold: Any) -> dict[str, Any]:
    """Per layer, one ``make()`` delta whose ``attrs`` fold every member's vector in turn:
    ``fold(so_far or None, vector, weight)``; how vector kinds (IA3, selective) compose."""
    combined: dict[str, Any] = {}
    for module, weight in members:
        for layer, delta in module.layers.items():
            entry = combined.setdefault(layer, make())
            for attr in attrs:
                vector = getattr(delta, attr)
                if vector is not None:
                    setattr(entry, attr, fold(getattr(entry, attr), vector, weight))
    return combined


def carries_tokenizer(manifest: Manifest) -> bool:
    """Whether ``manifest``'s module (or one of its components) brings its own tokenizer, so the
    base's tokenizer fingerprint need not match the one it was trained with."""
    return manifest.kind is ModuleKind.TOKENIZER or any(part.kind is ModuleKind.TOKENIZER for part in manifest.components)


def refusal(kind: ModuleKind, name: str) -> str:
    """The message refusing module ``name`` of an unservable ``kind``."""
    message = f"{name}: modules of kind {kind.value} cannot be served in mixed batches yet"
    instead = NOT_SERVABLE.get(kind)
    return f"{message}; {instead}" if instead else message


__all__ = [
    "NOT_SERVABLE",
    "ServedKind",
    "carries_tokenizer",
    "combine_vectors",
    "discover",
    "groups",
    "refusal",
    "register_kind",
    "served_kind",
    "unregister_kind",
]
