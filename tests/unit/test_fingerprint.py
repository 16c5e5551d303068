"""Base fingerprints identify the weights (content hash, or Hub commit), cached by file identity;
serving refuses a module trained on other weights or with another tokenizer."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tunehub.errors import IncompatibleBase
from tunehub.registry import fingerprint
from tunehub.registry.fingerprint import (
    base_fingerprint,
    hub_snapshot,
    is_legacy_fingerprint,
    short_fingerprint,
    tokenizer_fingerprint,
)

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "digest-cache" / "weight-digests.json"


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts the files whose weights are read and hashed."""
    calls = []
    real = fingerprint.hash_weight_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(fingerprint, "hash_weight_file", counting)
    return calls


@pytest.fixture(scope="module")
def seed_one_base(tmp_path_factory):
    from tunehub.trainer.base import build_base

    return build_base(tmp_path_factory.mktemp("seeds") / "tiny-seed1", "tiny", seed=1)


@pytest.fixture(scope="module", autouse=True)
def own_home(tmp_path_factory):
    """The default digest cache (under TUNEHUB_HOME) of this file's tests is their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNEHUB_HOME", str(tmp_path_factory.mktemp("home")))
        yield


def _copy_base(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose files were last written an hour ago (old enough to be cached)."""
    shutil.copytree(source, target)
    for file in target.iterdir():
        stat = os.stat(file)
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns - 3600 * 10**9))
    return target


# --- what the fingerprint tells apart -------------------------------------------------------------


def test_another_seed_is_another_base(tiny_llama_path, seed_one_base, cache):
    # same preset: same architecture and shapes; other weights (and tokenizer)
    seed0, seed1 = base_fingerprint(tiny_llama_path, cache_path=cache), base_fingerprint(seed_one_base, cache_path=cache)
    assert seed0 != seed1
    assert seed0.startswith("w1:") and seed1.startswith("w1:")


def test_same_seed_is_the_same_base(tiny_llama_path, tmp_path, cache):
    from tunehub.trainer.base import build_base

    again = build_base(tmp_path / "again", "tiny", seed=0)
    assert base_fingerprint(again, cache_path=cache) == base_fingerprint(tiny_llama_path, cache_path=cache)


def test_bfloat16_copy_is_the_same_base_float16_copy_is_not(tiny_llama_path, tmp_path, cache):
    from tunehub.trainer.base import build_base

    fp32 = base_fingerprint(tiny_llama_path, cache_path=cache)
    bf16 = build_base(tmp_path / "bf16", "tiny", seed=0, dtype="bfloat16")
    fp16 = build_base(tmp_path / "fp16", "tiny", seed=0, dtype="float16")
    # float tensors hash as their bfloat16 values: the bf16 cast of the fp32 weights is those weights
    assert base_fingerprint(bf16, cache_path=cache) == fp32
    # fp16 rounds to other values (documented: another base)
    assert base_fingerprint(fp16, cache_path=cache) != fp32


def test_how_tensors_are_split_into_files_does_not_matter(tiny_llama_path, tmp_path, cache):
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_llama_path / "model.safetensors")
    sharded = _copy_base(tiny_llama_path, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, sharded / "model-00002-of-00002.safetensors")
    assert base_fingerprint(sharded, cache_path=cache) == base_fingerprint(tiny_llama_path, cache_path=cache)


def test_one_changed_value_is_another_base(tiny_llama_path, tmp_path, cache):
    from safetensors.torch import load_file, save_file

    changed = _copy_base(tiny_llama_path, tmp_path / "changed")
    tensors = load_file(changed / "model.safetensors")
    tensors["model.norm.weight"][0] += 0.5
    save_file(tensors, changed / "model.safetensors")
    assert base_fingerprint(changed, cache_path=cache) != base_fingerprint(tiny_llama_path, cache_path=cache)


def test_a_tensor_in_two_files_is_refused(tiny_llama_path, tmp_path, cache):
    from tunehub.errors import ManifestError

    doubled = _copy_base(tiny_llama_path, tmp_path / "doubled")
    shutil.copy(doubled / "model.safetensors", doubled / "model-copy.safetensors")
    with pytest.raises(ManifestError, match="tensor 'lm_head.weight' is in more than one weight file"):
        base_fingerprint(doubled, cache_path=cache)


# --- the digest cache --------------------------------------------------------------------------------


