"""The ``hf://NAMESPACE`` store: modules as model repos on a Hugging Face Hub.

The Hub is huggingface.co, or any server that speaks its API (``tunehub hub serve``), chosen by
``endpoint=`` or ``HF_ENDPOINT``. Tokens come from ``token=``, else from where huggingface_hub
looks (``HF_TOKEN``, ``hf auth login``).

Layout of one module, ``NAMESPACE/name``, in one model repo of that id:

- one commit on ``main`` per version, titled ``tunehub: push v<N>``: the module's files
  (``manifest.json``, ``adapter_config.json``, weights, the model card ``README.md``) replace
  the previous version's; a tag ``v<N>`` points at that commit, so
  ``PeftModel.from_pretrained(base, "ns/name", revision="v2")`` works with no tunehub installed;
- ``.tunehub/state.json`` on ``main``: the registry's record of every version (files and their
  sha256, kind, task, base...), aliases with their full move history, yanks and deleted
  numbers. The Hub records no ref moves, so this file is the source of truth and every change
  to it is a commit on ``main`` made with ``parent_commit``: two writers never both win, the
  loser re-reads and retries, and two concurrent pushes get two different numbers;
- aliases are also branches (``prod`` -> the commit of the version it names) and versions are
  also tags: both are projections of the state, written after it and repaired by the next
  write if a process died in between.

A reference's namespace, when it names one, must be this store's namespace: one ``hf://``
registry is one Hub namespace (``acme/sum`` and ``sum`` both mean ``NAMESPACE/sum`` in
``hf://acme``; ``other/sum`` is refused). Deleting versions removes their tags and hides them
for good, but the Hub keeps git history: delete the repo on the Hub to erase content.

Pulls go through ``snapshot_download(revision="v<N>")`` and the HF cache, then every file is
checked against the recorded sha256 while it is copied into a plain folder; a damaged cached
file is evicted so that the next pull fetches it again. With ``HF_HUB_OFFLINE=1`` reads use the
cache and the last state seen online.

A hub that is not huggingface.co (``tunehub hub serve``, a mirror) takes uploads over classic
LFS, not Xet, so huggingface_hub must run with ``HF_HUB_DISABLE_XET=1`` there. That is a choice
for the whole process, made by the entry point the user runs (the CLI calls
:func:`prepare_environment`), never by constructing a store; a push that would go through Xet to
such a hub is refused before anything is sent, with a message that says what to set.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from tunehub.errors import (
    ConfigError,
    Conflict,
    IntegrityError,
    InvalidReference,
    ModuleNotFound,
    StoreError,
    TunehubError,
    VersionNotFound,
)
from tunehub.registry import state as registry_state
from tunehub.registry.files import sha256_file, write_json_atomic
from tunehub.registry.manifest import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Manifest,
    ModuleKind,
)
from tunehub.registry.module import (
    LocalModule,
    check_module_for_push,
    install_module,
    model_card,
)
from tunehub.registry.refs import (
    ModuleRef,
    is_commit_sha,
    parse_ref,
    validate_alias,
    validate_name,
    version_of_tag,
)
from tunehub.registry.signing import SignatureEntry
from tunehub.registry.state import (
    HUB_STATE_SCHEMA,
    AliasMove,
    RegistryState,
    VersionRecord,
    hub_state_json,
    parse_hub_state,
)
from tunehub.registry.store import (
    Filters,
    ModuleStore,
    VersionInfo,
    current_actor,
    tunehub_home,
    version_info,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
STATE_FILE = ".tunehub/state.json"
STATE_SCHEMA = HUB_STATE_SCHEMA
LIST_TAG = "tunehub"  # every card tunehub writes carries it; list() asks the Hub for it
RESERVED_ALIASES = frozenset({"main"})
_PUSH_TITLE = "tunehub: push v{version}"
_MAX_ATTEMPTS = 40
_CHUNK = 1 << 20
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _is_huggingface_co(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host == "huggingface.co" or host.endswith(".huggingface.co") or host == "hf.co"


def prepare_environment(endpoint: str) -> None:
    """For entry points: make huggingface_hub upload to ``endpoint`` in the way it can take.

    A hub that is not huggingface.co speaks classic LFS only: set ``HF_HUB_DISABLE_XET=1`` for
    this process and those it starts, unless the environment already says either way.
    huggingface_hub reads the variable when it is imported, so an already imported one gets its
    constant set too."""
    if "HF_HUB_DISABLE_XET" not in os.environ and not _is_huggingface_co(endpoint):
        os.environ["HF_HUB_DISABLE_XET"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and _truthy(os.environ.get("HF_HUB_DISABLE_XET")):
        setattr(constants, "HF_HUB_DISABLE_XET", True)  # noqa: B010 - a module found in sys.modules, untyped


def _xet_installed() -> bool:
    return importlib.util.find_spec("hf_xet") is not None


def _is_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP library this huggingface_hub uses (httpx2, httpx, requests)."""
    errors: list[type[BaseException]] = []
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        lib = sys.modules.get(module)
        for name in names:
            cls = getattr(lib, name, None) if lib is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors) or (ConnectionError,)


