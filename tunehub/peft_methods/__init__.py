"""PEFT methods tunehub adds to PEFT (today: bottleneck adapters, :mod:`.bottleneck`).

PEFT loads a module with ``PeftModel.from_pretrained`` only for a ``peft_type`` registered with
it. :func:`install` makes tunehub's methods registered in this process: at once when ``peft`` is
already imported, else right after ``peft`` is first imported (a hook on the import system that
removes itself). ``import tunehub.trainer`` and the engine's bottleneck kind call it, so either
makes ``PeftModel.from_pretrained`` load a bottleneck module, without importing torch or peft
themselves (peft's import costs seconds, which ``tunehub train --check`` would pay for nothing).

This file imports neither torch nor peft; every PEFT-internal name tunehub touches is in
:mod:`.bottleneck`, the one file tests/unit/test_private_names.py allows them in.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
import warnings
from types import ModuleType
from typing import Any, Sequence

_LOCK = threading.Lock()
_METHOD_MODULES = ("tunehub.peft_methods.bottleneck",)


def register_now() -> None:
    """Register tunehub's PEFT methods with PEFT (imports peft and torch); idempotent. Raises
    what registration raises (an unsupported peft version)."""
    for name in _METHOD_MODULES:
        importlib.import_module(name).register()


def _register_after_import() -> None:
    # called at the end of peft's own import: a failure must not make `import peft` fail
    try:
        register_now()
    except Exception as exc:  # noqa: BLE001 - reported, and PEFT keeps working without our methods
        warnings.warn(
            f"tunehub could not register its PEFT methods (bottleneck) with this peft: {exc}; "
            "PeftModel.from_pretrained will not load bottleneck modules",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``peft`` is about to be imported, it asks the other finders for
    peft's spec and has the loader register tunehub's methods once peft's ``__init__`` ran."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != "peft":
            return None
        _uninstall_hook()  # one shot, and the search below must not find this finder again
        spec = importlib.util.find_spec("peft")
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register_after_import()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOK = _RegisterAfterPeft()


def _uninstall_hook() -> None:
    with _LOCK:
        if _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)


def install() -> None:
    """Have tunehub's PEFT methods registered with PEFT in this process: now if ``peft`` is
    imported already, else as soon as it is."""
    if "peft" in sys.modules:
        register_now()
        return
    with _LOCK:
        if _HOOK not in sys.meta_path:
            sys.meta_path.insert(0, _HOOK)


__all__ = ["install", "register_now"]
