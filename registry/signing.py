"""Signed versions: OpenSSF ``model_signing`` signatures over a version's files, and the trust
policy that loads only what trusted keys signed.

A signature is what ``model_signing`` writes (a Sigstore bundle: a DSSE envelope around an
in-toto statement with one ``(path, sha256)`` pair per file, signed with an elliptic key). It
covers every file of the version, ``manifest.json`` included, and the manifest records the base's
fingerprint and quantization and the parent reference: one signature binds all of them, so a
manifest re-written with matching hashes no longer matches what was signed. Signatures live in
the registry's state beside the version (both stores, see :mod:`~tunehub.registry.state`): a
version stays immutable, and signing an existing one (``tunehub sign``) adds a statement about
it without touching its files. The statements are the stock format: ``model_signing verify key``
accepts a pulled folder with the signature ``tunehub verify --export`` writes.

Verification never reads the files again. A store checks every file it reads against the
sha256 its record holds (a cold load is bound by that hashing); the statement is then compared
with those very digests, so a signed load costs one ECDSA verification more than an unsigned
one. ``model_signing``'s public verifier is used for that, given a hashing configuration that
answers with the digests already checked instead of reading the files again. Building that
answer needs ``model_signing``'s digest type, which lives in a private module: it is named in
this file only, the dependency is pinned to the 1.x series in ``pyproject.toml``, and
``tests/unit/test_signing.py`` checks that the digests built here equal the ones
``model_signing`` computes itself.

Keys are identified as ``model_signing`` does in the bundle's ``publicKey.hint``: the sha256 of
the public key's PEM (SubjectPublicKeyInfo). The hint only picks the trusted key to try; the
decision is the cryptographic verification.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunehub.errors import (
    ConfigError,
    IntegrityError,
    SignatureMismatch,
    UnsignedModule,
    UntrustedSigner,
)
from tunehub.registry.files import is_sha256

#: how many hex digits of a key id people see (the whole id is recorded and compared)
SHORT_KEY_ID = 16
MAX_BUNDLE_BYTES = 1 << 16  # a bundle over a few hundred files is a few KiB
_SIGNED_HASH = "sha256"


def key_id_of(public_key: Any) -> str:
    """The id of an elliptic public key: sha256 of its PEM (SubjectPublicKeyInfo), as
    ``model_signing`` writes in a bundle's ``publicKey.hint``."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def short_key_id(key_id: str) -> str:
    return key_id[:SHORT_KEY_ID]


def _load_private_key(path: Path, password: str | None) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"signing key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except TypeError:
        raise ConfigError(f"signing key {path} is encrypted: set TUNEHUB_SIGNING_KEY_PASSWORD") from None
    except ValueError:
        # a wrong password and a file that is no key raise the same error; never echo the password
        raise ConfigError(f"signing key {path} is not a PEM private key, or its password is wrong") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"signing key {path} is not an elliptic-curve key (model_signing signs with EC keys)")
    return key


def generate_key_pair(private_path: str | Path, public_path: str | Path | None = None) -> str:
    """Write a new P-256 key pair: the private key (PEM, mode 0600) and its public key (PEM,
    default ``<private>.pub``). Never overwrites a file. Returns the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path is not None else private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists; tunehub never overwrites a key file")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{private_path} exists; tunehub never overwrites a key file") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    try:
        with open(public_path, "xb") as handle:
            handle.write(public_pem)
    except FileExistsError:
        raise ConfigError(f"{public_path} exists; tunehub never overwrites a key file") from None
    return key_id_of(key.public_key())


# --- what is stored --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignatureEntry:
    """One signature of one version, as the registry's state keeps it."""

    key_id: str  # sha256 hex of the signer's public key PEM (the bundle's hint)
    bundle: str  # the Sigstore bundle JSON model_signing wrote
    by: str  # who added it (the actor, as for pushes)
    at: str  # when (ISO 8601, UTC)

    def to_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "bundle": self.bundle, "by": self.by, "at": self.at}


