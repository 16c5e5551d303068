"""The README's Commands section, run as a new user would: every bash block in order, as one
script, in a fresh folder. Its output is checked for what the README says each command prints."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def readme_command_blocks(text: str) -> list[str]:
    """The ```bash blocks of the README's "## Commands" section, in order."""
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```bash\n(.*?)^```$", section, flags=re.S | re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_blocks_are_found():
    blocks = readme_command_blocks((REPO / "README.md").read_text())
    joined = "\n".join(blocks)
    # every verb of the CLI has an example in the section
    for verb in (
        "quickstart",
        "base init",
        "train",
        "push",
        "pull",
        "show",
        "inspect",
        "lineage",
        "export",
        "keygen",
        "template init",
        "tokenizer train",
        "tokenizer extend",
        "sign",
        "verify",
        "ls",
        "versions",
        "promote",
        "rollback",
        "history",
        "yank",
        "rm",
        "gc",
        "hub serve",
        "serve",
        "generate",
    ):
        assert re.search(rf"^\s*(\S+ )?tunehub {verb}\b", joined, flags=re.M), verb


def test_readme_commands_run_and_print_what_it_says(tmp_path):
    blocks = readme_command_blocks((REPO / "README.md").read_text())
    serve_port, hub_port, signed_port, ray_port = _free_port(), _free_port(), _free_port(), _free_port()
    script = "\n".join(blocks).replace("127.0.0.1:8000", f"127.0.0.1:{serve_port}")
    script = script.replace("--port 8000", f"--port {serve_port}")
    script = script.replace("127.0.0.1:8001", f"127.0.0.1:{signed_port}").replace("--port 8001", f"--port {signed_port}")
    script = script.replace("127.0.0.1:8787", f"127.0.0.1:{hub_port}").replace("--port 8787", f"--port {hub_port}")
    script = script.replace("127.0.0.1:8002", f"127.0.0.1:{ray_port}").replace("--port 8002", f"--port {ray_port}")
    script = script.replace("--main_process_port 29500", f"--main_process_port {_free_port()}")  # the FSDP run
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    # the set-up line's full quickstart takes minutes: its --fast twin stands in (same layout),
    # made from the walk-through's own run once that has made it
    script = script.replace(
        "\ntunehub serve --base ./tunehub-quickstart/base",
        "\ncp -r qs tunehub-quickstart\ntunehub serve --base ./tunehub-quickstart/base",
        1,
    )
    (tmp_path / "readme.sh").write_text(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script  # servers the README leaves running
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEHUB_", "HF_"))}
    env["TUNEHUB_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(["bash", "readme.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, (out[-3000:], err[-5000:])

    # what the README says these commands print
    assert "pushed quickstart/colour@2" in out
    assert "pushed acme/demo@1" in out and "pushed acme/demo@2" in out
    assert re.search(r"prod: 2 -> 1", out)  # tunehub rollback acme/demo prod
    assert (tmp_path / "pulled" / "manifest.json").is_file() and (tmp_path / "from-hub" / "manifest.json").is_file()
    # a template module is written, pushed and answered by the server as itself
    assert "wrote template module reverse-template (text; slots: words)" in out
    assert "pushed acme/reverse-template@1" in out and '"model":"acme/reverse-template@1"' in out.replace(" ", "")
    # domain tokenizers: trained, a base built on one, and an extension that cuts held-out fertility
    assert "trained a bpe tokenizer of 1000 tokens on 300 lines" in out
    assert "tokenizer pharma-tokenizer, vocabulary 1000)" in out
    assert "added 200 tokens (512 -> 712)" in out
    fertility = re.search(r"^tokens per word \(fertility\)\t([\d.]+)\t([\d.]+)\t([\d.]+)$", out, flags=re.M)
    assert fertility and float(fertility.group(3)) < 0.75, out[-3000:]
    # a tokenizer module, trained, pushed and served composed with a task LoRA (a chat answer)
    assert "pushed acme/pharma-vocab@1" in out
    assert '"model":"acme/pharma-vocab@1+acme/demo@1"' in out.replace(" ", ""), out[-3000:]
    # every method is listed, and the soft-prompt example trains end to end
    assert re.search(r"^ptuning\s+ptuning\s+4-bit base ok\s+mixed in batches", out, flags=re.M)
    assert "module written to out/reverse-prompt/module" in out
    # the two-process FSDP run: one module, written by the main process only
    assert out.count("module written to out/fsdp/module") == 1
    # signed versions: verified, pulled under --require-signed, and an unsigned one refused
    key_id = re.search(r"pushed acme/signed@1 \(.*, signed by ([0-9a-f]{16})\)", out).group(1)
    assert f"verified acme/signed@1: signed by {key_id}" in out
    assert (tmp_path / "trusted" / "manifest.json").is_file()
    assert "error: acme/demo@2: refused, the version is not signed and signatures are required" in err
    assert "refused, as it should be" in out
    # tunehub serve --trust --require-signed and a tenant's require_signed_by: each refusal names its reason
    assert "acme/unsigned@1: refused, the version is not signed and signatures are required" in out
    assert "acme/signed@1: refused, signed only by keys that are not trusted" in out
    assert "requires a signature by one of those keys for modules matching 'acme/signed'" in out
    # tunehub serve --ray: the answer names the module version and the replica that produced it
    assert re.search(r"^x-tunehub-module: acme/demo@1\s*$", out, flags=re.M | re.I), out[-3000:]
    assert re.search(r"^x-tunehub-replica: [0-9a-z]{8}\s*$", out, flags=re.M | re.I), out[-3000:]
    # tunehub generate: the text on stdout, the module version that answered on stderr
    assert re.search(
        r"^\[quickstart/colour@\d+, base w1:[0-9a-f]{9}, (stop|length), \d+ prompt \+ \d+ completion tokens\]$", err, flags=re.M
    ), err[-3000:]
    assert re.search(
        r"^\[acme/demo@1, base w1:[0-9a-f]{9}, (stop|length), \d+ prompt \+ \d+ completion tokens\]$", err, flags=re.M
    ), err[-3000:]
    # no traceback and no library noise anywhere
    for noise in ("Traceback", "FutureWarning", "Unable to fetch remote file", "leaked semaphore"):
        assert noise not in err, noise
