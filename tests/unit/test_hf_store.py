"""The hf:// store's rules that need no hub: names, namespaces, aliases, offline refusals."""

from __future__ import annotations

import pytest

from tunehub.errors import Conflict, IntegrityError, InvalidReference, ManifestError, StoreError
from tunehub.registry.hf import HubStore, _check_state, prepare_environment
from tunehub.registry.refs import is_commit_sha, parse_ref
from tunehub.registry.store import open_store

SHA = "0123456789abcdef0123456789abcdef01234567"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # nothing listens there; these tests never reach it


@pytest.fixture(autouse=True)
def _restore_hub_settings(monkeypatch):
    """prepare_environment (and the CLI) switch Xet off process-wide; undo that after each test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # as in a process started with it


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    return HubStore("acme", endpoint=DEAD_ENDPOINT, cache_dir=tmp_path / "hf")


def test_commit_refs_parse_as_pins():
    ref = parse_ref(f"acme/sum@{SHA}")
    assert ref.commit == SHA and ref.version is None and str(ref) == f"acme/sum@{SHA}"
    assert parse_ref("acme/sum@prod").commit is None and parse_ref("sum@3").commit is None
    assert is_commit_sha(SHA) and not is_commit_sha(SHA[:-1]) and not is_commit_sha(SHA.upper())


def test_open_store_dispatches_hf_and_checks_namespaces(store, tmp_path):
    opened = open_store("hf://acme", endpoint=DEAD_ENDPOINT, cache_dir=tmp_path / "hf")
    assert isinstance(opened, HubStore) and opened.uri == "hf://acme" and opened.endpoint == DEAD_ENDPOINT
    for bad in ("", "a/b", "../x", "x..y", "bad name"):
        with pytest.raises(InvalidReference):
            HubStore(bad, endpoint=DEAD_ENDPOINT)
    with pytest.raises(InvalidReference, match="namespace"):
        store.resolve("other/sum")
    with pytest.raises(InvalidReference, match="Hub repo name"):
        store.resolve("acme/a--b")  # a tunehub name the Hub does not accept
    with pytest.raises(InvalidReference):
        HubStore("acme", endpoint="ftp://host")


def test_endpoint_from_environment_and_xet_switch(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8787/")
    assert HubStore("acme").endpoint == "http://127.0.0.1:8787"
    import os

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    prepare_environment("https://huggingface.co")  # the real Hub keeps Xet
    assert "HF_HUB_DISABLE_XET" not in os.environ and constants.HF_HUB_DISABLE_XET is False
    prepare_environment("http://127.0.0.1:8787")
    assert os.environ["HF_HUB_DISABLE_XET"] == "1" and constants.HF_HUB_DISABLE_XET is True


def test_alias_names_and_push_refs_are_checked_before_any_request(store, tmp_path):
    with pytest.raises(InvalidReference, match="reserved"):
        store.promote("sum@1", "main")
    with pytest.raises(InvalidReference, match="reserved"):
        store.promote("sum@1", SHA)
    with pytest.raises(Conflict, match="latest"):
        store.promote("sum@1", "latest")
    with pytest.raises(Conflict, match="assigned by the registry"):
        store.push(tmp_path, "acme/sum@2")
    with pytest.raises(Conflict, match="exact version"):
        store.yank("sum@prod")
    with pytest.raises(Conflict, match="not an alias"):
        store.delete("sum@prod")


def test_offline_reads_need_a_cached_state_and_writes_need_the_hub(store, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StoreError, match="never read .* online"):
        store.resolve("sum")
    from tests.helpers import make_fake_module

    with pytest.raises(StoreError, match="HF_HUB_OFFLINE"):
        store.push(make_fake_module(tmp_path / "m"), "sum")
    with pytest.raises(StoreError, match="HF_HUB_OFFLINE"):
        store.list()


def test_state_from_the_hub_is_validated():
    good = {
        "schema": 1,
        "versions": {
            "1": {
                "version": 1,
                "files": {"manifest.json": "a" * 64, "w.safetensors": "b" * 64},
                "manifest_sha256": "a" * 64,
                "kind": "lora",
                "created_at": "now",
                "base_fingerprint": "f",
                "base_model_id": "m",
            }
        },
        "aliases": {"prod": 1},
    }
    assert _check_state(good, "acme/x")["aliases"] == {"prod": 1}
    evil = {**good, "versions": {"1": {**good["versions"]["1"], "files": {"../../etc/x": "a" * 64, "manifest.json": "a" * 64}}}}
    for broken in (evil, {**good, "schema": 9}, [], {**good, "aliases": {"prod": "1"}}, {**good, "history": [{"x": 1}]}):
        with pytest.raises(IntegrityError, match="corrupt"):
            _check_state(broken, "acme/x")


def test_constructing_a_store_leaves_the_process_alone_and_a_push_over_xet_is_refused(monkeypatch, tmp_path):
    """The Hub client's environment is the entry point's choice: a store for a private hub
    changes nothing process-wide, and its push is refused before anything is sent when
    huggingface_hub would use Xet there."""
    import os

    from huggingface_hub import constants

    from tunehub.errors import ConfigError
    from tunehub.registry import hf
    from tunehub.sdk.cli import main

    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(hf, "_xet_installed", lambda: True)  # as where hf_xet is installed
    store = HubStore("acme", endpoint=DEAD_ENDPOINT, cache_dir=tmp_path / "hf")
    assert "HF_HUB_DISABLE_XET" not in os.environ and constants.HF_HUB_DISABLE_XET is False
    with pytest.raises(ConfigError, match=r"^http://127\.0\.0\.1:9 is not huggingface\.co: it takes uploads over LFS"):
        store.push(tmp_path / "anything", "m")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")  # the user's explicit choice to keep Xet wins
    with pytest.raises(ManifestError):  # past the check: the folder is not a module
        store.push(tmp_path / "anything", "m")

    # the CLI is the entry point that chooses: with a private HF_ENDPOINT it switches Xet off
    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
    assert main(["ls", "--help"]) == 0
    assert os.environ["HF_HUB_DISABLE_XET"] == "1" and constants.HF_HUB_DISABLE_XET is True
