"""Writing and verifying module folders: the manifest, PEFT's config and the model card together."""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunehub.errors import Conflict, IntegrityError, ManifestError, StoreError, UnsafeFile
from tunehub.registry.files import (
    check_module_file_name,
    check_relative_path,
    check_safetensors_file,
    fsync_dir,
    hash_folder,
    iter_module_files,
    read_regular,
    sha256_file,
    verify_files,
)
from tunehub.registry.manifest import (
    ADAPTER_CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Manifest,
    ModuleKind,
)


def is_hub_model_id(model_id: str) -> bool:
    """``[namespace/]name`` in the Hub's repo-id alphabet: what a model card may name as its base
    (a local base is recorded by its folder's name, which fits; a path never does)."""
    parts = model_id.split("/")
    return len(parts) <= 2 and all(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?", part) for part in parts)


def model_card(manifest: Manifest, name: str | None = None) -> str:
    """A Hub-style model card: YAML front matter, then a short human summary."""
    tags = ["tunehub", manifest.kind.value]
    if manifest.objective:
        tags.append(manifest.objective)
    # the Hub refuses a card whose base_model is not a repo id (a path, from an old manifest or a
    # hand-written one): such a base is named in the text only
    on_hub = is_hub_model_id(manifest.base.model_id)
    # bottleneck modules are PEFT-format, but PEFT loads them only once tunehub registered the
    # method (import tunehub.trainer): the Hub should not list them as plain PEFT adapters
    plain_peft = manifest.peft_loadable and manifest.kind is not ModuleKind.BOTTLENECK
    if plain_peft:
        tags.append("peft")
        if on_hub:
            tags.append(f"base_model:adapter:{manifest.base.model_id}")
    front: dict[str, object] = {}
    if on_hub:
        front["base_model"] = manifest.base.model_id
    front["library_name"] = "peft" if plain_peft else "tunehub"
    front["tags"] = tags
    if manifest.task_type == "CAUSAL_LM":
        front["pipeline_tag"] = "text-generation"
    title = name or manifest.task or f"{manifest.kind.value} module"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"A tunehub **{manifest.kind.value}** module for `{manifest.base.model_id}`"
        f" (base fingerprint `{manifest.base.fingerprint[:12]}`, quantization `{manifest.base.quantization}`).",
        "",
    ]
    if manifest.description:
        lines += [manifest.description, ""]
    if manifest.objective or manifest.task:
        lines += [f"- objective: `{manifest.objective}`", f"- task: `{manifest.task}`"]
    if manifest.parent:
        lines.append(f"- trained on top of: `{manifest.parent}`")
    if manifest.data:
        lines.append(f"- data sha256: `{manifest.data.sha256[:16]}`")
    for key, value in sorted(manifest.metrics.items()):
        lines.append(f"- {key}: {value:.6g}")
    if manifest.kind is ModuleKind.BOTTLENECK:
        loading = "`peft.PeftModel.from_pretrained` after `import tunehub.trainer` (which registers the method with PEFT)"
    else:
        loading = "`peft.PeftModel.from_pretrained`" if plain_peft else "tunehub"
    lines += ["", f"Load it with tunehub (`tunehub pull`) or {loading}.", ""]
    return "\n".join(lines)


