"""Training data: reading, fingerprinting, splitting, tokenizing, packing and collating.

Three objectives share this module:

- ``sft``: prompt/completion or chat records (``read_sft_records``) -> ``tokenize_sft`` (loss on the
  completion / assistant tokens only) -> optionally ``pack_examples`` -> ``SFTCollator``.
- ``clm``: raw text (``read_texts``) -> ``clm_blocks`` -> ``SFTCollator`` (blocks are full, so it
  only pads the last one).
- ``mlm``: raw text -> ``mlm_examples`` (optionally sentence pairs for NSP) -> ``mlm_collator``.

Packing without cross-contamination (transformers 5.x): Llama-style models build their causal
mask in ``transformers.masking_utils.create_causal_mask``. Only when ``attention_mask`` is
``None``, no cache object exists and ``position_ids`` are given does it call
``find_packed_sequence_indices``, which starts a new segment wherever a position is not the
previous one plus 1; the mask (sdpa, eager, flex) then becomes block-diagonal causal. Passing a
2D ``attention_mask`` switches that detection off, and so does a ``DynamicCache``, which the
model creates whenever ``use_cache`` is true, in training too. So ``SFTCollator`` sends packed
batches without ``attention_mask``, pads each row with one dummy segment (positions restarting at
0, labels -100), and the model must run with ``use_cache=False`` (``transformers.Trainer`` sets
``model.config.use_cache = args.use_cache``, which defaults to False). Flash attention 2/3 take
another path (``_is_packed_sequence``) that only sees packing in a batch of one row: use
``SFTCollator(flatten=True)`` there. tunehub's trainer runs packed SFT with its own
``tunehub_segments`` attention (:mod:`tunehub.trainer.attention`), which reads the same
``position_ids`` and computes each example alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tunehub.errors import ConfigError, DataError

if TYPE_CHECKING:  # keep `import tunehub.trainer.data` free of torch/transformers at import time
    import torch

    from tunehub.registry import DataInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

IGNORE_INDEX = -100
"""Label value the loss ignores (PyTorch's ``cross_entropy`` default, used by every HF model)."""

SFT_ROLES = ("system", "user", "assistant")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")

# --- chat templates ------------------------------------------------------------------------------

#: Named chat templates for ``tokenize_sft(template=...)``. Both render every message the same way
#: whatever comes after it, which is what lets ``tokenize_sft`` find each assistant span by
#: rendering prefixes of the conversation.
CHAT_TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, many others). Generation must stop at "<|im_end|>": the loop should make it a
    # stop string or an eos token of the served model.
    "chatml": (
        "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('chat roles are system, user and assistant; got ' + message['role']) }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Plain role headers; the assistant's turn ends with eos so that the model learns to stop.
    "simple": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ 'System:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'User:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ 'Assistant:\n' + message['content'] + (eos_token or '') + '\n\n' }}"
        "{% else %}"
        "{{ raise_exception('chat roles are system, user and assistant; got ' + message['role']) }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}"
    ),
}

# --- file discovery ------------------------------------------------------------------------------


def _is_dataset_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _DATASET_MARKERS)


def _walk(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted by relative path; hidden files and folders are skipped
    (``.git``, editor droppings) so that they never enter the data or its fingerprint."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / name for name in files if not name.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data path {path} does not exist")


def _sft_files(path: Path) -> list[Path]:
    _check_exists(path)
    if path.is_file():
        return [path]
    files = [p for p in _walk(path) if p.suffix == ".jsonl"]
    if not files:
        raise DataError(f"data folder {path} contains no *.jsonl files")
    return files


def _text_sources(path: Path) -> list[Path]:
    """The files (and ``datasets`` folders) ``read_texts`` reads under ``path``, in reading order."""
    _check_exists(path)
    if path.is_file() or _is_dataset_dir(path):
        return [path]
    sources: list[Path] = []
    dataset_dirs: list[Path] = []
    for file in _walk(path):
        if any(file.is_relative_to(d) for d in dataset_dirs):
            continue
        if file.name in _DATASET_MARKERS:
            dataset_dirs.append(file.parent)
            sources.append(file.parent)
        elif file.suffix in TEXT_SUFFIXES or file.suffix == ".jsonl":
            sources.append(file)
    return sources


def _datasets_available() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


# --- reading -------------------------------------------------------------------------------------


