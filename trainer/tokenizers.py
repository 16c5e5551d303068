"""Domain tokenizers: train a new one on a corpus, or extend a base's with the domain's words.

``train_tokenizer`` trains a byte-level BPE, WordPiece or Unigram tokenizer with the
``tokenizers`` library and saves it in the transformers format (``tokenizer.json`` and
``tokenizer_config.json``, loadable with ``AutoTokenizer``); ``tunehub base init --tokenizer DIR``
builds a base on it. The presets' tokenizers (``trainer/base.py``) are trained by the same
:func:`train_backend`.

``extend_tokenizer`` adds to a base tokenizer the words of a domain corpus that it splits worst,
ranked by frequency x pieces saved, and measures fertility (tokens per word) and bytes per token
on held-out text before and after. ``init_new_rows`` gives a model the rows of the new tokens
(input embedding and output head), each the mean of its old pieces' rows by default.
"""

from __future__ import annotations

import codecs
import json
import random
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tunehub.errors import ConfigError, DataError
from tunehub.registry.files import new_output_folder
from tunehub.trainer.base import BERT_SPECIALS, CHAT_TEMPLATE, LLAMA_SPECIALS

if TYPE_CHECKING:  # tokenizers, transformers and torch are imported where they are used
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

TokenizerType = Literal["bpe", "wordpiece", "unigram"]
TOKENIZER_TYPES: tuple[str, ...] = ("bpe", "wordpiece", "unigram")
InitRule = Literal["subword-mean", "mean"]
INIT_RULES: tuple[str, ...] = ("subword-mean", "mean")

#: the extension report written next to an extended tokenizer
EXTENSION_REPORT = "tokenizer_extension.json"
#: corpora at least this large get progress bars (reading, and the trainer's own) on a terminal
PROGRESS_MIN_BYTES = 8 << 20
_SNIFF_BYTES = 8192
_BYTE_ALPHABET = 256  # byte-level BPE starts from every byte value
_PRIVATE_USE = 0xF0000  # supplementary private-use plane: never produced by BERT's normaliser