def write_module(folder: str | Path, manifest: Manifest, *, card: bool = True) -> Manifest:
    """Finish a module folder: write PEFT's config and the card from ``manifest``, hash every
    file and write ``manifest.json`` last. Returns the manifest with ``files`` filled in.

    Call it after the weights (and any other payload) are in ``folder``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    adapter_config = manifest.adapter_config()
    if adapter_config is not None:
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    if card:
        (folder / MODEL_CARD_FILE).write_text(model_card(manifest))
    files = hash_folder(folder, exclude=frozenset({MANIFEST_FILE}))
    final = manifest.with_updates(files=files)
    (folder / MANIFEST_FILE).write_text(final.to_json())
    return final


@dataclass(frozen=True)
class LocalModule:
    """A verified module folder on disk."""

    path: Path
    manifest: Manifest
    ref: str | None = None
    version: int | None = None


@dataclass(frozen=True)
class ModuleContent:
    """A verified module held in memory: its manifest and the bytes of the files that were read.

    What a server needs to activate a module: one read of each file, hashed on the same bytes
    that are then parsed, so no file is copied, hashed twice or read again after its check.
    ``files`` are read-write views of the bytes read; ``parsed`` may share their memory (tensors
    viewing the buffers)."""

    manifest: Manifest
    files: dict[str, memoryview]
    ref: str | None = None
    version: int | None = None
    parsed: Any = None  # what the reader's ``parse`` made of ``files`` (see ModuleStore.read)


def check_content(manifest_bytes: bytes, expected: dict[str, str] | None, where: str) -> Manifest:
    """Validate a manifest read into memory: it parses, and ``expected`` (a store's record of every
    file, manifest included) agrees with it. The other files are checked as they are read
    (:func:`read_verified`). Raises like verify_module."""
    from tunehub.registry.files import sha256_bytes

    if expected is not None and sha256_bytes(manifest_bytes) != expected.get(MANIFEST_FILE):
        raise IntegrityError(f"{where}: {MANIFEST_FILE} does not match its recorded sha256")
    manifest = Manifest.from_json(manifest_bytes, f"{where}/{MANIFEST_FILE}")
    if expected is not None and dict(manifest.files) != {k: v for k, v in expected.items() if k != MANIFEST_FILE}:
        raise IntegrityError(f"{where}: the manifest's file list disagrees with the store's record")
    if manifest.adapter_config() is not None and ADAPTER_CONFIG_FILE not in manifest.files:
        raise IntegrityError(f"{where}: a {manifest.kind.value} module must carry {ADAPTER_CONFIG_FILE}")
    return manifest


_READ_CHUNK = 1 << 20  # large enough to read at disk speed
_FIRST_CHUNK = 1 << 18
_END_OF_FILE = object()


def read_verified(
    manifest: Manifest,
    rels: list[str],
    open_file: Callable[[str], io.RawIOBase],
    where: str,
    parse: Callable[[Manifest, dict[str, memoryview]], Any] | None = None,
) -> tuple[dict[str, memoryview], Any]:
    """Read ``rels`` into memory with ``open_file`` and check each against ``manifest``'s sha256.

    Returns the bytes read and ``parse(manifest, files)`` (None without ``parse``). A cold load
    is bound by sha256 (about 1.4 GB/s with SHA-NI), so nothing else waits for it: a helper thread
    hashes what has been read while the next chunk is read (reads and hashlib both release the
    GIL), and ``parse`` runs on the complete bytes while the hashing finishes. Everything is
    hashed on the very bytes returned, and what ``parse`` made is returned only if every hash
    matched: a damaged file raises IntegrityError and its parsed form is dropped unused."""
    for rel in rels:
        _check_listed(manifest, rel, where)
    progress: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    hashing = _HASHER.submit(_hash_as_read, progress, manifest, where)
    files: dict[str, memoryview] = {}
    try:
        for rel in rels:
            files[rel] = _read_into_memory(rel, open_file, progress, where)
    except BaseException:
        progress.put(("", None))
        hashing.result()  # a damaged file is reported as damaged, not as unreadable
        raise
    progress.put(("", None))
    if parse is None:
        hashing.result()
        return files, None
    try:
        parsed = parse(manifest, files)
    except BaseException:
        hashing.result()  # likewise: damage first, then "unparseable"
        raise
    hashing.result()
    return files, parsed


def _read_into_memory(
    rel: str, open_file: Callable[[str], io.RawIOBase], progress: queue.SimpleQueue[tuple[str, Any]], where: str
) -> memoryview:
    with open_file(rel) as stream:
        size = os.fstat(stream.fileno()).st_size
        view = _uninitialized_buffer(size)
        done = 0
        progress.put((rel, view))
        while done < size:
            # a small first chunk: the hashing, the slowest part, starts sooner
            got = stream.readinto(view[done : done + (_READ_CHUNK if done else _FIRST_CHUNK)])
            if not got:
                break
            done += got
            progress.put((rel, done))
        if done != size or stream.read(1):
            raise IntegrityError(f"{where}: {rel} changed size while it was read")
    progress.put((rel, _END_OF_FILE))
    return view


def _uninitialized_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes from malloc, not zeroed first.

    bytearray zeroes what it allocates (about 1 ms for a 7 MB module, before the first byte can
    be read and hashed); numpy, which every torch install has, does not. Memory an evicted
    module freed is reused either way."""
    try:
        import numpy
    except ImportError:  # a registry-only install without numpy
        return memoryview(bytearray(size))
    return numpy.empty(size, dtype=numpy.uint8).data.cast("B")