def _jsonl_lines(file: Path):
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file."""
    try:
        handle = file.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except UnicodeDecodeError:
            raise DataError(f"{file}: not UTF-8 text") from None


def _parse_prompt_completion(obj: dict, where: str) -> dict:
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    return {"prompt": obj["prompt"], "completion": obj["completion"]}


def _parse_chat(obj: dict, where: str) -> dict:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in SFT_ROLES:
            raise DataError(f"{where}: messages[{index}] has role {role!r}; roles are {', '.join(SFT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{index}].content must be a string, got {type(content).__name__}")
        # only role and content: extra keys (names, tool calls) would reach templates unchecked
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: chat has no assistant message, so nothing to train on")
    return {"messages": clean}


def read_sft_records(
    paths: Sequence[str | Path],
    fmt: Literal["auto", "prompt_completion", "chat"] = "auto",
) -> list[dict]:
    """Read SFT records from JSONL files (or folders of them, searched recursively and sorted).

    Each line is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``;
    ``fmt="auto"`` accepts either on each line. Records come back normalised to exactly those keys.
    Raises ``DataError`` naming file and line for anything malformed, and for an empty data set.
    """
    if fmt not in ("auto", "prompt_completion", "chat"):
        raise ConfigError(f"unknown SFT data format {fmt!r}; choose auto, prompt_completion or chat")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[dict] = []
    for path in paths:
        for file in _sft_files(Path(path)):
            for number, obj in _jsonl_lines(file):
                where = f"{file}:{number}"
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                is_pc = "prompt" in obj or "completion" in obj
                is_chat = "messages" in obj
                if is_pc and is_chat:
                    raise DataError(f"{where}: has both 'messages' and 'prompt'/'completion'; use one format per line")
                if fmt == "chat" and not is_chat:
                    raise DataError(f"{where}: expected a chat record with 'messages' (format is 'chat')")
                if fmt == "prompt_completion" and not is_pc:
                    raise DataError(f"{where}: expected 'prompt' and 'completion' (format is 'prompt_completion')")
                if is_chat:
                    records.append(_parse_chat(obj, where))
                elif is_pc:
                    missing = [k for k in ("prompt", "completion") if k not in obj]
                    if missing:
                        raise DataError(f"{where}: missing {missing[0]!r} (a prompt/completion record needs both)")
                    records.append(_parse_prompt_completion(obj, where))
                else:
                    raise DataError(f"{where}: expected 'prompt' and 'completion', or 'messages'; found keys {sorted(obj)}")
    if not records:
        raise DataError(f"no SFT records in {', '.join(str(p) for p in paths) or 'an empty list of paths'}")
    return records


def _read_text_file(file: Path) -> list[str]:
    if file.suffix == ".jsonl":
        texts = []
        for number, obj in _jsonl_lines(file):
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataError(f"{file}:{number}: expected an object with a 'text' field")
            if not isinstance(obj["text"], str):
                raise DataError(f"{file}:{number}: 'text' must be a string, got {type(obj['text']).__name__}")
            texts.append(obj["text"])
        return texts
    if file.suffix not in TEXT_SUFFIXES:
        raise DataError(
            f"{file}: unsupported file type {file.suffix or '(none)'}; "
            f"read_texts takes {', '.join(TEXT_SUFFIXES)}, .jsonl and datasets folders"
        )
    try:
        return [file.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise DataError(f"{file}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from None


def _read_dataset_dir(folder: Path) -> list[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many types for a broken folder
        raise DataError(f"{folder}: cannot load the saved dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        # a DatasetDict: its train split if it has one, else every split in name order
        parts = [loaded["train"]] if "train" in loaded else [loaded[name] for name in sorted(loaded)]
    else:
        parts = [loaded]
    texts: list[str] = []
    for part in parts:
        if "text" not in part.column_names:
            raise DataError(f"{folder}: the saved dataset has no 'text' column (columns: {part.column_names})")
        texts.extend(t for t in part["text"] if isinstance(t, str))
    return texts


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """Raw text for continued pretraining: one string per text file or per JSONL line.

    Takes .txt/.md/.rst/.text files, .jsonl files with a "text" field per line, folders of those
    (searched recursively, sorted, hidden entries skipped) and ``datasets`` saved to disk (a folder
    with ``dataset_info.json`` or ``dataset_dict.json``) when the ``datasets`` package is installed;
    without it such folders are skipped with a warning. Blank documents are dropped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    texts: list[str] = []
    skipped: list[Path] = []
    for path in paths:
        for source in _text_sources(Path(path)):
            if source.is_dir():
                if not _datasets_available():
                    logger.warning("skipping %s: a saved `datasets` dataset, but `datasets` is not installed", source)
                    skipped.append(source)
                    continue
                texts.extend(_read_dataset_dir(source))
            else:
                texts.extend(_read_text_file(source))
    texts = [t for t in texts if t.strip()]
    if not texts:
        hint = f" (skipped {len(skipped)} `datasets` folder(s): `datasets` is not installed)" if skipped else ""
        raise DataError(f"no text in {', '.join(str(p) for p in paths) or 'an empty list of paths'}{hint}")
    return texts


