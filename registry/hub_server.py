"""A private hub: a local folder served over the subset of the Hugging Face Hub HTTP API that
``huggingface_hub`` uses (``tunehub hub serve --root DIR``).

It lets a team share modules from one machine with the stock client (``HfApi``,
``hf_hub_download``, ``snapshot_download``, ``PeftModel.from_pretrained``) and it is what the
``hf://`` store's tests run against. Clients must set ``HF_HUB_DISABLE_XET=1``: uploads then use
the classic LFS batch protocol, which this server speaks; it never advertises Xet.

This module is the HTTP layer; the folder, its layout and its atomic writes are
:mod:`tunehub.registry.hub_storage`. :class:`HubApp` is an ASGI application built on Starlette
(its ``Request``, responses and thread pool); :class:`HubServer` runs it under uvicorn, which
owns the connection: request framing (``Content-Length``, chunked bodies), keep-alive and the
HTTP/1.1 parser (h11). The Hub's routes are matched here, on the raw request target, not by
Starlette's router: a revision or a file path may hold ``%2F``, which a decoded path loses.

Guarantees:
- Writes are atomic and nothing outside the root is ever read or written (see
  :mod:`~tunehub.registry.hub_storage`): repo names, revisions and file paths are validated
  before they reach the storage.
- Access is decided in one place, :func:`authorize` (caller, namespace, level needed, whether the
  repo is private), called for every route before the storage is touched beyond finding the repo
  (its name as stored, its private flag). Without a token file anyone may do anything.
  The line format (one token per line) gives every token write and admin everywhere and
  anonymous read. The YAML format (:func:`parse_access_yaml`) gives each token a name, a level
  per namespace (none < read < write) and admin or not; anonymous gets its own levels. Reads
  need read, writes need write (401 without a token, 403 with one), deleting a repo needs an
  admin token, and a repo the caller may not read is the 404 of a missing repo; ``/api/models``
  lists only what the caller may read. LFS upload targets carry a signed URL instead of a token
  (the client sends no header there): the write check happens at the batch request.
- Private repos (``create_repo(..., private=True)``, or ``visibility: private``) are private:
  readable, and listed, only for callers with a token and read access on the namespace; anonymous
  callers never see one, whatever the anonymous levels; for anyone else a private repo is the 404
  of a missing repo. ``repo_info`` reports ``private``.
- Repo ids are case-insensitive, as on the Hub: a request finds an existing repo (and namespace)
  whatever the case it is spelled in, access is checked on the namespace as stored (token-file
  patterns match in any case), and creating a repo whose name differs only in case from an
  existing one is the 409 of an existing repo. ``create_repo("x")`` and ``delete_repo("x")``
  without a namespace use the caller's (its token's name), as the Hub does.
- Revisions are a branch (first), a tag, a full commit id or a unique prefix of one (7 hex
  digits or more); a branch may share a tag's name.
- Every answer carries an ``X-Request-Id`` (the client quotes it in its errors); a repo that does
  not exist or may not be seen answers ``X-Error-Code: RepoNotFound`` on every route under it
  (also for an id without a namespace), with the Hub's texts where clients match on them
  ("Repository not found", "Reference refs/heads/x already exists", the 412 of a stale
  ``parentCommit``); an invalid file path in a preupload is the Hub's 422 (in a commit, a 400).
- Preupload answers ``shouldIgnore`` from the root ``.gitignore`` (the one sent with the
  preupload, else the branch head's); ``/api/validate-yaml`` refuses model-card metadata whose
  known keys have the wrong shape (``model-index``, ``license``, ``tags``...) and warns about a
  card without metadata; ``expand`` on the tree and paths-info gives each entry the last commit
  that changed it.
- Every accepted write appends one JSON line to ``<root>/audit.log`` (who, action, repo,
  revision/commit), after it succeeded; a refused write leaves no line.
- Bad input gets a clear 4xx with a JSON ``{"error": ...}`` body and, where the Hub has one, an
  ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).
- Malformed requests get a 400, never a 5xx: every parse of client bytes that reach the
  application (request target, query, the headers this server interprets, JSON and NDJSON
  bodies, forms, model-card YAML) goes through one of the ``parse_*`` functions below, which
  raise :class:`~tunehub.errors.InvalidRequest`; :meth:`_Exchange.run` turns it into the 400 in
  one place. Requests uvicorn cannot frame (a broken request line, header or chunk size, two
  different ``Content-Length`` values, a transfer coding other than chunked) never reach the
  application: uvicorn answers them with its own plain-text 400 and closes that connection.
  The request line, query and headers are checked before authentication (a 400 there says
  nothing about any repo); bodies of writes are read only after it, so an anonymous client
  cannot make the server read and parse a large body (an answer given with a body left unread
  closes the connection).
- Bodies are streamed: a body larger than ``max_body_bytes`` (or than an LFS object's announced
  size) is refused with a 413 as soon as its declared length or the bytes received pass the
  limit, never read whole into memory; LFS uploads go to disk chunk by chunk as they arrive, and
  a body that stalls for two minutes is refused with a 408. Every handler, and all its blocking
  file IO, runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote_to_bytes

import anyio
import anyio.from_thread
import anyio.to_thread
import uvicorn
import yaml
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tunehub.errors import ConfigError, InvalidRequest
from tunehub.registry.hub_storage import (
    LFS_SUFFIXES,
    LFS_THRESHOLD_BYTES,
    SHA1_HEX,
    SHA256_HEX,
    Commit,
    HubError,
    HubStorage,
    check_file_path,
    check_ref_name,
    check_repo_part,
    git_blob_oid,
    lfs_pointer,
    repo_not_found,
    strip_ref_prefix,
)

DEFAULT_MAX_BODY_BYTES = 1 << 30
#: the actions under /api/models/{namespace}/{name}/ that write (every other one reads)
_WRITE_ACTIONS = frozenset({"preupload", "commit", "tag", "branch", "super-squash"})
PAGE_SIZE = 1000
_CHUNK = 1 << 20
_SIGNED_URL_TTL_S = 3600
#: a request body that sends nothing for this long is refused (408) and its worker thread freed
_BODY_IDLE_TIMEOUT_S = 120
#: idle keep-alive connections are closed after this long
_KEEP_ALIVE_S = 120
#: a body over the limit is still read (and dropped) up to this much past it, so that the client
#: reads the 413 instead of a connection reset; beyond, the connection is closed at once
_DRAIN_EXCESS = 64 * _CHUNK
#: request line and headers together (uvicorn's h11 parser refuses more with a 400)
_MAX_HEAD_BYTES = 64 * 1024
#: handlers run in worker threads and may wait on a slow client's body: allow many at once
_WORKER_THREADS = 256
#: requests still running when the server stops get this long to finish
_GRACEFUL_SHUTDOWN_S = 5


def _bad(message: str) -> HubError:
    return HubError(400, message)


def _header_safe(value: str) -> str:
    """A header value that cannot split the response: error messages quote client input (a
    revision may be ``x%0D%0ASet-Cookie:...``), so control and non-ASCII characters become '?'."""
    return re.sub(r"[^\x20-\x7e]", "?", value)


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
    """Whether the body is chunked; any other transfer coding is refused. (uvicorn frames the body
    and refuses other codings first; this is what the application reads from the header.)"""
    if value is None:
        return False
    codings = [c.strip().lower() for c in value.split(",") if c.strip()]
    if codings != ["chunked"]:
        raise InvalidRequest(f"unsupported Transfer-Encoding {value[:80]!r}: only 'chunked' is accepted")
    return True


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


# --- model cards -----------------------------------------------------------------------------------
#: the front matter may follow blank lines (as huggingface_hub's repocard reads it)
_FRONT_MATTER = re.compile(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", re.DOTALL)


def front_matter(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the YAML front matter of a model card as JSON-safe data, or None; why it is unusable, or None)."""
    text = text.lstrip()
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