def _hash_as_read(progress: queue.SimpleQueue[tuple[str, Any]], manifest: Manifest, where: str) -> None:
    """Hash what the reader has read so far, in as few calls as possible.

    The reader reports how far it got; each update covers everything read since the last one.
    Between updates this thread needs the GIL, which a parse running in Python holds for up to
    the interpreter's switch interval (5 ms), so once the reading is done the rest of a file is
    hashed in one call."""
    view = memoryview(b"")
    digest = hashlib.sha256()
    hashed = 0
    pending: tuple[str, Any] | None = None
    while True:
        rel, mark = pending or progress.get()
        pending = None
        if mark is None:
            return
        if isinstance(mark, memoryview):  # a file starts: the buffer it is read into
            view, digest, hashed = mark, hashlib.sha256(), 0
        elif mark is _END_OF_FILE:
            if digest.hexdigest() != manifest.files[rel]:
                raise IntegrityError(f"{where}: {rel} is damaged: its content does not match its sha256")
        else:
            while True:  # skip to the reader's latest position
                try:
                    later = progress.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(later[1], int):
                    pending = later
                    break
                mark = later[1]
            digest.update(view[hashed:mark])
            hashed = mark


_HASHER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tunehub-sha256")


def _check_listed(manifest: Manifest, rel: str, where: str) -> None:
    from tunehub.registry.files import check_relative_path, is_pickle_name

    check_relative_path(rel)
    if is_pickle_name(rel):
        raise UnsafeFile(f"{where}: {rel} is a pickle file; tunehub loads safetensors only")
    if rel not in manifest.files:
        raise IntegrityError(f"{where}: {rel} is not listed in the manifest")


def _read_manifest(folder: Path) -> Manifest:
    """``folder``'s manifest, read only if it is a regular file (a FIFO there would block)."""
    path = folder / MANIFEST_FILE
    try:
        data = read_regular(path)
    except FileNotFoundError:
        raise ManifestError(f"{folder} has no {MANIFEST_FILE}: it is not a tunehub module") from None
    return Manifest.from_json(data, str(path))


