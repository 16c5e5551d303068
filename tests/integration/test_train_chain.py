"""Training chains (``init.parent``): the parent chain is pulled, verified, applied frozen under
the trained module, and only the child's tensors are saved, with the parent's exact version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunehub.errors import ConfigError, IncompatibleBase, ManifestError, ModuleNotFound
from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import Manifest
from tunehub.registry.module import write_module
from tunehub.server.engine import Engine
from tunehub.server.engine import load_base as load_served_base
from tunehub.trainer.config import validate_run_config
from tunehub.trainer.run import train
from tunehub.trainer.testing import load_base, make_lora_module, make_peft_module, make_selective_module

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATA = EXAMPLES / "data"
PROBE = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 12]])


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "registry", cache_dir=tmp_path / "pulled")


def chain_config(base, out, store, parent, *, method=None, objective="sft", quantization="none", **training):
    data = DATA / ("reverse.jsonl" if objective == "sft" else "harbor.txt")
    return validate_run_config(
        {
            "base": {"path": str(base), "quantization": quantization},
            "method": method or {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "objective": {"name": objective},
            "data": {"train": str(data), "max_length": 48, "eval_fraction": 0},  # no evaluation: seconds per run
            "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 2e-2, "logging_steps": 1, **training},
            "init": {"parent": parent},
            "output": {"dir": str(out), "task": "chain", "registry": store.uri},
        }
    )


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def peft_stack(base_model, parents: list[Path], child: Path):
    """What PEFT computes with the parents and the child loaded from their folders, all active."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(parents[0]), adapter_name="p0")
    for i, folder in enumerate(parents[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"p{i}")
    model.load_adapter(str(child), adapter_name="child")
    model.base_model.set_adapter(["child", *(f"p{i}" for i in range(len(parents)))])
    return model


def falls(result) -> bool:
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_child_trains_on_its_frozen_parent_and_saves_only_its_own_tensors(kind, tiny_llama_path, tmp_path, store):
    if kind == "lora":
        make_lora_module(tiny_llama_path, tmp_path / "p1", seed=1)
        make_lora_module(tiny_llama_path, tmp_path / "p2", seed=2)
        method = None
    else:
        make_peft_module(tiny_llama_path, tmp_path / "p1", "ia3", seed=1)
        make_peft_module(tiny_llama_path, tmp_path / "p2", "ia3", seed=2)
        method = {"name": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    store.push(tmp_path / "p1", "acme/dapt")
    store.push(tmp_path / "p2", "acme/dapt")
    store.promote("acme/dapt@1", "prod")  # latest is @2: the alias must be resolved, and recorded exactly
    parent_weights = load_file(tmp_path / "p1" / "adapter_model.safetensors")

    result = train(chain_config(tiny_llama_path, tmp_path / "run", store, "acme/dapt@prod", method=method))

    assert falls(result)
    assert result.manifest.parent == "acme/dapt@1"
    child = load_file(result.module_dir / "adapter_model.safetensors")
    assert not any("parent" in key for key in child)
    if kind == "lora":  # the child targets q/v only, the parent every linear layer
        assert {key.split(".")[-3] for key in child} == {"q_proj", "v_proj"} and len(child) == 8
    else:  # same layers as the parent: the values are the child's (it started at 1)
        assert child.keys() == parent_weights.keys()
        assert all(not torch.allclose(child[key], parent_weights[key]) for key in child)
    saved_config = json.loads((result.module_dir / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == kind.upper()

    trained = logits(result.model)
    expected = logits(peft_stack(load_base(tiny_llama_path), [store.pull("acme/dapt@1").path], result.module_dir))
    torch.testing.assert_close(trained, expected, atol=1e-4, rtol=1e-4)
    # the parent matters: the child alone computes something else
    from peft import PeftModel

    alone = logits(PeftModel.from_pretrained(load_base(tiny_llama_path), str(result.module_dir)))
    assert (alone - trained).abs().max() > 1e-2

    # served: the engine applies the parent it finds in the manifest, as training did
    store.push(result.module_dir, "acme/sft")
    engine = Engine(load_served_base(tiny_llama_path, quantization="none"), store)
    try:
        [served] = engine.logits([(PROBE[0].tolist(), "acme/sft")])
    finally:
        engine.close()
    torch.testing.assert_close(served, trained[0], atol=1e-4, rtol=0)

    if kind == "lora":  # a grandchild applies the whole lineage, walked through manifest.parent
        grand = train(chain_config(tiny_llama_path, tmp_path / "grand", store, "acme/sft", max_steps=1))
        assert grand.manifest.parent == "acme/sft@1"
        stacked = peft_stack(
            load_base(tiny_llama_path), [store.pull("acme/dapt@1").path, store.pull("acme/sft@1").path], grand.module_dir
        )
        torch.testing.assert_close(logits(grand.model), logits(stacked), atol=1e-4, rtol=1e-4)


def test_dapt_then_sft_chain_examples_on_a_4bit_base(tiny_llama_path, tmp_path, store):
    """QLoRA chain, as the examples run it: dapt-clm.yaml (a clm LoRA on the nf4 base) pushed,
    then chain-dapt-then-sft.yaml (an sft LoRA on top of it)."""
    from peft import PeftModel

    from tunehub.trainer.config import load_run_config
    from tunehub.trainer.run import load_base_model

    common = [f"base.path={tiny_llama_path}", f"output.registry={store.uri}", "training.logging_steps=1"]
    # seconds per run: no evaluation, short blocks, no activation recomputation or lean allocator
    common += ["data.eval_fraction=0", "data.max_length=48", "training.gradient_checkpointing=false"]
    common += ["training.cpu_allocator=default"]
    dapt = load_run_config(
        EXAMPLES / "dapt-clm.yaml",
        [*common, "training.max_steps=1", f"output.dir={tmp_path / 'dapt'}", "output.push=demo/harbor-dapt"],
    )
    train(dapt)
    config = load_run_config(
        EXAMPLES / "chain-dapt-then-sft.yaml",
        [
            *common,
            "training.max_steps=6",
            "training.batch_size=4",
            "training.learning_rate=0.02",
            f"output.dir={tmp_path / 'sft'}",
        ],
    )
    result = train(config)

    assert falls(result)
    assert result.manifest.parent == "demo/harbor-dapt@1" and result.manifest.base.quantization == "nf4"
    child = load_file(result.module_dir / "adapter_model.safetensors")
    # the child's own rank-8 tensors only (the parent is rank 16)
    assert child and all(t.shape[0 if ".lora_A." in k else 1] == 8 for k, t in child.items())
    base = load_base_model(tiny_llama_path, config)  # the same nf4 weights, loaded as the trainer loads them
    stacked = peft_stack(base, [store.pull("demo/harbor-dapt@1").path], result.module_dir)
    # the same quantized weights and kernels on both sides: only the summation order of the
    # adapters' deltas differs, far below the 4-bit rounding itself
    torch.testing.assert_close(logits(result.model), logits(stacked), atol=1e-4, rtol=1e-4)
    alone = PeftModel.from_pretrained(load_base_model(tiny_llama_path, config), str(result.module_dir))
    assert (logits(alone) - logits(result.model)).abs().max() > 1e-3
    # served on the server's nf4 base (its own compute dtype): the chain applied, the same greedy answer
    store.push(result.module_dir, "demo/harbor-sft")
    engine = Engine(load_served_base(tiny_llama_path, quantization="nf4"), store)
    try:
        [served] = engine.logits([(PROBE[0].tolist(), "demo/harbor-sft")])
    finally:
        engine.close()
    torch.testing.assert_close(served, logits(result.model)[0], atol=2e-3, rtol=0)
    assert torch.equal(served.argmax(-1), logits(result.model)[0].argmax(-1))


def test_selective_parent_is_loaded_into_the_base_before_the_child(tiny_llama_path, tmp_path, store):
    from peft import PeftModel

    from tunehub.trainer.methods.selective import apply_selective

    make_selective_module(tiny_llama_path, tmp_path / "sel", layers=[1], seed=4)
    store.push(tmp_path / "sel", "acme/blocks")
    result = train(chain_config(tiny_llama_path, tmp_path / "run", store, "acme/blocks", max_steps=6))

    assert falls(result)
    assert result.manifest.parent == "acme/blocks@1"
    assert all(".lora_" in key for key in load_file(result.module_dir / "adapter_model.safetensors"))
    base = apply_selective(load_base(tiny_llama_path), store.pull("acme/blocks@1").path)
    expected = logits(PeftModel.from_pretrained(base, str(result.module_dir)))
    torch.testing.assert_close(logits(result.model), expected, atol=1e-4, rtol=1e-4)


def test_adalora_parent_is_applied_as_the_lora_weights_it_equals(tiny_llama_path, tmp_path, store):
    """A trained AdaLoRA parent whose budget pruned its layers to different ranks (some to 0)."""
    from peft import PeftModel

    adalora = {"name": "adalora", "init_r": 4, "target_r": 1, "tinit": 1, "tfinal": 1}
    source = chain_config(tiny_llama_path, tmp_path / "ada", store, None, method=adalora, max_steps=4)
    source.output.push = "acme/ada"
    parent = train(source)
    assert parent.manifest.params.get("rank_pattern")  # pruned: the saved layers have their own ranks
    result = train(chain_config(tiny_llama_path, tmp_path / "run", store, "acme/ada", max_steps=1))

    # PEFT's AdaLoRA merged into the base computes what PEFT's AdaLoRA forward does
    merged = PeftModel.from_pretrained(load_base(tiny_llama_path), str(store.pull("acme/ada@1").path)).merge_and_unload()
    expected = logits(PeftModel.from_pretrained(merged, str(result.module_dir)))
    torch.testing.assert_close(logits(result.model), expected, atol=1e-4, rtol=1e-4)


def test_resumed_chain_keeps_its_parent_in_the_forward_pass(tiny_llama_path, tmp_path, store):
    """Trainer's resume reloads the adapters and activates the child alone: the parent comes back."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    store.push(make_lora_module(tiny_llama_path, tmp_path / "p", seed=1), "acme/dapt")
    straight = train(chain_config(tiny_llama_path, tmp_path / "straight", store, "acme/dapt", max_steps=4, save_steps=2))
    interrupted = chain_config(tiny_llama_path, tmp_path / "resumed", store, "acme/dapt", max_steps=4, save_steps=2)
    train(interrupted, extra_callbacks=[StopAfter()])
    resumed = train(interrupted, resume=True)

    a = load_file(straight.module_dir / "adapter_model.safetensors")
    b = load_file(resumed.module_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(resumed.model), logits(straight.model), atol=1e-4, rtol=1e-4)


def _refused(config, tmp_path, error, match):
    with pytest.raises(error, match=match):
        train(config)
    assert not (tmp_path / "run" / "module").exists()


def test_parent_trained_on_another_base_is_refused_before_the_base_loads(
    tiny_llama_path, tiny_biased_llama_path, tmp_path, store
):
    store.push(make_lora_module(tiny_biased_llama_path, tmp_path / "p", seed=1), "acme/other")
    config = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/other")
    _refused(
        config,
        tmp_path,
        IncompatibleBase,
        r"parent acme/other@1 was trained on base tiny-biased \(fingerprint w1:.*this run trains on tiny-llama",
    )


def test_missing_parent_is_refused(tiny_llama_path, tmp_path, store):
    _refused(chain_config(tiny_llama_path, tmp_path / "run", store, "acme/nowhere@3"), tmp_path, ModuleNotFound, "acme/nowhere")


def test_parents_peft_cannot_stack_under_the_child_are_refused(tiny_llama_path, tmp_path, store):
    store.push(make_peft_module(tiny_llama_path, tmp_path / "prompt", "prompt", seed=1), "acme/prompt")
    config = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/prompt")
    _refused(config, tmp_path, ConfigError, r"acme/prompt@1 is a prompt module.*supported chains are lora, dora or adalora")
    # a lora parent under an ia3 child: two PEFT types
    store.push(make_lora_module(tiny_llama_path, tmp_path / "lora", seed=1), "acme/lora")
    config = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/lora", method={"name": "ia3"})
    _refused(config, tmp_path, ConfigError, r"acme/lora@1 is a lora module and method ia3 cannot be stacked on it")
    # a selective parent on a 4-bit base: its tensors would replace quantized ones
    store.push(make_selective_module(tiny_llama_path, tmp_path / "sel", layernorm=True), "acme/norms")
    config = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/norms", quantization="nf4")
    _refused(config, tmp_path, ConfigError, r"acme/norms@1 is a selective module.*nf4")


def test_full_parent_is_refused_with_the_base_path_to_use(tiny_llama_path, tmp_path, store):
    from tunehub.trainer.methods.full import FullMethodConfig, save_full

    folder = tmp_path / "full"
    folder.mkdir()
    save_full(FullMethodConfig(), load_base(tiny_llama_path), folder, base_path=tiny_llama_path, task="whole")
    store.push(folder, "acme/whole")
    config = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/whole")
    with pytest.raises(ConfigError, match=r"acme/whole@1 is a full model.*train on it with base.path: ") as refused:
        train(config)
    named = Path(str(refused.value).split("base.path: ")[1].split(" (")[0])
    assert (named / "config.json").is_file() and Manifest.read(named).kind.value == "full"


def test_parent_recorded_by_alias_cannot_be_walked(tiny_llama_path, tmp_path, store, monkeypatch):
    # a registry written before push checked parents (what output.parent recorded was any reference)
    monkeypatch.setattr(store, "check_parent", lambda manifest: [], raising=False)
    store.push(make_lora_module(tiny_llama_path, tmp_path / "a", seed=1), "acme/a")
    child = make_lora_module(tiny_llama_path, tmp_path / "b", seed=2)
    write_module(child, Manifest.read(child).with_updates(parent="acme/a"))  # what output.parent used to record
    store.push(child, "acme/b")
    config = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/b")
    _refused(config, tmp_path, ManifestError, r"acme/b@1 records its parent as 'acme/a', an alias")


def test_output_parent_is_reported_with_the_other_config_problems(tiny_llama_path, tmp_path, store):
    raw = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/x").resolved()
    del raw["init"]
    raw["output"]["parent"] = "acme/x@1"
    raw["training"]["bogus"] = 1
    with pytest.raises(ConfigError) as refused:
        validate_run_config(raw)
    assert "output.parent moved to init.parent: the parent module is now applied, frozen, while training" in str(refused.value)
    assert "training.bogus: unknown key" in refused.value.problems
    # a method that cannot stack on a parent, on a 4-bit base: refused with the config, before any registry look-up
    raw = chain_config(tiny_llama_path, tmp_path / "run", store, "acme/x").resolved()
    raw["base"]["quantization"] = "nf4"
    raw["method"] = {"name": "prompt", "num_virtual_tokens": 4}
    with pytest.raises(ConfigError, match=r"init.parent: on a nf4 base a chain stacks adapters only"):
        validate_run_config(raw)
    raw["init"]["parent"] = "../escape"
    with pytest.raises(ConfigError, match=r"init.parent"):
        validate_run_config(raw)
