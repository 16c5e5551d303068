"""Tenants: who may call the server, which modules each may use, and how much.

A tenants file is YAML::

    tenants:
      acme:
        keys: ["sha256:9f86d081884c7d65..."]   # `tunehub tenants hash-key` prints these
        models: ["acme/*", "shared/summarize", "tiny-llama"]   # names or glob patterns
        requests_per_minute: 60      # optional; absent = unlimited
        tokens_per_minute: 20000     # prompt + completion tokens; optional
        max_tokens: 256              # largest max_tokens one request may ask for; optional
        require_signed_by:           # optional: signatures this tenant requires, by module pattern
          "acme/*": ["keys/acme-release.pub"]   # public keys (PEM files or folders of them)

Keys are stored as sha256 hashes only. Patterns match a module's ``namespace/name`` (every
version and alias of a matching name is allowed) and the base model's name, which a tenant must
be granted like any module. A pattern that is exactly the base's name grants the base only,
never a registry module that happens to have the same name. Without a tenants file the server
runs one open tenant with no limits, and then refuses to listen on anything but the loopback
interface.

Token limits hold at admission: a request reserves its (effective) ``max_tokens`` when it is
admitted, so a tenant cannot start more generation than its limit allows, and the reservation is
replaced by what the request really used (prompt + completion) when it ends, also on errors and
cancellations (then the unused part is refunded).

``require_signed_by`` maps ``namespace/name`` glob patterns (no ``@version``) to public keys: PEM
files or folders of ``*.pem``/``*.pub`` files, relative paths taken from the tenants file's
folder. A request of the tenant for a registry module whose name matches a pattern is refused
(403, the message names the reason) unless the version it resolves to carries a valid signature
by one of that pattern's keys; where several patterns match, each must be satisfied. It applies on
top of the server's own ``--trust``/``--require-signed`` policy, and never to the base model
alone. Keys are loaded and checked when the file is (missing, private or non-EC keys are
reported with every other problem); see :mod:`tunehub.server.trust` for how the checks run.

This module imports neither torch nor LitServe: the HTTP process and the CLI use it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunehub.errors import ConfigError, RateLimited
from tunehub.server.trust import SigningRule, load_rule_keys

_HASH = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TENANT_KEYS = {"keys", "models", "requests_per_minute", "tokens_per_minute", "max_tokens", "require_signed_by"}
WINDOW_S = 60.0
OPEN_TENANT = "default"


def hash_key(key: str) -> str:
    """The form a tenants file stores a key in: ``sha256:<64 hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (``th-`` + 43 URL-safe characters, 256 bits)."""
    return "th-" + secrets.token_urlsafe(32)


@dataclass
class Tenant:
    name: str
    key_hashes: tuple[str, ...] = ()  # bare hex digests
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_tokens: int | None = None
    require_signed_by: tuple[SigningRule, ...] = ()

    def signing_rules(self, repo: str) -> list[SigningRule]:
        """The rules a registry module (``namespace/name``) must satisfy for this tenant."""
        return [rule for rule in self.require_signed_by if rule.matches(repo)]

    def may_use_base(self, base_name: str) -> bool:
        """Whether the base model (served alone, no module) is granted."""
        return any(fnmatch.fnmatchcase(base_name, pattern) for pattern in self.models)

    def may_use_module(self, repo: str, base_name: str | None = None) -> bool:
        """Whether a registry module (``namespace/name``, no selector) is granted. A pattern that
        is exactly ``base_name`` grants the base, not a module that shares its name."""
        return any(fnmatch.fnmatchcase(repo, pattern) for pattern in self.models if pattern != base_name)


@dataclass
class _Charge:
    """Tokens counted against a tenant's window from ``at`` on (a reservation until settled)."""

    at: float
    tokens: int
    in_window: bool = True


@dataclass
class Admission:
    """An admitted request's hold on its tenant's token budget (see :meth:`Tenants.settle`)."""

    tenant: str
    reserved: int
    charge: _Charge | None = None
    settled: bool = False


@dataclass
class _Usage:
    requests: deque = field(default_factory=deque)  # monotonic times
    tokens: deque = field(default_factory=deque)  # _Charge, oldest first
    token_total: int = 0


