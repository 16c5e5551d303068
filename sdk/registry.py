"""``tunehub.sdk.Registry``: the Python face of the registry, the same for every store."""

from __future__ import annotations

from pathlib import Path

from tunehub.registry.manifest import Manifest, ModuleKind
from tunehub.registry.module import LocalModule
from tunehub.registry.refs import ModuleRef
from tunehub.registry.store import AliasMove, ModuleStore, VersionInfo, open_store


class Registry:
    """A module registry at ``uri``: ``file://PATH`` (default ``$TUNEHUB_HOME/registry``) or
    ``hf://NAMESPACE``.

    Example::

        reg = Registry("file:///tmp/reg")
        info = reg.push("out/summarize", "acme/summarize")   # -> acme/summarize@1
        reg.promote(info.ref, "prod")
        module = reg.pull("acme/summarize@prod")             # verified local folder
    """

    def __init__(self, uri: str | None = None, **options: object):
        self.store: ModuleStore = open_store(uri, **options)

    @property
    def uri(self) -> str:
        return self.store.uri

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    def push(self, folder: str | Path, name: str | ModuleRef) -> VersionInfo:
        """Verify the module folder and store it as the next version of ``name``."""
        return self.store.push(folder, name)

    def pull(self, ref: str | ModuleRef, dest: str | Path | None = None, *, force: bool = False) -> LocalModule:
        """A verified local copy of ``ref`` (a cached copy is reused when it still verifies).

        ``dest`` must be new, empty, or hold exactly an earlier pull of this module, else
        :class:`~tunehub.errors.Conflict`; ``force=True`` writes the module's files into it
        anyway and leaves every other file alone. Nothing pull did not write is deleted."""
        return self.store.pull(ref, dest, force=force)

    def resolve(self, ref: str | ModuleRef) -> VersionInfo:
        return self.store.resolve(ref)

    def manifest(self, ref: str | ModuleRef) -> Manifest:
        return self.store.manifest(ref)

    def list(
        self,
        *,
        base: str | None = None,
        kind: str | ModuleKind | None = None,
        task: str | None = None,
        namespace: str | None = None,
    ) -> list[VersionInfo]:
        return self.store.list(base=base, kind=kind, task=task, namespace=namespace)

    def versions(self, name: str | ModuleRef, *, include_yanked: bool = True) -> list[VersionInfo]:
        return self.store.versions(name, include_yanked=include_yanked)

    def aliases(self, name: str | ModuleRef) -> dict[str, int]:
        return self.store.aliases(name)

    def alias_history(self, name: str | ModuleRef, alias: str | None = None) -> list[AliasMove]:
        return self.store.alias_history(name, alias)

    def promote(self, ref: str | ModuleRef, alias: str) -> AliasMove:
        return self.store.promote(ref, alias)

    def rollback(self, name: str | ModuleRef, alias: str) -> AliasMove:
        return self.store.rollback(name, alias)

    def yank(self, ref: str | ModuleRef, reason: str = "") -> VersionInfo:
        return self.store.yank(ref, reason)

    def delete(self, ref: str | ModuleRef, *, force: bool = False) -> list[int]:
        return self.store.delete(ref, force=force)

    def gc(self) -> dict[str, list[str]]:
        """Remove unreferenced blobs and leftovers of killed writers (``file://`` stores)."""
        return self.store.gc()