#: model-card metadata keys that hold one string, or a string or a list of strings
_CARD_STRINGS = ("library_name", "pipeline_tag", "thumbnail", "license_name", "license_link", "model_name")
_CARD_STRING_LISTS = ("license", "tags", "datasets", "metrics", "language", "base_model", "new_version")


def _is_string_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _model_index_problems(value: Any) -> list[str]:
    """What is wrong with a ``model-index`` (a list of ``{name, results: [{task: {type}, ...}]}``)."""
    if not isinstance(value, list):
        return ['"model-index" must be an array']
    problems = []
    for i, model in enumerate(value):
        if not isinstance(model, dict):
            problems.append(f'"model-index[{i}]" must be an object')
            continue
        if not isinstance(model.get("name"), str):
            problems.append(f'"model-index[{i}].name" must be a string')
        results = model.get("results")
        if not isinstance(results, list):
            problems.append(f'"model-index[{i}].results" must be an array')
            continue
        for j, result in enumerate(results):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance(result, dict) or not isinstance(result.get("task"), dict):
                problems.append(f'"{where}.task" must be an object')
            elif not isinstance(result["task"].get("type"), str):
                problems.append(f'"{where}.task.type" must be a string')
            if isinstance(result, dict) and "metrics" in result and not isinstance(result["metrics"], list):
                problems.append(f'"{where}.metrics" must be an array')
    return problems


def validate_card(text: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a model card's metadata, as the Hub's ``/api/validate-yaml`` reports
    them: broken YAML or a known key of the wrong shape is an error; no metadata is a warning."""
    data, problem = front_matter(text)
    if problem:
        return [problem], []
    if not data:
        return [], ["empty or missing yaml metadata in repo card"]
    errors = []
    for key in _CARD_STRINGS:
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for key in _CARD_STRING_LISTS:
        if key in data and not _is_string_list(data[key]):
            errors.append(f'"{key}" must be a string or an array of strings')
    if "model-index" in data:
        errors += _model_index_problems(data["model-index"])
    return errors, []


# --- .gitignore -----------------------------------------------------------------------------------
_MAX_GITIGNORE_BYTES = 1 << 20
#: wildcards per .gitignore pattern: the regular expressions they become stay linear enough
_MAX_WILDCARDS = 16


def _glob_to_regex(glob: str) -> str:
    """A .gitignore glob (``*``, ``?``, ``[...]``, ``**``, backslash escapes) as a regular expression."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("/.*")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            body = glob[i + 1 : end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + "".join("\\" + c if c in "\\^[]" else c for c in body) + "]")
            i = end + 1
        elif glob[i] == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def parse_gitignore(text: str) -> Callable[[str], bool]:
    """Whether a repo path is ignored by a root ``.gitignore`` (git's rules: ``#`` comments, ``!``
    negation, a trailing ``/`` for folders only, patterns with a ``/`` anchored at the root, others
    matching at any depth; a path inside an ignored folder is ignored). Never ignores ``.gitignore``."""
    if len(text) > _MAX_GITIGNORE_BYTES:
        raise InvalidRequest(f".gitignore is larger than {_MAX_GITIGNORE_BYTES} bytes")
    rules: list[tuple[re.Pattern[str], bool, bool]] = []  # (regex, negated, folders only)
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if not line.endswith("\\ "):
            line = line.rstrip(" ")
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line[1:] if negated else line
        folders_only = line.endswith("/")
        line = line.rstrip("/")
        if not line or sum(line.count(c) for c in "*?[") > _MAX_WILDCARDS:
            continue
        anchored = "/" in line
        body = _glob_to_regex(line.lstrip("/"))
        rules.append((re.compile(body if anchored else "(?:.*/)?" + body), negated, folders_only))

    def ignored_one(path: str, is_folder: bool) -> bool:
        result = False
        for regex, negated, folders_only in rules:
            if (is_folder or not folders_only) and regex.fullmatch(path):
                result = not negated
        return result

    def ignored(path: str) -> bool:
        if path == ".gitignore" or not rules:
            return False
        parts = path.split("/")
        return any(ignored_one("/".join(parts[:depth]), True) for depth in range(1, len(parts))) or ignored_one(path, False)

    return ignored


# --- access: tokens, scopes, private namespaces ----------------------------------------------------
#: access levels, in order: a level grants every level below it
LEVELS: dict[str, int] = {"none": 0, "read": 1, "write": 2}
NONE, READ, WRITE = 0, 1, 2
_LEVEL_NAMES = {value: key for key, value in LEVELS.items()}
#: token names: what whoami returns and the audit log records (URL-safe: LFS upload URLs carry it)
_TOKEN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")
#: the first significant line of a scoped (YAML) token file; anything else is the line format
_YAML_START = re.compile(r"(?:---|(?:anonymous|tokens)[ \t]*:)(?:[ \t#].*)?")
_FILE_KEYS = ("anonymous", "tokens")
_TOKEN_KEYS = ("name", "sha256", "access", "admin")
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Grant:
    """What one identity may do: a level per namespace (``"*"`` for every other one) and whether it
    may delete repositories."""

    name: str
    access: dict[str, int]
    admin: bool = False

    def level(self, namespace: str) -> int:
        """The most specific pattern wins: the namespace's own (in any case: namespaces are
        case-insensitive, as on the Hub), else ``*``, else none."""
        if namespace in self.access:
            return self.access[namespace]
        folded = namespace.casefold()
        for pattern, level in self.access.items():
            if pattern.casefold() == folded:
                return level
        return self.access.get("*", NONE)


@dataclass(frozen=True)
class TokenEntry:
    """A token of a token file, stored as the sha256 of its text (never in clear)."""

    name: str
    sha256: str
    grant: Grant


@dataclass(frozen=True)
class AccessPolicy:
    """A parsed token file: who may read, write and delete what.

    ``tokens`` maps the sha256 of each accepted token to its entry; ``anonymous`` is what requests
    without a token get. A token never has less than anonymous on a namespace (it could be left
    out of the request)."""

    anonymous: Grant
    tokens: dict[str, TokenEntry]
    source: str = ""

    def identify(self, token: str) -> TokenEntry | None:
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        # compare every digest in constant time; which one matched does not show in the timing
        found = None
        for known, entry in self.tokens.items():
            if hmac.compare_digest(known, digest):
                found = entry
        return found

    def describe(self) -> str:
        return f"{len(self.tokens)} token(s) from {self.source}" if self.source else f"{len(self.tokens)} token(s)"


#: without a token file: anyone may do anything (as before tokens existed)
OPEN_POLICY = AccessPolicy(anonymous=Grant(ANONYMOUS, {"*": WRITE}, admin=True), tokens={})


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a token's name (or ``anonymous``), with what it may do."""

    name: str
    grant: Grant
    has_token: bool

    def level(self, namespace: str) -> int:
        return self.grant.level(namespace)


def authorize(
    caller: Caller, namespace: str, name: str | None, needed: int, *, admin: bool = False, private: bool = False
) -> None:
    """The one access check of the hub: does ``caller`` have ``needed`` (READ or WRITE) on
    ``namespace`` (and, with ``admin``, an admin token)? Raises the refusal otherwise:

    - no read access: the 404 of a missing repo (:func:`repo_not_found`) when a repo is named,
      so nothing tells a private repo from a missing one; creating a repo there is a 401/403;
    - a ``private`` repo: only callers with a token and read access on its namespace see it,
      anonymous never (whatever the anonymous levels); for anyone else it is that same 404;
    - read but not the write (or admin) asked for: 401 without a token (send one), 403 with one,
      naming the namespace.

    Nothing here looks at the storage: the caller passes whether the repo is private (False for a
    missing one), so the answer for a repo the caller may not see is the answer for a missing one."""
    level = caller.level(namespace)
    if private and not caller.has_token:
        level = NONE
    if level < READ and name is not None:
        raise repo_not_found()
    if level >= needed and (not admin or caller.grant.admin):
        return
    if not caller.has_token:
        raise HubError(401, "this hub accepts writes only with a token: send Authorization: Bearer <token>")
    if level < needed:
        raise HubError(403, f"token {caller.name!r} may not {_VERBS[needed]} the namespace {namespace!r}")
    raise HubError(403, f"token {caller.name!r} may not delete repositories: that needs an admin token")


