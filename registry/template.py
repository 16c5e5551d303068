"""Hard-prompt templates: the ``template`` module kind's one file, ``template.json``.

A template is text with named slots, ``{name}`` (``{{`` and ``}}`` are literal braces)::

    {"format": "text", "text": "Reverse the words: {words}\\nAnswer:"}
    {"format": "chat", "messages": [{"role": "system", "content": "You reverse words."},
                                    {"role": "user", "content": "Reverse: {words}"}]}

The registry versions it like any module; the server renders it per request with the request's
slot values and runs the result on the base: the zero-parameter baseline of every method.
Rendering substitutes slot names only (no attribute or index lookups, unlike ``str.format``), so
a template or a slot value can never reach anything but the text.

The file is read back from a store, so :func:`parse_template` treats it as untrusted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tunehub.errors import InvalidRequest, ManifestError

TEMPLATE_FILE = "template.json"
CHAT_ROLES = ("system", "user", "assistant")
MAX_TEMPLATE_BYTES = 1 << 16
MAX_SLOTS = 32
_SLOT = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]{0,63})\}|\{|\}")


def _pieces(text: str, where: str) -> list[str | tuple[str]]:
    """``text`` as literal strings and ``(slot,)`` markers; a lone brace is an error."""
    pieces: list[str | tuple[str]] = []
    last = 0
    for match in _SLOT.finditer(text):
        pieces.append(text[last : match.start()])
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append(token[0])
        elif match.group(1):
            pieces.append((match.group(1),))
        else:
            raise ManifestError(f"{where}: a lone {token!r}: write {{{{ or }}}} for a literal brace, {{name}} for a slot")
        last = match.end()
    pieces.append(text[last:])
    return pieces


@dataclass(frozen=True)
class Template:
    format: Literal["text", "chat"]
    text: str | None = None
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)

    @property
    def slots(self) -> tuple[str, ...]:
        """The slot names, in order of first use."""
        texts = [self.text or ""] if self.format == "text" else [content for _, content in self.messages]
        seen: dict[str, None] = {}
        for text in texts:
            for piece in _pieces(text, "template"):
                if isinstance(piece, tuple):
                    seen.setdefault(piece[0], None)
        return tuple(seen)

    def to_json(self) -> str:
        raw: dict[str, Any] = {"format": self.format}
        if self.format == "text":
            raw["text"] = self.text
        else:
            raw["messages"] = [{"role": role, "content": content} for role, content in self.messages]
        return json.dumps(raw, indent=2, ensure_ascii=False) + "\n"

    def values(self, slots: Mapping[str, str] | None, prompt: str | None = None) -> dict[str, str]:
        """The slot values of a request: ``slots``, or (a template with one slot) ``prompt``.
        Raises InvalidRequest naming what is missing or unknown."""
        names = self.slots
        if slots is not None and prompt:
            raise InvalidRequest("give the slot values in 'slots' or, for a one-slot template, as the prompt; not both")
        if slots is None:
            if prompt is not None and len(names) == 1:
                return {names[0]: prompt}
            if not names:
                return {}
            raise InvalidRequest(f"this template has slots {', '.join(names)}: send their values in 'slots'")
        unknown = sorted(set(slots) - set(names))
        missing = [n for n in names if n not in slots]
        if unknown or missing:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else []
            )
            raise InvalidRequest(
                f"'slots' must give exactly this template's slots ({', '.join(names) or 'none'}): " + "; ".join(parts)
            )
        return dict(slots)

    def check_endpoint(self, *, chat: bool) -> None:
        """A chat template answers chat requests, a text template completions; InvalidRequest
        saying which endpoint to use otherwise."""
        if chat and self.format != "chat":
            raise InvalidRequest("this is a text template: use /v1/completions")
        if not chat and self.format != "text":
            raise InvalidRequest("this is a chat template: use /v1/chat/completions")

    def render_text(self, values: Mapping[str, str]) -> str:
        self.check_endpoint(chat=False)
        return _render(self.text or "", values)

    def render_messages(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        self.check_endpoint(chat=True)
        return [{"role": role, "content": _render(content, values)} for role, content in self.messages]


def _render(text: str, values: Mapping[str, str]) -> str:
    return "".join(piece if isinstance(piece, str) else values[piece[0]] for piece in _pieces(text, "template"))


def parse_template(data: bytes | str, where: str = TEMPLATE_FILE) -> Template:
    """A template read back from a store or a user's file: JSON of the documented shape, bounded
    in size and slot count, every brace well formed. Raises ManifestError naming the problem."""
    if len(data) > MAX_TEMPLATE_BYTES:
        raise ManifestError(f"{where} is larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        raise ManifestError(f"{where} is not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("format") not in ("text", "chat"):
        raise ManifestError(f'{where}: "format" must be "text" or "chat"')
    if raw["format"] == "text":
        if set(raw) != {"format", "text"} or not isinstance(raw["text"], str) or not raw["text"]:
            raise ManifestError(f'{where}: a text template is {{"format": "text", "text": "... {{slot}} ..."}}')
        template = Template(format="text", text=raw["text"])
    else:
        messages = raw.get("messages")
        if set(raw) != {"format", "messages"} or not isinstance(messages, list) or not messages:
            raise ManifestError(f'{where}: a chat template is {{"format": "chat", "messages": [{{"role", "content"}}, ...]}}')
        pairs = []
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and set(message) == {"role", "content"}):
                raise ManifestError(f"{where}: messages[{i}] must be {{role, content}}")
            role, content = message["role"], message["content"]
            if role not in CHAT_ROLES or not isinstance(content, str):
                raise ManifestError(f"{where}: messages[{i}] needs a role of {', '.join(CHAT_ROLES)} and text content")
            pairs.append((role, content))
        template = Template(format="chat", messages=tuple(pairs))
    texts = [template.text or ""] if template.format == "text" else [c for _, c in template.messages]
    for text in texts:
        _pieces(text, where)  # raises on a lone brace
    if len(template.slots) > MAX_SLOTS:
        raise ManifestError(f"{where} has more than {MAX_SLOTS} slots")
    return template


__all__ = ["CHAT_ROLES", "MAX_SLOTS", "TEMPLATE_FILE", "Template", "parse_template"]
