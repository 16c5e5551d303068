"""The registry's state machine: which versions a module has, which are yanked or deleted, where
its aliases point and how they moved, as immutable values and pure functions over them.

Every store keeps the same state and changes it the same way; a store only reads and writes it
(``file://``: ``versions/`` plus ``state.json`` under a flock; ``hf://``: ``.tunehub/state.json``
committed with ``parent_commit``). The functions here do no I/O and take the actor and the time
as arguments, so a store can retry one on a fresher state and tests can call them alone.

The JSON read back is untrusted (another process, a damaged disk or the network wrote it):
:func:`parse_local_state` and :func:`parse_hub_state` refuse anything malformed with
:class:`~tunehub.errors.IntegrityError`, and their ``*_json`` counterparts write the very
formats the stores have always written, so existing registries keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from tunehub.errors import (
    AliasNotFound,
    Conflict,
    IntegrityError,
    InvalidReference,
    ModuleNotFound,
    VersionNotFound,
)
from tunehub.registry.files import check_relative_path, is_sha256
from tunehub.registry.manifest import MANIFEST_FILE
from tunehub.registry.refs import (
    LATEST,
    ModuleRef,
    parse_version,
    validate_alias,
    version_of_tag,
)
from tunehub.registry.signing import SignatureEntry, parse_signature_entry

HUB_STATE_SCHEMA = 1
_RECORD_TEXT_FIELDS = ("manifest_sha256", "kind", "created_at", "base_fingerprint", "base_model_id")
_MOVE_ACTIONS = ("promote", "rollback")
MAX_SIGNATURES = 16  # per version: bounds the state a hostile writer can make readers parse


# --- values --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AliasMove:
    """One recorded move of an alias: who moved it, when, from which version to which."""

    alias: str
    action: str  # "promote" | "rollback"
    from_version: int | None
    to_version: int
    by: str
    at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Yank:
    """Why, by whom and when a version was hidden from resolution."""

    reason: str = ""
    by: str = "unknown"
    at: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class VersionRecord:
    """What a push recorded about one version: its files (path -> sha256) and what it is."""

    version: int
    manifest_sha256: str
    files: tuple[tuple[str, str], ...]
    kind: str
    created_at: str
    base_fingerprint: str
    base_model_id: str
    pushed_by: str = "unknown"
    task: str | None = None
    objective: str | None = None
    parent: str | None = None
    size_bytes: int = 0

    @property
    def file_digests(self) -> dict[str, str]:
        """Relative path -> sha256 of every file of the version (the manifest included)."""
        return dict(self.files)

    def to_json(self) -> dict[str, Any]:
        """The record as the stores write it (a ``versions/<N>.json`` file, a Hub state entry)."""
        data = asdict(self)
        data["files"] = dict(self.files)
        return data


@dataclass(frozen=True)
class VersionEntry:
    """One version number of a module: live or deleted (numbers are never reused), maybe yanked.

    ``record`` is set where the state itself holds the records (``hf://``); the ``file://`` store
    keeps each record in its own file, and a deleted version has none."""

    number: int
    deleted: bool = False
    yank: Yank | None = None
    record: VersionRecord | None = None
    signatures: tuple[SignatureEntry, ...] = ()  # by key id; a deleted version has none


@dataclass(frozen=True)
class RegistryState:
    """The whole registry state of one module. Immutable: every change returns a new one."""

    versions: tuple[VersionEntry, ...] = ()  # by number
    aliases: tuple[tuple[str, int], ...] = ()  # by alias name
    history: tuple[AliasMove, ...] = ()  # oldest first

    @property
    def live(self) -> set[int]:
        return {e.number for e in self.versions if not e.deleted}

    @property
    def deleted(self) -> set[int]:
        return {e.number for e in self.versions if e.deleted}

    @property
    def yanked(self) -> dict[int, Yank]:
        return {e.number: e.yank for e in self.versions if e.yank is not None and not e.deleted}

    @property
    def usable(self) -> set[int]:
        """Live versions that are not yanked: what ``latest`` and rollbacks may pick."""
        return {e.number for e in self.versions if not e.deleted and e.yank is None}

    @property
    def alias_map(self) -> dict[str, int]:
        return dict(self.aliases)

    def entry(self, version: int) -> VersionEntry | None:
        return next((e for e in self.versions if e.number == version), None)

    def record(self, version: int) -> VersionRecord:
        """The record of a live version held in the state (``hf://``), else ``VersionNotFound``."""
        entry = self.entry(version)
        if entry is None or entry.deleted or entry.record is None:
            raise VersionNotFound(f"version {version} does not exist")
        return entry.record

    def records(self) -> list[VersionRecord]:
        return [e.record for e in self.versions if e.record is not None and not e.deleted]

    def signatures_of(self, version: int) -> tuple[SignatureEntry, ...]:
        entry = self.entry(version)
        return () if entry is None or entry.deleted else entry.signatures

    def aliases_of(self, version: int) -> tuple[str, ...]:
        return tuple(sorted(a for a, v in self.aliases if v == version))

    def latest_usable(self) -> int | None:
        """The version ``latest`` means: the newest live one that is not yanked (None if none)."""
        return max(self.usable, default=None)

    def _with_versions(self, entries: Iterable[VersionEntry]) -> RegistryState:
        return replace(self, versions=tuple(sorted(entries, key=lambda e: e.number)))

    def _with_aliases(self, aliases: Mapping[str, int]) -> RegistryState:
        return replace(self, aliases=tuple(sorted(aliases.items())))


def state_of(
    live: Iterable[int],
    deleted: Iterable[int] = (),
    *,
    aliases: Mapping[str, int] | None = None,
    yanked: Mapping[int, Yank] | None = None,
    history: Iterable[AliasMove] = (),
    records: Mapping[int, VersionRecord] | None = None,
    signatures: Mapping[int, tuple[SignatureEntry, ...]] | None = None,
) -> RegistryState:
    """Build a state from its parts (a version both live and deleted counts as deleted)."""
    gone = set(deleted)
    yanks, held, signed = dict(yanked or {}), dict(records or {}), dict(signatures or {})
    entries = [VersionEntry(n, deleted=True) for n in gone]
    entries += [VersionEntry(n, yank=yanks.get(n), record=held.get(n), signatures=signed.get(n, ())) for n in set(live) - gone]
    return RegistryState(history=tuple(history))._with_versions(entries)._with_aliases(dict(aliases or {}))


# --- pure operations -----------------------------------------------------------------------------
def require_module(state: RegistryState, label: str, uri: str) -> None:
    """Raise ``ModuleNotFound`` ("no module LABEL in URI") when the module has no live version."""
    if not state.live:
        hint = " (every version was deleted)" if state.deleted else ""
        raise ModuleNotFound(f"no module {label} in {uri}{hint}")


def resolve(state: RegistryState, ref: ModuleRef, repo: str, tags: Mapping[str, str] | None = None) -> int:
    """The version ``ref`` points to: its number, an alias's target, or ``latest``.

    ``repo`` names the module in messages. ``tags`` (tag -> commit, ``hf://`` only) lets
    ``name@<commit sha>`` resolve through the ``v<N>`` tag that points at that commit; without
    it a commit id is looked up as an alias. Raises ``VersionNotFound`` (no such, deleted or
    yanked version, or nothing left for ``latest``) and ``AliasNotFound``."""
    live, yanked = state.live, state.yanked
    if tags is not None and ref.commit is not None:
        numbers = [n for t, c in tags.items() if c == ref.commit and (n := version_of_tag(t)) is not None]
        if not numbers:
            raise VersionNotFound(f"commit {ref.commit[:12]} is not a version of {repo} (no v<N> tag points to it)")
        version = numbers[0]
        if version not in live:
            raise VersionNotFound(f"{repo}@{version} (commit {ref.commit[:12]}) was deleted")
    elif ref.version is not None:
        version = ref.version
        if version in state.deleted:
            raise VersionNotFound(f"{repo}@{version} was deleted")
        if version not in live:
            latest = f" (latest is {max(live)})" if live else ""
            raise VersionNotFound(f"{repo} has no version {version}{latest}")
    elif ref.alias is not None and ref.alias != LATEST:
        aliases = state.alias_map
        if ref.alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise AliasNotFound(f"{repo} has no alias {ref.alias!r} (aliases: {known})")
        version = aliases[ref.alias]
        if version not in live:
            raise VersionNotFound(f"{repo}@{ref.alias} points to version {version}, which was deleted")
    else:
        latest_version = state.latest_usable()
        if latest_version is None:
            raise VersionNotFound(f"{repo} has no version that is not yanked")
        return latest_version
    if version in yanked:
        reason = yanked[version].reason or "no reason given"
        raise VersionNotFound(f"{repo}@{version} is yanked ({reason})")
    return version


def check_movable_alias(alias: str) -> str:
    """``alias`` if an alias of that name may be promoted: a valid alias name, not ``latest``.

    Raises ``InvalidReference`` for a bad name and ``Conflict`` for ``latest``."""
    validate_alias(alias)
    if alias == LATEST:
        raise Conflict("'latest' is implicit (the newest version that is not yanked) and cannot be moved")
    return alias


def promote(
    state: RegistryState,
    ref: ModuleRef,
    alias: str,
    repo: str,
    *,
    by: str,
    at: str,
    tags: Mapping[str, str] | None = None,
) -> tuple[RegistryState, AliasMove]:
    """Point ``alias`` at the version ``ref`` resolves to; returns the new state and the move.

    Raises what :func:`check_movable_alias` and :func:`resolve` raise."""
    check_movable_alias(alias)
    version = resolve(state, ref, repo, tags)
    aliases = state.alias_map
    move = AliasMove(alias=alias, action="promote", from_version=aliases.get(alias), to_version=version, by=by, at=at)
    aliases[alias] = version
    return replace(state._with_aliases(aliases), history=state.history + (move,)), move


def target_stack(history: Iterable[AliasMove], alias: str) -> list[int]:
    """Replay an alias's moves: a promote pushes its target, a rollback pops one."""
    stack: list[int] = []
    for move in history:
        if move.alias != alias:
            continue
        if move.action == "rollback":
            # pop back to the target the rollback chose (skipped dead versions go with it)
            if stack:
                stack.pop()
            while stack and stack[-1] != move.to_version:
                stack.pop()
            if not stack:
                stack.append(move.to_version)
        else:
            stack.append(move.to_version)
    return stack


def rollback_target(history: Iterable[AliasMove], alias: str, live: set[int]) -> tuple[int, int]:
    """(current, previous) targets for a rollback, skipping versions not in ``live``.

    Raises ``Conflict`` when the alias was never set or has no earlier usable target."""
    stack = target_stack(history, alias)
    if not stack:
        raise Conflict(f"alias {alias!r} has never been set")
    current = stack[-1]
    for previous in reversed(stack[:-1]):
        if previous in live and previous != current:
            return current, previous
    raise Conflict(f"alias {alias!r} has no earlier target to roll back to (it points to {current})")


def rollback(state: RegistryState, alias: str, repo: str, *, by: str, at: str) -> tuple[RegistryState, AliasMove]:
    """Point ``alias`` back at its previous target that is still live and not yanked.

    Raises ``AliasNotFound`` for an alias the module does not have, ``Conflict`` when there is
    nothing to roll back to."""
    aliases = state.alias_map
    if alias not in aliases:
        raise AliasNotFound(f"{repo} has no alias {alias!r}")
    _, previous = rollback_target(state.history, alias, state.usable)
    move = AliasMove(alias=alias, action="rollback", from_version=aliases[alias], to_version=previous, by=by, at=at)
    aliases[alias] = previous
    return replace(state._with_aliases(aliases), history=state.history + (move,)), move


def yank(state: RegistryState, version: int, repo: str, reason: str = "", *, by: str, at: str) -> tuple[RegistryState, Yank]:
    """Hide live ``version`` from resolution (its record stays); ``VersionNotFound`` otherwise."""
    if version not in state.live:
        raise VersionNotFound(f"{repo} has no version {version}")
    mark = Yank(reason=reason, by=by, at=at)
    entries = [replace(e, yank=mark) if e.number == version else e for e in state.versions]
    return state._with_versions(entries), mark


def delete(state: RegistryState, version: int | None, repo: str, *, force: bool = False) -> tuple[RegistryState, list[int]]:
    """Delete one live version, or every live version when ``version`` is None.

    The numbers become deleted entries (never handed out again) and lose their record and yank.
    Aliases pointing at them are refused with ``Conflict`` unless ``force``, which removes those
    aliases. Raises ``VersionNotFound`` for a version that is not live. Returns the new state and
    the versions deleted, in order."""
    live = state.live
    targets = sorted(live) if version is None else [version]
    if version is not None and version not in live:
        raise VersionNotFound(f"{repo} has no version {version}")
    pinned = {a: v for a, v in state.aliases if v in targets}
    if pinned and not force:
        names = ", ".join(f"{a} -> {v}" for a, v in sorted(pinned.items()))
        raise Conflict(f"aliases point to what would be deleted ({names}); move them first or use --force")
    gone = set(targets)
    entries = [VersionEntry(e.number, deleted=True) if e.number in gone else e for e in state.versions]
    aliases = {a: v for a, v in state.aliases if a not in pinned}
    return state._with_versions(entries)._with_aliases(aliases), targets


def add_signature(state: RegistryState, version: int, signature: SignatureEntry, repo: str) -> RegistryState:
    """The state with ``signature`` beside live ``version`` (yanked included). A new signature by
    the same key replaces the old one; ``VersionNotFound`` for a version that is not live,
    ``Conflict`` past :data:`MAX_SIGNATURES` keys."""
    entry = state.entry(version)
    if entry is None or entry.deleted:
        raise VersionNotFound(f"{repo} has no version {version}")
    others = tuple(s for s in entry.signatures if s.key_id != signature.key_id)
    if len(others) >= MAX_SIGNATURES:
        raise Conflict(f"{repo}@{version} already carries {MAX_SIGNATURES} signatures by other keys")
    signed = replace(entry, signatures=(*others, signature))
    return state._with_versions([signed if e.number == version else e for e in state.versions])


def next_version(state: RegistryState, taken: Iterable[int] = ()) -> int:
    """The number the next push gets: one above every number ever used (live, deleted, ``taken``)."""
    return max({e.number for e in state.versions} | set(taken), default=0) + 1


def add_version(state: RegistryState, record: VersionRecord) -> RegistryState:
    """The state with ``record`` as a new live version (``Conflict`` if its number was used)."""
    if state.entry(record.version) is not None:
        raise Conflict(f"version {record.version} is already taken")
    return state._with_versions([*state.versions, VersionEntry(record.version, record=record)])


# --- JSON in and out -----------------------------------------------------------------------------
class _Malformed(ValueError):
    """Why a piece of state JSON cannot be trusted (turned into an IntegrityError by the caller)."""


def record_problem(raw: object, version: int, *, reserved_prefix: str | None = None) -> str | None:
    """Why a version record read back cannot be trusted, or None.

    Its file paths decide where pull writes and its digests which blobs are read, so both are
    checked strictly; ``reserved_prefix`` is a path prefix no module file may use."""
    if not isinstance(raw, dict) or raw.get("version") != version:
        return "not a record of this version"
    files = raw.get("files")
    if not isinstance(files, dict) or MANIFEST_FILE not in files:
        return "it lists no files"
    for path, digest in files.items():
        try:
            check_relative_path(path)
        except ValueError as exc:
            return f"unsafe file path: {exc}"
        if reserved_prefix and path.startswith(reserved_prefix):
            return f"unsafe file path: {path!r} is reserved"
        if not is_sha256(digest):
            return f"the digest of {path!r} is not a sha256"
    for name in _RECORD_TEXT_FIELDS:
        if not isinstance(raw.get(name), str):
            return f"no {name}"
    if raw["manifest_sha256"] != files[MANIFEST_FILE]:
        return "manifest_sha256 disagrees with the file list"
    for name in ("pushed_by", "task", "objective", "parent"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            return f"{name} is not a string"
    size = raw.get("size_bytes", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "size_bytes is not a size"
    return None


def parse_record(raw: object, version: int, *, reserved_prefix: str | None = None) -> VersionRecord:
    """A :class:`VersionRecord` from its JSON; ``ValueError`` naming the problem if untrustworthy."""
    problem = record_problem(raw, version, reserved_prefix=reserved_prefix)
    if problem:
        raise ValueError(problem)
    assert isinstance(raw, dict)  # record_problem checked it
    return VersionRecord(
        version=version,
        manifest_sha256=raw["manifest_sha256"],
        files=tuple(sorted(raw["files"].items())),
        kind=raw["kind"],
        created_at=raw["created_at"],
        base_fingerprint=raw["base_fingerprint"],
        base_model_id=raw["base_model_id"],
        pushed_by=raw.get("pushed_by") or "unknown",
        task=raw.get("task"),
        objective=raw.get("objective"),
        parent=raw.get("parent"),
        size_bytes=raw.get("size_bytes", 0),
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_aliases(raw: object) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise _Malformed("aliases must be an object")
    for alias, version in raw.items():
        if not _is_number(version):
            raise _Malformed(f"alias {alias!r} does not name a version number")
    return dict(raw)


def _parse_history(raw: object) -> list[AliasMove]:
    if not isinstance(raw, list):
        raise _Malformed("history must be a list")
    moves = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != set(AliasMove.__dataclass_fields__):
            raise _Malformed("the alias history is malformed")
        move = AliasMove(**item)
        if (
            not isinstance(move.alias, str)
            or move.action not in _MOVE_ACTIONS
            or not _is_number(move.to_version)
            or not (move.from_version is None or _is_number(move.from_version))
            or not isinstance(move.by, str)
            or not isinstance(move.at, str)
        ):
            raise _Malformed("the alias history is malformed")
        moves.append(move)
    return moves


def _parse_yanked(raw: object) -> dict[int, Yank]:
    if not isinstance(raw, dict):
        raise _Malformed("yanked must be an object")
    yanks: dict[int, Yank] = {}
    for key, mark in raw.items():
        try:
            number = parse_version(key)
        except InvalidReference:
            raise _Malformed(f"yank of {key!r} names no version") from None
        if not isinstance(mark, dict):
            raise _Malformed(f"yank of version {key} is not an object")
        fields: dict[str, str] = {}
        for name in ("reason", "by", "at"):
            value = mark.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise _Malformed(f"yank of version {key} is malformed")
            fields[name] = value
        yanks[number] = Yank(**fields)
    return yanks


def _parse_signatures(raw: object, where: str) -> dict[int, tuple[SignatureEntry, ...]]:
    if not isinstance(raw, dict):
        raise _Malformed("signatures must be an object")
    signed: dict[int, tuple[SignatureEntry, ...]] = {}
    for key, entries in raw.items():
        try:
            number = parse_version(key)
        except InvalidReference:
            raise _Malformed(f"signatures of {key!r} name no version") from None
        if not isinstance(entries, list) or len(entries) > MAX_SIGNATURES:
            raise _Malformed(f"signatures of version {key} must be a list of at most {MAX_SIGNATURES}")
        try:
            parsed = tuple(parse_signature_entry(e, f"{where}, signatures of version {key}") for e in entries)
        except IntegrityError as exc:
            raise _Malformed(str(exc)) from None
        if len({e.key_id for e in parsed}) != len(parsed):
            raise _Malformed(f"signatures of version {key} name one key twice")
        signed[number] = parsed
    return signed


def parse_local_state(raw: object, live: Iterable[int], deleted: Iterable[int], where: str) -> RegistryState:
    """The state of a ``file://`` module: version numbers from its ``versions/`` folder, the rest
    from its ``state.json`` (``raw``: the parsed JSON, None when the file does not exist yet).

    Raises ``IntegrityError`` naming ``where`` when the JSON is malformed."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise IntegrityError(f"{where} is corrupt")
    try:
        aliases = _parse_aliases(raw.get("aliases", {}))
        history = _parse_history(raw.get("history", []))
        yanked = _parse_yanked(raw.get("yanked", {}))
        signatures = _parse_signatures(raw.get("signatures", {}), where)
    except _Malformed as exc:
        raise IntegrityError(f"{where} is corrupt: malformed aliases, history, yanks or signatures ({exc})") from None
    return state_of(live, deleted, aliases=aliases, yanked=yanked, history=history, signatures=signatures)


def local_state_json(state: RegistryState) -> dict[str, Any]:
    """What ``state.json`` of a ``file://`` module holds (the version numbers live in files).
    ``signatures`` is written only when a version has one, so unsigned registries keep the
    format older tunehubs wrote."""
    data: dict[str, Any] = {
        "aliases": state.alias_map,
        "history": [move.to_dict() for move in state.history],
        "yanked": {str(n): mark.to_dict() for n, mark in sorted(state.yanked.items())},
    }
    signed = {str(e.number): [s.to_dict() for s in e.signatures] for e in state.versions if e.signatures and not e.deleted}
    if signed:
        data["signatures"] = signed
    return data


def parse_hub_state(raw: object, repo_id: str) -> RegistryState:
    """The state of an ``hf://`` module from its ``.tunehub/state.json`` (parsed JSON).

    It comes from the network and decides which paths get written, so anything malformed raises
    ``IntegrityError`` ("the tunehub state of REPO on the hub is corrupt: ...")."""

    def corrupt(why: str) -> IntegrityError:
        return IntegrityError(f"the tunehub state of {repo_id} on the hub is corrupt: {why}")

    if not isinstance(raw, dict):
        raise corrupt("not a JSON object")
    if raw.get("schema") != HUB_STATE_SCHEMA:
        raise corrupt(f"schema {raw.get('schema')!r} is not {HUB_STATE_SCHEMA} (upgrade tunehub?)")
    versions, deleted = raw.get("versions", {}), raw.get("deleted", [])
    if not isinstance(versions, dict):
        raise corrupt("versions and aliases must be objects")
    if not isinstance(deleted, list) or not all(_is_number(v) for v in deleted):
        raise corrupt("deleted must be a list of version numbers")
    records: dict[int, VersionRecord] = {}
    for key, record in versions.items():
        try:
            number = parse_version(key)
        except InvalidReference:
            raise corrupt(f"version record {key!r} is malformed") from None
        if not isinstance(record, dict) or record.get("version") != number:
            raise corrupt(f"version record {key!r} is malformed")
        try:
            records[number] = parse_record(record, number, reserved_prefix=".tunehub/")
        except ValueError as exc:
            raise corrupt(f"version {key}: {exc}") from None
    try:
        aliases = _parse_aliases(raw.get("aliases", {}))
        history = _parse_history(raw.get("history", []))
        yanked = _parse_yanked(raw.get("yanked", {}))
        signatures = _parse_signatures(raw.get("signatures", {}), f"the tunehub state of {repo_id}")
    except _Malformed as exc:
        raise corrupt(str(exc)) from None
    return state_of(records, deleted, aliases=aliases, yanked=yanked, history=history, records=records, signatures=signatures)


def hub_state_json(state: RegistryState, repo_id: str, last: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``.tunehub/state.json`` of an ``hf://`` module holds; ``last`` says what changed it."""
    return {
        "schema": HUB_STATE_SCHEMA,
        "module": repo_id,
        "versions": {str(r.version): r.to_json() for r in state.records()},
        "deleted": sorted(state.deleted),
        **local_state_json(state),
        "last": dict(last) if last is not None else None,
    }


__all__ = [
    "AliasMove",
    "RegistryState",
    "VersionEntry",
    "VersionRecord",
    "Yank",
    "add_signature",
    "add_version",
    "check_movable_alias",
    "delete",
    "hub_state_json",
    "local_state_json",
    "next_version",
    "parse_hub_state",
    "parse_local_state",
    "parse_record",
    "promote",
    "record_problem",
    "require_module",
    "resolve",
    "rollback",
    "rollback_target",
    "state_of",
    "target_stack",
    "yank",
]