# --- fingerprint ---------------------------------------------------------------------------------


def _fingerprint_files(path: Path, kind: Literal["text", "sft"]) -> list[Path]:
    if kind == "sft":
        return _sft_files(path)
    files: list[Path] = []
    for source in _text_sources(path):
        files.extend(_walk(source) if source.is_dir() else [source])
    return files


def data_info(
    paths: Sequence[str | Path],
    num_examples: int | None = None,
    num_tokens: int | None = None,
    *,
    kind: Literal["text", "sft"] = "text",
) -> DataInfo:
    """Fingerprint the data read from ``paths`` for the module's manifest.

    The sha256 covers, for each path in the given order, the relative names (sorted) and the bytes
    of every file read from it, so renaming, adding, removing or editing a file changes it while
    moving the whole data folder does not. ``kind="sft"`` fingerprints what ``read_sft_records``
    reads (only *.jsonl under folders); the default covers what ``read_texts`` reads, a superset.
    """
    from tunehub.registry import DataInfo

    if kind not in ("text", "sft"):
        raise ConfigError(f"unknown data kind {kind!r}; choose text or sft")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    digest = hashlib.sha256()
    for path in map(Path, paths):
        root = path if path.is_dir() else path.parent
        for file in _fingerprint_files(path, kind):
            name = file.relative_to(root).as_posix().encode()
            size = file.stat().st_size
            # length-prefixed fields: no two different file lists can hash the same byte stream
            digest.update(len(name).to_bytes(8, "big") + name + size.to_bytes(8, "big"))
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return DataInfo(
        sha256=digest.hexdigest(),
        sources=[str(p) for p in paths],
        num_examples=num_examples,
        num_tokens=num_tokens,
    )


# --- split ---------------------------------------------------------------------------------------


