"""Hashing, path safety and the reading and writing of module folders."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

from tunehub.errors import IntegrityError, ManifestError, UnsafeFile

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_relative_path(path: str) -> str:
    """A module-internal path: relative, POSIX, no ``..``, no empty or hidden-trick parts."""
    if not isinstance(path, str) or path == "":
        raise ValueError("empty file path")
    if "\\" in path or "\x00" in path:
        raise ValueError(f"file path {path!r} contains a backslash or NUL")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("/"):
        raise ValueError(f"file path {path!r} is absolute")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"file path {path!r} has an empty, '.' or '..' part")
    return path


def is_pickle_name(path: str | Path) -> bool:
    return PurePosixPath(str(path)).suffix.lower() in PICKLE_SUFFIXES


def iter_module_files(folder: Path) -> Iterator[str]:
    """Relative POSIX paths of every regular file under ``folder``, refusing links and pickles."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in list(dirs):
            if (Path(root) / name).is_symlink():
                raise UnsafeFile(f"{Path(root) / name} is a symbolic link; modules hold regular files only")
        for name in sorted(files):
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            if full.is_symlink():
                raise UnsafeFile(f"{rel} is a symbolic link; modules hold regular files only")
            if is_pickle_name(rel):
                raise UnsafeFile(f"{rel} is a pickle-format file; tunehub accepts safetensors only")
            yield rel


def hash_folder(folder: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    return {rel: sha256_file(folder / rel) for rel in iter_module_files(folder) if rel not in exclude}


def verify_files(folder: Path, expected: dict[str, str], *, allow_extra: bool = False) -> None:
    """Check that ``folder`` holds exactly ``expected`` (path -> sha256), else raise."""
    from tunehub.registry.manifest import MANIFEST_FILE

    present = set(iter_module_files(folder)) - {MANIFEST_FILE}
    missing = sorted(set(expected) - present)
    if missing:
        raise IntegrityError(f"{folder}: files listed in the manifest are missing: {', '.join(missing)}")
    extra = sorted(present - set(expected))
    if extra and not allow_extra:
        raise IntegrityError(f"{folder}: files not listed in the manifest: {', '.join(extra)}")
    for rel, digest in sorted(expected.items()):
        actual = sha256_file(folder / rel)
        if actual != digest:
            raise IntegrityError(
                f"{folder}: {rel} does not match its sha256 (expected {digest[:12]}..., got {actual[:12]}...)"
            )


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode() + b"\n"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path, what: str = "file") -> object:
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{what} {path} is not valid JSON: {exc}") from None
