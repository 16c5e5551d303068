"""Module references: ``[namespace/]name[@version|@alias]``.

Names are lowercase letters, digits, ``-``, ``_`` and ``.``, start with a letter or digit and
are at most 96 characters, so a name is always safe as one path component and as one part of
a Hub repo id. Anything else is refused with :class:`~tunehub.errors.InvalidReference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunehub.errors import InvalidReference

MAX_NAME_LENGTH = 96
LATEST = "latest"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def is_commit_sha(value: object) -> bool:
    """A full 40-hex commit id (``name@<sha>`` pins a Hub commit in ``hf://`` stores)."""
    return isinstance(value, str) and bool(_COMMIT_SHA.fullmatch(value))


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid name part, else raise ``InvalidReference``."""
    if not isinstance(value, str) or value == "":
        raise InvalidReference(f"empty {what}")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidReference(f"{what} {value[:20]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if "/" in value or "\\" in value:
        raise InvalidReference(f"{what} {value!r} contains a path separator")
    if ".." in value:
        raise InvalidReference(f"{what} {value!r} contains '..'")
    if value != value.lower():
        raise InvalidReference(f"{what} {value!r} has upper-case letters; names are lowercase")
    if not _NAME.fullmatch(value):
        raise InvalidReference(
            f"{what} {value!r} is not allowed: use lowercase letters, digits, '-', '_' and '.',"
            " starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, order=True)
class ModuleRef:
    """A parsed reference. ``version`` and ``alias`` are never both set."""

    name: str
    namespace: str | None = None
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.namespace is not None:
            validate_name(self.namespace, "namespace")
        if self.version is not None and self.alias is not None:
            raise InvalidReference("a reference names a version or an alias, not both")
        if self.version is not None and (isinstance(self.version, bool) or self.version < 1):
            raise InvalidReference(f"version must be a positive integer, got {self.version!r}")
        if self.alias is not None:
            validate_alias(self.alias)

    @classmethod
    def parse(cls, text: str) -> "ModuleRef":
        """Parse ``[namespace/]name[@version|@alias]``."""
        if not isinstance(text, str):
            raise InvalidReference(f"a reference must be a string, got {type(text).__name__}")
        if text.strip() != text or text == "":
            raise InvalidReference(f"invalid reference {text!r}")
        path, at, selector = text.partition("@")
        if at and selector == "":
            raise InvalidReference(f"reference {text!r} ends with '@' but names no version or alias")
        if "@" in selector:
            raise InvalidReference(f"reference {text!r} has more than one '@'")
        if "\\" in path:
            raise InvalidReference(f"reference {text!r} contains a path separator")
        parts = path.split("/")
        if len(parts) > 2:
            raise InvalidReference(f"reference {text!r} has more than one '/': use namespace/name")
        namespace, name = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        if namespace is not None:
            validate_name(namespace, "namespace")
        validate_name(name)
        version = alias = None
        if selector:
            if selector.isdigit():
                version = int(selector)
            elif selector.startswith("v") and selector[1:].isdigit():
                version = int(selector[1:])
            else:
                alias = selector
        return cls(name=name, namespace=namespace, version=version, alias=alias)

    @property
    def repo(self) -> str:
        """``namespace/name`` or ``name``: the module's identity without a selector."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def selector(self) -> str:
        """``latest`` when neither version nor alias is set."""
        if self.version is not None:
            return str(self.version)
        return self.alias or LATEST

    @property
    def commit(self) -> str | None:
        """The selector when it is a 40-hex commit id (parsed as an alias otherwise), else None."""
        return self.alias if is_commit_sha(self.alias) else None

    def with_version(self, version: int) -> "ModuleRef":
        return ModuleRef(name=self.name, namespace=self.namespace, version=version)

    def unversioned(self) -> "ModuleRef":
        return ModuleRef(name=self.name, namespace=self.namespace)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.repo}@{self.version}"
        if self.alias is not None:
            return f"{self.repo}@{self.alias}"
        return self.repo


def validate_alias(alias: str) -> str:
    """Aliases follow the name rules and must not look like a version number."""
    validate_name(alias, "alias")
    if alias.isdigit() or (alias.startswith("v") and alias[1:].isdigit()):
        raise InvalidReference(f"alias {alias!r} looks like a version number")
    return alias


def parse_ref(text: str | ModuleRef) -> ModuleRef:
    return text if isinstance(text, ModuleRef) else ModuleRef.parse(text)
