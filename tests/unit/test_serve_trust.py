"""Signed modules at serve time without a server: the tenants file's ``require_signed_by``, the
per-tenant decisions the inference worker makes (and caches), the serve options' startup checks,
and the provenance ``/v1/models`` shows."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_fake_module
from tunehub.errors import ConfigError, SignatureMismatch, UnsignedModule, UntrustedSigner
from tunehub.registry.local import LocalStore
from tunehub.registry.signing import generate_key_pair, short_key_id
from tunehub.sdk import Registry
from tunehub.server.tenants import Tenants, hash_key, parse_tenants, parse_tenants_file
from tunehub.server.trust import ProvenanceCache, SigningChecks, SigningRule, lineage_for, rules_from_wire


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    ids = {name: generate_key_pair(folder / name) for name in ("release", "stranger", "server")}
    return {"dir": folder, **{name: folder / name for name in ids}, **{f"{n}.id": ids[n] for n in ids}}  # type: ignore[dict-item]


def _tenants_file(folder: Path, rules: object) -> Path:
    data = {
        "tenants": {
            "acme": {"keys": [hash_key("k-acme")], "models": ["acme/*", "shared/*"], "require_signed_by": rules},
            "beta": {"keys": [hash_key("k-beta")], "models": ["acme/*"]},
        }
    }
    path = folder / "tenants.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_require_signed_by_is_read_relative_to_the_tenants_file_and_matches_by_name(tmp_path, keys, monkeypatch):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "acme-release.pub").write_bytes(Path(f"{keys['release']}.pub").read_bytes())
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "stranger.pub").write_bytes(Path(f"{keys['stranger']}.pub").read_bytes())
    path = _tenants_file(tmp_path, {"acme/*": ["keys/acme-release.pub"], "acme/sum*": ["more"]})
    tenants = Tenants.load(path)
    acme, beta = tenants.authenticate("k-acme"), tenants.authenticate("k-beta")
    assert [r.pattern for r in acme.signing_rules("acme/sum")] == ["acme/*", "acme/sum*"]  # both must hold
    assert [r.pattern for r in acme.signing_rules("acme/qa")] == ["acme/*"]
    assert acme.signing_rules("shared/qa") == [] and beta.signing_rules("acme/sum") == []
    first, second = acme.signing_rules("acme/sum")
    # keys are named as the file names them (never by a server path), and found in folders too
    assert [(k.key_id, k.source) for k in first.keys] == [(keys["release.id"], "keys/acme-release.pub")]
    assert [(k.key_id, k.source) for k in second.keys] == [(keys["stranger.id"], "more/stranger.pub")]
    # the rules survive the trip to the inference worker unchanged
    assert rules_from_wire(json.loads(json.dumps([first.to_wire(), second.to_wire()]))) == [first, second]
    # relative to the file's folder, not to the working directory
    monkeypatch.chdir(tmp_path.parent)
    assert parse_tenants_file(path)[0].require_signed_by[0].keys == first.keys


def test_require_signed_by_problems_are_reported_together(tmp_path, keys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "rsa.pub").write_bytes(rsa_pem)
    (tmp_path / "private.pem").write_bytes(keys["release"].read_bytes())
    (tmp_path / "good.pub").write_bytes(Path(f"{keys['release']}.pub").read_bytes())
    path = _tenants_file(
        tmp_path,
        {
            "acme/*": ["missing.pub", "private.pem", "rsa.pub"],
            "acme/sum@2": ["good.pub"],
            "shared/*": [],
        },
    )
    with pytest.raises(ConfigError) as info:
        Tenants.load(path)
    text = str(info.value)
    assert len(info.value.problems) == 5, text
    for needle in (
        "tenant 'acme': require_signed_by['acme/*']: ",
        "missing.pub: No such file or directory",
        "private.pem is a private key",
        "rsa.pub is not an elliptic-curve public key",
        "require_signed_by['acme/sum@2']: patterns name modules without '@version'",
        "require_signed_by['shared/*']: must be a non-empty list of public key files",
    ):
        assert needle in text
    # not a mapping, and a misspelt setting (an unknown key) among the tenant's settings
    data = yaml.safe_load(path.read_text())
    data["tenants"]["acme"]["require_signed_by"] = ["acme/*"]
    data["tenants"]["beta"]["require_signed"] = {"acme/*": ["good.pub"]}
    with pytest.raises(ConfigError) as info:
        parse_tenants(data, base_dir=tmp_path)
    assert "'require_signed_by' must map module name patterns" in str(info.value)
    assert "tenant 'beta': unknown keys ['require_signed']" in str(info.value)


@pytest.fixture
def signed_store(tmp_path, keys, monkeypatch):
    """acme/sum: 1 unsigned, 2 signed by a stranger, 3 signed by the release key, 4 signed by the
    release key and then its record rewritten to other files (as an attacker with write access)."""
    monkeypatch.setenv("TUNEHUB_USER", "release-bot")
    uri = f"file://{tmp_path / 'reg'}"
    reg = Registry(uri)
    reg.push(make_fake_module(tmp_path / "m1"), "acme/sum")
    reg.push(make_fake_module(tmp_path / "m2"), "acme/sum", sign=keys["stranger"])
    reg.push(make_fake_module(tmp_path / "m3"), "acme/sum", sign=keys["release"])
    reg.push(make_fake_module(tmp_path / "m4"), "acme/sum", sign=keys["release"])
    reg.push(make_fake_module(tmp_path / "m5"), "acme/other")
    versions = tmp_path / "reg" / "modules" / "acme" / "sum" / "versions"
    other = json.loads((tmp_path / "reg" / "modules" / "acme" / "other" / "versions" / "1.json").read_text())
    os.chmod(versions / "4.json", 0o644)
    (versions / "4.json").write_text(json.dumps({**other, "version": 4}))
    return reg


def _rule(keys, *names: str, pattern: str = "acme/*") -> SigningRule:
    from tunehub.server.trust import load_rule_keys

    return SigningRule(pattern, load_rule_keys([f"{n}.pub" for n in names], keys["dir"]))


def test_a_tenant_rule_accepts_only_a_valid_signature_by_its_keys(signed_store, keys):
    store: LocalStore = signed_store.store  # type: ignore[assignment]
    checks = SigningChecks(store.resolve, refusal_ttl_s=0)
    rule = [_rule(keys, "release")]
    digests = checks.check(rule, "acme/sum@3")
    assert digests == dict(store.resolve("acme/sum@3").files)
    refusals = [
        ("acme/sum@1", UnsignedModule, "acme/sum@1: refused, the version is not signed and signatures are required"),
        (
            "acme/sum@2",
            UntrustedSigner,
            re.escape(f"acme/sum@2: refused, signed only by keys that are not trusted ({short_key_id(keys['stranger.id'])})"),
        ),
        ("acme/sum@4", SignatureMismatch, "acme/sum@4: refused, signature by trusted key .*: the files changed after signing"),
    ]
    for key, error, message in refusals:
        with pytest.raises(error, match=message) as info:
            checks.check(rule, key)
        assert "this API key requires a signature by one of those keys for modules matching 'acme/*'" in str(info.value)
        assert str(keys["dir"]) not in str(info.value)  # the tenant's key is named as its file writes it
    # a stranger's key in the rule makes version 2 acceptable; two rules must both hold
    assert checks.check([_rule(keys, "release", "stranger")], "acme/sum@2")
    with pytest.raises(UntrustedSigner):
        checks.check([_rule(keys, "stranger", pattern="acme/sum"), _rule(keys, "release")], "acme/sum@2")


def test_successes_are_cached_for_good_and_refusals_for_the_alias_ttl(signed_store, keys, monkeypatch):
    store = signed_store.store
    calls: list[str] = []

    def resolve(key: str):
        calls.append(key)
        return store.resolve(key)

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    checks = SigningChecks(resolve, refusal_ttl_s=5.0)
    rule = [_rule(keys, "release")]
    assert checks.cached(rule, "acme/sum@3") is None
    digests = checks.check(rule, "acme/sum@3")
    clock[0] += 10_000
    assert checks.cached(rule, "acme/sum@3") == digests and calls == ["acme/sum@3"]  # no I/O for a success seen before
    assert checks.cached([_rule(keys, "stranger")], "acme/sum@3") is None  # another policy is another entry
    # a refusal is remembered for the alias TTL only: the version may be signed meanwhile
    with pytest.raises(UnsignedModule):
        checks.check(rule, "acme/sum@1")
    with pytest.raises(UnsignedModule, match="acme/sum@1: refused"):
        checks.cached(rule, "acme/sum@1")
    signed_store.sign("acme/sum@1", keys["release"])
    clock[0] += 4.0
    with pytest.raises(UnsignedModule):
        checks.cached(rule, "acme/sum@1")
    clock[0] += 2.0
    assert checks.cached(rule, "acme/sum@1") is None
    assert checks.check(rule, "acme/sum@1")
    # the module loaded must have the files that were verified; else refused and forgotten
    loaded = {rel: d for rel, d in digests.items() if rel != "manifest.json"}
    checks.confirm_loaded(rule, "acme/sum@3", digests, loaded)
    with pytest.raises(SignatureMismatch, match="acme/sum@3: refused, the loaded files differ"):
        checks.confirm_loaded(rule, "acme/sum@3", digests, {**loaded, "adapter_model.safetensors": "0" * 64})
    assert checks.cached(rule, "acme/sum@3") is None


def test_provenance_is_cached_per_version_and_says_why_the_server_refuses(signed_store, keys):
    from tunehub.server.trust import server_trust_policy

    policy = server_trust_policy([f"{keys['release']}.pub"], require_signed=True)
    reg = Registry(signed_store.uri, trust=policy)
    calls: list[str] = []

    def provenance(ref: str):
        calls.append(ref)
        return reg.provenance(ref)

    cache = ProvenanceCache(provenance, reg.store.check_trust)
    three = cache.get(reg.resolve("acme/sum@3"))
    assert three["verified_by"] == [keys["release.id"]] and "refused" not in three
    assert three["signatures"][0]["by"] == "release-bot" and three["signatures"][0]["status"] == "verified"
    assert cache.get(reg.resolve("acme/sum@3")) is three and calls == ["acme/sum@3"]
    one = cache.get(reg.resolve("acme/sum@1"))
    assert one["signed"] is False and "is not signed and signatures are required" in one["refused"]
    two = cache.get(reg.resolve("acme/sum@2"))
    assert two["signatures"][0]["status"] == "untrusted key" and "signed only by keys that are not trusted" in two["refused"]
    assert "trusted: " + short_key_id(keys["release.id"]) + " (release.pub)" in two["refused"]  # a file name, no server path
    four = cache.get(reg.resolve("acme/sum@4"))
    assert "files changed after signing" in four["refused"] and four["verified_by"] == []
    reg.sign("acme/sum@1", keys["release"])  # a new signature: a new entry at once
    assert cache.get(reg.resolve("acme/sum@1"))["verified_by"] == [keys["release.id"]]


def test_lineage_stops_at_an_ancestor_the_caller_may_not_use():
    provenance = {
        "signed": True,
        "lineage": [
            {"ref": "acme/dapt@1", "resolved": "acme/dapt@1", "signatures": []},
            {"ref": "other/secret@3", "resolved": "other/secret@3", "signatures": [{"by": "someone"}]},
            {"ref": "acme/root@1", "resolved": "acme/root@1", "signatures": []},
        ],
    }
    shown = lineage_for(provenance, lambda repo: repo.startswith("acme/"))
    assert shown["lineage"] == [
        provenance["lineage"][0],
        {"ref": "other/secret@3", "withheld": "this API key may not use this module"},
    ]
    assert len(provenance["lineage"]) == 3  # the cached value is never changed


def test_serve_trust_options_are_checked_at_startup(tmp_path, keys, capsys):
    from tunehub.sdk.cli import main
    from tunehub.server.serve import ServeConfig, check_config

    (tmp_path / "config.json").write_text("{}")  # a model folder, as far as the checks go
    with pytest.raises(ConfigError, match=r"--require-signed needs --trust KEYS"):
        check_config(ServeConfig(base=str(tmp_path), require_signed=True))
    (tmp_path / "private.pem").write_bytes(keys["release"].read_bytes())
    with pytest.raises(ConfigError) as info:
        check_config(
            ServeConfig(base=str(tmp_path), trust=[str(tmp_path / "missing.pub"), str(tmp_path / "private.pem")], port=1)
        )
    text = str(info.value)
    assert "--trust: " in text and "missing.pub: No such file or directory" in text and "private.pem is a private key" in text
    assert "--port" in text  # with every other problem
    resolved = check_config(
        ServeConfig(base=str(tmp_path), trust=[os.path.relpath(f"{keys['release']}.pub")], require_signed=True)
    )
    assert resolved.config.trust == [str(Path(f"{keys['release']}.pub").resolve())] and resolved.config.require_signed
    capsys.readouterr()
    assert main(["serve", "--base", str(tmp_path), "--require-signed"]) == 2  # before any process starts
    assert "error: --require-signed needs --trust KEYS" in capsys.readouterr().err