def test_second_fingerprint_reads_no_weights(tiny_llama_path, tmp_path, cache, hash_calls):
    base = _copy_base(tiny_llama_path, tmp_path / "base")
    first = base_fingerprint(base, cache_path=cache)
    assert hash_calls == ["model.safetensors"]
    assert base_fingerprint(base, cache_path=cache) == first
    assert hash_calls == ["model.safetensors"]  # served from the cache
    # a new mtime is a changed file: hashed again
    stat = os.stat(base / "model.safetensors")
    os.utime(base / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert base_fingerprint(base, cache_path=cache) == first
    assert hash_calls == ["model.safetensors"] * 2


def test_a_rewritten_file_gets_its_new_fingerprint(tiny_llama_path, seed_one_base, tmp_path, cache, hash_calls):
    base = _copy_base(tiny_llama_path, tmp_path / "base")
    before = base_fingerprint(base, cache_path=cache)
    shutil.copy(seed_one_base / "model.safetensors", base / "model.safetensors")  # same size, other values
    assert base_fingerprint(base, cache_path=cache) == base_fingerprint(seed_one_base, cache_path=cache) != before


def test_a_file_written_just_now_is_not_cached_yet(tiny_llama_path, tmp_path, cache, hash_calls):
    # its mtime could still be shared by a same-size rewrite: hashed until it is older
    base = _copy_base(tiny_llama_path, tmp_path / "base")
    os.utime(base / "model.safetensors")  # written now
    first = base_fingerprint(base, cache_path=cache)
    assert base_fingerprint(base, cache_path=cache) == first
    assert hash_calls == ["model.safetensors"] * 2


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffnot json",
        b"[1, 2]",
        b'{"version": 1, "entries": []}',
        b'{"version": 99, "entries": {}}',
        b"[" * 100_000,
        None,  # an entry under the file's very identity, with a digest that is not one
    ],
    ids=["binary", "list", "entries-list", "other-version", "deep", "bad-entry"],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(tiny_llama_path, tmp_path, cache, hash_calls, content):
    base = _copy_base(tiny_llama_path, tmp_path / "base")
    expected = base_fingerprint(base, cache_path=tmp_path / "clean.json")
    if content is None:
        stat = os.stat(base / "model.safetensors")
        identity = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
        entry = {"lm_head.weight": ["float", [512, 64], "not-a-digest"]}
        content = json.dumps({"version": 1, "entries": {identity: entry}}).encode()
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    assert base_fingerprint(base, cache_path=cache) == expected
    rewritten = json.loads(cache.read_text())
    assert rewritten["version"] == 1 and len(rewritten["entries"]) == 1
    assert list(cache.parent.iterdir()) == [cache]  # written aside and renamed: no stray file left
    calls = len(hash_calls)
    assert base_fingerprint(base, cache_path=cache) == expected
    assert len(hash_calls) == calls