def parse_signature_entry(raw: object, where: str) -> SignatureEntry:
    """A signature entry read back from a store (untrusted): shape and sizes checked; whether it
    verifies is decided later, against trusted keys."""
    if not isinstance(raw, dict) or set(raw) != {"key_id", "bundle", "by", "at"}:
        raise IntegrityError(f"{where}: a signature entry must have exactly key_id, bundle, by, at")
    key_id, bundle, by, at = raw["key_id"], raw["bundle"], raw["by"], raw["at"]
    if not (isinstance(key_id, str) and is_sha256(key_id)):
        raise IntegrityError(f"{where}: a signature's key_id must be 64 lowercase hex digits")
    if not isinstance(bundle, str) or not bundle or len(bundle) > MAX_BUNDLE_BYTES:
        raise IntegrityError(f"{where}: a signature's bundle must be a JSON text under {MAX_BUNDLE_BYTES} bytes")
    if not isinstance(by, str) or not isinstance(at, str) or len(by) > 256 or len(at) > 64:
        raise IntegrityError(f"{where}: a signature's by and at must be short strings")
    return SignatureEntry(key_id=key_id, bundle=bundle, by=by, at=at)


def bundle_key_hint(bundle: str) -> str | None:
    """The key id a bundle names (``verificationMaterial.publicKey.hint``), or None."""
    try:
        raw = json.loads(bundle)
        hint = raw["verificationMaterial"]["publicKey"]["hint"]
    except (ValueError, KeyError, TypeError):
        return None
    return hint if isinstance(hint, str) and is_sha256(hint) else None


# --- the digests model_signing signs ---------------------------------------------------------------
def version_digests(manifest_sha256: str, files: Mapping[str, str]) -> dict[str, str]:
    """Every file of a version with its sha256, ``manifest.json`` included: what is signed."""
    from tunehub.registry.manifest import MANIFEST_FILE

    return {**dict(files), MANIFEST_FILE: manifest_sha256}


def known_digests_hashing_config(digests: Mapping[str, str]) -> Any:
    """A ``model_signing.hashing.Config`` whose ``hash`` answers with ``digests`` (checked by the
    store on the bytes it read) instead of reading files: sign and verify without hashing twice."""
    from model_signing import hashing, manifest
    from model_signing._hashing.hashing import Digest  # the one private name; see the module docstring

    serialization = manifest.SerializationType.from_args({"method": "files", "hash_type": _SIGNED_HASH, "allow_symlinks": False})
    items = [
        manifest.FileManifestItem(path=pathlib.PurePosixPath(rel), digest=Digest(_SIGNED_HASH, bytes.fromhex(digest)))
        for rel, digest in sorted(digests.items())
    ]

    class KnownDigests(hashing.Config):
        def hash(self, model_path: Any, *, files_to_hash: Any = None) -> Any:
            return manifest.Manifest(pathlib.Path(model_path).name, items, serialization)

    return KnownDigests()


def sign_digests(
    digests: Mapping[str, str], key_path: str | Path, *, name: str, by: str, at: str, password: str | None = None
) -> SignatureEntry:
    """Sign ``digests`` (a version's files, see :func:`version_digests`) with the elliptic private
    key at ``key_path``; ``name`` is the statement's subject (informative: the module's name)."""
    from model_signing import signing

    key_path = Path(key_path)
    password = password if password is not None else os.environ.get("TUNEHUB_SIGNING_KEY_PASSWORD")
    key = _load_private_key(key_path, password)
    config = signing.Config().use_elliptic_key_signer(private_key=key_path, password=password)
    config.set_hashing_config(known_digests_hashing_config(digests))
    with tempfile.TemporaryDirectory(prefix="tunehub-sign-") as tmp:
        signature_path = Path(tmp) / "model.sig"
        config.sign(Path(tmp) / name.replace("/", "--"), signature_path)
        bundle = signature_path.read_text()
    return SignatureEntry(key_id=key_id_of(key.public_key()), bundle=bundle, by=by, at=at)


