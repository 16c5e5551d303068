"""Tasks the quickstart trains modules for: generated on the fly, checkable by exact match.

Each task has a fixed answer space the base model has never seen in that form (invented country
names, sentiment labels, sums), so the base alone scores near zero and a small module can learn
it in a few hundred steps on the CPU. Train and held-out sets use different sentence frames, so
the held-out score measures the task, not memorised prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_POSITIVE = ("wonderful", "delightful", "excellent", "superb", "lovely", "brilliant", "pleasant", "fantastic")
_NEGATIVE = ("terrible", "awful", "dreadful", "horrible", "miserable", "disappointing", "poor", "unpleasant")
_SUBJECTS = ("the meal", "our trip", "the concert", "this book", "the hotel", "the service", "that film", "the class")
_FRAMES_TRAIN = ("{s} was {w}.", "honestly, {s} was {w}.", "{s} felt {w} to me.", "I found {s} {w}.")
_FRAMES_HELDOUT = ("everyone agreed {s} was {w}.", "in short: {w}, {s}.")
_SYLLABLES = ("ka", "to", "ri", "mel", "an", "sor", "vi", "len", "da", "mo", "ber", "ta", "lin", "ro", "ze", "nor")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # the method that trains its module
    description: str
    make: Callable[[random.Random, bool], tuple[str, str]]  # (rng, heldout) -> (prompt, answer)


def _sentiment(rng: random.Random, heldout: bool) -> tuple[str, str]:
    positive = rng.random() < 0.5
    word = rng.choice(_POSITIVE if positive else _NEGATIVE)
    frame = rng.choice(_FRAMES_HELDOUT if heldout else _FRAMES_TRAIN)
    sentence = frame.format(s=rng.choice(_SUBJECTS), w=word)
    return f"Review: {sentence}\nSentiment:", "positive" if positive else "negative"


def _countries(seed: int = 7, count: int = 12) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    names: set[str] = set()
    pairs = []
    while len(pairs) < count:
        country = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize() + "ia"
        capital = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        if country in names or capital in names:
            continue
        names.update((country, capital))
        pairs.append((country, capital))
    return pairs


_CAPITALS = _countries()


def _capital(rng: random.Random, heldout: bool) -> tuple[str, str]:
    country, capital = rng.choice(_CAPITALS)
    frames = ("Which city is the capital of {c}?", "Name the capital of {c}.") if heldout else (
        "What is the capital of {c}?", "The capital of {c} is which city?", "Capital of {c}?")
    return f"{rng.choice(frames).format(c=country)}\nAnswer:", capital


def _plus(rng: random.Random, heldout: bool) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    frames = ("Add {a} and {b}.", "What do {a} and {b} make?") if heldout else (
        "What is {a} plus {b}?", "{a} + {b} =", "Compute {a} plus {b}.")
    return f"{rng.choice(frames).format(a=a, b=b)}\nAnswer:", str(a + b)


TASKS: dict[str, Task] = {
    "sentiment": Task("sentiment", "lora", "classify generated reviews as positive or negative", _sentiment),
    "capital": Task("capital", "dora", "look up the capital of an invented country", _capital),
    "plus": Task("plus", "lora", "add two digits", _plus),
}


def write_task_data(task: Task, folder: Path, *, train_size: int, heldout_size: int, seed: int = 0) -> tuple[Path, list[dict]]:
    """Write ``train.jsonl`` (prompt/completion) and return the held-out examples."""
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
    return train_path, heldout


def exact_match(output: str, answer: str) -> bool:
    """The module's first line, stripped, equals the answer."""
    first = output.strip().split("\n", 1)[0].strip()
    return first == answer
