"""Signed modules at serve time: the server's trust policy, the tenants' signing rules, and the
provenance ``/v1/models`` shows (signatures themselves: :mod:`tunehub.registry.signing`).

Three things, each where the server already does that kind of work:

- **The server's policy** (``tunehub serve --trust KEY_OR_DIR --require-signed``) is the
  registry store's own (``open_store(uri, trust=policy)``): the module pool's reads refuse a
  version it refuses before any file is read, and the error (``UnsignedModule``,
  ``UntrustedSigner``, ``SignatureMismatch``: 403, the message names the reason) fails the request
  that asked for the module, as an ``IncompatibleBase`` does. A refused load is never cached by
  the pool; a module once loaded stays trusted (versions are immutable).
- **A tenant's rules** (``require_signed_by`` in the tenants file, :mod:`.tenants`): the HTTP
  side picks the rules whose pattern matches the requested ``namespace/name`` (resolving a
  reference never changes the name) and sends them with the request; the inference worker
  resolves the reference to ``repo@N`` as the pool does (:class:`SigningChecks`), checks that
  exact version against each rule's keys, acquires that exact version, and compares the loaded
  module's files with the ones the signature covered. Successful checks are cached per
  (rule, ``repo@N``) for good; refusals for at most the alias TTL (a version may be signed later).
- **Provenance**: who signed a version (each signature checked against the server's keys) and its
  signed lineage (the parent chain), from :func:`tunehub.registry.store.provenance_with_lineage`, cached per
  ``repo@N`` and its signatures (:class:`ProvenanceCache`); ancestors the caller may not use are
  withheld (:func:`lineage_for`).

Refusals name the server's keys by file name, and a tenant's keys by the path its tenants file
gives, never by a server path the client has no business knowing.

This module imports neither torch nor LitServe.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunehub.errors import ConfigError, SignatureMismatch, UntrustedModule
from tunehub.registry.manifest import MANIFEST_FILE
from tunehub.registry.signing import TrustedKey, TrustPolicy

_CACHE_ENTRIES = 4096  # verified (rule, repo@N) pairs and provenance entries kept (LRU beyond)
PROVENANCE_TTL_S = 60.0  # how long a version's lineage (its ancestors' signatures) is reused


def server_trust_policy(paths: Iterable[str | Path], require_signed: bool) -> TrustPolicy | None:
    """The policy of ``--trust PATHS --require-signed`` (None without either), its keys named by
    their file name in messages.

    Raises:
        ConfigError: a key file that is missing, private or not an EC public key (every problem
            at once), a folder without keys, or ``require_signed`` without keys.
    """
    paths = list(paths)
    if not paths and not require_signed:
        return None
    policy = TrustPolicy.from_paths(paths, require_signed)
    keys = tuple(dataclasses.replace(key, source=Path(key.source).name) for key in policy.keys)
    return TrustPolicy(keys=keys, require_signed=require_signed)


def load_rule_keys(written: list[str], base_dir: Path) -> tuple[TrustedKey, ...]:
    """The public keys a tenant's rule lists (files or folders; relative paths from ``base_dir``),
    each named by the path as written. Raises ConfigError with every problem."""
    keys: dict[str, TrustedKey] = {}
    problems: list[str] = []
    for text in written:
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            found = TrustPolicy.from_paths([path]).keys
        except ConfigError as exc:
            problems.extend(p.removeprefix("trust: ") for p in exc.problems)
            continue
        for key in found:
            source = f"{text.rstrip('/')}/{Path(key.source).name}" if path.is_dir() else text
            keys.setdefault(key.key_id, dataclasses.replace(key, source=source))
    if problems:
        raise ConfigError(problems)
    return tuple(keys.values())


@dataclass(frozen=True)
class SigningRule:
    """A tenant's requirement: modules whose ``namespace/name`` matches ``pattern`` load for it
    only with a valid signature by one of ``keys``."""

    pattern: str
    keys: tuple[TrustedKey, ...]

    def matches(self, repo: str) -> bool:
        return fnmatch.fnmatchcase(repo, self.pattern)

    @property
    def identity(self) -> tuple[str, tuple[str, ...]]:
        """What a verification under this rule depends on (cache key)."""
        return self.pattern, tuple(sorted(key.key_id for key in self.keys))

    def policy(self) -> TrustPolicy:
        return TrustPolicy(keys=self.keys, require_signed=True)

    def to_wire(self) -> dict[str, Any]:
        """Plain values for the message to the inference worker."""
        return {"pattern": self.pattern, "keys": [[k.key_id, k.source, k.pem.decode("ascii")] for k in self.keys]}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> SigningRule:
        keys = tuple(TrustedKey(key_id=str(i), source=str(s), pem=str(p).encode("ascii")) for i, s, p in raw["keys"])
        return cls(pattern=str(raw["pattern"]), keys=keys)


def rules_from_wire(raw: Any) -> list[SigningRule]:
    return [SigningRule.from_wire(item) for item in raw or ()]


class SigningChecks:
    """The tenants' signing rules, checked in the inference worker on the exact version a request
    will use. ``resolve(ref)`` gives the version's record (``VersionInfo``: files, signatures):
    the registry store's. Thread-safe."""

    def __init__(self, resolve: Callable[[str], Any], refusal_ttl_s: float):
        self._resolve = resolve
        self.refusal_ttl_s = max(0.0, refusal_ttl_s)
        self._verified: OrderedDict[tuple[Any, str], dict[str, str]] = OrderedDict()  # -> signed digests
        self._refused: dict[tuple[Any, str], tuple[float, UntrustedModule]] = {}
        self._lock = threading.Lock()

    def cached(self, rules: list[SigningRule], key: str) -> dict[str, str] | None:
        """The digests a cached success of every rule covers, or None (check then). Raises a
        refusal seen less than the alias TTL ago."""
        now = time.monotonic()
        digests: dict[str, str] | None = None
        with self._lock:
            for rule in rules:
                entry = (rule.identity, key)
                refused = self._refused.get(entry)
                if refused is not None:
                    if refused[0] > now:
                        raise type(refused[1])(str(refused[1]))
                    del self._refused[entry]
                found = self._verified.get(entry)
                if found is None or (digests is not None and found != digests):
                    return None
                self._verified.move_to_end(entry)
                digests = found
        return digests

    def check(self, rules: list[SigningRule], key: str) -> dict[str, str]:
        """Check ``key`` (``repo@N``) against every rule; the digests the signatures cover.

        Raises:
            UnsignedModule, UntrustedSigner, SignatureMismatch: a rule refuses the version (the
                message says which rule of this API key).
            ModuleNotFound, VersionNotFound: as the registry's resolve.
        """
        info = self._resolve(key)
        digests = dict(info.files)
        for rule in rules:
            entry = (rule.identity, key)
            try:
                rule.policy().check(info.ref, digests, info.signatures)
            except UntrustedModule as exc:
                refusal = type(exc)(
                    f"{exc}; this API key requires a signature by one of those keys for modules matching {rule.pattern!r}"
                )
                if self.refusal_ttl_s > 0:
                    with self._lock:
                        self._refused[entry] = (time.monotonic() + self.refusal_ttl_s, refusal)
                raise refusal from None
            with self._lock:
                self._refused.pop(entry, None)
                self._verified[entry] = digests
                self._verified.move_to_end(entry)
                while len(self._verified) > _CACHE_ENTRIES:
                    self._verified.popitem(last=False)
        return digests

    def confirm_loaded(self, rules: list[SigningRule], key: str, digests: Mapping[str, str], files: Mapping[str, str]) -> None:
        """The module the pool holds for ``key`` has the files that were verified (its manifest's
        ``files``); SignatureMismatch otherwise (a record rewritten between the check and the
        load), and the cached successes for ``key`` are dropped."""
        signed = {rel: digest for rel, digest in digests.items() if rel != MANIFEST_FILE}
        if dict(files) == signed:
            return
        with self._lock:
            for rule in rules:
                self._verified.pop((rule.identity, key), None)
        raise SignatureMismatch(f"{key}: refused, the loaded files differ from the ones whose signature was verified")