def test_an_unwritable_cache_still_fingerprints(tiny_llama_path, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the cache's folder cannot be created under a file: no cache, same fingerprint
    assert base_fingerprint(tiny_llama_path, cache_path=blocker / "cache.json") == base_fingerprint(
        tiny_llama_path, cache_path=tmp_path / "cache.json"
    )


def test_the_default_cache_lives_in_tunehub_home(tiny_llama_path, tmp_path, tmp_home, hash_calls):
    base = _copy_base(tiny_llama_path, tmp_path / "base")
    base_fingerprint(base)
    assert json.loads((tmp_home / "cache" / "weight-digests.json").read_text())["version"] == 1
    base_fingerprint(base)
    assert hash_calls == ["model.safetensors"]


# --- hub snapshots ------------------------------------------------------------------------------------


def _snapshot(tiny_llama_path: Path, cache_dir: Path, repo: str, commit: str) -> Path:
    """A Hugging Face cache snapshot folder, laid out as snapshot_download leaves it."""
    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return _copy_base(tiny_llama_path, repo_dir / "snapshots" / commit)


def test_a_hub_snapshot_is_fingerprinted_by_its_commit(tiny_llama_path, tmp_path, cache, hash_calls):
    from tunehub.trainer.export import base_info

    folder = _snapshot(tiny_llama_path, tmp_path / "hf", "org/tiny", COMMIT_A)
    assert hub_snapshot(folder) == fingerprint.HubSnapshot(repo_id="org/tiny", revision=COMMIT_A)
    at_a = base_fingerprint(folder, cache_path=cache)
    assert at_a.startswith("hub1:")
    assert hash_calls == []  # the commit names the weights: none are read
    at_b = base_fingerprint(_snapshot(tiny_llama_path, tmp_path / "hf", "org/tiny", COMMIT_B), cache_path=cache)
    assert at_b.startswith("hub1:") and at_b != at_a
    # another cache holding the same commit: the same base
    assert base_fingerprint(_snapshot(tiny_llama_path, tmp_path / "hf2", "org/tiny", COMMIT_A), cache_path=cache) == at_a
    info = base_info(folder)
    assert (info.model_id, info.revision, info.fingerprint) == ("org/tiny", COMMIT_A, at_a)


def test_a_folder_that_only_looks_like_a_snapshot_is_hashed(tiny_llama_path, tmp_path, cache):
    # not under models--<repo>: an ordinary folder whatever its name
    lookalike = _copy_base(tiny_llama_path, tmp_path / "stuff" / "snapshots" / COMMIT_A)
    assert hub_snapshot(lookalike) is None
    assert base_fingerprint(lookalike, cache_path=cache) == base_fingerprint(tiny_llama_path, cache_path=cache)


def test_legacy_and_short_fingerprints():
    legacy = "0123456789abcdef" * 4
    assert is_legacy_fingerprint(legacy)
    assert not is_legacy_fingerprint("w1:" + legacy) and not is_legacy_fingerprint("hub1:" + legacy)
    assert short_fingerprint("w1:" + legacy) == "w1:0123456789ab"
    assert short_fingerprint(legacy) == "0123456789ab"
    assert short_fingerprint(None) == "none"


# --- serving: the engine admits modules of this base and tokenizer only -----------------------------------


@pytest.fixture(scope="module")
def seed_one_module(seed_one_base, tmp_path_factory):
    from tunehub.registry.manifest import Manifest
    from tunehub.trainer.testing import make_lora_module

    return Manifest.read(make_lora_module(seed_one_base, tmp_path_factory.mktemp("modules") / "m", seed=3))


def _served(base_path: Path, quantization: str = "none"):
    from tunehub.server.engine.base import load_base

    return load_base(base_path, quantization=quantization, device="cpu")


def test_a_module_is_refused_on_a_base_of_another_seed(seed_one_module, tiny_llama_path):
    from tunehub.server.engine.modules import ModuleMaterializer

    served = _served(tiny_llama_path)
    expected = seed_one_module.base.fingerprint
    with pytest.raises(IncompatibleBase) as refused:
        ModuleMaterializer(served, {}).admit(seed_one_module, "t/m@1")
    assert str(refused.value) == (
        f"t/m@1 was trained for base {seed_one_module.base.model_id} (fingerprint {short_fingerprint(expected)});"
        f" this server runs {served.name} (fingerprint {short_fingerprint(served.fingerprint)})"
    )
    assert short_fingerprint(expected) != short_fingerprint(served.fingerprint)
    assert refused.value.http_status == 422


def test_a_module_serves_on_its_base_in_fp32_bf16_and_4bit(seed_one_module, seed_one_base, tmp_path):
    from tunehub.server.engine.modules import ModuleMaterializer
    from tunehub.trainer.base import build_base

    bf16 = build_base(tmp_path / "bf16", "tiny", seed=1, dtype="bfloat16")
    for folder, quantization in ((seed_one_base, "none"), (bf16, "none"), (bf16, "nf4")):
        served = _served(folder, quantization)
        assert served.fingerprint == seed_one_module.base.fingerprint
        assert served.tokenizer_fingerprint == seed_one_module.tokenizer.fingerprint
        ModuleMaterializer(served, {}).admit(seed_one_module, "t/m@1")  # no error


def test_another_tokenizer_alone_is_refused(seed_one_module, seed_one_base, tiny_llama_path, tmp_path):
    from tunehub.server.engine.modules import ModuleMaterializer

    # the module's weights, seed 0's tokenizer
    mixed = _copy_base(seed_one_base, tmp_path / "mixed")
    shutil.copy(tiny_llama_path / "tokenizer.json", mixed / "tokenizer.json")
    served = _served(mixed)
    assert served.fingerprint == seed_one_module.base.fingerprint
    with pytest.raises(IncompatibleBase) as refused:
        ModuleMaterializer(served, {}).admit(seed_one_module, "t/m@1")
    assert str(refused.value) == (
        f"t/m@1 was trained with the tokenizer of base {seed_one_module.base.model_id} (tokenizer fingerprint"
        f" {seed_one_module.tokenizer.fingerprint[:12]}); this server runs {served.name} with tokenizer"
        f" fingerprint {tokenizer_fingerprint(tiny_llama_path)[0][:12]}"
    )


def test_an_old_manifest_is_refused_naming_both_fingerprints(seed_one_module, seed_one_base):
    from tunehub.server.engine.modules import ModuleMaterializer

    old = "5" * 64  # what tunehub wrote before: architecture and shapes only
    manifest = seed_one_module.with_updates(base={**seed_one_module.base.model_dump(), "fingerprint": old})
    served = _served(seed_one_base)
    with pytest.raises(IncompatibleBase) as refused:
        ModuleMaterializer(served, {}).admit(manifest, "t/m@1")
    assert str(refused.value) == (
        f"t/m@1 was trained for base {manifest.base.model_id} (fingerprint 555555555555) (an older tunehub's"
        " fingerprint of the weights' shapes only, which cannot say which weights it was trained on: train it"
        f" again); this server runs {served.name} (fingerprint {short_fingerprint(served.fingerprint)})"
    )
