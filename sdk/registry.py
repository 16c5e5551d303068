"""``tunehub.sdk.Registry``: the Python face of the registry, the same for every store."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunehub.errors import IntegrityError
from tunehub.registry.manifest import Manifest, ModuleKind
from tunehub.registry.refs import ModuleRef
from tunehub.registry.signing import Provenance, SignatureEntry, TrustPolicy, export_bundle, sign_digests, version_digests
from tunehub.registry.store import (
    AliasMove,
    ModuleStore,
    PulledModule,
    VersionInfo,
    current_actor,
    open_store,
    provenance_with_lineage,
    pull_lineage,
    push_signed,
)


def trust_policy(trust: TrustPolicy | Iterable[str | Path] | None, require_signed: bool = False) -> TrustPolicy | None:
    """A :class:`TrustPolicy` from public key files or folders (None: no policy).

    Raises:
        ConfigError: a key file that is missing, private or not an EC public key, or
            ``require_signed`` without keys.
    """
    if trust is None or isinstance(trust, TrustPolicy):
        if require_signed and (trust is None or not trust.require_signed):
            return TrustPolicy(keys=trust.keys if trust is not None else (), require_signed=True)
        return trust
    keys = list(trust)
    if not keys and not require_signed:
        return None
    return TrustPolicy.from_paths(keys, require_signed)


class Registry:
    """A module registry at ``uri``: ``file://PATH`` (default ``$TUNEHUB_HOME/registry``) or
    ``hf://NAMESPACE``.

    Example::

        reg = Registry("file:///tmp/reg")
        info = reg.push("out/summarize", "acme/summarize")   # -> acme/summarize@1
        reg.promote(info.ref, "prod")
        module = reg.pull("acme/summarize@prod")             # verified local folder
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        trust: TrustPolicy | Iterable[str | Path] | None = None,
        require_signed: bool = False,
        **options: object,
    ):
        """Open the store at ``uri``.

        Args:
            uri: ``file://PATH``, ``hf://NAMESPACE``, or a plain path (a ``file://`` store).
                None: ``$TUNEHUB_REGISTRY``, else ``file://$TUNEHUB_HOME/registry``.
            trust: public keys (PEM files or folders of them, or a :class:`TrustPolicy`):
                every signature by one of them is verified when a version is pulled or read,
                and one that does not match refuses the version.
            require_signed: refuse versions without a valid signature by a ``trust`` key.
            **options: passed to the store: ``cache_dir`` for ``file://``; ``endpoint``,
                ``token``, ``cache_dir``, ``modules_dir`` for ``hf://``.

        Raises:
            ConfigError: a scheme no store is registered for, ``hf://`` in a build without
                huggingface_hub, a trust key that cannot be read, or ``require_signed``
                without ``trust``.
            InvalidReference: an ``hf://`` namespace or hub endpoint that is not valid.
        """
        self.store: ModuleStore = open_store(uri, trust=trust_policy(trust, require_signed), **options)

    @property
    def uri(self) -> str:
        """The store's URI (``file:///abs/path`` or ``hf://namespace``)."""
        return self.store.uri

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    def push(self, folder: str | Path, name: str | ModuleRef, *, sign: str | Path | None = None) -> VersionInfo:
        """Verify the module folder and store it as the next version of ``name``.

        With ``sign`` (an elliptic private key, PEM), the folder's files are signed before
        anything is sent and the signature is stored beside the new version once its files
        are recorded; the version is returned signed. (If storing the signature fails, the
        version stays unsigned and the error says so: sign it with :meth:`sign`.)

        Every entry must be a regular file with a name every store accepts, every file must
        match the manifest's sha256, and every ``*.safetensors`` file must be readable with
        finite values; nothing is stored otherwise.

        A module trained on top of another (``manifest.parent``) is stored only when its parent
        is an exact version (``name@N``) of this registry, not deleted or yanked, trained on the
        same base, whose own lineage resolves.

        Args:
            folder: a module folder (``manifest.json`` and the files it lists).
            name: ``[namespace/]name`` without ``@version``: the registry numbers versions.

        Returns:
            The new version (``info.ref`` is ``name@N``).

        Raises:
            InvalidReference: ``name`` does not parse (or, ``hf://``, names another namespace),
                or the parent names no exact version.
            ModuleNotFound: the parent is not in this registry (push it first).
            VersionNotFound: the parent, or one of its ancestors, is yanked.
            IncompatibleBase: the parent was trained on another base.
            Conflict: ``name`` carries ``@version`` or ``@alias``; ``hf://``: the repo holds
                files of something else, or changed too often concurrently.
            ManifestError: ``folder`` is not a folder, or its manifest is missing or invalid
                (:class:`~tunehub.errors.UnsupportedSchemaVersion` for an unknown schema).
            UnsafeFile: a link, special file, pickle, or a name a store refuses.
            IntegrityError: a file does not match its sha256, a safetensors file is unreadable
                or holds NaN/Inf, or a file changed while it was pushed.
            StoreError: the store could not be written (I/O; ``hf://``: offline, the hub
                unreachable or refusing access).
            ConfigError: ``sign`` is not a readable elliptic private key.
        """
        if sign is None:
            return self.store.push(folder, name)
        return push_signed(self.store, folder, name, sign)

    def pull(
        self, ref: str | ModuleRef, dest: str | Path | None = None, *, force: bool = False, with_parents: bool = False
    ) -> PulledModule:
        """A verified local copy of ``ref`` (a cached copy is reused when it still verifies).

        ``dest`` must be new, empty, or hold exactly an earlier pull of this module, else
        :class:`~tunehub.errors.Conflict`; ``force=True`` writes the module's files into it
        anyway and leaves every other file alone. Nothing pull did not write is deleted.

        A module trained on top of another (``manifest.parent``) is pulled only when its whole
        lineage resolves: every ancestor an exact, live, not yanked version of this registry
        on the same base (see :meth:`lineage`).

        Args:
            ref: ``[namespace/]name[@version|@alias]``; no selector means ``latest``.
            dest: the folder to write; None: the store's own cache folder.
            force: write into a ``dest`` that holds other files.
            with_parents: pull every ancestor too, each into ``DEST.parents/<name>@<N>/``
                beside ``dest`` (into its own cache folder when ``dest`` is None).

        Returns:
            The local module: its folder, verified manifest, ``ref`` (``name@N``) and version,
            and ``parents``: the pulled ancestors, parent first (empty without ``with_parents``).

        Raises:
            InvalidReference: ``ref`` does not parse, or an ancestor names no exact version.
            ModuleNotFound: the registry has no such module, or an ancestor is not in it.
            IncompatibleBase: an ancestor was trained on another base.
            VersionNotFound: the version does not exist, was deleted or is yanked (or no
                version is left for ``latest``), or an ancestor is yanked.
            AliasNotFound: the module has no such alias.
            Conflict: ``dest`` is not a folder, or holds other files (without ``force``), or
                a path the module needs is taken.
            IntegrityError: a stored file or record is missing or damaged.
            ManifestError: a stored record or manifest does not parse.
            StoreError: ``dest`` cannot be written beside; ``hf://``: the hub cannot be
                reached and the local cache does not hold the module.
        """
        return pull_lineage(self.store, ref, dest, force=force, with_parents=with_parents)

    def lineage(self, ref: str | ModuleRef) -> builtins.list[VersionInfo]:
        """The version ``ref`` resolves to, then its parent, grandparent... (``manifest.parent``),
        each by its exact version; a yanked ancestor is listed with its ``yanked`` set.

        Raises:
            InvalidReference: ``ref`` does not parse, or an ancestor names no exact version.
            ModuleNotFound, VersionNotFound, AliasNotFound: as :meth:`resolve` for ``ref``;
                ``ModuleNotFound`` also for an ancestor not in this registry (deleted or never
                pushed here).
            IncompatibleBase: an ancestor was trained on another base than the module above it.
            IntegrityError: the parents loop (a record was altered), or a record is damaged.
            Conflict: the chain holds more than 32 modules.
        """
        return self.store.lineage(ref)

    def children(self, ref: str | ModuleRef) -> builtins.list[VersionInfo]:
        """The live versions (yanked included) trained on top of the version ``ref`` names: those
        whose recorded parent is exactly it. An exact ``name@N`` may be yanked. Scans every
        version of the registry (``hf://``: every module repo of the namespace).

        Raises:
            InvalidReference, ModuleNotFound, VersionNotFound, AliasNotFound: as :meth:`resolve`.
            StoreError: ``hf://``: offline, or the hub cannot be reached or refuses.
        """
        return self.store.children(ref)

    def resolve(self, ref: str | ModuleRef) -> VersionInfo:
        """The exact version ``ref`` points to now (aliases and ``latest`` resolved).

        Args:
            ref: ``[namespace/]name[@version|@alias]``.

        Returns:
            What the registry recorded about that version.

        Raises:
            InvalidReference: ``ref`` does not parse.
            ModuleNotFound: the registry has no such module.
            VersionNotFound: the version does not exist, was deleted or is yanked.
            AliasNotFound: the module has no such alias.
            IntegrityError: the module's stored state or record is damaged.
            ManifestError: ``file://``: a stored record is not valid JSON.
            StoreError: ``hf://``: the hub cannot be reached and nothing is cached.
        """
        return self.store.resolve(ref)

    def manifest(self, ref: str | ModuleRef) -> Manifest:
        """The verified manifest of the version ``ref`` resolves to (no other file is read).

        Args:
            ref: ``[namespace/]name[@version|@alias]``.

        Returns:
            The manifest, checked against the sha256 the registry recorded.

        Raises:
            InvalidReference, ModuleNotFound, VersionNotFound, AliasNotFound: as :meth:`resolve`.
            IntegrityError: the stored manifest is missing or damaged.
            ManifestError: the stored manifest (or a record) does not parse.
            StoreError: ``hf://``: the hub cannot be reached and nothing is cached.
        """
        return self.store.manifest(ref)

    def list(
        self,
        *,
        base: str | None = None,
        kind: str | ModuleKind | None = None,
        task: str | None = None,
        namespace: str | None = None,
    ) -> list[VersionInfo]:
        """The latest usable version of every module that matches all the filters given.

        Args:
            base: a base model id, or a base fingerprint (or a prefix of 8+ characters).
            kind: a module kind (``lora``, ``ia3``...).
            task: the task the module was trained for.
            namespace: only modules in this namespace.

        Returns:
            One entry per module; modules whose every version is yanked or deleted are left out.

        Raises:
            IntegrityError: ``file://``: a module's stored state or record is damaged.
            ManifestError: ``file://``: a stored record is not valid JSON.
            StoreError: ``hf://``: offline, or the hub cannot be reached or refuses.
        """
        return self.store.list(base=base, kind=kind, task=task, namespace=namespace)

    def versions(self, name: str | ModuleRef, *, include_yanked: bool = True) -> builtins.list[VersionInfo]:
        """Every live (not deleted) version of a module, oldest first.

        Args:
            name: the module (a selector in it is ignored).
            include_yanked: False leaves yanked versions out.

        Returns:
            The versions, each with its aliases and yank.

        Raises:
            InvalidReference: ``name`` does not parse.
            ModuleNotFound: the module has no live version.
            IntegrityError: the module's stored state or a record is damaged.
            ManifestError: ``file://``: a stored record is not valid JSON.
            StoreError: ``hf://``: the hub cannot be reached and nothing is cached.
        """
        return self.store.versions(name, include_yanked=include_yanked)

    def aliases(self, name: str | ModuleRef) -> dict[str, int]:
        """The module's aliases: alias -> version.

        Args:
            name: the module (a selector in it is ignored).

        Raises:
            InvalidReference, ModuleNotFound, IntegrityError, ManifestError, StoreError:
                as :meth:`versions`.
        """
        return self.store.aliases(name)

    def alias_history(self, name: str | ModuleRef, alias: str | None = None) -> builtins.list[AliasMove]:
        """Every recorded alias move of a module (promotions and rollbacks), oldest first.

        Args:
            name: the module (a selector in it is ignored).
            alias: only the moves of this alias; None: every alias.

        Raises:
            InvalidReference, ModuleNotFound, IntegrityError, ManifestError, StoreError:
                as :meth:`versions`.
        """
        return self.store.alias_history(name, alias)

    def promote(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        """Point ``alias`` at the version ``ref`` resolves to (creating the alias if new).

        Args:
            ref: the version to point at: ``name@N``, ``name@other-alias`` or ``name`` (latest).
            alias: the alias to move; not ``latest``, not a version number.

        Returns:
            The recorded move (from which version to which, by whom, when).

        Raises:
            InvalidReference: ``ref`` or ``alias`` is not valid (``hf://``: also an alias
                that is a branch or commit name).
            Conflict: ``alias`` is ``latest``; ``hf://``: the repo changed too often concurrently.
            ModuleNotFound, VersionNotFound, AliasNotFound: as :meth:`resolve`.
            IntegrityError: the module's stored state is damaged.
            ManifestError: ``file://``: the stored state is not valid JSON.
            StoreError: ``hf://``: offline, or the hub cannot be reached or refuses.
        """
        return self.store.promote(ref, alias)

    def rollback(self, name: str | ModuleRef, alias: str) -> AliasMove:
        """Point ``alias`` back at its previous target that is still live and not yanked.

        Args:
            name: the module.
            alias: the alias to move back.

        Returns:
            The recorded move.

        Raises:
            InvalidReference: ``name`` or ``alias`` is not valid.
            ModuleNotFound: the registry has no such module.
            AliasNotFound: the module has no such alias.
            Conflict: the alias has no earlier usable target; ``hf://``: the repo changed too
                often concurrently.
            IntegrityError, ManifestError, StoreError: as :meth:`promote`.
        """
        return self.store.rollback(name, alias)

    def yank(self, ref: str | ModuleRef, reason: str = "", *, force: bool = False) -> VersionInfo:
        """Hide a version from resolution: ``latest`` skips it, ``name@N`` and aliases that
        point at it are refused. Its record and files stay.

        Args:
            ref: the exact version, ``name@N``.
            reason: recorded with the yank and shown when the version is refused.
            force: yank it even though modules that are not yanked name it as their parent
                (their lineage then no longer resolves, so they cannot be pulled).

        Returns:
            The version, now yanked.

        Raises:
            InvalidReference: ``ref`` does not parse.
            Conflict: ``ref`` names no exact version, or modules that are not yanked name it as
                their parent (without ``force``); ``hf://``: the repo changed too often
                concurrently.
            ModuleNotFound: the registry has no such module.
            VersionNotFound: the version does not exist.
            IntegrityError, ManifestError, StoreError: as :meth:`promote`.
        """
        return self.store.yank(ref, reason, force=force)

    def sign(self, ref: str | ModuleRef, key: str | Path) -> VersionInfo:
        """Sign the version ``ref`` resolves to with the elliptic private key ``key`` (PEM) and
        store the signature beside it (a signature by the same key is replaced).

        What is signed is the version as the registry records it: every file's sha256, the
        manifest's included (so its base fingerprint, quantization and parent). The manifest is
        read and checked against the record first; to sign what you built, sign at push.

        Raises:
            ConfigError: ``key`` is not a readable elliptic private key.
            IntegrityError: the stored manifest disagrees with the version's record.
            ModuleNotFound, VersionNotFound, AliasNotFound: as :meth:`resolve`.
        """
        info = self.store.resolve(ref)
        manifest = self.store.manifest(info.ref)
        digests = dict(info.files)
        if version_digests(info.manifest_sha256, manifest.files) != digests:
            raise IntegrityError(f"{info.ref}: the manifest's file list disagrees with the registry's record; refusing to sign")
        signature = sign_digests(digests, key, name=info.repo, by=current_actor(), at=_now())
        return self.store.sign(info.ref, signature)

    def verify(
        self, ref: str | ModuleRef, trust: TrustPolicy | Iterable[str | Path], *, export: str | Path | None = None
    ) -> Provenance:
        """Check that the version ``ref`` resolves to carries a valid signature by a ``trust``
        key and that every stored file still matches it (each file is read and hashed).

        Args:
            ref: ``[namespace/]name[@version|@alias]``.
            trust: public keys (PEM files, folders of them) or a :class:`TrustPolicy`.
            export: write the verified signature there, as the ``.sig`` file
                ``model_signing verify`` takes beside a pulled folder (never overwrites).

        Returns:
            Who signed the version, each signature with what checking it found.

        Raises:
            UnsignedModule: the version carries no signature.
            UntrustedSigner: signed only by keys not in ``trust``.
            SignatureMismatch: the files changed after signing, or the signature is invalid.
            IntegrityError: a stored file does not match the registry's record.
            ConfigError: a trust key cannot be read.
        """
        policy = trust_policy(trust, require_signed=True)
        assert policy is not None
        info = self.store.resolve(ref)
        provenance = policy.check(info.ref, dict(info.files), info.signatures)
        self.store.read(info.ref)  # every byte against the (signed) record
        if export is not None:
            verified = set(provenance.verified)
            export_bundle(next(s for s in info.signatures if s.key_id in verified), export)
        return provenance

    def provenance(self, ref: str | ModuleRef, trust: TrustPolicy | Iterable[str | Path] | None = None) -> dict[str, Any]:
        """Who signed the version ``ref`` resolves to, and its lineage: the parent chain
        (``manifest.parent``), each ancestor with its signers. Signatures are checked against
        ``trust`` (or the registry's own policy); without keys they are listed as not checked.
        An ancestor that cannot be resolved is listed with the reason.

        Raises:
            UntrustedModule: a signature by a trusted key does not match (of ``ref`` itself).
        """
        policy = trust_policy(trust) if trust is not None else self.store.trust
        return provenance_with_lineage(self.store, ref, policy)

    def delete(self, ref: str | ModuleRef, *, force: bool = False) -> builtins.list[int]:
        """Delete one version (``name@N``) or every version of a module (``name``); the numbers
        are never handed out again.

        Args:
            ref: ``name@N`` or ``name``; not an alias.
            force: also remove the aliases that point at what is deleted, and delete it even
                though modules that are not yanked name it as their parent.

        Returns:
            The versions deleted, in order.

        Raises:
            InvalidReference: ``ref`` does not parse.
            Conflict: ``ref`` names an alias, or aliases point at what would be deleted or
                modules that are not yanked name it as their parent (without ``force``);
                ``hf://``: the repo changed too often concurrently.
            ModuleNotFound: the registry has no such module.
            VersionNotFound: the version is not live.
            IntegrityError, ManifestError, StoreError: as :meth:`promote`.
        """
        return self.store.delete(ref, force=force)

    def gc(self) -> dict[str, builtins.list[str]]:
        """Remove unreferenced blobs and leftovers of killed writers (``file://`` stores).

        Returns:
            What was removed: ``blobs`` (sha256 digests) and ``tmp`` (paths in the store).

        Raises:
            ConfigError: the store keeps nothing to collect (``hf://``).
            IntegrityError: ``file://``: a version record is damaged (nothing is removed then).
            ManifestError: ``file://``: a version record is not valid JSON (nothing is removed).
        """
        return self.store.gc()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = ["Registry", "SignatureEntry", "trust_policy"]
