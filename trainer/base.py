"""Build small base models (and their tokenizers) from configs alone: no downloads, ever.

Tests, examples and benchmarks need a real base model folder (``config.json``, safetensors
weights, ``tokenizer.json`` with a chat template) but must never fetch one. ``build_base``
trains a real tokenizer on a synthetic English-like corpus and initialises a Llama- or
BERT-shaped model from a named preset, deterministically: the same preset and seed give
byte-identical weights and ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tunehub.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported lazily: listing presets must stay cheap
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

Architecture = Literal["llama", "bert"]

PROVENANCE_FILE = "tunehub_base.json"

# --- synthetic corpus ----------------------------------------------------------------------------

_SUBJECTS = (
    "the farmer",
    "a young engineer",
    "my neighbour",
    "the old captain",
    "our teacher",
    "the committee",
    "a small robot",
    "the baker",
    "her brother",
    "the pilot",
    "a curious child",
    "the mayor",
    "the doctor",
    "his grandmother",
    "the night nurse",
    "a travelling musician",
    "the students",
    "the gardener",
    "every visitor",
    "the librarian",
    "a tired courier",
    "the chef",
    "the team",
    "the lawyer",
    "a quiet poet",
    "the fishermen",
    "the new manager",
    "my cousin",
    "the scientist",
)
_PRONOUNS = ("she", "he", "they", "we", "it", "nobody", "someone", "everyone")
_VERBS = (
    "found",
    "carried",
    "painted",
    "repaired",
    "sold",
    "borrowed",
    "described",
    "counted",
    "opened",
    "measured",
    "cooked",
    "wrote",
    "forgot",
    "noticed",
    "cleaned",
    "ordered",
    "tested",
    "explained",
    "delivered",
    "planted",
    "watched",
    "collected",
    "packed",
    "returned",
    "printed",
    "checked",
    "designed",
    "washed",
    "lost",
    "shared",
    "built",
    "moved",
    "signed",
    "studied",
    "visited",
)
_ADJECTIVES = (
    "red",
    "heavy",
    "quiet",
    "ancient",
    "bright",
    "broken",
    "wooden",
    "tiny",
    "enormous",
    "careful",
    "strange",
    "warm",
    "empty",
    "golden",
    "narrow",
    "famous",
    "simple",
    "rusty",
    "fresh",
    "silent",
    "green",
    "crowded",
    "gentle",
    "curious",
    "expensive",
    "fragile",
    "northern",
    "modern",
    "blue",
)
_OBJECTS = (
    "bicycle",
    "letter",
    "garden",
    "bridge",
    "recipe",
    "window",
    "lantern",
    "violin",
    "report",
    "basket",
    "engine",
    "map",
    "notebook",
    "kettle",
    "ladder",
    "painting",
    "contract",
    "umbrella",
    "telescope",
    "blanket",
    "invoice",
    "compass",
    "harbour",
    "museum",
    "orchard",
    "parcel",
    "ticket",
    "computer",
    "station",
    "library",
    "market",
    "mountain",
    "river",
    "village",
    "window frame",
)
_PLACES = (
    "near the station",
    "in the kitchen",
    "behind the school",
    "at the market",
    "on the hill",
    "by the river",
    "in the old library",
    "under the bridge",
    "at the harbour",
    "in the garden",
    "across the street",
    "inside the museum",
    "next to the bakery",
    "on the third floor",
)
_TIMES = (
    "yesterday",
    "this morning",
    "last winter",
    "on Monday",
    "before dawn",
    "after lunch",
    "today",
    "every Friday",
    "in the evening",
    "at midnight",
    "last year",
    "on Sunday afternoon",
    "soon",
)
_ADVERBS = (
    "slowly",
    "carefully",
    "quickly",
    "happily",
    "quietly",
    "suddenly",
    "politely",
    "badly",
    "twice",
    "again",
    "gladly",
    "secretly",
    "patiently",
    "finally",
)
_CONNECTORS = ("and then", "but", "because", "so", "while", "although", "after that")
_UNITS = ("kilometres", "apples", "pages", "euros", "dollars", "minutes", "boxes", "litres", "people")
_SYLLABLES = (
    "ka",
    "to",
    "ri",
    "mel",
    "an",
    "sor",
    "vi",
    "len",
    "da",
    "mo",
    "ber",
    "ta",
    "lin",
    "ro",
    "ze",
    "qu",
    "is",
    "nor",
    "pe",
    "lu",
    "gar",
    "ish",
    "el",
    "vo",
    "thra",
    "nik",
    "sa",
    "om",
    "fen",
    "dru",
)


def _name(rng: random.Random) -> str:
    # invented proper nouns give the tokenizer an open vocabulary to merge, not just the word lists
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def _number(rng: random.Random) -> str:
    form = rng.randrange(5)
    if form == 0:
        return str(rng.randint(2, 99))
    if form == 1:
        return str(rng.randint(1900, 2030))
    if form == 2:
        return f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
    if form == 3:
        return f"{rng.randint(1, 100)}%"
    return f"{rng.randint(1, 9)},{rng.randint(0, 999):03d}"


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.6 else []
    words.append(rng.choice(_OBJECTS))
    article = rng.choice(("the", "a", "this", "that", "every", "one", "my"))
    phrase = " ".join(words)
    return _a(phrase) if article == "a" else f"{article} {phrase}"


def _subject(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.2:
        return _name(rng)
    if roll < 0.35:
        return rng.choice(_PRONOUNS)
    return rng.choice(_SUBJECTS)


def _clause(rng: random.Random) -> str:
    parts = [_subject(rng)]
    if rng.random() < 0.25:
        parts.append(rng.choice(_ADVERBS))
    parts += [rng.choice(_VERBS), _noun_phrase(rng)]
    if rng.random() < 0.5:
        parts.append(rng.choice(_PLACES))
    if rng.random() < 0.4:
        parts.append(rng.choice(_TIMES))
    return " ".join(parts)


def _sentence(rng: random.Random) -> str:
    shape = rng.randrange(8)
    if shape == 0:
        text = f"{_clause(rng)}, {rng.choice(_CONNECTORS)} {_clause(rng)}."
    elif shape == 1:
        text = f"Did {_subject(rng)} really see {_noun_phrase(rng)} {rng.choice(_PLACES)}?"
    elif shape == 2:
        text = f"{_subject(rng)} counted {_number(rng)} {rng.choice(_UNITS)} {rng.choice(_TIMES)}."
    elif shape == 3:
        clause = _clause(rng)
        text = f'"{clause[0].upper()}{clause[1:]}!" said {_subject(rng)}.'
    elif shape == 4:
        items = [_a(rng.choice(_OBJECTS)) for _ in range(3)]
        text = f"{_subject(rng)} needs {items[0]}, {items[1]} and {items[2]}; nothing else."
    elif shape == 5:
        text = f"In {rng.randint(1900, 2030)}, {_name(rng)} from {_name(rng)} {rng.choice(_VERBS)} {_noun_phrase(rng)}."
    elif shape == 6:
        text = f"Why is {_noun_phrase(rng)} so {rng.choice(_ADJECTIVES)}? Nobody knows: ask {_subject(rng)}."
    else:
        text = f"{_clause(rng)}."
    return text[0].upper() + text[1:]


def synthetic_corpus(num_lines: int, seed: int = 0) -> list[str]:
    """``num_lines`` deterministic English-like lines (one to three sentences each)."""
    if num_lines < 0:
        raise ConfigError(f"num_lines must be >= 0, got {num_lines}")
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(num_lines)]


# --- presets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BasePreset:
    """The shape of a base model and of the tokenizer trained for it."""

    architecture: Architecture
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the model's embedding; may exceed what the tokenizer uses
    tokenizer_vocab: int  # the size the tokenizer trains to (at most vocab_size)
    max_position_embeddings: int
    corpus_lines: int


PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset("llama", 64, 2, 4, 2, 128, 512, 512, 512, 2000),
    "tiny-bert": BasePreset("bert", 64, 2, 4, 4, 128, 512, 512, 512, 2000),
    "small": BasePreset("llama", 256, 4, 8, 4, 688, 2048, 2048, 1024, 20000),
    "bench-100m": BasePreset("llama", 768, 8, 12, 12, 2048, 32000, 4096, 2048, 20000),
    "bench-300m": BasePreset("llama", 1024, 24, 16, 16, 2816, 8192, 4096, 2048, 20000),
}

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

#: Zephyr-style chat template: a role header per message, each message closed by eos so that SFT
#: teaches the model to stop; ``add_generation_prompt`` opens the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_DTYPES = ("float32", "bfloat16", "float16")


def get_preset(name: str) -> BasePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown base preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None


def model_config(
    preset: str | BasePreset, *, special_ids: dict[str, int] | None = None, biases: bool = False
) -> PretrainedConfig:
    """The transformers config of a preset (no weights), e.g. to count parameters on the meta device.
    ``biases``: every linear layer of a Llama preset's blocks gets a bias (BERT's always have one)."""
    spec = get_preset(preset) if isinstance(preset, str) else preset
    ids = special_ids or {}
    if spec.architecture == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=ids.get("bos", 1),
            eos_token_id=ids.get("eos", 2),
            pad_token_id=ids.get("pad", 3),
            tie_word_embeddings=False,
            attention_bias=biases,
            mlp_bias=biases,
        )
    from transformers import BertConfig

    return BertConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=ids.get("pad", 0),
    )


# --- tokenizers ----------------------------------------------------------------------------------


def _train_llama_tokenizer(spec: BasePreset, corpus: list[str]) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # byte-level BPE: every string round-trips, no text is ever <unk>
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab,
        min_frequency=2,
        special_tokens=list(LLAMA_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            # Llama convention: <s> starts every encoded text (the chat template writes its own)
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]),
        ]
    )
    return tokenizer


_PRIVATE_USE = 0xF0000  # supplementary private-use plane: never produced by the normaliser below


def _train_bert_tokenizer(spec: BasePreset, corpus: list[str]) -> Tokenizer:
    # tokenizers' WordPieceTrainer is not deterministic (huggingface/tokenizers#1794): it numbers
    # the "##x" pieces in hash-map order, and those ids break ties between merges. It is BPE
    # training underneath, so train BPE instead with every word-internal character spelled as
    # its own private-use character (BPE numbers its alphabet in sorted order, so the whole run
    # is deterministic), then spell those pieces back as "##" WordPiece tokens.
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    lines = [[word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))] for line in corpus]
    inner = sorted({char for words in lines for word in words for char in word[1:]})
    marked = {char: chr(_PRIVATE_USE + i) for i, char in enumerate(inner)}
    unmarked = {mark: char for char, mark in marked.items()}

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab,
        min_frequency=2,
        special_tokens=list(BERT_SPECIALS),
        show_progress=False,
    )
    bpe.train_from_iterator(
        (" ".join(word[0] + "".join(marked[c] for c in word[1:]) for word in words) for words in lines),
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


def build_tokenizer(preset: str | BasePreset, *, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the preset's tokenizer on ``synthetic_corpus`` and wrap it for transformers."""
    from transformers import PreTrainedTokenizerFast

    spec = get_preset(preset) if isinstance(preset, str) else preset
    corpus = synthetic_corpus(spec.corpus_lines, seed=seed)
    if spec.architecture == "llama":
        backend = _train_llama_tokenizer(spec, corpus)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            model_max_length=spec.max_position_embeddings,
        )
        wrapped.chat_template = CHAT_TEMPLATE
    else:
        backend = _train_bert_tokenizer(spec, corpus)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=spec.max_position_embeddings,
        )
    if len(wrapped) > spec.vocab_size:
        raise ConfigError(f"tokenizer has {len(wrapped)} tokens but the model vocabulary is {spec.vocab_size}")
    return wrapped


