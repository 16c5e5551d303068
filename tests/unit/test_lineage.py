"""Module chains (#17 item 1, registry side): a module's ``parent`` must be an exact, live version
of the same registry on the same base; lineage walks it, children find what was trained on top of
a version, and delete, yank and pull keep chains whole. Both stores: ``file://`` here, ``hf://``
against an in-process hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import FAKE_FINGERPRINT, make_fake_module
from tunehub.errors import (
    Conflict,
    IncompatibleBase,
    IntegrityError,
    InvalidReference,
    ModuleNotFound,
    VersionNotFound,
)
from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import Manifest
from tunehub.registry.module import verify_module, write_module
from tunehub.registry.store import ModuleStore, parents_folder
from tunehub.sdk import Registry
from tunehub.sdk.cli import main

OTHER_FINGERPRINT = "cd" * 32


def _module(folder: Path, parent: str | None = None, *, fingerprint: str = FAKE_FINGERPRINT, task: str = "demo") -> Path:
    """A fake module (random weights) whose manifest names ``parent``."""
    make_fake_module(folder, fingerprint=fingerprint, task=task)
    if parent is not None:
        write_module(folder, Manifest.read(folder).with_updates(parent=parent))
    return folder


class _Modules:
    """Push modules with parents into ``store``, each from its own folder."""

    def __init__(self, store: ModuleStore, root: Path):
        self.store, self.root, self.count = store, root, 0

    def push(self, name: str, parent: str | None = None, **options: str) -> str:
        self.count += 1
        return self.store.push(_module(self.root / f"m{self.count}", parent, **options), name).ref


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    return LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")


@pytest.fixture
def modules(store, tmp_path):
    return _Modules(store, tmp_path / "modules")


def _set_recorded_parent(store: LocalStore, ref: str, parent: str) -> None:
    """Rewrite a version record's parent behind the store's back (what an attacker or a bug does)."""
    repo, _, version = ref.partition("@")
    namespace, _, name = repo.rpartition("/")
    path = store.root / "modules" / (namespace or "_") / name / "versions" / f"{version}.json"
    record = json.loads(path.read_text())
    record["parent"] = parent
    os.chmod(path, 0o644)
    path.write_text(json.dumps(record))


# --- push ----------------------------------------------------------------------------------------
def test_push_refuses_a_parent_that_is_no_exact_live_version_on_the_same_base(store, modules, tmp_path):
    modules.push("acme/dapt")
    store.promote("acme/dapt@1", "prod")
    refused = [
        (
            "acme/dapt@prod",
            InvalidReference,
            r"parent acme/dapt@prod of this module names no exact version \(acme/dapt@prod is acme/dapt@1 now\)",
        ),
        ("acme/dapt", InvalidReference, "names no exact version .*never an alias or a bare name"),
        (
            "acme/dapt@3",
            ModuleNotFound,
            r"parent acme/dapt@3 of this module is not in this registry \(.*\): push the parent first",
        ),
        ("acme/nothing@1", ModuleNotFound, "parent acme/nothing@1 of this module is not in this registry"),
        ("../../etc/passwd@1", InvalidReference, "is not a module reference"),
        (" acme/dapt@1", InvalidReference, "is not a module reference"),
        ("acme/dapt@01", InvalidReference, "leading zero"),
    ]
    for parent, error, message in refused:
        with pytest.raises(error, match=message):
            modules.push("acme/sum", parent)
    with pytest.raises(
        IncompatibleBase,
        match=f"parent acme/dapt@1 of this module was trained on another base: .*{FAKE_FINGERPRINT[:12]}.*{OTHER_FINGERPRINT[:12]}",
    ):
        modules.push("acme/sum", "acme/dapt@1", fingerprint=OTHER_FINGERPRINT)
    # nothing of a refused push is stored
    with pytest.raises(ModuleNotFound):
        store.resolve("acme/sum")
    assert list((store.root / "tmp").iterdir()) == []

    child = store.resolve(modules.push("acme/sum", "acme/dapt@1"))
    assert child.ref == "acme/sum@1" and child.parent == "acme/dapt@1"


def test_push_refuses_a_yanked_or_deleted_parent_and_a_parent_whose_own_chain_is_broken(store, modules):
    modules.push("acme/base")  # @1
    modules.push("acme/dapt", "acme/base@1")  # @1
    modules.push("acme/dapt")  # @2, no parent
    store.yank("acme/dapt@2", "trained on the eval split")
    with pytest.raises(VersionNotFound, match=r"parent acme/dapt@2 of this module is yanked \(trained on the eval split\)"):
        modules.push("acme/sum", "acme/dapt@2")
    store.delete("acme/dapt@2")
    with pytest.raises(
        ModuleNotFound, match=r"parent acme/dapt@2 of this module is not in this registry \(acme/dapt@2 was deleted\)"
    ):
        modules.push("acme/sum", "acme/dapt@2")
    store.yank("acme/base@1", "leaks", force=True)  # under a live child: forced
    with pytest.raises(VersionNotFound, match=r"acme/base@1, in the lineage of acme/dapt@1, is yanked \(leaks\)"):
        modules.push("acme/sum", "acme/dapt@1")


def test_lineage_walks_the_chain_child_first_and_names_what_breaks_it(store, modules):
    modules.push("acme/base")
    modules.push("acme/dapt", "acme/base@1")
    modules.push("acme/sum", "acme/dapt@1")
    store.promote("acme/sum@1", "prod")
    chain = store.lineage("acme/sum@prod")
    assert [i.ref for i in chain] == ["acme/sum@1", "acme/dapt@1", "acme/base@1"]
    assert [i.parent for i in chain] == ["acme/dapt@1", "acme/base@1", None]
    assert [i.ref for i in store.lineage("acme/base")] == ["acme/base@1"]
    # a yanked ancestor is listed as such; a deleted one breaks the chain
    store.yank("acme/base@1", "bad", force=True)
    assert [(i.ref, i.yanked, i.yank_reason) for i in store.lineage("acme/sum")][2] == ("acme/base@1", True, "bad")
    store.delete("acme/base@1", force=True)
    with pytest.raises(ModuleNotFound, match=r"parent acme/base@1 of acme/dapt@1 is not in this registry"):
        store.lineage("acme/sum")
    # records are read back untrusted: an alias parent, another base, a loop
    _set_recorded_parent(store, "acme/dapt@1", "acme/sum@prod")
    with pytest.raises(InvalidReference, match="parent acme/sum@prod of acme/dapt@1 names no exact version"):
        store.lineage("acme/sum")
    modules.push("acme/other", fingerprint=OTHER_FINGERPRINT)
    _set_recorded_parent(store, "acme/dapt@1", "acme/other@1")
    with pytest.raises(
        IncompatibleBase, match=f"parent acme/other@1 of acme/dapt@1 was trained on another base.*{OTHER_FINGERPRINT[:12]}"
    ):
        store.lineage("acme/sum")
    _set_recorded_parent(store, "acme/dapt@1", "acme/sum@1")
    with pytest.raises(IntegrityError, match="the lineage of acme/sum@1 loops back to acme/sum@1"):
        store.lineage("acme/sum")


def test_lineage_stops_past_32_modules_and_push_keeps_chains_within_it(store, modules):
    refs = [modules.push(f"acme/m{i}") for i in range(33)]
    for child, parent in zip(refs[1:], refs):
        _set_recorded_parent(store, child, parent)  # a chain no push check made
    assert len(store.lineage(refs[31])) == 32
    with pytest.raises(Conflict, match="the lineage of acme/m32@1 holds more than 32 modules"):
        store.lineage(refs[32])
    with pytest.raises(Conflict, match="parent acme/m31@1 of this module ends a chain of 32 modules"):
        modules.push("acme/deep", refs[31])
    assert modules.push("acme/deep", refs[30]) == "acme/deep@1"


# --- children, delete and yank ---------------------------------------------------------------------
def test_children_block_deleting_or_yanking_their_parent_unless_forced(store, modules):
    modules.push("acme/dapt")  # @1
    modules.push("acme/dapt")  # @2
    modules.push("acme/sum", "acme/dapt@1")
    modules.push("acme/qa", "acme/dapt@1")
    modules.push("acme/qa", "acme/dapt@2")
    assert [i.ref for i in store.children("acme/dapt@1")] == ["acme/qa@1", "acme/sum@1"]
    assert [i.ref for i in store.children("acme/dapt")] == ["acme/qa@2"]  # latest is @2
    assert store.children("acme/sum@1") == []
    with pytest.raises(
        Conflict, match=r"cannot delete acme/dapt@1: acme/dapt@1 is the parent of acme/qa@1, acme/sum@1 .*--force"
    ):
        store.delete("acme/dapt@1")
    with pytest.raises(Conflict, match=r"cannot yank acme/dapt@1: .*--force"):
        store.yank("acme/dapt@1", "why")
    with pytest.raises(Conflict, match=r"acme/dapt@1 is the parent of .*; acme/dapt@2 is the parent of acme/qa@2"):
        store.delete("acme/dapt")  # the whole module: every version is checked
    assert [i.version for i in store.versions("acme/dapt")] == [1, 2]  # nothing changed
    # a yanked child no longer blocks (it cannot be pulled anyway), and stays listed
    store.yank("acme/sum@1", "superseded")
    store.yank("acme/qa@1", "superseded")
    assert store.yank("acme/dapt@1", "old").yanked
    assert [(i.ref, i.yanked) for i in store.children("acme/dapt@1")] == [("acme/qa@1", True), ("acme/sum@1", True)]
    # force overrides; children inside what is deleted do not block
    assert store.delete("acme/dapt@2", force=True) == [2]
    modules.push("acme/chain")
    modules.push("acme/chain", "acme/chain@1")
    assert store.delete("acme/chain") == [1, 2]


def test_children_match_every_spelling_of_an_exact_version_and_skip_damaged_records(store, modules):
    modules.push("dapt")
    modules.push("sum", "dapt@v1")  # `v1` parses as version 1
    modules.push("acme/dapt")  # another module: acme/dapt is not dapt
    assert [i.ref for i in store.children("dapt@1")] == ["sum@1"]
    assert store.children("acme/dapt@1") == []
    record = store.root / "modules" / "_" / "sum" / "versions" / "1.json"
    os.chmod(record, 0o644)
    record.write_text("{not json")
    assert store.children("dapt@1") == []  # a damaged record is no one's usable child
    with pytest.raises(VersionNotFound):
        store.children("dapt@7")


# --- pull ----------------------------------------------------------------------------------------
def test_pull_with_parents_writes_each_ancestor_beside_dest_and_can_be_repeated(store, modules, tmp_path):
    modules.push("acme/base")
    modules.push("acme/dapt", "acme/base@1")
    modules.push("acme/sum", "acme/dapt@1")
    reg = Registry(store.uri, cache_dir=tmp_path / "cache")
    dest = tmp_path / "pulled"
    for _ in range(2):  # pulling again into the same folders is a no-op, never a Conflict
        pulled = reg.pull("acme/sum", dest, with_parents=True)
        assert pulled.ref == "acme/sum@1" and pulled.path == dest
        assert [(p.ref, p.path) for p in pulled.parents] == [
            ("acme/dapt@1", tmp_path / "pulled.parents" / "acme" / "dapt@1"),
            ("acme/base@1", tmp_path / "pulled.parents" / "acme" / "base@1"),
        ]
    assert parents_folder(dest) == tmp_path / "pulled.parents"
    verify_module(dest)  # the module folder holds exactly the module
    for parent in pulled.parents:
        assert verify_module(parent.path).manifest == parent.manifest
    assert reg.pull("acme/sum@1", tmp_path / "alone").parents == ()
    assert not (tmp_path / "alone.parents").exists()
    cached = reg.pull("acme/sum", with_parents=True)
    assert [p.path for p in cached.parents] == [
        tmp_path / "cache" / "acme" / "dapt" / "1",
        tmp_path / "cache" / "acme" / "base" / "1",
    ]


def test_pull_refuses_a_child_whose_chain_no_longer_resolves(store, modules, tmp_path):
    modules.push("acme/dapt")
    modules.push("acme/sum", "acme/dapt@1")
    reg = Registry(store.uri, cache_dir=tmp_path / "cache")
    reg.yank("acme/dapt@1", "poisoned data", force=True)
    with pytest.raises(VersionNotFound, match=r"acme/dapt@1, in the lineage of acme/sum@1, is yanked \(poisoned data\)"):
        reg.pull("acme/sum", tmp_path / "out", with_parents=True)
    reg.delete("acme/dapt@1", force=True)
    with pytest.raises(ModuleNotFound, match="parent acme/dapt@1 of acme/sum@1 is not in this registry"):
        reg.pull("acme/sum", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.parents").exists()
    assert store.pull("acme/sum@1").ref == "acme/sum@1"  # the store itself only moves bytes


# --- SDK and CLI ---------------------------------------------------------------------------------
def test_cli_lineage_prints_the_chain_and_its_users(store, modules, tmp_path, capsys):
    modules.push("acme/dapt", task="legal")
    modules.push("acme/sum", "acme/dapt@1", task="summarize")
    modules.push("acme/qa", "acme/dapt@1", task="qa")
    reg = Registry(store.uri)
    assert [i.ref for i in reg.lineage("acme/sum")] == ["acme/sum@1", "acme/dapt@1"]
    assert [i.ref for i in reg.children("acme/dapt@1")] == ["acme/qa@1", "acme/sum@1"]

    assert main(["lineage", "acme/sum", "--registry", store.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    created = [store.resolve(r).created_at for r in ("acme/sum@1", "acme/dapt@1")]
    assert lines == [
        f"acme/sum@1  lora  summarize/sft  tiny-base  {created[0]}",
        f"acme/dapt@1  lora  legal/sft  tiny-base  {created[1]}",
        "used by: none",
    ]
    assert main(["lineage", "acme/dapt@1", "--registry", store.uri, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [i["ref"] for i in payload["lineage"]] == ["acme/dapt@1"]
    assert [i["ref"] for i in payload["used_by"]] == ["acme/qa@1", "acme/sum@1"]

    # refusals are one line and a non-zero exit; --force overrides them
    assert main(["yank", "acme/dapt@1", "--registry", store.uri]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: cannot yank acme/dapt@1: acme/dapt@1 is the parent of acme/qa@1, acme/sum@1"
    )
    assert main(["rm", "acme/dapt@1", "--registry", store.uri]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["yank", "acme/dapt@1", "--force", "--reason", "old", "--registry", store.uri]) == 0
    assert capsys.readouterr().out == "yanked acme/dapt@1\n"
    assert main(["lineage", "acme/sum", "--registry", store.uri]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("  yanked: old")
    assert main(["pull", "acme/sum", "--dest", str(tmp_path / "x"), "--registry", store.uri]) == 1
    assert "is yanked (old)" in capsys.readouterr().err
    assert main(["rm", "acme/dapt@1", "--force", "--registry", store.uri]) == 0
    assert main(["lineage", "acme/sum", "--registry", store.uri]) == 1
    assert capsys.readouterr().err.startswith("error: parent acme/dapt@1 of acme/sum@1 is not in this registry")


def test_cli_pull_with_parents_says_where_each_went(store, modules, tmp_path, capsys):
    modules.push("acme/dapt")
    modules.push("acme/sum", "acme/dapt@1")
    dest = tmp_path / "out"
    assert main(["pull", "acme/sum", "--dest", str(dest), "--with-parents", "--registry", store.uri]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"pulled acme/sum@1 to {dest}",
        f"pulled parent acme/dapt@1 to {tmp_path / 'out.parents' / 'acme' / 'dapt@1'}",
    ]


# --- hf:// ---------------------------------------------------------------------------------------
@pytest.fixture
def hub_store(tmp_path, monkeypatch):
    """An hf://acme store on an in-process hub (anyone may write), its caches in tmp_path."""
    from huggingface_hub import constants

    from tunehub.registry.hf import HubStore
    from tunehub.registry.hub_server import make_server

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # this hub speaks classic LFS
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    with make_server(tmp_path / "hub-root", port=0) as server:
        yield HubStore("acme", endpoint=server.url, cache_dir=tmp_path / "hf-cache", modules_dir=tmp_path / "hf-modules")


