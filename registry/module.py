"""Writing and verifying module folders: the manifest, PEFT's config and the model card together."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from tunehub.errors import IntegrityError, ManifestError, UnsafeFile
from tunehub.registry.files import hash_folder, iter_module_files, verify_files
from tunehub.registry.manifest import (
    ADAPTER_CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Manifest,
)


def model_card(manifest: Manifest, name: str | None = None) -> str:
    """A Hub-style model card: YAML front matter, then a short human summary."""
    tags = ["tunehub", manifest.kind.value]
    if manifest.objective:
        tags.append(manifest.objective)
    if manifest.peft_loadable:
        tags += ["peft", f"base_model:adapter:{manifest.base.model_id}"]
    front: dict[str, object] = {
        "base_model": manifest.base.model_id,
        "library_name": "peft" if manifest.peft_loadable else "tunehub",
        "tags": tags,
    }
    if manifest.task_type == "CAUSAL_LM":
        front["pipeline_tag"] = "text-generation"
    title = name or manifest.task or f"{manifest.kind.value} module"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"A tunehub **{manifest.kind.value}** module for `{manifest.base.model_id}`"
        f" (base fingerprint `{manifest.base.fingerprint[:12]}`, quantization `{manifest.base.quantization}`).",
        "",
    ]
    if manifest.description:
        lines += [manifest.description, ""]
    if manifest.objective or manifest.task:
        lines += [f"- objective: `{manifest.objective}`", f"- task: `{manifest.task}`"]
    if manifest.parent:
        lines.append(f"- trained on top of: `{manifest.parent}`")
    if manifest.data:
        lines.append(f"- data sha256: `{manifest.data.sha256[:16]}`")
    for key, value in sorted(manifest.metrics.items()):
        lines.append(f"- {key}: {value:.6g}")
    lines += ["", "Load it with tunehub (`tunehub pull`) or, for PEFT kinds, `peft.PeftModel.from_pretrained`.", ""]
    return "\n".join(lines)


def write_module(folder: str | Path, manifest: Manifest, *, card: bool = True) -> Manifest:
    """Finish a module folder: write PEFT's config and the card from ``manifest``, hash every
    file and write ``manifest.json`` last. Returns the manifest with ``files`` filled in.

    Call it after the weights (and any other payload) are in ``folder``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    adapter_config = manifest.adapter_config()
    if adapter_config is not None:
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    if card:
        (folder / MODEL_CARD_FILE).write_text(model_card(manifest))
    files = hash_folder(folder, exclude=frozenset({MANIFEST_FILE}))
    final = manifest.with_updates(files=files)
    (folder / MANIFEST_FILE).write_text(final.to_json())
    return final


@dataclass(frozen=True)
class LocalModule:
    """A verified module folder on disk."""

    path: Path
    manifest: Manifest
    ref: str | None = None
    version: int | None = None


@dataclass(frozen=True)
class ModuleContent:
    """A verified module held in memory: its manifest and the bytes of the files that were read.

    What a server needs to activate a module: one read of each file, hashed on the same bytes
    that are then parsed, so no file is copied, hashed twice or read again after its check."""

    manifest: Manifest
    files: dict[str, bytes]
    ref: str | None = None
    version: int | None = None
    parsed: Any = None  # what the reader's ``parse`` made of ``files`` (see ModuleStore.read)


def check_content(manifest_bytes: bytes, files: dict[str, bytes], expected: dict[str, str] | None, where: str) -> Manifest:
    """Validate a module read into memory: the manifest parses, ``files`` are files it lists and
    each one's bytes match its sha256; ``expected`` (a store's record of every file, manifest
    included) must agree with the manifest. Raises like verify_module."""
    from tunehub.registry.files import sha256_bytes

    if expected is not None and sha256_bytes(manifest_bytes) != expected.get(MANIFEST_FILE):
        raise IntegrityError(f"{where}: {MANIFEST_FILE} does not match its recorded sha256")
    manifest = Manifest.from_json(manifest_bytes, f"{where}/{MANIFEST_FILE}")
    if expected is not None and dict(manifest.files) != {k: v for k, v in expected.items() if k != MANIFEST_FILE}:
        raise IntegrityError(f"{where}: the manifest's file list disagrees with the store's record")
    if manifest.adapter_config() is not None and ADAPTER_CONFIG_FILE not in manifest.files:
        raise IntegrityError(f"{where}: a {manifest.kind.value} module must carry {ADAPTER_CONFIG_FILE}")
    check_files(manifest, files, where)
    return manifest


def parse_verified(manifest: Manifest, files: dict[str, bytes], where: str, parse: Callable[[dict[str, bytes]], Any] | None) -> Any:
    """Check ``files`` against ``manifest`` and return ``parse(files)`` (None without ``parse``).

    The hashing runs in a helper thread while ``parse`` runs in this one (hashlib releases the
    GIL), so a cold load costs about the longer of the two instead of their sum. What ``parse``
    made is returned only if every hash matched: a damaged file raises IntegrityError, and its
    parsed form is dropped unused."""
    if parse is None:
        check_files(manifest, files, where)
        return None
    started = threading.Event()

    def check() -> None:
        started.set()
        check_files(manifest, files, where)

    hashing = _HASHER.submit(check)
    # parse only once the hasher runs: a parse that holds the GIL (safetensors does) would
    # otherwise keep the hashing thread from starting until the interpreter's switch interval
    started.wait()
    try:
        parsed = parse(files)
    except BaseException:
        hashing.result()  # a damaged file is reported as damaged, not as unparseable
        raise
    hashing.result()
    return parsed


_HASHER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tunehub-sha256")


def check_files(manifest: Manifest, files: dict[str, bytes], where: str) -> None:
    """Every file in ``files`` is listed in ``manifest``, safe to load and matches its sha256."""
    from tunehub.registry.files import check_relative_path, is_pickle_name, sha256_bytes

    for rel, data in files.items():
        check_relative_path(rel)
        if is_pickle_name(rel):
            raise UnsafeFile(f"{where}: {rel} is a pickle file; tunehub loads safetensors only")
        digest = manifest.files.get(rel)
        if digest is None:
            raise IntegrityError(f"{where}: {rel} is not listed in the manifest")
        if sha256_bytes(data) != digest:
            raise IntegrityError(f"{where}: {rel} is damaged: its content does not match its sha256")


def verify_module(folder: str | Path) -> LocalModule:
    """Read and validate ``folder``'s manifest and check every file against its hash.

    Raises ``ManifestError`` (bad or missing manifest), ``UnsafeFile`` (pickles, links) or
    ``IntegrityError`` (missing, unlisted or altered files).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    manifest = Manifest.read(folder)
    list(iter_module_files(folder))  # refuses pickles and links before any hashing
    verify_files(folder, manifest.files)
    expected_config = manifest.adapter_config()
    if expected_config is not None and ADAPTER_CONFIG_FILE not in manifest.files:
        raise IntegrityError(f"{folder}: a {manifest.kind.value} module must carry {ADAPTER_CONFIG_FILE}")
    return LocalModule(path=folder, manifest=manifest)


__all__ = ["model_card", "write_module", "verify_module", "check_content", "check_files", "parse_verified", "LocalModule", "ModuleContent", "UnsafeFile"]
