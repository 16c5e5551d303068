"""Runs of the trainer as users make them: resume, the CLI, bad input, distributed."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunehub.trainer.config import validate_run_config
from tunehub.trainer.run import train

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def _raw(base, out, **training):
    return {
        "base": {"path": str(base)},
        "method": {"name": "lora", "r": 4, "dropout": 0.1},
        "objective": {"name": "sft"},
        "data": {"train": str(DATA / "reverse.jsonl"), "max_length": 48, "packing": True},
        "training": {
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "save_steps": 3,
            "eval_steps": 3,
            "logging_steps": 1,
            **training,
        },
        "output": {"dir": str(out), "task": "reverse"},
    }


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_llama_path, tmp_path):
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                control.should_training_stop = True

    straight = train(validate_run_config(_raw(tiny_llama_path, tmp_path / "straight")))
    interrupted = validate_run_config(_raw(tiny_llama_path, tmp_path / "resumed"))
    first = train(interrupted, extra_callbacks=[StopAfter(3)])
    assert first.metrics["steps"] == 3
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-3").is_dir()
    resumed = train(interrupted, resume=True)
    assert resumed.metrics["steps"] == 6

    a = load_file(straight.module_dir / "adapter_model.safetensors")
    b = load_file(resumed.module_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    losses = lambda r: [h["loss"] for h in r.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed)[-3:] == pytest.approx(losses(straight)[-3:], rel=1e-5)


def _cli(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tunehub.sdk.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_cli_train_and_push(tiny_llama_path, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(tiny_llama_path, tmp_path / "out", max_steps=4)))
    proc = _cli(
        "train",
        config,
        "--set",
        "training.eval_steps=2",
        "--push",
        "demo/reverse",
        "--registry",
        tmp_path / "reg",
        env={"TUNEHUB_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "pushed demo/reverse@1" in proc.stdout
    assert "step 4/4" in proc.stderr  # plain progress lines when not on a terminal
    shown = json.loads(_cli("show", "demo/reverse@1", "--registry", tmp_path / "reg").stdout)
    assert shown["config"]["training"]["eval_steps"] == 2  # the override is in the resolved config
    assert shown["metrics"]["steps"] == 4
    assert _cli("train", config, "--check").returncode == 0


def test_default_checkpoints_come_at_evaluations_at_most_once_per_interval(tiny_llama_path, tmp_path):
    # save_steps unset: checkpoints at evaluations (steps 3 and 6), paced by checkpoint_minutes
    rare = train(validate_run_config(_raw(tiny_llama_path, tmp_path / "rare", save_steps=None)))
    assert rare.metrics["steps"] == 6
    assert not list((tmp_path / "rare" / "checkpoints").glob("checkpoint-*"))  # a short run: none
    every = train(validate_run_config(_raw(tiny_llama_path, tmp_path / "every", save_steps=None, checkpoint_minutes=1e-6)))
    assert sorted(p.name for p in (tmp_path / "every" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert every.manifest.config["training"]["checkpoint_minutes"] == 1e-6  # resolved into the manifest


def test_resume_without_checkpoint_is_refused(tiny_llama_path, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(tiny_llama_path, tmp_path / "out")))
    proc = _cli("train", config, "--resume")
    assert proc.returncode != 0 and "no checkpoint" in proc.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "does not exist"),
        ("bad_fields", "train.jsonl:2: expected"),
        ("empty_data", "no SFT records"),
        ("bad_target", "matches no layer"),
        ("rank_zero", "method.r"),
        ("not_a_model", "not a model folder"),
    ],
)
def test_bad_input_is_one_clear_error(case, message, tiny_llama_path, tmp_path, capsys):
    raw = _raw(tiny_llama_path, tmp_path / "out")
    data = tmp_path / "train.jsonl"
    if case == "missing_data":
        raw["data"]["train"] = str(tmp_path / "absent.jsonl")
    elif case == "bad_fields":
        data.write_text('{"prompt": "a", "completion": "b"}\n{"question": "no completion"}\n')
        raw["data"]["train"] = str(data)
    elif case == "empty_data":
        data.write_text("")
        raw["data"]["train"] = str(data)
    elif case == "bad_target":
        raw["method"]["target_modules"] = ["no_such_proj"]
    elif case == "rank_zero":
        raw["method"]["r"] = 0
    elif case == "not_a_model":
        (tmp_path / "notmodel").mkdir()
        raw["base"]["path"] = str(tmp_path / "notmodel")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    # in-process through the CLI's own entry point (the subprocess path is covered above)
    from tunehub.sdk.cli import main

    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "out" / "module").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_losses(out):
    """Per-step training losses as the run logged them (logging_steps=1): HF's trainer_state.json
    of the checkpoint at the last step. Under several processes each is the mean of the ranks'
    losses, which transformers scales to the global batch's per-token mean (below)."""
    (checkpoint,) = (out / "checkpoints").glob("checkpoint-4")
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def _comparable(base, out, batch_size):
    # dropout 0: each rank would draw its own masks, and one process other ones. No eval: the
    # comparison is of training steps. save_steps=4 keeps the last step's trainer_state.json.
    raw = _raw(base, out, max_steps=4, batch_size=batch_size, save_steps=4, eval_steps=None)
    raw["method"]["dropout"] = 0.0
    raw["data"]["eval_fraction"] = 0.0
    return raw


