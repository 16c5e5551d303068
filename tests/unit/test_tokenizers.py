"""Domain tokenizers (trainer/tokenizers.py): training each type, extension with held-out
fertility, the new rows of a model, the `tunehub tokenizer` commands and their refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tunehub.errors import ConfigError, Conflict, DataError
from tunehub.trainer.base import synthetic_corpus
from tunehub.trainer.tokenizers import (
    EXTENSION_REPORT,
    NewToken,
    extend_tokenizer,
    init_new_rows,
    load_extension_report,
    train_tokenizer,
)

# multi-byte UTF-8 of every length: 2 (é, β, µ), 3 (₅, 日本), 4 (😀)
UNICODE_LINE = "Naïve café: β-lactamase IC₅₀ 4.2 µmol/L, 日本語 😀 ok."
DRUGS = ("cafétérine", "ibuprofenil", "amoxicillinase", "metformidolol", "lactamasine", "glomerulonephritis")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def english(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("corpus") / "english.txt", synthetic_corpus(300) + [UNICODE_LINE] * 3)


def _domain_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # Zipf-like: the first drugs are much more frequent than the last
    weights = [1.0 / (i + 1) for i in range(len(DRUGS))]
    return [
        f"The doctor gave {rng.choices(DRUGS, weights)[0]} and {rng.choices(DRUGS, weights)[0]} to the patient." for _ in range(n)
    ]


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("domain")
    return _write(folder / "domain.txt", _domain_lines(300, 1)), _write(folder / "heldout.txt", _domain_lines(60, 2))


@pytest.fixture(scope="module")
def base_tokenizer(tiny_llama_path: Path) -> Path:
    return tiny_llama_path


# --- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_train_each_type_saves_a_transformers_tokenizer(kind, english, tmp_path):
    from transformers import AutoTokenizer

    result = train_tokenizer(english, kind, 400, tmp_path / kind)
    assert (result.path / "tokenizer.json").is_file() and (result.path / "tokenizer_config.json").is_file()
    assert result.lines == 303 and result.vocab_size <= 400
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    assert len(tokenizer) == result.vocab_size
    text = "the farmer found a wooden bicycle near the station."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == (tokenizer.cls_token_id if kind == "wordpiece" else tokenizer.bos_token_id)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # lower case: BERT's normaliser keeps it


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_tokenizer_round_trips_multibyte_text(kind, english, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(train_tokenizer(english, kind, 400, tmp_path / kind).path)
    ids = tokenizer(UNICODE_LINE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == UNICODE_LINE


def test_training_is_deterministic(english, tmp_path):
    first = train_tokenizer(english, "wordpiece", 400, tmp_path / "a").path / "tokenizer.json"
    second = train_tokenizer(english, "wordpiece", 400, tmp_path / "b").path / "tokenizer.json"
    assert first.read_bytes() == second.read_bytes()


def test_progress_bars_on_large_corpora_only(english, tmp_path, capfd, monkeypatch):
    from tunehub.trainer import tokenizers

    train_tokenizer(english, "bpe", 300, tmp_path / "small")
    assert "reading corpus" not in capfd.readouterr().err  # small corpus: no bar
    monkeypatch.setattr(tokenizers.sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(tokenizers, "PROGRESS_MIN_BYTES", 1)  # every corpus is "large" now
    train_tokenizer(english, "bpe", 300, tmp_path / "large")
    assert "reading corpus" in capfd.readouterr().err


# --- extension ------------------------------------------------------------------------------------


def test_extension_adds_the_worst_split_words_and_cuts_fertility(base_tokenizer, domain, tmp_path):
    from transformers import AutoTokenizer

    corpus, heldout = domain
    base = AutoTokenizer.from_pretrained(base_tokenizer)
    report = extend_tokenizer(base_tokenizer, corpus, 4, tmp_path / "ext", heldout=heldout)
    assert len(report.added) == 4
    # the ranking is count x pieces saved, over every candidate word of the selection text
    counts: dict[str, int] = {}
    for line in corpus.read_text(encoding="utf-8").splitlines():
        for word in line.rstrip(".").split()[1:]:
            counts[" " + word] = counts.get(" " + word, 0) + 1
    scores = {w: c * (len(base(w, add_special_tokens=False)["input_ids"]) - 1) for w, c in counts.items()}
    best = sorted(scores, key=lambda w: (-scores[w], -counts[w], w))[:4]
    assert [t.token for t in report.added] == best
    vocab = base.get_vocab()
    for token in report.added:  # never a string the base already has as one token
        assert token.token not in vocab and len(token.piece_ids) > 1
        assert token.score == token.count * (len(token.piece_ids) - 1)
        assert base.convert_ids_to_tokens(token.piece_ids) == token.pieces
        assert token.id >= len(base)
    assert report.after.fertility < report.before.fertility and report.fertility_ratio < 1
    assert report.after.bytes_per_token > report.before.bytes_per_token
    assert report.before.roundtrip and report.after.roundtrip

    saved = load_extension_report(tmp_path / "ext")
    assert saved.added == report.added and saved.before == report.before and saved.init == "subword-mean"
    payload = json.loads((tmp_path / "ext" / EXTENSION_REPORT).read_text())
    assert payload["fertility_after_vs_before"] == pytest.approx(report.fertility_ratio, abs=1e-6)


def test_extension_never_adds_a_word_the_base_has(base_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_tokenizer)
    # " the" is one token of the base; it is the most frequent word here, and never chosen
    assert len(base(" the", add_special_tokens=False)["input_ids"]) == 1
    corpus = _write(tmp_path / "c.txt", ["the the the the cafétérine the the the metformidolol"] * 40)
    report = extend_tokenizer(base_tokenizer, corpus, 50, tmp_path / "ext")
    assert {t.token for t in report.added} == {" cafétérine", " metformidolol"}


def test_extended_tokenizer_round_trips_byte_for_byte(base_tokenizer, domain, tmp_path):
    from transformers import AutoTokenizer

    # the accented word also comes bare (line start, after a bracket): byte-level decoding would
    # misread a bare "é" token, so only the " word" form may be added
    bare = ["Cafétérine (cafétérine) helps, cafétérine again."] * 40
    corpus = _write(tmp_path / "corpus.txt", domain[0].read_text(encoding="utf-8").splitlines() + bare)
    lines = _domain_lines(100, 3) + [UNICODE_LINE, "cafétérine at the start; (cafétérine) and  cafétérine twice", bare[0]]
    extend_tokenizer(base_tokenizer, corpus, 30, tmp_path / "ext")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ext")
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == line
    # one new token for the whole accented word, and it decodes alone too
    ids = tokenizer(" cafétérine", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and tokenizer.decode(ids) == " cafétérine"


def test_extension_of_a_wordpiece_tokenizer_adds_whole_words(english, domain, tmp_path):
    from transformers import AutoTokenizer

    folder = train_tokenizer(english, "wordpiece", 400, tmp_path / "wp").path
    report = extend_tokenizer(folder, domain[0], 3, tmp_path / "ext", heldout=domain[1])
    assert [t.token for t in report.added] and all(" " not in t.token for t in report.added)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ext")
    word = report.added[0].token
    # a whole word only: not inside a longer one
    assert tokenizer.tokenize(f"a {word} b") == ["a", word, "b"]
    assert word not in tokenizer.tokenize(f"a {word}zz b")
    assert report.fertility_ratio < 1


# --- new rows --------------------------------------------------------------------------------------


def test_subword_mean_rows_are_the_mean_of_their_pieces(base_tokenizer, domain, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    report = extend_tokenizer(base_tokenizer, domain[0], 5, tmp_path / "ext", heldout=domain[1])
    model = AutoModelForCausalLM.from_pretrained(base_tokenizer)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    rows = init_new_rows(model, report)
    assert rows == max(512, report.vocab_size)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_out is not new_in  # the tiny Llama's head is not tied: both are set
    first = min(t.id for t in report.added)
    assert torch.equal(new_in[:first], old_in[:first]) and torch.equal(new_out[:first], old_out[:first])
    for token in report.added:
        torch.testing.assert_close(new_in[token.id], old_in[token.piece_ids].mean(0))
        torch.testing.assert_close(new_out[token.id], old_out[token.piece_ids].mean(0))


def test_mean_init_and_tied_heads(tiny_bert_path):
    import torch
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_path)
    old = model.get_input_embeddings().weight.detach().clone()
    first = old.shape[0]
    tokens = [NewToken("alpha", first, ["a", "##l"], [10, 11], 5, 5), NewToken("beta", first + 2, ["b"] * 2, [12, 13], 4, 4)]
    assert init_new_rows(model, tokens, init="mean") == first + 3
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head is embedding  # tied: one matrix, resized and set once
    for token in tokens:
        torch.testing.assert_close(embedding[token.id], old.mean(0))
    with pytest.raises(ConfigError, match="not ids of the base vocabulary"):
        init_new_rows(model, [NewToken("x", first + 5, ["x"], [first + 4], 1, 1)])


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_train_extend_and_base_init(english, domain, tmp_path):
    from typer.testing import CliRunner

    from tunehub.sdk.cli import app

    runner = CliRunner()
    trained = runner.invoke(
        app,
        ["tokenizer", "train", "--corpus", str(english), "--type", "bpe", "--vocab-size", "300", "--out", str(tmp_path / "tok")],
    )
    assert trained.exit_code == 0, trained.output
    assert "trained a bpe tokenizer of 300 tokens on 303 lines" in trained.output

    base = runner.invoke(app, ["base", "init", str(tmp_path / "base"), "--preset", "tiny", "--tokenizer", str(tmp_path / "tok")])
    assert base.exit_code == 0, base.output
    assert "vocabulary 300" in base.output
    assert json.loads((tmp_path / "base" / "config.json").read_text())["vocab_size"] == 300
    provenance = json.loads((tmp_path / "base" / "tunehub_base.json").read_text())
    assert provenance["tokenizer"]["source"] == str((tmp_path / "tok").resolve())

    args = ["tokenizer", "extend", "--base", str(tmp_path / "base"), "--corpus", str(domain[0]), "--max-new", "8"]
    extended = runner.invoke(app, [*args, "--out", str(tmp_path / "ext"), "--heldout", str(domain[1]), "--init", "mean"])
    assert extended.exit_code == 0, extended.output
    lines = extended.output.splitlines()
    assert lines[0].startswith("added 8 tokens (300 -> 308); top: ")
    assert lines[1].split("\t") == ["held-out text", "base", "extended", "after/before"]
    assert lines[2].startswith("tokens per word (fertility)\t")
    assert load_extension_report(tmp_path / "ext").init == "mean"

    again = runner.invoke(app, [*args, "--out", str(tmp_path / "ext")])
    assert again.exit_code != 0 and isinstance(again.exception, Conflict)


# --- bad input -------------------------------------------------------------------------------------


def test_refuses_an_empty_corpus(tmp_path, base_tokenizer):
    empty = _write(tmp_path / "empty.txt", ["", "   ", ""])
    with pytest.raises(DataError, match="is empty"):
        train_tokenizer(empty, "bpe", 300, tmp_path / "a")
    with pytest.raises(DataError, match="is empty"):
        extend_tokenizer(base_tokenizer, empty, 10, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_refuses_a_binary_corpus(tmp_path, base_tokenizer):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="binary file"):
        train_tokenizer(binary, "bpe", 300, tmp_path / "a")
    with pytest.raises(DataError, match="not UTF-8"):
        extend_tokenizer(base_tokenizer, latin1, 10, tmp_path / "b")


def test_refuses_max_new_below_one(tmp_path, base_tokenizer, domain):
    for max_new in (0, -3):
        with pytest.raises(ConfigError, match=f"max_new must be at least 1, got {max_new}"):
            extend_tokenizer(base_tokenizer, domain[0], max_new, tmp_path / "ext")


def test_refuses_a_vocab_size_too_small(tmp_path, english):
    with pytest.raises(ConfigError, match="too small for a bpe tokenizer: it needs at least 260"):
        train_tokenizer(english, "bpe", 100, tmp_path / "a")
    # wordpiece: the corpus's alphabet decides, known only after reading it
    with pytest.raises(ConfigError, match="too small for this corpus"):
        train_tokenizer(english, "wordpiece", 20, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_refuses_a_missing_corpus(tmp_path, base_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer(tmp_path / "nowhere.txt", "unigram", 300, tmp_path / "a")
    with pytest.raises(DataError, match="held-out text .* does not exist"):
        extend_tokenizer(base_tokenizer, _write(tmp_path / "c.txt", ["a b"]), 5, tmp_path / "b", heldout=tmp_path / "nowhere")


def test_refuses_a_non_empty_out_folder(tmp_path, english, domain, base_tokenizer):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(Conflict, match="is not empty"):
        train_tokenizer(english, "bpe", 300, out)
    with pytest.raises(Conflict, match="is not empty"):
        extend_tokenizer(base_tokenizer, domain[0], 5, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_cli_bad_input_is_one_line_and_a_non_zero_exit(tmp_path, capsys):
    from tunehub.sdk.cli import main

    empty = _write(tmp_path / "empty.txt", [""])
    assert main(["tokenizer", "train", "--corpus", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "a")]) == 2
    assert (
        main(
            [
                "tokenizer",
                "extend",
                "--base",
                str(tmp_path),
                "--corpus",
                str(empty),
                "--max-new",
                "0",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: corpus ") and err[0].endswith("is empty: it has no line with text (one document per line)")
    assert err[1] == "error: max_new must be at least 1, got 0"
