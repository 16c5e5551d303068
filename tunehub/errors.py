"""The one error hierarchy of tunehub.

Every error derives from :class:`TunehubError` and also from the stdlib type that describes its
category (``LookupError``, ``ValueError``...), so callers can catch by either. The CLI turns
them into one line and a non-zero exit; the server maps them to HTTP statuses.
"""

from __future__ import annotations


class TunehubError(Exception):
    """Base of every error tunehub raises on purpose."""

    #: process exit code used by the CLI
    exit_code: int = 1
    #: HTTP status used by the server
    http_status: int = 500


class InvalidReference(TunehubError, ValueError):
    """A module reference (``[namespace/]name[@version|@alias]``) that does not parse."""

    exit_code = 2
    http_status = 400


class ManifestError(TunehubError, ValueError):
    """A ``manifest.json`` that is missing, malformed or invalid."""

    http_status = 422


class UnsupportedSchemaVersion(ManifestError):
    """A manifest written with a schema version this tunehub does not know."""


class IntegrityError(TunehubError):
    """A file whose content does not match the sha256 recorded for it."""

    http_status = 502


class UnsafeFile(TunehubError, ValueError):
    """A file tunehub refuses to handle: pickles, links, paths that leave the module folder."""

    http_status = 422


class ModuleNotFound(TunehubError, LookupError):
    """No module, version or alias by that reference."""

    http_status = 404


class VersionNotFound(ModuleNotFound):
    """The module exists but the version does not (or was yanked or deleted)."""


class AliasNotFound(ModuleNotFound):
    """The module exists but the alias does not."""


class Conflict(TunehubError):
    """The operation conflicts with the registry's state (e.g. deleting a version an alias uses)."""

    http_status = 409


class IncompatibleBase(TunehubError, ValueError):
    """A module trained for another base model than the one it is applied to."""

    http_status = 422


class ConfigError(TunehubError, ValueError):
    """An invalid configuration; carries every problem found, not just the first."""

    exit_code = 2
    http_status = 422

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message)


class DataError(TunehubError, ValueError):
    """Training data that is missing, empty or malformed."""

    exit_code = 2
    http_status = 422


class StoreError(TunehubError):
    """The registry store could not complete an operation (I/O, unreachable remote)."""

    http_status = 503


class UntrustedModule(TunehubError, PermissionError):
    """A version the trust policy (``--trust KEYS``, ``--require-signed``) refuses to load."""

    http_status = 403


class UnsignedModule(UntrustedModule):
    """Signatures are required and the version carries none."""


class UntrustedSigner(UntrustedModule):
    """The version is signed, but by no key of the trust set."""


class SignatureMismatch(UntrustedModule):
    """A signature whose statement does not match the version's files (changed after signing),
    or that does not verify with the key it names."""


# --- errors a tunehub server answers with (the SDK raises them from HTTP statuses) -------------


class InvalidRequest(TunehubError, ValueError):
    """A request the server refuses as malformed or out of bounds (bad JSON, a missing field,
    ``max_tokens`` above the tenant's limit, a prompt longer than the context)."""

    exit_code = 2
    http_status = 400


class PayloadTooLarge(InvalidRequest):
    """A request body larger than the server accepts."""

    http_status = 413


class Unauthorized(TunehubError, PermissionError):
    """No API key, or one the server does not know."""

    http_status = 401


class Forbidden(TunehubError, PermissionError):
    """A known key that may not do this (e.g. a tenant key on an admin endpoint)."""

    http_status = 403


class RateLimited(TunehubError):
    """Over a request or token limit; ``retry_after`` says how many seconds to wait."""

    http_status = 429

    def __init__(self, message: str = "rate limited", retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ServerError(TunehubError):
    """The server failed to answer (5xx) or could not be reached."""

    http_status = 500


# --- errors of the serving engine (``tunehub.server.engine``; the SDK raises them by name) ----------


class PromptTooLong(InvalidRequest):
    """The prompt (with the module's virtual tokens) does not fit the base's context."""

    http_status = 400


class RequestCancelled(TunehubError):
    """A generation request cancelled before it finished (its client went away, or the server
    is stopping)."""

    http_status = 499


class NonFiniteLogits(InvalidRequest, ArithmeticError):
    """A sampled row (temperature > 0) whose logits hold NaN or Inf: a module whose weights
    are not finite or overflow, or an overflow of the base's dtype. No distribution can be drawn
    from them; the row fails alone (greedy rows take the argmax and are not affected)."""

    http_status = 422


class UnsupportedModule(InvalidRequest):
    """A module the engine cannot apply in a mixed batch (kind, targets or size)."""

    http_status = 422


class InvalidModuleWeights(InvalidRequest):
    """A module whose weights cannot be served: not a readable safetensors file, NaN or Inf
    values, tensors of impossible shapes. Its bytes matched their sha256 (the reader checks
    that before a parse error counts), so the module is at fault, not the store: the request
    for it is refused (422), never a server error."""

    http_status = 422


class VocabularyFull(TunehubError):
    """The engine has no room left for a tokenizer module's added tokens: every id range beyond
    the base's vocabulary belongs to modules in use (a request holds them). Sent again once those
    requests end, it is served; a larger ``max_added_tokens`` gives the server more room."""

    http_status = 503


def public_error_name(exc: BaseException) -> str:
    """The name an error travels under (the ``tunehub_error`` of an HTTP error body): its
    ``error_name`` when it sets one, else the name of its nearest class that is not private, so
    that a client can always find the type in this module."""
    name = getattr(exc, "error_name", None)
    if isinstance(name, str) and name:
        return name
    return next(cls.__name__ for cls in type(exc).__mro__ if not cls.__name__.startswith("_"))


__all__ = [
    "TunehubError",
    "InvalidReference",
    "ManifestError",
    "UnsupportedSchemaVersion",
    "IntegrityError",
    "UnsafeFile",
    "ModuleNotFound",
    "VersionNotFound",
    "AliasNotFound",
    "Conflict",
    "IncompatibleBase",
    "ConfigError",
    "DataError",
    "StoreError",
    "UntrustedModule",
    "UnsignedModule",
    "UntrustedSigner",
    "SignatureMismatch",
    "InvalidRequest",
    "PayloadTooLarge",
    "Unauthorized",
    "Forbidden",
    "RateLimited",
    "ServerError",
    "PromptTooLong",
    "RequestCancelled",
    "NonFiniteLogits",
    "UnsupportedModule",
    "InvalidModuleWeights",
    "VocabularyFull",
]
