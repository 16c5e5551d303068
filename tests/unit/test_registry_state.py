"""The registry state machine alone (registry/state.py): pure functions, no store, no I/O; plus
the store registry by URI scheme and the direction of imports between the layers."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tunehub.errors import (
    AliasNotFound,
    ConfigError,
    Conflict,
    IntegrityError,
    ModuleNotFound,
    VersionNotFound,
)
from tunehub.registry import state as rs
from tunehub.registry.refs import ModuleRef
from tunehub.registry.state import AliasMove, VersionRecord, Yank
from tunehub.registry.store import ModuleStore, open_store, register_store

REPO = "acme/sum"
ROOT = Path(__file__).resolve().parents[2]


def ref(text: str) -> ModuleRef:
    return ModuleRef.parse(text)


def promote(state: rs.RegistryState, text: str, alias: str, at: str = "t") -> rs.RegistryState:
    return rs.promote(state, ref(text), alias, REPO, by="ann", at=at)[0]


def record(version: int) -> VersionRecord:
    return VersionRecord(
        version=version,
        manifest_sha256="a" * 64,
        files=(("manifest.json", "a" * 64), ("w.safetensors", "b" * 64)),
        kind="lora",
        created_at="now",
        base_fingerprint="f",
        base_model_id="m",
    )


# --- resolution ----------------------------------------------------------------------------------
def test_resolve_honours_latest_versions_aliases_yanks_and_deletes():
    state = rs.state_of({1, 2, 4}, {3}, aliases={"prod": 2, "old": 3}, yanked={4: Yank("bad", "ann", "t")})
    assert rs.resolve(state, ref(REPO), REPO) == 2  # 4 is yanked, 3 deleted
    assert rs.resolve(state, ref(f"{REPO}@latest"), REPO) == 2
    assert rs.resolve(state, ref(f"{REPO}@1"), REPO) == 1
    assert rs.resolve(state, ref(f"{REPO}@prod"), REPO) == 2
    with pytest.raises(VersionNotFound, match=r"^acme/sum@4 is yanked \(bad\)$"):
        rs.resolve(state, ref(f"{REPO}@4"), REPO)
    with pytest.raises(VersionNotFound, match=r"^acme/sum@3 was deleted$"):
        rs.resolve(state, ref(f"{REPO}@3"), REPO)
    with pytest.raises(VersionNotFound, match=r"^acme/sum has no version 9 \(latest is 4\)$"):
        rs.resolve(state, ref(f"{REPO}@9"), REPO)
    with pytest.raises(VersionNotFound, match="points to version 3, which was deleted"):
        rs.resolve(state, ref(f"{REPO}@old"), REPO)
    with pytest.raises(AliasNotFound, match=r"has no alias 'canary' \(aliases: old, prod\)"):
        rs.resolve(state, ref(f"{REPO}@canary"), REPO)
    everything_yanked = rs.yank(rs.state_of({1}), 1, REPO, by="ann", at="t")[0]
    with pytest.raises(VersionNotFound, match="has no version that is not yanked"):
        rs.resolve(everything_yanked, ref(REPO), REPO)


def test_resolve_by_commit_goes_through_version_tags_only_when_given():
    sha = "0123456789abcdef0123456789abcdef01234567"
    state = rs.state_of({1, 2})
    assert rs.resolve(state, ref(f"{REPO}@{sha}"), REPO, {"v2": sha, "release": sha}) == 2
    with pytest.raises(VersionNotFound, match="no v<N> tag points to it"):
        rs.resolve(state, ref(f"{REPO}@{sha}"), REPO, {"release": sha})
    with pytest.raises(AliasNotFound):  # a store without tags reads it as an alias
        rs.resolve(state, ref(f"{REPO}@{sha}"), REPO)


def test_require_module_names_a_module_whose_versions_were_all_deleted():
    rs.require_module(rs.state_of({1}), REPO, "file:///r")
    with pytest.raises(ModuleNotFound, match=r"^no module acme/sum in file:///r$"):
        rs.require_module(rs.RegistryState(), REPO, "file:///r")
    with pytest.raises(ModuleNotFound, match=r"\(every version was deleted\)$"):
        rs.require_module(rs.state_of(set(), {1}), REPO, "file:///r")


# --- promote and rollback ------------------------------------------------------------------------
def test_promote_and_rollback_record_who_when_from_and_to_and_leave_the_input_alone():
    start = rs.state_of({1, 2, 3})
    once, move = rs.promote(start, ref(f"{REPO}@1"), "prod", REPO, by="ann", at="t1")
    assert move == AliasMove("prod", "promote", None, 1, "ann", "t1")
    assert start.alias_map == {} and start.history == ()  # immutable: a new state came back
    twice = promote(promote(once, f"{REPO}@2", "prod", "t2"), f"{REPO}@3", "prod", "t3")
    back, move = rs.rollback(twice, "prod", REPO, by="bob", at="t4")
    assert move == AliasMove("prod", "rollback", 3, 2, "bob", "t4")
    assert back.alias_map == {"prod": 2}
    back_again, move = rs.rollback(back, "prod", REPO, by="bob", at="t5")
    assert (move.from_version, move.to_version) == (2, 1)
    assert [m.action for m in back_again.history] == ["promote"] * 3 + ["rollback"] * 2
    with pytest.raises(Conflict, match="no earlier target"):
        rs.rollback(back_again, "prod", REPO, by="bob", at="t6")


def test_rollback_skips_yanked_and_deleted_targets_and_knows_unknown_aliases():
    state = promote(promote(promote(rs.state_of({1, 2, 3}), f"{REPO}@1", "prod"), f"{REPO}@2", "prod"), f"{REPO}@3", "prod")
    state = rs.yank(state, 2, REPO, "broken", by="ann", at="t")[0]
    assert rs.rollback(state, "prod", REPO, by="ann", at="t")[1].to_version == 1
    with pytest.raises(AliasNotFound, match="has no alias 'canary'"):
        rs.rollback(state, "canary", REPO, by="ann", at="t")
    with pytest.raises(Conflict, match="cannot be moved"):
        rs.promote(state, ref(f"{REPO}@1"), "latest", REPO, by="ann", at="t")


# --- yank, delete, numbers -----------------------------------------------------------------------
def test_yank_needs_a_live_version():
    state, mark = rs.yank(rs.state_of({1}, {2}), 1, REPO, "why", by="ann", at="t")
    assert mark == Yank("why", "ann", "t") and state.yanked == {1: mark}
    with pytest.raises(VersionNotFound, match="has no version 2"):
        rs.yank(state, 2, REPO, by="ann", at="t")


def test_delete_refuses_aliased_versions_unless_forced():
    state = promote(rs.state_of({1, 2}), f"{REPO}@1", "prod")
    with pytest.raises(Conflict, match=r"aliases point to what would be deleted \(prod -> 1\)"):
        rs.delete(state, 1, REPO)
    after, targets = rs.delete(state, 1, REPO, force=True)
    assert targets == [1] and after.live == {2} and after.deleted == {1} and after.alias_map == {}
    assert len(after.history) == 1  # the history of moves is kept
    with pytest.raises(VersionNotFound, match="has no version 1"):
        rs.delete(after, 1, REPO)
    gone, targets = rs.delete(after, None, REPO)
    assert targets == [2] and gone.live == set() and gone.deleted == {1, 2}


def test_next_version_never_reuses_a_number():
    state = rs.state_of({1, 2}, {3})
    assert rs.next_version(state) == 4
    assert rs.next_version(state, {7}) == 8  # e.g. a Hub tag left by a push whose state was lost
    assert rs.next_version(rs.RegistryState()) == 1
    grown = rs.add_version(state, record(4))
    assert grown.live == {1, 2, 4} and grown.record(4) == record(4)
    with pytest.raises(Conflict):
        rs.add_version(grown, record(3))


# --- JSON ----------------------------------------------------------------------------------------
def test_local_state_json_round_trips_the_format_the_store_writes():
    raw = {
        "aliases": {"prod": 1},
        "history": [{"alias": "prod", "action": "promote", "from_version": None, "to_version": 1, "by": "a", "at": "t"}],
        "yanked": {"2": {"reason": "bad", "by": "a", "at": "t"}},
    }
    state = rs.parse_local_state(json.loads(json.dumps(raw)), {1, 2}, set(), "state.json")
    assert rs.local_state_json(state) == raw
    assert rs.parse_local_state(None, {1}, set(), "state.json") == rs.state_of({1})


def test_hub_state_json_round_trips_the_format_the_store_writes():
    state = rs.delete(rs.add_version(rs.add_version(rs.RegistryState(), record(1)), record(2)), 1, REPO)[0]
    state = promote(state, f"{REPO}@2", "prod")
    raw = rs.hub_state_json(state, REPO, {"action": "x", "by": "a", "at": "t"})
    assert raw["versions"].keys() == {"2"} and raw["deleted"] == [1] and raw["schema"] == 1
    assert raw["versions"]["2"]["files"] == {"manifest.json": "a" * 64, "w.safetensors": "b" * 64}
    assert rs.parse_hub_state(json.loads(json.dumps(raw)), REPO) == state


MOVE = {"alias": "prod", "action": "promote", "from_version": None, "to_version": 1, "by": "a", "at": "t"}


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"aliases": []},
        {"aliases": {"prod": "1"}},
        {"aliases": {"prod": True}},
        {"history": {}},
        {"history": [{"x": 1}]},
        {"history": [{**MOVE, "to_version": "1"}]},
        {"history": [{**MOVE, "action": "teleport"}]},
        {"yanked": []},
        {"yanked": {"01": {"reason": "r"}}},
        {"yanked": {"1": "because"}},
        {"yanked": {"1": {"reason": 5}}},
    ],
)
def test_malformed_state_json_is_refused(raw):
    with pytest.raises(IntegrityError, match="corrupt"):
        rs.parse_local_state(raw, {1}, set(), "state.json")
    with pytest.raises(IntegrityError, match="^the tunehub state of acme/sum on the hub is corrupt"):
        rs.parse_hub_state({"schema": 1, **raw} if isinstance(raw, dict) else raw, REPO)


def test_malformed_version_records_are_refused():
    good = record(1).to_json()
    assert rs.parse_record(good, 1) == record(1)
    for bad, problem in [
        ({**good, "version": 2}, "not a record of this version"),
        ({**good, "files": {"../x": "a" * 64, "manifest.json": "a" * 64}}, "unsafe file path"),
        ({**good, "files": {"manifest.json": "nope"}}, "is not a sha256"),
        ({**good, "kind": None}, "no kind"),
        ({**good, "manifest_sha256": "c" * 64}, "disagrees"),
    ]:
        with pytest.raises(ValueError, match=problem):
            rs.parse_record(bad, 1)
    hub = {"schema": 1, "versions": {"1": {**good, "files": {".tunehub/state.json": "a" * 64, "manifest.json": "a" * 64}}}}
    with pytest.raises(IntegrityError, match="corrupt"):
        rs.parse_hub_state(hub, REPO)


# --- stores by URI scheme ------------------------------------------------------------------------
class _MemoryStore(ModuleStore):
    """A toy store: only what open_store needs to hand it back."""

    def __init__(self, name: str, **options: object):
        self.uri = f"mem://{name}"
        self.options = options

    def _unused(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError

    push = pull = resolve = manifest = list = versions = aliases = alias_history = _unused  # type: ignore[assignment]
    promote = rollback = yank = delete = sign = _unused  # type: ignore[assignment]


def test_open_store_finds_a_registered_scheme_and_refuses_unknown_ones(tmp_path):
    register_store("mem", _MemoryStore)
    try:
        store = open_store("mem://scratch", colour="blue")
        assert isinstance(store, _MemoryStore) and store.uri == "mem://scratch" and store.options == {"colour": "blue"}
    finally:
        from tunehub.registry import store as store_module

        store_module._STORE_FACTORIES.pop("mem", None)
    with pytest.raises(ConfigError, match="unknown registry scheme"):
        open_store("mem://scratch")
    with pytest.raises(ValueError):
        register_store("Not A Scheme", _MemoryStore)


# --- import direction ----------------------------------------------------------------------------
# sdk -> server, trainer -> registry (DESIGN.md "Layout"): a layer never imports one above it
_FORBIDDEN = {
    "registry": ("tunehub.sdk", "tunehub.server", "tunehub.trainer"),
    "trainer": ("tunehub.sdk",),
    "server": ("tunehub.sdk",),
}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "tunehub":  # from tunehub import sdk
                found += [(node.lineno, f"tunehub.{alias.name}") for alias in node.names]
    return found


def test_no_layer_imports_a_layer_above_it():
    upward = []
    for layer, forbidden in _FORBIDDEN.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for line, module in _imported_modules(path):
                if any(module == f or module.startswith(f + ".") for f in forbidden):
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert upward == []
