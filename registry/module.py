"""Writing and verifying module folders: the manifest, PEFT's config and the model card together."""

from __future__ import annotations

import hashlib
import json
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import yaml

from tunehub.errors import IntegrityError, ManifestError, UnsafeFile
from tunehub.registry.files import hash_folder, iter_module_files, verify_files
from tunehub.registry.manifest import (
    ADAPTER_CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Manifest,
)


def model_card(manifest: Manifest, name: str | None = None) -> str:
    """A Hub-style model card: YAML front matter, then a short human summary."""
    tags = ["tunehub", manifest.kind.value]
    if manifest.objective:
        tags.append(manifest.objective)
    if manifest.peft_loadable:
        tags += ["peft", f"base_model:adapter:{manifest.base.model_id}"]
    front: dict[str, object] = {
        "base_model": manifest.base.model_id,
        "library_name": "peft" if manifest.peft_loadable else "tunehub",
        "tags": tags,
    }
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
    lines += ["", "Load it with tunehub (`tunehub pull`) or, for PEFT kinds, `peft.PeftModel.from_pretrained`.", ""]
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
    open_file: Callable[[str], BinaryIO],
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


def _read_into_memory(rel: str, open_file: Callable[[str], BinaryIO], progress: queue.SimpleQueue[tuple[str, Any]], where: str) -> memoryview:
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
    return memoryview(numpy.empty(size, dtype=numpy.uint8)).cast("B")


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


def verify_module(folder: str | Path) -> LocalModule:
    """Read and validate ``folder``'s manifest and check every file against its hash.

    Raises ``ManifestError`` (bad or missing manifest), ``UnsafeFile`` (pickles, links) or
    ``IntegrityError`` (missing, unlisted or altered files).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    manifest = Manifest.read(folder)
    list(iter_module_files(folder))  # refuses pickles and links before any hashing
    verify_files(folder, manifest.files)
    expected_config = manifest.adapter_config()
    if expected_config is not None and ADAPTER_CONFIG_FILE not in manifest.files:
        raise IntegrityError(f"{folder}: a {manifest.kind.value} module must carry {ADAPTER_CONFIG_FILE}")
    return LocalModule(path=folder, manifest=manifest)


__all__ = ["model_card", "write_module", "verify_module", "check_content", "read_verified", "LocalModule", "ModuleContent", "UnsafeFile"]
