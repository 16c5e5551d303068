"""Every method x objective the trainer supports, on nf4 and unquantized bases: loss goes down,
the module validates, and PEFT itself loads it with the same logits as the trained model."""

import json
from pathlib import Path

import pytest
import torch

from tunehub.devices import resolve_compute_dtype
from tunehub.quantization import keep_4bit_layout
from tunehub.registry.module import verify_module
from tunehub.trainer.config import validate_run_config
from tunehub.trainer.run import train

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def run_config(base, out, method, objective, quantization, method_params=None, packing=None, **training):
    data = {"sft": EXAMPLES / "reverse.jsonl", "clm": EXAMPLES / "harbor.txt", "mlm": EXAMPLES / "harbor.txt"}[objective]
    method_cfg = {"name": method}
    if method_params is not None:
        method_cfg.update(method_params)
    elif method == "adalora":
        method_cfg.update(init_r=6, target_r=2, tinit=2, tfinal=3)
    else:
        method_cfg.update(r=4, alpha=8, dropout=0.0)
    if objective == "mlm" and method_params is None:
        method_cfg["target_modules"] = ["query", "key", "value", "dense"]
    raw = {
        "base": {"path": str(base), "quantization": quantization},
        "method": method_cfg,
        "objective": {"name": objective},
        "data": {
            "train": [str(data)],
            "max_length": 48,
            "eval_fraction": 0.1,
            "packing": objective == "sft" if packing is None else packing,
        },
        "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 2e-2, "logging_steps": 1, "eval_steps": 12, **training},
        "output": {"dir": str(out), "task": f"{objective}-test"},
    }
    return validate_run_config(raw)


def _loader(objective):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM


def _load_base(path, objective, quantization):
    from transformers import BitsAndBytesConfig

    kwargs = {}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=resolve_compute_dtype("auto"),  # as the trainer chose it here
        )
        kwargs["device_map"] = {"": "cpu"}
    model = _loader(objective).from_pretrained(path, **kwargs)
    keep_4bit_layout(model)  # PEFT's DoRA dequantizes the base: the layout it reads (as tunehub loads it)
    return model


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("objective", ["sft", "clm", "mlm"])
@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_method_objective_matrix(method, objective, quantization, tiny_llama_path, tiny_bert_path, tmp_path):
    from peft import PeftModel

    base = tiny_bert_path if objective == "mlm" else tiny_llama_path
    result = train(run_config(base, tmp_path / "run", method, objective, quantization))

    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    module = verify_module(result.module_dir)
    manifest = module.manifest
    assert manifest.kind.value == method and manifest.objective == objective
    assert manifest.base.quantization == quantization
    assert manifest.config["method"]["name"] == method  # the resolved config travels with the module
    assert manifest.data is not None and manifest.data.num_tokens > 0
    metrics = json.loads((result.module_dir / "metrics.json").read_text())
    for key in (
        "train_loss",
        "eval_loss",
        "eval_perplexity",
        "trainable_params",
        "trainable_share",
        "peak_memory_bytes",
        "tokens_per_s",
        "wall_seconds",
    ):
        assert key in metrics, key
    assert 0 < metrics["trainable_share"] < 0.5
    assert (result.module_dir / "loss.png").stat().st_size > 1000

    # plain PEFT loads the module and computes what the trained model computes
    trained = result.model.eval()
    base_model = _load_base(base, objective, quantization).eval()
    ids = torch.tensor([[1, 17, 33, 60, 101, 7, 45, 2]])
    with torch.no_grad():
        base_logits = base_model(input_ids=ids).logits.float()
        loaded = PeftModel.from_pretrained(base_model, result.module_dir).eval()
        expected = trained(input_ids=ids).logits.float()
        actual = loaded(input_ids=ids).logits.float()
    # AdaLoRA saves only the ranks its budget kept, so on a bf16-compute nf4 base the trimmed
    # matmuls round differently from the padded in-memory ones: bf16-level tolerance there
    bf16_compute = resolve_compute_dtype("auto") == torch.bfloat16
    tolerance = 2e-2 if (method == "adalora" and quantization == "nf4" and bf16_compute) else 1e-4
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    assert (actual - base_logits).abs().max() > 10 * tolerance, "the module should change the base's output"
    if method == "adalora":
        ranks = manifest.params.get("rank_pattern") or {}
        assert ranks, "AdaLoRA's budget should have pruned some ranks"


