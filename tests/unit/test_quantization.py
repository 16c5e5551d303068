"""Training and serving quantize the base with one config builder (tunehub.quantization)."""

import json

import pytest

from tunehub.errors import ConfigError
from tunehub.quantization import bnb_config


class _Captured(Exception):
    """Raised by the stand-in loader: the config was seen, no model needs to load."""


@pytest.fixture
def fake_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return base


def _capture(monkeypatch, module):
    seen = {}

    def loader(model_cls, path, **kwargs):
        seen.update(kwargs)
        raise _Captured

    monkeypatch.setattr(module, "load_quantized", loader)
    return seen


def _training_config(base, tmp_path, quantization):
    from tunehub.trainer.config import validate_run_config

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    return validate_run_config(
        {
            "base": {"path": str(base), "quantization": quantization},
            "method": {"name": "lora", "r": 4},
            "objective": {"name": "sft"},
            "data": {"train": str(data)},
            "output": {"dir": str(tmp_path / "out")},
        }
    )


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_training_and_serving_load_the_base_with_equal_configs(quantization, fake_base, tmp_path, monkeypatch):
    import tunehub.server.engine.base as serving
    import tunehub.trainer.run as training

    trained = _capture(monkeypatch, training)
    served = _capture(monkeypatch, serving)
    with pytest.raises(_Captured):
        training.load_base_model(fake_base, _training_config(fake_base, tmp_path, quantization))
    with pytest.raises(_Captured):
        serving.load_base(fake_base, quantization=quantization, device="cpu")
    train_config, serve_config = trained["quantization_config"], served["quantization_config"]
    assert type(train_config) is type(serve_config)
    assert train_config.to_dict() == serve_config.to_dict()
    assert train_config.to_dict() == bnb_config(quantization, "auto", "cpu").to_dict()
    if quantization == "nf4":
        assert train_config.load_in_4bit and train_config.bnb_4bit_quant_type == "nf4"
        assert train_config.bnb_4bit_use_double_quant
    else:
        assert train_config.load_in_8bit and not train_config.load_in_4bit


def test_no_quantization_is_no_config_and_an_unknown_one_is_refused():
    assert bnb_config("none") is None
    with pytest.raises(ConfigError, match="nf4, int8, none"):
        bnb_config("fp8")


def test_a_loaded_4bit_base_still_dequantizes_right_after_a_forward(tiny_llama_path):
    """bitsandbytes repacks 4-bit weights for its CPU kernel on the first eval forward where the CPU
    has AVX512-BF16, after which dequantizing (PEFT's DoRA norms, merges, the engine's DoRA gains)
    read the wrong bytes; tunehub's loads keep the dequantizable layout. (On a CPU without
    AVX512-BF16 bitsandbytes never repacks, and this holds either way.)"""
    import torch
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM

    from tunehub.devices import load_quantized

    model = load_quantized(AutoModelForCausalLM, tiny_llama_path, quantization_config=bnb_config("nf4"), device_map={"": "cpu"})
    model.eval()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.support_avx512bf16_for_cpu is False
    before = dequantize_module_weight(layer).float().clone()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 13]]))
    after = dequantize_module_weight(layer).float()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
