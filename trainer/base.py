"""Build small base models (and their tokenizers) from configs alone: no downloads, ever.

Tests, examples and benchmarks need a real base model folder (``config.json``, safetensors
weights, ``tokenizer.json`` with a chat template) but must never fetch one. ``build_base``
trains a real tokenizer on a synthetic English-like corpus and initialises a Llama- or
BERT-shaped model from a named preset, deterministically: the same preset and seed give
byte-identical weights and ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tunehub.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported lazily: listing presets must stay cheap
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


def build_tokenizer(preset: str | BasePreset, *, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the preset's tokenizer on ``synthetic_corpus`` and wrap it for transformers
    (llama presets: byte-level BPE; bert presets: WordPiece; see ``trainer/tokenizers.py``)."""
    from tunehub.trainer.tokenizers import train_backend, wrap_tokenizer

    spec = get_preset(preset) if isinstance(preset, str) else preset
    corpus = synthetic_corpus(spec.corpus_lines, seed=seed)
    kind = "bpe" if spec.architecture == "llama" else "wordpiece"
    backend = train_backend(kind, lambda: corpus, spec.tokenizer_vocab)
    wrapped = wrap_tokenizer(backend, kind, model_max_length=spec.max_position_embeddings)
    if len(wrapped) > spec.vocab_size:
        raise ConfigError(f"tokenizer has {len(wrapped)} tokens but the model vocabulary is {spec.vocab_size}")
    return wrapped


#: the special tokens a base of each architecture needs from its tokenizer
_NEEDED_SPECIALS: dict[str, tuple[str, ...]] = {
    "llama": ("bos_token", "eos_token", "pad_token"),
    "bert": ("pad_token", "cls_token", "sep_token", "mask_token"),
}


def load_base_tokenizer(folder: str | Path, spec: BasePreset) -> PreTrainedTokenizerFast:
    """A tokenizer folder (``tunehub tokenizer train``'s, or any fast tokenizer's) checked for the
    special tokens ``spec``'s architecture needs; a Llama base gets the presets' chat template
    when the tokenizer has none. Raises ConfigError naming what is missing."""
    from transformers import PreTrainedTokenizerFast

    path = Path(folder).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"--tokenizer: {path} holds no tokenizer.json (make one with tunehub tokenizer train)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    missing = [name for name in _NEEDED_SPECIALS[spec.architecture] if getattr(tokenizer, name) is None]
    if missing:
        hint = "--type bpe or unigram" if spec.architecture == "llama" else "--type wordpiece"
        raise ConfigError(
            f"--tokenizer: {path} has no {', '.join(missing)}, which a {spec.architecture} base needs"
            f" (tunehub tokenizer train {hint} makes one that has)"
        )
    tokenizer.model_max_length = spec.max_position_embeddings
    if spec.architecture == "llama" and not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- models --------------------------------------------------------------------------------------


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
    tokenizer: str | Path | None = None,
) -> Path:
    """Build a base model folder (weights, config, tokenizer) from ``preset``; returns ``path``.
    ``biases``: give every linear layer of a Llama preset's blocks a bias, as some bases have
    (Qwen2's attention; what BitFit trains); the Llama presets have none. ``tokenizer``: a
    tokenizer folder to use instead of the preset's (``tunehub tokenizer train``): the model's
    vocabulary size follows it, the rest of the shape is the preset's.

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

    from tunehub.trainer.tokenizers import save_tokenizer

    if tokenizer is None:
        wrapped = build_tokenizer(spec, seed=seed)
    else:
        wrapped = load_base_tokenizer(tokenizer, spec)
        spec = replace(spec, vocab_size=len(wrapped), tokenizer_vocab=len(wrapped))
    if spec.architecture == "llama":
        ids = {
            "bos": wrapped.bos_token_id,
            "eos": wrapped.eos_token_id,
            "pad": wrapped.pad_token_id,
        }
        config = model_config(spec, special_ids=ids, biases=biases)
    else:
        config = model_config(spec, special_ids={"pad": wrapped.pad_token_id})

    # fork_rng: seeding must not disturb the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_model(config)  # always initialised in float32, cast after: dtypes share weights
    model.eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    if spec.architecture == "llama":
        model.generation_config = GenerationConfig(
            bos_token_id=wrapped.bos_token_id,
            eos_token_id=wrapped.eos_token_id,
            pad_token_id=wrapped.pad_token_id,
        )

    # build aside, then swap in: a crash never leaves a half-written base at ``path``
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        model.save_pretrained(staging)
        save_tokenizer(wrapped, staging)
        provenance: dict[str, object] = {"preset": preset, "seed": seed, "dtype": dtype, "biases": biases, "shape": asdict(spec)}
        if tokenizer is not None:  # absent otherwise: preset bases keep their exact provenance file
            digest = hashlib.sha256((staging / "tokenizer.json").read_bytes()).hexdigest()
            provenance["tokenizer"] = {"source": str(Path(tokenizer).expanduser().resolve()), "sha256": digest}
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
    "load_base_tokenizer",
    "model_config",
    "synthetic_corpus",
]
