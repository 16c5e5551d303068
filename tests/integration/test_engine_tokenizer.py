"""Tokenizer modules served per request (#18 item 4): each row reads and writes text with its
module's tokenizer, its added tokens live in an engine id range of their own (disjoint across
modules, freed on eviction), its logits are masked to the base's tokens and its own; parity with
the module loaded in plain transformers + PEFT, alone, mixed with other kinds in one batch and
composed with a task LoRA; streaming across multi-byte characters; hostile module files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunehub.errors import IncompatibleBase, InvalidModuleWeights, InvalidRequest, UnsupportedModule, VocabularyFull
from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import Manifest
from tunehub.registry.module import write_module
from tunehub.server.engine import Engine, GenerationRequest, SamplingParams, load_base
from tunehub.server.engine.engine import streamable_length
from tunehub.trainer.config import validate_run_config
from tunehub.trainer.run import train
from tunehub.trainer.tokenizer_module import load_tokenizer_module

pytestmark = pytest.mark.integration
PHARMA_CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "pharmacology.txt"
PHARMA_TEXT = "Dose adjustment of etoramupril is needed in esophagopathy; tamsuxizumab"
LEGAL_WORDS = [
    "Verhältnismäßigkeit",
    "Gerichtsstandsvereinbarung",
    "Rechtsmittelbelehrung",
    "Zuständigkeitsprüfung",
    "Bürgschaftsübernahme",
    "Schadensersatzansprüche",
    "Rückabwicklung",
    "Gewährleistungsausschluss",
]
LEGAL_TEXT = "Die Verhältnismäßigkeit der Rückabwicklung und die Zuständigkeitsprüfung"
MAX_TOKENS = 10


def _legal_corpus(path: Path) -> Path:
    lines = []
    for i in range(160):
        a, b = LEGAL_WORDS[i % len(LEGAL_WORDS)], LEGAL_WORDS[(3 * i + 1) % len(LEGAL_WORDS)]
        lines.append(f"Die {a} folgt aus der {b}, so das Gericht im Fall {i}.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _train(base: Path, out: Path, method: dict, corpus: Path, max_new: int) -> Path:
    raw = {
        "base": {"path": str(base)},
        "method": method,
        "objective": {"name": "clm"},
        "data": {"train": str(corpus), "max_length": 64},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 2e-2, "logging_steps": 2},
        "tokenizer": {"extend": {"corpus": str(corpus), "max_new": max_new}},
        "output": {"dir": str(out), "task": out.name},
    }
    return train(validate_run_config(raw)).module_dir


@pytest.fixture(scope="module")
def modules(tiny_llama_path, tmp_path_factory):
    from tunehub.trainer.testing import make_peft_module

    root = tmp_path_factory.mktemp("tok-serve")
    folders = {
        # a tokenizer module with a LoRA component, and one of new rows only (another corpus)
        "pharma": _train(tiny_llama_path, root / "pharma", {"name": "lora", "r": 4, "dropout": 0.0}, PHARMA_CORPUS, 40),
        "legal": _train(tiny_llama_path, root / "legal", {"name": "tokenizer"}, _legal_corpus(root / "legal.txt"), 20),
        "task": make_peft_module(tiny_llama_path, root / "task", "lora", seed=3),
        "ia3": make_peft_module(tiny_llama_path, root / "ia3", "ia3", seed=4),
    }
    store = LocalStore(root / "reg", cache_dir=root / "cache")
    for name, folder in folders.items():
        store.push(folder, f"t/{name}")
    return store, folders


@pytest.fixture(scope="module")
def engine(tiny_llama_path, modules):
    engine = Engine(load_base(tiny_llama_path, quantization="none"), modules[0])
    yield engine
    engine.close()


def _reference(folder, base):
    model, tokenizer = load_tokenizer_module(folder, base)
    return model, tokenizer


def _added(folder) -> int:
    return int(Manifest.read(folder).params["added"])


def _greedy(model, ids, eos, n=MAX_TOKENS):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=eos)[0, len(ids) :].tolist()
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize(("name", "text"), [("pharma", PHARMA_TEXT), ("legal", LEGAL_TEXT)])
def test_a_tokenizer_module_alone_equals_the_module_in_transformers_and_peft(name, text, tiny_llama_path, modules, engine):
    folder = modules[1][name]
    model, tokenizer = _reference(folder, tiny_llama_path)
    ids = tokenizer(text)["input_ids"]
    assert any(i >= 512 for i in ids), "the prompt must use the module's added tokens"
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].float()
    [got] = engine.logits([(ids, f"t/{name}")])
    # the row's vocabulary: the base's 512 tokens and the module's own, nothing else
    assert got.shape == (len(ids), 512 + _added(folder))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    result = engine.generate([GenerationRequest(prompt=text, module=f"t/{name}", params=SamplingParams(max_tokens=MAX_TOKENS))])[
        0
    ]
    assert result.token_ids == _greedy(model, ids, tokenizer.eos_token_id)
    assert result.prompt_tokens == len(ids)
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.module == f"t/{name}@1"


def test_rows_of_two_tokenizer_modules_other_kinds_and_the_base_share_a_batch_and_equal_themselves_alone(modules, engine):
    requests = [
        ("pharma", dict(prompt=PHARMA_TEXT, module="t/pharma")),
        ("legal", dict(prompt=LEGAL_TEXT, module="t/legal")),
        ("base", dict(prompt=PHARMA_TEXT)),
        ("task", dict(prompt=LEGAL_TEXT, module="t/task")),
        ("ia3", dict(prompt=PHARMA_TEXT, module="t/ia3")),
        ("pharma+task", dict(prompt=PHARMA_TEXT, module="t/pharma+t/task")),
        ("legal chat", dict(messages=[{"role": "user", "content": LEGAL_TEXT}], module="t/legal")),
        (
            "pharma sampled",
            dict(prompt=PHARMA_TEXT, module="t/pharma", params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=5)),
        ),
    ]

    def request(options):
        options = dict(options)
        options.setdefault("params", SamplingParams(max_tokens=MAX_TOKENS))
        return GenerationRequest(**options)

    alone = [engine.generate([request(options)])[0] for _, options in requests]
    together = engine.generate([request(options) for _, options in requests])
    for (label, _), one, mixed in zip(requests, alone, together, strict=True):
        assert (mixed.token_ids, mixed.text) == (one.token_ids, one.text), label
    # both modules' added ids start at 512 in their own tokenizers: the engine keeps them apart
    ranges = {m["module"]: m["token_ids"] for m in engine.pool.status()["modules"] if "token_ids" in m}
    (a_first, a_last), (b_first, b_last) = ranges["t/pharma@1"], ranges["t/legal@1"]
    assert a_first >= 512 and b_first >= 512 and (a_last < b_first or b_last < a_first)
    # a row's ids are its own vocabulary's: never another module's added tokens
    sizes = {"pharma": 512 + _added(modules[1]["pharma"]), "legal": 512 + _added(modules[1]["legal"])}
    for (label, _), result in zip(requests, together, strict=True):
        limit = sizes.get(label.split()[0].split("+")[0], 512)
        assert all(0 <= t < limit for t in result.token_ids), label
    assert any(t >= 512 for t in together[0].token_ids), "the pharma row must emit its own tokens"


def test_a_tokenizer_module_composed_with_a_task_lora_equals_peft_with_both_active(tiny_llama_path, modules, engine):
    folders = modules[1]
    model, tokenizer = _reference(folders["pharma"], tiny_llama_path)
    model.load_adapter(folders["task"], adapter_name="task")
    model.base_model.set_adapter(["default", "task"])
    ids = tokenizer(PHARMA_TEXT)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].float()
    [got] = engine.logits([(ids, "t/pharma+t/task")])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    result = engine.generate([GenerationRequest(input_ids=ids, module="t/pharma+t/task", params=SamplingParams(max_tokens=4))])[0]
    assert result.module == "t/pharma@1+t/task@1"


def test_chat_messages_are_rendered_with_the_modules_tokenizer_and_template(tiny_llama_path, modules, engine):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": LEGAL_TEXT}]
    tokenizer = AutoTokenizer.from_pretrained(modules[1]["legal"])
    expected = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )
    params = SamplingParams(max_tokens=2)
    own, base = engine.generate(
        [
            GenerationRequest(messages=messages, module="t/legal", params=params),
            GenerationRequest(messages=messages, params=params),
        ]
    )
    assert own.prompt_tokens == len(expected["input_ids"])
    assert own.prompt_tokens < base.prompt_tokens, "the module's words are one token each"
    with pytest.raises(InvalidRequest, match="the chat template refused these messages"):
        engine.generate([GenerationRequest(messages=[{"role": "judge", "content": "x"}], module="t/legal")])


def test_streamed_text_equals_the_whole_decode_across_multi_byte_characters(modules, engine):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(modules[1]["legal"])
    text = "Die Verhältnismäßigkeit: 5 µg je β-Blocker, naïve Rückabwicklung"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert len(split) >= 4, "the text must hold characters whose bytes span several tokens"
    streamed = ""
    for n in range(1, len(ids) + 1):
        whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
        safe = streamable_length(whole, [], final=n == len(ids))
        assert whole[:safe].startswith(streamed)
        streamed = whole[: max(safe, len(streamed))]
        assert "\ufffd" not in streamed
    assert streamed == text and streamed.encode() == text.encode()

    # and the engine's streams: what the events carry, joined, is the result and the decode
    handles = [
        engine.submit(
            GenerationRequest(
                prompt=LEGAL_TEXT, module="t/legal", params=SamplingParams(max_tokens=16, temperature=1.0, seed=seed)
            )
        )
        for seed in range(6)
    ]
    for handle in handles:
        joined = "".join(event.text for event in handle)
        result = handle.result()
        assert joined == result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_id_ranges_are_freed_on_eviction_and_a_full_range_fails_alone(tiny_llama_path, modules):
    store, folders = modules
    pharma, legal = _added(folders["pharma"]), _added(folders["legal"])
    # room for the larger module's ids, not for both at once
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store, max_added_tokens=max(pharma, legal))
    try:
        start = engine.added_ids_start
        engine.pool.pin("t/pharma")
        assert engine.pool.status()["added_token_ids"] == {"capacity": max(pharma, legal), "used": pharma}
        refused, served = (
            engine.submit(GenerationRequest(prompt=LEGAL_TEXT, module="t/legal", params=SamplingParams(max_tokens=2))),
            engine.submit(GenerationRequest(prompt=LEGAL_TEXT, params=SamplingParams(max_tokens=2))),
        )
        with pytest.raises(VocabularyFull, match="t/legal@1 adds"):
            refused.result(timeout=60)
        assert served.result(timeout=60).completion_tokens >= 1  # the other request is served
        assert "t/pharma@1" in engine.pool and "t/legal@1" not in engine.pool
        # unpinned and unused, the pharma module makes room: evicted, its range given to legal
        engine.pool.unpin("t/pharma")
        result = engine.generate([GenerationRequest(prompt=LEGAL_TEXT, module="t/legal", params=SamplingParams(max_tokens=2))])[0]
        assert result.module == "t/legal@1"
        assert "t/pharma@1" not in engine.pool
        [entry] = [m for m in engine.pool.status()["modules"] if m["module"] == "t/legal@1"]
        assert entry["token_ids"] == [start, start + legal - 1]
        assert engine.pool.status()["added_token_ids"]["used"] == legal
    finally:
        engine.close()
    closed = Engine(load_base(tiny_llama_path, quantization="none"), store, max_added_tokens=0)
    try:
        with pytest.raises(VocabularyFull):
            closed.generate([GenerationRequest(prompt="x", module="t/legal")])
    finally:
        closed.close()


@pytest.mark.parametrize(
    ("request_options", "error", "message"),
    [
        ({"module": "t/pharma+t/legal", "prompt": "x"}, UnsupportedModule, "each bring a tokenizer; a composition takes one"),
        ({"modules": [("t/legal", 0.5)], "prompt": "x"}, UnsupportedModule, "brings a tokenizer and takes no weight"),
        ({"module": "t/legal", "input_ids": [1, 5000]}, InvalidRequest, "input_ids must be token ids from 0 to"),
        ({"input_ids": [1, 515]}, InvalidRequest, "from 0 to 511"),  # a module's id on a base row
    ],
    ids=["two-tokenizers", "weighted", "id-beyond-the-module", "module-id-on-a-base-row"],
)
def test_requests_that_cannot_be_served_fail_alone(request_options, error, message, engine):
    bad = engine.submit(GenerationRequest(params=SamplingParams(max_tokens=2), **request_options))
    good = engine.submit(GenerationRequest(prompt=PHARMA_TEXT, module="t/pharma", params=SamplingParams(max_tokens=2)))
    with pytest.raises(error, match=message):
        bad.result(timeout=60)
    assert good.result(timeout=60).module == "t/pharma@1"


def _tampered(folder: Path, out: Path, change) -> Path:
    shutil.copytree(folder, out)
    changed = change(out)
    manifest = changed if isinstance(changed, Manifest) else Manifest.read(out)
    write_module(out, manifest)  # hashed again: the store accepts it, the engine must not trust it
    return out


def _remap_a_base_token(folder: Path) -> None:
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(tokenizer))


def _rows(folder: Path, change) -> None:
    rows = load_file(str(folder / "new_rows.safetensors"))
    save_file(change(rows), str(folder / "new_rows.safetensors"))


def _as_if_tied(folder: Path) -> Manifest:
    """The module as a tied base's would be: embedding rows only."""
    _rows(folder, lambda rows: {"embed_tokens": rows["embed_tokens"]})
    manifest = Manifest.read(folder)
    return manifest.with_updates(params={**manifest.params, "tied_head": True})