# --- corpora ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Validated UTF-8 text files, read as one document per non-blank line."""

    files: tuple[Path, ...]
    total_bytes: int

    @classmethod
    def open(cls, paths: str | Path | Sequence[str | Path], *, what: str = "corpus") -> Corpus:
        """Check ``paths`` (files, or folders read recursively in name order, hidden files
        skipped) before any work: each exists, none looks binary, and some line is not blank.
        Raises :class:`DataError` naming the file at fault."""
        items = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not items:
            raise DataError(f"no {what} given")
        files: list[Path] = []
        for item in items:
            path = Path(item).expanduser()
            if path.is_dir():
                files += sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            elif path.is_file():
                files.append(path)
            else:
                raise DataError(f"{what} {path} does not exist")
        for path in files:
            _check_text_file(path, what)
        corpus = cls(tuple(files), sum(p.stat().st_size for p in files))
        if not any(_has_text(p) for p in files):
            shown = ", ".join(map(str, items))
            raise DataError(f"{what} {shown} is empty: it has no line with text (one document per line)")
        return corpus

    def lines(self, *, progress: bool = False, desc: str = "reading corpus") -> Iterator[str]:
        """Every non-blank line, without its line break. A line that is not UTF-8 raises
        :class:`DataError` with its file and line number."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
        try:
            for path in self.files:
                with path.open("rb") as handle:
                    for number, raw in enumerate(handle, 1):
                        if bar is not None:
                            bar.update(len(raw))
                        try:
                            line = raw.decode("utf-8").rstrip("\r\n")
                        except UnicodeDecodeError as exc:
                            raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason})") from None
                        if line.strip():
                            yield line
        finally:
            if bar is not None:
                bar.close()

    def show_progress(self, progress: bool | None) -> bool:
        """``progress`` as asked, or (None) on a terminal for a corpus of PROGRESS_MIN_BYTES or more."""
        if progress is not None:
            return progress
        return self.total_bytes >= PROGRESS_MIN_BYTES and sys.stderr.isatty()


def _check_text_file(path: Path, what: str) -> None:
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if b"\x00" in head:
        raise DataError(f"{what} {path} is a binary file (it holds NUL bytes); give UTF-8 text, one document per line")
    try:  # incremental: a character cut by the sniff's end is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _has_text(path: Path) -> bool:
    with path.open("rb") as handle:
        return any(raw.strip() for raw in handle)


# --- training ----------------------------------------------------------------------------------------


def min_vocab_size(kind: str) -> int:
    """The smallest ``vocab_size`` a type can be asked for before seeing the corpus (byte-level
    BPE needs its 256 bytes and the special tokens; the others need at least the specials)."""
    if kind == "bpe":
        return _BYTE_ALPHABET + len(LLAMA_SPECIALS)
    return len(BERT_SPECIALS if kind == "wordpiece" else LLAMA_SPECIALS) + 1


def train_backend(
    kind: str,
    lines: Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a ``tokenizers.Tokenizer`` of ``kind`` (bpe, wordpiece or unigram) on the texts
    ``lines()`` yields (called once per pass over the corpus; wordpiece makes two).

    bpe: byte-level (every string round-trips, nothing is ever unknown), specials ``<unk> <s>
    </s> <pad>``, ``<s>`` before every encoded text (the Llama convention). wordpiece: BERT's
    (lower-cased, ``[CLS] ... [SEP]``), trained deterministically. unigram: SentencePiece-style
    (``▁`` marks spaces), ``<unk>`` for characters the corpus never had. Raises ConfigError for
    an unknown kind or a ``vocab_size`` smaller than the corpus's alphabet needs."""
    if kind not in TOKENIZER_TYPES:
        raise ConfigError(f"unknown tokenizer type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    least = min_vocab_size(kind)
    if vocab_size < least:
        raise ConfigError(f"vocab size {vocab_size} is too small for a {kind} tokenizer: it needs at least {least}")
    if kind == "bpe":
        backend = _train_byte_level_bpe(lines, vocab_size, min_frequency, show_progress)
    elif kind == "wordpiece":
        backend = _train_wordpiece(lines, vocab_size, min_frequency, show_progress)
    else:
        backend = _train_unigram(lines, vocab_size, show_progress)
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:  # the trainers keep the whole alphabet whatever the size asked
        raise ConfigError(
            f"vocab size {vocab_size} is too small for this corpus: a {kind} tokenizer needs {size} tokens"
            " for its alphabet and special tokens alone"
        )
    return backend


def _train_byte_level_bpe(lines: Callable[[], Iterable[str]], vocab_size: int, min_frequency: int, progress: bool) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # byte-level BPE: every string round-trips, no text is ever <unk>
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(LLAMA_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(lines(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            # Llama convention: <s> starts every encoded text (the chat template writes its own)
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]),
        ]
    )
    return tokenizer


def _train_wordpiece(lines: Callable[[], Iterable[str]], vocab_size: int, min_frequency: int, progress: bool) -> Tokenizer:
    # tokenizers' WordPieceTrainer is not deterministic (huggingface/tokenizers#1794): it numbers
    # the "##x" pieces in hash-map order, and those ids break ties between merges. It is BPE
    # training underneath, so train BPE instead with every word-internal character spelled as
    # its own private-use character (BPE numbers its alphabet in sorted order, so the whole run
    # is deterministic), then spell those pieces back as "##" WordPiece tokens.
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()

    def words() -> Iterator[list[str]]:
        for line in lines():
            yield [word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))]

    inner = sorted({char for ws in words() for word in ws for char in word[1:]})
    marked = {char: chr(_PRIVATE_USE + i) for i, char in enumerate(inner)}
    unmarked = {mark: char for char, mark in marked.items()}

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BERT_SPECIALS),
        show_progress=progress,
    )
    bpe.train_from_iterator(
        (" ".join(word[0] + "".join(marked[c] for c in word[1:]) for word in ws) for ws in words()),
        trainer=trainer,
    )

    def wordpiece(token: str) -> str:
        if token in BERT_SPECIALS:
            return token
        text = "".join(unmarked.get(char, char) for char in token)
        return "##" + text if token[0] in unmarked else text

    vocab = {wordpiece(token): index for token, index in bpe.get_vocab().items()}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.add_special_tokens(list(BERT_SPECIALS))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    sep, cls = tokenizer.token_to_id("[SEP]"), tokenizer.token_to_id("[CLS]")
    if sep is None or cls is None:  # cannot happen: both were added as special tokens above
        raise RuntimeError("the wordpiece tokenizer lost its [SEP] or [CLS] token")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tokenizer