_VERBS = {READ: "read", WRITE: "write to"}


def _legacy_name(token: str) -> str:
    return "user-" + hashlib.sha256(token.encode()).hexdigest()[:8]


def legacy_policy(tokens: frozenset[str] | set[str], source: str = "") -> AccessPolicy:
    """The one-token-per-line format: every token writes everywhere and may delete (admin);
    anonymous reads everywhere. whoami names a token ``user-<first 8 hex of its sha256>``."""
    entries = {}
    for token in sorted(tokens):
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        name = _legacy_name(token)
        entries[digest] = TokenEntry(name, digest, Grant(name, {"*": WRITE}, admin=True))
    return AccessPolicy(anonymous=Grant(ANONYMOUS, {"*": READ}), tokens=entries, source=source)


def load_tokens(path: str | Path) -> frozenset[str]:
    """One accepted token per line (the line format); blank lines and ``#`` comments are skipped."""
    tokens = set()
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.add(line)
    if not tokens:
        raise ConfigError(f"{path} holds no token")
    return frozenset(tokens)


def is_scoped_token_file(text: str) -> bool:
    """Whether a token file is the YAML format: its first line that is not blank or a ``#``
    comment is ``---``, ``anonymous:`` or ``tokens:`` (a line-format token has no spaces and
    would have to be exactly ``tokens:`` to be taken for one)."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return bool(_YAML_START.fullmatch(line.rstrip()))
    return False


def load_access(path: str | Path) -> AccessPolicy:
    """The access policy of a token file, in either format (see :func:`parse_access_yaml`); a
    :class:`~tunehub.errors.ConfigError` that names the file, line and entry for anything wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc}") from None
    if is_scoped_token_file(text):
        return parse_access_yaml(text, str(path))
    return legacy_policy(load_tokens(path), str(path))


def _where(source: str, node: yaml.Node) -> str:
    return f"{source} line {node.start_mark.line + 1}"


