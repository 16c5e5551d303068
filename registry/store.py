"""The one registry interface. ``file://`` is the embedded default; ``hf://`` shares on the Hub."""

from __future__ import annotations

import builtins
import getpass
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tunehub.errors import (
    ConfigError,
    Conflict,
    IncompatibleBase,
    IntegrityError,
    InvalidReference,
    ModuleNotFound,
    VersionNotFound,
)
from tunehub.registry.manifest import MANIFEST_FILE, Manifest, ModuleKind
from tunehub.registry.module import (
    LocalModule,
    ModuleContent,
    check_content,
    read_verified,
)
from tunehub.registry.refs import ModuleRef, parse_ref
from tunehub.registry.signing import Provenance, SignatureEntry, Signer, TrustPolicy

# AliasMove and the rollback helpers live with the state machine; they stay importable from here
from tunehub.registry.state import AliasMove as AliasMove
from tunehub.registry.state import RegistryState, VersionRecord
from tunehub.registry.state import rollback_target as rollback_target
from tunehub.registry.state import target_stack as target_stack


@dataclass(frozen=True)
class VersionInfo:
    """One immutable version of a module, as the registry recorded it."""

    repo: str
    version: int
    manifest_sha256: str
    kind: str
    created_at: str
    pushed_by: str
    base_fingerprint: str
    base_model_id: str
    task: str | None = None
    objective: str | None = None
    parent: str | None = None
    size_bytes: int = 0
    yanked: bool = False
    yank_reason: str | None = None
    aliases: tuple[str, ...] = ()
    commit: str | None = None  # the Hub commit sha, for hf:// stores
    #: every file of the version with its sha256, manifest.json included: what a signature covers
    files: tuple[tuple[str, str], ...] = ()
    signatures: tuple[SignatureEntry, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.repo}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        data["ref"] = self.ref
        del data["files"]  # the manifest lists them (``tunehub show``)
        # who signed and when; the bundles themselves stay in the store (``tunehub verify --export``)
        data["signatures"] = [{"key_id": s.key_id, "by": s.by, "at": s.at} for s in self.signatures]
        return data

    def provenance(self, policy: TrustPolicy | None = None) -> Provenance:
        """Who signed this version, each signature checked against ``policy``'s keys (unchecked
        without a policy). Raises what :meth:`TrustPolicy.check` raises."""
        if policy is None:
            return Provenance(tuple(Signer(s.key_id, s.by, s.at, "not checked") for s in self.signatures))
        return policy.check(self.ref, dict(self.files), self.signatures)


@dataclass(frozen=True)
class Filters:
    base: str | None = None  # fingerprint (or a prefix of it) or base model id
    kind: str | None = None
    task: str | None = None
    namespace: str | None = None

    def match(self, info: VersionInfo) -> bool:
        if self.kind and info.kind != self.kind:
            return False
        if self.task and info.task != self.task:
            return False
        if self.namespace and not info.repo.startswith(self.namespace + "/"):
            return False
        if self.base and not (
            info.base_model_id == self.base or (len(self.base) >= 8 and info.base_fingerprint.startswith(self.base))
        ):
            return False
        return True