# --- provenance (/v1/models) --------------------------------------------------------------------------
class ProvenanceCache:
    """``provenance(ref) -> dict`` (:func:`tunehub.registry.store.provenance_with_lineage`), cached per version and
    its own signatures (a new signature shows at once; an ancestor's within :data:`PROVENANCE_TTL_S`).

    ``refusal(info)``: why the server's policy refuses the version (None: it loads), from
    ``ModuleStore.check_trust``; a version whose trusted signature does not match is shown with
    that reason instead of signers."""

    def __init__(self, provenance: Callable[[str], dict[str, Any]], check_trust: Callable[[Any], Any] | None):
        self._provenance = provenance
        self._check_trust = check_trust
        self._entries: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, info: Any) -> dict[str, Any]:
        key = (info.ref, tuple(sorted((s.key_id, s.at) for s in info.signatures)))
        now = time.monotonic()
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and cached[0] > now:
                self._entries.move_to_end(key)
                return cached[1]
        value = self._compute(info)
        with self._lock:
            self._entries[key] = (now + PROVENANCE_TTL_S, value)
            while len(self._entries) > _CACHE_ENTRIES:
                self._entries.popitem(last=False)
        return value

    def _compute(self, info: Any) -> dict[str, Any]:
        try:
            value = dict(self._provenance(info.ref))
        except UntrustedModule as exc:  # a trusted key's signature that does not match
            unchecked = [{"key_id": s.key_id, "by": s.by, "at": s.at, "status": "not checked"} for s in info.signatures]
            return {"signed": bool(unchecked), "verified_by": [], "signatures": unchecked, "lineage": [], "refused": str(exc)}
        if self._check_trust is not None and not value.get("verified_by"):
            try:
                self._check_trust(info)
            except UntrustedModule as exc:  # unsigned or untrusted under --require-signed
                value["refused"] = str(exc)
        return value


def lineage_for(provenance: dict[str, Any], may_use: Callable[[str], bool]) -> dict[str, Any]:
    """``provenance`` as one caller may see it: the lineage stops at the first ancestor whose
    name the caller may not use, shown by its reference only (as the entry's ``parent`` is)."""
    from tunehub.errors import InvalidReference
    from tunehub.registry.refs import parse_ref

    lineage: list[dict[str, Any]] = []
    for step in provenance.get("lineage", ()):
        try:
            allowed = may_use(parse_ref(step["ref"]).repo)
        except InvalidReference:
            allowed = False
        if not allowed:
            lineage.append({"ref": step["ref"], "withheld": "this API key may not use this module"})
            break
        lineage.append(step)
    return {**provenance, "lineage": lineage}
