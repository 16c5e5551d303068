"""`tunehub serve --trust KEY --require-signed` as users run it: a real server on the tiny base
refuses unsigned modules, modules signed by a key it does not trust and versions rewritten after
signing (each a 403 with its own reason, in one batch with a request that still answers),
enforces a tenant's ``require_signed_by``, and shows signers and lineage in ``/v1/models``."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest
import yaml

from tests.integration.test_serve import BASE_NAME, Server
from tunehub.server.tenants import hash_key

pytestmark = pytest.mark.integration

KEYS = {"acme": "acme-trust-key-0123456789", "strict": "strict-trust-key-0123456789", "narrow": "narrow-trust-key-0123456789"}


def _rewrite_manifest(root, repo: str, version: int) -> None:
    """What an attacker with write access to the store does: a new manifest (another task) stored
    as a blob and the version's record pointed at it, every hash matching, the signature left."""
    import hashlib

    record_path = root / "modules" / repo / "versions" / f"{version}.json"
    record = json.loads(record_path.read_text())
    old = record["manifest_sha256"]
    manifest = json.loads((root / "blobs" / "sha256" / old[:2] / old).read_bytes())
    manifest["task"] = "exfiltrate"
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest[:2]).mkdir(exist_ok=True)
    (root / "blobs" / "sha256" / digest[:2] / digest).write_bytes(data)
    record.update(manifest_sha256=digest, task="exfiltrate", files={**record["files"], "manifest.json": digest})
    os.chmod(record_path, 0o644)
    record_path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def signed_world(tiny_llama_path, tmp_path_factory):
    from tunehub.registry.manifest import Manifest
    from tunehub.registry.module import write_module
    from tunehub.registry.signing import generate_key_pair
    from tunehub.sdk import Registry
    from tunehub.trainer.testing import make_peft_module

    root = tmp_path_factory.mktemp("serve-trust")
    (root / "keys").mkdir()
    ids = {name: generate_key_pair(root / "keys" / name) for name in ("server", "stranger", "release")}
    key = {name: root / "keys" / name for name in ids}
    reg = Registry(f"file://{root / 'registry'}")

    def module(name: str, seed: int, parent: str | None = None):
        folder = make_peft_module(tiny_llama_path, root / "modules" / f"{name.replace('/', '-')}-{seed}", "lora", seed=seed)
        if parent:
            write_module(folder, Manifest.read(folder).with_updates(parent=parent))
        return folder

    reg.push(module("acme/good", 1), "acme/good", sign=key["server"])
    reg.push(module("acme/unsigned", 2), "acme/unsigned")
    reg.push(module("acme/stranger", 3), "acme/stranger", sign=key["stranger"])
    reg.push(module("acme/tampered", 4), "acme/tampered", sign=key["server"])
    _rewrite_manifest(root / "registry", "acme/tampered", 1)
    reg.push(module("acme/child", 5, parent="acme/good@1"), "acme/child", sign=key["server"])
    released = reg.push(module("team/released", 6), "team/released", sign=key["server"])
    reg.sign(released.ref, key["release"])
    reg.push(module("team/pending", 7), "team/pending", sign=key["server"])
    tenants = {
        "tenants": {
            "acme": {"keys": [hash_key(KEYS["acme"])], "models": ["acme/*", "team/*", BASE_NAME]},
            "strict": {
                "keys": [hash_key(KEYS["strict"])],
                "models": ["acme/*", "team/*"],
                "require_signed_by": {"team/*": ["keys/release.pub"]},  # relative to the tenants file
            },
            "narrow": {"keys": [hash_key(KEYS["narrow"])], "models": ["acme/child"]},
        }
    }
    (root / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    return {"root": root, "registry": reg, "key": key, "ids": ids, "base": tiny_llama_path}


@pytest.fixture(scope="module")
def trust_server(signed_world):
    root = signed_world["root"]
    srv = Server(
        [
            "--base",
            str(signed_world["base"]),
            "--quantization",
            "none",
            "--registry",
            f"file://{root / 'registry'}",
            "--tenants",
            str(root / "tenants.yaml"),
            "--trust",
            "keys/server.pub",  # relative to the working directory, as a user types it
            "--require-signed",
            "--alias-ttl",
            "1",
        ],
        root,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


async def _complete_all(server, models: list[str], tenant: str = "acme") -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as client:
        return await asyncio.gather(
            *(
                client.post("/v1/completions", json={"model": m, "prompt": "the river runs", "max_tokens": 8, "ignore_eos": True})
                for m in models
            )
        )


def _refusal(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert "x-tunehub-module" not in response.headers
    return error["tunehub_error"], error["message"]


def test_unsigned_untrusted_and_rewritten_modules_are_refused_in_the_same_batch_as_a_good_one(trust_server, signed_world):
    server_id = signed_world["ids"]["server"][:16]
    good, unsigned, stranger, tampered, base = asyncio.run(
        _complete_all(trust_server, ["acme/good", "acme/unsigned", "acme/stranger", "acme/tampered@1", BASE_NAME])
    )
    assert good.status_code == 200, good.text
    assert good.json()["model"] == "acme/good@1" and good.json()["usage"]["completion_tokens"] == 8
    assert base.status_code == 200 and base.json()["usage"]["completion_tokens"] == 8  # the base alone needs no signature
    assert _refusal(unsigned) == (
        "UnsignedModule",
        "acme/unsigned@1: refused, the version is not signed and signatures are required"
        " (sign it: tunehub sign acme/unsigned@1 --key KEY)",
    )
    name, message = _refusal(stranger)
    stranger_id = signed_world["ids"]["stranger"][:16]
    assert name == "UntrustedSigner"
    assert (
        message
        == f"acme/stranger@1: refused, signed only by keys that are not trusted ({stranger_id}); trusted: {server_id} (server.pub)"
    )
    name, message = _refusal(tampered)
    assert name == "SignatureMismatch"
    assert message.startswith(f"acme/tampered@1: refused, signature by trusted key {server_id}: the files changed after signing")
    assert "(changed: manifest.json)" in message
    # a refused load is not cached: the same refusal again, and the good module answers on
    again = asyncio.run(_complete_all(trust_server, ["acme/unsigned", "acme/good"]))
    assert [r.status_code for r in again] == [403, 200]


def test_a_tenant_requires_its_release_key_for_its_patterns(trust_server, signed_world):
    released, pending, outside = asyncio.run(
        _complete_all(trust_server, ["team/released", "team/pending", "acme/good"], "strict")
    )
    assert released.status_code == 200 and released.json()["model"] == "team/released@1"
    assert outside.status_code == 200  # acme/* carries no rule for this tenant
    name, message = _refusal(pending)
    release_id, server_id = signed_world["ids"]["release"][:16], signed_world["ids"]["server"][:16]
    assert name == "UntrustedSigner"
    assert message == (
        f"team/pending@1: refused, signed only by keys that are not trusted ({server_id}); trusted: {release_id}"
        " (keys/release.pub); this API key requires a signature by one of those keys for modules matching 'team/*'"
    )
    assert str(signed_world["root"]) not in message
    # another tenant without the rule uses the same version
    [other] = asyncio.run(_complete_all(trust_server, ["team/pending"], "acme"))
    assert other.status_code == 200 and other.json()["model"] == "team/pending@1"
    # signed later by the release key: accepted once the refusal is older than the alias TTL (1 s)
    signed_world["registry"].sign("team/pending@1", signed_world["key"]["release"])
    deadline = time.monotonic() + 10
    while True:
        [answer] = asyncio.run(_complete_all(trust_server, ["team/pending"], "strict"))
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert answer.status_code == 200, answer.text


def test_models_show_signers_and_the_signed_lineage(trust_server, signed_world):
    ids = signed_world["ids"]
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    listed = httpx.get(trust_server.url + "/v1/models", headers=headers, timeout=60).json()["data"]
    models = {m["id"]: m for m in listed}
    good = models["acme/good"]
    assert {"id", "object", "created", "owned_by"} <= set(good) and good["object"] == "model" and good["owned_by"] == "acme"
    provenance = good["tunehub"]["provenance"]
    assert provenance["signed"] is True and provenance["verified_by"] == [ids["server"]] and provenance["lineage"] == []
    [signature] = provenance["signatures"]
    assert signature["key_id"] == ids["server"] and signature["status"] == "verified" and signature["at"] and signature["by"]
    assert "refused" not in provenance
    assert "is not signed" in models["acme/unsigned"]["tunehub"]["provenance"]["refused"]
    assert models["acme/stranger"]["tunehub"]["provenance"]["signatures"][0]["status"] == "untrusted key"
    assert "files changed after signing" in models["acme/tampered"]["tunehub"]["provenance"]["refused"]
    [parent] = models["acme/child"]["tunehub"]["provenance"]["lineage"]
    assert parent["ref"] == parent["resolved"] == "acme/good@1" and parent["verified_by"] == [ids["server"]]
    # one model by id; a tenant that may not use the parent sees only its reference
    narrow = httpx.get(
        trust_server.url + "/v1/models/acme/child@1", headers={"Authorization": f"Bearer {KEYS['narrow']}"}, timeout=60
    )
    assert narrow.status_code == 200, narrow.text
    child = narrow.json()["tunehub"]["provenance"]
    assert child["verified_by"] == [ids["server"]]
    assert child["lineage"] == [{"ref": "acme/good@1", "withheld": "this API key may not use this module"}]