def split_records(records: list[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split into ``(train, eval)`` by a shuffle with ``random.Random(seed)``; deterministic.

    Eval gets ``round(eval_fraction * n)`` records, at least 1 when ``eval_fraction > 0`` and
    ``n >= 2``, and never all of them. Both parts keep the records' original order.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)):
        raise ConfigError(f"eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(records)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, max(n - 1, 0))  # training always keeps at least one record
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in eval_ids]
    evaluation = [r for i, r in enumerate(records) if i in eval_ids]
    return train, evaluation


# --- SFT tokenization ----------------------------------------------------------------------------


def _resolve_template(tokenizer: Any, template: str | None) -> tuple[str, str]:
    """``(jinja source, name for messages)`` of the chat template to use."""
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ConfigError(
                f"chat data needs a chat template: the tokenizer has none, so choose one of {', '.join(sorted(CHAT_TEMPLATES))}"
            )
        if isinstance(own, dict):  # tokenizers may carry several named templates
            if "default" not in own:
                raise ConfigError(f"the tokenizer has several chat templates ({', '.join(own)}) and no 'default'")
            own = own["default"]
        return own, "the tokenizer's own chat template"
    if template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template], f"chat template {template!r}"
    if "{{" in template or "{%" in template:  # an inline Jinja template
        return template, "the given chat template"
    raise ConfigError(f"unknown chat template {template!r}; choose one of {', '.join(sorted(CHAT_TEMPLATES))}")


def _render(tokenizer: Any, messages: list[dict], source: str, name: str, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=source
        )
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise ConfigError(f"{name} failed to render a conversation: {exc}") from None
    if not isinstance(text, str):
        raise ConfigError(f"{name} did not render to a string")
    return text


def _assistant_spans(tokenizer: Any, messages: list[dict], source: str, name: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss.

    Each assistant message's span runs from the end of the rendering of the messages before it
    (with the generation prompt, so the role header is excluded) to the end of the rendering that
    includes it (so the end-of-turn text the template writes after it is included). That only
    holds if every rendering is a prefix of the next: checked, else ConfigError.
    """
    full = _render(tokenizer, messages, source, name, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], source, name, generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], source, name, generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ConfigError(
                f"{name} cannot be used for assistant-only loss: rendering a conversation's first "
                f"{i} messages with the generation prompt is not a prefix of rendering its first {i + 1} "
                "(or of the whole conversation), so the assistant's tokens cannot be located. "
                f"Use one of {', '.join(sorted(CHAT_TEMPLATES))}"
            )
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def _chat_example(tokenizer: Any, messages: list[dict], source: str, name: str) -> tuple[list[int], list[int]]:
    text, spans = _assistant_spans(tokenizer, messages, source, name)
    if getattr(tokenizer, "is_fast", False):
        # the template writes its own special tokens (bos...), hence add_special_tokens=False
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for t, (start, end) in enumerate(enc["offset_mapping"]):
            # a token belongs to the span its first character is in
            if end > start and any(s <= start < e for s, e in spans):
                labels[t] = ids[t]
        return ids, labels
    # slow tokenizers have no offsets: tokenize the prefixes and require token-level prefixes
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
        b = tokenizer(text[:end], add_special_tokens=False)["input_ids"]
        if ids[: len(a)] != a or ids[: len(b)] != b:
            raise ConfigError(f"{name}: the tokenizer merges tokens across an assistant turn's boundary; use a fast tokenizer")
        labels[len(a) : len(b)] = ids[len(a) : len(b)]
    return ids, labels


def tokenize_sft(
    records: list[dict],
    tokenizer: Any,
    max_length: int,
    template: str | None = None,
) -> list[dict]:
    """Tokenize SFT records into ``{"input_ids", "labels"}`` with loss on the answer only.

    prompt/completion: ``[bos] + prompt + completion + [eos]``; labels are -100 up to the
    completion. chat: rendered with ``template`` (a key of ``CHAT_TEMPLATES``, an inline Jinja
    template, or None for the tokenizer's own) and only the assistant messages (plus the end-of-turn
    text right after each) carry loss. Examples are cut to ``max_length``; those left without any
    loss token are dropped with a warning.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    # resolved up front when given, so that a bad name fails even on prompt/completion data
    chat: tuple[str, str] | None = _resolve_template(tokenizer, template) if template is not None else None
    examples: list[dict] = []
    dropped = 0
    for index, record in enumerate(records):
        if "messages" in record:
            if chat is None:
                chat = _resolve_template(tokenizer, template)
            ids, labels = _chat_example(tokenizer, record["messages"], *chat)
        elif "prompt" in record and "completion" in record:
            if eos is None:
                raise ConfigError("prompt/completion training needs a tokenizer with an eos token, to learn to stop")
            prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            head = ([bos] if bos is not None else []) + list(prompt)
            ids = head + list(completion) + [eos]
            labels = [IGNORE_INDEX] * len(head) + list(completion) + [eos]
        else:
            raise DataError(f"record {index} is neither prompt/completion nor chat (keys: {sorted(record)})")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if dropped:
        logger.warning(
            "dropped %d of %d SFT examples: no completion/assistant token left within max_length=%d",
            dropped,
            len(records),
            max_length,
        )
    if records and not examples:
        raise DataError(f"every one of the {len(records)} SFT examples lost its answer to max_length={max_length}")
    return examples


# --- packing -------------------------------------------------------------------------------------


class _FirstFit:
    """Leftmost block with at least ``need`` free tokens, in O(log n): a max segment tree over the
    blocks' free space. A linear scan would be quadratic on large data sets."""

    def __init__(self, capacity: int, block_size: int):
        self.size = 1
        while self.size < max(capacity, 1):
            self.size *= 2
        self.block_size = block_size
        self.tree = [-1] * (2 * self.size)  # -1: block not opened yet
        self.opened = 0

    def _set(self, index: int, free: int) -> None:
        node = index + self.size
        self.tree[node] = free
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2

    def place(self, need: int) -> int:
        """Index of the block that takes ``need`` tokens (opening a new one if none fits)."""
        if self.tree[1] >= need:
            node = 1
            while node < self.size:
                node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
            index = node - self.size
        else:
            index = self.opened
            self.opened += 1
            self._set(index, self.block_size)
        self._set(index, self.tree[index + self.size] - need)
        return index


def pack_examples(examples: list[dict], block_size: int) -> list[dict]:
    """Pack whole tokenized examples into blocks of at most ``block_size`` tokens.

    First-fit decreasing: the longest examples are placed first, each in the first block with
    room (ties keep the examples' order). Blocks come out nearly full (96% on the packing
    benchmark's lengths, uniform in [23, 508], against 91% for first-fit in the examples' order), so fewer padded
    positions are computed; TRL's default best-fit-decreasing packs alike. The trainer shuffles
    the blocks, so the order of lengths does not become the order of training. An example longer
    than ``block_size`` is truncated.
    Each block has ``input_ids``, ``labels`` and ``position_ids`` restarting at 0 at each example.
    Labels are carried over, except that each example's first label becomes -100: the loss shifts
    labels by one, so that label would be predicted from the previous example's last token (alone,
    an example's first label is never a target either, so the loss of each example is unchanged).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"block_size must be an integer >= 2, got {block_size!r}")
    fit = _FirstFit(len(examples), block_size)
    blocks: list[dict] = []
    dropped = 0
    longest_first = sorted(examples, key=lambda example: -min(len(example["input_ids"]), block_size))  # stable
    for example in longest_first:
        ids = list(example["input_ids"][:block_size])
        labels = list(example["labels"][:block_size])
        if len(ids) != len(labels):
            raise DataError("an example's input_ids and labels differ in length")
        if not ids:
            continue
        labels[0] = IGNORE_INDEX
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        index = fit.place(len(ids))
        if index == len(blocks):
            blocks.append({"input_ids": [], "labels": [], "position_ids": []})
        block = blocks[index]
        block["input_ids"].extend(ids)
        block["labels"].extend(labels)
        block["position_ids"].extend(range(len(ids)))
    if dropped:
        logger.warning("dropped %d examples left without loss tokens when cut to block_size=%d", dropped, block_size)
    return blocks


# --- collation -----------------------------------------------------------------------------------


@dataclass
class SFTCollator:
    """Pad a list of ``{"input_ids", "labels"[, "position_ids"][, "task_id"]}`` into a batch of
    tensors (``task_ids`` when the examples carry one: multitask prompt tuning).

    Unpacked examples: right padding, ``attention_mask`` marks the real tokens.

    Packed examples (with ``position_ids``): no ``attention_mask``, because in transformers 5 a 2D
    mask switches off the detection of packed segments from restarting ``position_ids`` and the
    examples would attend to each other. Padding is instead one last dummy segment per row whose
    positions restart at 0 and whose labels are -100: it only attends to itself, and nothing real
    attends to it, so each real example computes exactly what it would alone. The model must run
    with ``use_cache=False`` (a cache also switches the detection off).

    ``flatten=True`` puts the whole batch into one row (padding-free, the layout flash attention
    needs to see packed segments; it works with sdpa too), each example's positions restarting
    at 0 and its first label set to -100 so that no example is trained to follow the previous one.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flatten: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise ConfigError(f"pad_token_id must be an integer token id, got {self.pad_token_id!r}")
        if self.pad_to_multiple_of is not None and (not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1):
            raise ConfigError(f"pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of!r}")

    def _padded_length(self, length: int) -> int:
        if self.pad_to_multiple_of:
            return -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        import torch

        if not examples:
            raise DataError("cannot collate an empty batch")
        rows = []
        for e in examples:
            ids = list(e["input_ids"])
            labels = list(e["labels"]) if "labels" in e else list(ids)
            if len(labels) != len(ids):
                raise DataError("an example's input_ids and labels differ in length")
            positions = list(e["position_ids"]) if "position_ids" in e else list(range(len(ids)))
            rows.append((ids, labels, positions))
        if self.flatten:
            ids, labels, positions = [], [], []
            for row_ids, row_labels, row_positions in rows:
                if row_labels:
                    row_labels = [IGNORE_INDEX] + row_labels[1:]
                ids += row_ids
                labels += row_labels
                positions += row_positions
            rows = [(ids, labels, positions)]
        packed = self.flatten or any("position_ids" in e for e in examples)
        length = self._padded_length(max(len(ids) for ids, _, _ in rows))
        input_ids, labels, positions, attention = [], [], [], []
        for row_ids, row_labels, row_positions in rows:
            pad = length - len(row_ids)
            input_ids.append(row_ids + [self.pad_token_id] * pad)
            labels.append(row_labels + [IGNORE_INDEX] * pad)
            positions.append(row_positions + list(range(pad)))  # the dummy segment restarts at 0
            attention.append([1] * len(row_ids) + [0] * pad)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(attention, dtype=torch.long)
        tagged = ["task_id" in e for e in examples]
        if any(tagged):  # multitask prompt tuning: which task's prompt each row uses
            if not all(tagged) or self.flatten:
                raise DataError("task ids need every example of the batch tagged, one example per row")
            batch["task_ids"] = torch.tensor([int(e["task_id"]) for e in examples], dtype=torch.long)
        return batch


# --- causal LM blocks ----------------------------------------------------------------------------


def clm_blocks(texts: list[str], tokenizer: Any, block_size: int) -> list[dict]:
    """Tokenize ``texts``, join them with eos between documents and cut the stream into blocks.

    Blocks have ``block_size`` tokens; a final shorter block is kept if it has at least 2 tokens
    (one token gives no next-token target). ``labels == input_ids``; documents inside a block
    attend to each other (the usual continued-pretraining concatenation, eos marks the boundary).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"block_size must be an integer >= 2, got {block_size!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("causal LM blocks need a tokenizer with an eos token to separate documents")
    stream: list[int] = []
    # whole documents are longer than the model's context on purpose (they are cut into blocks
    # below): verbose=False drops the tokenizer's warning about that
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    for i, ids in enumerate(encoded):
        if i:
            stream.append(eos)
        stream.extend(ids)
    blocks = []
    for start in range(0, len(stream), block_size):
        chunk = stream[start : start + block_size]
        if len(chunk) >= 2:
            blocks.append({"input_ids": chunk, "labels": list(chunk)})
    if not blocks:
        raise DataError("the texts gave fewer than 2 tokens: nothing to train on")
    return blocks


# --- masked LM -----------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def _sentences(text: str) -> list[str]:
    """Split on sentence-final punctuation followed by whitespace, and on blank lines."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _mlm_encode(tokenizer: Any, first: list[str], second: list[str] | None, max_length: int, **kwargs: Any):
    return tokenizer(
        first,
        second,
        truncation=True if second is None else "longest_first",
        max_length=max_length,
        return_token_type_ids=True,
        return_special_tokens_mask=True,
        return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)),
        **kwargs,
    )


