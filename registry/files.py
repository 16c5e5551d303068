"""Hashing, path safety and the reading and writing of module folders."""

from __future__ import annotations

import array
import errno
import hashlib
import json
import os
import re
import stat
import struct
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tunehub.errors import Conflict, IntegrityError, ManifestError, UnsafeFile

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20

# What the Hub accepts as a file path, so that a module pushed to one store can move to any
# other: huggingface_hub refuses any '.git' or '.cache' part (utils/_paths.py FORBIDDEN_FOLDERS)
# and tunehub's hub server paths over 1024 characters; 255 bytes is the name limit of git and
# of common filesystems.
MAX_PATH_CHARS = 1024
MAX_NAME_BYTES = 255
FORBIDDEN_PARTS = frozenset({".git", ".cache"})
# names the hf:// layout uses for itself (a module file there would clobber or be clobbered)
RESERVED_TOP_LEVEL = frozenset({".gitattributes", ".tunehub"})


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _has_control_character(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def check_relative_path(path: str) -> str:
    """A module-internal path: relative, POSIX, no ``..``, no empty or hidden-trick parts, no
    control characters. Every path a store reads back (records, manifests, hub state) passes
    here before it names a file to write."""
    if not isinstance(path, str) or path == "":
        raise ValueError("empty file path")
    if "\\" in path or "\x00" in path:
        raise ValueError(f"file path {path!r} contains a backslash or NUL")
    if _has_control_character(path):
        raise ValueError(f"file path {path!r} contains a control character")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("/"):
        raise ValueError(f"file path {path!r} is absolute")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"file path {path!r} has an empty, '.' or '..' part")
    return path


def check_module_file_name(path: str) -> str:
    """A file name a module may carry in every store: a safe relative path (above) that the Hub
    also accepts. Both stores apply it at push, so any module can move between them."""
    try:
        check_relative_path(path)
    except ValueError as exc:
        raise UnsafeFile(f"module file {path!r} has an unusable name: {exc}") from None
    if len(path) > MAX_PATH_CHARS:
        raise UnsafeFile(f"module file path {path[:60]!r}... is longer than {MAX_PATH_CHARS} characters")
    parts = path.split("/")
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise UnsafeFile(f"module file {path!r} has a name part longer than {MAX_NAME_BYTES} bytes")
        if part in FORBIDDEN_PARTS:
            raise UnsafeFile(f"module file {path!r} is inside a {part!r} folder, which the Hub refuses")
    if parts[0] in RESERVED_TOP_LEVEL:
        raise UnsafeFile(f"module file {path!r} clashes with the hub layout (.gitattributes, .tunehub/)")
    return path


def is_pickle_name(path: str | Path) -> bool:
    return PurePosixPath(str(path)).suffix.lower() in PICKLE_SUFFIXES


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def iter_module_files(folder: Path) -> Iterator[str]:
    """Relative POSIX paths of every regular file under ``folder``, refusing links, pickles and
    special files (FIFOs, sockets, devices: reading a FIFO would block forever). Nothing is
    opened: each entry is classified with ``lstat``. Symbolic links are refused, never followed,
    so a module is exactly the bytes inside its folder."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in list(dirs):
            if (Path(root) / name).is_symlink():
                raise UnsafeFile(f"{Path(root) / name} is a symbolic link; modules hold regular files only")
        for name in sorted(files):
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            try:
                mode = os.lstat(full).st_mode
            except FileNotFoundError:
                continue  # removed while the folder was walked
            if stat.S_ISLNK(mode):
                raise UnsafeFile(f"{rel} is a symbolic link; modules hold regular files only")
            if not stat.S_ISREG(mode):
                raise UnsafeFile(f"{rel} is {_kind_of(mode)}; modules hold regular files only")
            if is_pickle_name(rel):
                raise UnsafeFile(f"{rel} is a pickle-format file; tunehub accepts safetensors only")
            yield rel


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (not a link, FIFO or device).

    ``O_NONBLOCK`` keeps the open itself from waiting on a FIFO and ``O_NOFOLLOW`` from
    following a link swapped in after a check; ``fstat`` then decides on what was opened."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise UnsafeFile(f"{path} is a symbolic link; modules hold regular files only") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFile(f"{path} is {_kind_of(mode)}; modules hold regular files only")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path) -> bytes:
    with open_regular(path) as handle:
        return handle.read()


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
            raise IntegrityError(f"{folder}: {rel} does not match its sha256 (expected {digest[:12]}..., got {actual[:12]}...)")


def new_output_folder(out: str | Path, writer: str = "tunehub") -> Path:
    """``out`` as an absolute path, if it is new or an empty folder; else Conflict, nothing
    touched (a user's folder is never written over). ``writer`` names who refuses."""
    path = Path(os.path.abspath(Path(out).expanduser()))
    if os.path.lexists(path):
        if not path.is_dir():
            raise Conflict(f"{path} exists and is not a folder; choose a new folder for --out")
        with os.scandir(path) as entries:
            if any(True for _ in entries):
                raise Conflict(
                    f"{path} is not empty, and {writer} never writes over files: choose a new or empty folder for --out"
                )
    return path


def write_bytes_atomic(path: Path, data: bytes, *, staging: Path | None = None) -> None:
    """Write ``data`` to ``staging`` (default: a hidden file beside ``path``), fsync it, then
    rename it into place and fsync the folder: readers see the old file or the new one, and a
    crash leaves one of them. ``staging`` must be on the same file system as ``path``."""
    path = Path(path)
    tmp = staging if staging is not None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode() + b"\n")


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


