"""tunehub.trainer.export and tunehub.trainer.testing: PEFT models -> verified module folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from enum import Enum
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import tunehub
from tunehub.errors import ConfigError, IntegrityError
from tunehub.registry.fingerprint import base_fingerprint, tokenizer_fingerprint
from tunehub.registry.manifest import BaseInfo, Manifest, ModuleKind
from tunehub.registry.module import verify_module
from tunehub.trainer.export import REGENERATED_KEYS, base_info, peft_params, save_peft_module, tokenizer_info
from tunehub.trainer.testing import load_base, make_lora_model, make_lora_module

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 250, 7, 311, 64], [8, 9, 10, 11, 300, 400, 500, 6]])


def logits(model, input_ids=INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lora_on(base_path, adapter_name: str = "default", **config) -> PeftModel:
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **config}
    return get_peft_model(load_base(base_path), LoraConfig(**config), adapter_name=adapter_name)


# --- peft_params --------------------------------------------------------------------------------------


class Color(Enum):
    RED = "red"


@dataclasses.dataclass
class Inner:
    depth: int
    names: frozenset


def test_peft_params_is_json_safe_and_drops_regenerated_keys():
    config = LoraConfig(r=4, lora_alpha=8, target_modules={"v_proj", "q_proj", "k_proj"}, task_type="CAUSAL_LM")
    params = peft_params(config)
    assert not REGENERATED_KEYS & set(params)
    assert params["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    assert params["r"] == 4 and params["lora_alpha"] == 8
    assert json.loads(json.dumps(params)) == params


def test_peft_params_converts_sets_enums_and_dataclasses():
    params = peft_params(
        {
            "peft_type": "LORA",
            "inference_mode": False,
            "ids": {3, 1, 2},
            "color": Color.RED,
            "inner": Inner(depth=2, names=frozenset({"b", "a"})),
            "pair": (1, Path("x/y")),
            "dtype": torch.bfloat16,
        }
    )
    assert params == {
        "ids": [1, 2, 3],
        "color": "red",
        "inner": {"depth": 2, "names": ["a", "b"]},
        "pair": [1, "x/y"],
        "dtype": "bfloat16",
    }


@pytest.mark.parametrize("bad", [object(), float("nan")])
def test_peft_params_refuses_what_json_cannot_hold(bad):
    with pytest.raises(ConfigError, match="weird"):
        peft_params({"weird": bad})


def test_manifest_reproduces_the_config_peft_writes(tiny_llama_path, tmp_path):
    model = lora_on(tiny_llama_path, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)
    model.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    manifest = save_peft_module(model, tmp_path / "ours", base_path=tiny_llama_path, kind="lora")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours == manifest.adapter_config()
    for config in (theirs, ours):
        config["target_modules"] = sorted(config["target_modules"])
    # PEFT records the folder it was loaded from; tunehub the base's name, never a local path
    assert theirs.pop("base_model_name_or_path") == str(tiny_llama_path)
    assert ours.pop("base_model_name_or_path") == tiny_llama_path.name
    assert ours == theirs


# --- base_info and tokenizer_info --------------------------------------------------------------------


def test_base_info(tiny_llama_path, tiny_bert_path):
    info = base_info(tiny_llama_path, "nf4")
    assert isinstance(info, BaseInfo)
    assert info.fingerprint == base_fingerprint(tiny_llama_path)
    assert (info.architecture, info.vocab_size, info.quantization) == ("LlamaForCausalLM", 512, "nf4")
    assert info.model_id == tiny_llama_path.name and info.revision is None  # the name, never the path
    bert = base_info(tiny_bert_path)
    assert (bert.architecture, bert.quantization) == ("BertForMaskedLM", "none")
    assert bert.fingerprint != info.fingerprint
    named = base_info(tiny_llama_path, model_id="org/tiny", revision="abc123")
    assert (named.model_id, named.revision, named.fingerprint) == ("org/tiny", "abc123", info.fingerprint)


def test_base_info_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        base_info(tmp_path)


def test_tokenizer_info(tiny_llama_path, tiny_bert_path, tmp_path):
    info = tokenizer_info(tiny_llama_path)
    assert info is not None
    assert (info.fingerprint, info.vocab_size) == tokenizer_fingerprint(tiny_llama_path)
    assert info.vocab_size == 512
    assert info.added_tokens == []  # special tokens are not domain additions
    assert tokenizer_info(tiny_bert_path).fingerprint != info.fingerprint
    assert tokenizer_info(tmp_path) is None


# --- save_peft_module ------------------------------------------------------------------------------


def test_make_lora_module_verifies_with_the_right_manifest(tiny_llama_path, tmp_path):
    folder = make_lora_module(tiny_llama_path, tmp_path / "m", r=4, alpha=8, seed=0, task="qa")
    module = verify_module(folder)
    manifest = module.manifest
    assert manifest.kind is ModuleKind.LORA
    assert manifest.base.fingerprint == base_fingerprint(tiny_llama_path)
    assert manifest.base.architecture == "LlamaForCausalLM"
    assert manifest.tokenizer.fingerprint == tokenizer_fingerprint(tiny_llama_path)[0]
    assert (manifest.task, manifest.task_type) == ("qa", "CAUSAL_LM")
    assert manifest.params["r"] == 4 and manifest.params["lora_alpha"] == 8
    assert manifest.params["use_dora"] is False
    assert set(manifest.library_versions) == {"torch", "transformers", "peft", "tunehub"}
    assert manifest.library_versions["tunehub"] == tunehub.__version__
    assert set(manifest.files) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert Manifest.read(folder) == manifest
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "tunehub" in card
    # the manifest covers the weights: tampering is detected
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(IntegrityError):
        verify_module(folder)


def test_peft_loads_the_module_with_the_same_logits(tiny_llama_path, tmp_path):
    in_memory = make_lora_model(tiny_llama_path, seed=3)
    folder = make_lora_module(tiny_llama_path, tmp_path / "m", seed=3)
    loaded = PeftModel.from_pretrained(load_base(tiny_llama_path), folder).eval()
    expected = logits(in_memory)
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
    # and the module does something: the base alone answers differently
    assert (logits(load_base(tiny_llama_path)) - expected).abs().max() > 1e-2


def test_seeds_give_different_modules(lora_module):
    first, same, other = lora_module(seed=0), lora_module(seed=0), lora_module(seed=1)
    assert len({first, same, other}) == 3
    assert sha256(first / "adapter_model.safetensors") == sha256(same / "adapter_model.safetensors")
    assert sha256(first / "adapter_model.safetensors") != sha256(other / "adapter_model.safetensors")
    verify_module(other)


def test_lora_module_fixture_rank(lora_module):
    folder = lora_module(r=8)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8


def test_dora_module(tiny_llama_path, lora_module):
    folder = lora_module(kind="dora")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    assert verify_module(folder).manifest.kind is ModuleKind.DORA
    loaded = PeftModel.from_pretrained(load_base(tiny_llama_path), folder).eval()
    assert any("lora_magnitude_vector" in name for name, _ in loaded.named_parameters())
    in_memory = make_lora_model(tiny_llama_path, seed=0, kind="dora")
    assert torch.allclose(logits(loaded), logits(in_memory), atol=1e-5)


def test_bert_module_loads_with_peft(tiny_bert_path, tmp_path):
    in_memory = make_lora_model(tiny_bert_path, seed=2)
    folder = make_lora_module(tiny_bert_path, tmp_path / "m", seed=2)
    manifest = verify_module(folder).manifest
    assert manifest.base.architecture == "BertForMaskedLM"
    loaded = PeftModel.from_pretrained(load_base(tiny_bert_path), folder).eval()
    expected = logits(in_memory)
    assert expected.shape == (2, INPUT_IDS.shape[1], 512)
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
    assert (logits(load_base(tiny_bert_path)) - expected).abs().max() > 1e-2


def test_named_adapter_is_saved_flat(tiny_llama_path, tmp_path):
    model = lora_on(tiny_llama_path, adapter_name="task")
    save_peft_module(model, tmp_path / "m", base_path=tiny_llama_path, kind="lora")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind
    PeftModel.from_pretrained(load_base(tiny_llama_path), tmp_path / "m")


def test_records_training_facts(tiny_llama_path, tmp_path):
    model = lora_on(tiny_llama_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.json").write_text('{"loss": 1.5}')
    manifest = save_peft_module(
        model,
        tmp_path / "m",
        base_path=tiny_llama_path,
        kind=ModuleKind.LORA,
        quantization="nf4",
        objective="sft",
        task="support",
        parent="acme/uft@3",
        data={"sha256": "cd" * 32, "num_examples": 10},
        metrics={"eval_loss": 1.25},
        config={"output": Path("runs/x"), "epochs": 2},
        description="a test module",
        base_model_id="acme/tiny",
    )
    again = verify_module(tmp_path / "m").manifest
    assert again == manifest
    assert (again.base.model_id, again.base.quantization) == ("acme/tiny", "nf4")
    assert (again.objective, again.task, again.parent) == ("sft", "support", "acme/uft@3")
    assert again.data.num_examples == 10 and again.metrics == {"eval_loss": 1.25}
    assert again.config == {"output": "runs/x", "epochs": 2}
    assert "metrics.json" in again.files  # what the trainer wrote beforehand is covered too
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny"


@pytest.mark.parametrize(
    "kind,use_dora,message",
    [("dora", False, "use_dora=True"), ("lora", True, "dora"), ("prompt", False, "PROMPT_TUNING"), ("magic", False, "kinds")],
)
def test_refuses_a_kind_that_does_not_match(tiny_llama_path, tmp_path, kind, use_dora, message):
    model = lora_on(tiny_llama_path, use_dora=use_dora)
    with pytest.raises(ConfigError, match=message):
        save_peft_module(model, tmp_path / "m", base_path=tiny_llama_path, kind=kind)
    assert not (tmp_path / "m").exists()


def test_encoder_module_without_task_type_round_trips(tiny_bert_path, tmp_path):
    # PEFT has no masked-LM task type: such modules record task_type None and load as PeftModel
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForMaskedLM.from_pretrained(tiny_bert_path),
        LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False),
    ).eval()
    manifest = save_peft_module(model, tmp_path / "m", base_path=tiny_bert_path, kind="lora", objective="mlm")
    assert manifest.task_type is None
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["task_type"] is None
    loaded = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(tiny_bert_path), tmp_path / "m").eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_refuses_an_unknown_adapter_name(tiny_llama_path, tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        save_peft_module(lora_on(tiny_llama_path), tmp_path / "m", base_path=tiny_llama_path, kind="lora", adapter_name="nope")


def test_make_lora_model_refuses_other_kinds(tiny_llama_path):
    with pytest.raises(ConfigError):
        make_lora_model(tiny_llama_path, kind="prompt")