class _Unreachable(StoreError):
    """The hub did not answer (reads then fall back to the cache)."""


_Result = TypeVar("_Result")


@dataclass
class _Snapshot:
    """What the store knows about one repo at one moment."""

    repo_id: str
    main: str | None
    state: RegistryState | None
    tags: dict[str, str] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    online: bool = True

    def live(self) -> set[int]:
        return self.state.live if self.state is not None else set()

    def deleted(self) -> set[int]:
        return self.state.deleted if self.state is not None else set()

    def tag_numbers(self) -> set[int]:
        return {n for t in self.tags if (n := version_of_tag(t)) is not None}


def _check_state(raw: Any, repo_id: str) -> dict[str, Any]:
    """The state file validated (see :func:`~tunehub.registry.state.parse_hub_state`, which
    raises ``IntegrityError`` when it is corrupt) and written back as the store writes it."""
    return hub_state_json(parse_hub_state(raw, repo_id), repo_id)


class HubStore(ModuleStore):
    """Modules as Hub model repos under one namespace (see the module docstring for the layout).

    ``cache_dir`` is the HF hub cache that downloads go through (default: huggingface_hub's,
    ``HF_HUB_CACHE``/``HF_HOME``); ``modules_dir`` is where verified copies land when ``pull``
    gets no destination (default ``$TUNEHUB_HOME/modules/_hf/<host>``).
    """

    def __init__(
        self,
        namespace: str,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        modules_dir: str | Path | None = None,
    ):
        namespace = namespace.strip("/")
        if not _NAMESPACE.fullmatch(namespace) or ".." in namespace or namespace.endswith((".", "-")):
            raise InvalidReference(
                f"hf://{namespace} does not name a Hub namespace: use hf://NAMESPACE (letters, digits, '-', '_', '.')"
            )
        self.namespace = namespace
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        if urlsplit(self.endpoint).scheme not in ("http", "https"):
            raise InvalidReference(f"hub endpoint {self.endpoint!r} is not an http(s) URL")
        self.uri = f"hf://{namespace}"
        self.token = token
        self.cache_dir = str(Path(cache_dir).expanduser()) if cache_dir else None
        host = re.sub(r"[^A-Za-z0-9.-]", "_", urlsplit(self.endpoint).netloc) or "hub"
        self.modules_dir = Path(modules_dir).expanduser() if modules_dir else tunehub_home() / "modules" / "_hf" / host
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=self.endpoint, token=token)

    def __repr__(self) -> str:
        return f"HubStore({self.namespace!r}, endpoint={self.endpoint!r})"

    def _refuse_xet_to_an_lfs_hub(self) -> None:
        """A push to a hub that is not huggingface.co must go over LFS; with hf_xet installed,
        huggingface_hub would try Xet unless the process disabled it (see prepare_environment)."""
        from huggingface_hub import constants

        uses_xet = _xet_installed() and not constants.HF_HUB_DISABLE_XET  # what huggingface_hub decides on
        keeps_xet = "HF_HUB_DISABLE_XET" in os.environ and not _truthy(os.environ["HF_HUB_DISABLE_XET"])
        if not _is_huggingface_co(self.endpoint) and uses_xet and not keeps_xet:
            raise ConfigError(
                f"{self.endpoint} is not huggingface.co: it takes uploads over LFS, and huggingface_hub would use Xet."
                " Set HF_HUB_DISABLE_XET=1 before huggingface_hub is imported (the tunehub CLI does this for such endpoints),"
                " or call tunehub.registry.hf.prepare_environment(endpoint) before pushing"
            )

    # --- names and errors ----------------------------------------------------------------------
    def _repo(self, ref: str | ModuleRef) -> tuple[ModuleRef, str]:
        """(parsed ref, Hub repo id); a ref naming another namespace is refused."""
        ref = parse_ref(ref)
        if ref.namespace is not None and ref.namespace != self.namespace.lower():
            raise InvalidReference(
                f"{ref} names namespace {ref.namespace!r}, but this registry is {self.uri}:"
                f" use --registry hf://{ref.namespace} (one hf:// registry is one Hub namespace)"
            )
        repo_id = f"{self.namespace}/{ref.name}"
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise InvalidReference(f"{ref.name!r} is not a valid Hub repo name: {exc}") from None
        return ref, repo_id

    def _public_repo(self, ref: ModuleRef) -> str:
        return f"{self.namespace.lower()}/{ref.name}"

    @contextmanager
    def _errors(self, what: str, repo_id: str | None = None) -> Iterator[None]:
        """Translate huggingface_hub's and the network's exceptions into tunehub's."""
        from huggingface_hub import errors as hf_errors

        local_missing = getattr(hf_errors, "LocalEntryNotFoundError", ())
        offline = getattr(hf_errors, "OfflineModeIsEnabled", ())
        entry_missing = getattr(hf_errors, "EntryNotFoundError", ())
        where = f"{repo_id} at {self.endpoint}" if repo_id else self.endpoint
        try:
            yield
        except TunehubError:
            raise
        except hf_errors.HfHubHTTPError as exc:
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
            code = response.headers.get("X-Error-Code") if response is not None else None
            detail = (getattr(exc, "server_message", None) or str(exc).strip().splitlines()[-1])[:300]
            if isinstance(exc, hf_errors.RepositoryNotFoundError) and (code == "RepoNotFound" or status == 404):
                raise ModuleNotFound(f"no module {repo_id} in {self.uri} (or it is private and you lack access)") from None
            if status in (401, 403):
                raise StoreError(
                    f"{what}: the hub at {self.endpoint} refused access ({status}: {detail});"
                    " set HF_TOKEN (or run `hf auth login`) with a token that may write there"
                ) from None
            if isinstance(exc, hf_errors.RevisionNotFoundError):
                raise VersionNotFound(f"{what}: {where} has no such revision ({detail})") from None
            if entry_missing and isinstance(exc, entry_missing):
                raise IntegrityError(f"{what}: a file of {where} is missing on the hub ({detail})") from None
            if status in (409, 412):
                raise Conflict(f"{what}: {where} changed concurrently ({detail}); try again") from None
            raise StoreError(f"{what}: the hub at {self.endpoint} answered {status}: {detail}") from None
        except tuple(e for e in (local_missing, offline) if e) as exc:
            raise StoreError(f"{what}: {where} is not in the local cache and the hub cannot be used ({exc})") from None
        except _network_errors() as exc:
            raise _Unreachable(f"{what}: cannot reach the hub at {self.endpoint}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"{what}: {exc}") from None

    @staticmethod
    def _status(exc: BaseException) -> int | None:
        return getattr(getattr(exc, "response", None), "status_code", None)

    # --- reading the hub -----------------------------------------------------------------------
    def _download_kwargs(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "token": self.token, "cache_dir": self.cache_dir}

    def _read_state(self, repo_id: str, commit: str, *, local_only: bool = False) -> RegistryState | None:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download

        remote_missing = getattr(hf_errors, "RemoteEntryNotFoundError", None) or hf_errors.EntryNotFoundError
        try:
            # by commit sha, never by branch name: a branch can move between HEAD and GET
            path = hf_hub_download(repo_id, STATE_FILE, revision=commit, local_files_only=local_only, **self._download_kwargs())
        except remote_missing:
            return None
        try:
            raw = json.loads(Path(path).read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise IntegrityError(f"the tunehub state of {repo_id} on the hub is not valid JSON") from None
        return parse_hub_state(raw, repo_id)

    def _remembered_path(self, repo_id: str) -> Path:
        namespace, name = repo_id.split("/", 1)
        return self.modules_dir / namespace / name / "hub-refs.json"

    def _remember(self, snap: _Snapshot) -> None:
        """Keep the refs last seen online, so offline reads know which cached state is current."""
        path = self._remembered_path(snap.repo_id)
        payload = {"main": snap.main, "tags": snap.tags, "branches": snap.branches}
        try:
            if path.is_file() and json.loads(path.read_text()) == payload:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, payload)
        except (OSError, ValueError):
            pass  # only an offline convenience

    def _online_snapshot(self, repo_id: str) -> _Snapshot:
        with self._errors("read", repo_id):
            refs = self.api.list_repo_refs(repo_id)
            branches = {r.name: r.target_commit for r in refs.branches}
            tags = {r.name: r.target_commit for r in refs.tags}
            main = branches.get("main")
            state = self._read_state(repo_id, main) if main else None
        snap = _Snapshot(repo_id=repo_id, main=main, state=state, tags=tags, branches=branches)
        self._remember(snap)
        return snap

    def _offline_snapshot(self, repo_id: str, reason: str) -> _Snapshot:
        path = self._remembered_path(repo_id)
        try:
            remembered = json.loads(path.read_text())
            main = remembered["main"]
        except (OSError, ValueError, KeyError, TypeError):
            raise StoreError(f"{repo_id} was never read from {self.endpoint} online, and {reason}") from None
        with self._errors("read (offline)", repo_id):
            state = self._read_state(repo_id, main, local_only=True) if main else None
        return _Snapshot(
            repo_id=repo_id,
            main=main,
            state=state,
            tags=dict(remembered.get("tags") or {}),
            branches=dict(remembered.get("branches") or {}),
            online=False,
        )

    def _read_snapshot(self, repo_id: str) -> _Snapshot:
        """Online when possible; offline (HF_HUB_OFFLINE, or the hub unreachable) from the cache."""
        if _is_offline():
            return self._offline_snapshot(repo_id, "HF_HUB_OFFLINE is set")
        try:
            return self._online_snapshot(repo_id)
        except _Unreachable as exc:
            try:
                return self._offline_snapshot(repo_id, f"the hub is unreachable ({exc})")
            except StoreError:
                raise exc from None

    def _require_module(self, ref: ModuleRef, snap: _Snapshot) -> RegistryState:
        """The module's state; ``ModuleNotFound`` when the repo holds no live version."""
        state = snap.state if snap.state is not None else RegistryState()
        registry_state.require_module(state, self._public_repo(ref), self.uri)
        return state

    def _resolve_version(self, ref: ModuleRef, snap: _Snapshot) -> int:
        state = self._require_module(ref, snap)
        return registry_state.resolve(state, ref, self._public_repo(ref), snap.tags)

    def _info(self, ref: ModuleRef, version: int, snap: _Snapshot) -> VersionInfo:
        state = snap.state if snap.state is not None else RegistryState()
        return version_info(state, state.record(version), self._public_repo(ref), snap.tags.get(f"v{version}"))

    def _resolved(self, ref: str | ModuleRef) -> tuple[ModuleRef, str, _Snapshot, VersionInfo]:
        ref, repo_id = self._repo(ref)
        snap = self._read_snapshot(repo_id)
        version = self._resolve_version(ref, snap)
        return ref, repo_id, snap, self._info(ref, version, snap)

    # --- writing the hub -----------------------------------------------------------------------
    def _require_online(self, what: str) -> None:
        if _is_offline():
            raise StoreError(f"{what} needs the hub, but HF_HUB_OFFLINE is set")

    def _backoff(self, attempt: int) -> None:
        time.sleep(random.uniform(0.02, 0.15) * min(attempt + 1, 8))

    def _state_op(self, repo_id: str, state: RegistryState, last: dict[str, Any]) -> Any:
        from huggingface_hub import CommitOperationAdd

        data = json.dumps(hub_state_json(state, repo_id, last), indent=1, sort_keys=True).encode() + b"\n"
        return CommitOperationAdd(path_in_repo=STATE_FILE, path_or_fileobj=data)

    def _update_state(
        self,
        ref: ModuleRef,
        repo_id: str,
        change: Callable[[RegistryState, _Snapshot], tuple[RegistryState, _Result, str]],
    ) -> tuple[_Result, _Snapshot]:
        """Apply the pure ``change`` (new state, result, commit title) to the state read from
        main and commit it with ``parent_commit``: when main moved meanwhile the commit is
        refused, and the change is retried on the newer state."""
        self._require_online("changing the registry")
        for attempt in range(_MAX_ATTEMPTS):
            snap = self._online_snapshot(repo_id)
            state = self._require_module(ref, snap)
            new_state, result, title = change(state, snap)
            last = {"action": title, "by": current_actor(), "at": _now()}
            try:
                with self._errors("update", repo_id):
                    commit = self.api.create_commit(
                        repo_id,
                        [self._state_op(repo_id, new_state, last)],
                        commit_message=title,
                        revision="main",
                        parent_commit=snap.main,
                    )
            except Conflict:
                self._backoff(attempt)
                continue
            snap.main, snap.state = commit.oid, new_state
            self._remember(snap)
            return result, snap
        raise Conflict(f"{repo_id} changed too often while updating it; try again")

    def _create_tag(self, repo_id: str, version: int, commit: str, snap: _Snapshot) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        tag = f"v{version}"
        with self._errors("tag", repo_id):
            try:
                self.api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"tunehub version {version}")
            except HfHubHTTPError as exc:
                if self._status(exc) != 409:
                    raise
                # someone (a reader repairing tags) was first: fine if it is the same commit
                refs = self.api.list_repo_refs(repo_id)
                existing = {r.name: r.target_commit for r in refs.tags}.get(tag)
                if existing != commit:
                    raise IntegrityError(
                        f"tag {tag} of {repo_id} points to {existing}, not to the version's commit {commit}"
                    ) from None
        snap.tags[tag] = commit

    def _move_branch(self, repo_id: str, alias: str, commit: str, snap: _Snapshot) -> None:
        """Point branch ``alias`` at ``commit``. The Hub cannot move a branch: delete, then create."""
        from huggingface_hub.errors import HfHubHTTPError

        with self._errors("move alias branch", repo_id):
            for _ in range(5):
                if snap.branches.get(alias) == commit:
                    return
                try:
                    if alias in snap.branches:
                        self.api.delete_branch(repo_id, branch=alias)
                    self.api.create_branch(repo_id, branch=alias, revision=commit)
                    snap.branches[alias] = commit
                    return
                except HfHubHTTPError as exc:
                    if self._status(exc) not in (404, 409):
                        raise
                    # another writer moved it meanwhile: look again
                    refs = self.api.list_repo_refs(repo_id)
                    snap.branches = {r.name: r.target_commit for r in refs.branches}
            raise Conflict(f"could not move branch {alias} of {repo_id}: it keeps changing")

    def _push_commits(self, repo_id: str, snap: _Snapshot) -> dict[int, str]:
        """Version -> commit, found by the titles pushes give their commits (for lost tags)."""
        found: dict[int, str] = {}
        with self._errors("list commits", repo_id):
            for c in self.api.list_repo_commits(repo_id, revision=snap.main):
                title = c.title or ""
                tag = title[len("tunehub: push ") :] if title.startswith("tunehub: push ") else ""
                if (number := version_of_tag(tag)) is not None:  # _PUSH_TITLE, parsed like a tag
                    found.setdefault(number, c.commit_id)
        return found

    def _sync_refs(self, repo_id: str, snap: _Snapshot) -> None:
        """Make tags and alias branches agree with the state (they are its projection)."""
        state = snap.state
        if state is None:
            return
        from huggingface_hub.errors import HfHubHTTPError

        with self._errors("sync tags and branches", repo_id):
            missing = [v for v in sorted(snap.live()) if f"v{v}" not in snap.tags]
            if missing:  # a push died between its commit and its tag
                found = self._push_commits(repo_id, snap)
                for version in missing:
                    if version in found:
                        self._create_tag(repo_id, version, found[version], snap)
            for version in sorted(snap.deleted()):
                tag = f"v{version}"
                if tag in snap.tags:
                    try:
                        self.api.delete_tag(repo_id, tag=tag)
                    except HfHubHTTPError as exc:
                        if self._status(exc) != 404:
                            raise
                    snap.tags.pop(tag, None)
            for alias, version in state.aliases:
                target = snap.tags.get(f"v{version}")
                if target is not None and alias not in RESERVED_ALIASES:
                    self._move_branch(repo_id, alias, target, snap)
            managed = {m.alias for m in state.history} - set(state.alias_map) - RESERVED_ALIASES
            for alias in sorted(managed & set(snap.branches)):
                try:
                    self.api.delete_branch(repo_id, branch=alias)
                except HfHubHTTPError as exc:
                    if self._status(exc) != 404:
                        raise
                snap.branches.pop(alias, None)
        self._remember(snap)

    def _sync_latest(self, repo_id: str) -> None:
        """Sync tags and branches to the newest state, again if main moved meanwhile: a writer
        that synced from an older state is then corrected by whoever wrote last."""
        for _ in range(5):
            snap = self._online_snapshot(repo_id)
            self._sync_refs(repo_id, snap)
            with self._errors("sync tags and branches", repo_id):
                main = {r.name: r.target_commit for r in self.api.list_repo_refs(repo_id).branches}.get("main")
            if main == snap.main:
                return

    # --- operations ----------------------------------------------------------------------------
    def push(self, folder: str | Path, ref: str | ModuleRef) -> VersionInfo:
        ref, repo_id = self._repo(ref)
        if ref.version is not None or ref.alias is not None:
            raise Conflict(f"push takes a name without @version: versions are assigned by the registry (got {ref})")
        self._refuse_xet_to_an_lfs_hub()
        module = check_module_for_push(folder)  # the same checks as every store (names the Hub takes)
        manifest = module.manifest
        files = dict(manifest.files)
        files[MANIFEST_FILE] = sha256_file(module.path / MANIFEST_FILE)
        record = VersionRecord(
            version=0,  # the number is taken below, from the state read at each attempt
            manifest_sha256=files[MANIFEST_FILE],
            files=tuple(sorted(files.items())),
            kind=manifest.kind.value,
            task=manifest.task,
            objective=manifest.objective,
            parent=manifest.parent,
            base_fingerprint=manifest.base.fingerprint,
            base_model_id=manifest.base.model_id,
            size_bytes=sum((module.path / rel).stat().st_size for rel in files),
            created_at=_now(),
            pushed_by=current_actor(),
        )
        self._require_online("push")
        self.check_parent(manifest)
        for attempt in range(_MAX_ATTEMPTS):
            try:
                snap = self._online_snapshot(repo_id)
            except ModuleNotFound:
                with self._errors("push", repo_id):
                    self.api.create_repo(repo_id, exist_ok=True)  # the first push creates the repo
                snap = self._online_snapshot(repo_id)
            state = snap.state if snap.state is not None else self._adopt(repo_id, snap)
            if snap.state is not None:
                self._sync_refs(repo_id, snap)
            # a tag left by a push whose state commit was lost still takes its number
            version = registry_state.next_version(state, snap.tag_numbers())
            new_state = registry_state.add_version(state, replace(record, version=version))
            last = {"action": f"push v{version}", "by": record.pushed_by, "at": record.created_at}
            operations = self._push_operations(repo_id, module.path, files, manifest, snap, new_state, last)
            try:
                with self._errors("push", repo_id):
                    commit = self.api.create_commit(
                        repo_id,
                        operations,
                        commit_message=_PUSH_TITLE.format(version=version),
                        commit_description=(
                            f"tunehub module {self._public_repo(ref)} version {version}: {manifest.kind.value},"
                            f" manifest sha256 {files[MANIFEST_FILE]}"
                        ),
                        revision="main",
                        parent_commit=snap.main,
                    )
            except Conflict:
                self._backoff(attempt)  # another writer moved main: re-read and take the next number
                continue
            snap.main, snap.state = commit.oid, new_state
            self._create_tag(repo_id, version, commit.oid, snap)
            self._remember(snap)
            return self._info(ref, version, snap)
        raise Conflict(f"{repo_id} changed too often while pushing to it; try again")

    def _adopt(self, repo_id: str, snap: _Snapshot) -> RegistryState:
        """A repo without tunehub state: fine when empty (just created), refused when it holds files."""
        with self._errors("push", repo_id):
            present = self.api.list_repo_files(repo_id, revision=snap.main) if snap.main else []
        foreign = sorted(p for p in present if p not in (".gitattributes", MODEL_CARD_FILE))
        if foreign:
            raise Conflict(
                f"hf repo {repo_id} exists and is not a tunehub module (no {STATE_FILE});"
                f" it holds {', '.join(foreign[:5])}{'...' if len(foreign) > 5 else ''}: pick another name"
            )
        return RegistryState()

    def _push_operations(
        self,
        repo_id: str,
        folder: Path,
        files: dict[str, str],
        manifest: Manifest,
        snap: _Snapshot,
        state: RegistryState,
        last: dict[str, Any],
    ) -> list[Any]:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations: list[Any] = []
        for rel in sorted(files):
            operation = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
            # the bytes about to go up are the bytes that were verified
            if operation.upload_info.sha256.hex() != files[rel]:
                raise IntegrityError(f"{folder / rel} changed while it was being pushed")
            operations.append(operation)
        if MODEL_CARD_FILE not in files:
            # the Hub lists and filters repos by their card; the module brought none, so add one
            card = model_card(manifest, repo_id).encode()
            operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD_FILE, path_or_fileobj=card))
        operations.append(self._state_op(repo_id, state, last))
        keep = set(files) | {STATE_FILE, ".gitattributes", MODEL_CARD_FILE}
        with self._errors("push", repo_id):
            present = self.api.list_repo_files(repo_id, revision=snap.main) if snap.main else []
        operations += [CommitOperationDelete(path_in_repo=p) for p in present if p not in keep]
        return operations

    def resolve(self, ref: str | ModuleRef) -> VersionInfo:
        return self._resolved(ref)[3]

    def pull(self, ref: str | ModuleRef, dest: str | Path | None = None, *, force: bool = False) -> LocalModule:
        ref, repo_id, snap, info = self._resolved(ref)
        self.check_trust(info)
        state = self._require_module(ref, snap)
        files = state.record(info.version).file_digests
        owned = dest is None  # the modules folder is the store's own; a --dest folder is the user's
        if dest is None:
            dest = self.modules_dir / self.namespace / ref.name / str(info.version)
        known = {record.manifest_sha256 for record in state.records()}
        snapshot: list[Path] = []  # downloaded on the first file copied: not at all when dest is current

        def copy_file(rel: str, target: Path) -> None:
            if not snapshot:
                snapshot.append(self._snapshot_download(repo_id, info, snap))
            _copy_verified(snapshot[0] / rel, target, files[rel], f"{info.ref}: {rel}")

        path, manifest = install_module(dest, files, copy_file, known_manifests=known, owned=owned, force=force, where=info.ref)
        return LocalModule(path=path, manifest=manifest, ref=info.ref, version=info.version)

    def _snapshot_download(self, repo_id: str, info: VersionInfo, snap: _Snapshot) -> Path:
        from huggingface_hub import snapshot_download

        # online by tag (that also records refs/v<N> in the HF cache for offline use), offline by sha
        revision = f"v{info.version}" if snap.online or info.commit is None else info.commit
        if snap.online and info.commit is None:  # the tag was lost; the commit is still on main
            revision = self._push_commits(repo_id, snap).get(info.version, revision)
        with self._errors(f"pull {info.ref}", repo_id):
            path = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    ignore_patterns=[".tunehub/*"],
                    local_files_only=not snap.online,
                    **self._download_kwargs(),
                )
            )
        if info.commit is not None and path.name != info.commit:
            raise IntegrityError(f"tag v{info.version} of {repo_id} moved: it points to {path.name}, not {info.commit}")
        return path

    def manifest(self, ref: str | ModuleRef) -> Manifest:
        from huggingface_hub import hf_hub_download

        ref, repo_id, snap, info = self._resolved(ref)
        revision = info.commit or f"v{info.version}"
        with self._errors(f"read the manifest of {info.ref}", repo_id):
            path = Path(
                hf_hub_download(
                    repo_id, MANIFEST_FILE, revision=revision, local_files_only=not snap.online, **self._download_kwargs()
                )
            )
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != info.manifest_sha256:
            _evict(path)
            raise IntegrityError(f"the manifest of {info.ref} from the hub is damaged: its sha256 does not match")
        return Manifest.from_json(data, f"{info.ref}/{MANIFEST_FILE}")

    def list(
        self,
        *,
        base: str | None = None,
        kind: str | ModuleKind | None = None,
        task: str | None = None,
        namespace: str | None = None,
    ) -> list[VersionInfo]:
        kind_value = kind.value if isinstance(kind, ModuleKind) else kind
        if namespace is not None and namespace != self.namespace.lower():
            return []
        filters = Filters(base=base, kind=kind_value, task=task)
        found = []
        for ref, snap, state in self._modules([kind_value] if kind_value else []):
            latest = state.latest_usable()
            if latest is None:
                continue
            info = self._info(ref, latest, snap)
            if filters.match(info):
                found.append(info)
        return found

    def all_versions(self) -> builtins.list[VersionInfo]:
        return [self._info(ref, v, snap) for ref, snap, state in self._modules() for v in sorted(state.live)]

    def repo_name(self, ref: str | ModuleRef) -> str:
        return self._public_repo(self._repo(ref)[0])

    def _modules(self, tags: builtins.list[str] | None = None) -> Iterator[tuple[ModuleRef, _Snapshot, RegistryState]]:
        """Every module of the namespace with a live version (and these card tags), as the Hub
        lists them; a repo whose tunehub state is damaged is skipped."""
        self._require_online("listing modules")
        with self._errors("list"):
            repo_ids = sorted(m.id for m in self.api.list_models(author=self.namespace, filter=[LIST_TAG, *(tags or [])]))
        for repo_id in repo_ids:
            owner, _, name = repo_id.partition("/")
            if owner != self.namespace:
                continue
            try:
                ref = ModuleRef(name=validate_name(name))
            except InvalidReference:
                continue  # not a name tunehub could have pushed
            try:
                snap = self._online_snapshot(repo_id)
                state = self._require_module(ref, snap)
            except (ModuleNotFound, IntegrityError):
                continue
            yield ref, snap, state

    def versions(self, ref: str | ModuleRef, *, include_yanked: bool = True) -> builtins.list[VersionInfo]:
        ref, repo_id = self._repo(ref)
        snap = self._read_snapshot(repo_id)
        self._require_module(ref, snap)
        infos = [self._info(ref, v, snap) for v in sorted(snap.live())]
        return [i for i in infos if include_yanked or not i.yanked]

    def aliases(self, ref: str | ModuleRef) -> dict[str, int]:
        ref, repo_id = self._repo(ref)
        snap = self._read_snapshot(repo_id)
        return self._require_module(ref, snap).alias_map

    def alias_history(self, ref: str | ModuleRef, alias: str | None = None) -> builtins.list[AliasMove]:
        ref, repo_id = self._repo(ref)
        snap = self._read_snapshot(repo_id)
        moves = self._require_module(ref, snap).history
        return [m for m in moves if alias is None or m.alias == alias]

    @staticmethod
    def _check_alias_name(alias: str) -> None:
        registry_state.check_movable_alias(alias)
        if alias in RESERVED_ALIASES or is_commit_sha(alias):
            raise InvalidReference(f"alias {alias!r} is reserved on the Hub (a branch or commit name); pick another")

    def promote(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        ref, repo_id = self._repo(ref)
        self._check_alias_name(alias)

        def change(state: RegistryState, snap: _Snapshot) -> tuple[RegistryState, AliasMove, str]:
            new_state, move = registry_state.promote(
                state, ref, alias, self._public_repo(ref), by=current_actor(), at=_now(), tags=snap.tags
            )
            return new_state, move, f"tunehub: promote {alias} -> v{move.to_version}"

        move, _ = self._update_state(ref, repo_id, change)
        self._sync_latest(repo_id)
        return move

    def rollback(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        ref, repo_id = self._repo(ref)
        validate_alias(alias)

        def change(state: RegistryState, snap: _Snapshot) -> tuple[RegistryState, AliasMove, str]:
            new_state, move = registry_state.rollback(state, alias, self._public_repo(ref), by=current_actor(), at=_now())
            return new_state, move, f"tunehub: rollback {alias} -> v{move.to_version}"

        move, _ = self._update_state(ref, repo_id, change)
        self._sync_latest(repo_id)
        return move

    def yank(self, ref: str | ModuleRef, reason: str = "", *, force: bool = False) -> VersionInfo:
        ref, repo_id = self._repo(ref)
        version = ref.version
        if version is None:
            raise Conflict(f"yank takes an exact version (name@N), got {ref}")
        if not force:
            self.check_no_children(ref, [version], "yank")

        def change(state: RegistryState, snap: _Snapshot) -> tuple[RegistryState, None, str]:
            new_state, _ = registry_state.yank(state, version, self._public_repo(ref), reason, by=current_actor(), at=_now())
            return new_state, None, f"tunehub: yank v{version}"

        _, snap = self._update_state(ref, repo_id, change)
        return self._info(ref, version, snap)

    def sign(self, ref: str | ModuleRef, signature: SignatureEntry) -> VersionInfo:
        ref, repo_id = self._repo(ref)
        version = ref.version
        if version is None:
            raise Conflict(f"sign takes an exact version (name@N), got {ref}")

        def change(state: RegistryState, snap: _Snapshot) -> tuple[RegistryState, None, str]:
            new_state = registry_state.add_signature(state, version, signature, self._public_repo(ref))
            return new_state, None, f"tunehub: sign v{version} ({signature.key_id[:16]})"

        _, snap = self._update_state(ref, repo_id, change)
        return self._info(ref, version, snap)

    def delete(self, ref: str | ModuleRef, *, force: bool = False) -> builtins.list[int]:
        ref, repo_id = self._repo(ref)
        if ref.alias is not None:
            raise Conflict(f"delete takes name@N or a bare name, not an alias ({ref})")
        if not force:
            live = self._require_module(ref, self._read_snapshot(repo_id)).live if ref.version is None else set()
            self.check_no_children(ref, [ref.version] if ref.version is not None else sorted(live), "delete")

        def change(state: RegistryState, snap: _Snapshot) -> tuple[RegistryState, list[int], str]:
            # the numbers stay taken: they are never handed out again
            new_state, targets = registry_state.delete(state, ref.version, self._public_repo(ref), force=force)
            return new_state, targets, f"tunehub: delete {', '.join(f'v{v}' for v in targets)}"

        deleted, _ = self._update_state(ref, repo_id, change)
        self._sync_latest(repo_id)
        return deleted


def _evict(path: Path) -> None:
    """Drop a damaged file from the HF cache (the blob and the snapshot link to it)."""
    try:
        blob = path.resolve()
        if blob != path:
            blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _copy_verified(source: Path, target: Path, digest: str, what: str) -> None:
    """Copy ``source`` (a cache link) to ``target`` as a plain file, checking its sha256."""
    check = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            while chunk := src.read(_CHUNK):
                check.update(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        raise IntegrityError(f"{what} is missing from the downloaded snapshot") from None
    if check.hexdigest() != digest:
        _evict(source)  # the next pull downloads it again instead of trusting the bad copy
        raise IntegrityError(
            f"{what} from the hub is damaged: its sha256 is {check.hexdigest()[:12]}..., the registry recorded {digest[:12]}..."
        )


__all__ = ["HubStore", "STATE_FILE", "prepare_environment"]
