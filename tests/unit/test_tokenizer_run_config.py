"""The run YAML's ``tokenizer: {extend: ...}`` section: what it takes and what it refuses, before
any model loads."""

from pathlib import Path

import pytest

from tunehub.errors import ConfigError
from tunehub.trainer.config import load_run_config, validate_run_config
from tunehub.trainer.methods import get_method, method_table

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tokenizer-lora-clm.yaml"


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (tmp_path / "domain.txt").write_text("glomerulonephritis and hyperkalaemia\n")
    return folder


def _raw(base, method=None, extend=None, **sections):
    corpus = str(Path(base).parent / "domain.txt")
    raw = {
        "base": {"path": str(base)},
        "method": method or {"name": "lora", "r": 4},
        "objective": {"name": "clm"},
        "data": {"train": corpus},
        "tokenizer": {"extend": {"corpus": corpus, "max_new": 10, **(extend or {})}},
        "output": {"dir": "out"},
    }
    raw.update(sections)
    return raw


def test_a_tokenizer_section_resolves_with_its_defaults(base):
    config = validate_run_config(_raw(base))
    assert config.resolved()["tokenizer"]["extend"] == {
        "corpus": [str(base.parent / "domain.txt")],
        "max_new": 10,
        "heldout": None,
        "init": "subword-mean",
        "min_frequency": 2,
    }
    assert validate_run_config(_raw(base, method={"name": "tokenizer"})).method.name == "tokenizer"
    assert validate_run_config(_raw(base, method={"name": "dora"})).tokenizer is not None
    without = _raw(base)
    del without["tokenizer"]
    assert validate_run_config(without).tokenizer is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"extend": {"max_new": 0}}, "tokenizer.extend.max_new: Input should be greater than 0"),
        ({"extend": {"init": "random"}}, "tokenizer.extend.init: Input should be 'subword-mean' or 'mean'"),
        ({"extend": {"corpus": "/nowhere/domain.txt"}}, "tokenizer.extend: /nowhere/domain.txt does not exist"),
        ({"extend": {"heldout": "/nowhere/held.txt"}}, "tokenizer.extend: /nowhere/held.txt does not exist"),
        ({"extend": {"max_new": 5, "colour": "red"}}, "tokenizer.extend.colour: unknown key"),
        (
            {"method": {"name": "ia3"}},
            "tokenizer: method ia3 cannot train new tokens' rows beside its adapter; use one of dora, lora, tokenizer",
        ),
        (
            {"objective": {"name": "mlm"}},
            "tokenizer: extending the vocabulary trains a causal LM's new rows (objective clm or sft), not mlm",
        ),
        (
            {"init": {"parent": "domain-lora@1"}},
            "tokenizer: a run that extends the vocabulary cannot train on an init.parent chain",
        ),
        ({"training": {"distributed": "fsdp"}}, "tokenizer: PEFT's trainable tokens do not train on a base FSDP shards"),
    ],
)
def test_bad_tokenizer_sections_are_refused_with_what_is_wrong(base, change, problem):
    raw = _raw(base, method=change.get("method"), extend=change.get("extend"))
    for key in ("objective", "init", "training"):
        if key in change:
            raw[key] = change[key]
    with pytest.raises(ConfigError) as refused:
        validate_run_config(raw)
    assert problem in str(refused.value)


def test_the_tokenizer_method_needs_the_section(base):
    raw = _raw(base, method={"name": "tokenizer"})
    del raw["tokenizer"]
    with pytest.raises(ConfigError, match=r"method: tokenizer trains the rows of new tokens: add tokenizer: \{extend"):
        validate_run_config(raw)


def test_the_method_is_registered_and_listed():
    method = get_method("tokenizer")
    assert method.kind.value == "tokenizer" and method.trainable_tokens
    assert {row["method"]: row["kind"] for row in method_table()}["tokenizer"] == "tokenizer"
    assert {name for name in ("lora", "dora", "ia3", "adalora") if get_method(name).trainable_tokens} == {"lora", "dora"}


def test_the_example_anchors_its_corpus_to_its_folder(tiny_llama_path):
    config = load_run_config(EXAMPLE, [f"base.path={tiny_llama_path}"])
    assert config.tokenizer is not None
    assert config.tokenizer.extend.corpus == [str(EXAMPLE.parent / "data" / "pharmacology.txt")]