# the other PEFT methods: one representative objective each (the loop, the data and the export
# are the ones the matrix above covers with every objective), plus each initialisation or encoder
PEFT_METHOD_CASES = [
    ("ia3", {}, "sft", "nf4"),
    # IA3 only rescales what the base computes: on the random tiny BERT (uniform predictions) a
    # masked-LM run has nothing to rescale, so its second case is the causal UFT objective
    ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, "clm", "none"),
    ("prompt", {"num_virtual_tokens": 8}, "sft", "nf4"),
    ("prompt", {"num_virtual_tokens": 8, "init": "text", "init_text": "Reverse the letters:"}, "clm", "none"),
    ("prompt", {"num_virtual_tokens": 8, "init": "vocab"}, "sft", "none"),
    ("prefix", {"num_virtual_tokens": 8}, "sft", "nf4"),
    ("prefix", {"num_virtual_tokens": 8, "projection": True, "encoder_hidden_size": 32}, "clm", "none"),
    ("ptuning", {"num_virtual_tokens": 8, "encoder": "mlp"}, "sft", "nf4"),
    ("ptuning", {"num_virtual_tokens": 8, "encoder": "lstm", "encoder_hidden_size": 32}, "sft", "none"),
    ("bottleneck", {"placement": "houlsby", "reduction_factor": 8}, "sft", "nf4"),
    ("bottleneck", {"placement": "pfeiffer", "reduction_factor": 4, "non_linearity": "gelu"}, "clm", "none"),
    ("bottleneck", {"placement": "houlsby", "reduction_factor": 4, "init": "bert", "non_linearity": "silu"}, "mlm", "none"),
]


@pytest.mark.parametrize(
    ("method", "params", "objective", "quantization"),
    PEFT_METHOD_CASES,
    ids=[
        "ia3-sft-nf4",
        "ia3-targets-clm",
        "prompt-random-sft-nf4",
        "prompt-text-clm",
        "prompt-vocab-sft",
        "prefix-sft-nf4",
        "prefix-projection-clm",
        "ptuning-mlp-sft-nf4",
        "ptuning-lstm-sft",
        "bottleneck-houlsby-sft-nf4",
        "bottleneck-pfeiffer-clm",
        "bottleneck-bert-init-mlm",
    ],
)
def test_peft_methods_train_and_reload_in_plain_peft(
    method, params, objective, quantization, tiny_llama_path, tiny_bert_path, tmp_path
):
    from peft import PeftModel

    base = tiny_bert_path if objective == "mlm" else tiny_llama_path
    # virtual tokens go before each example: rows are not packed
    learning_rate = 3e-1 if method == "ia3" else 5e-2
    config = run_config(
        base, tmp_path / "run", method, objective, quantization, params, packing=False, learning_rate=learning_rate
    )
    result = train(config)

    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    manifest = verify_module(result.module_dir).manifest
    assert manifest.kind.value == method and manifest.objective == objective
    assert manifest.config["method"] == {**config.method.model_dump(mode="json")}

    trained = result.model.eval()
    base_model = _load_base(base, objective, quantization).eval()
    ids = torch.tensor([[1, 17, 33, 60, 101, 7, 45, 2]])
    with torch.no_grad():
        base_logits = base_model(input_ids=ids).logits.float()
        loaded = PeftModel.from_pretrained(base_model, result.module_dir).eval()
        expected = trained(input_ids=ids).logits.float()
        actual = loaded(input_ids=ids).logits.float()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    # soft prompts add positions in front of the input's: compare the input's own
    assert (actual[:, -ids.shape[1] :] - base_logits).abs().max() > 1e-3, "the module should change the base's output"

    # the engine serves the trained module beside the base in one batch, as PEFT computes it
    from tunehub.registry.local import LocalStore
    from tunehub.server.engine import Engine, load_base

    if objective == "mlm":
        return  # the engine serves causal LMs
    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    store.push(result.module_dir, f"t/{method}")
    engine = Engine(load_base(base, quantization=quantization), store)
    try:
        served = engine.logits([(ids[0].tolist(), f"t/{method}"), (ids[0].tolist(), None)])
    finally:
        engine.close()
    tolerance = 1e-4 if quantization == "none" else 1e-3  # nf4 matmuls compute in bf16 where it is native
    torch.testing.assert_close(served[0], actual[0, -ids.shape[1] :], atol=tolerance, rtol=0)
    torch.testing.assert_close(served[1], base_logits[0], atol=tolerance, rtol=0)