class Tenants:
    """The tenants a server knows, looked up by API key, with their sliding-window usage.

    Usage lives in the (single) HTTP process; it is not shared between servers."""

    def __init__(self, tenants: list[Tenant], *, open_mode: bool = False):
        self.open_mode = open_mode
        self.tenants = {t.name: t for t in tenants}
        self._by_hash = {h: t for t in tenants for h in t.key_hashes}
        self._usage: dict[str, _Usage] = {t.name: _Usage() for t in tenants}

    @classmethod
    def open(cls) -> Tenants:
        return cls([Tenant(OPEN_TENANT)], open_mode=True)

    @classmethod
    def load(cls, path: str | Path | None) -> Tenants:
        if path is None:
            return cls.open()
        return cls(parse_tenants_file(path))

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The tenant a key belongs to, or None. In open mode every caller is the open tenant."""
        if self.open_mode:
            return self.tenants[OPEN_TENANT]
        if not api_key:
            return None
        digest = hashlib.sha256(api_key.encode("utf-8")).hexdigest()
        return self._by_hash.get(digest)

    # --- limits --------------------------------------------------------------------------------
    def admit(self, tenant: Tenant, tokens: int = 0, now: float | None = None) -> Admission:
        """Count one request against the tenant's limits and reserve ``tokens`` (its max_tokens)
        of its token budget; RateLimited (with Retry-After when waiting helps) if over a limit."""
        now = time.monotonic() if now is None else now
        usage = self._usage.setdefault(tenant.name, _Usage())
        self._expire(usage, now)
        if tenant.requests_per_minute is not None and len(usage.requests) >= tenant.requests_per_minute:
            wait = usage.requests[0] + WINDOW_S - now
            raise RateLimited(
                f"tenant {tenant.name!r} is over its limit of {tenant.requests_per_minute} requests per minute",
                retry_after=_ceil_seconds(wait),
            )
        limit = tenant.tokens_per_minute
        if limit is not None and tokens > limit:
            # no wait would help: refuse instead of clamping, so the client learns the limit
            raise RateLimited(
                f"max_tokens {tokens} is more than tenant {tenant.name!r}'s limit of {limit} tokens per minute;"
                f" ask for at most {limit}"
            )
        if limit is not None and usage.token_total + tokens > limit:
            # wait until enough of the window's tokens age out to make room for this request
            excess = usage.token_total + tokens - limit
            wait = WINDOW_S
            for charge in usage.tokens:
                excess -= charge.tokens
                if excess <= 0:
                    wait = charge.at + WINDOW_S - now
                    break
            raise RateLimited(
                f"tenant {tenant.name!r} is over its limit of {limit} tokens per minute",
                retry_after=_ceil_seconds(wait),
            )
        usage.requests.append(now)
        admission = Admission(tenant=tenant.name, reserved=tokens)
        if tokens > 0:
            admission.charge = _Charge(now, tokens)
            usage.tokens.append(admission.charge)
            usage.token_total += tokens
        return admission

    def settle(self, admission: Admission, used_tokens: int, now: float | None = None) -> None:
        """The request ended having used ``used_tokens`` (prompt + completion): they replace its
        reservation, refunding the unused part (or charging more: prompts are not reserved).
        Only the first call counts, so every way out of a request may call it."""
        if admission.settled:
            return
        admission.settled = True
        used = max(0, int(used_tokens))
        now = time.monotonic() if now is None else now
        usage = self._usage.setdefault(admission.tenant, _Usage())
        self._expire(usage, now)
        charge = admission.charge
        if charge is None:
            if used:
                charge = _Charge(now, used)
                usage.tokens.append(charge)
                usage.token_total += used
            return
        if charge.in_window:  # a reservation already out of the window counts no more
            usage.token_total += used - charge.tokens
            charge.tokens = used

    @staticmethod
    def _expire(usage: _Usage, now: float) -> None:
        while usage.requests and usage.requests[0] <= now - WINDOW_S:
            usage.requests.popleft()
        while usage.tokens and usage.tokens[0].at <= now - WINDOW_S:
            charge = usage.tokens.popleft()
            charge.in_window = False
            usage.token_total -= charge.tokens


def _ceil_seconds(value: float) -> int:
    return max(1, math.ceil(value))


def parse_tenants_file(path: str | Path) -> list[Tenant]:
    """Read and validate a tenants YAML file; every problem is reported at once."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"tenants file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"tenants file {path} is not valid YAML: {exc}") from None
    return parse_tenants(data, source=str(path), base_dir=path.parent)


