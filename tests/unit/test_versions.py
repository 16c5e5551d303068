"""Version numbers are ASCII digits in every layer that reads them: the CLI, the SDK, the local
store's version records and the hf:// store's state file, tags and commit titles."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.helpers import make_fake_module
from tunehub.errors import IntegrityError, InvalidReference
from tunehub.registry.hf import _check_state, _Snapshot
from tunehub.registry.local import LocalStore
from tunehub.registry.state import parse_hub_state
from tunehub.sdk import Registry
from tunehub.sdk.cli import main

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def pushed(tmp_path, monkeypatch):
    """A file:// registry holding acme/sum@1."""
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    root = tmp_path / "reg"
    LocalStore(root, cache_dir=tmp_path / "cache").push(make_fake_module(tmp_path / "src"), "acme/sum")
    return root


@pytest.mark.parametrize("selector", ["１", "١", "v１", "+1", "01"])
def test_cli_refuses_a_version_that_int_would_read_as_1(pushed, selector, capsys):
    # before: '１' (full-width) and '١' (Arabic-Indic) resolved to acme/sum@1, '+1' was an invalid alias
    assert main(["show", f"acme/sum@{selector}", "-r", f"file://{pushed}"]) == InvalidReference.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: version ") and err.splitlines() == [err]
    assert ("ASCII digits 0-9" in err) or ("leading zero" in err)


def test_sdk_refuses_a_superscript_version_with_a_typed_error(pushed, tmp_path):
    # before: '²'.isdigit() is True and int('²') raised a bare ValueError (a 500 in the server)
    registry = Registry(f"file://{pushed}")
    with pytest.raises(InvalidReference, match="ASCII digits 0-9"):
        registry.resolve("acme/sum@²")
    assert registry.resolve("acme/sum@1").version == 1


def test_local_store_ignores_version_records_with_odd_names(pushed, tmp_path):
    versions_dir = pushed / "modules" / "acme" / "sum" / "versions"
    record = versions_dir / "1.json"
    for odd in ("².json", "01.json", "١.json", "+2.json", f"{2**63}.json", "1_0.deleted"):
        shutil.copy(record, versions_dir / odd)
    store = LocalStore(pushed, cache_dir=tmp_path / "cache")
    assert [info.version for info in store.versions("acme/sum")] == [1]
    assert store.resolve("acme/sum").version == 1


def _state(versions: dict) -> dict:
    record = {
        "files": {"manifest.json": "a" * 64},
        "manifest_sha256": "a" * 64,
        "kind": "lora",
        "created_at": "now",
        "base_fingerprint": "f",
        "base_model_id": "m",
    }
    return {"schema": 1, "versions": {key: {**record, "version": number} for key, number in versions.items()}}


@pytest.mark.parametrize("key, number", [("²", 2), ("01", 1), ("١", 1), ("+1", 1), (str(2**63), 2**63)])
def test_hub_state_with_an_odd_version_key_is_corrupt(key, number):
    assert _check_state(_state({"1": 1}), "acme/x")["versions"].keys() == {"1"}
    with pytest.raises(IntegrityError, match=re.escape(f"version record {key!r} is malformed")):
        _check_state(_state({key: number}), "acme/x")


def test_hub_tags_are_versions_only_when_spelled_as_versions():
    tags = {"v1": SHA, "v3": SHA, "v03": SHA, "v²": SHA, "v" + "9" * 40: SHA, "v١": SHA, "release": SHA}
    snapshot = _Snapshot(repo_id="acme/x", main=SHA, state=parse_hub_state(_state({"1": 1}), "acme/x"), tags=tags)
    assert snapshot.tag_numbers() == {1, 3}
    assert snapshot.live() == {1}
