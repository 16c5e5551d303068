import json
import os

import pytest

from tests.helpers import FAKE_FINGERPRINT, make_fake_module
from tunehub.errors import (
    AliasNotFound,
    Conflict,
    IntegrityError,
    InvalidReference,
    ManifestError,
    ModuleNotFound,
    UnsafeFile,
    VersionNotFound,
)
from tunehub.registry.local import LocalStore
from tunehub.registry.store import open_store
from tunehub.sdk import Registry


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")


@pytest.fixture
def module(tmp_path):
    return make_fake_module(tmp_path / "src")


def test_push_assigns_increasing_versions(store, module, tmp_path):
    first = store.push(module, "acme/sum")
    second = store.push(make_fake_module(tmp_path / "src2"), "acme/sum")
    assert (first.version, second.version) == (1, 2)
    assert first.ref == "acme/sum@1"
    assert store.resolve("acme/sum").version == 2
    assert store.resolve("acme/sum@1").manifest_sha256 == first.manifest_sha256


def test_push_refuses_versioned_ref_invalid_module_and_pickles(store, module, tmp_path):
    with pytest.raises(Conflict, match="assigned by the registry"):
        store.push(module, "acme/sum@3")
    with pytest.raises(ManifestError):
        store.push(tmp_path, "acme/sum")  # no manifest.json
    (module / "model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(UnsafeFile, match=r"^model\.bin is a pickle-format file; tunehub accepts safetensors only$"):
        store.push(module, "acme/sum")
    (module / "model.bin").unlink()
    (module / "adapter_model.safetensors").write_bytes(b"changed")
    with pytest.raises(IntegrityError):
        store.push(module, "acme/sum")
    with pytest.raises(ModuleNotFound):
        store.resolve("acme/sum")  # nothing became visible


def test_pull_is_verified_and_identical(store, module, tmp_path):
    store.push(module, "acme/sum")
    pulled = store.pull("acme/sum@1", tmp_path / "out")
    assert pulled.version == 1 and pulled.ref == "acme/sum@1"
    for name in ("manifest.json", "adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (pulled.path / name).read_bytes() == (module / name).read_bytes()
    default = store.pull("acme/sum")
    assert default.path == tmp_path / "cache" / "acme" / "sum" / "1"


def test_tampered_blob_detected_on_pull(store, module, tmp_path):
    info = store.push(module, "acme/sum")
    digest = json.loads((module / "manifest.json").read_text())["files"]["adapter_model.safetensors"]
    blob = store.root / "blobs" / "sha256" / digest[:2] / digest
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="damaged"):
        store.pull(info.ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written is left


def test_read_returns_verified_bytes_without_a_copy(store, module, tmp_path):
    store.push(module, "acme/sum")
    content = store.read("acme/sum", ["adapter_model.safetensors"])
    assert content.ref == "acme/sum@1" and content.version == 1 and content.manifest.task == "demo"
    assert content.files == {"adapter_model.safetensors": (module / "adapter_model.safetensors").read_bytes()}
    assert not (tmp_path / "cache").exists()  # read straight from the blobs, nothing copied
    everything = store.read("acme/sum@1")
    assert set(everything.files) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}


def test_read_detects_tampering_and_checks_before_weights(store, module):
    info = store.push(module, "acme/sum")
    seen = []

    def refuse(manifest):
        seen.append(manifest.base.model_id)
        raise Conflict("wrong base")

    digest = json.loads((module / "manifest.json").read_text())["files"]["adapter_model.safetensors"]
    blob = store.root / "blobs" / "sha256" / digest[:2] / digest
    original = blob.read_bytes()
    blob.unlink()  # if read() touched the weights before the check, this would be an IntegrityError
    with pytest.raises(Conflict, match="wrong base"):
        store.read(info.ref, check=refuse)
    assert seen == ["tiny-base"]
    with pytest.raises(IntegrityError, match="missing"):
        store.read(info.ref)
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="damaged"):
        store.read(info.ref)
    parsed = []  # a parse that runs while the bytes are hashed never hands out damaged content
    with pytest.raises(IntegrityError, match="damaged"):
        store.read(info.ref, parse=lambda manifest, files: parsed.append(len(files)) or "tensors")
    blob.write_bytes(original)
    assert store.read(info.ref, parse=lambda manifest, files: sorted(files)).parsed == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    manifest_blob = store.root / "blobs" / "sha256" / info.manifest_sha256[:2] / info.manifest_sha256
    manifest_blob.write_text(manifest_blob.read_text().replace("demo", "dem0"))
    with pytest.raises(IntegrityError, match="recorded sha256"):
        store.read(info.ref)


