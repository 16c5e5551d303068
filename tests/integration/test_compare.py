"""`tunehub compare`: a tiny comparison end to end (one method made to fail), the output folder's
safety, and config problems reported together before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunehub.errors import ConfigError, Conflict
from tunehub.registry.local import LocalStore
from tunehub.sdk.cli import app, main
from tunehub.sdk.compare import COLUMNS, QUICK, compare_config, load_compare_config, preset_config, run_comparison

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _tiny(base: Path, **changes: object) -> dict:
    """Three trained rows (ia3 made to fail: it targets a layer the base does not have; the
    chain: DAPT, then SFT on it), the template, a few steps: the whole pipeline in under a minute."""
    config = {
        "base": {"path": str(base)},
        "task": "sentiment",
        "methods": ["lora", "ia3", "template", "chain"],
        "steps": 4,
        "batch_size": 8,
        "train_size": 48,
        "heldout_size": 4,
        "general_size": 4,
        "template_shots": 2,
        "dapt_steps": 2,
        "dapt_size": 64,
        "workers": 2,
        "options": {"ia3": {"target_modules": ["no_such_layer"]}},
    }
    config.update(changes)
    return config


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_tiny_run_writes_every_column_and_reports_the_failing_method(tiny_biased_llama_path, tmp_path):
    config = _write(tmp_path / "compare.yaml", _tiny(tiny_biased_llama_path))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    # stdout is a pipe here: the table as tab-separated lines, then where things are
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    assert [line.split("\t")[0] for line in lines[1:6]] == ["base", "lora", "ia3", "template", "chain"]
    assert lines[-1].startswith(f"wrote {out / 'comparison.md'}")

    report = json.loads((out / "comparison.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["base", "lora", "ia3", "template", "chain"]
    assert rows["ia3"]["status"] == "failed" and "target_modules" in rows["ia3"]["error"]
    assert "\n" not in rows["ia3"]["error"]
    lora = rows["lora"]
    assert lora["status"] == "ok", lora["error"]
    assert 0 < lora["trainable_share"] < 0.5 and lora["trainable_params"] > 0 and lora["steps"] == 4
    assert lora["size_bytes"] > 0 and lora["peak_memory_bytes"] >= lora["memory_baseline_bytes"] > 0
    assert lora["seconds_per_step"] > 0 and lora["heldout_examples"] == 4 and 0 <= lora["exact_match"] <= 1
    # forgetting is the module's loss on the general text minus the base's
    assert lora["forgetting"] == pytest.approx(lora["general_loss"] - rows["base"]["general_loss"])
    template = rows["template"]
    assert template["status"] == "ok" and template["trainable_params"] == 0 and template["exact_match"] is not None
    assert rows["base"]["trainable_params"] == 0 and rows["base"]["forgetting"] == 0.0
    # the chain: an SFT lora trained on the DAPT one, which it names as its parent; served with it
    chain = rows["chain"]
    assert chain["status"] == "ok", chain["error"]
    assert chain["exact_match"] is not None and chain["forgetting"] is not None
    assert chain["size_bytes"] > lora["size_bytes"]  # both modules

    # the modules: a folder each, and versions in the comparison's registry that the engine served
    store = LocalStore(out / "registry", cache_dir=tmp_path / "cache")
    for method in ("lora", "template", "chain"):
        assert (out / "runs" / method / "module" / "manifest.json").is_file()
        assert rows[method]["module"] == store.resolve(f"compare/{method}").ref == f"compare/{method}@1"
    assert store.resolve("compare/chain@1").parent == "compare/chain-dapt@1"
    assert store.manifest("compare/chain-dapt@1").objective == "clm"
    assert not (out / "runs" / "lora" / "checkpoints").exists()

    markdown = (out / "comparison.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in markdown
    assert f"tunehub compare {config} --out {out}" in markdown and "torch " in markdown
    assert "failed: ConfigError: method.target_modules" in markdown and "3 of 4 methods measured; failed: ia3" in markdown
    assert yaml.safe_load(markdown.split("```yaml\n")[1].split("```")[0]) == report["config"]
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_compare_refuses_an_out_folder_that_holds_anything(tiny_biased_llama_path, tmp_path, capsys):
    config = _write(tmp_path / "compare.yaml", _tiny(tiny_biased_llama_path))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["compare", str(config), "--out", str(out)]) == Conflict.exit_code
    assert "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(Conflict):
        run_comparison(compare_config(_tiny(tiny_biased_llama_path)), a_file)
    assert a_file.read_text() == "x"


def test_compare_config_problems_are_reported_together_before_anything_is_written(tmp_path):
    raw = {
        "base": {"preset": "tiny-bert", "path": "/nowhere"},
        "task": "poetry",
        "methods": ["lora", "lora", "sparse"],
        "steps": 0,
        "learning_rates": {"prompt": float("nan"), "magic": 1.0},
        "options": {"template": {"r": 4}, "lora": {"r": -1, "ranks": 3}, "prompt": {"name": "prefix"}},
        "colour": "blue",
    }
    with pytest.raises(ConfigError) as caught:
        run_comparison(compare_config(raw), tmp_path / "out")
    problems = "\n".join(caught.value.problems)
    for expected in (
        "base: give preset",
        "task: 'poetry' is not a task",
        "'sparse': not a method",
        "lora named more than once",
        "steps: Input should be greater than 0",
        "prompt: must be finite",
        "'magic': not a method",
        "'template': not a method here",
        "lora.r: Input should be greater than 0",
        "lora.ranks: unknown key",
        "prompt.name: set by the row",
        "colour: unknown key",
    ):
        assert expected in problems
    assert not (tmp_path / "out").exists()


def test_compare_run_config_problems_of_several_methods_come_together_and_nothing_trains(tiny_biased_llama_path, tmp_path):
    # each option is valid alone; only with the rest of its run config does it fail the trainer's checks
    raw = _tiny(
        tiny_biased_llama_path,
        methods=["lora", "adalora", "selective"],
        options={"adalora": {"tinit": 3, "tfinal": 3}, "selective": {"bitfit": False, "layernorm": False}},
    )
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(ConfigError) as caught:
        run_comparison(compare_config(raw), out)
    problems = caught.value.problems
    assert any(p.startswith("adalora: method: adalora tinit + tfinal (6)") for p in problems), problems
    assert any(p.startswith("selective: method: ") and "choose what to train" in p for p in problems), problems
    assert out.is_dir() and not any(out.iterdir())  # what the check wrote (data) is gone; the folder was the user's


def test_compare_yaml_hostile_shapes_are_refused(tmp_path):
    for text, expected in (
        ("- just\n- a list\n", "must be a mapping"),
        ("base: {preset: small\n", "not valid YAML"),
        ("base: {preset: small}\nmethods: []\n", "name at least one method"),
        ("base: {preset: small}\nsteps: .nan\n", "steps"),
        ("base: {preset: small}\noptions: {lora: [1, 2]}\n", "options.lora"),
        ("base: {preset: ../../etc}\n", "not a causal LM preset"),
    ):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            load_compare_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_compare_config(tmp_path / "missing.yaml")
    # a relative base.path is the YAML folder's
    (tmp_path / "bases" / "b").mkdir(parents=True)
    (tmp_path / "bases" / "c.yaml").write_text("base: {path: b}\n")
    assert load_compare_config(tmp_path / "bases" / "c.yaml").base.path == str((tmp_path / "bases" / "b").resolve())


def test_compare_quick_preset_is_the_example_yaml_and_the_cli_wants_one_source(tmp_path, capsys):
    assert load_compare_config(REPO / "examples" / "compare" / "quick.yaml") == QUICK == preset_config("quick")
    assert set(QUICK.methods) >= {"full", "selective", "qlora", "template", "chain"}
    with pytest.raises(ConfigError, match="quick"):
        preset_config("slow")
    assert main(["compare", "--out", str(tmp_path / "o")]) == ConfigError.exit_code
    assert main(["compare", str(REPO / "examples" / "compare" / "quick.yaml"), "--preset", "quick"]) == ConfigError.exit_code
    assert capsys.readouterr().err.count("give a comparison YAML or --preset quick") == 2
    assert not (tmp_path / "o").exists()