def parse_tenants(data: Any, *, source: str = "tenants", base_dir: str | Path | None = None) -> list[Tenant]:
    """Validate parsed tenants YAML; key files of ``require_signed_by`` are read relative to
    ``base_dir`` (default: the working directory). Every problem is reported at once."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems: list[str] = []
    if not isinstance(data, dict) or set(data) != {"tenants"} or not isinstance(data["tenants"], dict):
        raise ConfigError(f"{source}: expected a mapping with one key, 'tenants', mapping tenant names to settings")
    if not data["tenants"]:
        raise ConfigError(f"{source}: no tenants defined")
    tenants: list[Tenant] = []
    seen_hashes: dict[str, str] = {}
    for name, settings in data["tenants"].items():
        where = f"{source}: tenant {name!r}"
        if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
            problems.append(f"{where}: names are letters, digits, '.', '_', '-' (at most 64)")
            continue
        if not isinstance(settings, dict):
            problems.append(f"{where}: settings must be a mapping")
            continue
        unknown = sorted(set(settings) - _TENANT_KEYS)
        if unknown:
            problems.append(f"{where}: unknown keys {unknown}; known: {sorted(_TENANT_KEYS)}")
        keys = settings.get("keys")
        hashes: list[str] = []
        if not isinstance(keys, list) or not keys:
            problems.append(f"{where}: 'keys' must be a non-empty list of 'sha256:<hex>' key hashes")
        else:
            for key in keys:
                match = _HASH.fullmatch(key) if isinstance(key, str) else None
                if match is None:
                    problems.append(
                        f"{where}: {str(key)[:12]!r}... is not a key hash; store 'sha256:<64 hex>'"
                        " (`tunehub tenants hash-key`), never the key itself"
                    )
                    continue
                digest = match.group(1)
                if digest in seen_hashes:
                    problems.append(f"{where}: a key hash is also listed for tenant {seen_hashes[digest]!r}")
                seen_hashes[digest] = name
                hashes.append(digest)
        models = settings.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            problems.append(f"{where}: 'models' must be a non-empty list of module names or glob patterns")
            models = []
        elif any("@" in m for m in models):
            problems.append(f"{where}: 'models' name modules without '@version': every version of a granted name is allowed")
        limits: dict[str, int | None] = {}
        for limit in ("requests_per_minute", "tokens_per_minute", "max_tokens"):
            value = settings.get(limit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{where}: {limit} must be a positive integer")
                value = None
            limits[limit] = value
        rules = _signing_rules(settings.get("require_signed_by"), where, base, problems)
        tenants.append(
            Tenant(name=name, key_hashes=tuple(hashes), models=tuple(models), require_signed_by=tuple(rules), **limits)
        )
    if problems:
        raise ConfigError(problems)
    return tenants


def _signing_rules(raw: Any, where: str, base_dir: Path, problems: list[str]) -> list[SigningRule]:
    """A tenant's ``require_signed_by`` (None: no rules); problems are appended."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{where}: 'require_signed_by' must map module name patterns to lists of public key files")
        return []
    rules: list[SigningRule] = []
    for pattern, files in raw.items():
        at = f"{where}: require_signed_by[{str(pattern)[:80]!r}]"
        if not isinstance(pattern, str) or not pattern:
            problems.append(f"{at}: a pattern must be a module name or glob pattern")
            continue
        if "@" in pattern:
            problems.append(f"{at}: patterns name modules without '@version': every version of a matching name must be signed")
            continue
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            problems.append(f"{at}: must be a non-empty list of public key files (PEM) or folders of them")
            continue
        try:
            keys = load_rule_keys(files, base_dir)
        except ConfigError as exc:
            problems.extend(f"{at}: {problem}" for problem in exc.problems)
            continue
        rules.append(SigningRule(pattern=pattern, keys=keys))
    return rules
