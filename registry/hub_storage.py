"""The storage of the private hub (``tunehub hub serve``): repos, commits, refs and content
objects in one folder, safe to use from many threads at once.

Layout under the root::

    objects/sha256/<aa>/<sha256>            every file's content, named by its sha256 (regular and LFS)
    repos/.create.lock                      flock'ed while a repo is created (no two names differing only in case)
    repos/models/<namespace>/<name>/
        repo.json                           id, creation time, private
        refs.json                           {"branches": {name: commit}, "tags": {name: {"commit", "message"}}}
        commits/<aa>/<commit id>.json       immutable commit objects: parents, title, message, author,
                                            date and the whole file table {path: {sha256, size, oid, lfs}}
        .lock                               flock'ed while refs.json changes (one lock per repo)
    tmp/                                    uploads and records being written; never read as content
    audit.log                               one JSON line per accepted write (:meth:`HubStorage.audit`)

Guarantees:
- Writes are atomic: content, commit objects and refs are written aside in ``tmp/``, fsynced and
  renamed into place; a commit becomes visible only when ``refs.json`` is replaced under the
  repo's lock, after its ``parentCommit`` was checked against the branch head (412 otherwise).
- Nothing outside the root is ever read or written: repo names, revisions and file paths are
  validated (no ``..``, absolute paths, backslashes or NUL); revisions live in ``refs.json`` and
  never become file names; commit ids and object names are checked hex digests (an abbreviated
  commit id is only compared with the names listed in its ``commits/<aa>/`` folder).
- Repo ids are case-insensitive (:meth:`HubStorage.find_repo`): one folder per repo, spelled as
  created; a repo whose name differs only in case from an existing one is never created (the
  check and the rename that creates it hold one lock).
- ``audit.log`` is append-only: each accepted write adds one line with one ``write`` on a file
  opened with ``O_APPEND`` (under a lock, so lines from concurrent requests never interleave); it
  is never rewritten or truncated here.

Refusals are :class:`HubError`: the HTTP status and the Hub's ``X-Error-Code`` the server
(:mod:`tunehub.registry.hub_server`) answers with.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunehub.registry.files import fsync_dir, write_bytes_atomic

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

#: a namespace or repo name: what the Hub accepts (its CI user is ``__DUMMY_HUB_USER__``: a leading
#: underscore is allowed, a leading '.' or '-' is not)
_REPO_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
#: a commit id (what git and the Hub use: 40 lower-case hex digits)
SHA1_HEX = re.compile(r"[0-9a-f]{40}")
#: an abbreviated commit id: a unique prefix of at least 7 hex digits resolves (as with git)
_SHORT_SHA = re.compile(r"[0-9a-f]{7,39}")
#: a content object id (sha256, 64 lower-case hex digits)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_PATH_LENGTH = 1024
#: the audit log's name under the root
AUDIT_LOG = "audit.log"


class HubError(Exception):
    """A refusal, in the terms of the HTTP answer the hub gives for it: status, message, the Hub's
    ``X-Error-Code`` where it has one, extra headers and JSON fields. The storage raises it (a
    missing repo, revision or file, a name taken, a stale ``parentCommit``), as do the validators
    below; the server (:mod:`tunehub.registry.hub_server`) turns it into its answer."""

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


def repo_not_found() -> HubError:
    """The answer for a repo that does not exist, and for one the caller may not see: the Hub's
    status, ``X-Error-Code`` and message, which name no repo (the client adds the URL), so a
    hidden repo cannot be told from a missing one, whatever the case of its name."""
    return HubError(404, "Repository not found", "RepoNotFound")


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
            f"invalid {what} {value!r}: use letters, digits, '-', '_' and '.', start with a letter, digit or '_',"
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
    if ".." in name or "//" in name or name.endswith(("/", ".lock", ".")) or SHA1_HEX.fullmatch(name):
        raise _bad(f"invalid {what} name {name!r}")
    return name


def strip_ref_prefix(rev: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if rev.startswith(prefix):
            return rev[len(prefix) :]
    return rev


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
        self._audit_lock = threading.Lock()

    @property
    def audit_path(self) -> Path:
        return self.root / AUDIT_LOG

    def audit(self, who: str, action: str, repo: str, **details: Any) -> None:
        """Append one line to ``audit.log`` for a write that was accepted: UTC time, who, action,
        repo and ``details`` (revision, commit, oid...; None values are left out). One ``write``
        on an ``O_APPEND`` descriptor under a lock: concurrent requests never interleave lines."""
        record = {"time": _now(), "who": who, "action": action, "repo": repo}
        record.update({key: value for key, value in details.items() if value is not None})
        line = json.dumps(record, sort_keys=False).encode() + b"\n"
        with self._audit_lock:
            fd = os.open(self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                written = os.write(fd, line)
                while written < len(line):  # a short write (disk full, signal): finish the line
                    written += os.write(fd, line[written:])
            finally:
                os.close(fd)

    # paths (every argument was validated before it gets here)
    def repo_dir(self, namespace: str, name: str) -> Path:
        return self.root / "repos" / "models" / check_repo_part(namespace, "namespace") / check_repo_part(name, "name")

    def object_path(self, sha256: str) -> Path:
        if not SHA256_HEX.fullmatch(sha256):
            raise _bad(f"invalid object id {sha256!r}")
        return self.root / "objects" / "sha256" / sha256[:2] / sha256

    def _commit_path(self, repo: Path, commit_id: str) -> Path:
        if not SHA1_HEX.fullmatch(commit_id):
            raise _bad(f"invalid commit id {commit_id!r}")
        return repo / "commits" / commit_id[:2] / f"{commit_id}.json"

    def tmp_path(self, suffix: str = "") -> Path:
        return self.root / "tmp" / f"{uuid.uuid4().hex}{suffix}"

    # atomic writes
    def _write_atomic(self, path: Path, data: bytes) -> None:
        write_bytes_atomic(path, data, staging=self.tmp_path(".part"))  # staged in tmp/, never beside content

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
        fsync_dir(target.parent)

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
            fsync_dir(target.parent)
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
            raise repo_not_found()
        return repo

    def canonical_namespace(self, namespace: str) -> str:
        """The namespace as its folder spells it when one exists whatever the case (as on the Hub,
        ``Acme`` and ``acme`` are one namespace), else ``namespace`` as given."""
        base = self.root / "repos" / "models"
        if (base / check_repo_part(namespace, "namespace")).is_dir():
            return namespace
        folded = namespace.casefold()
        for entry in sorted(os.listdir(base)):
            if entry.casefold() == folded and _REPO_PART.fullmatch(entry) and (base / entry).is_dir():
                return entry
        return namespace

    def find_repo(self, namespace: str, name: str) -> tuple[str, str] | None:
        """(namespace, name) of the existing repo named so whatever the case, as its folders spell
        them; None when there is none. Only names that passed :func:`check_repo_part` are compared."""
        if self.repo_exists(namespace, name):
            return namespace, name
        namespace = self.canonical_namespace(namespace)
        ns_dir = self.root / "repos" / "models" / namespace
        if not ns_dir.is_dir():
            return None
        if self.repo_exists(namespace, name):
            return namespace, name
        folded = name.casefold()
        for entry in sorted(os.listdir(ns_dir)):
            if entry.casefold() == folded and _REPO_PART.fullmatch(entry) and (ns_dir / entry / "refs.json").is_file():
                return namespace, entry
        return None

    @contextmanager
    def _creating(self) -> Iterator[None]:
        """Held while a repo is created: the check that no repo has the name in another case and
        the rename that creates it are one step."""
        with open(self.root / "repos" / ".create.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def create_repo(self, namespace: str, name: str, author: str, *, private: bool = False) -> None:
        """Create ``namespace/name`` with its initial commit; a 409 when a repo of that name exists,
        in any case (the Hub's repo ids are case-insensitive)."""
        with self._creating():
            if self.find_repo(namespace, name) is not None:
                raise HubError(409, f"You already created this model repo: {namespace}/{name}")
            self._create_repo(namespace, name, author, private)

    def _create_repo(self, namespace: str, name: str, author: str, private: bool) -> None:
        target = self.repo_dir(namespace, name)
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
            meta = {"id": f"{namespace}/{name}", "created_at": _now(), "private": bool(private)}
            self._write_atomic(staging / "repo.json", _dumps(meta))
            self._write_atomic(staging / "refs.json", _dumps({"branches": {"main": initial.id}, "tags": {}}))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, target)  # atomic; fails when another create won
            except OSError:
                raise HubError(409, f"You already created this model repo: {namespace}/{name}") from None
            fsync_dir(target.parent)
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

    def is_private(self, namespace: str, name: str) -> bool:
        """Whether the repo was created private (False for a missing one)."""
        try:
            return self.repo_meta(self.repo_dir(namespace, name)).get("private") is True
        except FileNotFoundError:
            return False

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
        name = strip_ref_prefix(rev)
        if name in refs["branches"]:
            return self.commit(repo, refs["branches"][name]), name
        if name in refs["tags"]:
            return self.commit(repo, refs["tags"][name]["commit"]), None
        if SHA1_HEX.fullmatch(rev) and self.has_commit(repo, rev):
            return self.commit(repo, rev), None
        if _SHORT_SHA.fullmatch(rev):
            found = self._commits_starting_with(repo, rev)
            if len(found) == 1:
                return self.commit(repo, found[0]), None
            if len(found) > 1:
                raise HubError(404, f"Invalid rev id: {rev} is the start of {len(found)} commits", "RevisionNotFound")
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _commits_starting_with(self, repo: Path, prefix: str) -> list[str]:
        """Ids of the commits of ``repo`` that start with ``prefix`` (7 to 39 lower-case hex digits)."""
        try:
            names = os.listdir(repo / "commits" / prefix[:2])
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".json")] for n in names if n.startswith(prefix) and SHA1_HEX.fullmatch(n[: -len(".json")]))

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
        body: dict[str, Any] = {
            "parents": parents,
            "title": title,
            "message": message,
            "author": author,
            "date": _now(),
            "files": files,
        }
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
                    "The branch was updated since you opened this page. Please refresh and try again."
                    f" (parentCommit {parent[:12]}, the head of {branch} is {head[:12]})",
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
                    files[path] = entry
                elif op == "delete" and path in files:
                    del files[path]
                else:  # delete a folder (deletedFile on a folder's path deletes the folder, as on the Hub)
                    inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not inside and op == "delete":
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
            commit = self._make_commit(repo, parents=[head], title=title, message=message, author=author, files=files)
            refs["branches"][branch] = commit.id
            self.write_refs(repo, refs)
            return commit

    def squash(self, repo: Path, branch: str, *, title: str, author: str) -> Commit:
        """Replace the history of ``branch`` by one commit holding its head's files (the Hub's
        super-squash); other branches and tags keep theirs. Atomic like a commit."""
        with self.locked(repo):
            refs = self.refs(repo)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = self.commit(repo, refs["branches"][branch])
            commit = self._make_commit(repo, parents=[], title=title, message="", author=author, files=dict(head.files))
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

    def last_changes(self, repo: Path, head: Commit, paths: list[str], *, max_commits: int = 10_000) -> dict[str, Commit]:
        """For each path of ``head`` (a file or a folder), the most recent commit in ``head``'s
        history that changed it (added, modified, or for a folder any file under it). One walk for
        all the paths; past ``max_commits`` the oldest commit reached stands for the rest."""

        def state(commit: Commit, path: str) -> Any:
            entry = commit.files.get(path)
            if entry is not None:
                return entry["sha256"], entry["size"], entry["lfs"]
            prefix = path + "/"
            return frozenset((p, e["sha256"]) for p, e in commit.files.items() if p.startswith(prefix))

        pending = {path: state(head, path) for path in paths}
        found: dict[str, Commit] = {}
        current = head
        for count, parent in enumerate(self.history(repo, head)):
            if parent is head:
                continue
            if not pending or count > max_commits:
                break
            for path in [p for p, value in pending.items() if state(parent, p) != value]:
                found[path] = current
                del pending[path]
            current = parent
        for path in pending:
            found[path] = current
        return found

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


__all__ = [
    "AUDIT_LOG",
    "GITATTRIBUTES",
    "LFS_SUFFIXES",
    "LFS_THRESHOLD_BYTES",
    "SHA1_HEX",
    "SHA256_HEX",
    "Commit",
    "HubError",
    "HubStorage",
    "check_file_path",
    "check_ref_name",
    "check_repo_part",
    "git_blob_oid",
    "lfs_pointer",
    "repo_not_found",
    "strip_ref_prefix",
]
