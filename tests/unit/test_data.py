"""Training data: readers, fingerprint, split, SFT tokenization, packing, collators, CLM and MLM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tunehub.errors import ConfigError, DataError
from tunehub.trainer.data import (
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    SFTCollator,
    clm_blocks,
    data_info,
    mlm_collator,
    mlm_examples,
    pack_examples,
    read_sft_records,
    read_texts,
    split_records,
    tokenize_sft,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Blue, of course."},
    ]
}


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_path)


@pytest.fixture(scope="module")
def llama_model(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, attn_implementation="sdpa")
    return model.eval()


# --- read_sft_records ----------------------------------------------------------------------------


def test_read_sft_records_mixed_formats_and_folders(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"prompt": "p2", "completion": "c2"}])
    write_jsonl(
        tmp_path / "d" / "a.jsonl",
        [
            {"prompt": "p1", "completion": "c1", "id": 7},
            "",
            {"messages": [{"role": "assistant", "content": "x", "name": "n"}]},
        ],
    )
    (tmp_path / "d" / "notes.md").write_text("not data")
    records = read_sft_records([tmp_path / "d"])
    assert records == [
        {"prompt": "p1", "completion": "c1"},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"prompt": "p2", "completion": "c2"},
    ]
    assert read_sft_records([str(tmp_path / "d" / "b.jsonl")], fmt="prompt_completion") == records[2:]


@pytest.mark.parametrize(
    ("lines", "fmt", "message"),
    [
        (['{"prompt": "a", "completion": '], "auto", r"bad\.jsonl:1: not valid JSON"),
        ([{"prompt": "a"}], "auto", r"bad\.jsonl:1: missing 'completion'"),
        ([{"text": "a"}], "auto", r"bad\.jsonl:1: expected 'prompt' and 'completion', or 'messages'"),
        ([{"prompt": "a", "completion": 3}], "auto", r"bad\.jsonl:1: 'completion' must be a string"),
        (["[1, 2]"], "auto", r"bad\.jsonl:1: expected a JSON object"),
        (
            [{"prompt": "a", "completion": "b"}, {"messages": []}],
            "auto",
            r"bad\.jsonl:2: 'messages' must be a non-empty list",
        ),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "auto", r"bad\.jsonl:1: chat has no assistant message"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], "auto", r"bad\.jsonl:1: messages\[0\] has role 'bot'"),
        ([{"messages": [{"role": "assistant", "content": ["x"]}]}], "auto", r"messages\[0\]\.content must be a string"),
        ([{"messages": [{"role": "assistant"}]}], "auto", r"messages\[0\] must be an object with 'role' and 'content'"),
        ([{"prompt": "a", "completion": "b"}], "chat", r"bad\.jsonl:1: expected a chat record"),
        ([{"messages": [{"role": "assistant", "content": "x"}]}], "prompt_completion", r"\.jsonl:1: expected 'prompt'"),
        ([{"prompt": "a", "completion": "b", "messages": []}], "auto", r"has both 'messages' and 'prompt'"),
        (["", "  "], "auto", r"no SFT records in"),
    ],
)
def test_read_sft_records_errors(tmp_path, lines, fmt, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_sft_records([path], fmt=fmt)


def test_read_sft_records_missing_paths_and_options(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        read_sft_records([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"contains no \*\.jsonl files"):
        read_sft_records([tmp_path / "empty"])
    with pytest.raises(DataError, match="no SFT records"):
        read_sft_records([])
    with pytest.raises(ConfigError, match="unknown SFT data format 'csv'"):
        read_sft_records([tmp_path], fmt="csv")


# --- read_texts ----------------------------------------------------------------------------------


def test_read_texts_files_folders_and_jsonl(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deep").mkdir(parents=True)
    (corpus / "a.txt").write_text("first file.\n\nsecond paragraph.")
    (corpus / "b" / "deep" / "c.md").write_text("# markdown")
    (corpus / "b" / "z.rst").write_text("rst text")
    write_jsonl(corpus / "b" / "d.jsonl", [{"text": "line one"}, {"text": "line two"}])
    (corpus / "b" / "image.png").write_bytes(b"\x89PNG")
    (corpus / ".hidden.txt").write_text("never read")
    (corpus / "blank.text").write_text("  \n")
    texts = read_texts([corpus])
    # sorted by relative path, one string per file (not split into paragraphs), per JSONL line
    # (relative paths: a.txt, b/d.jsonl, b/deep/c.md, b/z.rst)
    assert texts == ["first file.\n\nsecond paragraph.", "line one", "line two", "# markdown", "rst text"]
    assert read_texts([corpus / "b" / "z.rst", str(corpus / "a.txt")]) == ["rst text", texts[0]]


def test_read_texts_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n")
    with pytest.raises(DataError, match=r"no text in .*empty"):
        read_texts([tmp_path / "empty"])
    bad = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: expected an object with a 'text' field"):
        read_texts([bad])
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"table\.csv: unsupported file type \.csv"):
        read_texts([tmp_path / "table.csv"])


def test_read_texts_saved_dataset_needs_datasets(tmp_path, caplog, monkeypatch):
    from tunehub.trainer import data as data_module

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    (saved / "data-00000-of-00001.arrow").write_bytes(b"arrow")
    monkeypatch.setattr(data_module, "_datasets_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="tunehub.trainer.data"):
        with pytest.raises(DataError, match="`datasets` is not installed"):
            read_texts([saved])
    assert "skipping" in caplog.text and "saved" in caplog.text


# --- data_info -----------------------------------------------------------------------------------


def test_data_info_tracks_names_and_bytes(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    (folder / "b.txt").write_text("text")
    first = data_info([folder], num_examples=1, num_tokens=5)
    assert first.sources == [str(folder)] and first.num_examples == 1 and first.num_tokens == 5
    assert len(first.sha256) == 64
    assert data_info([folder]).sha256 == first.sha256  # deterministic

    (folder / "b.txt").write_text("texT")
    edited = data_info([folder]).sha256
    assert edited != first.sha256
    (folder / "b.txt").rename(folder / "c.txt")
    renamed = data_info([folder]).sha256
    assert renamed not in (first.sha256, edited)

    # moving the whole folder keeps the fingerprint: only names relative to it count
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert data_info([moved]).sha256 == renamed
    # sft fingerprints only what read_sft_records reads
    (moved / "notes.md").write_text("ignored by sft")
    assert data_info([moved], kind="sft").sha256 == data_info([moved / "a.jsonl"], kind="sft").sha256
    assert data_info([moved]).sha256 != renamed
    with pytest.raises(DataError, match="does not exist"):
        data_info([tmp_path / "gone"])


# --- split_records -------------------------------------------------------------------------------


def test_split_records_is_deterministic():
    records = list(range(50))
    train, evaluation = split_records(records, 0.2, seed=3)
    assert (train, evaluation) == split_records(records, 0.2, seed=3)
    assert len(evaluation) == 10 and len(train) == 40
    assert sorted(train + evaluation) == records
    assert split_records(records, 0.2, seed=4)[1] != evaluation
    assert split_records(records, 0.0, seed=3) == (records, [])
    assert len(split_records([1, 2], 0.01, seed=0)[1]) == 1  # at least one when fraction > 0
    assert split_records([1], 0.5, seed=0) == ([1], [])  # never the only record
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ConfigError, match="eval_fraction"):
            split_records(records, bad, seed=0)


# --- tokenize_sft --------------------------------------------------------------------------------


def test_prompt_tokens_carry_no_loss(llama_tok):
    record = {"prompt": "Question: what did the farmer find?\nAnswer:", "completion": " a red bicycle."}
    (example,) = tokenize_sft([record], llama_tok, max_length=128)
    prompt = llama_tok(record["prompt"], add_special_tokens=False)["input_ids"]
    completion = llama_tok(record["completion"], add_special_tokens=False)["input_ids"]
    head = 1 + len(prompt)
    assert example["input_ids"] == [llama_tok.bos_token_id] + prompt + completion + [llama_tok.eos_token_id]
    assert example["labels"][:head] == [IGNORE_INDEX] * head
    assert example["labels"][head:] == example["input_ids"][head:]  # completion and eos carry loss
    assert IGNORE_INDEX not in example["labels"][head:]


def _loss_runs(tokenizer, example):
    """Decoded text of each contiguous run of tokens that carries loss."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize(
    ("template", "turn_end"),
    [(None, "</s>\n"), ("chatml", "<|im_end|>\n"), ("simple", "</s>\n\n")],
)
def test_chat_masking_covers_only_assistant_turns(llama_tok, template, turn_end):
    (example,) = tokenize_sft([CHAT], llama_tok, max_length=256, template=template)
    assert _loss_runs(llama_tok, example) == ["Red." + turn_end, "Blue, of course." + turn_end]
    rendered = llama_tok.decode(example["input_ids"])
    assert "You are terse." in rendered and "Another one?" in rendered  # context is there, unscored


