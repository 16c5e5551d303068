"""What the CLI prints for scripts: `ls`/`versions` in a pipe, `gc`, `pull --force` (no subprocess)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.helpers import make_fake_module
from tunehub.errors import Conflict
from tunehub.registry.local import LocalStore
from tunehub.sdk.cli import app

LONG_NAME = "acme/" + ("quarterly-report-summary-" * 4)[:84] + "x"  # 90 characters


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHUB_USER", "tester")
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    return f"file://{tmp_path / 'reg'}"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))  # CliRunner's stdout is not a terminal
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_ls_in_a_pipe_prints_whole_names_as_tab_separated_columns(registry, tmp_path):
    name = LONG_NAME
    assert len(name) == 90
    store = LocalStore(registry.removeprefix("file://"))
    store.push(make_fake_module(tmp_path / "m", task="summarize"), name)
    store.yank(f"{name}@1", "bad\tdata")
    store.push(make_fake_module(tmp_path / "m2", task="summarize"), name)
    store.promote(f"{name}@2", "prod")
    lines = _invoke("ls", "--registry", registry).splitlines()
    assert len(lines) == 1
    columns = lines[0].split("\t")
    assert columns[:5] == [f"{name}@2", "lora", "summarize", "prod", str(store.resolve(name).size_bytes)]
    assert columns[6] == "tester" and columns[7] == ""
    rows = [line.split("\t") for line in _invoke("versions", name, "--registry", registry).splitlines()]
    assert [row[0] for row in rows] == [f"{name}@1", f"{name}@2"]
    assert rows[0][7] == "yanked: bad data"  # a tab inside a value never splits a column
    listed = json.loads(_invoke("ls", "--registry", registry, "--json"))
    assert [entry["ref"] for entry in listed] == [f"{name}@2"]


def test_gc_verb_prints_what_it_removed(registry, tmp_path):
    store = LocalStore(registry.removeprefix("file://"))
    store.push(make_fake_module(tmp_path / "m"), "acme/demo")
    (store.root / "tmp" / "dead.blob").write_bytes(b"x")
    orphan = store.root / "blobs" / "sha256" / "ee" / ("ee" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"y")
    out = _invoke("gc", "--registry", registry)
    assert out.splitlines() == [
        f"removed blob {'ee' * 32}",
        "removed temporary file tmp/dead.blob",
        "gc: 1 blobs, 1 temporary files removed",
    ]
    assert json.loads(_invoke("gc", "--registry", registry, "--json")) == {"blobs": [], "tmp": []}


def test_pull_force_flag_reaches_the_store(registry, tmp_path):
    store = LocalStore(registry.removeprefix("file://"))
    store.push(make_fake_module(tmp_path / "m"), "acme/demo")
    dest = tmp_path / "x"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep")
    with pytest.raises(Conflict, match="--force"):
        _invoke("pull", "acme/demo@1", "--dest", str(dest), "--registry", registry)
    assert _invoke("pull", "acme/demo@1", "--dest", str(dest), "--force", "--registry", registry).startswith(
        "pulled acme/demo@1 to "
    )
    assert (dest / "notes.txt").read_text() == "keep" and (dest / "manifest.json").is_file()


def test_train_list_methods_says_what_each_trains_and_where_it_runs():
    out = _invoke("train", "--list-methods")
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert {"adalora", "dora", "ia3", "lora", "multitask_prompt", "prefix", "prompt", "ptuning"} <= set(rows)
    assert "4-bit base ok" in rows["lora"] and "mixed in batches" in rows["prefix"]
    assert "prompt encoder" in rows["ptuning"]
    assert "no 4-bit base" in rows["selective"] and "mixed: biases, norms only" in rows["selective"]
    assert "not mixed (serve as a base)" in rows["full"]
    assert "mixed in batches" in rows["tokenizer"]
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2 and "--list-methods" in result.output
