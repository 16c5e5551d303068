"""Several modules applied together in one row: per-request compositions and chains.

A request may name several modules of the server's base (``module="acme/legal-dapt+acme/summarize"``,
or ``modules=[("acme/a", 0.7), ("acme/b", 0.3)]``), and a module trained on top of another
(``manifest.parent``, a chain) brings its ancestors with it. Either way the row applies a list of
(module, weight) in order: the named modules as named, a chained module first and then its
ancestors root first (the order its training ran the adapters in). Each kind group combines its own members
(:meth:`~tunehub.server.engine.kinds.ServedKind.combine`): low-rank deltas side by side, IA3
vectors multiplied, selective vectors added; one module that adds virtual tokens at most.
The result, a :class:`Composition`, is planned like any module: rows with different
compositions share one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tunehub.errors import InvalidRequest, UnsupportedModule
from tunehub.server.engine import kinds
from tunehub.server.engine.modules import LoadedModule

#: the most modules a request may name (chains add their ancestors to it)
MAX_PARTS = 8
#: the largest weight, in absolute value, a part may take
MAX_WEIGHT = 10.0
#: the longest parent chain followed
MAX_CHAIN = 32

ModuleParts = list[tuple[str, float]]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def request_parts(module: Any, modules: Any) -> ModuleParts:
    """The (reference, weight) pairs a request names: ``module`` (one reference, or several
    joined by ``+``, each at weight 1) or ``modules`` (references, or (reference, weight)
    pairs); [] for the base alone. Raises InvalidRequest for both at once, an empty part, more
    than :data:`MAX_PARTS` parts, or a weight that is not a finite number within
    +-:data:`MAX_WEIGHT`."""
    if module is not None and modules is not None:
        raise InvalidRequest("name the modules once: module (a reference, parts joined by '+') or modules (a list), not both")
    parts: ModuleParts = []
    if module is not None:
        if not isinstance(module, str):
            raise InvalidRequest(f"module must be a module reference (a string), got {type(module).__name__}")
        if not module:
            return []
        pieces = module.split("+")
        if any(not piece.strip() for piece in pieces):
            raise InvalidRequest(f"module {module!r} has an empty part: join references with '+' (a+b)")
        parts = [(piece.strip(), 1.0) for piece in pieces]
    elif modules is not None:
        if isinstance(modules, (str, bytes)) or not isinstance(modules, Sequence):
            raise InvalidRequest("modules must be a list of references or (reference, weight) pairs")
        for item in modules:
            ref, weight = (item, 1.0) if isinstance(item, str) else _pair(item)
            if not ref:
                raise InvalidRequest("modules has an empty reference")
            parts.append((ref, weight))
    if len(parts) > MAX_PARTS:
        raise InvalidRequest(f"a request may compose at most {MAX_PARTS} modules, got {len(parts)}")
    return parts


def _pair(item: Any) -> tuple[str, float]:
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
        raise InvalidRequest(f"modules entries must be a reference or a (reference, weight) pair, got {item!r}")
    ref, weight = item
    if not _is_real(weight) or abs(weight) > MAX_WEIGHT:
        raise InvalidRequest(
            f"the weight of {ref} must be a finite number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, got {weight!r}"
        )
    return ref, float(weight)


def composition_key(members: Sequence[tuple[LoadedModule, float]]) -> str:
    """'a@1+b@2' (weights other than 1 as 'b@2*0.3'): what answered, as responses report it."""
    return "+".join(module.key if weight == 1.0 else f"{module.key}*{weight:g}" for module, weight in members)


class Composition:
    """Modules applied together in one row (see the module docstring); planned as one module."""

    def __init__(self, members: list[tuple[LoadedModule, float]], uid: int, key: str | None = None):
        self.members = members
        self.uid = uid
        self.key = key or composition_key(members)
        name = self.key
        vocabularies = [(m, w) for m, w in members if m.vocab is not None]
        if len(vocabularies) > 1:
            raise UnsupportedModule(
                f"{name}: {', '.join(m.key for m, _ in vocabularies)} each bring a tokenizer; a composition takes one"
            )
        if vocabularies and vocabularies[0][1] != 1.0:
            module, weight = vocabularies[0]
            raise UnsupportedModule(f"{name}: {module.key} brings a tokenizer and takes no weight: it must be 1, not {weight:g}")
        #: the vocabulary of the one tokenizer module among the members, if any
        self.vocab = vocabularies[0][0].vocab if vocabularies else None
        by_group: dict[int, tuple[kinds.ServedKind, list[tuple[LoadedModule, float]]]] = {}
        for module, weight in members:
            if module.served is None:
                raise UnsupportedModule(kinds.refusal(module.kind, module.key))
            by_group.setdefault(id(module.served), (module.served, []))[1].append((module, weight))
        # groups in the order their parts apply at a layer (kinds.groups())
        order = {id(group): i for i, group in enumerate(kinds.groups())}
        self.group_layers: list[tuple[kinds.ServedKind, dict[str, Any]]] = [
            (group, group.combine(group_members, name))
            for group, group_members in sorted(by_group.values(), key=lambda item: order.get(id(item[0]), len(order)))
        ]
        virtual = [m for m, _ in members if m.num_virtual_tokens]
        if len(virtual) > 1:
            raise UnsupportedModule(
                f"{name}: {', '.join(m.key for m in virtual)} each add virtual tokens; a composition takes one such module"
                " (prompt, P-tuning, multitask prompt or prefix)"
            )
        self._virtual = virtual[0] if virtual else None

    def virtual_embeddings(self) -> Any:
        return None if self._virtual is None else self._virtual.virtual_embeddings()

    def cache_prefix(self) -> list[tuple[Any, Any]] | None:
        return None if self._virtual is None else self._virtual.cache_prefix()

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self._virtual is None else self._virtual.num_virtual_tokens

    def __contains__(self, module: LoadedModule) -> bool:
        return any(m is module for m, _ in self.members)


__all__ = ["MAX_CHAIN", "MAX_PARTS", "MAX_WEIGHT", "Composition", "ModuleParts", "composition_key", "request_parts"]
