"""The one resolver of a base model reference (a local folder or a Hugging Face Hub id) to a
local folder, shared by ``tunehub train`` (``trainer/run.py``) and ``tunehub serve``
(``server/serve.py``): both accept the same references and refuse the same ones with the same
:class:`~tunehub.errors.ConfigError`. Torch-free; huggingface_hub is imported only to fetch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunehub.errors import ConfigError

#: what a base needs from a Hub repo: configs, weights, tokenizer files, chat templates
BASE_FILE_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")

# the Hub's repo id rule (huggingface_hub's validate_repo_id): [namespace/]name of word
# characters, '-' and '.', at most 96 characters, without '--' or '..'
_HUB_ID = re.compile(r"(?:[\w][\w.-]*/)?[\w][\w.-]*")
_HUB_ID_MAX = 96


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` has the form of a Hugging Face Hub repo id (``[namespace/]name``)."""
    return (
        len(reference) <= _HUB_ID_MAX
        and _HUB_ID.fullmatch(reference) is not None
        and "--" not in reference
        and ".." not in reference
        and not reference.endswith((".", "-", ".git"))
    )


def resolve_base_folder(reference: str | Path, *, revision: str | None = None, field: str | None = None) -> Path:
    """A local model folder for ``reference``: the folder itself when it exists (returned as
    given, ``~`` expanded), else the snapshot of that Hub id in the Hugging Face cache, fetched
    when missing (``revision``: a branch, tag or commit; None is the default branch).

    ``field`` names the setting the reference came from (``base.path``); error messages start
    with it. Raises :class:`~tunehub.errors.ConfigError` for a path that exists but holds no
    ``config.json``, a Hub id that cannot be fetched (offline and not cached, unknown, gated), and
    a reference that is neither a path that exists nor a Hub id."""
    prefix = f"{field}: " if field else ""
    text = str(reference)
    path = Path(text).expanduser()
    if text and path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{prefix}{path} is not a model folder (no config.json)")
        return path
    if not is_hub_id(text):
        raise ConfigError(f"{prefix}base {text!r} is neither a model folder nor a Hub id (namespace/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=list(BASE_FILE_PATTERNS)))
    except Exception as exc:  # noqa: BLE001 - offline, unknown, gated, no network: one clear line
        raise ConfigError(
            f"{prefix}{text!r} is not a local folder and could not be fetched from the Hub: {_fetch_failure(exc)}"
        ) from None


def _fetch_failure(exc: Exception) -> str:
    """Why a fetch failed, in one line (huggingface_hub's messages run over several)."""
    if _offline():
        return "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return False


__all__ = ["BASE_FILE_PATTERNS", "is_hub_id", "resolve_base_folder"]