def current_actor() -> str:
    """Who is acting, for alias history: ``TUNEHUB_USER``, else the login name."""
    user = os.environ.get("TUNEHUB_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def tunehub_home() -> Path:
    return Path(os.environ.get("TUNEHUB_HOME") or Path.home() / ".cache" / "tunehub")


def default_registry_uri() -> str:
    return os.environ.get("TUNEHUB_REGISTRY") or f"file://{tunehub_home() / 'registry'}"


class ModuleStore(ABC):
    """What every registry store does. References may be strings or :class:`ModuleRef`.

    ``trust`` (``open_store(..., trust=TrustPolicy)``) is checked by every pull and read before
    any file is fetched: a version the policy refuses is never materialised."""

    uri: str
    trust: TrustPolicy | None = None

    def check_trust(self, info: VersionInfo) -> Provenance:
        """``info``'s provenance under this store's trust policy (raises if it refuses it)."""
        return info.provenance(self.trust)

    @abstractmethod
    def sign(self, ref: str | ModuleRef, signature: SignatureEntry) -> VersionInfo:
        """Store ``signature`` beside the exact version ``ref`` names (``name@N``); a signature by
        the same key replaces the earlier one. The version itself does not change."""

    @abstractmethod
    def push(self, folder: str | Path, ref: str | ModuleRef) -> VersionInfo:
        """Verify the module in ``folder`` and store it as the next version of ``ref``'s name; a
        module with a parent must pass :meth:`check_parent` (an exact, live version on its base)."""

    @abstractmethod
    def pull(self, ref: str | ModuleRef, dest: str | Path | None = None, *, force: bool = False) -> LocalModule:
        """Materialise ``ref`` in a local folder whose every file was checked against its hash.

        Without ``dest`` the store's cache is used. A ``dest`` folder is the user's: pull writes
        into a new or empty folder, or over exactly an earlier pull of this module, and raises
        :class:`~tunehub.errors.Conflict` for anything else; ``force`` then writes the module's
        own files there and leaves every other file alone. Nothing is ever deleted that pull
        did not write (see :func:`tunehub.registry.module.install_module`)."""

    def read(
        self,
        ref: str | ModuleRef,
        files: list[str] | None = None,
        *,
        check: Callable[[Manifest], None] | None = None,
        parse: Callable[[Manifest, dict[str, memoryview]], Any] | None = None,
    ) -> ModuleContent:
        """``ref``'s verified manifest and the bytes of ``files`` (default: every listed file).

        Each file is hashed on the very bytes returned. ``check`` sees the verified manifest before
        any other file is read (a server refuses a module for another base there).
        ``parse(manifest, files)`` turns the bytes into what the caller needs (tensors, a loaded
        module); it may run while the bytes are still being hashed, and its result (``.parsed``)
        is returned only if they matched. This default pulls into the local cache and reads from
        there; a store that can read its objects directly overrides it."""
        if check is not None:
            check(self.manifest(ref))  # the pull below checks the trust policy before any weights
        local = self.pull(ref)
        wanted = list(local.manifest.files) if files is None else [rel for rel in files if rel in local.manifest.files]
        where = str(local.ref or local.path)
        try:
            manifest = check_content((local.path / MANIFEST_FILE).read_bytes(), None, where)
        except OSError as exc:
            raise IntegrityError(f"{where}: could not read the pulled module: {exc}") from None

        def open_pulled(rel: str) -> io.RawIOBase:
            try:
                return open(local.path / rel, "rb", buffering=0)
            except OSError as exc:
                raise IntegrityError(f"{where}: could not read {rel} of the pulled module: {exc}") from None

        data, parsed = read_verified(manifest, wanted, open_pulled, where, parse)
        return ModuleContent(manifest=manifest, files=data, ref=local.ref, version=local.version, parsed=parsed)

    @abstractmethod
    def resolve(self, ref: str | ModuleRef) -> VersionInfo:
        """The exact version a reference points to now (``latest`` when it names none)."""

    @abstractmethod
    def manifest(self, ref: str | ModuleRef) -> Manifest:
        """The verified manifest of ``ref``."""

    @abstractmethod
    def list(
        self,
        *,
        base: str | None = None,
        kind: str | ModuleKind | None = None,
        task: str | None = None,
        namespace: str | None = None,
    ) -> list[VersionInfo]:
        """The latest version of every module that matches the filters."""

    @abstractmethod
    def versions(self, ref: str | ModuleRef, *, include_yanked: bool = True) -> builtins.list[VersionInfo]:
        """Every live version of a module, oldest first."""

    @abstractmethod
    def aliases(self, ref: str | ModuleRef) -> dict[str, int]:
        """Alias -> version for a module."""

    @abstractmethod
    def alias_history(self, ref: str | ModuleRef, alias: str | None = None) -> builtins.list[AliasMove]:
        """Every recorded alias move of a module, oldest first."""

    @abstractmethod
    def promote(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        """Point ``alias`` at the version ``ref`` resolves to."""

    @abstractmethod
    def rollback(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        """Point ``alias`` back at the target it had before its last move."""

    @abstractmethod
    def yank(self, ref: str | ModuleRef, reason: str = "", *, force: bool = False) -> VersionInfo:
        """Hide a version from resolution; its record and files stay. A version that modules not
        yanked name as their parent is refused (:meth:`check_no_children`) unless ``force``."""

    @abstractmethod
    def delete(self, ref: str | ModuleRef, *, force: bool = False) -> builtins.list[int]:
        """Delete one version (``name@N``) or every version of a module; returns the versions deleted.
        Aliases pointing at them, or modules not yanked naming them as parent, refuse it unless ``force``."""

    def gc(self) -> dict[str, builtins.list[str]]:
        """Remove stored content no version references and what killed writers left behind;
        returns what was removed by category. Stores that keep no such content refuse."""
        raise ConfigError(f"{self.uri} has nothing to collect: gc works on file:// registries")

    # --- lineage: modules trained on top of one another (manifest.parent) ------------------------
    def repo_name(self, ref: str | ModuleRef) -> str:
        """The module ``ref`` names, spelled as this store spells :attr:`VersionInfo.repo`."""
        return parse_ref(ref).repo

    def all_versions(self) -> builtins.list[VersionInfo]:
        """Every live version of every module, yanked ones included: what :meth:`children`
        scans. This default sees the modules :meth:`list` returns; the stores override it to
        also see modules whose every version is yanked."""
        return [info for latest in self.list() for info in self.versions(latest.repo)]

    def lineage(self, ref: str | ModuleRef) -> builtins.list[VersionInfo]:
        """The version ``ref`` resolves to, then its parent, grandparent... (``manifest.parent``,
        as recorded at push), each by its exact version. A yanked ancestor is listed (its
        ``yanked`` says so); :func:`usable_lineage` refuses it.

        Raises:
            InvalidReference: an ancestor is named by an alias or a bare name (it could move).
            ModuleNotFound: an ancestor is not in this store (never pushed here, or deleted).
            IncompatibleBase: an ancestor was trained on another base than the module above it.
            IntegrityError: the parents loop (a version record was altered).
            Conflict: the chain holds more than 32 modules.
            and what :meth:`resolve` raises for ``ref``.
        """
        chain = [self.resolve(ref)]
        while chain[-1].parent:
            child = chain[-1]
            if len(chain) >= _LINEAGE_DEPTH:
                raise Conflict(
                    f"the lineage of {chain[0].ref} holds more than {_LINEAGE_DEPTH} modules, the most tunehub follows"
                )
            parent = self._parent_version(str(child.parent), child.ref)
            _check_same_base(parent, child.base_fingerprint, child.base_model_id, child.ref)
            if any(member.ref == parent.ref for member in chain):
                raise IntegrityError(f"the lineage of {chain[0].ref} loops back to {parent.ref}: a version record was altered")
            chain.append(parent)
        return chain

    def children(self, ref: str | ModuleRef) -> builtins.list[VersionInfo]:
        """The live versions (yanked ones included) whose recorded parent is exactly the version
        ``ref`` names (an exact ``name@N`` may be yanked; an alias or a bare name is resolved).
        Scans every version record of the store: meant for rare admin operations."""
        target = self._live_version(parse_ref(ref))
        return self._children_of({target.ref})[target.ref]

    def check_parent(self, manifest: Manifest) -> builtins.list[VersionInfo]:
        """What a push of a module with a parent requires; returns the parent's lineage ([]
        without a parent). Every store's push calls it before it stores anything.

        Raises:
            InvalidReference: the parent names no exact version (``name@N``).
            ModuleNotFound: the parent is not in this store: push it first.
            VersionNotFound: the parent, or one of its ancestors, is yanked.
            IncompatibleBase: the parent was trained on another base.
            Conflict: the chain would hold more than 32 modules.
            and what :meth:`lineage` raises for the parent's own ancestors.
        """
        if not manifest.parent:
            return []
        child = "this module"
        parent = self._parent_version(manifest.parent, child, advice=": push the parent first")
        if parent.yanked:
            raise VersionNotFound(
                f"parent {parent.ref} of {child} is yanked ({parent.yank_reason or 'no reason given'}):"
                " nothing is pushed on top of a yanked version"
            )
        _check_same_base(parent, manifest.base.fingerprint, manifest.base.model_id, child)
        chain = usable_lineage(self, parent.ref)
        if len(chain) >= _LINEAGE_DEPTH:
            raise Conflict(
                f"parent {parent.ref} of {child} ends a chain of {len(chain)} modules; tunehub follows at most {_LINEAGE_DEPTH}"
            )
        return chain

    def check_no_children(self, ref: str | ModuleRef, versions: Iterable[int], action: str) -> None:
        """Refuse (``Conflict``) to ``action`` ("delete", "yank") these versions of ``ref``'s
        module while a version outside them that is not yanked names one of them as parent:
        its lineage would break. The stores call it unless their caller passes ``force``."""
        repo = self.repo_name(ref)
        targets = {f"{repo}@{version}" for version in versions}
        found = self._children_of(targets)
        broken = {target: sorted(c.ref for c in kids if c.ref not in targets and not c.yanked) for target, kids in found.items()}
        named = "; ".join(f"{target} is the parent of {', '.join(kids)}" for target, kids in sorted(broken.items()) if kids)
        if named:
            raise Conflict(
                f"cannot {action} {ref}: {named} (their lineage would break); yank or delete them first,"
                f" or pass --force (force=True) to {action} anyway"
            )

    def _live_version(self, ref: ModuleRef) -> VersionInfo:
        """``resolve(ref)``, except that an exact ``name@N`` that is yanked is found too."""
        try:
            return self.resolve(ref)
        except VersionNotFound:
            if ref.version is not None:
                for info in self.versions(ref):
                    if info.version == ref.version:
                        return info
            raise

    def _parent_version(self, text: str, child: str, advice: str = "") -> VersionInfo:
        """The live version (maybe yanked) that parent reference ``text`` of ``child`` names."""
        try:
            ref = parse_ref(text)
        except InvalidReference as exc:
            raise InvalidReference(f"parent {text!r} of {child} is not a module reference ({exc}); a parent is name@N") from None
        if ref.version is None:
            try:
                now = f" ({text} is {self.resolve(ref).ref} now)"
            except (ModuleNotFound, InvalidReference):
                now = ""
            raise InvalidReference(
                f"parent {text} of {child} names no exact version{now}: lineage must be immutable, so a parent is"
                " name@N, never an alias or a bare name"
            )
        try:
            return self._live_version(ref)
        except (ModuleNotFound, InvalidReference) as exc:  # InvalidReference: another hf:// namespace
            raise ModuleNotFound(f"parent {ref} of {child} is not in this registry ({exc}){advice}") from None

    def _children_of(self, targets: set[str]) -> dict[str, builtins.list[VersionInfo]]:
        """Exact ref (as :attr:`VersionInfo.ref` spells it) -> the live versions whose parent it is."""
        found: dict[str, builtins.list[VersionInfo]] = {target: [] for target in targets}
        for info in self.all_versions():
            if not info.parent:
                continue
            try:
                parent = parse_ref(info.parent)
                key = f"{self.repo_name(parent)}@{parent.version}" if parent.version is not None else None
            except InvalidReference:
                continue  # no exact version of this store: the child of nothing here
            if key in found:
                found[key].append(info)
        return found


def version_info(state: RegistryState, record: VersionRecord, repo: str, commit: str | None = None) -> VersionInfo:
    """What a store reports about one version: its record plus its yank and aliases in ``state``."""
    entry = state.entry(record.version)
    mark = entry.yank if entry is not None and not entry.deleted else None
    return VersionInfo(
        repo=repo,
        version=record.version,
        manifest_sha256=record.manifest_sha256,
        kind=record.kind,
        created_at=record.created_at,
        pushed_by=record.pushed_by,
        base_fingerprint=record.base_fingerprint,
        base_model_id=record.base_model_id,
        task=record.task,
        objective=record.objective,
        parent=record.parent,
        size_bytes=record.size_bytes,
        yanked=mark is not None,
        yank_reason=mark.reason if mark is not None else None,
        aliases=state.aliases_of(record.version),
        commit=commit,
        files=tuple(sorted(record.files)),
        signatures=state.signatures_of(record.version),
    )


_LINEAGE_DEPTH = 32  # a parent chain longer than this is cut (and a cycle cannot loop)


def _check_same_base(parent: VersionInfo, fingerprint: str, model_id: str, child: str) -> None:
    """``IncompatibleBase`` unless ``parent`` was trained on the base ``child`` was trained on."""
    if parent.base_fingerprint != fingerprint:
        raise IncompatibleBase(
            f"parent {parent.ref} of {child} was trained on another base: {parent.base_model_id}"
            f" (fingerprint {parent.base_fingerprint[:12]}), {child} on {model_id} (fingerprint {fingerprint[:12]})"
        )


def usable_lineage(store: ModuleStore, ref: str | ModuleRef) -> list[VersionInfo]:
    """:meth:`ModuleStore.lineage` of ``ref``, refused (``VersionNotFound``) when an ancestor
    is yanked: what pull requires of a module's chain, and push of a parent's."""
    chain = store.lineage(ref)
    for ancestor in chain[1:]:
        if ancestor.yanked:
            raise VersionNotFound(
                f"{ancestor.ref}, in the lineage of {chain[0].ref}, is yanked ({ancestor.yank_reason or 'no reason given'}):"
                " a chain with a yanked module is neither pulled nor pushed onto"
            )
    return chain


@dataclass(frozen=True)
class PulledModule(LocalModule):
    """A pulled module and, when it was pulled with its parents, theirs: parent first."""

    parents: tuple[LocalModule, ...] = ()


def parents_folder(dest: str | Path) -> Path:
    """Where a pull into ``dest`` with its parents puts them: ``DEST.parents/<name>@<N>/``,
    beside ``dest``, never inside it (a pulled folder holds exactly its module's files, so that
    pulling it again, verifying it or pushing it keeps working)."""
    path = Path(os.path.abspath(dest))
    return path.with_name(f"{path.name}.parents")


def pull_lineage(
    store: ModuleStore,
    ref: str | ModuleRef,
    dest: str | Path | None = None,
    *,
    force: bool = False,
    with_parents: bool = False,
) -> PulledModule:
    """Pull ``ref`` once its lineage resolves (every ancestor an exact, live, not yanked version
    on the same base: :func:`usable_lineage`); with ``with_parents``, every ancestor too, into
    :func:`parents_folder` of ``dest`` (each in its own cache folder when ``dest`` is None).
    ``force`` is :meth:`ModuleStore.pull`'s, for every folder written."""
    chain = usable_lineage(store, ref)
    module = store.pull(chain[0].ref, dest, force=force)  # the exact version the chain was checked for
    parents: list[LocalModule] = []
    if with_parents:
        folder = parents_folder(dest) if dest is not None else None
        for ancestor in chain[1:]:
            parents.append(store.pull(ancestor.ref, folder / ancestor.ref if folder is not None else None, force=force))
    return PulledModule(module.path, module.manifest, module.ref, module.version, parents=tuple(parents))


def provenance_with_lineage(store: ModuleStore, ref: str | ModuleRef, policy: TrustPolicy | None = None) -> dict[str, Any]:
    """Who signed the version ``ref`` resolves to (each signature checked against ``policy``'s
    keys; unchecked without), and its lineage: the parent chain (``manifest.parent``), each
    ancestor with its signers. A missing, damaged or refused ancestor is listed with the reason;
    unsigned versions are reported, never refused, even under ``require_signed``.

    Raises:
        UntrustedModule: a signature by a trusted key does not match (of ``ref`` itself).
    """
    from tunehub.errors import TunehubError

    if policy is not None and policy.require_signed:
        policy = TrustPolicy(keys=policy.keys)
    info = store.resolve(ref)
    lineage: list[dict[str, Any]] = []
    parent = store.manifest(info.ref).parent
    seen = {info.ref}
    while parent and len(lineage) < _LINEAGE_DEPTH:
        try:
            ancestor = store.resolve(parent)
            step: dict[str, Any] = {"ref": parent, "resolved": ancestor.ref, **ancestor.provenance(policy).to_dict()}
            parent = store.manifest(ancestor.ref).parent if ancestor.ref not in seen else None
            seen.add(ancestor.ref)
        except TunehubError as exc:
            step, parent = {"ref": parent, "error": str(exc)}, None
        lineage.append(step)
    return {**info.provenance(policy).to_dict(), "lineage": lineage}


def push_signed(store: ModuleStore, folder: str | Path, ref: str | ModuleRef, key: str | Path) -> VersionInfo:
    """Push ``folder`` as the next version of ``ref`` signed with the elliptic private key
    ``key``: the files are signed before anything is sent, and the signature is stored beside
    the version once it is recorded. If storing it fails, the version stays unsigned and the
    error says how to sign it."""
    from datetime import datetime, timezone

    from tunehub.errors import TunehubError
    from tunehub.registry.files import sha256_bytes
    from tunehub.registry.module import check_module_for_push
    from tunehub.registry.signing import sign_digests, version_digests

    module = check_module_for_push(folder)
    digests = version_digests(sha256_bytes((module.path / MANIFEST_FILE).read_bytes()), module.manifest.files)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    signature = sign_digests(digests, key, name=str(ref), by=current_actor(), at=at)
    info = store.push(folder, ref)
    if dict(info.files) != digests:
        raise IntegrityError(f"{folder} changed while it was pushed; {info.ref} was stored unsigned: push it again")
    try:
        return store.sign(info.ref, signature)
    except TunehubError as exc:
        raise type(exc)(
            f"{info.ref} was pushed but its signature could not be stored ({exc}); sign it: tunehub sign {info.ref} --key KEY"
        ) from exc


# --- stores by URI scheme ------------------------------------------------------------------------
StoreFactory = Callable[..., ModuleStore]
_STORE_FACTORIES: dict[str, StoreFactory] = {}


def register_store(scheme: str, factory: StoreFactory) -> None:
    """Make ``open_store("SCHEME://REST", **options)`` call ``factory("REST", **options)``.

    A later registration of the same scheme replaces the earlier one (tests register toys).
    Raises ``ValueError`` for a scheme that is not lowercase letters, digits, '+', '-' or '.'."""
    if not scheme or not scheme[0].isalpha() or not all(c.isalnum() or c in "+-." for c in scheme) or scheme != scheme.lower():
        raise ValueError(f"{scheme!r} is not a URI scheme")
    _STORE_FACTORIES[scheme] = factory


def registered_schemes() -> list[str]:
    """The schemes open_store knows, sorted."""
    return sorted(_STORE_FACTORIES)


def _open_local(path: str, **options: Any) -> ModuleStore:
    # imported late: local.py imports this module
    from tunehub.registry.local import LocalStore

    return LocalStore(path, **options)


def _open_hub(namespace: str, **options: Any) -> ModuleStore:
    try:
        from tunehub.registry.hf import HubStore
    except ImportError:
        raise ConfigError("the hf:// registry store is not available in this build of tunehub") from None
    return HubStore(namespace, **options)


register_store("file", _open_local)
register_store("hf", _open_hub)


def open_store(uri: str | None = None, *, trust: TrustPolicy | None = None, **options: Any) -> ModuleStore:
    """A store for ``uri``: ``SCHEME://REST`` through the factory registered for the scheme
    (``file://PATH``, ``hf://NAMESPACE``), a plain path (local). ``options`` go to the factory.

    ``trust`` becomes the store's trust policy: pulls and reads refuse what it refuses.

    Raises ``ConfigError`` for a scheme no store registered."""
    uri = uri or default_registry_uri()
    scheme, sep, rest = uri.partition("://")
    if not sep:
        store = _open_local(uri, **options)
    else:
        factory = _STORE_FACTORIES.get(scheme)
        if factory is None:
            known = " or ".join(f"{s}://" for s in registered_schemes())
            raise ConfigError(f"unknown registry scheme in {uri!r}: use file://PATH or hf://NAMESPACE (known: {known})")
        store = factory(rest, **options)
    store.trust = trust
    return store
