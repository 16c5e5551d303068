"""A private hub: a local folder served over the subset of the Hugging Face Hub HTTP API that
``huggingface_hub`` uses (``tunehub hub serve --root DIR``).

It lets a team share modules from one machine with the stock client (``HfApi``,
``hf_hub_download``, ``snapshot_download``, ``PeftModel.from_pretrained``) and it is what the
``hf://`` store's tests run against. Clients must set ``HF_HUB_DISABLE_XET=1``: uploads then use
the classic LFS batch protocol, which this server speaks; it never advertises Xet.

Storage layout under the root::

    objects/sha256/<aa>/<sha256>            every file's content, named by its sha256 (regular and LFS)
    repos/models/<namespace>/<name>/
        repo.json                           id and creation time
        refs.json                           {"branches": {name: commit}, "tags": {name: {"commit", "message"}}}
        commits/<aa>/<commit id>.json       immutable commit objects: parents, title, message, author,
                                            date and the whole file table {path: {sha256, size, oid, lfs}}
        .lock                               flock'ed while refs.json changes (one lock per repo)
    tmp/                                    uploads and records being written; never read as content

Guarantees:
- Writes are atomic: content, commit objects and refs are written aside in ``tmp/``, fsynced and
  renamed into place; a commit becomes visible only when ``refs.json`` is replaced under the
  repo's lock, after its ``parentCommit`` was checked against the branch head (412 otherwise).
- Nothing outside the root is ever read or written: repo names, revisions and file paths are
  validated (no ``..``, absolute paths, backslashes or NUL); revisions live in ``refs.json`` and
  never become file names; commit ids and object names are checked hex digests.
- With a token file, every write needs ``Authorization: Bearer <token>`` (LFS upload targets carry
  a signed URL instead, as the client sends no header there); reads stay anonymous.
- Bad input gets a clear 4xx with a JSON ``{"error": ...}`` body and, where the Hub has one, an
  ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).
- Malformed requests get a 400, never a 5xx: every parse of client bytes (request target, query,
  the headers this server interprets, JSON and NDJSON bodies, forms, chunk sizes, model-card YAML)
  goes through one of the ``parse_*`` functions below, which raise
  :class:`~tunehub.errors.InvalidRequest`; ``_dispatch`` turns it into the 400 in one place. The
  request line, query and headers are checked before authentication (a 400 there says nothing
  about any repo); bodies of writes are read only after it, so an anonymous client cannot make
  the server read and parse a large body.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote_to_bytes

import yaml

from tunehub.errors import InvalidRequest

DEFAULT_MAX_BODY_BYTES = 1 << 30
#: files above this size are stored as LFS objects whatever their content (as on the Hub)
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
#: extensions the Hub's default .gitattributes routes to LFS
LFS_SUFFIXES = frozenset(
    {
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".onnx",
        ".msgpack",
        ".model",
        ".gguf",
        ".npy",
        ".npz",
        ".pkl",
        ".pickle",
        ".zip",
        ".tar",
        ".gz",
        ".tgz",
        ".zst",
        ".arrow",
        ".parquet",
        ".png",
        ".jpg",
        ".jpeg",
        ".wasm",
        ".tflite",
        ".ot",
        ".joblib",
    }
)
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in sorted(LFS_SUFFIXES)).encode()
PAGE_SIZE = 1000
_CHUNK = 1 << 20
_SIGNED_URL_TTL_S = 3600

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_PATH_LENGTH = 1024


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's ``X-Error-Code`` where it has one."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def _bad(message: str) -> HubError:
    return HubError(400, message)


def _header_safe(value: str) -> str:
    """A header value that cannot split the response: error messages quote client input (a
    revision may be ``x%0D%0ASet-Cookie:...``), so control and non-ASCII characters become '?'."""
    return re.sub(r"[^\x20-\x7e]", "?", value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports (and uses as ETag) for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --- validation ----------------------------------------------------------------------------------
def check_repo_part(value: str, what: str) -> str:
    """One part of a repo id (namespace or name), safe as one path component."""
    if not isinstance(value, str) or not _REPO_PART.fullmatch(value):
        raise _bad(
            f"invalid {what} {value!r}: use letters, digits, '-', '_' and '.', start with a letter or digit,"
            " at most 96 characters"
        )
    if ".." in value or "--" in value or value.endswith((".", "-", ".git")):
        raise _bad(f"invalid {what} {value!r}: '..', '--', a trailing '.' or '-' and a '.git' suffix are not allowed")
    return value


def check_file_path(path: Any) -> str:
    """A path inside a repo: relative, POSIX, no empty, '.' or '..' parts, no backslash or NUL."""
    if not isinstance(path, str) or path == "":
        raise _bad("empty or missing file path")
    if len(path) > _MAX_PATH_LENGTH:
        raise _bad(f"file path is longer than {_MAX_PATH_LENGTH} characters")
    if "\\" in path or any(ord(c) < 32 for c in path):
        raise _bad(f"file path {path!r} contains a backslash or a control character")
    if path.startswith("/"):
        raise _bad(f"file path {path!r} is absolute")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _bad(f"file path {path!r} has an empty, '.' or '..' part")
    if parts[0] == ".git":
        raise _bad(f"file path {path!r} is inside .git")
    return path


def check_ref_name(name: Any, what: str = "revision") -> str:
    if not isinstance(name, str) or not _REF_NAME.fullmatch(name):
        raise _bad(f"invalid {what} name {name!r}")
    if ".." in name or "//" in name or name.endswith(("/", ".lock", ".")) or _SHA1.fullmatch(name):
        raise _bad(f"invalid {what} name {name!r}")
    return name


def _strip_ref_prefix(rev: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if rev.startswith(prefix):
            return rev[len(prefix) :]
    return rev


# --- parsing at the HTTP boundary ------------------------------------------------------------------
# Every function here reads bytes a client chose and raises InvalidRequest (a 400) for anything
# malformed; none lets a ValueError, UnicodeError or RecursionError through to become a 500.

#: numbers in URLs and headers: ASCII digits only ([0-9], not \d or str.isdigit, which accept
#: '²', '١' or '１'), at most 18 of them so that every value fits 64 bits
_UINT = re.compile(r"[0-9]{1,18}")
#: a '%' not followed by two hex digits
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: a request target: visible ASCII only (clients percent-encode everything else)
_TARGET = re.compile(r"[\x21-\x7e]+")
#: header values this server interprets: visible ASCII, spaces and tabs
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
#: a bearer token: visible ASCII, no space
_TOKEN = re.compile(r"[\x21-\x7e]+")
_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})")
#: scheme and authority of an absolute-form target: a host name or a bracketed IPv6 address, a port
_AUTHORITY = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?=[/?#]|$)", re.IGNORECASE)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_MAX_QUERY_FIELDS = 100_000  # forms list every path of a paths-info request
_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})
#: headers whose values this server reads; they must be ASCII and not repeated with other values
_INTERPRETED_HEADERS = ("Host", "Content-Length", "Transfer-Encoding", "Range", "Authorization", "Content-Type")


def parse_uint(text: str, what: str) -> int:
    """A non-negative integer written in ASCII digits (at most 18 of them)."""
    if not _UINT.fullmatch(text):
        raise InvalidRequest(f"{what} must be a non-negative integer in ASCII digits (at most 18), got {text[:40]!r}")
    return int(text)


def parse_flag(text: str, what: str) -> bool:
    """A boolean query parameter: 1/true/yes or 0/false/no, in any case."""
    value = text.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidRequest(f"{what} must be true or false, got {text[:40]!r}")


def decode_component(text: str, what: str) -> str:
    """Strict percent-decoding: refuses what ``unquote`` passes through (``%zz``) or silently
    replaces (bytes that are not UTF-8)."""
    if _BAD_ESCAPE.search(text):
        raise InvalidRequest(f"{what} has a malformed percent-escape: {text[:80]!r}")
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not UTF-8 once percent-decoded: {text[:80]!r}") from None


def parse_query(text: str, what: str = "query string") -> dict[str, list[str]]:
    """``a=1&b=2&a=3`` as ``{"a": ["1", "3"], "b": ["2"]}``; ``+`` is a space (forms); blank
    values are kept."""
    if not text.isascii():
        raise InvalidRequest(f"{what} holds non-ASCII bytes: percent-encode them")
    fields = [field for field in text.split("&") if field]
    if len(fields) > _MAX_QUERY_FIELDS:
        raise InvalidRequest(f"{what} has more than {_MAX_QUERY_FIELDS} fields")
    parsed: dict[str, list[str]] = {}
    for field_text in fields:
        key, _, value = field_text.partition("=")
        key = decode_component(key.replace("+", " "), what)
        parsed.setdefault(key, []).append(decode_component(value.replace("+", " "), what))
    return parsed


def parse_target(target: str) -> tuple[list[str], dict[str, list[str]]]:
    """The request target as (decoded path segments, query)."""
    if not _TARGET.fullmatch(target):
        raise InvalidRequest("the request target holds bytes that are not visible ASCII: percent-encode them")
    if re.match(r"https?://", target, re.IGNORECASE):  # absolute-form, as sent through proxies
        authority = _AUTHORITY.match(target)
        if authority is None:
            raise InvalidRequest(f"malformed absolute URL {target[:80]!r}")
        target = target[authority.end() :] or "/"
    target = target.partition("#")[0]
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        raise InvalidRequest(f"the request target {path[:80]!r} is not an absolute path")
    raw_segments = path.split("/")[1:]
    if any(s == "" for s in raw_segments[:-1]):
        raise InvalidRequest("empty path segment")
    segments = [decode_component(s, "the path") for s in raw_segments]
    if any("\x00" in s for s in segments):
        raise InvalidRequest("NUL byte in the path")
    return segments, parse_query(query)


def parse_content_length(values: list[str]) -> int | None:
    """Content-Length from all its header lines (a list ``5, 5`` is allowed; different values are not)."""
    if not values:
        return None
    lengths = {parse_uint(part.strip(), "Content-Length") for value in values for part in value.split(",")}
    if len(lengths) != 1:
        raise InvalidRequest(f"conflicting Content-Length values {sorted(lengths)}")
    return lengths.pop()


def parse_transfer_encoding(value: str | None) -> bool:
    """Whether the body is chunked; any other transfer coding is refused."""
    if value is None:
        return False
    codings = [c.strip().lower() for c in value.split(",") if c.strip()]
    if codings != ["chunked"]:
        raise InvalidRequest(f"unsupported Transfer-Encoding {value[:80]!r}: only 'chunked' is accepted")
    return True


def parse_chunk_size(line: bytes) -> int:
    """The size line of a chunk: hex digits, optionally followed by ``;extensions``."""
    size = line.split(b";", 1)[0].strip(b" \t\r\n")
    if not _CHUNK_SIZE.fullmatch(size):
        raise InvalidRequest("malformed chunked encoding")
    return int(size, 16)


def parse_range(value: str) -> tuple[int | None, int | None]:
    """One byte range, ``bytes=first-last``, ``bytes=first-`` or ``bytes=-suffix``, as (first, last);
    for a suffix range first is None and last is the suffix length."""
    match = _RANGE.fullmatch(value.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise InvalidRequest(f"invalid Range header {value[:80]!r}: use bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX")
    first, last = match.group(1), match.group(2)
    return (int(first) if first else None), (int(last) if last else None)


def parse_authorization(value: str) -> tuple[str, str]:
    """(scheme in lower case, credentials). A Bearer header must carry exactly one token; other
    schemes are returned as they are (and get a 401 where a token is needed)."""
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip(" \t")
    if scheme == "":
        raise InvalidRequest("empty Authorization header: send 'Authorization: Bearer <token>' or no header")
    if scheme.lower() == "bearer" and not _TOKEN.fullmatch(credentials):
        raise InvalidRequest("malformed Authorization header: use 'Authorization: Bearer <token>'")
    return scheme.lower(), credentials


def parse_json(data: bytes | str, what: str = "request body") -> Any:
    """JSON from a client: malformed, non-UTF-8, too deeply nested or with integers too long for
    ``int()`` is a 400 (``json.loads`` raises ValueError or RecursionError on those)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer past int()'s digit limit
        raise InvalidRequest(f"{what} is not valid JSON") from None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` of untrusted text; InvalidRequest for anything it cannot load (PyYAML
    raises not only YAMLError but ValueError for a bad date, RecursionError for deep nesting...)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"invalid YAML: {exc}") from None
    except RecursionError:
        raise InvalidRequest("invalid YAML: nested too deeply") from None
    except (ValueError, TypeError, AttributeError, LookupError, OverflowError) as exc:
        raise InvalidRequest(f"invalid YAML: {exc}") from None


def _json_safe(value: Any, budget: list[int], depth: int = 0) -> Any:
    """A copy of YAML data that json.dumps can write: dates as strings, and refusing cycles,
    deep nesting and alias bombs (a few bytes of YAML anchors can expand to billions of nodes)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 64:
        raise InvalidRequest("the YAML front matter is too large or too deeply nested")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v, budget, depth + 1) for v in value]
    return str(value)  # dates, datetimes, bytes


# --- storage ---------------------------------------------------------------------------------
@dataclass
class Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    files: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parents": self.parents,
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
            "files": self.files,
        }


class HubStorage:
    """The folder behind the server; every method is safe to call from many threads."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for sub in ("objects/sha256", "repos/models", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # paths (every argument was validated before it gets here)
    def repo_dir(self, namespace: str, name: str) -> Path:
        return self.root / "repos" / "models" / check_repo_part(namespace, "namespace") / check_repo_part(name, "name")

    def object_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise _bad(f"invalid object id {sha256!r}")
        return self.root / "objects" / "sha256" / sha256[:2] / sha256

    def _commit_path(self, repo: Path, commit_id: str) -> Path:
        if not _SHA1.fullmatch(commit_id):
            raise _bad(f"invalid commit id {commit_id!r}")
        return repo / "commits" / commit_id[:2] / f"{commit_id}.json"

    def tmp_path(self, suffix: str = "") -> Path:
        return self.root / "tmp" / f"{uuid.uuid4().hex}{suffix}"

    # atomic writes
    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = self.tmp_path(".part")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def put_object_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.object_path(digest)
        if not target.exists():
            self._write_atomic(target, data)
        return digest

    def stage_bytes(self, data: bytes) -> tuple[Path, str]:
        """Write content aside in tmp/; it becomes an object only when a commit is accepted."""
        tmp = self.tmp_path(".staged")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp, hashlib.sha256(data).hexdigest()

    def publish_staged(self, tmp: Path, sha256: str) -> None:
        target = self.object_path(sha256)
        if target.exists():
            tmp.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def put_object_stream(self, chunks: Iterator[bytes], expected_sha256: str, expected_size: int) -> None:
        """Stream an upload aside while hashing it; it enters the store only if it is what was announced."""
        target = self.object_path(expected_sha256)
        tmp = self.tmp_path(".upload")
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > expected_size:
                        raise _bad(f"upload is larger than the announced {expected_size} bytes")
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if size != expected_size or digest.hexdigest() != expected_sha256:
                raise _bad("uploaded content does not match its oid and size")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def object_size(self, sha256: str) -> int | None:
        try:
            return self.object_path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    # repos
    def repo_exists(self, namespace: str, name: str) -> bool:
        return (self.repo_dir(namespace, name) / "refs.json").is_file()

    def require_repo(self, namespace: str, name: str) -> Path:
        repo = self.repo_dir(namespace, name)
        if not (repo / "refs.json").is_file():
            raise HubError(404, f"Repository {namespace}/{name} not found", "RepoNotFound")
        return repo

    def create_repo(self, namespace: str, name: str, author: str) -> None:
        target = self.repo_dir(namespace, name)
        if (target / "refs.json").is_file():
            raise HubError(409, f"You already created this model repo: {namespace}/{name}")
        staging = self.tmp_path(".repo")
        staging.mkdir()
        try:
            attributes = self.put_object_bytes(GITATTRIBUTES)
            initial = self._make_commit(
                staging,
                parents=[],
                title="initial commit",
                message="",
                author=author,
                files={
                    ".gitattributes": {
                        "sha256": attributes,
                        "size": len(GITATTRIBUTES),
                        "oid": git_blob_oid(GITATTRIBUTES),
                        "lfs": False,
                    }
                },
            )
            meta = {"id": f"{namespace}/{name}", "created_at": _now()}
            self._write_atomic(staging / "repo.json", _dumps(meta))
            self._write_atomic(staging / "refs.json", _dumps({"branches": {"main": initial.id}, "tags": {}}))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, target)  # atomic; fails when another create won
            except OSError:
                raise HubError(409, f"You already created this model repo: {namespace}/{name}") from None
            _fsync_dir(target.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def delete_repo(self, namespace: str, name: str) -> None:
        repo = self.require_repo(namespace, name)
        with self.locked(repo):
            trash = self.tmp_path(".deleted")
            os.rename(repo, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def iter_repos(self) -> Iterator[tuple[str, str]]:
        base = self.root / "repos" / "models"
        for namespace in sorted(os.listdir(base)):
            ns_dir = base / namespace
            if not ns_dir.is_dir() or not _REPO_PART.fullmatch(namespace):
                continue
            for name in sorted(os.listdir(ns_dir)):
                if (ns_dir / name / "refs.json").is_file():
                    yield namespace, name

    def repo_meta(self, repo: Path) -> dict[str, Any]:
        return _loads(repo / "repo.json")

    @contextmanager
    def locked(self, repo: Path) -> Iterator[None]:
        # flock on separately opened files also excludes other threads of this process
        with open(repo / ".lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # refs and commits
    def refs(self, repo: Path) -> dict[str, Any]:
        refs = _loads(repo / "refs.json")
        refs.setdefault("branches", {})
        refs.setdefault("tags", {})
        return refs

    def write_refs(self, repo: Path, refs: dict[str, Any]) -> None:
        self._write_atomic(repo / "refs.json", _dumps(refs))

    def commit(self, repo: Path, commit_id: str) -> Commit:
        try:
            data = _loads(self._commit_path(repo, commit_id))
        except FileNotFoundError:
            raise HubError(404, f"Invalid rev id: {commit_id}", "RevisionNotFound") from None
        return Commit(**data)

    def has_commit(self, repo: Path, commit_id: str) -> bool:
        return self._commit_path(repo, commit_id).is_file()

    def resolve(self, repo: Path, rev: str) -> tuple[Commit, str | None]:
        """(commit, branch name or None) for a branch, tag or commit id."""
        refs = self.refs(repo)
        name = _strip_ref_prefix(rev)
        if name in refs["branches"]:
            return self.commit(repo, refs["branches"][name]), name
        if name in refs["tags"]:
            return self.commit(repo, refs["tags"][name]["commit"]), None
        if _SHA1.fullmatch(rev) and self.has_commit(repo, rev):
            return self.commit(repo, rev), None
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _make_commit(
        self,
        repo: Path,
        *,
        parents: list[str],
        title: str,
        message: str,
        author: str,
        files: dict[str, dict[str, Any]],
    ) -> Commit:
        body = {"parents": parents, "title": title, "message": message, "author": author, "date": _now(), "files": files}
        # content-addressed like git: the id is the sha1 of the canonical record (plus a nonce)
        body["nonce"] = secrets.token_hex(8)
        commit_id = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        del body["nonce"]
        commit = Commit(id=commit_id, **body)
        self._write_atomic(self._commit_path(repo, commit_id), _dumps(commit.to_dict()))
        return commit

    def apply_commit(
        self,
        repo: Path,
        branch: str,
        *,
        parent: str | None,
        title: str,
        message: str,
        author: str,
        operations: list[tuple[str, str, dict[str, Any] | None]],
    ) -> Commit:
        """Apply (op, path, entry) operations on the head of ``branch`` and move it, atomically."""
        with self.locked(repo):
            refs = self.refs(repo)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = refs["branches"][branch]
            if parent is not None and parent != head:
                raise HubError(
                    412,
                    f"A commit has happened since {parent[:12]} (the head of {branch} is {head[:12]}): refresh and try again",
                )
            files = dict(self.commit(repo, head).files)
            for op, path, entry in operations:
                if op == "add":
                    entry = dict(entry)  # type: ignore[arg-type]
                    staged = entry.pop("staged", None)
                    if staged is not None:
                        self.publish_staged(Path(staged), entry["sha256"])
                    if any(other.startswith(path + "/") for other in files):
                        raise _bad(f"{path} is a folder in this revision")
                    if any(prefix in files for prefix in _parents(path)):
                        raise _bad(f"a parent folder of {path} is a file in this revision")
                    files[path] = entry  # type: ignore[assignment]
                elif op == "delete":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                else:  # delete a folder
                    inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
            commit = self._make_commit(repo, parents=[head], title=title, message=message, author=author, files=files)
            refs["branches"][branch] = commit.id
            self.write_refs(repo, refs)
            return commit

    def history(self, repo: Path, start: Commit) -> Iterator[Commit]:
        commit: Commit | None = start
        seen = set()
        while commit is not None and commit.id not in seen:
            seen.add(commit.id)
            yield commit
            commit = self.commit(repo, commit.parents[0]) if commit.parents else None

    def read_object(self, sha256: str) -> bytes:
        return self.object_path(sha256).read_bytes()


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, indent=1, sort_keys=True).encode() + b"\n"


def _loads(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")  # noqa: TRY004 - callers catch a corrupt file as ValueError
    return data


def _fsync_dir(path: Path) -> None:
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


_FRONT_MATTER = re.compile(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", re.DOTALL)


def front_matter(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the YAML front matter of a model card as JSON-safe data, or None; why it is unusable, or None)."""
    if not text.startswith("---"):
        return None, None
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None, "the YAML front matter is not closed by '---'"
    try:
        data = _json_safe(load_yaml(match.group(1)), [100_000])
    except InvalidRequest as exc:
        return None, str(exc)
    if data is not None and not isinstance(data, dict):
        return None, "the YAML front matter must be a mapping"
    return data, None


def card_data(text: str) -> dict[str, Any] | None:
    """The YAML front matter of a model card, or None when it has none (or it is not a usable mapping)."""
    return front_matter(text)[0]


# --- HTTP ------------------------------------------------------------------------------------------
@dataclass
class HubConfig:
    root: Path
    tokens: frozenset[str] = frozenset()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    verbose: bool = False
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))


def load_tokens(path: str | Path) -> frozenset[str]:
    """One accepted token per line; blank lines and ``#`` comments are skipped."""
    tokens = set()
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.add(line)
    if not tokens:
        raise ValueError(f"{path} holds no token")
    return frozenset(tokens)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], config: HubConfig):
        self.config = config
        self.storage = HubStorage(config.root)
        self._meta_cache: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._meta_lock = threading.Lock()
        super().__init__(address, HubRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _BodyTooLarge(HubError):
    pass


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tunehub-hub/1"
    # headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms
    disable_nagle_algorithm = True
    # a client that stops sending mid-request frees its thread after this many idle seconds
    timeout = 120
    server: HubHTTPServer

    # --- plumbing ------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
        if self.server.config.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Requests the stdlib refuses before dispatch (bad request line, huge headers) get JSON too."""
        self.close_connection = True
        if code == 501:  # a method the stdlib has no do_X for: the same 405 as PATCH or OPTIONS get
            code, message = 405, f"method {self.command!r} is not supported"
        text = _header_safe(message or self.responses.get(code, ("error",))[0])
        data = json.dumps({"error": text}).encode()
        self.send_response(code, text)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        if code == 405:
            self.send_header("Allow", "GET, HEAD, POST, PUT, DELETE")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        self._body_done = False
        self._sent = False
        self._framing_known = False  # until Content-Length and Transfer-Encoding have parsed
        self._chunked = False
        self._length: int | None = None
        self._range: tuple[int | None, int | None] | None = None
        self._authorization: tuple[str, str] | None = None
        self.segments: list[str] = []
        self.query: dict[str, list[str]] = {}
        try:
            self._parse_head()
            self._route(method)
        except InvalidRequest as exc:  # the one place a malformed request becomes its 400 (or 413)
            self._send_error(HubError(exc.http_status, str(exc)))
        except HubError as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so without leaking details
            if self.server.config.verbose:
                traceback.print_exc()
            else:
                sys.stderr.write(f"tunehub hub: internal error on {method} {self.path}: {exc!r}\n")
            self._send_error(HubError(500, "internal server error"))

    def _parse_head(self) -> None:
        """Parse the request target and every header this server interprets, before routing and
        authentication: a malformed request is a 400 whoever sends it."""
        self.segments, self.query = parse_target(self.path)
        values = {name: self._header(name) for name in _INTERPRETED_HEADERS}
        self._chunked = parse_transfer_encoding(values["Transfer-Encoding"])
        self._length = parse_content_length(self.headers.get_all("Content-Length") or [])
        if self._chunked and self._length is not None:
            # which one frames the body? a proxy may disagree with us (request smuggling): refuse
            raise InvalidRequest("a request cannot have both Content-Length and Transfer-Encoding")
        self._framing_known = True
        if values["Range"] is not None:
            self._range = parse_range(values["Range"])
        if values["Authorization"] is not None:
            self._authorization = parse_authorization(values["Authorization"])

    def _header(self, name: str) -> str | None:
        """A header's value: ASCII without control characters, and one value even if sent twice."""
        values = self.headers.get_all(name) or []
        for value in values:
            if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
                raise InvalidRequest(f"the {name} header holds bytes that are not printable ASCII")
        if name != "Content-Length" and len(set(values)) > 1:  # Content-Length: parse_content_length
            raise InvalidRequest(f"conflicting {name} headers")
        return values[0] if values else None

    def _send_error(self, exc: HubError) -> None:
        if self._sent:
            self.close_connection = True
            return
        headers = dict(exc.headers)
        if exc.code:
            headers["X-Error-Code"] = exc.code
        headers["X-Error-Message"] = exc.message[:500]
        self._send_json(exc.status, {**exc.extra, "error": exc.message}, headers)

    def _send_json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self._send_bytes(status, data, "application/json; charset=utf-8", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, _header_safe(value))
        if not self._body_done and self._has_body():
            # an unread request body would be taken for the next request: close instead
            self.close_connection = True
        if self.close_connection:
            # say so: a client that reuses a connection we close silently races our close
            self.send_header("Connection", "close")
        self.end_headers()
        self._sent = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def _has_body(self) -> bool:
        if not self._framing_known:  # unparsable framing: where the body ends is unknown
            return True
        return self._chunked or bool(self._length)

    def _iter_body(self, limit: int) -> Iterator[bytes]:
        """The request body in chunks (Content-Length or chunked), refusing more than ``limit``."""
        if self._chunked:
            total = 0
            while True:
                line = self.rfile.readline(1026)
                try:
                    size = parse_chunk_size(line)
                except InvalidRequest:
                    self.close_connection = True
                    raise
                if size == 0:
                    while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > limit:
                    self._drain_chunks(size, limit + 64 * _CHUNK - total)
                    self.close_connection = True
                    raise _BodyTooLarge(413, f"request body is larger than the limit of {limit} bytes")
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        self.close_connection = True
                        raise _bad("request body ended early")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(3)
            self._body_done = True
            return
        length = self._length or 0
        if length > limit:
            self._refuse_oversized(length, limit)
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                self.close_connection = True
                raise _bad("request body ended early")
            remaining -= len(chunk)
            yield chunk
        self._body_done = True

    def _drain_chunks(self, pending: int, budget: int) -> None:
        """Read and drop the rest of a chunked body (up to ``budget`` bytes) so the client reads our 413."""
        while budget > 0:
            while pending and budget > 0:
                chunk = self.rfile.read(min(pending, _CHUNK))
                if not chunk:
                    return
                pending -= len(chunk)
                budget -= len(chunk)
            self.rfile.readline(3)
            line = self.rfile.readline(1026)
            try:
                pending = parse_chunk_size(line)
            except InvalidRequest:
                return
            if pending == 0:
                self._body_done = True
                return

    def _refuse_oversized(self, length: int, limit: int) -> None:
        # drain a modest excess so the client reads our answer instead of a reset; close after it
        if length <= limit + 64 * _CHUNK:
            remaining = length
            while remaining:
                chunk = self.rfile.read(min(remaining, _CHUNK))
                if not chunk:
                    break
                remaining -= len(chunk)
            self._body_done = True
        self.close_connection = True
        raise _BodyTooLarge(413, f"request body of {length} bytes is larger than the limit of {limit} bytes")

    def _read_body(self, limit: int | None = None) -> bytes:
        limit = self.server.config.max_body_bytes if limit is None else min(limit, self.server.config.max_body_bytes)
        return b"".join(self._iter_body(limit))

    def _spool_body(self) -> IO[bytes]:
        """The body in a temporary file (in memory while small), for NDJSON commits."""
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - returned open; the caller closes it
            max_size=8 * _CHUNK, dir=self.server.storage.root / "tmp"
        )
        try:
            for chunk in self._iter_body(self.server.config.max_body_bytes):
                spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    def _json_body(self, limit: int = 16 * _CHUNK) -> dict[str, Any]:
        data = self._read_body(limit)
        if not data.strip():
            return {}
        payload = parse_json(data)
        if not isinstance(payload, dict):
            raise _bad("request body must be a JSON object")
        return payload

    def _base_url(self) -> str:
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        if not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", host):
            host = "{}:{}".format(*self.server.server_address[:2])
        return f"http://{host}"

    def _flag(self, name: str) -> bool:
        values = self.query.get(name)
        return bool(values) and parse_flag(values[-1], name)

    def _uint_param(self, name: str) -> int | None:
        values = self.query.get(name)
        return parse_uint(values[-1], name) if values else None

    # --- auth ----------------------------------------------------------------------------------
    def _user(self) -> str | None:
        """The caller's identity when a valid token was sent; raises 401 for an invalid one."""
        if self._authorization is None:
            return None
        scheme, token = self._authorization  # well-formed: _parse_head checked it
        tokens = self.server.config.tokens
        if scheme != "bearer":
            raise HubError(401, "Invalid credentials in Authorization header")
        if not tokens:
            return "anonymous"
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens):
            raise HubError(401, "Invalid credentials in Authorization header")
        return "user-" + hashlib.sha256(token.encode()).hexdigest()[:8]

    def _require_writer(self) -> str:
        user = self._user()
        if self.server.config.tokens and user is None:
            raise HubError(401, "this hub accepts writes only with a token: send Authorization: Bearer <token>")
        return user or "anonymous"

    def _sign(self, *parts: str) -> str:
        message = "|".join(parts).encode()
        return hmac.new(self.server.config.secret, message, hashlib.sha256).hexdigest()

    # --- routing -------------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        if method not in ("GET", "HEAD", "POST", "PUT", "DELETE"):
            raise HubError(405, f"method {method} is not supported", headers={"Allow": "GET, HEAD, POST, PUT, DELETE"})
        s = self.segments
        if len(s) >= 1 and s[0] == "api":
            return self._route_api(method, s[1:])
        if len(s) >= 3 and s[0] in ("datasets", "spaces", "kernels"):
            raise HubError(404, "this hub serves model repositories only", "RepoNotFound")
        if len(s) >= 5 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            namespace, name = s[0], s[1][: -len(".git")]
            rest = s[5:]
            if rest == ["batch"] and method == "POST":
                return self._lfs_batch(namespace, name)
            if len(rest) == 1 and method == "PUT":
                return self._lfs_put(namespace, name, rest[0])
            if rest == ["verify"] and method == "POST":
                return self._lfs_verify(namespace, name)
        if len(s) >= 4 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(s[0], s[1], s[3], "/".join(s[4:]))
        raise HubError(404, f"no such endpoint: {method} /{'/'.join(s)}")

    def _route_api(self, method: str, s: list[str]) -> None:
        if s == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if s == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if s == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if s in (["whoami-v2"], ["whoami"]) and method == "GET":
            return self._whoami()
        if s == ["agent-harnesses"] and method == "GET":
            # huggingface_hub asks its endpoint for this list once a day; there is none here
            return self._send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if s == ["models"] and method == "GET":
            return self._list_models()
        if s and s[0] in ("datasets", "spaces", "kernels"):
            raise HubError(404, "this hub serves model repositories only", "RepoNotFound")
        if len(s) < 3 or s[0] != "models":
            raise HubError(404, f"no such endpoint: {method} /api/{'/'.join(s)}")
        namespace, name, rest = s[1], s[2], s[3:]
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        action = rest[0] if rest else None
        arg = rest[1] if len(rest) > 1 else None
        if action is None and method == "GET":
            return self._model_info(namespace, name, "main")
        if action == "revision" and len(rest) == 2 and method == "GET":
            return self._model_info(namespace, name, arg)  # type: ignore[arg-type]
        if action == "refs" and len(rest) == 1 and method == "GET":
            return self._list_refs(namespace, name)
        if action == "tree" and len(rest) >= 2 and method == "GET":
            return self._tree(namespace, name, arg, "/".join(rest[2:]))  # type: ignore[arg-type]
        if action == "commits" and len(rest) == 2 and method == "GET":
            return self._commits(namespace, name, arg)  # type: ignore[arg-type]
        if action == "paths-info" and len(rest) == 2 and method == "POST":
            return self._paths_info(namespace, name, arg)  # type: ignore[arg-type]
        if action == "preupload" and len(rest) == 2 and method == "POST":
            return self._preupload(namespace, name, arg)  # type: ignore[arg-type]
        if action == "commit" and len(rest) == 2 and method == "POST":
            return self._commit(namespace, name, arg)  # type: ignore[arg-type]
        if action == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._create_tag(namespace, name, arg) if method == "POST" else self._delete_tag(namespace, name, arg)  # type: ignore[arg-type]
        if action == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            return (
                self._create_branch(namespace, name, arg)  # type: ignore[arg-type]
                if method == "POST"
                else self._delete_branch(namespace, name, arg)  # type: ignore[arg-type]
            )
        raise HubError(404, f"no such endpoint: {method} /api/{'/'.join(s)}")

    # --- repos ---------------------------------------------------------------------------------
    def _repo_id_from_body(self, body: dict[str, Any]) -> tuple[str, str]:
        name = body.get("name")
        organization = body.get("organization")
        repo_type = body.get("type") or "model"
        if repo_type != "model":
            raise _bad("this hub serves model repositories only")
        if isinstance(name, str) and "/" in name and organization is None:
            organization, _, name = name.partition("/")
        if not isinstance(organization, str) or not organization:
            raise _bad("repositories need a namespace: create 'namespace/name'")
        return check_repo_part(organization, "namespace"), check_repo_part(name, "name")  # type: ignore[arg-type]

    def _create_repo(self) -> None:
        user = self._require_writer()
        body = self._json_body()
        namespace, name = self._repo_id_from_body(body)
        url = f"{self._base_url()}/{namespace}/{name}"
        try:
            self.server.storage.create_repo(namespace, name, user)
        except HubError as exc:
            exc.extra["url"] = url  # the client reads it even from a 409 (exist_ok=True)
            raise
        self._send_json(200, {"url": url, "name": f"{namespace}/{name}", "id": f"{namespace}/{name}"})

    def _delete_repo(self) -> None:
        self._require_writer()
        namespace, name = self._repo_id_from_body(self._json_body())
        self.server.storage.delete_repo(namespace, name)
        self._send_json(200, {})

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json(200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": {"type": "access_token"}})

    def _validate_yaml(self) -> None:
        body = self._json_body()
        content = body.get("content", "")
        if not isinstance(content, str):
            raise _bad("content must be a string")
        _, problem = front_matter(content)
        errors = [{"message": problem}] if problem else []
        if errors:
            self._send_json(400, {"errors": errors, "warnings": [], "error": errors[0]["message"]})
        else:
            self._send_json(200, {"errors": [], "warnings": []})

    # --- metadata ------------------------------------------------------------------------------
    def _card_of(self, repo: Path, commit: Commit) -> dict[str, Any] | None:
        entry = commit.files.get("README.md")
        if entry is None or entry["size"] > 1 << 20:
            return None
        key = (str(repo), commit.id, "card")
        with self.server._meta_lock:
            if key in self.server._meta_cache:
                return self.server._meta_cache[key]
        try:
            text = self.server.storage.read_object(entry["sha256"]).decode("utf-8", "replace")
        except OSError:
            return None
        data = card_data(text)
        with self.server._meta_lock:
            if len(self.server._meta_cache) > 4096:
                self.server._meta_cache.clear()
            self.server._meta_cache[key] = data  # type: ignore[assignment]
        return data

    def _model_summary(
        self, namespace: str, name: str, commit: Commit, *, card: bool, siblings: bool, blobs: bool
    ) -> dict[str, Any]:
        repo = self.server.storage.repo_dir(namespace, name)
        meta = self.server.storage.repo_meta(repo)
        data = self._card_of(repo, commit) or {}
        raw_tags = data.get("tags")
        raw_tags = [raw_tags] if isinstance(raw_tags, str) else raw_tags if isinstance(raw_tags, list) else []
        tags = [str(t) for t in raw_tags if isinstance(t, (str, int, float)) and not isinstance(t, bool)]
        library = data.get("library_name") if isinstance(data.get("library_name"), str) else None
        if library and library not in tags:
            tags.append(library)
        base = data.get("base_model")
        for model in [base] if isinstance(base, str) else base if isinstance(base, list) else []:
            if isinstance(model, str) and f"base_model:{model}" not in tags:
                tags.append(f"base_model:{model}")
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{namespace}/{name}".encode()).hexdigest()[:24],
            "id": f"{namespace}/{name}",
            "modelId": f"{namespace}/{name}",
            "author": namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta.get("created_at"),
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": library,
            "pipeline_tag": data.get("pipeline_tag") if isinstance(data.get("pipeline_tag"), str) else None,
        }
        if card:
            info["cardData"] = data or None
        if siblings:
            info["siblings"] = [self._sibling(path, entry, blobs) for path, entry in sorted(commit.files.items())]
        return info

    @staticmethod
    def _sibling(path: str, entry: dict[str, Any], blobs: bool) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": path}
        if blobs:
            sibling["size"] = entry["size"]
            sibling["blobId"] = entry["oid"]
            if entry["lfs"]:
                pointer = lfs_pointer(entry["sha256"], entry["size"])
                sibling["lfs"] = {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
        return sibling

    def _model_info(self, namespace: str, name: str, rev: str) -> None:
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        commit, _ = storage.resolve(repo, rev)
        info = self._model_summary(namespace, name, commit, card=True, siblings=True, blobs=self._flag("blobs"))
        self._send_json(200, info)

    def _list_models(self) -> None:
        storage = self.server.storage
        search = (self.query.get("search") or [""])[-1].lower()
        author = (self.query.get("author") or [None])[-1]
        wanted = set(self.query.get("filter", []))
        full = self._flag("full")
        with_card = full or self._flag("cardData")
        limit_param = self._uint_param("limit")
        limit = min(limit_param, PAGE_SIZE) if limit_param is not None else PAGE_SIZE
        cursor = self._uint_param("cursor") or 0
        found = []
        for namespace, name in storage.iter_repos():
            repo_id = f"{namespace}/{name}"
            if author and namespace != author:
                continue
            if search and search not in repo_id.lower():
                continue
            repo = storage.repo_dir(namespace, name)
            try:
                head, _ = storage.resolve(repo, "main")
            except (HubError, OSError, ValueError):
                continue
            info = self._model_summary(namespace, name, head, card=with_card, siblings=full, blobs=False)
            if wanted and not wanted.issubset(set(info["tags"]) | {info["library_name"]}):
                continue
            found.append(info)
        page = found[cursor : cursor + limit]
        headers = {}
        if cursor + limit < len(found) and limit_param is None:
            query = "&".join(f"{quote(k)}={quote(v)}" for k, values in self.query.items() if k != "cursor" for v in values)
            headers["Link"] = f'<{self._base_url()}/api/models?{query}&cursor={cursor + limit}>; rel="next"'
        self._send_json(200, page, headers)

    def _list_refs(self, namespace: str, name: str) -> None:
        storage = self.server.storage
        refs = storage.refs(storage.require_repo(namespace, name))
        self._send_json(
            200,
            {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(refs["branches"].items())
                ],
                "tags": [
                    {"name": t, "ref": f"refs/tags/{t}", "targetCommit": v["commit"]} for t, v in sorted(refs["tags"].items())
                ],
                "converts": [],
                "pullRequests": [],
            },
        )

    def _tree_entry(self, path: str, entry: dict[str, Any], commit: Commit, expand: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            item["lfs"] = {
                "oid": entry["sha256"],
                "size": entry["size"],
                "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"])),
            }
        if expand:
            item["lastCommit"] = {"id": commit.id, "title": commit.title, "date": commit.date}
        return item

    def _tree(self, namespace: str, name: str, rev: str, path: str) -> None:
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        commit, _ = storage.resolve(repo, rev)
        path = check_file_path(path) if path else ""
        recursive = self._flag("recursive")
        expand = self._flag("expand")
        prefix = path + "/" if path else ""
        if path and path in commit.files:
            raise HubError(404, f"{path} is a file, not a folder", "EntryNotFound", {"X-Repo-Commit": commit.id})
        inside = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
        if path and not inside:
            raise HubError(404, f"no folder {path} at {rev}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        items: list[dict[str, Any]] = []
        folders: set[str] = set()
        for file_path in sorted(inside):
            rel = file_path[len(prefix) :]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    oid = hashlib.sha1(f"{commit.id}:{folder}".encode()).hexdigest()
                    items.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                items.append(self._tree_entry(file_path, inside[file_path], commit, expand))
        self._send_paginated(items)

    def _send_paginated(self, items: list[dict[str, Any]]) -> None:
        cursor = self._uint_param("cursor") or 0
        page = items[cursor : cursor + PAGE_SIZE]
        headers = {}
        if cursor + PAGE_SIZE < len(items):
            query = "&".join(f"{quote(k)}={quote(v)}" for k, values in self.query.items() if k != "cursor" for v in values)
            path = "/".join(quote(s, safe="") for s in self.segments)
            headers["Link"] = f'<{self._base_url()}/{path}?{query}&cursor={cursor + PAGE_SIZE}>; rel="next"'
        self._send_json(200, page, headers)

    def _commits(self, namespace: str, name: str, rev: str) -> None:
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        commit, _ = storage.resolve(repo, rev)
        items = [
            {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author, "avatar": None}],
                "date": c.date,
            }
            for c in storage.history(repo, commit)
        ]
        self._send_paginated(items)

    def _paths_info(self, namespace: str, name: str, rev: str) -> None:
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        commit, _ = storage.resolve(repo, rev)
        raw = self._read_body(16 * _CHUNK)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            body = parse_json(raw or b"{}")
            paths = body.get("paths", []) if isinstance(body, dict) else None
            expand = bool(body.get("expand")) if isinstance(body, dict) else False
        else:
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise InvalidRequest("a form body holds non-ASCII bytes: percent-encode them") from None
            form = parse_query(text, "form body")
            paths = form.get("paths", [])
            expand = parse_flag((form.get("expand") or ["false"])[-1], "expand")
        if not isinstance(paths, list):
            raise _bad("paths must be a list")
        items = []
        for path in paths:
            path = check_file_path(path)
            if path in commit.files:
                items.append(self._tree_entry(path, commit.files[path], commit, expand))
            elif any(p.startswith(path + "/") for p in commit.files):
                oid = hashlib.sha1(f"{commit.id}:{path}".encode()).hexdigest()
                items.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        self._send_json(200, items)

    # --- uploads -------------------------------------------------------------------------------
    def _writable_branch(self, repo: Path, rev: str) -> str:
        if self._flag("create_pr"):
            raise _bad("pull requests are not supported by this hub")
        refs = self.server.storage.refs(repo)
        branch = _strip_ref_prefix(rev)
        if branch in refs["branches"]:
            return branch
        if branch in refs["tags"] or _SHA1.fullmatch(rev):
            raise _bad(f"Invalid rev id: {rev} is not a branch; commits go to a branch")
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _preupload(self, namespace: str, name: str, rev: str) -> None:
        self._require_writer()
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        body = self._json_body()
        branch = self._writable_branch(repo, rev)
        head, _ = storage.resolve(repo, branch)
        files = body.get("files")
        if not isinstance(files, list):
            raise _bad("files must be a list")
        answers = []
        for item in files:
            if not isinstance(item, dict):
                raise _bad("each file must be an object")
            path = check_file_path(item.get("path"))
            size = item.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"invalid size for {path}")
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise _bad(f"sample of {path} is not base64") from None
            lfs = size > 0 and (
                size > LFS_THRESHOLD_BYTES or b"\x00" in sample or os.path.splitext(path)[1].lower() in LFS_SUFFIXES
            )
            answer: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = head.files.get(path)
            if existing is not None:
                answer["oid"] = existing["sha256"] if lfs else existing["oid"]
            answers.append(answer)
        self._send_json(200, {"files": answers, "commitOid": head.id})

    def _lfs_batch(self, namespace: str, name: str) -> None:
        self._require_writer()
        storage = self.server.storage
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        storage.require_repo(namespace, name)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise _bad("only the LFS upload operation is supported")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise _bad("objects must be a list")
        base = self._base_url()
        expires = str(int(time.time()) + _SIGNED_URL_TTL_S)
        answers = []
        for item in objects:
            if not isinstance(item, dict):
                raise _bad("each object must be an object")
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not _SHA256.fullmatch(oid):
                raise _bad(f"invalid LFS oid {oid!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"invalid LFS size {size!r}")
            if size > self.server.config.max_body_bytes:
                answers.append(
                    {
                        "oid": oid,
                        "size": size,
                        "error": {"code": 413, "message": f"object larger than {self.server.config.max_body_bytes} bytes"},
                    }
                )
                continue
            if storage.object_size(oid) == size:
                answers.append({"oid": oid, "size": size})  # already here: nothing to upload
                continue
            signature = self._sign(namespace, name, oid, str(size), expires)
            query = f"size={size}&expires={expires}&sig={signature}"
            href = f"{base}/{namespace}/{name}.git/info/lfs/objects/{oid}?{query}"
            verify = f"{base}/{namespace}/{name}.git/info/lfs/objects/verify?{query}&oid={oid}"
            answers.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {"upload": {"href": href, "expires_in": _SIGNED_URL_TTL_S}, "verify": {"href": verify}},
                }
            )
        self._send_bytes(200, json.dumps({"transfer": "basic", "objects": answers}).encode(), "application/vnd.git-lfs+json")

    def _check_signed(self, namespace: str, name: str, oid: str) -> int:
        size_raw = (self.query.get("size") or [""])[-1]
        expires_raw = (self.query.get("expires") or [""])[-1]
        signature = (self.query.get("sig") or [""])[-1]
        if not size_raw or not expires_raw or not signature:
            raise HubError(403, "upload URL is not signed")
        size = parse_uint(size_raw, "size")
        expires = parse_uint(expires_raw, "expires")
        expected = self._sign(namespace, name, oid, size_raw, expires_raw)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise HubError(403, "upload URL signature is invalid")
        if expires < time.time():
            raise HubError(403, "upload URL has expired: ask the LFS batch endpoint again")
        return size

    def _lfs_put(self, namespace: str, name: str, oid: str) -> None:
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        if not _SHA256.fullmatch(oid):
            raise _bad(f"invalid LFS oid {oid!r}")
        size = self._check_signed(namespace, name, oid)
        self.server.storage.require_repo(namespace, name)
        length = self._length
        if length is not None and length != size:
            if length > size:
                self._refuse_oversized(length, size)
            raise _bad(f"Content-Length {length} differs from the announced size {size}")
        limit = min(size, self.server.config.max_body_bytes)
        self.server.storage.put_object_stream(self._iter_body(limit), oid, size)
        self._send_json(200, {})

    def _lfs_verify(self, namespace: str, name: str) -> None:
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        oid = (self.query.get("oid") or [""])[-1]
        if not _SHA256.fullmatch(oid):
            raise _bad(f"invalid LFS oid {oid!r}")
        size = self._check_signed(namespace, name, oid)
        body = self._json_body()
        if body.get("oid") not in (None, oid) or body.get("size") not in (None, size):
            raise _bad("verify body does not match the upload")
        if self.server.storage.object_size(oid) != size:
            raise HubError(404, f"LFS object {oid} was not uploaded", "EntryNotFound")
        self._send_json(200, {"message": "ok"})

    def _commit(self, namespace: str, name: str, rev: str) -> None:
        user = self._require_writer()
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        branch = self._writable_branch(repo, rev)
        operations: list[tuple[str, str, dict[str, Any] | None]] = []
        try:
            header = self._parse_commit(operations)
            if header is None:
                raise _bad("empty commit: no header line")
            summary = header.get("summary")
            description = header.get("description") or ""
            parent = header.get("parentCommit")
            if not isinstance(summary, str) or not summary.strip():
                raise _bad("the commit header needs a summary")
            if not isinstance(description, str):
                raise _bad("the commit description must be a string")
            if parent is not None and (not isinstance(parent, str) or not _SHA1.fullmatch(parent)):
                raise _bad("parentCommit must be a 40-hex commit id")
            commit = storage.apply_commit(
                repo,
                branch,
                parent=parent,
                title=summary.strip()[:1000],
                message=description,
                author=user,
                operations=operations,
            )
        finally:
            for _, _, entry in operations:  # content of a refused commit never becomes an object
                if entry and entry.get("staged"):
                    Path(entry["staged"]).unlink(missing_ok=True)
        base = self._base_url()
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{base}/{namespace}/{name}/commit/{commit.id}",
                "pullRequestUrl": None,
            },
        )

    def _parse_commit(self, operations: list[tuple[str, str, dict[str, Any] | None]]) -> dict[str, Any] | None:
        """Read the NDJSON body into ``operations`` (filled as it goes, so the caller can clean up);
        returns the header."""
        header: dict[str, Any] | None = None
        seen: set[str] = set()
        with self._spool_body() as spool:
            for number, line in enumerate(spool, start=1):
                if not line.strip():
                    continue
                item = parse_json(line, f"line {number} of the commit")
                if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                    raise _bad(f"line {number} of the commit must be an object with 'key' and 'value'")
                key, value = item.get("key"), item["value"]
                if key == "header":
                    if header is not None or operations:
                        raise _bad("the commit header must come first, once")
                    header = value
                    continue
                if header is None:
                    raise _bad("the commit must start with a header line")
                raw_path = value.get("path")
                if key == "deletedFolder" and isinstance(raw_path, str):
                    raw_path = raw_path.rstrip("/")
                path = check_file_path(raw_path)
                if path in seen and key in ("file", "lfsFile"):
                    raise _bad(f"{path} is added twice in one commit")
                seen.add(path)
                if key == "file":
                    operations.append(("add", path, self._regular_entry(value, path)))
                elif key == "lfsFile":
                    operations.append(("add", path, self._lfs_entry(value, path)))
                elif key == "deletedFile":
                    operations.append(("delete", path, None))
                elif key == "deletedFolder":
                    operations.append(("delete_folder", path, None))
                else:
                    raise _bad(f"unknown commit operation {key!r} on line {number}")
        return header

    def _regular_entry(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        if value.get("encoding", "base64") != "base64":
            raise _bad(f"{path}: only base64 encoding is supported")
        content = value.get("content")
        if not isinstance(content, str):
            raise _bad(f"{path}: content must be a base64 string")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{path}: content is not valid base64") from None
        if len(data) > LFS_THRESHOLD_BYTES:
            raise _bad(f"{path}: regular files are limited to {LFS_THRESHOLD_BYTES} bytes; upload it with LFS")
        staged, digest = self.server.storage.stage_bytes(data)
        return {"sha256": digest, "size": len(data), "oid": git_blob_oid(data), "lfs": False, "staged": str(staged)}

    def _lfs_entry(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        oid = value.get("oid")
        if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not _SHA256.fullmatch(oid):
            raise _bad(f"{path}: lfsFile needs algo sha256 and a 64-hex oid")
        size = self.server.storage.object_size(oid)
        if size is None:
            raise _bad(f"{path}: LFS object {oid[:12]}... was never uploaded (use the LFS batch endpoint first)")
        if value.get("size") is not None and value.get("size") != size:
            raise _bad(f"{path}: LFS object {oid[:12]}... has {size} bytes, not {value.get('size')}")
        pointer = lfs_pointer(oid, size)
        return {"sha256": oid, "size": size, "oid": git_blob_oid(pointer), "lfs": True}

    # --- refs ----------------------------------------------------------------------------------
    def _create_tag(self, namespace: str, name: str, rev: str) -> None:
        self._require_writer()
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        body = self._json_body()
        tag = check_ref_name(body.get("tag"), "tag")
        message = body.get("message") or ""
        if not isinstance(message, str):
            raise _bad("tag message must be a string")
        with storage.locked(repo):
            commit, _ = storage.resolve(repo, rev)
            refs = storage.refs(repo)
            if tag in refs["tags"]:
                raise HubError(409, f"Tag {tag} already exists")
            if tag in refs["branches"]:
                raise HubError(409, f"{tag} is already a branch name")
            refs["tags"][tag] = {"commit": commit.id, "message": message}
            storage.write_refs(repo, refs)
        self._send_json(200, {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": commit.id})

    def _delete_tag(self, namespace: str, name: str, tag: str) -> None:
        self._require_writer()
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        tag = _strip_ref_prefix(tag)
        with storage.locked(repo):
            refs = storage.refs(repo)
            if tag not in refs["tags"]:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            del refs["tags"][tag]
            storage.write_refs(repo, refs)
        self._send_json(200, {})

    def _create_branch(self, namespace: str, name: str, branch: str) -> None:
        self._require_writer()
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        branch = check_ref_name(branch, "branch")
        body = self._json_body()
        start = body.get("startingPoint") or "main"
        if not isinstance(start, str):
            raise _bad("startingPoint must be a revision")
        with storage.locked(repo):
            commit, _ = storage.resolve(repo, start)
            refs = storage.refs(repo)
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            if branch in refs["tags"]:
                raise HubError(409, f"{branch} is already a tag name")
            refs["branches"][branch] = commit.id
            storage.write_refs(repo, refs)
        self._send_json(200, {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": commit.id})

    def _delete_branch(self, namespace: str, name: str, branch: str) -> None:
        self._require_writer()
        storage = self.server.storage
        repo = storage.require_repo(namespace, name)
        branch = _strip_ref_prefix(branch)
        if branch == "main":
            raise HubError(403, "the main branch cannot be deleted")
        with storage.locked(repo):
            refs = storage.refs(repo)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del refs["branches"][branch]
            storage.write_refs(repo, refs)
        self._send_json(200, {})

    # --- downloads -----------------------------------------------------------------------------
    def _resolve_file(self, namespace: str, name: str, rev: str, path: str) -> None:
        storage = self.server.storage
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        path = check_file_path(path)
        repo = storage.require_repo(namespace, name)
        commit, _ = storage.resolve(repo, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        blob = storage.object_path(entry["sha256"])
        size = entry["size"]
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if entry["lfs"]:
            headers["X-Linked-Size"] = str(size)
            headers["X-Linked-Etag"] = f'"{etag}"'
        start, end, status = 0, size - 1, 200
        if self._range is not None and size > 0:  # its syntax was checked by _parse_head
            first, last = self._range
            if first is None:  # bytes=-N: the last N bytes
                start = max(0, size - (last or 0))
            else:
                start = first
                end = min(last, size - 1) if last is not None else size - 1
            if start > end or start >= size:
                range_text = self.headers.get("Range", "")
                raise HubError(416, f"range {range_text!r} is outside the file", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        try:
            handle = open(blob, "rb")  # noqa: SIM115 - entered with `with` below, once it exists
        except FileNotFoundError:
            raise HubError(
                404, f"the content of {path} is missing from this hub", "EntryNotFound", {"X-Repo-Commit": commit.id}
            ) from None
        with handle:
            length = max(0, end - start + 1)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self._sent = True
            if self.command == "HEAD":
                return
            handle.seek(start)
            remaining = length
            while remaining:
                chunk = handle.read(min(remaining, _CHUNK))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def make_server(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8787,
    token_file: str | Path | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    verbose: bool = False,
) -> HubHTTPServer:
    """A ready (bound, not yet serving) hub server; ``port=0`` picks a free port."""
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    tokens = load_tokens(token_file) if token_file else frozenset()
    config = HubConfig(root=Path(root), tokens=tokens, max_body_bytes=max_body_bytes, verbose=verbose)
    return HubHTTPServer((host, port), config)


def serve(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8787,
    token_file: str | Path | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    verbose: bool = False,
    announce: Callable[[str], Any] | None = None,
) -> None:
    """Serve ``root`` until interrupted (SIGINT/SIGTERM end it cleanly). ``announce`` gets the
    line saying where it serves (the CLI prints it); by default it is logged at INFO."""
    import logging
    import signal

    server = make_server(root, host=host, port=port, token_file=token_file, max_body_bytes=max_body_bytes, verbose=verbose)

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    auth = f"writes need one of {len(server.config.tokens)} token(s)" if server.config.tokens else "no token needed"
    (announce or logging.getLogger("tunehub.hub").info)(f"tunehub hub serving {server.storage.root} on {server.url} ({auth})")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["HubError", "HubHTTPServer", "HubStorage", "git_blob_oid", "load_tokens", "make_server", "serve"]