def test_multitask_prompt_target_runs_start_from_the_source_and_get_there_sooner(tiny_llama_path, tmp_path):
    """A source run over two tasks learns the shared prompt; a target run on a third task that
    starts from it (init_from, average of the source's tasks) reaches the eval loss that soft
    prompt tuning from a random start reaches after all its steps, in fewer steps (seeded)."""
    import safetensors.torch
    from peft import PeftModel

    from tunehub.registry.local import LocalStore
    from tunehub.server.engine import Engine, load_base

    lines = (EXAMPLES / "reverse.jsonl").read_text().splitlines()
    parts = {"a": lines[:80], "b": lines[80:160], "target": lines[160:]}
    for name, part in parts.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    registry = f"file://{tmp_path / 'reg'}"

    def config(out, method, sources, steps, eval_steps):
        return validate_run_config(
            {
                "base": {"path": str(tiny_llama_path)},
                "method": {"num_virtual_tokens": 8, **method},
                "objective": {"name": "sft"},
                "data": {"train": [str(tmp_path / f"{s}.jsonl") for s in sources], "max_length": 48, "eval_fraction": 0.2},
                "training": {
                    "max_steps": steps,
                    "batch_size": 8,
                    "learning_rate": 3e-2,
                    "logging_steps": 1,
                    "eval_steps": eval_steps,
                },
                "output": {"dir": str(tmp_path / out), "registry": registry},
            }
        )

    source = train(config("source", {"name": "multitask_prompt"}, ["a", "b"], 30, 30), push="t/mpt-source")
    assert source.manifest.params["num_tasks"] == 2 and source.pushed.ref == "t/mpt-source@1"
    weights = safetensors.torch.load_file(source.module_dir / "adapter_model.safetensors")
    assert weights["prefix_task_cols"].shape[0] == 2  # one prompt matrix per task

    def eval_losses(result):
        return [(h["step"], h["eval_loss"]) for h in result.log_history if "eval_loss" in h]

    target_method = {"name": "multitask_prompt", "init": "average", "init_from": "t/mpt-source"}
    target = train(config("target", target_method, ["target"], 8, 2))
    scratch = train(config("scratch", {"name": "prompt"}, ["target"], 8, 2))
    goal = eval_losses(scratch)[-1]
    reached = next(step for step, loss in eval_losses(target) if loss <= goal[1])
    assert reached < goal[0], (eval_losses(target), eval_losses(scratch))

    # the target module stands alone (no path to the source), records the source as its parent,
    # reloads in plain PEFT and serves in the engine with PEFT's logits
    adapter_config = json.loads((target.module_dir / "adapter_config.json").read_text())
    assert adapter_config["prompt_tuning_init"] == "RANDOM" and adapter_config["prompt_tuning_init_state_dict_path"] is None
    # started from the source, not trained on top of it: no parent for the server to apply
    assert target.manifest.parent is None and target.manifest.config["method"]["init_from"] == "t/mpt-source@1"
    assert target.manifest.params["num_tasks"] == 1
    ids = torch.tensor([[1, 17, 33, 60, 101, 7, 45, 2]])
    with torch.no_grad():
        expected = target.model.eval()(input_ids=ids, task_ids=torch.tensor([0])).logits.float()
        loaded = PeftModel.from_pretrained(_load_base(tiny_llama_path, "sft", "none"), target.module_dir).eval()
        actual = loaded(input_ids=ids, task_ids=torch.tensor([0])).logits.float()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    store = LocalStore(tmp_path / "serve-reg", cache_dir=tmp_path / "cache")
    store.push(target.module_dir, "t/mpt-target")
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    try:
        served = engine.logits([(ids[0].tolist(), "t/mpt-target")])
    finally:
        engine.close()
    torch.testing.assert_close(served[0], actual[0, -ids.shape[1] :], atol=1e-4, rtol=0)