# --- safetensors content ---------------------------------------------------------------------
#: the header of any real module is kilobytes; safetensors itself refuses more than 100 MB
MAX_SAFETENSORS_HEADER = 100_000_000
#: bytes per element of every safetensors dtype tunehub accepts (sub-byte F4/F6 are not)
SAFETENSORS_DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
# Float dtypes: (width in bytes of the integer view, mask). A value is NaN or infinite exactly
# when all the bits of the mask are set (its exponent field is all ones; for F8_E4M3, which has
# no infinity, the NaN pattern S.1111.111). C64 is checked as pairs of F32.
_NON_FINITE_BITS: dict[str, tuple[int, int]] = {
    "F8_E5M2": (1, 0x7C),
    "F8_E4M3": (1, 0x7F),
    "F8_E8M0": (1, 0xFF),
    "F16": (2, 0x7C00),
    "BF16": (2, 0x7F80),
    "F32": (4, 0x7F800000),
    "C64": (4, 0x7F800000),
    "F64": (8, 0x7FF0000000000000),
}


@dataclass(frozen=True)
class SafetensorsTensor:
    """Where one tensor of a safetensors file lies: ``begin``/``end`` count from the data section."""

    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


def read_safetensors_layout(handle: BinaryIO, size: int, bad: Callable[[str], Exception]) -> tuple[list[SafetensorsTensor], int]:
    """The tensors of the safetensors file open in ``handle`` (``size`` bytes), ordered by
    position, and where its data section starts; only the header is read.

    Everything is checked as the format requires, without torch: an 8-byte little-endian header
    length at most :data:`MAX_SAFETENSORS_HEADER` and inside the file; a header that is a JSON
    object of tensors with known dtypes and shapes; byte ranges of ``dtype size * prod(shape)``
    that tile the data section exactly (no overlap, no gap, nothing after). Raises ``bad(why)``."""
    head = handle.read(8)
    if len(head) != 8:
        raise bad("it is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_SAFETENSORS_HEADER:
        raise bad(f"header length {header_len} is above the limit of {MAX_SAFETENSORS_HEADER} bytes")
    if 8 + header_len > size:
        raise bad(f"header length {header_len} runs past the end of the file ({size} bytes)")
    raw = handle.read(header_len)
    if len(raw) != header_len:
        raise bad("the file changed size while it was read")
    tensors = sorted(_parse_safetensors_header(raw, bad), key=lambda t: (t.begin, t.end))
    data_len = size - 8 - header_len
    position = 0
    for tensor in tensors:
        if tensor.begin < position:
            raise bad(f"tensor {tensor.name!r} overlaps the tensor before it")
        if tensor.begin > position:
            raise bad(f"tensor {tensor.name!r} leaves unused bytes before it")
        if tensor.end > data_len:
            raise bad(f"tensor {tensor.name!r} lies outside the data section ({tensor.end} > {data_len} bytes)")
        position = tensor.end
    if position != data_len:
        raise bad(f"{data_len - position} bytes after the last tensor belong to no tensor")
    return tensors, 8 + header_len


def check_safetensors_file(path: str | Path, name: str | None = None) -> None:
    """Refuse ``path`` unless it is a well-formed safetensors file (:func:`read_safetensors_layout`)
    with finite float values, reading the file once and never through torch. So a pickle named
    ``.safetensors``, a truncated file or an absurd header is refused when it is pushed, not when a
    server loads it. Raises IntegrityError naming the file and the problem."""
    label = name or str(path)

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{label} is not a valid safetensors file: {why}")

    with open_regular(path) as handle:
        tensors, _ = read_safetensors_layout(handle, os.fstat(handle.fileno()).st_size, bad)
        for tensor in tensors:  # they tile the data section: read on, in order
            _check_finite(handle, tensor.dtype, tensor.end - tensor.begin, tensor.name, bad)


def _parse_safetensors_header(raw: bytes, bad: Callable[[str], Exception]) -> list[SafetensorsTensor]:
    """Every tensor of a safetensors header, every field type-checked."""
    if not raw.lstrip().startswith(b"{"):
        raise bad("the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    tensors: list[SafetensorsTensor] = []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ must map strings to strings")
            continue
        if not tensor or not isinstance(info, dict):
            raise bad(f"entry {tensor!r} is not a tensor description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_SIZES:
            raise bad(f"tensor {tensor!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"tensor {tensor!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise bad(f"tensor {tensor!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise bad(f"tensor {tensor!r} ends before it begins")
        elements = 1
        for dim in shape:
            elements *= dim
        expected = elements * SAFETENSORS_DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise bad(f"tensor {tensor!r} holds {end - begin} bytes, but {dtype} of shape {shape} needs {expected}")
        tensors.append(SafetensorsTensor(tensor, dtype, shape, begin, end))
    return tensors


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_ARRAY_CODES = {array.array(code).itemsize: code for code in "QLIHB"}


def _check_finite(handle: BinaryIO, dtype: str, length: int, tensor: str, bad: Callable[[str], IntegrityError]) -> None:
    """Read the next ``length`` bytes of ``handle`` (one tensor); refuse NaN or infinity."""
    width, mask = _NON_FINITE_BITS.get(dtype, (0, 0))
    remaining = length
    while remaining:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            raise bad("the file changed size while it was read")
        remaining -= len(chunk)
        if width and _any_non_finite(chunk, width, mask):
            raise bad(f"tensor {tensor!r} ({dtype}) holds NaN or infinite values")


def _any_non_finite(chunk: bytes, width: int, mask: int) -> bool:
    try:
        import numpy
    except ImportError:  # a registry-only install: slower, same answer
        words = array.array(_ARRAY_CODES[width], chunk)
        if sys.byteorder == "big" and width > 1:
            words.byteswap()
        return any(word & mask == mask for word in words)
    values = numpy.frombuffer(chunk, dtype=f"<u{width}")
    return bool(numpy.any((values & values.dtype.type(mask)) == mask))