def verify_module(folder: str | Path) -> LocalModule:
    """Read and validate ``folder``'s manifest and check every file against its hash.

    Raises ``ManifestError`` (bad or missing manifest), ``UnsafeFile`` (pickles, links, FIFOs
    and other special files) or ``IntegrityError`` (missing, unlisted or altered files).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    manifest = _read_manifest(folder)
    list(iter_module_files(folder))  # refuses pickles, links and special files before any hashing
    verify_files(folder, manifest.files)
    expected_config = manifest.adapter_config()
    if expected_config is not None and ADAPTER_CONFIG_FILE not in manifest.files:
        raise IntegrityError(f"{folder}: a {manifest.kind.value} module must carry {ADAPTER_CONFIG_FILE}")
    return LocalModule(path=folder, manifest=manifest)


def check_module_for_push(folder: str | Path) -> LocalModule:
    """Everything a store checks before it takes a module, the same for every store.

    Without opening anything: every entry of the folder is a regular file (no link, FIFO,
    socket or device) whose name every store and the Hub accept. Then the manifest and every
    file's hash (:func:`verify_module`), then the content of every ``*.safetensors`` file
    (:func:`~tunehub.registry.files.check_safetensors_file`): weights are refused at push,
    not when a server loads them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    if not os.path.lexists(folder / MANIFEST_FILE):  # before walking what may be any folder
        raise ManifestError(f"{folder} has no {MANIFEST_FILE}: it is not a tunehub module")
    for rel in iter_module_files(folder):
        check_module_file_name(rel)
    module = verify_module(folder)
    for rel in sorted(module.manifest.files):
        if rel.lower().endswith(".safetensors"):
            check_safetensors_file(module.path / rel, rel)
    return module


# --- materialising a pulled module -----------------------------------------------------------


def _verified_copy(dest: Path, files: dict[str, str]) -> Manifest | None:
    """The manifest of ``dest`` when it holds exactly ``files`` (path -> sha256, manifest
    included) and nothing else, else None. Opens nothing that is not a regular file."""
    try:
        if sha256_file(dest / MANIFEST_FILE) != files.get(MANIFEST_FILE):
            return None
        verify_files(dest, {k: v for k, v in files.items() if k != MANIFEST_FILE})
        return _read_manifest(dest)
    except (OSError, IntegrityError, ManifestError, UnsafeFile):
        return None


def _pulled_module_in(dest: Path, known_manifests: Collection[str]) -> Manifest | None:
    """The manifest of ``dest`` when it holds exactly one of ``known_manifests`` (a version of
    the module being pulled, whose content the store still has), else None."""
    try:
        manifest_sha = sha256_file(dest / MANIFEST_FILE)
        if manifest_sha not in known_manifests:
            return None
        module = verify_module(dest)  # every listed file matches, nothing else is there
    except (OSError, IntegrityError, ManifestError, UnsafeFile):
        return None
    return module.manifest


def _absolute(dest: str | Path) -> Path:
    """``dest`` as an absolute path without '.' or '..' (``--dest .`` has a name and a parent)."""
    path = Path(os.path.abspath(dest))
    return path.resolve() if path.is_symlink() else path