# --- models --------------------------------------------------------------------------------------


def _portable_tokenizer_class(folder: Path) -> None:
    # transformers 5 records its internal class name ("TokenizersBackend"), which transformers 4
    # cannot load; "PreTrainedTokenizerFast" names the same thing in both
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"{path} exists and is not a folder")
    if any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{path} is not empty; pass overwrite=True to replace it")


def _new_model(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised model of a :func:`model_config` config (llama: causal LM, bert: masked LM)."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config)
    if isinstance(config, BertConfig):
        return BertForMaskedLM(config)
    raise RuntimeError(f"model_config made a {type(config).__name__}, which no preset architecture uses")


def build_base(
    path: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "float32",
    biases: bool = False,
) -> Path:
    """Build a base model folder (weights, config, tokenizer) from ``preset``; returns ``path``.
    ``biases``: give every linear layer of a Llama preset's blocks a bias, as some bases have
    (Qwen2's attention; what BitFit trains); the Llama presets have none.

    Deterministic: the same preset and seed give identical ``model.safetensors`` and
    ``tokenizer.json``. Refuses a non-empty ``path`` unless ``overwrite``.
    """
    spec = get_preset(preset)
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    path = Path(path)
    _check_target(path, overwrite)

    import torch
    from transformers import GenerationConfig

    tokenizer = build_tokenizer(spec, seed=seed)
    if spec.architecture == "llama":
        ids = {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
        }
        config = model_config(spec, special_ids=ids, biases=biases)
    else:
        config = model_config(spec, special_ids={"pad": tokenizer.pad_token_id})

    # fork_rng: seeding must not disturb the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_model(config)  # always initialised in float32, cast after: dtypes share weights
    model.eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    if spec.architecture == "llama":
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    # build aside, then swap in: a crash never leaves a half-written base at ``path``
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_tokenizer_class(staging)
        provenance = {"preset": preset, "seed": seed, "dtype": dtype, "biases": biases, "shape": asdict(spec)}
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


__all__ = [
    "BasePreset",
    "CHAT_TEMPLATE",
    "PRESETS",
    "PROVENANCE_FILE",
    "build_base",
    "build_tokenizer",
    "get_preset",
    "model_config",
    "synthetic_corpus",
]