def test_read_of_a_file_larger_than_its_chunks_is_exact_and_checked_in_every_chunk(store, tmp_path):
    # 2.5 MiB: a small first chunk, then 1 MiB chunks hashed while the next one is read
    module = make_fake_module(tmp_path / "big", payload=os.urandom((5 << 20) // 2))
    payload = (module / "adapter_model.safetensors").read_bytes()
    info = store.push(module, "acme/big")
    parsed = store.read(
        info.ref,
        ["adapter_model.safetensors"],
        parse=lambda manifest, files: (manifest.task, len(files["adapter_model.safetensors"])),
    )
    assert parsed.files["adapter_model.safetensors"] == payload and parsed.parsed == ("demo", len(payload))
    digest = json.loads((tmp_path / "big" / "manifest.json").read_text())["files"]["adapter_model.safetensors"]
    blob = store.root / "blobs" / "sha256" / digest[:2] / digest
    for position in (0, (1 << 20) + 5, len(payload) - 1):  # first, a middle and the last chunk
        damaged = bytearray(payload)
        damaged[position] ^= 0x01
        blob.write_bytes(bytes(damaged))
        with pytest.raises(IntegrityError, match="damaged"):  # the parse's result is never handed out
            store.read(info.ref, parse=lambda manifest, files: "tensors")
    blob.write_bytes(payload + b"x")  # a file whose size changed is damaged too
    with pytest.raises(IntegrityError):
        store.read(info.ref)
    blob.write_bytes(payload)
    assert store.read(info.ref).files["adapter_model.safetensors"] == payload


def test_read_reports_damage_before_a_parse_error(store, tmp_path):
    info = store.push(make_fake_module(tmp_path / "m"), "acme/m")
    digest = json.loads((tmp_path / "m" / "manifest.json").read_text())["files"]["adapter_model.safetensors"]
    blob = store.root / "blobs" / "sha256" / digest[:2] / digest
    blob.write_bytes(b"not what was pushed")

    def parse(manifest, files):
        raise ValueError("unparseable")

    with pytest.raises(IntegrityError, match="damaged"):
        store.read(info.ref, parse=parse)


def test_tampered_cached_copy_is_replaced(store, module, tmp_path):
    store.push(module, "acme/sum")
    first = store.pull("acme/sum@1")
    (first.path / "adapter_model.safetensors").write_bytes(b"evil")
    again = store.pull("acme/sum@1")
    assert (again.path / "adapter_model.safetensors").read_bytes() == (module / "adapter_model.safetensors").read_bytes()


def test_pull_refuses_foreign_destination(store, module, tmp_path):
    store.push(module, "acme/sum")
    dest = tmp_path / "occupied"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(Conflict, match="not a pulled copy of this module.*--force"):
        store.pull("acme/sum", dest)
    assert (dest / "notes.txt").read_text() == "mine"


def test_manifest_read_checks_hash(store, module):
    info = store.push(module, "acme/sum")
    assert store.manifest("acme/sum").task == "demo"
    blob = store.root / "blobs" / "sha256" / info.manifest_sha256[:2] / info.manifest_sha256
    blob.write_text(blob.read_text().replace("demo", "dem0"))
    with pytest.raises(IntegrityError):
        store.manifest("acme/sum")


def test_unknown_module_version_alias(store, module):
    with pytest.raises(ModuleNotFound, match="no module 'nope'"):
        store.resolve("nope")
    store.push(module, "sum")
    with pytest.raises(VersionNotFound, match="no version 7"):
        store.resolve("sum@7")
    with pytest.raises(AliasNotFound, match="no alias 'prod'"):
        store.resolve("sum@prod")
    with pytest.raises(InvalidReference):
        store.resolve("../sum")


def test_list_filters(store, tmp_path):
    store.push(make_fake_module(tmp_path / "a", kind="lora", task="sum"), "acme/a")
    store.push(make_fake_module(tmp_path / "b", kind="dora", task="math", base_id="other", fingerprint="cd" * 32), "b")
    store.push(make_fake_module(tmp_path / "c", kind="lora", task="math"), "acme/c")
    assert sorted(i.repo for i in store.list()) == ["acme/a", "acme/c", "b"]
    assert [i.repo for i in store.list(kind="dora")] == ["b"]
    assert sorted(i.repo for i in store.list(task="math")) == ["acme/c", "b"]
    assert sorted(i.repo for i in store.list(base=FAKE_FINGERPRINT[:12])) == ["acme/a", "acme/c"]
    assert [i.repo for i in store.list(base="other")] == ["b"]
    assert sorted(i.repo for i in store.list(namespace="acme")) == ["acme/a", "acme/c"]


def test_promote_rollback_and_history(store, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEHUB_USER", "alice")
    for i in range(3):
        store.push(make_fake_module(tmp_path / f"m{i}"), "sum")
    store.promote("sum@1", "prod")
    store.promote("sum@3", "prod")
    assert store.resolve("sum@prod").version == 3
    move = store.rollback("sum", "prod")
    assert (move.from_version, move.to_version, move.action) == (3, 1, "rollback")
    assert store.resolve("sum@prod").version == 1
    with pytest.raises(Conflict, match="no earlier target"):
        store.rollback("sum", "prod")
    history = store.alias_history("sum", "prod")
    assert [(m.action, m.from_version, m.to_version, m.by) for m in history] == [
        ("promote", None, 1, "alice"),
        ("promote", 1, 3, "alice"),
        ("rollback", 3, 1, "alice"),
    ]
    store.promote("sum@prod", "canary")  # an alias can be promoted from another alias
    assert store.aliases("sum") == {"canary": 1, "prod": 1}
    assert store.resolve("sum@1").aliases == ("canary", "prod")


def test_rollback_skips_yanked_targets(store, tmp_path):
    for i in range(3):
        store.push(make_fake_module(tmp_path / f"m{i}"), "sum")
    for version in (1, 2, 3):
        store.promote(f"sum@{version}", "prod")
    store.yank("sum@2", "bad data")
    assert store.rollback("sum", "prod").to_version == 1


def test_latest_cannot_be_promoted_and_aliases_must_not_look_like_versions(store, module):
    store.push(module, "sum")
    with pytest.raises(Conflict, match="implicit"):
        store.promote("sum@1", "latest")
    with pytest.raises(InvalidReference, match="version number"):
        store.promote("sum@1", "v2")


def test_yank_hides_from_resolution(store, tmp_path):
    store.push(make_fake_module(tmp_path / "a"), "sum")
    store.push(make_fake_module(tmp_path / "b"), "sum")
    store.promote("sum@2", "prod")
    info = store.yank("sum@2", "leaks test data")
    assert info.yanked and info.yank_reason == "leaks test data"
    assert store.resolve("sum").version == 1
    with pytest.raises(VersionNotFound, match="yanked \\(leaks test data\\)"):
        store.resolve("sum@2")
    with pytest.raises(VersionNotFound, match="yanked"):
        store.resolve("sum@prod")
    assert [v.version for v in store.versions("sum")] == [1, 2]
    assert [v.version for v in store.versions("sum", include_yanked=False)] == [1]
    with pytest.raises(Conflict, match="exact version"):
        store.yank("sum")


def test_delete_version_and_module_never_reuses_numbers(store, tmp_path):
    for i in range(2):
        store.push(make_fake_module(tmp_path / f"m{i}"), "sum")
    store.promote("sum@2", "prod")
    with pytest.raises(Conflict, match="prod -> 2"):
        store.delete("sum@2")
    assert store.delete("sum@2", force=True) == [2]
    with pytest.raises(VersionNotFound, match="was deleted"):
        store.resolve("sum@2")
    assert store.aliases("sum") == {}
    assert store.push(make_fake_module(tmp_path / "m3"), "sum").version == 3
    assert store.delete("sum") == [1, 3]
    with pytest.raises(ModuleNotFound, match="every version was deleted"):
        store.resolve("sum")
    assert store.list() == []
    assert store.push(make_fake_module(tmp_path / "m4"), "sum").version == 4


def test_gc_removes_orphans_only(store, module, tmp_path):
    store.push(module, "sum")
    orphan = store.root / "blobs" / "sha256" / "ff" / ("ff" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    os.utime(orphan, (0, 0))
    stale = store.root / "tmp" / "stale.version.json"
    stale.write_text("{}")
    assert store.gc() == {"blobs": ["ff" * 32], "tmp": ["tmp/stale.version.json"]}
    assert store.pull("sum", tmp_path / "o").version == 1
    assert store.gc() == {"blobs": [], "tmp": []}


def test_open_store_and_registry_facade(tmp_path, monkeypatch, module):
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNEHUB_REGISTRY", raising=False)
    reg = Registry()
    assert reg.uri == f"file://{tmp_path / 'home' / 'registry'}"
    info = reg.push(module, "sum")
    assert Registry(f"file://{tmp_path / 'home' / 'registry'}").resolve("sum").ref == info.ref
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)
    with pytest.raises(ValueError, match="unknown registry scheme"):
        open_store("s3://bucket")