@pytest.fixture(scope="module")
def one_process_run(tiny_llama_path, tmp_path_factory):
    """The reference: one process, batch 4 (the global batch of 2 processes x 2)."""
    out = tmp_path_factory.mktemp("one-process")
    config = out / "run.yaml"
    config.write_text(yaml.safe_dump(_comparable(tiny_llama_path, out / "run", batch_size=4)))
    proc = _cli("train", config, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "run"


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_cpu_processes_take_the_steps_one_process_takes(distributed, one_process_run, tiny_llama_path, tmp_path):
    """2 processes (gloo) x batch 2 against 1 process x batch 4: the same per-step losses and the
    same module. The same global batches: both draw from accelerate's seeded sampler (data_seed =
    training.seed), the same permutation in every process; with 2 processes its consecutive
    batches of 2 go to rank 0 and rank 1, so step k covers the same 4 packed rows as the one
    process's step k. The loss is the per-token mean over the global batch both ways:
    transformers counts the label tokens of all ranks (average_tokens_across_devices) and scales
    each rank's sum by the world size before DDP/FSDP average the gradients. A mean of per-rank
    means (21 and 24 label tokens at step 1) would be 5e-4 off, 8e-5 relative, which rtol 1e-4
    would let through; what is left is fp32 summation order (<= 1e-7 relative measured), hence
    rtol 1e-5.
    A silent fallback to one process (what `accelerate launch --cpu` does) fails too: batches of
    2 give other losses."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    config = tmp_path / "run.yaml"
    raw = _comparable(tiny_llama_path, tmp_path / "run", batch_size=2)
    raw["training"]["distributed"] = distributed
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [
            "accelerate",
            "launch",
            "--multi_gpu",  # the torchrun launcher: with --cpu accelerate starts one process only
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "tunehub.sdk.cli",
            "train",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("module written to") == 1  # only the main process writes the module
    assert _step_losses(tmp_path / "run") == pytest.approx(_step_losses(one_process_run), rel=1e-5, abs=1e-6)

    # the same module, in the same format: the FSDP run's sharded tensors were gathered for it
    one, two = one_process_run / "module", tmp_path / "run" / "module"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    a = load_file(one / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4 and manifest["config"]["training"]["distributed"] == distributed
    assert json.loads((one / "adapter_config.json").read_text()) == json.loads((two / "adapter_config.json").read_text())


def test_a_run_warns_nothing_and_records_no_local_path(tiny_llama_path, tmp_path):
    """A user sees no library noise (PEFT's offline Hub lookup, deprecations PEFT triggers), and no
    file of the module names the folder the base was read from."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = _raw(tiny_llama_path, tmp_path / "run", max_steps=2, save_steps=None, eval_steps=None)
        raw["base"]["quantization"] = "nf4"  # the QLoRA path, as the quickstart trains
        result = train(validate_run_config(raw))
    noise = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (UserWarning, FutureWarning, DeprecationWarning))
        and ("peft" in w.filename or "transformers" in w.filename or "tunehub" in w.filename)
    ]
    assert noise == []
    module = result.module_dir
    manifest = json.loads((module / "manifest.json").read_text())
    assert manifest["base"]["model_id"] == tiny_llama_path.name
    adapter_config = json.loads((module / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_llama_path.name
    # (the resolved run config keeps the paths as the user wrote them: that is the run's record)
    assert str(tiny_llama_path.parent) not in json.dumps(manifest["base"])
    for name in ("adapter_config.json", "README.md"):
        assert str(tiny_llama_path.parent) not in (module / name).read_text(), name
    front = yaml.safe_load((module / "README.md").read_text().split("---")[1])
    assert front["base_model"] == tiny_llama_path.name
