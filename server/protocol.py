"""The OpenAI-compatible wire format: request validation and response bodies.

Validation reports every problem of a request at once, as one 400 with a readable message (and
the first offending field as the OpenAI body's ``param``). Every field is checked for its type
and its range before anything reaches the inference worker, so no client input can make the
server answer 5xx: seeds fit the sampler's 64 bits, temperatures and top_p are finite, token
ids are non-negative ints of a bounded size (the worker checks them against the vocabulary),
stop strings are bounded in number and length. Messages quote offending values shortened, never
a whole (possibly huge or deeply nested) value. Parameters tunehub cannot honour (``n`` > 1,
penalties, logprobs, tools...) are refused, not silently ignored; fields that change nothing
(``user``) are accepted. Extensions, as vLLM has them: ``ignore_eos`` and ``stop_token_ids``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tunehub.errors import InvalidRequest, TunehubError, public_error_name
from tunehub.registry.template import MAX_SLOTS

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters of one stop string (each is matched against the text every step)
MAX_MODEL_LENGTH = 2048  # a reference is at most ~200 characters, a composition joins up to MAX_MODULES
MAX_MODULES = 8  # the engine's MAX_PARTS (tunehub.server.engine.compose; this module loads no torch)
MAX_MODULE_WEIGHT = 10.0  # the engine's MAX_WEIGHT
#: the largest max_tokens (the engine's own limit; generation stops at the context's end long before)
MAX_TOKENS_LIMIT = 2**31 - 1
#: seeds are what ``torch.Generator.manual_seed`` takes: 0 <= seed < 2**64
SEED_LIMIT = 2**64
#: token ids beyond any vocabulary; the worker checks the base's actual vocabulary size
TOKEN_ID_LIMIT = 2**31
MAX_TEMPERATURE = 2.0
CHAT_ROLES = {"system", "user", "assistant"}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass
class ParsedRequest:
    model: str
    chat: bool
    prompt: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    slots: dict[str, str] | None = None  # a template module's slot values (tunehub's own field)
    #: each part's weight when the request composed modules with ``modules`` (tunehub's own field);
    #: ``model`` then joins their references with '+'
    weights: list[float] | None = None

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of the engine's ``SamplingParams``."""
        return {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    # JSON as Python reads it has NaN and Infinity; ints beyond float range are not finite either
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_text(value: Any) -> bool:
    """A string that is valid Unicode: JSON's \\ud800 escapes give lone surrogates, which neither
    the tokenizer nor a UTF-8 response can carry."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and 0 <= value < TOKEN_ID_LIMIT


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_token_id(t) for t in value)


def _show(value: Any) -> str:
    """A short description of a client's value for an error message: never its whole text
    (a huge string), never a repr that recurses (a deeply nested list)."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        text = str(value) if value.bit_length() < 200 else f"an integer of {value.bit_length()} bits"
        return text
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + f"... ({len(value)} characters)"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _parse_modules(raw: Any, problems: _Problems) -> list[tuple[str, float]] | None:
    """``modules``: [{"model": REF, "weight": W}, ...], the parts of a weighted composition."""
    if raw is None:
        return None
    shape = f'\'modules\' must be a list of 1 to {MAX_MODULES} objects like {{"model": "acme/a", "weight": 0.7}}'
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_MODULES:
        problems.add("modules", shape)
        return None
    parts = []
    for i, item in enumerate(raw):
        ref = item.get("model") if isinstance(item, dict) else None
        weight = item.get("weight", 1.0) if isinstance(item, dict) else None
        if not isinstance(item, dict) or set(item) - {"model", "weight"}:
            problems.add("modules", shape)
            return None
        if not isinstance(ref, str) or not ref or "+" in ref or len(ref) > MAX_MODEL_LENGTH or not _is_text(ref):
            problems.add("modules", f"modules[{i}].model must be one module reference, got {_show(ref)}")
            return None
        if not isinstance(weight, (int, float)) or not _is_finite_number(weight) or abs(weight) > MAX_MODULE_WEIGHT:
            problems.add(
                "modules",
                f"modules[{i}].weight must be a number from -{MAX_MODULE_WEIGHT:g} to {MAX_MODULE_WEIGHT:g}, got {_show(weight)}",
            )
            return None
        parts.append((ref, float(weight)))
    return parts


class _Problems:
    """The problems of one request, each with the field it concerns (the first is the ``param``)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.param: str | None = None

    def add(self, param: str, message: str) -> None:
        if self.param is None:
            self.param = param
        self.messages.append(message)

    def raise_if_any(self) -> None:
        if self.messages:
            error = InvalidRequest("; ".join(self.messages))
            error.param = self.param  # type: ignore[attr-defined]
            raise error


def parse_request(body: Any, *, chat: bool) -> ParsedRequest:
    """Validate a ``/v1/completions`` or ``/v1/chat/completions`` body (InvalidRequest if bad)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    problems = _Problems()
    model = body.get("model")
    composed = _parse_modules(body.get("modules"), problems)
    if composed is not None:  # the composition names the model; a 'model' given too must agree
        joined = "+".join(ref for ref, _ in composed)
        if model is not None and model != joined:
            problems.add("model", f"'model' must name the same modules as 'modules' ({_show(joined)}) or be left out")
        model = joined
    if model is None:
        problems.add("model", "'model' is required: a module reference such as acme/summarize@prod, or the base model's name")
    elif not isinstance(model, str):
        problems.add("model", f"'model' must be a string, got {_show(model)}")
    elif not model:
        problems.add("model", "'model' is empty")
    elif len(model) > MAX_MODEL_LENGTH:
        problems.add("model", f"'model' is longer than {MAX_MODEL_LENGTH} characters")
    elif not _is_text(model):
        problems.add("model", f"'model' is not valid Unicode text, got {_show(model)}")
    parsed = ParsedRequest(model=model if isinstance(model, str) else "", chat=chat)
    if composed is not None:
        parsed.weights = [weight for _, weight in composed]

    if chat:
        parsed.messages = _parse_messages(body.get("messages"), problems)
        max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        for unsupported in ("tools", "functions"):
            if body.get(unsupported):
                problems.add(unsupported, f"'{unsupported}' is not supported")
        if body.get("tool_choice") not in (None, "none"):
            problems.add("tool_choice", "'tool_choice' is not supported")
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            problems.add("response_format", "'response_format' other than {'type': 'text'} is not supported")
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
            problems.add("logprobs", "'logprobs' is not supported")
    else:
        _parse_prompt(body.get("prompt"), parsed, problems)
        max_tokens_field = "max_tokens"
        if body.get("echo") not in (None, False):
            problems.add("echo", "'echo' is not supported")
        if body.get("best_of") not in (None, 1):
            problems.add("best_of", "'best_of' must be 1")
        if body.get("suffix") is not None:
            problems.add("suffix", "'suffix' is not supported")
        if body.get("logprobs") not in (None, 0, False):
            problems.add("logprobs", "'logprobs' is not supported")

    max_tokens = body.get(max_tokens_field)
    if max_tokens is not None:
        if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            problems.add(
                max_tokens_field, f"'{max_tokens_field}' must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {_show(max_tokens)}"
            )
        else:
            parsed.max_tokens = max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_finite_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            problems.add("temperature", f"'temperature' must be a number from 0 to 2, got {_show(temperature)}")
        else:
            parsed.temperature = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_finite_number(top_p) or not 0 < top_p <= 1:
            problems.add("top_p", f"'top_p' must be a number in (0, 1], got {_show(top_p)}")
        else:
            parsed.top_p = float(top_p)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
            problems.add("seed", f"'seed' must be an integer from 0 to 2**64 - 1, got {_show(seed)}")
        else:
            parsed.seed = seed
    n = body.get("n")
    if n not in (None, 1):
        problems.add("n", "'n' must be 1: send one request per completion")
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = body.get(penalty)
        if value not in (None, 0, 0.0):
            problems.add(penalty, f"'{penalty}' is not supported")
    if body.get("logit_bias"):
        problems.add("logit_bias", "'logit_bias' is not supported")
    _parse_stop(body.get("stop"), parsed, problems)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not (isinstance(stop_ids, list) and all(_is_token_id(t) for t in stop_ids)):
            problems.add("stop_token_ids", "'stop_token_ids' must be a list of token ids (integers >= 0)")
        else:
            parsed.stop_token_ids = list(stop_ids)
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        problems.add("ignore_eos", "'ignore_eos' must be true or false")
    else:
        parsed.ignore_eos = bool(ignore_eos)
    slots = body.get("slots")
    if slots is not None:
        if (
            not isinstance(slots, dict)
            or len(slots) > MAX_SLOTS
            or not all(isinstance(k, str) and isinstance(v, str) and _is_text(k) and _is_text(v) for k, v in slots.items())
        ):
            problems.add("slots", f"'slots' must be an object of at most {MAX_SLOTS} slot names to text values")
        else:
            parsed.slots = dict(slots)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        problems.add("stream", "'stream' must be true or false")
    parsed.stream = stream is True
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            problems.add("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
        else:
            parsed.include_usage = bool(options.get("include_usage"))
    problems.raise_if_any()
    return parsed


def _parse_stop(stop: Any, parsed: ParsedRequest, problems: _Problems) -> None:
    strings = [stop] if isinstance(stop, str) else stop
    if stop is None or stop == "":
        return
    if (
        isinstance(strings, list)
        and len(strings) <= MAX_STOP_STRINGS
        and all(_is_text(s) and 0 < len(s) <= MAX_STOP_LENGTH for s in strings)
    ):
        parsed.stop = list(strings)
        return
    problems.add(
        "stop",
        f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
        f" of at most {MAX_STOP_LENGTH} characters",
    )


def _parse_prompt(prompt: Any, parsed: ParsedRequest, problems: _Problems) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_list(prompt[0])):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and not _is_text(prompt):
        problems.add("prompt", "'prompt' is not valid Unicode text (it holds a lone surrogate escape)")
    elif isinstance(prompt, str):
        parsed.prompt = prompt
    elif _is_token_list(prompt):
        parsed.input_ids = list(prompt)
    elif prompt is None:
        problems.add("prompt", "'prompt' is required")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        problems.add("prompt", "only one prompt per request: send one request per prompt")
    else:
        problems.add("prompt", "'prompt' must be a string or a non-empty list of token ids (integers >= 0)")


def _parse_messages(messages: Any, problems: _Problems) -> list[dict[str, str]] | None:
    if messages is None:
        problems.add("messages", "'messages' is required")
        return None
    if not isinstance(messages, list) or not messages:
        problems.add("messages", "'messages' must be a non-empty list of {role, content} objects")
        return None
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.add("messages", f"messages[{i}] must be an object")
            continue
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if not isinstance(role, str) or role not in CHAT_ROLES:
            problems.add("messages", f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {_show(role)}")
            continue
        content = message.get("content")
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            strings = [t for t in texts if isinstance(t, str)]
            if len(strings) != len(content):
                problems.add("messages", f"messages[{i}].content parts must all be text parts")
                continue
            content = "".join(strings)
        if not isinstance(content, str):
            problems.add("messages", f"messages[{i}].content must be a string")
            continue
        if not _is_text(content):
            problems.add("messages", f"messages[{i}].content is not valid Unicode text (it holds a lone surrogate escape)")
            continue
        out.append({"role": role, "content": content})
    return out


# --- responses -----------------------------------------------------------------------------------


def error_body(exc: TunehubError, status: int) -> dict[str, Any]:
    """An OpenAI-style error object (message, type, param, code) that also names the tunehub
    error class; ``param`` is the request field at fault where validation knows it."""
    name = public_error_name(exc)  # errors relayed from the worker keep theirs; private classes their parent's
    return {
        "error": {
            "message": str(exc),
            "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": getattr(exc, "param", None),
            "code": _snake(name),
            "tunehub_error": name,
        }
    }


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(reason: str | None) -> str:
    # the engine says "cancelled" only for clients that are gone; OpenAI knows stop and length
    return "length" if reason == "length" else "stop"


def completion_body(
    *,
    chat: bool,
    request_id: str,
    created: int,
    model: str,
    fingerprint: str,
    text: str,
    reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    tunehub: dict[str, Any],
) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason(reason),
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
        "tunehub": tunehub,
    }


def chunk_body(
    *,
    chat: bool,
    request_id: str,
    created: int,
    model: str,
    fingerprint: str,
    text: str | None = None,
    reason: str | None = None,
    first: bool = False,
    usage_: dict[str, int] | None = None,
    tunehub: dict[str, Any] | None = None,
    no_choices: bool = False,
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    if not no_choices:
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]
    body: dict[str, Any] = {
        "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    if tunehub is not None:
        body["tunehub"] = tunehub
    return body