def _config(folder: Path, **changes) -> None:
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda f: (f / "tokenizer.json").write_text("{not json"), InvalidModuleWeights, "is not a tokenizer"),
        (_remap_a_base_token, IncompatibleBase, "does not extend this base's"),
        (
            lambda f: _rows(f, lambda r: {**r, "embed_tokens": r["embed_tokens"][:, :8].contiguous()}),
            InvalidModuleWeights,
            "embed_tokens is",
        ),
        (_as_if_tied, IncompatibleBase, "has rows for a tied output head"),
        (
            lambda f: Manifest.read(f).with_updates(params={**Manifest.read(f).params, "added": 3}),
            InvalidModuleWeights,
            "tokens, not 512 . 3",
        ),
        (
            lambda f: Manifest.read(f).with_updates(params={**Manifest.read(f).params, "base_vocab": 500}),
            IncompatibleBase,
            "of 500 tokens",
        ),
        (lambda f: _config(f, eos_token=["</s>"]), InvalidModuleWeights, "eos_token is not a string"),
    ],
    ids=[
        "not-a-tokenizer",
        "remapped-base-token",
        "row-shape",
        "tied-rows-on-untied-base",
        "added-count",
        "base-vocab",
        "config-type",
    ],
)
def test_hostile_tokenizer_module_files_are_refused_and_fail_only_their_request(
    change, error, message, modules, engine, tmp_path
):
    store, folders = modules
    name = f"bad/{tmp_path.name[-30:].lower().replace('_', '-')}"
    store.push(_tampered(folders["legal"], tmp_path / "bad", change), name)
    bad = engine.submit(GenerationRequest(prompt=LEGAL_TEXT, module=name, params=SamplingParams(max_tokens=2)))
    good = engine.submit(GenerationRequest(prompt=LEGAL_TEXT, module="t/legal", params=SamplingParams(max_tokens=2)))
    with pytest.raises(error, match=message):
        bad.result(timeout=60)
    assert good.result(timeout=60).module == "t/legal@1"


