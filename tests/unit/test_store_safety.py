"""The registry touches only what it owns and trusts nothing it reads back.

- ``pull --dest`` never deletes or overwrites the user's files (both stores share the rule);
- version records with unsafe paths, weights that are not well-formed safetensors, special
  files and names the Hub refuses are all refused;
- ``gc`` cannot remove a blob that a concurrent push is reusing, and cleans up after killed
  pushes and promotes;
- ``tunehub ls`` in a pipe prints whole names.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
from pathlib import Path

import pytest

from tests.helpers import make_fake_module, safetensors_bytes
from tunehub.errors import Conflict, IntegrityError, ManifestError, StoreError, UnsafeFile
from tunehub.registry import local as local_module
from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import Manifest
from tunehub.registry.module import verify_module, write_module

DEAD_ENDPOINT = "http://127.0.0.1:9"  # never reached: the checks come before any request


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")


@pytest.fixture
def hub_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An hf:// store that may not go online: push checks must refuse before it tries."""
    from huggingface_hub import constants

    from tunehub.registry.hf import HubStore

    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubStore("acme", endpoint=DEAD_ENDPOINT, cache_dir=tmp_path / "hf")


def _rehash(folder: Path) -> Path:
    """Rewrite the manifest so that it lists what the folder now holds, with matching hashes."""
    write_module(folder, Manifest.read(folder))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. pull --dest never touches what the user owns ------------------------------------------