def test_hub_store_checks_parents_at_push_and_children_before_delete_or_yank(hub_store, tmp_path):
    modules = _Modules(hub_store, tmp_path / "modules")
    modules.push("acme/dapt")
    with pytest.raises(ModuleNotFound, match="parent acme/dapt@2 of this module is not in this registry.*push the parent first"):
        modules.push("acme/sum", "acme/dapt@2")
    with pytest.raises(ModuleNotFound, match="parent other/dapt@1 of this module is not in this registry"):
        modules.push("acme/sum", "other/dapt@1")  # one hf:// registry is one namespace
    with pytest.raises(IncompatibleBase, match=OTHER_FINGERPRINT[:12]):
        modules.push("acme/sum", "acme/dapt@1", fingerprint=OTHER_FINGERPRINT)
    with pytest.raises(ModuleNotFound):
        hub_store.resolve("acme/sum")  # nothing was pushed
    modules.push("acme/sum", "dapt@1")  # the namespace is implied on the hub
    assert [i.ref for i in hub_store.lineage("acme/sum")] == ["acme/sum@1", "acme/dapt@1"]
    assert [i.ref for i in hub_store.children("acme/dapt@1")] == ["acme/sum@1"]
    with pytest.raises(Conflict, match="cannot delete acme/dapt: acme/dapt@1 is the parent of acme/sum@1"):
        hub_store.delete("acme/dapt")
    with pytest.raises(Conflict, match="cannot yank acme/dapt@1"):
        hub_store.yank("acme/dapt@1")
    assert hub_store.yank("acme/dapt@1", "old", force=True).yanked
    with pytest.raises(VersionNotFound, match=r"acme/dapt@1, in the lineage of acme/sum@1, is yanked \(old\)"):
        Registry("hf://acme", endpoint=hub_store.endpoint, cache_dir=tmp_path / "hf-cache").pull("acme/sum")
