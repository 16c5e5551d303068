"""tunehub.trainer.base: synthetic corpus, presets and deterministic tiny base models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from tunehub.errors import ConfigError
from tunehub.registry.fingerprint import base_fingerprint, safetensors_shapes
from tunehub.trainer.base import PRESETS, PROVENANCE_FILE, build_base, model_config, synthetic_corpus


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def count_params(preset: str) -> tuple[int, int]:
    """(all parameters, parameters in nn.Linear layers) of a preset, built on the meta device."""
    from transformers import BertForMaskedLM, LlamaForCausalLM

    config = model_config(preset)
    cls = LlamaForCausalLM if PRESETS[preset].architecture == "llama" else BertForMaskedLM
    with torch.device("meta"):
        model = cls(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    linear = sum(
        sum(p.numel() for p in module.parameters(recurse=False))
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
    )
    return total, linear


# --- corpus and presets ---------------------------------------------------------------------------


def test_synthetic_corpus_is_deterministic_and_varied():
    lines = synthetic_corpus(500, seed=0)
    assert len(lines) == 500
    assert lines == synthetic_corpus(500, seed=0)
    assert lines != synthetic_corpus(500, seed=1)
    assert synthetic_corpus(0) == []
    text = " ".join(lines)
    words = {word.strip('.,;:!?"').lower() for word in text.split()}
    assert len(words) > 300  # enough distinct words for a few hundred BPE merges
    for mark in '.,?!;:"%':
        assert mark in text
    assert any(char.isdigit() for char in text)
    assert all(line and line[0].isupper() or line[0] == '"' for line in lines)


def test_synthetic_corpus_refuses_negative_length():
    with pytest.raises(ConfigError):
        synthetic_corpus(-1)


def test_presets_have_the_documented_shapes():
    assert {"tiny", "tiny-bert", "small", "bench-100m", "bench-300m"} <= set(PRESETS)
    tiny = PRESETS["tiny"]
    assert (tiny.architecture, tiny.num_layers, tiny.hidden_size, tiny.num_heads, tiny.num_kv_heads) == (
        "llama",
        2,
        64,
        4,
        2,
    )
    assert (tiny.intermediate_size, tiny.vocab_size, tiny.max_position_embeddings) == (128, 512, 512)
    bert = PRESETS["tiny-bert"]
    assert (bert.architecture, bert.num_layers, bert.hidden_size, bert.num_heads, bert.intermediate_size) == (
        "bert",
        2,
        64,
        4,
        128,
    )
    small = PRESETS["small"]
    assert (small.num_layers, small.hidden_size, small.num_heads, small.num_kv_heads) == (4, 256, 8, 4)
    assert (small.intermediate_size, small.vocab_size, small.max_position_embeddings) == (688, 2048, 1024)
    bench = PRESETS["bench-100m"]
    assert (bench.hidden_size, bench.num_layers, bench.num_heads, bench.intermediate_size) == (768, 8, 12, 2048)
    assert bench.vocab_size == 32000 and bench.tokenizer_vocab < bench.vocab_size
    for preset in PRESETS.values():
        assert preset.tokenizer_vocab <= preset.vocab_size
        assert preset.hidden_size % preset.num_heads == 0 and preset.num_heads % preset.num_kv_heads == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.hidden_size = 128  # type: ignore[misc]


def test_bench_300m_has_300m_parameters_mostly_linear():
    total, linear = count_params("bench-300m")
    assert total >= 300_000_000
    assert linear / total >= 0.85


def test_bench_100m_is_about_100m_parameters():
    total, _ = count_params("bench-100m")
    assert 90_000_000 <= total <= 120_000_000


# --- the tiny Llama ---------------------------------------------------------------------------------


def test_tiny_llama_folder(tiny_llama_path):
    names = {p.name for p in tiny_llama_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", PROVENANCE_FILE} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    assert json.loads((tiny_llama_path / PROVENANCE_FILE).read_text())["preset"] == "tiny"
    assert json.loads((tiny_llama_path / PROVENANCE_FILE).read_text())["seed"] == 0
    config = json.loads((tiny_llama_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (2, 64, 2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}) == 4
    assert safetensors_shapes(tiny_llama_path / "model.safetensors")["model.embed_tokens.weight"] == [512, 64]


def test_tiny_llama_tokenizer_round_trips(tiny_llama_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert len(tokenizer) == 512
    text = "The farmer sold 12.50 kg of apples in Zürich: ✓ done!\n\tNext line."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # trained merges: common corpus words take far fewer tokens than bytes
    assert len(tokenizer("the farmer repaired the bicycle").input_ids) < len("the farmer repaired the bicycle") / 2


def test_tiny_llama_chat_template(tiny_llama_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the map?"},
        {"role": "assistant", "content": "On the table."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<s><|system|>\nBe brief.</s>\n<|user|>\nWhere is the map?</s>\n")
    assert text.endswith("<|assistant|>\nOn the table.</s>\n")
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert not tokenizer.apply_chat_template(messages[:2], tokenize=False).endswith("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="roles"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_tiny_llama_generates(tiny_llama_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the river."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        again = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1] :]
    assert new.shape == (6,)
    assert torch.equal(out, again)
    assert isinstance(tokenizer.decode(new), str)


# --- the tiny BERT ----------------------------------------------------------------------------------


def test_tiny_bert_masked_lm(tiny_bert_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_path).eval()
    assert type(model).__name__ == "BertForMaskedLM"
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token, tokenizer.pad_token) == (
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[PAD]",
    )
    encoded = tokenizer(f"The farmer sold the {tokenizer.mask_token} yesterday.", return_tensors="pt")
    ids = encoded["input_ids"][0].tolist()
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.mask_token_id in ids
    pair = tokenizer("one", "two").input_ids
    assert pair.count(tokenizer.sep_token_id) == 2
    with torch.no_grad():
        logits = model(**encoded).logits
    assert logits.shape == (1, len(ids), PRESETS["tiny-bert"].vocab_size)
    assert torch.isfinite(logits).all()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    text = "the old captain repaired a wooden bicycle near the station."
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids


# --- determinism and refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("preset,fixture", [("tiny", "tiny_llama_path"), ("tiny-bert", "tiny_bert_path")])
def test_build_is_deterministic(preset, fixture, request, tmp_path):
    first = request.getfixturevalue(fixture)
    again = build_base(tmp_path / "again", preset, seed=0)
    other = build_base(tmp_path / "other", preset, seed=1)
    assert sha256(again / "model.safetensors") == sha256(first / "model.safetensors")
    assert sha256(again / "tokenizer.json") == sha256(first / "tokenizer.json")
    assert base_fingerprint(again) == base_fingerprint(first)
    # another seed: other weights and another tokenizer corpus, so another base (fingerprint)
    assert sha256(other / "model.safetensors") != sha256(first / "model.safetensors")
    assert sha256(other / "tokenizer.json") != sha256(first / "tokenizer.json")
    assert base_fingerprint(other) != base_fingerprint(first)


def test_bfloat16_copy_shares_the_fingerprint(tiny_llama_path, tmp_path):
    half = build_base(tmp_path / "bf16", "tiny", dtype="bfloat16")
    weights = load_file(half / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert base_fingerprint(half) == base_fingerprint(tiny_llama_path)


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_base(tmp_path / "b", "tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    target = tmp_path / "base"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        build_base(target, "tiny")
    assert (target / "keep.txt").read_text() == "user data"
    assert not (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no staging folder left behind

    build_base(target, "tiny", overwrite=True)
    assert (target / "config.json").is_file()
    assert not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_builds_into_an_existing_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert (build_base(tmp_path / "empty", "tiny") / "model.safetensors").is_file()


def test_refuses_a_file_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError):
        build_base(tmp_path / "file", "tiny", overwrite=True)


def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_base(tmp_path / "x", "huge")
    for name in ("tiny", "tiny-bert", "small", "bench-300m"):
        assert name in str(info.value)
    assert not (tmp_path / "x").exists()


def test_unknown_dtype(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        build_base(tmp_path / "x", "tiny", dtype="float8")