# --- trust ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    source: str  # the file it was read from
    pem: bytes


def load_trusted_keys(paths: Iterable[str | Path]) -> tuple[TrustedKey, ...]:
    """Public keys (PEM) from files, or from every ``*.pem``/``*.pub`` file of a folder."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys: dict[str, TrustedKey] = {}
    problems: list[str] = []
    for given in paths:
        path = Path(given)
        files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".pub")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            problems.append(f"trust: {path} holds no *.pem or *.pub file")
        for file in files:
            try:
                data = file.read_bytes()
            except OSError as exc:
                problems.append(f"trust: {file}: {exc.strerror or exc}")
                continue
            if b"PRIVATE KEY" in data:
                problems.append(f"trust: {file} is a private key; trust the public key (.pub) instead, keep this one secret")
                continue
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError:
                problems.append(f"trust: {file} is not a PEM public key")
                continue
            if not isinstance(key, ec.EllipticCurvePublicKey):
                problems.append(f"trust: {file} is not an elliptic-curve public key")
                continue
            key_id = key_id_of(key)
            pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            keys.setdefault(key_id, TrustedKey(key_id=key_id, source=str(file), pem=pem))
    if problems:
        raise ConfigError(problems)
    return tuple(keys.values())


@dataclass(frozen=True)
class Signer:
    """A signature of a version and what checking it found."""

    key_id: str
    by: str
    at: str
    status: str  # "verified" (a trusted key, the files match), "untrusted key", "not checked", "mismatch: ..."

    def to_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "by": self.by, "at": self.at, "status": self.status}


@dataclass(frozen=True)
class Provenance:
    """Who signed a version, after checking what a policy's keys can check."""

    signers: tuple[Signer, ...] = ()

    @property
    def verified(self) -> tuple[str, ...]:
        return tuple(s.key_id for s in self.signers if s.status == "verified")

    def to_dict(self) -> dict[str, Any]:
        return {
            "signed": bool(self.signers),
            "verified_by": list(self.verified),
            "signatures": [s.to_dict() for s in self.signers],
        }


_SCRATCH: list[Path] = []  # one private folder per process for the files model_signing reads
_SCRATCH_LOCK = threading.Lock()


def _scratch() -> Path:
    with _SCRATCH_LOCK:
        if not _SCRATCH:
            folder = Path(tempfile.mkdtemp(prefix="tunehub-trust-"))
            atexit.register(shutil.rmtree, folder, True)
            _SCRATCH.append(folder)
        return _SCRATCH[0]


def _verify_with(entry: SignatureEntry, key: TrustedKey, digests: Mapping[str, str]) -> str | None:
    """None if ``entry`` verifies with ``key`` over ``digests``, else why not. The answer depends
    on nothing else, so it is remembered: a module loaded again costs no second verification."""
    return _verify_cached(entry.bundle, key, tuple(sorted(digests.items())))


@functools.lru_cache(maxsize=4096)
def _verify_cached(bundle: str, key: TrustedKey, digests: tuple[tuple[str, str], ...]) -> str | None:
    from model_signing import verifying

    folder = _scratch()
    key_path = folder / f"{key.key_id}.pub"  # named by the sha256 of its content: never two contents
    if not key_path.exists():
        staged = folder / f"{key.key_id}.{uuid.uuid4().hex}.tmp"
        staged.write_bytes(key.pem)
        os.replace(staged, key_path)
    signature_path = folder / f"{uuid.uuid4().hex}.sig"
    signature_path.write_text(bundle)
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=key_path)
        config.set_hashing_config(known_digests_hashing_config(dict(digests)))
        config.verify(folder / "module", signature_path)
    except ValueError as exc:
        text = str(exc)
        if text.startswith("Signature mismatch"):
            return _mismatch(bundle, dict(digests))
        return f"the signature does not verify with key {short_key_id(key.key_id)} ({text.splitlines()[0][:200]})"
    except Exception as exc:  # a malformed bundle fails in the parsers (protobuf, JSON, base64)
        return f"the signature is malformed ({type(exc).__name__})"
    finally:
        signature_path.unlink(missing_ok=True)
    return None


