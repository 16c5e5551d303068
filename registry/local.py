"""The ``file://`` store: content-addressed blobs plus small JSON records.

Layout under the root::

    blobs/sha256/ab/abcdef...           every file of every version, named by its sha256
    modules/<namespace|_>/<name>/
        versions/<N>.json               one immutable record per version
        versions/<N>.deleted            tombstone of a deleted version (numbers are never reused)
        state.json                      aliases, their move history, yanked versions
        .lock                           flock'ed while state.json is changed
    tmp/                                files being written; never read as content
    .store.lock                         flock'ed shared by pushes, exclusively by gc

Guarantees:
- A push copies blobs first, then writes its version record aside, fsyncs it and hard-links it
  to ``versions/<N>.json``. ``link`` fails if the name exists, so two concurrent pushes can never
  take one number: the loser retries with the next. No lock is held, so a process killed at
  any point leaves at most unreferenced files in ``tmp/`` or ``blobs/`` and blocks nothing.
- Alias, yank and delete changes run under ``flock``, which the kernel releases when the holder
  dies, and rewrite ``state.json`` atomically (write aside, fsync, rename).
- Every read of a blob checks its sha256, and nothing read back is trusted: a version record
  is validated (safe relative paths, sha256 digests) before it names a file to write or read.
- ``gc`` never removes a blob a push is about to reference: a push holds ``.store.lock``
  shared from its first blob until its record is linked, gc holds it exclusively. Under it,
  every file in ``tmp/`` belongs to a dead push, and (under each module's ``.lock``) every
  ``.state.json.*.tmp`` to a dead promote, so gc removes them whatever their age.
- ``pull`` never deletes or overwrites files it did not write (see ``install_module``).
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from tunehub.errors import (
    Conflict,
    IntegrityError,
    InvalidReference,
    ManifestError,
    StoreError,
    VersionNotFound,
)
from tunehub.registry import state as registry_state
from tunehub.registry.files import (
    fsync_dir,
    is_sha256,
    open_regular,
    read_json,
    sha256_file,
    write_json_atomic,
)
from tunehub.registry.manifest import MANIFEST_FILE, Manifest, ModuleKind
from tunehub.registry.module import (
    LocalModule,
    ModuleContent,
    check_content,
    check_module_for_push,
    install_module,
    read_verified,
)
from tunehub.registry.refs import ModuleRef, parse_ref, parse_version, validate_alias
from tunehub.registry.signing import SignatureEntry
from tunehub.registry.state import (
    AliasMove,
    RegistryState,
    VersionRecord,
    local_state_json,
    parse_local_state,
)
from tunehub.registry.store import (
    Filters,
    ModuleStore,
    VersionInfo,
    current_actor,
    tunehub_home,
    version_info,
)

_NO_NAMESPACE = "_"  # names start with a letter or digit, so this never collides with one
_CHUNK = 1 << 20
_STORE_LOCK = ".store.lock"


_Result = TypeVar("_Result")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class LocalStore(ModuleStore):
    def __init__(self, root: str | Path, *, cache_dir: str | Path | None = None):
        self.root = Path(root).expanduser().resolve()
        self.uri = f"file://{self.root}"
        self.cache_dir = Path(cache_dir) if cache_dir else tunehub_home() / "modules"
        for sub in ("blobs/sha256", "modules", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------------
    def _module_dir(self, ref: ModuleRef) -> Path:
        return self.root / "modules" / (ref.namespace or _NO_NAMESPACE) / ref.name

    def _blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest[:2] / digest

    def _tmp_path(self, suffix: str = "") -> Path:
        return self.root / "tmp" / f"{uuid.uuid4().hex}{suffix}"

    @staticmethod
    def _repo_of(namespace_dir: str, name: str) -> str:
        return name if namespace_dir == _NO_NAMESPACE else f"{namespace_dir}/{name}"

    # --- version records -----------------------------------------------------------------------
    def _version_numbers(self, module_dir: Path) -> tuple[set[int], set[int]]:
        """(live, deleted) version numbers of a module."""
        live: set[int] = set()
        deleted: set[int] = set()
        versions_dir = module_dir / "versions"
        if not versions_dir.is_dir():
            return live, deleted
        for entry in os.listdir(versions_dir):
            stem, dot, suffix = entry.partition(".")
            try:
                number = parse_version(stem)  # not int(): '².json' or '01.json' is no version record
            except InvalidReference:
                continue
            if suffix == "json":
                live.add(number)
            elif suffix == "deleted":
                deleted.add(number)
        return live, deleted

    def _record(self, module_dir: Path, version: int) -> VersionRecord:
        path = module_dir / "versions" / f"{version}.json"
        try:
            raw = read_json(path, "version record")
        except FileNotFoundError:
            raise VersionNotFound(f"version {version} does not exist") from None
        try:
            return registry_state.parse_record(raw, version)
        except ValueError as exc:
            raise IntegrityError(f"version record {path} is corrupt: {exc}") from None

    def _state(self, module_dir: Path) -> RegistryState:
        """The module's state: version numbers from ``versions/``, the rest from ``state.json``."""
        live, deleted = self._version_numbers(module_dir)
        path = module_dir / "state.json"
        try:
            raw = read_json(path, "module state")
        except FileNotFoundError:
            raw = None
        return parse_local_state(raw, live, deleted, str(path))

    def _change_state(
        self,
        ref: ModuleRef,
        change: Callable[[RegistryState], tuple[RegistryState, _Result]],
        before_write: Callable[[RegistryState, _Result], None] | None = None,
    ) -> _Result:
        """Apply the pure ``change`` to the module's state under its exclusive flock, then swap
        ``state.json`` atomically (write aside, fsync, rename). ``before_write`` does the file
        moves the change implies (delete's tombstones) while the lock is still held."""
        module_dir = self._module_dir(ref)
        self._require_module(ref)
        with open(module_dir / ".lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                state = self._state(module_dir)
                self._check_module(ref, state)
                new_state, result = change(state)
                if before_write is not None:
                    before_write(new_state, result)
                write_json_atomic(module_dir / "state.json", local_state_json(new_state))
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return result

    @contextmanager
    def _store_lock(self, *, exclusive: bool) -> Iterator[None]:
        """Shared by pushes (many at once), exclusive for gc; the kernel drops it if we die."""
        with open(self.root / _STORE_LOCK, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _check_module(self, ref: ModuleRef, state: RegistryState) -> RegistryState:
        registry_state.require_module(state, repr(ref.repo), self.uri)
        return state

    def _require_module(self, ref: ModuleRef) -> tuple[Path, RegistryState]:
        """The module's folder and state; ``ModuleNotFound`` when it has no live version."""
        module_dir = self._module_dir(ref)
        return module_dir, self._check_module(ref, self._state(module_dir))

    # --- blobs ---------------------------------------------------------------------------------
    def _store_blob(self, source: Path, expected: str) -> int:
        """Copy ``source`` into the blob store under its hash; returns its size."""
        target = self._blob_path(expected)
        if target.exists():
            if sha256_file(target) == expected:
                return target.stat().st_size
            # a damaged blob: replace it with the good copy being pushed
        tmp = self._tmp_path(".blob")
        import hashlib

        digest = hashlib.sha256()
        size = 0
        with open_regular(source) as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"{source} changed while it was being pushed")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return size

    def _copy_blob_verified(self, digest: str, dest: Path) -> None:
        import hashlib

        source = self._blob_path(digest)
        if not source.is_file():
            raise IntegrityError(f"blob {digest[:12]}... is missing from {self.uri}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        check = hashlib.sha256()
        with open(source, "rb") as src, open(dest, "wb") as dst:
            while chunk := src.read(_CHUNK):
                check.update(chunk)
                dst.write(chunk)
        if check.hexdigest() != digest:
            raise IntegrityError(f"blob {digest[:12]}... in {self.uri} is damaged: its content does not match its sha256")

    # --- operations ----------------------------------------------------------------------------
    def push(self, folder: str | Path, ref: str | ModuleRef) -> VersionInfo:
        ref = parse_ref(ref)
        if ref.version is not None or ref.alias is not None:
            raise Conflict(f"push takes a name without @version: versions are assigned by the registry (got {ref})")
        module = check_module_for_push(folder)
        self.check_parent(module.manifest)
        manifest_sha = sha256_file(module.path / MANIFEST_FILE)
        files = dict(module.manifest.files)
        files[MANIFEST_FILE] = manifest_sha
        # from the first blob stored (or found and reused) to the record that references it,
        # gc must not run: it would see those blobs as unreferenced
        with self._store_lock(exclusive=False):
            return self._store_version(module, ref, files)

    def _store_version(self, module: LocalModule, ref: ModuleRef, files: dict[str, str]) -> VersionInfo:
        size = 0
        try:
            for rel, digest in sorted(files.items()):
                size += self._store_blob(module.path / rel, digest)
        except OSError as exc:
            raise StoreError(f"could not write to {self.uri}: {exc}") from exc
        manifest = module.manifest
        manifest_sha = files[MANIFEST_FILE]
        record: dict[str, Any] = {
            "version": 0,
            "manifest_sha256": manifest_sha,
            "files": files,
            "kind": manifest.kind.value,
            "task": manifest.task,
            "objective": manifest.objective,
            "parent": manifest.parent,
            "base_fingerprint": manifest.base.fingerprint,
            "base_model_id": manifest.base.model_id,
            "size_bytes": size,
            "created_at": _now(),
            "pushed_by": current_actor(),
        }
        module_dir = self._module_dir(ref)
        versions_dir = module_dir / "versions"
        versions_dir.mkdir(parents=True, exist_ok=True)
        version = self._claim_version(versions_dir, record)
        stored = registry_state.parse_record({**record, "version": version}, version)
        return version_info(self._state(module_dir), stored, ref.repo)

    def _claim_version(self, versions_dir: Path, record: dict[str, Any]) -> int:
        """Write the record aside and link it to the first free number (atomic, lock-free)."""
        for _ in range(10_000):
            live, deleted = self._version_numbers(versions_dir.parent)
            version = max(live | deleted, default=0) + 1
            tmp = self._tmp_path(".version.json")
            write_json_atomic(tmp, {**record, "version": version})
            try:
                os.link(tmp, versions_dir / f"{version}.json")
            except FileExistsError:
                continue  # another push took this number; try the next
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                raise StoreError(f"could not record a version in {versions_dir}: {exc}") from exc
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(versions_dir)
            return version
        raise StoreError(f"could not claim a version number in {versions_dir}")

    def resolve(self, ref: str | ModuleRef) -> VersionInfo:
        return self._resolve_record(parse_ref(ref))[0]

    def _resolve_record(self, ref: ModuleRef) -> tuple[VersionInfo, VersionRecord]:
        module_dir, state = self._require_module(ref)
        version = registry_state.resolve(state, ref, ref.repo)
        record = self._record(module_dir, version)
        return version_info(state, record, ref.repo), record

    def pull(self, ref: str | ModuleRef, dest: str | Path | None = None, *, force: bool = False) -> LocalModule:
        ref = parse_ref(ref)
        info, record = self._resolve_record(ref)
        self.check_trust(info)
        files = record.file_digests  # paths and digests checked by _record
        owned = dest is None  # the cache folder is the store's own; a --dest folder is the user's
        if dest is None:
            dest = self.cache_dir / (ref.namespace or _NO_NAMESPACE) / ref.name / str(info.version)
        known = {v.manifest_sha256 for v in self.versions(ref)}
        path, manifest = install_module(
            dest,
            files,
            lambda rel, target: self._copy_blob_verified(files[rel], target),
            known_manifests=known,
            owned=owned,
            force=force,
            where=info.ref,
        )
        return LocalModule(path=path, manifest=manifest, ref=info.ref, version=info.version)

    def read(
        self,
        ref: str | ModuleRef,
        files: list[str] | None = None,
        *,
        check: Callable[[Manifest], None] | None = None,
        parse: Callable[[Manifest, dict[str, memoryview]], Any] | None = None,
    ) -> ModuleContent:
        """Read straight from the blobs: one read per file, hashed while it is read."""
        info, record = self._resolve_record(parse_ref(ref))
        self.check_trust(info)  # the signed digests are the record's, which every read below checks
        digests = record.file_digests
        wanted = [rel for rel in digests if rel != MANIFEST_FILE] if files is None else [rel for rel in files if rel in digests]
        where = f"{info.ref} in {self.uri}"
        manifest_bytes = self._read_blob(digests.get(MANIFEST_FILE, ""), info.ref)
        manifest = check_content(manifest_bytes, digests, where)
        if check is not None:
            check(manifest)

        def open_blob(rel: str) -> io.RawIOBase:
            try:
                return open(self._blob_path(digests[rel]), "rb", buffering=0)
            except FileNotFoundError:
                raise IntegrityError(f"{info.ref}: blob {digests[rel][:12]}... of {rel} is missing from {self.uri}") from None

        data, parsed = read_verified(manifest, wanted, open_blob, where, parse)
        return ModuleContent(manifest=manifest, files=data, ref=info.ref, version=info.version, parsed=parsed)

    def _read_blob(self, digest: str, ref: str) -> bytes:
        try:
            return self._blob_path(digest).read_bytes() if is_sha256(digest) else b""
        except FileNotFoundError:
            raise IntegrityError(f"{ref}: blob {digest[:12]}... is missing from {self.uri}") from None

    def manifest(self, ref: str | ModuleRef) -> Manifest:
        ref = parse_ref(ref)
        info = self.resolve(ref)
        path = self._blob_path(info.manifest_sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"the manifest of {info.ref} is missing from {self.uri}") from None
        import hashlib

        if hashlib.sha256(data).hexdigest() != info.manifest_sha256:
            raise IntegrityError(f"the manifest of {info.ref} in {self.uri} is damaged")
        return Manifest.from_json(data, f"{info.ref}/manifest.json")

    def _iter_modules(self) -> Iterator[tuple[str, Path]]:
        modules = self.root / "modules"
        for namespace in sorted(os.listdir(modules)):
            ns_dir = modules / namespace
            if not ns_dir.is_dir():
                continue
            for name in sorted(os.listdir(ns_dir)):
                if (ns_dir / name / "versions").is_dir():
                    yield self._repo_of(namespace, name), ns_dir / name

    def list(
        self,
        *,
        base: str | None = None,
        kind: str | ModuleKind | None = None,
        task: str | None = None,
        namespace: str | None = None,
    ) -> list[VersionInfo]:
        kind_value = kind.value if isinstance(kind, ModuleKind) else kind
        filters = Filters(base=base, kind=kind_value, task=task, namespace=namespace)
        found = []
        for repo, module_dir in self._iter_modules():
            state = self._state(module_dir)
            latest = state.latest_usable()
            if latest is None:
                continue
            info = version_info(state, self._record(module_dir, latest), repo)
            if filters.match(info):
                found.append(info)
        return found

    def versions(self, ref: str | ModuleRef, *, include_yanked: bool = True) -> builtins.list[VersionInfo]:
        ref = parse_ref(ref)
        module_dir, state = self._require_module(ref)
        infos = [version_info(state, self._record(module_dir, v), ref.repo) for v in sorted(state.live)]
        return [i for i in infos if include_yanked or not i.yanked]

    def all_versions(self) -> builtins.list[VersionInfo]:
        """Every live version of every module; a damaged state or record is skipped (pull and
        list refuse that version anyway, so it is no one's usable child)."""
        found = []
        for repo, module_dir in self._iter_modules():
            try:
                state = self._state(module_dir)
            except (IntegrityError, ManifestError):
                continue
            for version in sorted(state.live):
                try:
                    found.append(version_info(state, self._record(module_dir, version), repo))
                except (IntegrityError, ManifestError, VersionNotFound):  # VersionNotFound: deleted meanwhile
                    continue
        return found

    def aliases(self, ref: str | ModuleRef) -> dict[str, int]:
        ref = parse_ref(ref)
        return self._require_module(ref)[1].alias_map

    def alias_history(self, ref: str | ModuleRef, alias: str | None = None) -> builtins.list[AliasMove]:
        ref = parse_ref(ref)
        moves = self._require_module(ref)[1].history
        return [m for m in moves if alias is None or m.alias == alias]

    def promote(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        ref = parse_ref(ref)
        registry_state.check_movable_alias(alias)
        return self._change_state(
            ref, lambda state: registry_state.promote(state, ref, alias, ref.repo, by=current_actor(), at=_now())
        )

    def rollback(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        ref = parse_ref(ref)
        validate_alias(alias)
        return self._change_state(
            ref, lambda state: registry_state.rollback(state, alias, ref.repo, by=current_actor(), at=_now())
        )

    def yank(self, ref: str | ModuleRef, reason: str = "", *, force: bool = False) -> VersionInfo:
        ref = parse_ref(ref)
        version = ref.version
        if version is None:
            raise Conflict(f"yank takes an exact version (name@N), got {ref}")
        if not force:
            self.check_no_children(ref, [version], "yank")
        self._change_state(
            ref, lambda state: registry_state.yank(state, version, ref.repo, reason, by=current_actor(), at=_now())
        )
        module_dir, state = self._require_module(ref)
        return version_info(state, self._record(module_dir, version), ref.repo)

    def sign(self, ref: str | ModuleRef, signature: SignatureEntry) -> VersionInfo:
        ref = parse_ref(ref)
        version = ref.version
        if version is None:
            raise Conflict(f"sign takes an exact version (name@N), got {ref}")
        self._change_state(ref, lambda state: (registry_state.add_signature(state, version, signature, ref.repo), None))
        module_dir, state = self._require_module(ref)
        return version_info(state, self._record(module_dir, version), ref.repo)

    def delete(self, ref: str | ModuleRef, *, force: bool = False) -> builtins.list[int]:
        ref = parse_ref(ref)
        if ref.alias is not None:
            raise Conflict(f"delete takes name@N or a bare name, not an alias ({ref})")
        if not force:
            targets = [ref.version] if ref.version is not None else sorted(self._require_module(ref)[1].live)
            self.check_no_children(ref, targets, "delete")
        versions_dir = self._module_dir(ref) / "versions"

        def tombstone(_: RegistryState, targets: list[int]) -> None:
            # the record becomes a tombstone, so the number is never handed out again
            for version in targets:
                os.replace(versions_dir / f"{version}.json", versions_dir / f"{version}.deleted")
            fsync_dir(versions_dir)

        return self._change_state(ref, lambda state: registry_state.delete(state, ref.version, ref.repo, force=force), tombstone)

    def gc(self) -> dict[str, builtins.list[str]]:
        """Remove what no live version references, and what killed writers left behind.

        Returns what was removed: ``blobs`` (sha256 digests), ``tmp`` (paths relative to the
        store root: files of killed pushes in ``tmp/``, and ``.state.json.*.tmp`` files of
        killed promotes, rollbacks, yanks and deletes). Runs under the store lock held
        exclusively, so no push is between reusing a blob and recording the version that uses
        it; a record that cannot be read stops gc before anything is removed."""
        removed: dict[str, list[str]] = {"blobs": [], "tmp": []}
        with self._store_lock(exclusive=True):
            referenced: set[str] = set()
            module_dirs = [module_dir for _, module_dir in self._iter_modules()]
            for module_dir in module_dirs:
                live, _ = self._version_numbers(module_dir)
                for version in live:
                    referenced.update(self._record(module_dir, version).file_digests.values())
            for path in sorted((self.root / "blobs" / "sha256").glob("*/*")):
                if path.name not in referenced:
                    path.unlink(missing_ok=True)
                    removed["blobs"].append(path.name)
            for path in sorted((self.root / "tmp").iterdir()):
                self._remove(path)
                removed["tmp"].append(path.relative_to(self.root).as_posix())
            for module_dir in module_dirs:
                removed["tmp"] += self._remove_dead_state_writes(module_dir)
        return removed

    def _remove_dead_state_writes(self, module_dir: Path) -> builtins.list[str]:
        """Temporary files of state writes (write_json_atomic's ``.state.json.<pid>.tmp``) whose
        writer died: under the module's lock no writer is alive, so every one is dead."""
        with open(module_dir / ".lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                leftovers = sorted(module_dir.glob(".state.json.*.tmp"))
                for path in leftovers:
                    path.unlink(missing_ok=True)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return [path.relative_to(self.root).as_posix() for path in leftovers]

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


__all__ = ["LocalStore"]
