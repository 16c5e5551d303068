import json
import re

import pytest
import yaml

from tests.helpers import make_fake_module
from tunehub.errors import IntegrityError, ManifestError, UnsafeFile, UnsupportedSchemaVersion
from tunehub.registry.manifest import SCHEMA_VERSION, Manifest, ModuleKind
from tunehub.registry.module import verify_module


def test_written_module_verifies_and_round_trips(tmp_path):
    folder = make_fake_module(tmp_path / "m")
    module = verify_module(folder)
    assert module.manifest.kind is ModuleKind.LORA
    assert module.manifest.schema_version == SCHEMA_VERSION
    assert set(module.manifest.files) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    again = Manifest.from_json(module.manifest.to_json())
    assert again == module.manifest


def test_adapter_config_is_written_from_manifest(tmp_path):
    folder = make_fake_module(tmp_path / "m", kind="dora")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["use_dora"] is True
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-base"


def test_kind_without_peft_has_no_adapter_config(tmp_path):
    folder = make_fake_module(tmp_path / "m", kind="selective")
    assert not (folder / "adapter_config.json").exists()
    assert "adapter_config.json" not in verify_module(folder).manifest.files


def test_model_card_front_matter(tmp_path):
    folder = make_fake_module(tmp_path / "m")
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "tiny-base"
    assert front["library_name"] == "peft"
    assert "lora" in front["tags"] and "base_model:adapter:tiny-base" in front["tags"]


def test_model_card_of_a_bottleneck_module_says_how_peft_loads_it(tmp_path):
    from tunehub.registry.module import model_card

    manifest = verify_module(make_fake_module(tmp_path / "m")).manifest
    bottleneck = manifest.model_copy(update={"kind": ModuleKind.BOTTLENECK})
    card = model_card(bottleneck)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "tunehub" and "peft" not in front["tags"]
    assert "after `import tunehub.trainer`" in card
    assert yaml.safe_load(model_card(manifest).split("---\n")[1])["library_name"] == "peft"


def test_model_card_never_names_a_path_as_base_model(tmp_path):
    from tunehub.registry.module import model_card

    manifest = verify_module(make_fake_module(tmp_path / "m")).manifest
    for model_id, expected in [
        ("acme/base-1", "acme/base-1"),
        ("tiny-base", "tiny-base"),
        ("/home/me/bases/tiny", None),
        ("./bases/tiny", None),
        ("a/b/c", None),
    ]:
        with_id = manifest.model_copy(update={"base": manifest.base.model_copy(update={"model_id": model_id})})
        front = yaml.safe_load(model_card(with_id).split("---\n")[1])
        assert front.get("base_model") == expected, model_id
        assert any(tag.startswith("base_model:") for tag in front["tags"]) is (expected is not None), model_id


def _rewrite(folder, mutate):
    raw = json.loads((folder / "manifest.json").read_text())
    mutate(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


def test_unknown_schema_version(tmp_path):
    folder = make_fake_module(tmp_path / "m")
    _rewrite(folder, lambda raw: raw.update(schema_version=99))
    with pytest.raises(UnsupportedSchemaVersion, match="schema_version 99.*upgrade"):
        verify_module(folder)


@pytest.mark.parametrize("field", ["kind", "base", "schema_version"])
def test_missing_field(tmp_path, field):
    folder = make_fake_module(tmp_path / "m")
    _rewrite(folder, lambda raw: raw.pop(field))
    with pytest.raises(ManifestError, match=field if field != "schema_version" else "no schema_version"):
        verify_module(folder)


def test_unknown_field_and_bad_kind_are_refused(tmp_path):
    folder = make_fake_module(tmp_path / "m")
    _rewrite(folder, lambda raw: raw.update(surprise=1))
    with pytest.raises(ManifestError, match="surprise"):
        verify_module(folder)
    _rewrite(folder, lambda raw: (raw.pop("surprise"), raw.update(kind="bogus")))
    with pytest.raises(ManifestError, match="kind"):
        verify_module(folder)


def test_not_json_and_missing_manifest(tmp_path):
    folder = make_fake_module(tmp_path / "m")
    (folder / "manifest.json").write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        verify_module(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="not a tunehub module"):
        verify_module(folder)


def test_tampered_missing_and_unlisted_files(tmp_path):
    folder = make_fake_module(tmp_path / "m")
    weights = folder / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        verify_module(folder)
    weights.write_bytes(original)
    (folder / "extra.txt").write_text("x")
    with pytest.raises(IntegrityError, match="not listed"):
        verify_module(folder)
    (folder / "extra.txt").unlink()
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_module(folder)


@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.pt", "x.pth", "state.pkl", "last.ckpt"])
def test_pickles_refused(tmp_path, name):
    with pytest.raises(UnsafeFile, match=rf"^{re.escape(name)} is a pickle-format file; tunehub accepts safetensors only$"):
        make_fake_module(tmp_path / "m", extra_files={name: b"\x80\x04K\x01."})


def test_symlink_refused(tmp_path):
    folder = make_fake_module(tmp_path / "m")
    (tmp_path / "secret").write_text("s")
    (folder / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafeFile, match="symbolic link"):
        verify_module(folder)


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a//b", "a/./b", "a\\b", "manifest.json"])
def test_bad_file_paths_in_manifest(path):
    base = {"model_id": "b", "fingerprint": "0" * 64}
    with pytest.raises(ManifestError):
        Manifest.from_dict({"schema_version": 1, "kind": "lora", "base": base, "files": {path: "0" * 64}})


def test_bad_digest_in_manifest():
    base = {"model_id": "b", "fingerprint": "0" * 64}
    with pytest.raises(ManifestError, match="sha256"):
        Manifest.from_dict({"schema_version": 1, "kind": "lora", "base": base, "files": {"a": "xyz"}})