def _rows(enc: Any) -> list[dict]:
    keys = [k for k in ("input_ids", "token_type_ids", "special_tokens_mask", "offset_mapping") if k in enc]
    return [
        {k: [list(x) for x in enc[k][i]] if k == "offset_mapping" else list(enc[k][i]) for k in keys}
        for i in range(len(enc["input_ids"]))
    ]


def mlm_examples(
    texts: list[str],
    tokenizer: Any,
    max_length: int,
    *,
    nsp: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Tokenized examples for masked LM, with the tokenizer's special tokens ([CLS] ... [SEP]).

    Without ``nsp``: each text is cut into chunks of at most ``max_length`` tokens (the tokenizer's
    overflow, so every chunk gets its own [CLS]/[SEP]). With ``nsp``: sentence pairs from the raw
    text, half with the true next sentence (``next_sentence_label`` 0) and half with a random
    sentence from elsewhere (1), chosen by ``random.Random(seed)``; ``token_type_ids`` mark the
    second sentence. Examples also carry ``special_tokens_mask`` and (fast tokenizers)
    ``offset_mapping``, which ``mlm_collator`` uses and removes.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ConfigError(f"max_length must be an integer, got {max_length!r}")
    specials = tokenizer.num_special_tokens_to_add(pair=nsp)
    if max_length < specials + 2:
        raise ConfigError(f"max_length={max_length} leaves no room for text next to {specials} special tokens")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError("no text to build masked LM examples from")
    if not nsp:
        enc = _mlm_encode(tokenizer, texts, None, max_length, return_overflowing_tokens=True)
        return [row for row in _rows(enc) if sum(1 - m for m in row["special_tokens_mask"]) > 0]

    rng = random.Random(seed)
    documents = [_sentences(t) for t in texts]
    everywhere = [(d, i) for d, sents in enumerate(documents) for i in range(len(sents))]
    firsts, seconds, nsp_labels = [], [], []
    for d, sents in enumerate(documents):
        for i in range(len(sents) - 1):
            # candidates for the random sentence: anything but this sentence and its true successor
            if len(everywhere) > 2 and rng.random() >= 0.5:
                while True:
                    od, oi = everywhere[rng.randrange(len(everywhere))]
                    if (od, oi) not in ((d, i), (d, i + 1)):
                        break
                firsts.append(sents[i])
                seconds.append(documents[od][oi])
                nsp_labels.append(1)
            else:
                firsts.append(sents[i])
                seconds.append(sents[i + 1])
                nsp_labels.append(0)
    if not firsts:
        raise DataError("next-sentence prediction needs a text with at least two sentences")
    rows = _rows(_mlm_encode(tokenizer, firsts, seconds, max_length))
    for row, label in zip(rows, nsp_labels):
        row["next_sentence_label"] = label
    return rows


def mlm_collator(
    tokenizer: Any,
    mlm_probability: float = 0.15,
    whole_word: bool = False,
    seed: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> Any:
    """A transformers ``DataCollatorForLanguageModeling`` for ``mlm_examples`` output.

    Token masking (80% [MASK], 10% random, 10% unchanged) or, with ``whole_word``, whole-word
    masking, which transformers 5 does inside the same class (``whole_word_mask=True``, from the
    examples' ``offset_mapping``; it always uses [MASK]). Labels are -100 except on masked tokens.
    ``token_type_ids`` and ``next_sentence_label`` pass through when present.
    """
    if getattr(tokenizer, "mask_token", None) is None:
        raise ConfigError("masked LM needs a tokenizer with a mask token (e.g. [MASK])")
    if isinstance(mlm_probability, bool) or not isinstance(mlm_probability, (int, float)):
        raise ConfigError(f"mlm_probability must be a number in (0, 1), got {mlm_probability!r}")
    if not 0 < mlm_probability < 1:
        raise ConfigError(f"mlm_probability must be in (0, 1), got {mlm_probability!r}")
    if whole_word and not getattr(tokenizer, "is_fast", False):
        raise ConfigError("whole-word masking needs a fast tokenizer (it reads token offsets)")
    # whole-word masking only replaces with [MASK]; saying so up front avoids transformers' warning
    replace = {"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_word else {}
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ConfigError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    return _mlm_collator_class()(
        tokenizer=tokenizer,
        pad_to_multiple_of=pad_to_multiple_of,
        mlm=True,
        whole_word_mask=whole_word,
        mlm_probability=float(mlm_probability),
        seed=seed,
        **replace,
    )


@functools.cache
def _mlm_collator_class() -> type:
    # built on first use so that importing this module never imports transformers
    from transformers import DataCollatorForLanguageModeling

    @dataclass
    class MLMCollator(DataCollatorForLanguageModeling):
        """Pads ``offset_mapping`` (which ``tokenizer.pad`` leaves ragged) before masking."""

        def torch_call(self, examples: list[list[int] | Any | dict[str, Any]]) -> dict[str, Any]:
            # copies of the example dicts (from mlm_examples): offset_mapping changes below
            rows: list[Any] = []
            for e in examples:
                if not isinstance(e, Mapping):
                    raise DataError("masked-LM examples must be dicts of token lists (from mlm_examples)")
                rows.append(dict(e))
            if self.whole_word_mask:
                if any("offset_mapping" not in e for e in rows):
                    raise DataError("whole-word masking needs examples with offset_mapping (from mlm_examples)")
                length = max(len(e["input_ids"]) for e in rows)
                if self.pad_to_multiple_of:
                    length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
                for e in rows:
                    e["offset_mapping"] = list(e["offset_mapping"]) + [[0, 0]] * (length - len(e["offset_mapping"]))
            else:
                for e in rows:
                    e.pop("offset_mapping", None)
            return super().torch_call(rows)

    return MLMCollator


__all__ = [
    "CHAT_TEMPLATES",
    "IGNORE_INDEX",
    "SFTCollator",
    "clm_blocks",
    "data_info",
    "mlm_collator",
    "mlm_examples",
    "pack_examples",
    "read_sft_records",
    "read_texts",
    "split_records",
    "tokenize_sft",
]