def test_pull_refuses_a_folder_with_a_stray_manifest_and_leaves_it_alone(store, tmp_path):
    # the issue's reproduction: `echo '{}' > manifest.json && echo keep > notes.txt && pull --dest .`
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    dest = tmp_path / "x"
    dest.mkdir()
    (dest / "manifest.json").write_text("{}\n")
    (dest / "notes.txt").write_text("keep\n")
    with pytest.raises(Conflict, match=r"not a pulled copy of this module.*--force"):
        store.pull("acme/demo@1", dest)
    assert _snapshot(dest) == {"manifest.json": b"{}\n", "notes.txt": b"keep\n"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_pull_refuses_a_module_folder_the_registry_does_not_hold(store, tmp_path):
    # a freshly trained module that was never pushed is the user's work, not a previous pull
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    trained = make_fake_module(tmp_path / "trained", task="mine")
    before = _snapshot(trained)
    with pytest.raises(Conflict, match="not a pulled copy"):
        store.pull("acme/demo", trained)
    assert _snapshot(trained) == before


def test_pull_refuses_an_edited_previous_pull(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    dest = store.pull("acme/demo@1", tmp_path / "out").path
    (dest / "adapter_config.json").write_text('{"edited": true}')
    with pytest.raises(Conflict, match="not a pulled copy"):
        store.pull("acme/demo@1", dest)
    assert (dest / "adapter_config.json").read_text() == '{"edited": true}'


def test_pull_into_the_current_folder_keeps_the_folder(store, tmp_path, monkeypatch):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    here = tmp_path / "here"
    here.mkdir()
    inode = os.stat(here).st_ino
    monkeypatch.chdir(here)
    pulled = store.pull("acme/demo@1", ".")
    assert pulled.path == here and os.stat(here).st_ino == inode  # the folder itself was not replaced
    assert verify_module(here).manifest.task == "demo"
    assert store.pull("acme/demo@1", ".").path == here  # a second pull finds it current


def test_pull_over_an_earlier_pull_replaces_it_and_same_version_is_left_alone(store, tmp_path):
    store.push(make_fake_module(tmp_path / "v1", extra_files={"tokenizer/vocab.txt": b"a b c"}), "acme/demo")
    store.push(make_fake_module(tmp_path / "v2"), "acme/demo")
    dest = tmp_path / "out"
    store.pull("acme/demo@1", dest)
    inode = os.stat(dest / "adapter_model.safetensors").st_ino
    store.pull("acme/demo@1", dest)  # exactly this version already: nothing is rewritten
    assert os.stat(dest / "adapter_model.safetensors").st_ino == inode
    store.pull("acme/demo@2", dest)  # another version of the same module: replaced
    assert _snapshot(dest) == _snapshot(tmp_path / "v2")  # v1's tokenizer/ is gone with it
    assert not (dest / "tokenizer").exists()


def test_force_writes_only_the_module_files_and_leaves_the_rest(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    dest = tmp_path / "x"
    (dest / "sub").mkdir(parents=True)
    (dest / "manifest.json").write_text("{}\n")
    (dest / "notes.txt").write_text("keep\n")
    (dest / "sub" / "data.csv").write_text("1,2\n")
    pulled = store.pull("acme/demo@1", dest, force=True)
    assert pulled.path == dest
    files = _snapshot(dest)
    assert files["notes.txt"] == b"keep\n" and files["sub/data.csv"] == b"1,2\n"
    source = _snapshot(tmp_path / "src")
    assert {k: v for k, v in files.items() if k in source} == source


def test_force_never_writes_through_a_linked_folder(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src", extra_files={"sub/notes.md": b"module"}), "acme/demo")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "x"
    dest.mkdir()
    (dest / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(Conflict, match="sub is not a folder"):
        store.pull("acme/demo@1", dest, force=True)
    assert list(outside.iterdir()) == []


def test_pull_refuses_a_file_as_destination(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(Conflict, match="exists and is not a folder"):
        store.pull("acme/demo", tmp_path / "file", force=True)
    assert (tmp_path / "file").read_text() == "mine"


def test_cache_copy_is_the_stores_own_and_is_repaired(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    cached = store.pull("acme/demo").path
    (cached / "stray.txt").write_text("x")
    assert _snapshot(store.pull("acme/demo").path) == _snapshot(tmp_path / "src")


def test_failed_pull_leaves_an_existing_folder_as_it_was(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    dest = tmp_path / "out"
    store.pull("acme/demo@1", dest)
    before = _snapshot(dest)
    store.push(make_fake_module(tmp_path / "src2"), "acme/demo")
    record = json.loads((store.root / "modules/acme/demo/versions/2.json").read_text())
    blob = store._blob_path(record["files"]["adapter_model.safetensors"])
    blob.write_bytes(b"damaged")
    with pytest.raises(IntegrityError, match="is damaged"):
        store.pull("acme/demo@2", dest)
    assert _snapshot(dest) == before


# --- 2a. version records are validated before they name a file ---------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "backslash", "empty-part", "control"])
def test_record_with_an_unsafe_path_is_refused(store, tmp_path, kind):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    escape = tmp_path / "escaped.txt"
    bad_path = {
        "dotdot": "../../escaped.txt",  # from <dest>/ up to tmp_path
        "absolute": str(escape),
        "backslash": "a\\b.txt",
        "empty-part": "a//b.txt",
        "control": "a\x1b[2Jb.txt",
    }[kind]
    record_path = store.root / "modules/acme/demo/versions/1.json"
    record = json.loads(record_path.read_text())
    record["files"][bad_path] = record["files"]["adapter_model.safetensors"]
    record_path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="unsafe file path"):
        store.pull("acme/demo@1", tmp_path / "out" / "m")
    with pytest.raises(IntegrityError, match="unsafe file path"):
        store.read("acme/demo@1")
    assert not escape.exists() and not (tmp_path / "out").exists()


def test_record_with_a_digest_that_is_not_a_sha256_is_refused(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    record_path = store.root / "modules/acme/demo/versions/1.json"
    record = json.loads(record_path.read_text())
    record["files"]["adapter_model.safetensors"] = "../../../../etc/passwd"
    record_path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="is not a sha256"):
        store.read("acme/demo@1", ["adapter_model.safetensors"])


def test_state_with_malformed_aliases_is_refused(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    store.promote("acme/demo@1", "prod")
    state_path = store.root / "modules/acme/demo/state.json"
    state = json.loads(state_path.read_text())
    state["aliases"]["prod"] = "1"  # a string where a version number belongs
    state_path.write_text(json.dumps(state))
    with pytest.raises(IntegrityError, match="malformed aliases, history, yanks or signatures"):
        store.resolve("acme/demo@prod")


# --- 2b. weights are checked at push, by every store --------------------------------------------


def _header_file(header: dict, data: bytes, declared: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _tensor(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


F32_NAN = struct.pack("<ff", 1.0, float("nan"))
F32_INF = struct.pack("<ff", float("-inf"), 2.0)
BF16_INF = bytes.fromhex("0000807f")  # 0.0, +inf in bfloat16 (little-endian)
F16_NAN = bytes.fromhex("003c007e")  # 1.0, NaN in float16

BAD_WEIGHTS = {
    "pickle": (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.", "above the limit"),
    "short": (b"\x10\x00", "shorter than the 8-byte header length"),
    "absurd header": (struct.pack("<Q", 1 << 40) + b"{}", "above the limit"),
    "header past end": (_header_file({}, b"", declared=4096), "runs past the end of the file"),
    "not json": (struct.pack("<Q", 8) + b"{nope!!}", "not valid JSON"),
    "json list": (_header_file([1], b""), "not a JSON object"),  # type: ignore[arg-type]
    "unknown dtype": (_header_file({"w": _tensor("F12", [1], 0, 4)}, b"\0" * 4), "unknown dtype 'F12'"),
    "bad shape": (_header_file({"w": _tensor("U8", [-1], 0, 1)}, b"\0"), "invalid shape"),
    "size mismatch": (_header_file({"w": _tensor("F32", [2], 0, 4)}, b"\0" * 4), "needs 8"),
    "truncated": (_header_file({"w": _tensor("F32", [4], 0, 16)}, b"\0" * 8), "lies outside the data section"),
    "overlap": (_header_file({"a": _tensor("U8", [4], 0, 4), "b": _tensor("U8", [4], 2, 6)}, b"\0" * 6), "overlaps"),
    "gap": (_header_file({"a": _tensor("U8", [2], 0, 2), "b": _tensor("U8", [2], 3, 5)}, b"\0" * 5), "unused bytes"),
    "trailing": (_header_file({"a": _tensor("U8", [2], 0, 2)}, b"\0" * 4), "belong to no tensor"),
    "f32 nan": (_header_file({"w": _tensor("F32", [2], 0, 8)}, F32_NAN), "NaN or infinite"),
    "f32 inf": (_header_file({"w": _tensor("F32", [2], 0, 8)}, F32_INF), "NaN or infinite"),
    "bf16 inf": (_header_file({"w": _tensor("BF16", [2], 0, 4)}, BF16_INF), "NaN or infinite"),
    "f16 nan": (_header_file({"w": _tensor("F16", [2], 0, 4)}, F16_NAN), "NaN or infinite"),
}


def _module_with_weights(folder: Path, weights: bytes) -> Path:
    make_fake_module(folder)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return _rehash(folder)


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_push_refuses_weights_that_are_not_well_formed_safetensors(store, hub_store, tmp_path, case):
    weights, message = BAD_WEIGHTS[case]
    folder = _module_with_weights(tmp_path / "m", weights)
    for target in (store, hub_store):
        with pytest.raises(IntegrityError, match=f"adapter_model.safetensors is not a valid safetensors file: .*{message}"):
            target.push(folder, "acme/demo")
    assert store.list() == []


def test_push_takes_well_formed_weights_of_every_common_dtype(store, hub_store, tmp_path):
    numpy = pytest.importorskip("numpy")
    from safetensors.numpy import save

    tensors = {
        "f32": numpy.linspace(-1, 1, 12, dtype=numpy.float32).reshape(3, 4),
        "f16": numpy.ones((2, 2), dtype=numpy.float16),
        "i64": numpy.arange(5, dtype=numpy.int64),
        "u8": numpy.zeros(0, dtype=numpy.uint8),  # empty tensors are legal
        "scalar": numpy.array(3.5, dtype=numpy.float64),
    }
    folder = _module_with_weights(tmp_path / "m", save(tensors, metadata={"format": "pt"}))
    assert store.push(folder, "acme/demo").version == 1
    with pytest.raises(StoreError, match="HF_HUB_OFFLINE"):  # every check passed; only the hub is missing
        hub_store.push(folder, "acme/demo")


def test_checker_agrees_with_safetensors_on_what_it_accepts(tmp_path):
    from safetensors import safe_open

    from tunehub.registry.files import check_safetensors_file

    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(os.urandom(100)))
    check_safetensors_file(path)
    with safe_open(str(path), framework="numpy") as handle:
        assert list(handle.keys()) == ["payload"]


# --- 2c. special files are refused without being opened ----------------------------------------


@pytest.mark.timeout(60)  # before the fix, hashing the FIFO blocked forever
@pytest.mark.parametrize("which", ["weights", "manifest"])
def test_push_refuses_a_fifo_without_opening_it(store, hub_store, tmp_path, which):
    folder = make_fake_module(tmp_path / "m", extra_files={"extra.json": b"{}"})
    name = "extra.json" if which == "weights" else "manifest.json"
    (folder / name).unlink()
    os.mkfifo(folder / name)
    for target in (store, hub_store):
        with pytest.raises(UnsafeFile, match=f"{name} is a FIFO; modules hold regular files only"):
            target.push(folder, "acme/demo")


def test_push_refuses_symbolic_links_even_inside_the_folder(store, tmp_path):
    # links are refused, never followed: a module is exactly the bytes inside its folder
    folder = make_fake_module(tmp_path / "m", extra_files={"notes.md": b"x"})
    (folder / "notes.md").unlink()
    (folder / "notes.md").symlink_to(folder / "README.md")
    with pytest.raises(UnsafeFile, match="notes.md is a symbolic link"):
        store.push(folder, "acme/demo")


# --- 2d. file names the Hub refuses are refused by every store ---------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        (".git/config", "inside a '.git' folder"),
        ("sub/.git/hooks", "inside a '.git' folder"),
        (".cache/huggingface/x.lock", "inside a '.cache' folder"),
        (".gitattributes", "clashes with the hub layout"),
        (".tunehub/state.json", "clashes with the hub layout"),
        ("/".join(["d"] * 520) + "/x.txt", "longer than 1024 characters"),
        ("notes\x1b[31m.txt", "control character"),
        ("tab\there.txt", "control character"),
    ],
)
def test_push_refuses_file_names_the_hub_refuses(store, hub_store, tmp_path, name, message):
    folder = make_fake_module(tmp_path / "m")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("x")
    for target in (store, hub_store):
        with pytest.raises(UnsafeFile, match=message):
            target.push(folder, "acme/demo")
    assert store.list() == []


def test_push_of_a_folder_without_manifest_is_a_manifest_error(store, tmp_path):
    (tmp_path / "plain" / ".git").mkdir(parents=True)
    with pytest.raises(ManifestError, match="has no manifest.json"):
        store.push(tmp_path / "plain", "acme/demo")


# --- 2e. gc and concurrent pushes ----------------------------------------------------------------


def test_gc_cannot_remove_a_blob_a_push_is_reusing(store, tmp_path, monkeypatch):
    module = make_fake_module(tmp_path / "src")
    store.push(module, "acme/old")
    store.delete("acme/old")  # its blobs are now unreferenced, but still stored
    digest = json.loads((module / "manifest.json").read_text())["files"]["adapter_model.safetensors"]
    blob = store._blob_path(digest)
    os.utime(blob, (0, 0))  # and old: nothing about their age protects them
    gc_reached_lock_or_done = threading.Event()
    gc_thread: list[threading.Thread] = []
    removed: list[dict] = []
    real_flock = fcntl.flock

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX and threading.current_thread() in gc_thread:
            gc_reached_lock_or_done.set()  # gc is about to wait for the lock
        return real_flock(fd, operation)

    def run_gc():
        try:
            removed.append(store.gc())
        finally:
            gc_reached_lock_or_done.set()

    real_claim = LocalStore._claim_version

    def claim_after_gc_ran(self, versions_dir, record):
        # the push has found the blob and decided to reuse it; now a gc starts
        thread = threading.Thread(target=run_gc)
        gc_thread.append(thread)
        thread.start()
        assert gc_reached_lock_or_done.wait(timeout=30)
        return real_claim(self, versions_dir, record)

    monkeypatch.setattr(local_module.fcntl, "flock", flock)
    monkeypatch.setattr(LocalStore, "_claim_version", claim_after_gc_ran)
    info = store.push(module, "acme/new")
    gc_thread[0].join(timeout=30)
    assert blob.exists()
    assert store.pull(info.ref, tmp_path / "out").version == 1
    assert digest not in removed[0]["blobs"]


def test_gc_removes_leftovers_of_killed_pushes_and_promotes(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    store.promote("acme/demo@1", "prod")
    module_dir = store.root / "modules/acme/demo"
    dead_promote = module_dir / ".state.json.999999.tmp"  # what write_json_atomic leaves if killed
    dead_promote.write_text("{")
    dead_push = store.root / "tmp" / "0123.blob"
    dead_push.write_bytes(b"partial")
    removed = store.gc()
    assert removed == {"blobs": [], "tmp": ["tmp/0123.blob", "modules/acme/demo/.state.json.999999.tmp"]}
    assert not dead_promote.exists() and not dead_push.exists()
    assert store.resolve("acme/demo@prod").version == 1


def test_gc_refuses_to_run_on_an_unreadable_record(store, tmp_path):
    store.push(make_fake_module(tmp_path / "src"), "acme/demo")
    (store.root / "modules/acme/demo/versions/1.json").write_text('{"version": 1}')
    with pytest.raises(IntegrityError, match="it lists no files"):
        store.gc()
    assert len(list((store.root / "blobs" / "sha256").glob("*/*"))) == 4  # nothing was removed