class _SlowView:
    """The fast tokenizer seen as a slow one (no offsets), to exercise the token-prefix fallback."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_chat_masking_without_offsets(llama_tok):
    (fast,) = tokenize_sft([CHAT], llama_tok, max_length=256)
    (slow,) = tokenize_sft([CHAT], _SlowView(llama_tok), max_length=256)
    assert slow == fast


def test_chat_template_errors(llama_tok):
    from copy import deepcopy

    no_template = deepcopy(llama_tok)
    no_template.chat_template = None
    with pytest.raises(ConfigError, match="the tokenizer has none"):
        tokenize_sft([CHAT], no_template, max_length=64)
    # prompt/completion records need no template
    assert tokenize_sft([{"prompt": "a", "completion": "b"}], no_template, max_length=64)
    for records in ([CHAT], [{"prompt": "a", "completion": "b"}]):
        with pytest.raises(ConfigError, match="unknown chat template 'zephyr'; choose one of chatml, simple"):
            tokenize_sft(records, llama_tok, max_length=64, template="zephyr")
    # a header that depends on the conversation's length breaks the prefix property
    counting = "{{ messages|length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="given chat template cannot be used for assistant-only loss"):
        tokenize_sft([CHAT], llama_tok, max_length=64, template=counting)
    with pytest.raises(ConfigError, match="max_length"):
        tokenize_sft([CHAT], llama_tok, max_length=1)
    assert set(CHAT_TEMPLATES) >= {"chatml", "simple"}


def test_truncation_drops_examples_without_loss(llama_tok, caplog):
    long_prompt = {"prompt": "the farmer found a red bicycle near the station " * 8, "completion": " yes"}
    short = {"prompt": "hi", "completion": " there"}
    with caplog.at_level(logging.WARNING, logger="tunehub.trainer.data"):
        examples = tokenize_sft([long_prompt, short], llama_tok, max_length=16)
    assert len(examples) == 1 and all(len(e["input_ids"]) <= 16 for e in examples)
    assert "dropped 1 of 2 SFT examples" in caplog.text
    with pytest.raises(DataError, match="every one of the 1 SFT examples"):
        tokenize_sft([long_prompt], llama_tok, max_length=16)


# --- packing -------------------------------------------------------------------------------------


def _examples(lengths, prompt_len=2):
    out = []
    for n, length in enumerate(lengths):
        ids = [10 + n * 20 + i for i in range(length)]
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_examples_first_fit_decreasing_positions_and_labels():
    examples = _examples([6, 6, 3, 4, 12])
    blocks = pack_examples(examples, block_size=10)
    # longest first, each into the first block with room: [10 (12 truncated)] [6, 4] [6, 3]
    assert [len(b["input_ids"]) for b in blocks] == [10, 10, 9]
    assert blocks[1]["input_ids"] == examples[0]["input_ids"] + examples[3]["input_ids"]
    assert blocks[2]["input_ids"] == examples[1]["input_ids"] + examples[2]["input_ids"]
    assert blocks[0]["position_ids"] == list(range(10))
    assert blocks[1]["position_ids"] == list(range(6)) + list(range(4))
    assert blocks[2]["position_ids"] == list(range(6)) + list(range(3))
    assert all(len(b["labels"]) == len(b["input_ids"]) == len(b["position_ids"]) <= 10 for b in blocks)
    # prompt tokens stay -100, completion tokens keep their ids
    prompt = [IGNORE_INDEX] * 2
    assert blocks[1]["labels"] == prompt + examples[0]["input_ids"][2:] + prompt + examples[3]["input_ids"][2:]
    with pytest.raises(ConfigError, match="block_size"):
        pack_examples(examples, block_size=1)


def test_pack_examples_matches_naive_first_fit_decreasing_and_fills_blocks():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(300)]
    blocks = pack_examples(_examples(lengths, prompt_len=0), block_size=32)
    free: list[int] = []
    expected: list[list[int]] = []
    in_order_free: list[int] = []
    for n in sorted(range(len(lengths)), key=lambda n: -min(lengths[n], 32)):
        length = min(lengths[n], 32)
        if length < 2:  # a 1-token example has no target left once its first label is masked
            continue
        index = next((i for i, f in enumerate(free) if f >= length), len(free))
        if index == len(free):
            free.append(32)
            expected.append([])
        free[index] -= length
        expected[index].append(n)
    for length in (min(x, 32) for x in lengths if x >= 2):
        index = next((i for i, f in enumerate(in_order_free) if f >= length), len(in_order_free))
        if index == len(in_order_free):
            in_order_free.append(32)
        in_order_free[index] -= length
    assert [len(b["input_ids"]) for b in blocks] == [32 - f for f in free]
    firsts = [[b["input_ids"][i] for i, p in enumerate(b["position_ids"]) if p == 0] for b in blocks]
    assert firsts == [[10 + n * 20 for n in members] for members in expected]
    assert len(blocks) < len(in_order_free)  # fuller blocks than first-fit in the examples' order


def test_prompt_masking_survives_packing(llama_tok):
    records = [{"prompt": f"Question {i}: what did the pilot sell?", "completion": f" {i} maps."} for i in range(6)]
    examples = tokenize_sft(records, llama_tok, max_length=64)
    blocks = pack_examples(examples, block_size=96)
    assert len(blocks) < len(examples)
    for block in blocks:
        starts = [i for i, p in enumerate(block["position_ids"]) if p == 0]
        for start, end in zip(starts, starts[1:] + [len(block["input_ids"])]):
            ids, labels = block["input_ids"][start:end], block["labels"][start:end]
            original = next(e for e in examples if e["input_ids"] == ids)
            assert labels == original["labels"]  # first label is the prompt's bos: already -100


def _run(model, batch, **kwargs):
    import torch

    with torch.no_grad():
        return model(**batch, **kwargs)


def test_packed_rows_equal_examples_run_alone(llama_model):
    import torch

    # prompt_len=0: every label is a target, so a label predicted across a boundary would count
    examples = _examples([7, 3, 9, 5, 2, 6, 4], prompt_len=0)
    blocks = pack_examples(examples, block_size=16)
    lengths = [len(b["input_ids"]) for b in blocks]
    assert len(set(lengths)) > 1, "the batch must contain padding to test the dummy segment"
    batch = SFTCollator(pad_token_id=3, pad_to_multiple_of=8)(blocks)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] % 8 == 0
    packed = _run(llama_model, batch, use_cache=False)

    total_loss, total_targets, checked = 0.0, 0, 0
    for row, block in enumerate(blocks):
        starts = [i for i, p in enumerate(block["position_ids"]) if p == 0] + [len(block["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            ids = torch.tensor([block["input_ids"][start:end]])
            labels = torch.tensor([block["labels"][start:end]])
            alone = _run(llama_model, {"input_ids": ids, "labels": labels})
            torch.testing.assert_close(packed.logits[row, start:end], alone.logits[0], atol=1e-5, rtol=0)
            targets = int((labels[0, 1:] != IGNORE_INDEX).sum())
            total_loss += alone.loss.item() * targets
            total_targets += targets
            checked += 1
    assert checked == len(examples)
    # the packed loss is the token-weighted mean of the examples' losses: nothing crosses boundaries
    assert packed.loss.item() == pytest.approx(total_loss / total_targets, abs=1e-5)

    # the pitfalls the collator avoids: a 2D attention mask or a cache lets examples see each other
    with_mask = _run(llama_model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}, use_cache=False)
    with_cache = _run(llama_model, batch, use_cache=True)
    second = slice(len(blocks[0]["input_ids"]) - 1, len(blocks[0]["input_ids"]))
    for leaky in (with_mask, with_cache):
        assert not torch.allclose(leaky.logits[0, : second.stop], packed.logits[0, : second.stop], atol=1e-5)

    # flatten: the whole batch as one row (flash-attention layout) gives the same logits
    flat = SFTCollator(pad_token_id=3, flatten=True)(blocks)
    assert flat["input_ids"].shape[0] == 1
    flat_out = _run(llama_model, flat, use_cache=False)
    offset = 0
    for row, block in enumerate(blocks):
        n = len(block["input_ids"])
        torch.testing.assert_close(flat_out.logits[0, offset : offset + n], packed.logits[row, :n], atol=1e-5, rtol=0)
        offset += n


def test_collator_pads_unpacked_examples():
    examples = _examples([5, 3])
    batch = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == examples[1]["input_ids"] + [0] * 5
    assert batch["labels"][1].tolist() == examples[1]["labels"] + [IGNORE_INDEX] * 5
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    with pytest.raises(ConfigError, match="pad_token_id"):
        SFTCollator(pad_token_id=None)


# --- causal LM blocks ----------------------------------------------------------------------------


def test_clm_blocks(llama_tok):
    texts = ["the farmer found a red bicycle.", "the pilot sold it yesterday.", "done"]
    ids = [llama_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = llama_tok.eos_token_id
    stream = ids[0] + [eos] + ids[1] + [eos] + ids[2]
    blocks = clm_blocks(texts, llama_tok, block_size=4)
    assert [t for b in blocks for t in b["input_ids"]] == (stream if len(stream) % 4 != 1 else stream[:-1])
    assert all(len(b["input_ids"]) == 4 for b in blocks[:-1]) and 2 <= len(blocks[-1]["input_ids"]) <= 4
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    # a final block of a single token is dropped
    n = len(stream)
    assert sum(len(b["input_ids"]) for b in clm_blocks(texts, llama_tok, block_size=n - 1)) == n - 1
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        clm_blocks([], llama_tok, block_size=8)


# --- masked LM -----------------------------------------------------------------------------------

SENTENCES = [
    "The farmer found a red bicycle near the station.",
    "She repaired it before dawn!",
    "Our teacher counted the apples in the kitchen.",
    "Why did the pilot sell the golden compass?",
    "Nobody noticed the quiet violin.",
    "The baker delivered twelve parcels.",
]


def test_mlm_collator_masks_the_given_share(bert_tok):
    import torch

    texts = [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))] * 10
    examples = mlm_examples(texts, bert_tok, max_length=32)
    assert all(len(e["input_ids"]) <= 32 for e in examples)
    assert all(e["input_ids"][0] == bert_tok.cls_token_id for e in examples)
    assert all(e["input_ids"][-1] == bert_tok.sep_token_id for e in examples)
    originals = [list(e["input_ids"]) for e in examples]
    batch = mlm_collator(bert_tok, mlm_probability=0.15, seed=0)(examples)
    assert {"input_ids", "labels", "attention_mask", "token_type_ids"} <= set(batch)
    assert "offset_mapping" not in batch and "special_tokens_mask" not in batch

    width = batch["input_ids"].shape[1]
    original = torch.tensor([o + [bert_tok.pad_token_id] * (width - len(o)) for o in originals])
    special = torch.tensor([m + [1] * (width - len(m)) for m in (e["special_tokens_mask"] for e in examples)]).bool()
    masked = batch["labels"] != IGNORE_INDEX
    share = masked.sum().item() / (~special).sum().item()
    assert 0.11 < share < 0.19
    assert not (masked & special).any()
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][~masked], original[~masked])  # unmasked tokens untouched
    assert (batch["input_ids"][masked] == bert_tok.mask_token_id).float().mean() > 0.6
    with pytest.raises(ConfigError, match="mask token"):
        mlm_collator(_no_mask(bert_tok))
    with pytest.raises(ConfigError, match="mlm_probability"):
        mlm_collator(bert_tok, mlm_probability=1.5)


def _no_mask(tokenizer):
    from copy import deepcopy

    clone = deepcopy(tokenizer)
    clone.mask_token = None
    return clone


def test_whole_word_masking_masks_every_piece(bert_tok):
    texts = [" ".join(SENTENCES)] * 40
    examples = mlm_examples(texts, bert_tok, max_length=48)
    batch = mlm_collator(bert_tok, mlm_probability=0.3, whole_word=True, seed=1)(examples)
    masked = (batch["labels"] != IGNORE_INDEX).tolist()
    words_seen = 0
    for row, example in enumerate(examples):
        tokens = bert_tok.convert_ids_to_tokens(example["input_ids"])
        for i, token in enumerate(tokens):
            # a continuation piece shares its word's fate (unless a chunk starts mid-word)
            if token.startswith("##") and i > 1:
                words_seen += 1
                assert masked[row][i] == masked[row][i - 1]
    assert words_seen > 0
    assert 0.15 < sum(map(sum, masked)) / sum(len(e["input_ids"]) - 2 for e in examples) < 0.45


def test_nsp_pairs_have_both_labels(bert_tok, tiny_bert_path):
    import torch
    from transformers import BertForPreTraining

    texts = [" ".join(SENTENCES), " ".join(reversed(SENTENCES))]
    examples = mlm_examples(texts, bert_tok, max_length=40, nsp=True, seed=5)
    assert examples == mlm_examples(texts, bert_tok, max_length=40, nsp=True, seed=5)
    labels = [e["next_sentence_label"] for e in examples]
    assert set(labels) == {0, 1} and len(examples) == 2 * (len(SENTENCES) - 1)
    for example in examples:
        types = example["token_type_ids"]
        assert types[0] == 0 and types[-1] == 1  # [CLS] A [SEP] B [SEP]
        assert example["input_ids"].count(bert_tok.sep_token_id) == 2
    # true pairs are consecutive sentences of one text
    first_true = next(e for e in examples if e["next_sentence_label"] == 0)
    a, b = bert_tok.decode(first_true["input_ids"], skip_special_tokens=True), SENTENCES
    assert any(f"{x} {y}".lower().replace(" ", "") == a.replace(" ", "") for x, y in zip(b, b[1:]))

    batch = mlm_collator(bert_tok, seed=0)(examples)
    assert batch["next_sentence_label"].tolist() == labels
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    model = BertForPreTraining.from_pretrained(tiny_bert_path)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)

    with pytest.raises(DataError, match="at least two sentences"):
        mlm_examples(["One sentence only"], bert_tok, max_length=40, nsp=True)
    with pytest.raises(DataError, match="no text"):
        mlm_examples(["  "], bert_tok, max_length=40)
