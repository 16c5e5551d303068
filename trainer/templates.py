"""Making hard-prompt template modules (the ``template`` kind; the format is
:mod:`tunehub.registry.template`). A template trains nothing: it is written from text and the
base it was written for, pushed and versioned like any module, and applied by the server."""

from __future__ import annotations

from pathlib import Path

from tunehub.errors import Conflict
from tunehub.registry.manifest import Manifest, ModuleKind
from tunehub.registry.template import TEMPLATE_FILE, Template
from tunehub.trainer.export import save_module_files


def write_template_module(
    folder: str | Path, template: Template, base_path: str | Path, *, task: str | None = None, description: str | None = None
) -> Manifest:
    """Write ``template`` as a module for the base at ``base_path`` into ``folder`` (new or
    empty: a folder holding anything is never written into). Returns the manifest."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise Conflict(f"{folder} exists and is not an empty folder; tunehub writes a template module into a new one")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TEMPLATE_FILE).write_text(template.to_json())
    params = {"format": template.format, "slots": list(template.slots)}
    return save_module_files(
        folder, kind=ModuleKind.TEMPLATE, params=params, base_path=base_path, task=task, description=description
    )


__all__ = ["write_template_module"]