def install_module(
    dest: str | Path,
    files: dict[str, str],
    copy_file: Callable[[str, Path], None],
    *,
    known_manifests: Collection[str],
    owned: bool = False,
    force: bool = False,
    where: str = "module",
) -> tuple[Path, Manifest]:
    """Materialise a module (``files``: path -> sha256, ``manifest.json`` included) at ``dest``.

    ``copy_file(rel, target)`` writes the verified bytes of ``rel`` to ``target``. Everything is
    written into a temporary folder beside ``dest`` and verified there before anything at
    ``dest`` changes. Then, by what ``dest`` holds:

    - nothing (missing): the temporary folder is renamed into place (atomic);
    - exactly these files: it is left as it is (nothing is copied);
    - ``owned`` (the store's own cache folder): it is replaced whatever it holds;
    - an empty folder, or exactly another version of this module (its manifest's sha256 is in
      ``known_manifests``, every listed file matches and nothing else is there): the files are
      moved in, the old version's files that the new one lacks are removed, ``manifest.json``
      last. The folder itself stays (it may be the caller's working directory);
    - anything else: :class:`Conflict`, nothing touched. With ``force``, the module's files are
      moved in over the same names and every other file is left alone; nothing is deleted.

    Returns ``(dest, manifest)``."""
    for rel in files:
        try:
            check_relative_path(rel)
        except ValueError as exc:
            raise IntegrityError(f"{where}: the registry's record lists an unsafe file path: {exc}") from None
    if MANIFEST_FILE not in files:
        raise IntegrityError(f"{where}: the registry's record lists no {MANIFEST_FILE}")
    dest = _absolute(dest)
    previous: Manifest | None = None
    if os.path.lexists(dest):
        if not dest.is_dir():
            if not owned:
                raise Conflict(f"{dest} exists and is not a folder; pick another destination")
        else:
            current = _verified_copy(dest, files)
            if current is not None:
                return dest, current  # already exactly this version
            if not owned:
                previous = _pulled_module_in(dest, known_manifests)
                if previous is None and not force and _has_entries(dest):
                    raise Conflict(
                        f"{dest} holds files that are not a pulled copy of this module, and pull never"
                        " overwrites them: pull into a new or empty folder, or pass --force (force=True)"
                        " to write the module's files there, leaving every other file alone"
                    )
    staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.partial"
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise StoreError(f"cannot write beside {dest}: {exc}") from None
        for rel in sorted(files):
            copy_file(rel, staging / rel)
        module = verify_module(staging)
        if not os.path.lexists(dest):
            _rename_new(staging, dest)
        elif owned:
            _swap_owned(staging, dest)
        else:
            _move_into(staging, dest, files, previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest, module.manifest


def _has_entries(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(True for _ in entries)


def _rename_new(staging: Path, dest: Path) -> None:
    try:
        os.rename(staging, dest)
    except OSError as exc:  # created meanwhile by someone else
        raise Conflict(f"{dest} appeared while the module was being pulled; pull again ({exc.strerror})") from None
    fsync_dir(dest.parent)


def _swap_owned(staging: Path, dest: Path) -> None:
    """Replace the store's own cache folder: move the old one aside, the new one in, then drop."""
    aside = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.old"
    os.rename(dest, aside)
    os.rename(staging, dest)
    fsync_dir(dest.parent)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _move_into(staging: Path, dest: Path, files: dict[str, str], previous: Manifest | None) -> None:
    """Move the verified files from ``staging`` into the existing folder ``dest``.

    Only the module's own names are written; with ``previous`` (another pulled version there),
    its files that the new version lacks are removed too. ``manifest.json`` goes first out and
    last in, so a folder left half-done by a killed pull is never taken for a whole module."""
    for rel in sorted(files):
        _check_inside(dest, rel)
    if previous is not None:
        (dest / MANIFEST_FILE).unlink(missing_ok=True)
        for rel in sorted(set(previous.files) - set(files)):
            (dest / rel).unlink(missing_ok=True)
            _remove_empty_parents(dest, rel)
    for rel in sorted(files, key=lambda r: r == MANIFEST_FILE):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging / rel, target)
        except OSError as exc:
            raise Conflict(f"{dest}: cannot write {rel} there ({exc.strerror})") from None
    for folder in {(dest / rel).parent for rel in files}:
        fsync_dir(folder)


def _check_inside(dest: Path, rel: str) -> None:
    """Every folder on the way to ``dest/rel`` is a real folder inside ``dest`` (not a link that
    would take the write elsewhere), and ``rel`` itself is not a folder."""
    here = dest
    for part in rel.split("/")[:-1]:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return  # created fresh below
        if not stat.S_ISDIR(mode):
            raise Conflict(f"{dest}: {here.relative_to(dest)} is not a folder, so {rel} cannot be written there")
    if (dest / rel).is_dir() and not (dest / rel).is_symlink():
        raise Conflict(f"{dest}: {rel} is a folder, so the module's file cannot be written there")


def _remove_empty_parents(dest: Path, rel: str) -> None:
    parent = (dest / rel).parent
    while parent != dest:
        try:
            parent.rmdir()
        except OSError:
            return  # not empty: someone else's files are there
        parent = parent.parent


__all__ = [
    "LocalModule",
    "ModuleContent",
    "UnsafeFile",
    "check_content",
    "check_module_for_push",
    "install_module",
    "model_card",
    "read_verified",
    "verify_module",
    "write_module",
]