def test_a_config_that_names_a_class_or_code_is_not_followed(modules, engine, tmp_path):
    store, folders = modules
    change = lambda f: _config(f, tokenizer_class="os.system", auto_map={"AutoTokenizer": ["evil.Tok", None]})  # noqa: E731
    store.push(_tampered(folders["legal"], tmp_path / "odd", change), "t/odd-config")
    result = engine.generate([GenerationRequest(prompt=LEGAL_TEXT, module="t/odd-config", params=SamplingParams(max_tokens=3))])[
        0
    ]
    alone = engine.generate([GenerationRequest(prompt=LEGAL_TEXT, module="t/legal", params=SamplingParams(max_tokens=3))])[0]
    assert result.token_ids == alone.token_ids


def test_on_a_tied_padded_base_the_padding_rows_are_masked_and_a_module_of_another_base_is_refused(
    tiny_llama_path, modules, tmp_path_factory
):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tied")
    config = AutoConfig.from_pretrained(tiny_llama_path)
    config.vocab_size, config.tie_word_embeddings = 576, True  # 64 padding rows past the tokenizer's 512
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny_llama_path / name, root / "base" / name)
    folder = _train(root / "base", root / "rows", {"name": "tokenizer"}, PHARMA_CORPUS, 24)
    store = LocalStore(root / "reg", cache_dir=root / "cache")
    store.push(folder, "t/rows")
    store.push(modules[1]["legal"], "t/legal")
    engine = Engine(load_base(root / "base", quantization="none"), store)
    try:
        model, tokenizer = _reference(folder, root / "base")
        ids = tokenizer(PHARMA_TEXT)["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].float()
        k = _added(folder)
        [got] = engine.logits([(ids, "t/rows")])
        # the module's view: the base's tokens and its own; rows 512+k..575 are padding, no tokens
        assert expected.shape[1] == 576 and got.shape[1] == 512 + k
        torch.testing.assert_close(got, expected[:, : 512 + k], atol=1e-4, rtol=0)
        assert engine.added_ids_start == 576
        [entry] = [m for m in engine.pool.status()["modules"] if m["module"] == "t/rows@1"]
        assert entry["token_ids"] == [576, 576 + k - 1]
        with pytest.raises(IncompatibleBase, match="was trained for base"):
            engine.generate([GenerationRequest(prompt="x", module="t/legal")])
    finally:
        engine.close()


def test_non_finite_rows_are_refused_by_the_registry_and_by_the_engine(tiny_llama_path, modules, tmp_path):
    from tunehub.errors import IntegrityError
    from tunehub.registry.module import LocalModule

    folder = _tampered(
        modules[1]["legal"],
        tmp_path / "nan",
        lambda f: _rows(f, lambda r: {**r, "lm_head": torch.full_like(r["lm_head"], float("nan"))}),
    )
    with pytest.raises(IntegrityError, match="holds NaN"):
        modules[0].push(folder, "bad/nan")

    class Folders:  # a source that hands the engine the folder as it is (the engine checks again)
        def resolve(self, ref):
            from types import SimpleNamespace

            return SimpleNamespace(repo="bad/nan", version=1, ref="bad/nan@1")

        def pull(self, ref) -> LocalModule:
            return LocalModule(path=folder, manifest=Manifest.read(folder), ref="bad/nan@1")

    engine = Engine(load_base(tiny_llama_path, quantization="none"), Folders())
    try:
        with pytest.raises(InvalidModuleWeights, match="holds NaN or Inf"):
            engine.generate([GenerationRequest(prompt="x", module="bad/nan@1")])
    finally:
        engine.close()