SELECTIVE_CASES = [
    ({"layers": [0]}, "sft", "none"),
    ({"layers": [1], "patterns": ["*.embed_tokens.weight"]}, "clm", "none"),
    ({"bitfit": True, "layernorm": True}, "mlm", "none"),  # BERT has biases (Llama has none)
]


@pytest.mark.parametrize(
    ("selectors", "objective", "quantization"),
    SELECTIVE_CASES,
    ids=["block-sft", "block-and-embeddings-clm", "bitfit-layernorm-mlm"],
)
def test_selective_fine_tuning_stores_only_the_trained_tensors(
    selectors, objective, quantization, tiny_llama_path, tiny_bert_path, tmp_path
):
    from safetensors.torch import load_file

    from tunehub.trainer.methods.selective import apply_selective

    base = tiny_bert_path if objective == "mlm" else tiny_llama_path
    config = run_config(
        base, tmp_path / "run", "selective", objective, quantization, selectors, packing=False, learning_rate=1e-2
    )
    result = train(config)

    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    manifest = verify_module(result.module_dir).manifest
    assert manifest.kind.value == "selective" and not manifest.peft_loadable
    stored = load_file(str(result.module_dir / "adapter_model.safetensors"))
    trained = result.model.eval()
    requires_grad = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert set(stored) == requires_grad and manifest.params["tensors"] == len(stored)
    base_model = _load_base(base, objective, quantization).eval()
    base_params = dict(base_model.named_parameters())
    assert all(not torch.equal(stored[n].float(), base_params[n].float()) for n in stored), "every stored tensor was trained"

    ids = torch.tensor([[1, 17, 33, 60, 101, 7, 45, 2]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.float()
        actual = apply_selective(base_model, result.module_dir)(input_ids=ids).logits.float()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_full_fine_tuning_writes_a_whole_model_that_serves_as_a_base(tiny_llama_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunehub.registry.local import LocalStore
    from tunehub.server.serve import resolve_base

    config = run_config(tiny_llama_path, tmp_path / "run", "full", "sft", "none", {"max_shard_size": "100KB"}, learning_rate=1e-3)
    result = train(config)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    manifest = verify_module(result.module_dir).manifest
    assert manifest.kind.value == "full" and len(manifest.params["shards"]) > 1  # sharded at 100 KB
    config_json = json.loads((result.module_dir / "config.json").read_text())
    assert str(tmp_path) not in json.dumps(config_json)  # no local path leaves the machine

    ids = torch.tensor([[1, 17, 33, 60, 101, 7, 45, 2]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits.float()
        actual = AutoModelForCausalLM.from_pretrained(result.module_dir).eval()(input_ids=ids).logits.float()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)

    # pushed, it serves as the base: --base takes the registry reference
    registry = tmp_path / "reg"
    LocalStore(registry).push(result.module_dir, "acme/full-reverse")
    folder = Path(resolve_base("acme/full-reverse@1", registry=f"file://{registry}"))
    assert json.loads((folder / "manifest.json").read_text())["kind"] == "full"
    assert (folder / "config.json").is_file()
    with pytest.raises(Exception, match="is a lora module"):
        store = LocalStore(registry)
        lora = train(run_config(tiny_llama_path, tmp_path / "lora", "lora", "sft", "none", max_steps=2)).module_dir
        store.push(lora, "acme/lora")
        resolve_base("acme/lora@1", registry=f"file://{registry}")
