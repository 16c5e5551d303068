"""`tunehub quickstart --fast` end to end: the table's facts, checked against the registry."""

import json
import os
import subprocess
import sys

import pytest

from tunehub.sdk.quickstart_tasks import TASKS
from tunehub.sdk.registry import Registry

pytestmark = pytest.mark.integration


def test_quickstart_fast(tmp_path):
    work = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "tunehub.sdk.cli", "quickstart", "--fast", "--workdir", str(work)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TUNEHUB_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "quickstart.json").read_text())
    assert {row["task"] for row in report["tasks"]} == set(TASKS)
    assert len({row["kind"] for row in report["tasks"]}) >= 2
    registry = Registry(report["registry"])
    for row in report["tasks"]:
        # the module in the table is in the registry, promoted to prod, and it alone answered
        info = registry.resolve(f"quickstart/{row['task']}@prod")
        assert row["module"] == info.ref
        assert row["answered_by"] == [info.ref]
        assert registry.manifest(info.ref).base.quantization == "nf4"
        assert 0.0 <= row["base_accuracy"] <= 1.0 and 0.0 <= row["module_accuracy"] <= 1.0
        assert 0 < row["trainable_share"] < 1 and row["size_kib"] > 0 and row["train_seconds"] > 0
    assert registry.resolve("quickstart/stdlib-clm").version == 1  # the continued pretraining run
    assert "module acc" in proc.stdout and "quickstart/sentiment@prod" in proc.stdout  # the table and the how-to
    assert report["wall_seconds"] > 0  # speed is measured by a benchmark, not asserted here
