"""Shared fixtures. Heavy imports (torch, transformers) happen inside fixtures, so that tests
that need none of them (the registry's) collect and run without loading them."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(scope="session", autouse=True)
def _tests_keep_out_of_the_users_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches the code writes by default (weight digests, pulled modules) go to a folder of this
    test session, never to ~/.cache/tunehub; tests that need their own home still set one."""
    import os

    if "TUNEHUB_HOME" not in os.environ:
        os.environ["TUNEHUB_HOME"] = str(tmp_path_factory.mktemp("tunehub-home"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-shaped causal LM with a byte-level BPE tokenizer, built once per session."""
    from tunehub.trainer.base import build_base

    return build_base(tmp_path_factory.mktemp("bases") / "tiny-llama", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_biased_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a bias on every linear layer (what BitFit trains), built once per session."""
    from tunehub.trainer.base import build_base

    return build_base(tmp_path_factory.mktemp("bases") / "tiny-biased", "tiny", seed=0, biases=True)


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT-shaped masked LM with a WordPiece tokenizer, built once per session."""
    from tunehub.trainer.base import build_base

    return build_base(tmp_path_factory.mktemp("bases") / "tiny-bert", "tiny-bert", seed=0)


@pytest.fixture
def lora_module(tiny_llama_path: Path, tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``lora_module(seed=0, kind="lora", r=4)`` writes a module for the tiny Llama."""
    from tunehub.trainer.testing import make_lora_module

    counter = itertools.count()

    def make(seed: int = 0, kind: str = "lora", r: int = 4) -> Path:
        out = tmp_path / f"module-{kind}-r{r}-s{seed}-{next(counter)}"
        return make_lora_module(tiny_llama_path, out, seed=seed, kind=kind, r=r)

    return make


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TUNEHUB_HOME for this test, with no TUNEHUB_REGISTRY override."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNEHUB_HOME", str(home))
    monkeypatch.delenv("TUNEHUB_REGISTRY", raising=False)
    return home
