"""Module format, references and stores. Never imports torch: push and pull work without it."""

from tunehub.registry.files import sha256_file
from tunehub.registry.fingerprint import base_fingerprint, tokenizer_fingerprint
from tunehub.registry.manifest import (
    SCHEMA_VERSION,
    BaseInfo,
    Component,
    DataInfo,
    Manifest,
    ModuleKind,
    TokenizerInfo,
)
from tunehub.registry.module import LocalModule, model_card, verify_module, write_module
from tunehub.registry.refs import ModuleRef, parse_ref
from tunehub.registry.store import AliasMove, ModuleStore, VersionInfo, default_registry_uri, open_store

__all__ = [
    "SCHEMA_VERSION",
    "AliasMove",
    "BaseInfo",
    "Component",
    "DataInfo",
    "LocalModule",
    "Manifest",
    "ModuleKind",
    "ModuleRef",
    "ModuleStore",
    "TokenizerInfo",
    "VersionInfo",
    "base_fingerprint",
    "default_registry_uri",
    "model_card",
    "open_store",
    "parse_ref",
    "sha256_file",
    "tokenizer_fingerprint",
    "verify_module",
    "write_module",
]
