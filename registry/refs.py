"""Module references: ``[namespace/]name[@version|@alias]``.

Names are lowercase letters, digits, ``-``, ``_`` and ``.``, start with a letter or digit, end
with a letter, digit or ``_``, hold no ``--`` or ``..``, do not end in ``.git`` and are at most 96
characters: a name is always safe as one path component and is always a valid Hub repo name
(``huggingface_hub.utils.validate_repo_id`` accepts it, alone and as ``namespace/name``).

Versions are positive integers written in ASCII digits, without sign, spaces, underscores or
leading zeros, and below 2**63: :func:`parse_version` is the one place that turns text into a
version number (references, ``v<N>`` tags, file names of version records), so ``'١٢'``, ``'²'``,
``'１'``, ``'+1'``, ``' 1'``, ``'1_0'`` and ``'01'`` are refused everywhere, not read as numbers
by ``int()`` in one place and as names in another. Leading zeros are refused rather than
canonicalised: ``@01`` and ``v01`` would otherwise name the same version as ``@1`` under a
different spelling (and ``v01`` is not the tag ``v1`` on the Hub).

Anything else is refused with :class:`~tunehub.errors.InvalidReference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunehub.errors import InvalidReference

MAX_NAME_LENGTH = 96
LATEST = "latest"
#: the largest version number (versions must fit a signed 64-bit integer wherever they are stored)
MAX_VERSION = 2**63 - 1
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# [0-9], not \d: \d (like str.isdigit and int()) also matches Arabic-Indic, full-width... digits
_VERSION_DIGITS = re.compile(r"[0-9]+")


def parse_version(text: str) -> int:
    """The version number ``text`` spells, else ``InvalidReference``.

    The one text-to-version conversion of tunehub: ASCII digits only (no sign, space, ``_`` or
    non-ASCII digit, all of which ``int()`` accepts), no leading zero, from 1 to ``MAX_VERSION``.
    """
    if not isinstance(text, str):
        raise InvalidReference(f"a version must be a string of digits, got {type(text).__name__}")
    if not _VERSION_DIGITS.fullmatch(text):
        raise InvalidReference(f"version {text[:40]!r} is not a number: write versions with the ASCII digits 0-9, e.g. 3")
    if len(text) > len(str(MAX_VERSION)) or int(text) > MAX_VERSION:  # length first: int() of a huge string is slow
        raise InvalidReference(f"version {text[:40]!r} is too large: the largest version is {MAX_VERSION}")
    if text != "0" and text.startswith("0"):
        raise InvalidReference(f"version {text!r} has a leading zero: write {text.lstrip('0')}")
    return check_version(int(text))


def check_version(value: object) -> int:
    """``value`` if it is a version number (an int from 1 to ``MAX_VERSION``, not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_VERSION:
        raise InvalidReference(f"version must be a positive integer up to {MAX_VERSION}, got {value!r}")
    return value


def looks_like_version(text: str) -> bool:
    """Whether a selector is meant as a version (``3``, ``v3``, but also ``١٢``, ``+1``, ``1_0``...).

    Anything a reader could take for a number goes to :func:`parse_version`, which accepts only the
    canonical spelling; it is never silently taken as an alias name instead.
    """
    body = text.removeprefix("v")
    if body == "":
        return False
    if all(c.isdigit() or c.isnumeric() for c in body):  # '١٢', '²', '１', '½'...
        return True
    if len(body) > 2 * MAX_NAME_LENGTH:  # no valid alias either: refused as a name
        return False
    try:
        int(body)  # what int() reads as a number: '+1', ' 1', '1_0'...
    except ValueError:
        return False
    return True


def version_of_tag(tag: str) -> int | None:
    """N for a Hub tag ``v<N>`` spelled as :func:`parse_version` accepts; None for any other tag."""
    if not isinstance(tag, str) or not tag.startswith("v"):
        return None
    try:
        return parse_version(tag[1:])
    except InvalidReference:
        return None


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
            f"{what} {value!r} is not allowed: use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit"
        )
    # the Hub's repo-name rules (huggingface_hub.utils.validate_repo_id): every name must be
    # usable as a repo on an hf:// registry, so a name never works in one store and not another
    if "--" in value:
        raise InvalidReference(f"{what} {value!r} contains '--', which no Hub repo name may contain")
    if value.endswith((".", "-")):
        raise InvalidReference(f"{what} {value!r} ends with {value[-1]!r}, which no Hub repo name may do")
    if value.endswith(".git"):
        raise InvalidReference(f"{what} {value!r} ends with '.git', which no Hub repo name may do")
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
        if self.version is not None:
            check_version(self.version)
        if self.alias is not None:
            validate_alias(self.alias)

    @classmethod
    def parse(cls, text: str) -> ModuleRef:
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
            if looks_like_version(selector):
                version = parse_version(selector.removeprefix("v"))
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

    def with_version(self, version: int) -> ModuleRef:
        return ModuleRef(name=self.name, namespace=self.namespace, version=version)

    def unversioned(self) -> ModuleRef:
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
    if looks_like_version(alias):
        raise InvalidReference(f"alias {alias!r} looks like a version number")
    return alias


def parse_ref(text: str | ModuleRef) -> ModuleRef:
    return text if isinstance(text, ModuleRef) else ModuleRef.parse(text)
