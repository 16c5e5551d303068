"""Tokenizer modules (#18 item 3): a run that extends the vocabulary trains the new rows (with a
LoRA component or alone) and writes the module layout the engine reads; plain PEFT loads it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunehub.errors import DataError, IncompatibleBase
from tunehub.registry.local import LocalStore
from tunehub.registry.module import check_module_for_push
from tunehub.trainer.config import validate_run_config
from tunehub.trainer.run import train
from tunehub.trainer.tokenizer_module import NEW_ROWS_FILE, load_tokenizer_module
from tunehub.trainer.tokenizers import init_new_rows, load_extension_report

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
CORPUS = DATA / "pharmacology.txt"
TEXT = "Dose adjustment of etoramupril is needed in esophagopathy; tamsuxizumab needs none."


def _raw(base, out, method, max_new=40, corpus=CORPUS):
    return {
        "base": {"path": str(base)},
        "method": method,
        "objective": {"name": "clm"},
        "data": {"train": str(CORPUS), "max_length": 64},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 2e-2, "logging_steps": 2},
        "tokenizer": {"extend": {"corpus": str(corpus), "max_new": max_new}},
        "output": {"dir": str(out), "task": "pharma"},
    }


def _variant_base(src: Path, dst: Path, *, rows: int, tied: bool) -> Path:
    """``src``'s tokenizer on a model of ``rows`` embedding rows (more than the tokenizer's tokens:
    padding rows), its head tied to the embedding or not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.vocab_size, config.tie_word_embeddings = rows, tied
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def lora_run(tiny_llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok-lora")
    return train(validate_run_config(_raw(tiny_llama_path, out, {"name": "lora", "r": 4, "dropout": 0.0})))


@pytest.fixture(scope="module")
def padded_tied_base(tiny_llama_path, tmp_path_factory):
    return _variant_base(tiny_llama_path, tmp_path_factory.mktemp("bases") / "tied-padded", rows=576, tied=True)


@pytest.fixture(scope="module")
def rows_run(padded_tied_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok-rows")
    return train(validate_run_config(_raw(padded_tied_base, out, {"name": "tokenizer"})))


def _logits(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_run_writes_the_module_layout(lora_run, tiny_llama_path):
    from transformers import AutoTokenizer

    module = lora_run.module_dir
    manifest = json.loads((module / "manifest.json").read_text())
    files = {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer_extension.json",
        NEW_ROWS_FILE,
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert files <= set(manifest["files"]) and "chat_template.jinja" not in manifest["files"]
    report = load_extension_report(module)
    k = len(report.added)
    assert 0 < k <= 40 and report.base_vocab_size == 512
    assert [t.id for t in report.added] == list(range(512, 512 + k))
    assert manifest["kind"] == "tokenizer"
    assert manifest["params"] == {"base_vocab": 512, "added": k, "tied_head": False, "init": "subword-mean"}
    [component] = manifest["components"]
    assert component["kind"] == "lora" and component["params"]["r"] == 4
    assert component["params"]["trainable_token_indices"] is None
    adapter_config = json.loads((module / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["trainable_token_indices"] is None
    # the manifest's tokenizer is the extended one; its base is the base's fingerprint
    tokenizer = AutoTokenizer.from_pretrained(module)
    assert len(tokenizer) == 512 + k and manifest["tokenizer"]["vocab_size"] == 512 + k
    assert manifest["tokenizer"]["added_tokens"] == [t.token for t in report.added]
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_llama_path).chat_template is not None
    assert tokenizer.decode(tokenizer(TEXT, add_special_tokens=False)["input_ids"]) == TEXT
    rows = load_file(str(module / NEW_ROWS_FILE))
    assert {name: (tuple(t.shape), t.dtype) for name, t in rows.items()} == {
        "embed_tokens": ((k, 64), torch.float32),
        "lm_head": ((k, 64), torch.float32),
    }


def test_module_is_small_validates_and_pushes(lora_run, tmp_path):
    module = lora_run.module_dir
    for weights in module.glob("*.safetensors"):
        for name, tensor in load_file(str(weights)).items():
            assert 512 not in tensor.shape and tensor.shape[0] < 512, f"{weights.name}:{name} is vocabulary-sized"
    assert "trainable_tokens" not in " ".join(load_file(str(module / "adapter_model.safetensors")))
    check_module_for_push(module)
    pushed = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache").push(module, "pharma-vocab")
    assert pushed.ref == "pharma-vocab@1"


def test_plain_peft_recipe_gives_the_trained_logits(lora_run, tiny_llama_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = lora_run.module_dir
    trained = lora_run.model.eval()
    tokenizer = AutoTokenizer.from_pretrained(module)
    # the README's recipe, line for line
    base_vocab = json.loads((module / "manifest.json").read_text())["params"]["base_vocab"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings), mean_resizing=False)
    rows = load_file(str(module / "new_rows.safetensors"))
    with torch.no_grad():
        model.get_input_embeddings().weight[base_vocab : len(tokenizer)] = rows["embed_tokens"]
        model.get_output_embeddings().weight[base_vocab : len(tokenizer)] = rows["lm_head"]
    model = PeftModel.from_pretrained(model, module).eval()

    assert any(i >= base_vocab for i in tokenizer(TEXT)["input_ids"]), "the text must use new tokens"
    expected = _logits(trained, tokenizer)
    torch.testing.assert_close(_logits(model, tokenizer), expected, rtol=1e-5, atol=1e-5)
    loaded, _ = load_tokenizer_module(module, tiny_llama_path)
    torch.testing.assert_close(_logits(loaded, tokenizer), expected, rtol=1e-5, atol=1e-5)


def test_training_moves_the_new_rows_and_no_base_row(lora_run, tiny_llama_path):
    from transformers import AutoModelForCausalLM

    report = load_extension_report(lora_run.module_dir)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    base_embed = fresh.get_input_embeddings().weight.detach().clone()
    base_head = fresh.get_output_embeddings().weight.detach().clone()
    init_new_rows(fresh, report)
    k = len(report.added)
    rows = load_file(str(lora_run.module_dir / NEW_ROWS_FILE))
    for name, start in (("embed_tokens", fresh.get_input_embeddings()), ("lm_head", fresh.get_output_embeddings())):
        initial = start.weight[512 : 512 + k].detach()
        moved = (rows[name] - initial).abs().amax(dim=1)
        assert (moved > 1e-4).float().mean() > 0.5, f"{name}: most new rows must have been trained"
    frozen = {
        name: param
        for name, param in lora_run.model.named_parameters()
        if ("embed_tokens" in name or "lm_head" in name) and "trainable_tokens" not in name
    }
    assert frozen and not any(p.requires_grad for p in frozen.values())
    for name, param in frozen.items():
        base = base_embed if "embed_tokens" in name else base_head
        assert torch.equal(param[:512].detach(), base), f"{name}: a base row changed"


def test_tokenizer_method_on_a_tied_padded_base(rows_run, padded_tied_base):
    from transformers import AutoTokenizer

    module = rows_run.module_dir
    manifest = json.loads((module / "manifest.json").read_text())
    k = manifest["params"]["added"]
    assert manifest["params"] == {"base_vocab": 512, "added": k, "tied_head": True, "init": "subword-mean"}
    assert manifest["components"] == [] and not (module / "adapter_config.json").exists()
    rows = load_file(str(module / NEW_ROWS_FILE))
    assert list(rows) == ["embed_tokens"] and tuple(rows["embed_tokens"].shape) == (k, 64)
    # only the new rows trained: nothing else is trainable
    trainable = [name for name, p in rows_run.model.named_parameters() if p.requires_grad]
    assert trainable and all("trainable_tokens_delta" in name for name in trainable)
    # padding rows: the new ids take rows 512.. of the 576 the base has, which it keeps (never shrunk to 512 + k)
    assert rows_run.model.get_base_model().get_input_embeddings().weight.shape[0] == 576
    loaded, tokenizer = load_tokenizer_module(module, padded_tied_base)
    assert loaded.get_input_embeddings().weight.shape[0] == 576 and len(tokenizer) == 512 + k
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(rows_run.model.eval(), tokenizer), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(module).chat_template is not None


def test_a_tokenizer_module_of_another_base_is_refused(rows_run, tiny_llama_path):
    with pytest.raises(IncompatibleBase, match="extends the tokenizer of base tied-padded"):
        load_tokenizer_module(rows_run.module_dir, tiny_llama_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\n  \n", "is empty: it has no line with text"), (b"\x00\x01binary", "is a binary file")],
)
def test_a_bad_corpus_is_refused_before_any_model_loads(tiny_llama_path, tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    config = validate_run_config(_raw(tiny_llama_path, tmp_path / "out", {"name": "tokenizer"}, corpus=corpus))
    with pytest.raises(DataError, match=message):
        train(config)
    assert not (tmp_path / "out" / "module").exists()
