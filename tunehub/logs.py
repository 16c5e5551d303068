"""The one logging setup of tunehub, with one verbosity switch.

Library code (``tunehub.registry``, ``.trainer``, ``.server``, ``tunehub``) never prints: it logs
to loggers under ``tunehub`` (user-facing progress lines, such as the trainer's ``step 4/4 ...``,
at INFO; notices at WARNING). Entry points (the CLI, the serve child and its inference worker)
call :func:`configure_logging` once; the level comes from, in order: the argument (the CLI's
``--verbose``/``--quiet``), ``$TUNEHUB_LOG_LEVEL`` (``debug``, ``info``, ``warning``, ``error``),
else ``info``. A library user who never calls it gets Python's defaults (warnings only).
"""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVEL_ENV = "TUNEHUB_LOG_LEVEL"
DEFAULT_LEVEL = "info"
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: the logger every tunehub module logs under
ROOT_LOGGER = "tunehub"


class _TunehubHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (a type of its own: found again, not
    doubled). It writes to whatever ``sys.stderr`` is when a record comes: a stream swapped
    later (test capture, a CLI runner) is followed, a closed one never written to."""

    @property
    def stream(self):  # noqa: ANN201 - StreamHandler's attribute, read at emit time
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it: ignored
        pass


def level_from_flags(verbose: bool = False, quiet: bool = False) -> str | None:
    """The level name the CLI's switch asks for: ``debug`` for ``--verbose``, ``warning`` for
    ``--quiet``, None when neither is given. Raises ValueError when both are."""
    if verbose and quiet:
        raise ValueError("--verbose and --quiet exclude each other")
    if verbose:
        return "debug"
    if quiet:
        return "warning"
    return None


def resolve_level(level: str | int | None = None) -> int:
    """The logging level for ``level`` (a name or a number), else ``$TUNEHUB_LOG_LEVEL``, else
    :data:`DEFAULT_LEVEL`. Raises :class:`~tunehub.errors.ConfigError` for an unknown name."""
    if isinstance(level, int):
        return level
    name = (level if level is not None else os.environ.get(LOG_LEVEL_ENV, "")).strip().lower() or DEFAULT_LEVEL
    if name not in LEVELS:
        from tunehub.errors import ConfigError

        source = "the log level" if level is not None else LOG_LEVEL_ENV
        raise ConfigError(f"{source} must be one of {', '.join(LEVELS)}, got {name!r}")
    return LEVELS[name]


def configure_logging(level: str | int | None = None) -> int:
    """Send tunehub's log records at ``level`` and above to stderr, one plain line each (the
    message alone, as the progress lines always looked). Idempotent: a second call only changes
    the level. Returns the level set. Raises ConfigError for an unknown level name."""
    number = resolve_level(level)
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(number)
    handler = next((h for h in logger.handlers if isinstance(h, _TunehubHandler)), None)
    if handler is None:
        handler = _TunehubHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return number


def configure_logging_from_env() -> int | None:
    """For processes an entry point starts (the serve child, its inference worker): apply
    ``$TUNEHUB_LOG_LEVEL`` when it is set (by the user, or by the CLI's ``--verbose``/``--quiet``),
    else change nothing, so that such a process logs as it always did (warnings only). Returns
    the level set, or None."""
    if not os.environ.get(LOG_LEVEL_ENV, "").strip():
        return None
    return configure_logging()


__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "LOG_LEVEL_ENV",
    "ROOT_LOGGER",
    "configure_logging",
    "configure_logging_from_env",
    "level_from_flags",
    "resolve_level",
]
