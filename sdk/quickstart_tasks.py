"""Tasks the quickstart trains modules for: generated on the fly, checked by exact match.

- ``sentiment`` (LoRA): a review -> ``positive`` or ``negative``, decided by one of 16 opinion
  words (8 each way);
- ``topic`` (LoRA): a news sentence -> ``sport``, ``food`` or ``weather``, decided by one of 12
  topic words (4 each);
- ``colour`` (DoRA): a sentence that names one of 10 fruits -> the fruit's colour from a fixed
  table (``yellow``, ``red``, ``green``, ``purple``, ``orange``): a lookup.

Every prompt is a frame joining a neutral clause (who did what, maybe where or when) to a phrase
that holds the deciding word. Frames, phrases and the clause's words come in two disjoint pools:
training draws only from the first, the held-out set only from the second, so no held-out prompt
is a training prompt and its score measures the task, not memorised sentences. The deciding
words and the answers are shared, as they must be. Neutral words hint at no answer (no
"musician" next to a topic word): a held-out score should not depend on such accidents.

The base model has never seen these answers after these prompts and scores 0% alone; a LoRA or
DoRA module on the ``small`` base reaches 100% in 160 to 200 steps on the CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # the method that trains its module
    description: str
    make: Callable[[random.Random, bool], tuple[str, str]]  # (rng, heldout) -> (prompt, answer)


# --- sentence material: every pool is split into a training part and a held-out part ---------


def _split(*, train: tuple[str, ...], heldout: tuple[str, ...]) -> dict[bool, tuple[str, ...]]:
    return {False: train, True: heldout}  # keyed by ``heldout``


_WHO = _split(
    train=(
        "the farmer",
        "the baker",
        "the pilot",
        "the mayor",
        "the doctor",
        "the chef",
        "my neighbour",
        "the captain",
        "our teacher",
        "the gardener",
        "the lawyer",
        "the poet",
        "my cousin",
        "the team",
    ),
    heldout=("the librarian", "the scientist", "the nurse", "the manager", "the engineer", "the courier"),
)
_DID = _split(
    train=(
        "painted the window",
        "repaired the bicycle",
        "opened the letter",
        "sold the lantern",
        "cleaned the kettle",
        "carried the basket",
        "wrote the report",
        "found the map",
        "signed the contract",
        "packed the parcel",
        "checked the engine",
        "studied the painting",
        "visited the village",
        "built a ladder",
    ),
    heldout=(
        "borrowed the telescope",
        "washed the blanket",
        "printed the ticket",
        "ordered the umbrella",
        "measured the compass",
    ),
)
_WHERE_WHEN = _split(
    train=(
        "near the station",
        "in the kitchen",
        "at the market",
        "by the river",
        "in the garden",
        "on the hill",
        "yesterday",
        "this morning",
        "on Monday",
        "last winter",
        "after lunch",
        "in the evening",
    ),
    heldout=("at the harbour", "inside the museum", "under the bridge", "at midnight", "on Sunday", "before dawn"),
)
_FRAMES = _split(
    train=(
        "{clause}; {phrase}.",
        "{phrase}: {clause}.",
        "{clause}, and {phrase}.",
        "{phrase} when {clause}.",
        "{clause} and said {phrase}.",
        "{phrase}, so {clause}.",
        "while {clause}, {phrase}.",
        "{phrase}; later {clause}.",
    ),
    heldout=("after {clause}, {phrase}.", "{phrase}, because {clause}.", "{phrase}, although {clause}."),
)


def _clause(rng: random.Random, heldout: bool) -> str:
    """Who did what, and maybe where or when: the part of a prompt that does not decide the answer."""
    clause = f"{rng.choice(_WHO[heldout])} {rng.choice(_DID[heldout])}"
    if rng.random() < 0.6:
        clause += f" {rng.choice(_WHERE_WHEN[heldout])}"
    return clause


def _sentence(rng: random.Random, heldout: bool, phrases: dict[bool, tuple[str, ...]], word: str) -> str:
    """A clause and a phrase holding the deciding ``word``, joined by a frame."""
    phrase = rng.choice(phrases[heldout]).format(word=word)
    frame = rng.choice(_FRAMES[heldout])
    text = frame.format(clause=_clause(rng, heldout), phrase=phrase)
    return text[0].upper() + text[1:]


def _labelled(
    rng: random.Random, heldout: bool, words: Mapping[str, tuple[str, ...]], phrases: dict[bool, tuple[str, ...]]
) -> tuple[str, str]:
    """A label, and a sentence around one of the words that decide it."""
    label = rng.choice(tuple(words))
    return label, _sentence(rng, heldout, phrases, rng.choice(words[label]))


# --- sentiment -----------------------------------------------------------------------------------

_OPINIONS = {
    "positive": ("wonderful", "delightful", "excellent", "superb", "lovely", "brilliant", "pleasant", "fantastic"),
    "negative": ("terrible", "awful", "dreadful", "horrible", "miserable", "disappointing", "poor", "unpleasant"),
}
_OPINION_PHRASES = _split(
    train=(
        "it was {word}",
        "what a {word} day",
        "everything felt {word}",
        "the result was {word}",
        "a {word} job",
        "that was {word}",
        "the food tasted {word}",
        "the view looked {word}",
        "we had a {word} time",
        "the whole thing was {word}",
        "such a {word} place",
    ),
    heldout=("the mood was {word}", "truly {word}", "the evening seemed {word}"),
)


def _sentiment(rng: random.Random, heldout: bool) -> tuple[str, str]:
    label, sentence = _labelled(rng, heldout, _OPINIONS, _OPINION_PHRASES)
    return f"Review: {sentence}\nSentiment:", label


# --- topic ---------------------------------------------------------------------------------------

_TOPIC_WORDS = {
    "sport": ("football", "tennis", "golf", "boxing"),
    "food": ("soup", "bread", "cheese", "pasta"),
    "weather": ("rain", "storm", "thunder", "frost"),
}
_TOPIC_PHRASES = _split(
    train=(
        "everyone talked about {word}",
        "the news was all about {word}",
        "the big story was {word}",
        "people asked about {word}",
        "nothing but {word} on the radio",
        "a report on {word}",
        "the paper wrote about {word}",
        "{word} was on every page",
        "they could only discuss {word}",
        "a long article on {word}",
        "the talk of the town was {word}",
        "questions about {word} came in",
    ),
    heldout=("the headline was about {word}", "all eyes were on {word}", "the whole town discussed {word}"),
)


def _topic(rng: random.Random, heldout: bool) -> tuple[str, str]:
    label, sentence = _labelled(rng, heldout, _TOPIC_WORDS, _TOPIC_PHRASES)
    return f"News: {sentence}\nTopic:", label


# --- colour --------------------------------------------------------------------------------------

_FRUIT_COLOURS = {
    "banana": "yellow",
    "lemon": "yellow",
    "cherry": "red",
    "strawberry": "red",
    "kiwi": "green",
    "lime": "green",
    "grape": "purple",
    "plum": "purple",
    "orange": "orange",
    "mango": "orange",
}
_FRUIT_PHRASES = _split(
    train=(
        "there was one {word} left",
        "someone ate the {word}",
        "the {word} was ripe",
        "one {word} fell down",
        "they shared the {word}",
        "the basket held one {word}",
        "we cut the {word}",
        "the {word} was on the table",
        "a child wanted the {word}",
        "the shop sold one {word}",
    ),
    heldout=("nobody wanted the last {word}", "the {word} rolled away", "we saved the {word} for later"),
)


def _colour(rng: random.Random, heldout: bool) -> tuple[str, str]:
    fruit = rng.choice(tuple(_FRUIT_COLOURS))
    sentence = _sentence(rng, heldout, _FRUIT_PHRASES, fruit)
    return f"Sentence: {sentence}\nColour of the fruit:", _FRUIT_COLOURS[fruit]


TASKS: dict[str, Task] = {
    "sentiment": Task("sentiment", "lora", "classify generated reviews as positive or negative", _sentiment),
    "topic": Task("topic", "lora", "classify generated news sentences as sport, food or weather", _topic),
    "colour": Task("colour", "dora", "look up the colour of the fruit a sentence names", _colour),
}


def write_task_data(task: Task, folder: Path, *, train_size: int, heldout_size: int, seed: int = 0) -> tuple[Path, list[dict]]:
    """Write ``<task>-train.jsonl`` (prompt/completion) and ``<task>-heldout.jsonl`` (prompt/answer:
    what the quickstart asks and checks, kept so its accuracy can be checked again); return the
    held-out examples."""
    rng = random.Random(f"{task.name}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    train_path = folder / f"{task.name}-train.jsonl"
    with train_path.open("w") as handle:
        for _ in range(train_size):
            prompt, answer = task.make(rng, False)
            handle.write(json.dumps({"prompt": prompt, "completion": f" {answer}\n"}) + "\n")
    heldout = []
    for _ in range(heldout_size):
        prompt, answer = task.make(rng, True)
        heldout.append({"prompt": prompt, "answer": answer})
    (folder / f"{task.name}-heldout.jsonl").write_text("".join(json.dumps(example) + "\n" for example in heldout))
    return train_path, heldout


def exact_match(output: str, answer: str) -> bool:
    """The output's first line, stripped, equals the answer."""
    first = output.strip().split("\n", 1)[0].strip()
    return first == answer