def _scalar(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _mapping(node: yaml.Node, what: str, source: str, problems: list[str]) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """(key, key node, value node) of a mapping node; a problem for a non-mapping, a non-string
    key or a key given twice (plain YAML loading would keep the last one silently)."""
    if not isinstance(node, yaml.MappingNode):
        problems.append(f"{_where(source, node)}: {what} must be a mapping")
        return []
    items, seen = [], set()
    for key_node, value_node in node.value:
        key = _scalar(key_node)
        if key is None or key_node.tag != "tag:yaml.org,2002:str":
            problems.append(f"{_where(source, key_node)}: {what}: keys must be strings")
            continue
        if key in seen:
            problems.append(f"{_where(source, key_node)}: {what}: {key!r} is given twice")
            continue
        seen.add(key)
        items.append((key, key_node, value_node))
    return items


def _access_map(node: yaml.Node, what: str, source: str, problems: list[str]) -> dict[str, int]:
    """``{pattern: level}``: patterns ``*``, ``ns`` or ``ns/*``; levels none, read, write."""
    access: dict[str, int] = {}
    for pattern, key_node, value_node in _mapping(node, what, source, problems):
        namespace = pattern[:-2] if pattern.endswith("/*") else pattern
        if namespace != "*" and not (_NAMESPACE.fullmatch(namespace) and ".." not in namespace):
            problems.append(
                f"{_where(source, key_node)}: {what}: invalid pattern {pattern!r}: use '*', 'namespace' or 'namespace/*'"
            )
            continue
        level = _scalar(value_node)
        if level not in LEVELS or value_node.tag != "tag:yaml.org,2002:str":
            problems.append(
                f"{_where(source, value_node)}: {what}: level of {pattern!r} must be one of none, read, write,"
                f" not {level if level is not None else 'a ' + type(value_node).__name__!r}"
            )
            continue
        if namespace.casefold() in {known.casefold() for known in access}:
            problems.append(f"{_where(source, key_node)}: {what}: {pattern!r} names the same namespace as another pattern")
            continue
        access[namespace] = LEVELS[level]
    return access


def parse_access_yaml(text: str, source: str = "token file") -> AccessPolicy:
    """Parse and strictly validate the YAML token file::

        anonymous:                 # requests without a token; default {"*": read}
          "*": read
          secret: none
        tokens:
          - name: ci-acme          # whoami and the audit log name it so
            sha256: <64 hex>       # sha256 of the token (`printf %s "$TOKEN" | sha256sum`)
            access: {"acme/*": write, "*": read}
          - name: ops
            sha256: <64 hex>
            access: {"*": write}
            admin: true            # may delete repositories

    Every problem found (unknown keys, bad levels or patterns, bad hex, duplicate names, hashes or
    keys) is reported at once in one :class:`~tunehub.errors.ConfigError`, each with its line."""
    problems: list[str] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    if root is None:
        raise ConfigError(f"{source}: empty token file")
    anonymous = Grant(ANONYMOUS, {"*": READ})
    entries: dict[str, TokenEntry] = {}
    tokens_node = None
    for key, key_node, value_node in _mapping(root, "the token file", source, problems):
        if key == "anonymous":
            anonymous = Grant(ANONYMOUS, _access_map(value_node, "anonymous", source, problems))
        elif key == "tokens":
            tokens_node = value_node
        else:
            problems.append(f"{_where(source, key_node)}: unknown key {key!r} (allowed: {', '.join(_FILE_KEYS)})")
    if tokens_node is None:
        if isinstance(root, yaml.MappingNode):
            problems.append(f"{source}: no 'tokens' list")
    elif not isinstance(tokens_node, yaml.SequenceNode):
        problems.append(f"{_where(source, tokens_node)}: 'tokens' must be a list")
    else:
        names: set[str] = set()
        for index, entry_node in enumerate(tokens_node.value):
            entry = _parse_token_entry(entry_node, index, source, problems, anonymous)
            if entry is None:
                continue
            what = f"{_where(source, entry_node)}: tokens[{index}] ({entry.name})"
            if entry.name in names:
                problems.append(f"{what}: the name {entry.name!r} is used by another token")
            elif entry.sha256 in entries:
                problems.append(f"{what}: the same sha256 as token {entries[entry.sha256].name!r}")
            else:
                names.add(entry.name)
                entries[entry.sha256] = entry
    if problems:
        raise ConfigError(problems)
    return AccessPolicy(anonymous=anonymous, tokens=entries, source=source)


def _parse_token_entry(node: yaml.Node, index: int, source: str, problems: list[str], anonymous: Grant) -> TokenEntry | None:
    what = f"tokens[{index}]"
    items = {key: (key_node, value_node) for key, key_node, value_node in _mapping(node, what, source, problems)}
    if not isinstance(node, yaml.MappingNode):
        return None
    name_node = items.get("name", (None, None))[1]
    name = _scalar(name_node) if name_node is not None else None
    if name is not None:
        what = f"tokens[{index}] ({name})"
    before = len(problems)
    for key, (key_node, _) in items.items():
        if key not in _TOKEN_KEYS:
            problems.append(f"{_where(source, key_node)}: {what}: unknown key {key!r} (allowed: {', '.join(_TOKEN_KEYS)})")
    for key in ("name", "sha256", "access"):
        if key not in items:
            problems.append(f"{_where(source, node)}: {what}: missing {key!r}")
    if name_node is not None and (
        name is None or name_node.tag != "tag:yaml.org,2002:str" or not _TOKEN_NAME.fullmatch(name) or name == ANONYMOUS
    ):
        problems.append(
            f"{_where(source, name_node)}: {what}: invalid name {name!r}: letters, digits, '.', '_', '-', '@',"
            " at most 64, not 'anonymous'"
        )
    digest = None
    if "sha256" in items:
        hex_node = items["sha256"][1]
        raw = _scalar(hex_node)
        digest = raw.lower().removeprefix("sha256:") if raw is not None else None
        if digest is None or not SHA256_HEX.fullmatch(digest):
            problems.append(
                f"{_where(source, hex_node)}: {what}: sha256 must be 64 hex digits (the sha256 of the token, never the"
                " token itself)"
            )
    access: dict[str, int] = {}
    if "access" in items:
        access = _access_map(items["access"][1], f"{what} access", source, problems)
    admin = False
    if "admin" in items:
        admin_node = items["admin"][1]
        value = _scalar(admin_node)
        if admin_node.tag != "tag:yaml.org,2002:bool" or value is None:
            problems.append(f"{_where(source, admin_node)}: {what}: admin must be true or false")
        else:
            admin = value.lower() in ("true", "yes", "on", "y")
    if len(problems) > before or name is None or digest is None:
        return None
    # a token never has less than anonymous (the client could leave it out)
    own = Grant(name, access, admin=admin)
    merged = {pattern: max(own.level(pattern), anonymous.level(pattern)) for pattern in {"*", *access, *anonymous.access}}
    return TokenEntry(name, digest, Grant(name, merged, admin=admin))


def _repo_path(value: Any) -> str:
    """A file path of a preupload: :func:`check_file_path`, refused with the Hub's 422 (the client
    asks preupload first, so that is the answer it reads; a commit refuses one with a 400)."""
    try:
        return check_file_path(value)
    except HubError as exc:
        raise HubError(422, f"Invalid path: {exc.message}") from None


# --- HTTP ------------------------------------------------------------------------------------------
@dataclass
class HubConfig:
    root: Path
    #: who may read, write and delete what (without a token file: anyone, anything)
    access: AccessPolicy = OPEN_POLICY
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    verbose: bool = False
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def tokens_required(self) -> bool:
        """Whether a token file is in force (then anonymous requests have only its anonymous rights)."""
        return self.access is not OPEN_POLICY


class HubApp:
    """The hub as an ASGI application: one :class:`_Exchange` per request, run in a worker thread.

    Any ASGI server can run it; :class:`HubServer` runs it under uvicorn."""

    def __init__(self, config: HubConfig):
        self.config = config
        self.storage = HubStorage(config.root)
        self.meta_cache: dict[tuple[str, str, str], dict[str, Any] | None] = {}
        self.meta_lock = threading.Lock()
        self._threads_raised = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan events to act on, no websockets
            return
        if not self._threads_raised:
            # a handler holds its thread while it waits for a slow client's body (up to
            # _BODY_IDLE_TIMEOUT_S): anyio's default of 40 would let 40 such clients stall the hub
            anyio.to_thread.current_default_thread_limiter().total_tokens = _WORKER_THREADS
            self._threads_raised = True
        exchange = _Exchange(self, Request(scope, receive))
        try:
            response = await run_in_threadpool(exchange.run)
        except anyio.get_cancelled_exc_class():
            # uvicorn cancels what still runs when the server stops (say, a client stalled in the
            # middle of its body): answer that instead of leaving uvicorn a traceback to log
            response = _json(503, {"error": "the hub is stopping"}, {"Connection": "close"})
        await response(scope, receive, send)


def _with_headers(response: Response, headers: dict[str, str]) -> Response:
    """``response`` sending exactly ``headers``, their names spelled as given (``Content-Length``,
    ``X-Error-Code``, as the Hub and the stdlib server this replaced send them). Starlette lower-cases
    the names it is given; h11, the parser :class:`HubServer` runs, writes them as they come, so a
    client that reads raw answers and looks for the usual spelling finds it."""
    response.raw_headers = [(name.encode("latin-1"), _header_safe(value).encode("latin-1")) for name, value in headers.items()]
    return response


def _response(status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> Response:
    all_headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
    return _with_headers(Response(body, status_code=status), all_headers)


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> Response:
    return _response(status, json.dumps(payload).encode(), "application/json; charset=utf-8", headers)


def _file_chunks(handle: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    with handle:
        handle.seek(start)
        remaining = length
        while remaining:
            chunk = handle.read(min(remaining, _CHUNK))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


class _Exchange:
    """One request and its answer. Created on the event loop; :meth:`run` runs in a worker thread
    (every handler and all their file IO) and pulls the body from the loop a chunk at a time."""

    def __init__(self, app: HubApp, request: Request):
        self.app = app
        self.config = app.config
        self.storage = app.storage
        self.request = request
        self.method = request.method
        self.segments: list[str] = []
        self.query: dict[str, list[str]] = {}
        self._stream = request.stream()
        self._body_done = False
        self._close = False
        self._framing_known = False  # until Content-Length and Transfer-Encoding have parsed
        self._chunked = False
        self._length: int | None = None
        self._range: tuple[int | None, int | None] | None = None
        self._authorization: tuple[str, str] | None = None
        self._caller_known: Caller | None = None
        #: sent back as X-Request-Id on every answer (the client quotes it in its errors)
        self.request_id = uuid.uuid4().hex

    # --- plumbing ------------------------------------------------------------------------------
    def run(self) -> Response:
        try:
            self._parse_head()
            response = self._route(self.method)
        except InvalidRequest as exc:  # the one place a malformed request becomes its 400 (or 413)
            response = self._error(HubError(exc.http_status, str(exc)))
        except HubError as exc:
            response = self._error(exc)
        except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so without leaking details
            if self.config.verbose:
                traceback.print_exc()
            else:
                sys.stderr.write(
                    f"tunehub hub: internal error on {self.method} {self._target()} (request {self.request_id}): {exc!r}\n"
                )
            response = self._error(HubError(500, "internal server error"))
        response.raw_headers.append((b"X-Request-Id", self.request_id.encode()))
        if self._close or (self._has_body() and not self._body_done):
            # an anonymous client must not make us read its body, a refused one may be huge: close,
            # and say so (a client that reuses a connection we close silently races our close)
            response.raw_headers.append((b"Connection", b"close"))
        return response

    def _target(self) -> str:
        """The request target as the client sent it (uvicorn keeps the undecoded path)."""
        scope = self.request.scope
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = scope.get("query_string", b"")
        return (raw_path + (b"?" + query if query else b"")).decode("latin-1")

    def _parse_head(self) -> None:
        """Parse the request target and every header this server interprets, before routing and
        authentication: a malformed request is a 400 whoever sends it."""
        self.segments, self.query = parse_target(self._target())
        values = {name: self._header(name) for name in _INTERPRETED_HEADERS}
        self._chunked = parse_transfer_encoding(values["Transfer-Encoding"])
        self._length = parse_content_length(self.request.headers.getlist("Content-Length"))
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
        values = self.request.headers.getlist(name)
        for value in values:
            if not _HEADER_VALUE.fullmatch(value):
                raise InvalidRequest(f"the {name} header holds bytes that are not printable ASCII")
        if name != "Content-Length" and len(set(values)) > 1:  # Content-Length: parse_content_length
            raise InvalidRequest(f"conflicting {name} headers")
        return values[0] if values else None

    def _error(self, exc: HubError) -> Response:
        headers = dict(exc.headers)
        if exc.code:
            headers["X-Error-Code"] = exc.code
        headers["X-Error-Message"] = exc.message[:500]
        return _json(exc.status, {**exc.extra, "error": exc.message}, headers)

    def _has_body(self) -> bool:
        if not self._framing_known:  # unparsable framing: what the body holds is unknown
            return True
        return self._chunked or bool(self._length)

    # --- the body ------------------------------------------------------------------------------
    async def _receive_chunk(self) -> bytes | None:
        """On the event loop: the next non-empty piece of the body, None at its end; b"" when the
        server stops meanwhile (this task is then cancelled: a value, unlike an exception, leaves
        asyncio nothing to report as it shuts down)."""
        try:
            with anyio.fail_after(_BODY_IDLE_TIMEOUT_S):
                async for chunk in self._stream:
                    if chunk:
                        return chunk
        except anyio.get_cancelled_exc_class():
            return b""
        return None

    def _next_chunk(self) -> bytes | None:
        """The next piece of the body (None at its end), from the worker thread."""
        try:
            chunk = anyio.from_thread.run(self._receive_chunk)
        except ClientDisconnect:
            self._close = True
            raise _bad("request body ended early") from None
        except TimeoutError:
            self._close = True
            raise HubError(408, f"the request body stalled: nothing came for {_BODY_IDLE_TIMEOUT_S} seconds") from None
        except (concurrent.futures.CancelledError, RuntimeError):  # the event loop is gone (anyio's RunFinishedError)
            chunk = b""
        if chunk == b"":
            self._close = True
            raise HubError(503, "the hub is stopping")
        return chunk

    def _iter_body(self, limit: int) -> Iterator[bytes]:
        """The request body in chunks as they arrive, refusing more than ``limit`` bytes: a larger
        declared length before reading any, a chunked body as soon as it passes the limit."""
        if self._length is not None and self._length > limit:
            self._refuse_oversized(limit, declared=self._length)
        total = 0
        while (chunk := self._next_chunk()) is not None:
            total += len(chunk)
            if total > limit:
                self._refuse_oversized(limit, received=total)
            yield chunk
        self._body_done = True

    def _refuse_oversized(self, limit: int, *, declared: int | None = None, received: int = 0) -> None:
        """Raise the 413, after reading and dropping a modest excess (so that the client reads our
        answer instead of a reset); the connection is closed after it."""
        self._close = True
        budget = limit + _DRAIN_EXCESS
        if declared is None or declared <= budget:
            try:
                while (chunk := self._next_chunk()) is not None:
                    received += len(chunk)
                    if received > budget:
                        break
                else:
                    self._body_done = True
            except HubError:  # the client went away or stalled: the 413 stands
                pass
        if declared is not None:
            raise HubError(413, f"request body of {declared} bytes is larger than the limit of {limit} bytes")
        raise HubError(413, f"request body is larger than the limit of {limit} bytes")

    def _read_body(self, limit: int | None = None) -> bytes:
        limit = self.config.max_body_bytes if limit is None else min(limit, self.config.max_body_bytes)
        return b"".join(self._iter_body(limit))

    def _spool_body(self) -> IO[bytes]:
        """The body in a temporary file (in memory while small), for NDJSON commits."""
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - returned open; the caller closes it
            max_size=8 * _CHUNK, dir=str(self.storage.root / "tmp")
        )
        try:
            for chunk in self._iter_body(self.config.max_body_bytes):
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
        host = self.request.headers.get("Host")
        if not host or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", host):
            server_host, port = self.request.scope.get("server") or ("127.0.0.1", 80)
            host = f"[{server_host}]:{port}" if ":" in server_host else f"{server_host}:{port}"
        return f"http://{host}"

    def _flag(self, name: str) -> bool:
        values = self.query.get(name)
        return parse_flag(values[-1], name) if values else False

    def _uint_param(self, name: str) -> int | None:
        values = self.query.get(name)
        return parse_uint(values[-1], name) if values else None

    # --- auth ----------------------------------------------------------------------------------
    def _caller(self) -> Caller:
        """Who sent the request; a 401 for a token the hub does not know (or another scheme)."""
        if self._caller_known is not None:
            return self._caller_known
        access = self.config.access
        if self._authorization is None:
            caller = Caller(ANONYMOUS, access.anonymous, has_token=False)
        else:
            scheme, token = self._authorization  # well-formed: _parse_head checked it
            if scheme != "bearer":
                raise HubError(401, "Invalid credentials in Authorization header")
            if not self.config.tokens_required:  # no token file: any token, full access (as always)
                caller = Caller(ANONYMOUS, access.anonymous, has_token=True)
            else:
                entry = access.identify(token)
                if entry is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
                caller = Caller(entry.name, entry.grant, has_token=True)
        self._caller_known = caller
        return caller

    def _authorize(self, namespace: str, name: str | None, needed: int, *, admin: bool = False, private: bool = False) -> Caller:
        """:func:`authorize` for this request's caller; returns the caller (for the audit log)."""
        caller = self._caller()
        authorize(caller, namespace, name, needed, admin=admin, private=private)
        return caller

    def _require_some_write(self, *, admin: bool = False) -> Caller:
        """Before reading a body that names the repo (create, delete): refuse a caller who may
        write nowhere (or, with ``admin``, is no admin), so that an anonymous client cannot make
        the hub read its body; the namespace is checked once the body is read."""
        caller = self._caller()
        if not any(level >= WRITE for level in caller.grant.access.values()) or (admin and not caller.grant.admin):
            if not caller.has_token:
                raise HubError(401, "this hub accepts writes only with a token: send Authorization: Bearer <token>")
            if admin and not caller.grant.admin:
                raise HubError(403, f"token {caller.name!r} may not delete repositories: that needs an admin token")
            raise HubError(403, f"token {caller.name!r} may not write to any namespace")
        return caller

    def _sign(self, *parts: str) -> str:
        message = "|".join(parts).encode()
        return hmac.new(self.config.secret, message, hashlib.sha256).hexdigest()

    # --- routing -------------------------------------------------------------------------------
    def _route(self, method: str) -> Response:
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
                # the upload URLs it hands out carry no token: the write check is here
                namespace, name = self._repo_access(namespace, name, WRITE)
                return self._lfs_batch(namespace, name)
            if len(rest) == 1 and method == "PUT":
                return self._lfs_put(namespace, name, rest[0])
            if rest == ["verify"] and method == "POST":
                return self._lfs_verify(namespace, name)
        if len(s) >= 4 and s[2] == "resolve" and method in ("GET", "HEAD"):
            namespace, name = self._repo_access(s[0], s[1], READ)
            return self._resolve_file(namespace, name, s[3], "/".join(s[4:]))
        if len(s) >= 3 and s[1] == "resolve" and method in ("GET", "HEAD"):
            check_repo_part(s[0], "name")
            raise repo_not_found()  # a repo id without a namespace: there is none here
        raise HubError(404, f"no such endpoint: {method} /{'/'.join(s)}")

    def _repo_access(self, namespace: str, name: str, needed: int, *, admin: bool = False) -> tuple[str, str]:
        """Validate a repo id from the request, find the repo whatever the case of the id, run
        :func:`authorize` for it (with whether it is private) and refuse a missing one with the
        same 404 as a hidden one; returns (namespace, name) as the repo's folders spell them."""
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        found = self.storage.find_repo(namespace, name)
        if found is not None:
            namespace, name = found
        else:
            namespace = self.storage.canonical_namespace(namespace)
        private = found is not None and self.storage.is_private(namespace, name)
        self._authorize(namespace, name, needed, admin=admin, private=private)
        if found is None:
            raise repo_not_found()
        return namespace, name

    def _route_api(self, method: str, s: list[str]) -> Response:
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
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        if s == ["models"] and method == "GET":
            return self._list_models()
        if s and s[0] in ("datasets", "spaces", "kernels"):
            raise HubError(404, "this hub serves model repositories only", "RepoNotFound")
        if len(s) == 2 and s[0] == "models":
            check_repo_part(s[1], "name")
            raise repo_not_found()  # a repo id without a namespace: there is none here
        if len(s) < 3 or s[0] != "models":
            raise HubError(404, f"no such endpoint: {method} /api/{'/'.join(s)}")
        rest = s[3:]
        action = rest[0] if rest else None
        arg = rest[1] if len(rest) > 1 else None
        # every route under /api/models/{namespace}/{name}: reads need read, these need write; a
        # repo the caller may not see, or a missing one, is a 404 whatever the route
        namespace, name = self._repo_access(s[1], s[2], WRITE if action in _WRITE_ACTIONS else READ)
        if action is None and method == "GET":
            return self._model_info(namespace, name, "main")
        if action == "revision" and len(rest) == 2 and method == "GET":
            return self._model_info(namespace, name, arg)  # type: ignore[arg-type]
        if action == "refs" and len(rest) == 1 and method == "GET":
            return self._list_refs(namespace, name)
        if action == "auth-check" and len(rest) == 1 and method == "GET":
            return _json(200, {})  # the caller may read the repo: _repo_access said so
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
        if action == "super-squash" and len(rest) == 2 and method == "POST":
            return self._squash(namespace, name, arg)  # type: ignore[arg-type]
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
        """(namespace, name) of a create or delete request; without an organization, the caller's
        own namespace (its token's name), as the Hub does."""
        name = body.get("name")
        organization = body.get("organization")
        repo_type = body.get("type") or "model"
        if repo_type != "model":
            raise _bad("this hub serves model repositories only")
        if isinstance(name, str) and "/" in name and organization is None:
            organization, _, name = name.partition("/")
        if organization is None:
            caller = self._caller()
            if caller.has_token and caller.name != ANONYMOUS:
                organization = caller.name
        if not isinstance(organization, str) or not organization:
            raise _bad("repositories need a namespace: create 'namespace/name' (or send a named token)")
        return check_repo_part(organization, "namespace"), check_repo_part(name, "name")  # type: ignore[arg-type]

    @staticmethod
    def _private_from_body(body: dict[str, Any]) -> bool:
        """``visibility`` (public or private) or the older ``private`` flag of a create request."""
        visibility, private = body.get("visibility"), body.get("private")
        if visibility is not None:
            if visibility not in ("public", "private"):
                raise _bad(f"visibility must be 'public' or 'private' on this hub, not {str(visibility)[:40]!r}")
            return visibility == "private"
        if private is not None and not isinstance(private, bool):
            raise _bad("private must be true or false")
        return bool(private)

    def _create_repo(self) -> Response:
        self._require_some_write()
        body = self._json_body()
        namespace, name = self._repo_id_from_body(body)
        private = self._private_from_body(body)
        namespace = self.storage.canonical_namespace(namespace)
        caller = self._authorize(namespace, None, WRITE)
        url = f"{self._base_url()}/{namespace}/{name}"
        try:
            self.storage.create_repo(namespace, name, caller.name, private=private)
        except HubError as exc:
            found = self.storage.find_repo(namespace, name)
            if found is not None:
                url = f"{self._base_url()}/{found[0]}/{found[1]}"
            exc.extra["url"] = url  # the client reads it even from a 409 (exist_ok=True)
            raise
        self.storage.audit(caller.name, "create_repo", f"{namespace}/{name}", private=private or None)
        return _json(200, {"url": url, "name": f"{namespace}/{name}", "id": f"{namespace}/{name}"})

    def _delete_repo(self) -> Response:
        self._require_some_write(admin=True)
        namespace, name = self._repo_access(*self._repo_id_from_body(self._json_body()), WRITE, admin=True)
        caller = self._caller()
        self.storage.delete_repo(namespace, name)
        self.storage.audit(caller.name, "delete_repo", f"{namespace}/{name}")
        return _json(200, {})

    def _whoami(self) -> Response:
        caller = self._caller()
        if not caller.has_token:
            raise HubError(401, "Invalid credentials in Authorization header")
        user = caller.name
        return _json(200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": {"type": "access_token"}})

    def _validate_yaml(self) -> Response:
        body = self._json_body()
        content = body.get("content", "")
        if not isinstance(content, str):
            raise _bad("content must be a string")
        problems, notes = validate_card(content)
        errors = [{"message": problem} for problem in problems]
        warnings = [{"message": note} for note in notes]
        if errors:
            return _json(400, {"errors": errors, "warnings": warnings, "error": "Invalid metadata in README.md"})
        return _json(200, {"errors": [], "warnings": warnings})

    # --- metadata ------------------------------------------------------------------------------
    def _card_of(self, repo: Path, commit: Commit) -> dict[str, Any] | None:
        entry = commit.files.get("README.md")
        if entry is None or entry["size"] > 1 << 20:
            return None
        key = (str(repo), commit.id, "card")
        with self.app.meta_lock:
            if key in self.app.meta_cache:
                return self.app.meta_cache[key]
        try:
            text = self.storage.read_object(entry["sha256"]).decode("utf-8", "replace")
        except OSError:
            return None
        data = card_data(text)
        with self.app.meta_lock:
            if len(self.app.meta_cache) > 4096:
                self.app.meta_cache.clear()
            self.app.meta_cache[key] = data
        return data

    def _model_summary(
        self, namespace: str, name: str, commit: Commit, *, card: bool, siblings: bool, blobs: bool
    ) -> dict[str, Any]:
        repo = self.storage.repo_dir(namespace, name)
        meta = self.storage.repo_meta(repo)
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
            "private": meta.get("private") is True,
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

    def _model_info(self, namespace: str, name: str, rev: str) -> Response:
        repo = self.storage.require_repo(namespace, name)
        commit, _ = self.storage.resolve(repo, rev)
        info = self._model_summary(namespace, name, commit, card=True, siblings=True, blobs=self._flag("blobs"))
        return _json(200, info)

    def _list_models(self) -> Response:
        storage = self.storage
        search = (self.query.get("search") or [""])[-1].lower()
        author = (self.query.get("author") or [""])[-1]
        wanted = set(self.query.get("filter", []))
        full = self._flag("full")
        with_card = full or self._flag("cardData")
        limit_param = self._uint_param("limit")
        limit = min(limit_param, PAGE_SIZE) if limit_param is not None else PAGE_SIZE
        cursor = self._uint_param("cursor") or 0
        caller = self._caller()
        found = []
        for namespace, name in storage.iter_repos():
            if caller.level(namespace) < READ:  # what the caller may not read is not listed
                continue
            if not caller.has_token and storage.is_private(namespace, name):  # nor private repos, anonymously
                continue
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
        return _json(200, page, headers)

    def _list_refs(self, namespace: str, name: str) -> Response:
        refs = self.storage.refs(self.storage.require_repo(namespace, name))
        return _json(
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

    @staticmethod
    def _tree_entry(path: str, entry: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            item["lfs"] = {
                "oid": entry["sha256"],
                "size": entry["size"],
                "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"])),
            }
        return item

    @staticmethod
    def _folder_entry(path: str, commit: Commit) -> dict[str, Any]:
        oid = hashlib.sha1(f"{commit.id}:{path}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _add_last_commits(self, repo: Path, commit: Commit, items: list[dict[str, Any]]) -> None:
        """``expand``: each entry's ``lastCommit``, the most recent commit that changed that path."""
        changes = self.storage.last_changes(repo, commit, [item["path"] for item in items])
        for item in items:
            last = changes[item["path"]]
            item["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}

    def _tree(self, namespace: str, name: str, rev: str, path: str) -> Response:
        repo = self.storage.require_repo(namespace, name)
        commit, _ = self.storage.resolve(repo, rev)
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
                    items.append(self._folder_entry(folder, commit))
            if recursive or len(parts) == 1:
                items.append(self._tree_entry(file_path, inside[file_path]))
        return self._paginated(items, (lambda page: self._add_last_commits(repo, commit, page)) if expand else None)

    def _paginated(self, items: list[dict[str, Any]], on_page: Callable[[list[dict[str, Any]]], None] | None = None) -> Response:
        cursor = self._uint_param("cursor") or 0
        page = items[cursor : cursor + PAGE_SIZE]
        if on_page is not None:
            on_page(page)
        headers = {}
        if cursor + PAGE_SIZE < len(items):
            query = "&".join(f"{quote(k)}={quote(v)}" for k, values in self.query.items() if k != "cursor" for v in values)
            path = "/".join(quote(s, safe="") for s in self.segments)
            headers["Link"] = f'<{self._base_url()}/{path}?{query}&cursor={cursor + PAGE_SIZE}>; rel="next"'
        return _json(200, page, headers)

    def _commits(self, namespace: str, name: str, rev: str) -> Response:
        repo = self.storage.require_repo(namespace, name)
        commit, _ = self.storage.resolve(repo, rev)
        items = [
            {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author, "avatar": None}],
                "date": c.date,
            }
            for c in self.storage.history(repo, commit)
        ]
        return self._paginated(items)

    def _paths_info(self, namespace: str, name: str, rev: str) -> Response:
        repo = self.storage.require_repo(namespace, name)
        commit, _ = self.storage.resolve(repo, rev)
        raw = self._read_body(16 * _CHUNK)
        content_type = self.request.headers.get("Content-Type", "")
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
                items.append(self._tree_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                items.append(self._folder_entry(path, commit))
        if expand:
            self._add_last_commits(repo, commit, items)
        return _json(200, items)

    # --- uploads -------------------------------------------------------------------------------
    def _writable_branch(self, repo: Path, rev: str) -> str:
        if self._flag("create_pr"):
            raise _bad("pull requests are not supported by this hub")
        refs = self.storage.refs(repo)
        branch = strip_ref_prefix(rev)
        if branch in refs["branches"]:
            return branch
        if branch in refs["tags"] or SHA1_HEX.fullmatch(rev):
            raise _bad(f"Invalid rev id: {rev} is not a branch; commits go to a branch")
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _preupload(self, namespace: str, name: str, rev: str) -> Response:
        repo = self.storage.require_repo(namespace, name)
        body = self._json_body()
        branch = self._writable_branch(repo, rev)
        head, _ = self.storage.resolve(repo, branch)
        files = body.get("files")
        if not isinstance(files, list):
            raise _bad("files must be a list")
        ignored = self._gitignore(body, head)
        answers = []
        for item in files:
            if not isinstance(item, dict):
                raise _bad("each file must be an object")
            path = _repo_path(item.get("path"))
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
            answer: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": ignored(path)}
            existing = head.files.get(path)
            if existing is not None:
                answer["oid"] = existing["sha256"] if lfs else existing["oid"]
            answers.append(answer)
        return _json(200, {"files": answers, "commitOid": head.id})

    def _gitignore(self, body: dict[str, Any], head: Commit) -> Callable[[str], bool]:
        """The root .gitignore that applies to a preupload: the one sent with it (``gitIgnore``: a
        .gitignore in the same commit), else the branch head's."""
        text = body.get("gitIgnore")
        if text is not None and not isinstance(text, str):
            raise _bad("gitIgnore must be a string")
        if text is None:
            entry = head.files.get(".gitignore")
            if entry is None or entry["size"] > _MAX_GITIGNORE_BYTES:
                return lambda path: False
            try:
                text = self.storage.read_object(entry["sha256"]).decode("utf-8", "replace")
            except OSError:
                return lambda path: False
        return parse_gitignore(text)

    def _lfs_batch(self, namespace: str, name: str) -> Response:
        storage = self.storage
        who = self._caller().name  # authorized by _route; the upload URLs carry it for the audit log
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
            if not isinstance(oid, str) or not SHA256_HEX.fullmatch(oid):
                raise _bad(f"invalid LFS oid {oid!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"invalid LFS size {size!r}")
            if size > self.config.max_body_bytes:
                answers.append(
                    {
                        "oid": oid,
                        "size": size,
                        "error": {"code": 413, "message": f"object larger than {self.config.max_body_bytes} bytes"},
                    }
                )
                continue
            if storage.object_size(oid) == size:
                answers.append({"oid": oid, "size": size})  # already here: nothing to upload
                continue
            signature = self._sign(namespace, name, oid, str(size), expires, who)
            query = f"size={size}&expires={expires}&by={quote(who, safe='')}&sig={signature}"
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
        return _response(200, json.dumps({"transfer": "basic", "objects": answers}).encode(), "application/vnd.git-lfs+json")

    def _check_signed(self, namespace: str, name: str, oid: str) -> tuple[int, str]:
        """(announced size, who asked the batch endpoint for the URL) of a signed LFS URL."""
        size_raw = (self.query.get("size") or [""])[-1]
        expires_raw = (self.query.get("expires") or [""])[-1]
        who = (self.query.get("by") or [""])[-1]
        signature = (self.query.get("sig") or [""])[-1]
        if not size_raw or not expires_raw or not signature:
            raise HubError(403, "upload URL is not signed")
        size = parse_uint(size_raw, "size")
        expires = parse_uint(expires_raw, "expires")
        expected = self._sign(namespace, name, oid, size_raw, expires_raw, who)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise HubError(403, "upload URL signature is invalid")
        if expires < time.time():
            raise HubError(403, "upload URL has expired: ask the LFS batch endpoint again")
        return size, who

    def _lfs_put(self, namespace: str, name: str, oid: str) -> Response:
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        if not SHA256_HEX.fullmatch(oid):
            raise _bad(f"invalid LFS oid {oid!r}")
        size, who = self._check_signed(namespace, name, oid)
        self.storage.require_repo(namespace, name)
        length = self._length
        if length is not None and length != size:
            if length > size:
                self._refuse_oversized(size, declared=length)
            raise _bad(f"Content-Length {length} differs from the announced size {size}")
        limit = min(size, self.config.max_body_bytes)
        self.storage.put_object_stream(self._iter_body(limit), oid, size)  # to disk as it arrives
        self.storage.audit(who, "lfs_upload", f"{namespace}/{name}", oid=oid, size=size)
        return _json(200, {})

    def _lfs_verify(self, namespace: str, name: str) -> Response:
        check_repo_part(namespace, "namespace")
        check_repo_part(name, "name")
        oid = (self.query.get("oid") or [""])[-1]
        if not SHA256_HEX.fullmatch(oid):
            raise _bad(f"invalid LFS oid {oid!r}")
        size, _ = self._check_signed(namespace, name, oid)
        body = self._json_body()
        if body.get("oid") not in (None, oid) or body.get("size") not in (None, size):
            raise _bad("verify body does not match the upload")
        if self.storage.object_size(oid) != size:
            raise HubError(404, f"LFS object {oid} was not uploaded", "EntryNotFound")
        return _json(200, {"message": "ok"})

    def _commit(self, namespace: str, name: str, rev: str) -> Response:
        user = self._caller().name  # authorized by _route_api
        storage = self.storage
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
            if parent is not None and (not isinstance(parent, str) or not SHA1_HEX.fullmatch(parent)):
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
        storage.audit(user, "commit", f"{namespace}/{name}", revision=branch, commit=commit.id)
        base = self._base_url()
        return _json(
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
        staged, digest = self.storage.stage_bytes(data)
        return {"sha256": digest, "size": len(data), "oid": git_blob_oid(data), "lfs": False, "staged": str(staged)}

    def _lfs_entry(self, value: dict[str, Any], path: str) -> dict[str, Any]:
        oid = value.get("oid")
        if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_HEX.fullmatch(oid):
            raise _bad(f"{path}: lfsFile needs algo sha256 and a 64-hex oid")
        size = self.storage.object_size(oid)
        if size is None:
            raise _bad(f"{path}: LFS object {oid[:12]}... was never uploaded (use the LFS batch endpoint first)")
        if value.get("size") is not None and value.get("size") != size:
            raise _bad(f"{path}: LFS object {oid[:12]}... has {size} bytes, not {value.get('size')}")
        pointer = lfs_pointer(oid, size)
        return {"sha256": oid, "size": size, "oid": git_blob_oid(pointer), "lfs": True}

    def _squash(self, namespace: str, name: str, rev: str) -> Response:
        storage = self.storage
        repo = storage.require_repo(namespace, name)
        branch = self._writable_branch(repo, rev)
        body = self._json_body()
        message = body.get("message") or f"Super-squash branch '{branch}'"
        if not isinstance(message, str) or not message.strip():
            raise _bad("message must be a non-empty string")
        who = self._caller().name
        commit = storage.squash(repo, branch, title=message.strip()[:1000], author=who)
        storage.audit(who, "super_squash", f"{namespace}/{name}", revision=branch, commit=commit.id)
        return _json(200, {"commitId": commit.id})

    # --- refs ----------------------------------------------------------------------------------
    def _create_tag(self, namespace: str, name: str, rev: str) -> Response:
        storage = self.storage
        repo = storage.require_repo(namespace, name)
        body = self._json_body()
        storage.resolve(repo, rev)  # a missing revision is a 404 before anything about the tag (as on the Hub)
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
        storage.audit(self._caller().name, "create_tag", f"{namespace}/{name}", revision=tag, commit=commit.id)
        return _json(200, {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": commit.id})

    def _delete_tag(self, namespace: str, name: str, tag: str) -> Response:
        storage = self.storage
        repo = storage.require_repo(namespace, name)
        tag = strip_ref_prefix(tag)
        with storage.locked(repo):
            refs = storage.refs(repo)
            if tag not in refs["tags"]:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            target = refs["tags"].pop(tag)
            storage.write_refs(repo, refs)
        storage.audit(self._caller().name, "delete_tag", f"{namespace}/{name}", revision=tag, commit=target.get("commit"))
        return _json(200, {})

    def _create_branch(self, namespace: str, name: str, branch: str) -> Response:
        storage = self.storage
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
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            # a branch may share a tag's name (refs/heads/x and refs/tags/x): revisions resolve branches first
            refs["branches"][branch] = commit.id
            storage.write_refs(repo, refs)
        storage.audit(self._caller().name, "create_branch", f"{namespace}/{name}", revision=branch, commit=commit.id)
        return _json(200, {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": commit.id})

    def _delete_branch(self, namespace: str, name: str, branch: str) -> Response:
        storage = self.storage
        repo = storage.require_repo(namespace, name)
        branch = strip_ref_prefix(branch)
        if branch == "main":
            raise HubError(403, "Cannot delete refs/heads/main: it is the default branch")
        with storage.locked(repo):
            refs = storage.refs(repo)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            target_id = refs["branches"].pop(branch)
            storage.write_refs(repo, refs)
        storage.audit(self._caller().name, "delete_branch", f"{namespace}/{name}", revision=branch, commit=target_id)
        return _json(200, {})

    # --- downloads -----------------------------------------------------------------------------
    def _resolve_file(self, namespace: str, name: str, rev: str, path: str) -> Response:
        storage = self.storage
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
                range_text = self.request.headers.get("Range", "")
                raise HubError(416, f"range {range_text!r} is outside the file", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        try:
            handle = open(blob, "rb")  # noqa: SIM115 - closed by _file_chunks, or below
        except FileNotFoundError:
            raise HubError(
                404, f"the content of {path} is missing from this hub", "EntryNotFound", {"X-Repo-Commit": commit.id}
            ) from None
        length = max(0, end - start + 1)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length), **headers}
        if self.method == "HEAD" or os.fstat(handle.fileno()).st_size < start + length:
            handle.close()
            if self.method != "HEAD":  # a damaged store: the bytes promised are not there
                raise HubError(500, f"the content of {path} is damaged on this hub", headers={"X-Repo-Commit": commit.id})
            return _with_headers(Response(b"", status_code=status), headers)
        # read in the thread pool a chunk at a time as the client takes them (Starlette's StreamingResponse)
        return _with_headers(StreamingResponse(_file_chunks(handle, start, length), status_code=status), headers)


# --- serving ---------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class HubServer:
    """A hub listening on a TCP port, served by uvicorn in a background thread.

    The socket is bound when the object is made (``port=0`` picks a free port), so :attr:`url` is
    known before :meth:`start`; :meth:`stop` ends it, giving requests in flight a few seconds.
    It is also a context manager (``with make_server(root, port=0) as server: ...``)."""

    def __init__(self, config: HubConfig, host: str = "127.0.0.1", port: int = 8787):
        self.config = config
        self.app = HubApp(config)
        self._socket = _bind(host, port)
        #: (host, port) it listens on
        self.server_address: tuple[str, int] = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                http="h11",  # uvicorn's own dependency: the same parser (and the same 400s) everywhere
                ws="none",
                lifespan="off",
                interface="asgi3",
                log_config=None,  # leave the process's logging alone; serve() sets up its own lines
                access_log=config.verbose,
                proxy_headers=False,  # the client address and scheme are the socket's, never X-Forwarded-*
                server_header=False,
                headers=[("Server", "tunehub-hub/1")],
                timeout_keep_alive=_KEEP_ALIVE_S,
                timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
                h11_max_incomplete_event_size=_MAX_HEAD_BYTES,
            )
        )
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def storage(self) -> HubStorage:
        return self.app.storage

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Start serving; returns once the server accepts requests."""
        if self._thread is not None:
            raise RuntimeError("this hub server was already started")
        self._thread = threading.Thread(target=self._run, name="tunehub-hub", daemon=True)
        self._thread.start()
        while not self._server.started:
            if self._stopped.wait(0.01):
                raise RuntimeError("the hub server failed to start")
        return self

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._stopped.set()

    def wait(self) -> None:
        """Block until the server stops; a signal handler may interrupt the wait by raising."""
        # an Event, not Thread.join: a KeyboardInterrupt raised inside join() can leave the
        # thread marked as finished while it still runs (Python 3.11)
        while self._thread is not None and not self._stopped.wait(0.5):
            pass

    def stop(self) -> None:
        """Stop serving and close the socket (safe to call twice, or before :meth:`start`)."""
        if self._thread is not None:
            self._server.should_exit = True
            if not self._stopped.wait(_GRACEFUL_SHUTDOWN_S + 5):
                self.stop_now()
                self._stopped.wait(5)
        self._socket.close()

    def stop_now(self) -> None:
        """Ask a :meth:`stop` under way not to wait for requests still running (safe in a signal handler)."""
        self._server.force_exit = True

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def make_server(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8787,
    token_file: str | Path | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    verbose: bool = False,
) -> HubServer:
    """A ready (bound, not yet serving) hub server; ``port=0`` picks a free port. Start it with
    :meth:`HubServer.start` or ``with``."""
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    access = load_access(token_file) if token_file else OPEN_POLICY
    config = HubConfig(root=Path(root), access=access, max_body_bytes=max_body_bytes, verbose=verbose)
    return HubServer(config, host, port)


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
    # uvicorn's own lines (with --verbose, one per request) go to stderr; stdout keeps the announcement
    uvicorn_log = logging.getLogger("uvicorn")
    saved = uvicorn_log.level, uvicorn_log.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tunehub hub: %(message)s"))
    uvicorn_log.addHandler(handler)
    uvicorn_log.setLevel(logging.INFO if verbose else logging.ERROR)  # without --verbose: its errors only
    uvicorn_log.propagate = False

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def _stop_now(signum: int, frame: object) -> None:  # a second signal while stopping
        server.stop_now()

    signals = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in signals} if in_main_thread else {}
    if in_main_thread:
        signal.signal(signal.SIGTERM, _stop)  # SIGINT raises KeyboardInterrupt already
    auth = f"access by {server.config.access.describe()}" if server.config.tokens_required else "no token needed"
    try:
        server.start()
        (announce or logging.getLogger("tunehub.hub").info)(f"tunehub hub serving {server.storage.root} on {server.url} ({auth})")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in previous:
            signal.signal(sig, _stop_now)
        server.stop()
        for sig, old in previous.items():
            if old is not None:
                signal.signal(sig, old)
        uvicorn_log.removeHandler(handler)
        uvicorn_log.setLevel(saved[0])
        uvicorn_log.propagate = saved[1]


__all__ = [
    "AccessPolicy",
    "Caller",
    "Grant",
    "HubApp",
    "HubConfig",
    "HubError",
    "HubServer",
    "HubStorage",
    "card_data",
    "check_file_path",
    "check_ref_name",
    "check_repo_part",
    "authorize",
    "git_blob_oid",
    "load_access",
    "load_tokens",
    "make_server",
    "parse_access_yaml",
    "serve",
]
