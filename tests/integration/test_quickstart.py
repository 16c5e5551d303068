"""`tunehub quickstart --fast` end to end: the table's facts, checked against the registry."""

import json
import os
import subprocess
import sys

import pytest

from tunehub.registry.fingerprint import base_fingerprint
from tunehub.sdk.quickstart import FAST, FULL
from tunehub.sdk.quickstart_tasks import TASKS, exact_match, write_task_data
from tunehub.sdk.registry import Registry

pytestmark = pytest.mark.integration


def test_quickstart_fast(tmp_path):
    work = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "tunehub.sdk.cli", "quickstart", "--fast", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TUNEHUB_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "quickstart.json").read_text())
    assert [row["task"] for row in report["tasks"]] == list(TASKS)
    assert len({row["kind"] for row in report["tasks"]}) >= 2
    registry = Registry(report["registry"])
    served_base = base_fingerprint(report["base"])
    for row in report["tasks"]:
        # the module in the table is in the registry, promoted to prod, and it alone answered
        info = registry.resolve(f"quickstart/{row['task']}@prod")
        assert row["module"] == info.ref
        assert row["answered_by"] == [info.ref]
        manifest = registry.manifest(info.ref)
        assert manifest.kind.value == row["kind"] == TASKS[row["task"]].kind
        assert manifest.base.quantization == "nf4"
        assert info.base_fingerprint == served_base  # trained on the base the server ran
        # accuracies are hit counts over the held-out examples
        n = row["heldout_examples"]
        assert n == FAST.heldout_size
        # the held-out set that was asked is kept beside the training data, to check again
        kept = [json.loads(line) for line in (work / "data" / f"{row['task']}-heldout.jsonl").read_text().splitlines()]
        assert len(kept) == n and all(set(example) == {"prompt", "answer"} for example in kept)
        for accuracy in (row["base_accuracy"], row["module_accuracy"]):
            assert 0.0 <= accuracy <= 1.0 and abs(accuracy * n - round(accuracy * n)) < 1e-9
        assert 0 < row["trainable_share"] < 1 and row["size_kib"] > 0 and row["train_seconds"] > 0
    assert registry.resolve("quickstart/stdlib-clm").version == 1  # the continued pretraining run
    assert "module acc" in proc.stdout and "quickstart/sentiment@prod" in proc.stdout  # the table and the how-to
    assert report["wall_seconds"] > 0  # speed is measured by a benchmark, not asserted here


@pytest.mark.slow
def test_quickstart_full_run_does_what_the_readme_says(tmp_path):
    """The README's claim of the full run: every module answers all of its held-out prompts, the
    base none. About 5 minutes on 2 cores, so not in the default run: ``pytest -m slow``."""
    work = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "tunehub.sdk.cli", "quickstart", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "TUNEHUB_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "quickstart.json").read_text())
    for row in report["tasks"]:
        assert row["heldout_examples"] == FULL.heldout_size
        assert (row["task"], row["module_accuracy"], row["base_accuracy"]) == (row["task"], 1.0, 0.0)


def test_heldout_examples_differ_from_training(tmp_path):
    for task in TASKS.values():
        train_path, heldout = write_task_data(task, tmp_path, train_size=FULL.train_size, heldout_size=200)
        train = [json.loads(line) for line in train_path.read_text().splitlines()]
        train_prompts = {example["prompt"] for example in train}
        train_answers = {example["completion"].strip() for example in train}
        assert len(train) == FULL.train_size and all(example["completion"].endswith("\n") for example in train)
        assert not train_prompts & {example["prompt"] for example in heldout}, task.name
        # every held-out answer was taught, and each of them is asked
        assert {example["answer"] for example in heldout} == train_answers, task.name
        # the same seed gives the same data
        assert write_task_data(task, tmp_path / "again", train_size=FULL.train_size, heldout_size=200)[1] == heldout


def test_exact_match_reads_the_first_line():
    assert exact_match(" positive\nReview: more", "positive")
    assert not exact_match(" positive and more", "positive")
    assert not exact_match("", "positive")
