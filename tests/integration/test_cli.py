"""The CLI as a user runs it: a real `tunehub` process, one-line errors, no tracebacks."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import make_fake_module

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(tmp_path):
    env = {**os.environ, "TUNEHUB_HOME": str(tmp_path / "home"), "TUNEHUB_USER": "tester"}
    env.pop("TUNEHUB_REGISTRY", None)

    def run(*args, ok=True, cwd=None):
        proc = subprocess.run(
            [sys.executable, "-m", "tunehub.sdk.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=cwd,
        )
        if ok:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode != 0
            assert "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc

    return run


def test_push_pull_show_round_trip(cli, tmp_path):
    module = make_fake_module(tmp_path / "mod")
    assert "pushed acme/sum@1" in cli("push", module, "acme/sum").stdout
    out = cli("pull", "acme/sum@1", "--dest", tmp_path / "pulled").stdout
    assert f"pulled acme/sum@1 to {tmp_path / 'pulled'}" in out
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == (module / "adapter_model.safetensors").read_bytes()
    shown = json.loads(cli("show", "acme/sum@1").stdout)
    assert shown["kind"] == "lora" and shown["task"] == "demo"
    assert shown["_registry"]["ref"] == "acme/sum@1"


def test_versions_promote_rollback_yank_rm_ls(cli, tmp_path):
    for i in range(3):
        cli("push", make_fake_module(tmp_path / f"m{i}"), "sum")
    assert cli("promote", "sum@2", "prod").stdout.strip() == "prod: unset -> 2"
    assert cli("promote", "sum@3", "prod").stdout.strip() == "prod: 2 -> 3"
    assert "3 -> 2" in cli("rollback", "sum", "prod").stdout
    infos = json.loads(cli("versions", "sum", "--json").stdout)
    assert [(i["version"], i["aliases"]) for i in infos] == [(1, []), (2, ["prod"]), (3, [])]
    history = cli("history", "sum").stdout.splitlines()
    assert len(history) == 3 and "tester" in history[0]
    cli("yank", "sum@3", "--reason", "bad")
    assert json.loads(cli("ls", "--json").stdout)[0]["version"] == 2
    assert json.loads(cli("ls", "--kind", "dora", "--json").stdout) == []
    assert "deleted sum versions 1" in cli("rm", "sum@1").stdout
    assert "sum@2" in cli("versions", "sum").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "nope"], "no module 'nope'"),
        (["pull", "../etc"], "'..'"),
        (["pull", "Acme/x"], "upper-case"),
        (["push", "/does/not/exist", "x"], "not a folder"),
        (["rollback", "nope", "prod"], "no module"),
        (["ls", "--registry", "s3://x"], "unknown registry scheme"),
    ],
)
def test_errors_are_one_line(cli, args, message):
    proc = cli(*args, ok=False)
    assert message in proc.stderr
    assert proc.stderr.startswith("error: ")


def test_push_refuses_pickle_and_tampered(cli, tmp_path):
    module = make_fake_module(tmp_path / "m")
    (module / "weights.pt").write_bytes(b"\x80")
    # the whole message: the words "pickle" and "sha256" could also come from a temporary path
    assert (
        cli("push", module, "x", ok=False).stderr
        == "error: weights.pt is a pickle-format file; tunehub accepts safetensors only\n"
    )
    (module / "weights.pt").unlink()
    (module / "adapter_model.safetensors").write_bytes(b"tampered")
    assert re.fullmatch(
        rf"error: {re.escape(str(module))}: adapter_model\.safetensors does not match its sha256 \(expected [0-9a-f]{{12}}\.\.\., got [0-9a-f]{{12}}\.\.\.\)\n",
        cli("push", module, "x", ok=False).stderr,
    )


def test_usage_error_exit_code(cli):
    proc = subprocess.run([sys.executable, "-m", "tunehub.sdk.cli", "push"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_pull_dest_never_empties_the_users_folder(cli, tmp_path):
    # mkdir x && cd x && echo '{}' > manifest.json && echo keep > notes.txt && tunehub pull acme/demo@1 --dest .
    cli("push", make_fake_module(tmp_path / "mod"), "acme/demo")
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}\n")
    (folder / "notes.txt").write_text("keep\n")
    proc = cli("pull", "acme/demo@1", "--dest", ".", ok=False, cwd=folder)
    assert proc.stderr.startswith("error: ") and "--force" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "notes.txt"]
    assert (folder / "manifest.json").read_text() == "{}\n" and (folder / "notes.txt").read_text() == "keep\n"
    cli("pull", "acme/demo@1", "--dest", ".", "--force", cwd=folder)
    assert (folder / "notes.txt").read_text() == "keep\n"
    assert json.loads((folder / "manifest.json").read_text())["task"] == "demo"


def test_ls_in_a_pipe_prints_long_names_whole(cli, tmp_path):
    name = "acme/" + ("quarterly-report-summary-" * 4)[:84] + "x"
    assert len(name) == 90
    cli("push", make_fake_module(tmp_path / "mod"), name)
    out = cli("ls").stdout  # stdout is a pipe here
    assert out.splitlines()[0].split("\t")[0] == f"{name}@1"
    removed = json.loads(cli("gc", "--json").stdout)
    assert removed == {"blobs": [], "tmp": []}
