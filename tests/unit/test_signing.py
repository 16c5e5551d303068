"""Signed versions in the file:// store, the trust policy's refusals, the CLI verbs, and the one
private name of model_signing that registry/signing.py relies on."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import model_signing
import pytest
from typer.testing import CliRunner

from tests.helpers import make_fake_module
from tunehub.errors import (
    ConfigError,
    IntegrityError,
    SignatureMismatch,
    TunehubError,
    UnsignedModule,
    UntrustedModule,
    UntrustedSigner,
)
from tunehub.registry import state as registry_state
from tunehub.registry.files import sha256_file
from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import MANIFEST_FILE
from tunehub.registry.signing import (
    MAX_BUNDLE_BYTES,
    SignatureEntry,
    TrustPolicy,
    generate_key_pair,
    known_digests_hashing_config,
    load_trusted_keys,
    sign_digests,
    version_digests,
)
from tunehub.sdk import Registry
from tunehub.sdk.cli import app


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair(folder / "team")
    generate_key_pair(folder / "stranger")
    return {
        "team": folder / "team",
        "team.pub": folder / "team.pub",
        "stranger": folder / "stranger",
        "stranger.pub": folder / "stranger.pub",
    }


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TUNEHUB_USER", "signer")
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))
    return f"file://{tmp_path / 'reg'}"


def _strict(registry: str, *trusted: Path) -> Registry:
    return Registry(registry, trust=list(trusted), require_signed=True)


def _rewrite_record_with(root: Path, repo: str, target: int, source: int) -> None:
    """What an attacker with write access to the store does: point version ``target``'s record at
    the files of version ``source`` (their hashes match their blobs), leaving its signature."""
    versions = root / "modules" / repo / "versions"
    record = json.loads((versions / f"{source}.json").read_text())
    record["version"] = target
    path = versions / f"{target}.json"
    os.chmod(path, 0o644)
    path.write_text(json.dumps(record))


# --- the private name, and interoperability with model_signing itself -------------------------------
def test_digests_answered_without_reading_equal_what_model_signing_computes(tmp_path):
    folder = make_fake_module(tmp_path / "m", extra_files={"sub/notes.txt": b"hello"})
    digests = {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}
    ours = known_digests_hashing_config(digests).hash(folder)
    theirs = model_signing.hashing.Config().use_file_serialization(hashing_algorithm="sha256").hash(folder)
    assert ours == theirs
    assert sorted(rd.identifier for rd in ours.resource_descriptors()) == sorted(digests)


def test_a_pushed_signature_verifies_with_model_signing_over_the_pulled_folder(registry, keys, tmp_path):
    reg = Registry(registry)
    info = reg.push(make_fake_module(tmp_path / "m"), "acme/sum", sign=keys["team"])
    pulled = reg.pull(info.ref, tmp_path / "pulled")
    reg.verify(info.ref, [keys["team.pub"]], export=tmp_path / "sum.sig")
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["team.pub"]).verify(
        pulled.path, tmp_path / "sum.sig"
    )
    with pytest.raises(ConfigError, match="exists"):  # the user's file is never overwritten
        reg.verify(info.ref, [keys["team.pub"]], export=tmp_path / "sum.sig")
    # and a signature model_signing made itself over the pulled folder is accepted by tunehub
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys["stranger"]).set_hashing_config(
        model_signing.hashing.Config().use_file_serialization(hashing_algorithm="sha256")
    ).sign(pulled.path, tmp_path / "theirs.sig")
    digests = version_digests(info.manifest_sha256, reg.manifest(info.ref).files)
    entry = SignatureEntry(
        key_id=load_trusted_keys([keys["stranger.pub"]])[0].key_id, bundle=(tmp_path / "theirs.sig").read_text(), by="x", at="y"
    )
    assert TrustPolicy.from_paths([keys["stranger.pub"]], True).check(info.ref, digests, [entry]).verified == (entry.key_id,)


# --- signed versions and the refusals ------------------------------------------------------------------
def test_a_signed_version_verifies_and_pulls_under_require_signed(registry, keys, tmp_path):
    info = Registry(registry).push(make_fake_module(tmp_path / "m"), "acme/sum", sign=keys["team"])
    assert [s.by for s in info.signatures] == ["signer"]
    provenance = Registry(registry).verify("acme/sum", [keys["team.pub"]])
    assert provenance.verified == (info.signatures[0].key_id,)
    pulled = _strict(registry, keys["team.pub"]).pull("acme/sum@1", tmp_path / "out")
    assert pulled.ref == "acme/sum@1" and (tmp_path / "out" / MANIFEST_FILE).is_file()
    content = _strict(registry, keys["team.pub"]).store.read("acme/sum@1")
    assert MANIFEST_FILE not in content.files and content.files


def test_unsigned_untrusted_and_rewritten_versions_are_each_refused_with_their_own_message(registry, keys, tmp_path):
    reg = Registry(registry)
    reg.push(make_fake_module(tmp_path / "a"), "acme/sum")  # 1: unsigned
    reg.push(make_fake_module(tmp_path / "b"), "acme/sum", sign=keys["stranger"])  # 2: an untrusted key
    reg.push(make_fake_module(tmp_path / "c"), "acme/sum", sign=keys["team"])  # 3: signed, then rewritten
    reg.push(make_fake_module(tmp_path / "d"), "acme/sum")  # 4: other files, unsigned
    _rewrite_record_with(Path(registry.removeprefix("file://")), "acme/sum", target=3, source=4)
    strict = _strict(registry, keys["team.pub"])
    expected = [
        ("acme/sum@1", UnsignedModule, "is not signed and signatures are required"),
        ("acme/sum@2", UntrustedSigner, "signed only by keys that are not trusted"),
        ("acme/sum@3", SignatureMismatch, r"files changed after signing \(changed: adapter_model.safetensors, manifest.json\)"),
    ]
    for ref, error, message in expected:
        with pytest.raises(error, match=message):
            strict.pull(ref, tmp_path / "never")
        with pytest.raises(error, match=message):
            strict.store.read(ref)  # the server's path
        with pytest.raises(error, match=message):
            reg.verify(ref, [keys["team.pub"]])
    assert not (tmp_path / "never").exists()
    # with keys but no requirement, unsigned versions load; a trusted key's name on changed files does not
    lenient = Registry(registry, trust=[keys["team.pub"]])
    assert lenient.pull("acme/sum@1").ref == "acme/sum@1"
    with pytest.raises(SignatureMismatch):
        lenient.pull("acme/sum@3")
    assert Registry(registry).pull("acme/sum@3").ref == "acme/sum@3"  # no policy: no verification


def test_a_byte_changed_after_signing_is_refused_at_pull(registry, keys, tmp_path):
    info = Registry(registry).push(make_fake_module(tmp_path / "m"), "acme/sum", sign=keys["team"])
    weights = dict(info.files)["adapter_model.safetensors"]
    blob = Path(registry.removeprefix("file://")) / "blobs" / "sha256" / weights[:2] / weights
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"blob {weights[:12]}.* is damaged"):
        _strict(registry, keys["team.pub"]).pull("acme/sum@1", tmp_path / "out")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        Registry(registry).verify("acme/sum@1", [keys["team.pub"]])


def test_signing_an_existing_version_and_resigning_replace_by_key(registry, keys, tmp_path):
    reg = Registry(registry)
    reg.push(make_fake_module(tmp_path / "m"), "acme/sum")
    reg.promote("acme/sum@1", "prod")
    first = reg.sign("acme/sum@prod", keys["team"])
    again = reg.sign("acme/sum@1", keys["team"])
    both = reg.sign("acme/sum@1", keys["stranger"])
    assert len(first.signatures) == 1 and len(again.signatures) == 1 and len(both.signatures) == 2
    assert _strict(registry, keys["stranger.pub"]).pull("acme/sum@prod").ref == "acme/sum@1"
    provenance = Registry(registry).provenance("acme/sum@1", [keys["team.pub"]])
    statuses = sorted(s["status"] for s in provenance["signatures"])
    assert statuses == ["untrusted key", "verified"] and provenance["lineage"] == []


def test_lineage_shows_each_ancestor_with_its_signers(registry, keys, tmp_path):
    from tunehub.registry.manifest import Manifest
    from tunehub.registry.module import write_module

    reg = Registry(registry)
    reg.push(make_fake_module(tmp_path / "uft"), "acme/dapt", sign=keys["team"])
    child = make_fake_module(tmp_path / "sft")
    manifest = Manifest.read(child).with_updates(parent="acme/dapt@1")
    write_module(child, manifest)
    reg.push(child, "acme/sum")
    reg.push(make_fake_module(tmp_path / "orphan"), "acme/orphan")
    provenance = reg.provenance("acme/sum", [keys["team.pub"]])
    assert provenance["signed"] is False
    [parent] = provenance["lineage"]
    assert parent["resolved"] == "acme/dapt@1" and parent["verified_by"] == [load_trusted_keys([keys["team.pub"]])[0].key_id]
    reg.delete("acme/dapt@1", force=True)  # its child stays, with a broken lineage
    assert "error" in reg.provenance("acme/sum")["lineage"][0]


# --- keys and policies -------------------------------------------------------------------------------------
def test_keys_are_never_overwritten_and_private_keys_are_not_trusted(tmp_path, keys):
    generate_key_pair(tmp_path / "k")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    before = (tmp_path / "k").read_bytes()
    with pytest.raises(ConfigError, match="never overwrites"):
        generate_key_pair(tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == before
    with pytest.raises(ConfigError, match="is a private key"):
        load_trusted_keys([keys["team"]])
    (tmp_path / "junk.pem").write_text("not a key")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_trusted_keys([tmp_path / "junk.pem", tmp_path / "missing.pub", tmp_path / "empty"])
    assert len(caught.value.problems) == 3
    with pytest.raises(ConfigError, match="--require-signed needs --trust"):
        TrustPolicy(require_signed=True)
    with pytest.raises(ConfigError, match="not a PEM private key"):
        sign_digests({"a": "0" * 64}, keys["team.pub"], name="x", by="b", at="c")


def test_a_signature_naming_another_key_or_malformed_is_refused(keys):
    digests = {MANIFEST_FILE: "1" * 64, "w.safetensors": "2" * 64}
    good = sign_digests(digests, keys["team"], name="x", by="b", at="c")
    policy = TrustPolicy.from_paths([keys["team.pub"]], True)
    stranger_id = load_trusted_keys([keys["stranger.pub"]])[0].key_id
    relabelled = SignatureEntry(
        key_id=good.key_id, bundle=sign_digests(digests, keys["stranger"], name="x", by="b", at="c").bundle, by="b", at="c"
    )
    with pytest.raises(SignatureMismatch, match="names another key"):
        policy.check("x@1", digests, [relabelled])
    garbled = SignatureEntry(key_id=good.key_id, bundle=good.bundle.replace('"sig":"', '"sig":"AAAA'), by="b", at="c")
    with pytest.raises(SignatureMismatch):
        policy.check("x@1", digests, [garbled])
    assert stranger_id != good.key_id
    assert isinstance(SignatureMismatch("x"), UntrustedModule)


# --- the state that holds signatures is untrusted --------------------------------------------------------
def test_malformed_signatures_in_a_state_file_are_refused(keys):
    good = sign_digests({"a": "0" * 64}, keys["team"], name="x", by="b", at="c").to_dict()
    cases = [
        {"1": "nope"},
        {"1": [{**good, "key_id": "../../etc"}]},
        {"1": [{**good, "extra": 1}]},
        {"1": [good, good]},
        {"x": [good]},
        {"1": [{**good, "bundle": "x" * (MAX_BUNDLE_BYTES + 1)}]},
        {"1": [good] * (registry_state.MAX_SIGNATURES + 1)},
    ]
    for signatures in cases:
        with pytest.raises(IntegrityError, match="corrupt"):
            registry_state.parse_local_state({"signatures": signatures}, [1], [], "state.json")
    state = registry_state.parse_local_state({"signatures": {"1": [good]}}, [1], [], "state.json")
    assert registry_state.local_state_json(state)["signatures"] == {"1": [good]}
    assert "signatures" not in registry_state.local_state_json(registry_state.state_of([1]))  # the old format
    deleted, _ = registry_state.delete(state, 1, "x")
    assert deleted.signatures_of(1) == ()


# --- the CLI -------------------------------------------------------------------------------------------------
def _cli(*args: str, ok: bool = True) -> str:
    """What the command printed, or (``ok=False``) the error ``tunehub`` would print."""
    result = CliRunner().invoke(app, list(args))
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output
    assert isinstance(result.exception, TunehubError), (result.output, result.exception)
    return str(result.exception)


def test_cli_keygen_push_sign_verify_show_and_pull_require_signed(registry, tmp_path):
    out = _cli("keygen", str(tmp_path / "team"))
    key_id = out.rsplit("key ", 1)[1].strip()
    assert len(key_id) == 16 and (tmp_path / "team.pub").is_file()
    module = make_fake_module(tmp_path / "m")
    assert f"signed by {key_id}" in _cli("push", str(module), "acme/sum", "--sign", str(tmp_path / "team"), "-r", registry)
    _cli("push", str(module), "acme/sum", "-r", registry)
    assert f"verified acme/sum@1: signed by {key_id}" in _cli(
        "verify", "acme/sum@1", "--trust", str(tmp_path / "team.pub"), "-r", registry
    )
    refused = _cli("verify", "acme/sum@2", "--trust", str(tmp_path / "team.pub"), "-r", registry, ok=False)
    assert "acme/sum@2: refused, the version is not signed" in refused
    shown = json.loads(_cli("show", "acme/sum@1", "--trust", str(tmp_path), "-r", registry))
    assert shown["_provenance"]["signatures"][0]["status"] == "verified"
    assert shown["_provenance"]["signatures"][0]["by"] == "signer"
    refused = _cli("pull", "acme/sum@2", "--trust", str(tmp_path / "team.pub"), "--require-signed", "-r", registry, ok=False)
    assert "not signed" in refused
    assert f"signatures: {key_id}" in _cli("sign", "acme/sum@2", "--key", str(tmp_path / "team"), "-r", registry)
    assert "pulled acme/sum@2" in _cli(
        "pull", "acme/sum@2", "--trust", str(tmp_path / "team.pub"), "--require-signed", "-r", registry
    )
    assert "needs --trust" in _cli("pull", "acme/sum@2", "--require-signed", "-r", registry, ok=False)


def test_local_store_sign_needs_an_exact_version(registry, keys, tmp_path):
    store = LocalStore(registry.removeprefix("file://"))
    store.push(make_fake_module(tmp_path / "m"), "acme/sum")
    entry = sign_digests({"a": "0" * 64}, keys["team"], name="x", by="b", at="c")
    from tunehub.errors import Conflict, VersionNotFound

    with pytest.raises(Conflict, match="exact version"):
        store.sign("acme/sum", entry)
    with pytest.raises(VersionNotFound):
        store.sign("acme/sum@7", entry)


def test_training_on_a_parent_refuses_one_the_policy_refuses_before_loading_anything(registry, keys, tmp_path):
    from tunehub.trainer.config import validate_run_config
    from tunehub.trainer.run import train

    Registry(registry).push(make_fake_module(tmp_path / "uft"), "acme/dapt")  # unsigned
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    base = tmp_path / "base"  # a config a base folder passes; nothing of it is ever loaded
    base.mkdir()
    (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    raw = {
        "base": {"path": str(base)},
        "method": {"name": "lora", "r": 4},
        "objective": {"name": "sft"},
        "data": {"train": str(tmp_path / "x.jsonl")},
        "init": {"parent": "acme/dapt@1"},
        "output": {"dir": str(tmp_path / "out"), "registry": registry},
    }
    config = validate_run_config(raw)
    with pytest.raises(UnsignedModule, match="acme/dapt@1: refused"):
        train(config, trust=TrustPolicy.from_paths([keys["team.pub"]], True))
    assert not (tmp_path / "out").exists()