def _train_unigram(lines: Callable[[], Iterable[str]], vocab_size: int, progress: bool) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    # "first": only the text's first word gets a ▁ added; with "always" every stretch after an
    # added token would get one too, and decoding would insert a space there
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(LLAMA_SPECIALS), unk_token="<unk>", show_progress=progress
    )
    tokenizer.train_from_iterator(lines(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    return tokenizer


def wrap_tokenizer(backend: Tokenizer, kind: str, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """``backend`` as a transformers tokenizer with the special tokens of its kind: Llama's
    (and the presets' chat template) for bpe and unigram, BERT's for wordpiece."""
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=model_max_length,
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """``save_pretrained``, loadable by transformers 4 and 5 alike."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 records its internal class name ("TokenizersBackend"), which transformers 4
    # cannot load; "PreTrainedTokenizerFast" names the same thing in both
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class TrainedTokenizer:
    """What :func:`train_tokenizer` wrote."""

    path: Path
    kind: str
    vocab_size: int  # tokens of the saved tokenizer, specials included
    lines: int
    corpus_bytes: int


def train_tokenizer(
    corpus: str | Path | Sequence[str | Path],
    kind: str,
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    progress: bool | None = None,
) -> TrainedTokenizer:
    """Train a ``kind`` tokenizer (bpe, wordpiece, unigram) of at most ``vocab_size`` tokens on
    ``corpus`` (UTF-8 files or folders, one document per line) and save it in ``out_dir`` (new
    or empty) in the transformers format. ``progress``: bars for reading and training (None: on
    a terminal, for corpora of PROGRESS_MIN_BYTES or more).

    Raises DataError (missing, binary or empty corpus), ConfigError (unknown type, vocab size too
    small) and Conflict (``out_dir`` holds files) before anything is written."""
    if kind not in TOKENIZER_TYPES:
        raise ConfigError(f"unknown tokenizer type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if vocab_size < min_vocab_size(kind):
        raise ConfigError(
            f"vocab size {vocab_size} is too small for a {kind} tokenizer: it needs at least {min_vocab_size(kind)}"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")
    out = new_output_folder(out_dir, "tunehub")
    text = Corpus.open(corpus)
    show = text.show_progress(progress)
    counted = 0

    def lines() -> Iterator[str]:
        nonlocal counted
        counted = 0
        for line in text.lines(progress=show):
            counted += 1
            yield line

    backend = train_backend(kind, lines, vocab_size, min_frequency=min_frequency, show_progress=show)
    wrapped = wrap_tokenizer(backend, kind, model_max_length=model_max_length)
    with _Staged(out) as staging:
        save_tokenizer(wrapped, staging)
    return TrainedTokenizer(out, kind, len(wrapped), counted, text.total_bytes)


# --- output folders --------------------------------------------------------------------------------


class _Staged:
    """Write into a hidden folder beside ``out``, moved into place only when complete."""

    def __init__(self, out: Path):
        self.out = out
        self.staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"

    def __enter__(self) -> Path:
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                if self.out.exists():
                    self.out.rmdir()  # empty (checked before the work): rmdir refuses anything else
                self.staging.rename(self.out)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


# --- extension -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewToken:
    """A token the extension added: its text, id, the base's pieces for it, and why it was chosen."""

    token: str
    id: int
    pieces: list[str]
    piece_ids: list[int]
    count: int  # occurrences in the selection text
    score: int  # count x (pieces - 1): the tokens it saves there


@dataclass(frozen=True)
class TextStats:
    """A tokenizer on some text: words (whitespace-separated), tokens, UTF-8 bytes."""

    lines: int
    words: int
    tokens: int
    bytes: int
    roundtrip: bool  # decode(encode(line)) == line for every line

    @property
    def fertility(self) -> float:
        return self.tokens / max(self.words, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fertility": round(self.fertility, 6), "bytes_per_token": round(self.bytes_per_token, 6)}


@dataclass
class ExtensionReport:
    """What :func:`extend_tokenizer` did, written as ``tokenizer_extension.json`` beside the tokenizer."""

    base: str
    init: str
    max_new: int
    base_vocab_size: int
    vocab_size: int
    selection_lines: int
    heldout: str  # where the held-out text came from
    before: TextStats
    after: TextStats
    added: list[NewToken] = field(default_factory=list)

    @property
    def fertility_ratio(self) -> float:
        """Held-out fertility after / before (< 1: fewer tokens per word)."""
        return self.after.fertility / max(self.before.fertility, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["before"], payload["after"] = self.before.to_dict(), self.after.to_dict()
        payload["fertility_after_vs_before"] = round(self.fertility_ratio, 6)
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> ExtensionReport:
        stats = ("lines", "words", "tokens", "bytes", "roundtrip")
        return cls(
            **{k: payload[k] for k in ("base", "init", "max_new", "base_vocab_size", "vocab_size", "selection_lines", "heldout")},
            before=TextStats(**{k: payload["before"][k] for k in stats}),
            after=TextStats(**{k: payload["after"][k] for k in stats}),
            added=[NewToken(**token) for token in payload["added"]],
        )


def load_extension_report(folder: str | Path) -> ExtensionReport:
    """The report of an extended tokenizer folder (ConfigError when there is none)."""
    path = Path(folder) / EXTENSION_REPORT
    try:
        return ExtensionReport.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"{folder} holds no {EXTENSION_REPORT}: not a tokenizer made by tunehub tokenizer extend") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid extension report ({exc})") from None


def resolve_tokenizer_folder(reference: str | Path, *, field: str = "--base") -> Path:
    """A folder holding ``tokenizer.json``: the folder itself (a tokenizer or a base model
    folder), else the base reference resolved as ``tunehub train`` does (a Hub id)."""
    path = Path(reference).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{field}: {path} holds no tokenizer.json (a fast tokenizer is needed)")
    from tunehub.bases import resolve_base_folder

    folder = resolve_base_folder(reference, field=field)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{field}: {reference} has no tokenizer.json (a fast tokenizer is needed)")
    return folder


def measure_text(tokenizer: PreTrainedTokenizerFast, lines: Sequence[str]) -> TextStats:
    """Words, tokens (no special tokens), bytes and exact round trip of ``tokenizer`` on ``lines``."""
    backend = tokenizer.backend_tokenizer
    encodings = backend.encode_batch(list(lines), add_special_tokens=False)
    ids = [e.ids for e in encodings]
    decoded = backend.decode_batch(ids, skip_special_tokens=False)
    return TextStats(
        lines=len(lines),
        words=sum(len(line.split()) for line in lines),
        tokens=sum(map(len, ids)),
        bytes=sum(len(line.encode("utf-8")) for line in lines),
        roundtrip=all(a == b for a, b in zip(decoded, lines)),
    )


def _split_heldout(lines: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    selection: list[str] = []
    heldout: list[str] = []
    for line in lines:
        (heldout if rng.random() < fraction else selection).append(line)
    if not heldout and len(selection) > 1:  # a tiny corpus: keep one line apart all the same
        heldout.append(selection.pop())
    if not selection and len(heldout) > 1:
        selection.append(heldout.pop())
    if not selection or not heldout:
        raise DataError("the corpus needs at least 2 lines: held-out text is kept apart from the text the words are chosen on")
    return selection, heldout


def _candidates(
    tokenizer: PreTrainedTokenizerFast, lines: Iterable[str], min_frequency: int
) -> tuple[list[tuple[int, int, str]], bool]:
    """(score, count, text) of every word worth adding, best first; and whether the words carry
    their leading space.

    Words are the base's own pre-tokens; the text added is that pre-token's span of the
    (normalized) line. Where the pre-tokenizer keeps spaces with words (byte-level BPE "Ġword",
    SentencePiece "▁word"), only the mid-sentence form " word" is a candidate: added tokens are
    matched before pre-tokenization, so a bare "word" would also match inside " word" and split
    its space off, and byte-level decoding reads a bare Latin-1 "é" as one byte (the space makes
    it take the token's own UTF-8 bytes)."""
    backend = tokenizer.backend_tokenizer
    if backend.pre_tokenizer is None:
        raise ConfigError(
            "the base tokenizer has no pre-tokenizer: extension needs one to find words (byte-level, BERT, Metaspace)"
        )
    normalizer, pre_tokenizer, model = backend.normalizer, backend.pre_tokenizer, backend.model
    counts: Counter[tuple[str, str]] = Counter()
    for line in lines:
        text = normalizer.normalize_str(line) if normalizer is not None else line
        for piece, (start, end) in pre_tokenizer.pre_tokenize_str(text):
            counts[(piece, text[start:end])] += 1
    spaced = any(raw[:1].isspace() for _, raw in counts)
    vocab = tokenizer.get_vocab()
    merged: Counter[str] = Counter()
    pieces_of: dict[str, int] = {}
    for (piece, raw), count in counts.items():
        if spaced and not (raw.startswith(" ") and len(raw) > 1 and not raw[1:2].isspace()):
            continue
        if not any(char.isalnum() for char in raw) or raw in vocab or piece in vocab:
            continue
        merged[raw] += count
        pieces_of.setdefault(raw, len(model.tokenize(piece)))
    ranked = [
        (count * (pieces_of[raw] - 1), count, raw)
        for raw, count in merged.items()
        if count >= min_frequency and pieces_of[raw] > 1
    ]
    ranked.sort(key=lambda item: (-item[0], -item[1], item[2]))
    return ranked, spaced


def extend_tokenizer(
    base: str | Path,
    corpus: str | Path | Sequence[str | Path],
    max_new: int,
    out_dir: str | Path,
    *,
    heldout: float | str | Path = 0.1,
    init: str = "subword-mean",
    min_frequency: int = 2,
    seed: int = 0,
) -> ExtensionReport:
    """Add to ``base``'s tokenizer (a tokenizer or base folder, or a Hub id) the at most
    ``max_new`` words of ``corpus`` it splits worst, and write the extended tokenizer and its
    report (``tokenizer_extension.json``) to ``out_dir`` (new or empty).

    Words are ranked by count x (pieces - 1), the tokens each would save on the selection text;
    a word the base already has as one token is never added, nor one seen fewer than
    ``min_frequency`` times. ``heldout``: a fraction of the corpus's lines (drawn with ``seed``)
    or a file of held-out text; either way the words are chosen on the other text only, and
    fertility (tokens per word) and bytes per token are measured on the held-out text before and
    after. ``init`` is recorded for :func:`init_new_rows` (subword-mean or mean).

    Raises DataError (missing, binary or empty corpus or held-out file; no word to add),
    ConfigError (``max_new`` < 1, bad ``heldout`` or ``init``) and Conflict (``out_dir`` holds
    files) before anything is written."""
    if max_new < 1:
        raise ConfigError(f"max_new must be at least 1, got {max_new}")
    if init not in INIT_RULES:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INIT_RULES)}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")
    fraction = float(heldout) if isinstance(heldout, (int, float)) and not isinstance(heldout, bool) else None
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ConfigError(f"the held-out fraction must be between 0 and 1 (exclusive), got {heldout}")
    if isinstance(heldout, bool):
        raise ConfigError("heldout is a fraction of the corpus's lines or a file of held-out text, not a boolean")
    out = new_output_folder(out_dir, "tunehub")
    text = Corpus.open(corpus)
    heldout_text = Corpus.open(heldout, what="held-out text") if isinstance(heldout, (str, Path)) else None
    folder = resolve_tokenizer_folder(base)

    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    if heldout_text is None:
        assert fraction is not None
        selection, held = _split_heldout(text.lines(), fraction, seed)
        source = f"{fraction:.0%} of the corpus's lines (seed {seed}), kept apart from selection"
    else:
        selection, held = list(text.lines()), list(heldout_text.lines())
        source = ", ".join(map(str, heldout_text.files))
    ranked, spaced = _candidates(tokenizer, selection, min_frequency)
    if not ranked:
        raise DataError(
            f"no word of the corpus splits into 2 or more tokens at least {min_frequency} times: the base already covers it"
        )
    before = measure_text(tokenizer, held)
    base_size = len(tokenizer)
    chosen = ranked[:max_new]
    old_pieces = {raw: tokenizer.backend_tokenizer.encode(raw, add_special_tokens=False) for _, _, raw in chosen}
    normalized = tokenizer.backend_tokenizer.normalizer is not None
    # single_word keeps a bare word (BERT-style pre-tokens) from matching inside longer words; the
    # " word" forms carry their own left boundary and single_word would refuse them after a letter
    tokenizer.add_tokens([AddedToken(raw, single_word=not spaced, normalized=normalized) for _, _, raw in chosen])
    added = [
        NewToken(
            token=raw,
            id=tokenizer.convert_tokens_to_ids(raw),
            pieces=list(old_pieces[raw].tokens),
            piece_ids=list(old_pieces[raw].ids),
            count=count,
            score=score,
        )
        for score, count, raw in chosen
    ]
    after = measure_text(tokenizer, held)
    report = ExtensionReport(
        base=str(base),
        init=init,
        max_new=max_new,
        base_vocab_size=base_size,
        vocab_size=len(tokenizer),
        selection_lines=len(selection),
        heldout=source,
        before=before,
        after=after,
        added=added,
    )
    with _Staged(out) as staging:
        save_tokenizer(tokenizer, staging)
        (staging / EXTENSION_REPORT).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report


# --- new rows ---------------------------------------------------------------------------------------


def init_new_rows(model: PreTrainedModel, new_tokens: Sequence[NewToken] | ExtensionReport, init: str | None = None) -> int:
    """Give ``model`` rows for the added tokens, in its input embedding and its output head (a
    tied head shares the rows), resizing both when the tokens' ids go past them; returns the
    number of rows the model has now.

    ``init`` (default: the report's, else subword-mean):

    - ``subword-mean``: each new row is the mean of the rows of the pieces the base split the
      token into. The token spells exactly the text of those pieces, so its input row starts
      near what the model already reads for that text, and its output row gives it a logit equal
      to the mean of its pieces' logits: never above the likeliest piece's, so a new token does
      not take over the next-token distribution before it is trained (the failure of random rows
      that Hewitt 2021, "Initializing new word embeddings for pretrained language models",
      describes), and the rows carry the pieces' meaning, which the plain mean does not.
    - ``mean``: every new row is the mean of all the rows below the first new id (Hewitt's
      rule): the safest for the distribution, but every new token starts the same.

    Also sets the rows of ids the model already had but the base tokenizer did not use (presets
    with more rows than tokens): those rows were never trained."""
    import torch

    if isinstance(new_tokens, ExtensionReport):
        init = init or new_tokens.init
        tokens = list(new_tokens.added)
    else:
        tokens = list(new_tokens)
    init = init or "subword-mean"
    if init not in INIT_RULES:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INIT_RULES)}")
    embedding = _weight(model.get_input_embeddings())
    if not tokens:
        return int(embedding.shape[0])
    first_new = min(t.id for t in tokens)
    needed = max(t.id for t in tokens) + 1
    old_rows = min(first_new, int(embedding.shape[0]))
    for token in tokens:
        if not token.piece_ids or max(token.piece_ids) >= old_rows or min(token.piece_ids) < 0:
            raise ConfigError(f"new token {token.token!r}: its pieces {token.piece_ids} are not ids of the base vocabulary")
    if needed > embedding.shape[0]:
        # mean_resizing=False: every new row is set below, transformers' own draw would be discarded
        model.resize_token_embeddings(needed, mean_resizing=False)
        embedding = _weight(model.get_input_embeddings())
    head = model.get_output_embeddings()
    rows = [embedding]
    if head is not None and _weight(head) is not embedding:
        rows.append(_weight(head))
    bias = getattr(head, "bias", None) if head is not None else None
    if isinstance(bias, torch.Tensor) and bias.shape[0] >= needed:
        rows.append(bias)
    ids = torch.tensor([t.id for t in tokens])
    with torch.no_grad():
        for matrix in rows:
            if init == "mean":
                matrix[ids] = matrix[:first_new].mean(0).expand(len(tokens), *matrix.shape[1:]).to(matrix.dtype)
            else:
                means = torch.stack([matrix[t.piece_ids].float().mean(0) for t in tokens])
                matrix[ids] = means.to(matrix.dtype)
    return int(_weight(model.get_input_embeddings()).shape[0])


def _weight(module: object) -> torch.Tensor:
    import torch

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):  # every transformers embedding and head has one
        raise ConfigError(f"{type(module).__name__} has no weight matrix to give new rows")
    return weight


__all__ = [
    "Corpus",
    "EXTENSION_REPORT",
    "ExtensionReport",
    "INIT_RULES",
    "NewToken",
    "PROGRESS_MIN_BYTES",
    "TOKENIZER_TYPES",
    "TextStats",
    "TrainedTokenizer",
    "extend_tokenizer",
    "init_new_rows",
    "load_extension_report",
    "measure_text",
    "min_vocab_size",
    "resolve_tokenizer_folder",
    "save_tokenizer",
    "train_backend",
    "train_tokenizer",
    "wrap_tokenizer",
]
