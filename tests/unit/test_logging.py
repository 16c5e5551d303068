"""One logging setup (tunehub.logs), one verbosity switch, and no bare print() in library code."""

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tunehub.errors import ConfigError
from tunehub.logs import (
    LOG_LEVEL_ENV,
    configure_logging,
    level_from_flags,
    resolve_level,
)

REPO = Path(__file__).resolve().parents[2]
LIBRARY_FOLDERS = ("registry", "server", "trainer", "tunehub")


def test_library_code_never_calls_print():
    calls = []
    for folder in LIBRARY_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls == []


def test_the_level_comes_from_the_switch_then_the_environment(monkeypatch):
    assert level_from_flags() is None
    assert level_from_flags(verbose=True) == "debug" and level_from_flags(quiet=True) == "warning"
    with pytest.raises(ValueError):
        level_from_flags(verbose=True, quiet=True)
    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    assert resolve_level() == logging.INFO
    monkeypatch.setenv(LOG_LEVEL_ENV, "WARNING")
    assert resolve_level() == logging.WARNING
    assert resolve_level("debug") == logging.DEBUG  # the switch wins
    monkeypatch.setenv(LOG_LEVEL_ENV, "chatty")
    with pytest.raises(ConfigError, match=LOG_LEVEL_ENV):
        resolve_level()


def test_configure_logging_is_idempotent(monkeypatch):
    logger = logging.getLogger("tunehub")
    before = (logger.level, list(logger.handlers))
    # an earlier test (an in-process CLI call) may have configured it already: start from none
    logger.handlers[:] = [h for h in logger.handlers if type(h).__module__ != "tunehub.logs"]
    others = list(logger.handlers)
    try:
        configure_logging("warning")
        configure_logging("info")
        assert logger.level == logging.INFO
        assert len([h for h in logger.handlers if h not in others]) == 1
    finally:
        logger.setLevel(before[0])
        logger.handlers[:] = before[1]


def _cli(*args, env=None):
    import os

    environ = {k: v for k, v in os.environ.items() if k != LOG_LEVEL_ENV}
    return subprocess.run(
        [sys.executable, "-m", "tunehub.sdk.cli", *args],
        capture_output=True,
        text=True,
        env={**environ, **(env or {})},
        cwd=REPO,
        timeout=120,
    )


CHECK = ["tenants", "hash-key", "k" * 20]


def test_the_cli_switch_and_the_environment_variable():
    assert _cli(*CHECK).returncode == 0
    assert _cli("--verbose", *CHECK).returncode == 0 and _cli("-q", *CHECK).returncode == 0
    both = _cli("--verbose", "--quiet", *CHECK)
    assert both.returncode == 2 and "exclude each other" in both.stderr
    bad = _cli(*CHECK, env={LOG_LEVEL_ENV: "chatty"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and LOG_LEVEL_ENV in bad.stderr