def _mismatch(bundle: str, digests: Mapping[str, str]) -> str:
    """Which files differ from the signed statement (names only; the statement verified)."""
    import base64

    try:
        statement = json.loads(base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"]))
        signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError):
        return "the files differ from what was signed"
    changed = sorted(rel for rel in set(signed) & set(digests) if signed[rel] != digests[rel])
    added = sorted(set(digests) - set(signed))
    removed = sorted(set(signed) - set(digests))
    parts = []
    if changed:
        parts.append("changed: " + ", ".join(changed))
    if added:
        parts.append("not signed: " + ", ".join(added))
    if removed:
        parts.append("missing: " + ", ".join(removed))
    return "the files changed after signing (" + "; ".join(parts or ["digests differ"]) + ")"


@dataclass(frozen=True)
class TrustPolicy:
    """Which keys are trusted, and whether a version must carry a signature by one of them.

    With keys, every signature by a trusted key is verified and one that fails refuses the
    version even when signatures are not required: a trusted key's name on changed files is
    tampering. Signatures by other keys are reported, never trusted."""

    keys: tuple[TrustedKey, ...] = ()
    require_signed: bool = False

    def __post_init__(self) -> None:
        if self.require_signed and not self.keys:
            raise ConfigError("--require-signed needs --trust KEYS: the public keys whose signatures are accepted")

    @classmethod
    def from_paths(cls, trust: Iterable[str | Path] = (), require_signed: bool = False) -> TrustPolicy:
        return cls(keys=load_trusted_keys(trust), require_signed=require_signed)

    @property
    def active(self) -> bool:
        return bool(self.keys)

    def check(self, label: str, digests: Mapping[str, str], signatures: Iterable[SignatureEntry]) -> Provenance:
        """The version's provenance, or the error that refuses it (``label`` names it)."""
        trusted = {key.key_id: key for key in self.keys}
        signers: list[Signer] = []
        problems: list[str] = []
        for entry in signatures:
            hint = bundle_key_hint(entry.bundle)
            key = trusted.get(entry.key_id)
            if key is None:
                signers.append(Signer(entry.key_id, entry.by, entry.at, "untrusted key" if self.keys else "not checked"))
                continue
            problem = (
                "the bundle names another key than its entry"
                if hint is not None and hint != entry.key_id
                else _verify_with(entry, key, digests)
            )
            if problem is None:
                signers.append(Signer(entry.key_id, entry.by, entry.at, "verified"))
            else:
                signers.append(Signer(entry.key_id, entry.by, entry.at, f"mismatch: {problem}"))
                problems.append(f"signature by trusted key {short_key_id(entry.key_id)}: {problem}")
        provenance = Provenance(tuple(signers))
        if problems:
            raise SignatureMismatch(f"{label}: refused, " + "; ".join(problems))
        if self.require_signed and not provenance.verified:
            if not signers:
                raise UnsignedModule(
                    f"{label}: refused, the version is not signed and signatures are required (sign it: tunehub sign {label} --key KEY)"
                )
            ids = ", ".join(sorted({short_key_id(s.key_id) for s in signers}))
            raise UntrustedSigner(
                f"{label}: refused, signed only by keys that are not trusted ({ids}); trusted: " + self.describe()
            )
        return provenance

    def describe(self) -> str:
        return ", ".join(f"{short_key_id(k.key_id)} ({k.source})" for k in self.keys) or "no keys"


def export_bundle(entry: SignatureEntry, path: str | Path) -> None:
    """Write a signature as the ``.sig`` file ``model_signing verify`` reads (never overwrites)."""
    try:
        with open(path, "x") as handle:
            handle.write(entry.bundle)
    except FileExistsError:
        raise ConfigError(f"{path} exists; tunehub never overwrites a file") from None
