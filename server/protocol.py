"""The OpenAI-compatible wire format: request validation and response bodies.

Validation reports every problem of a request at once, as one 400 with a readable message.
Parameters tunehub cannot honour (``n`` > 1, penalties, logprobs, tools...) are refused, not
silently ignored; fields that change nothing (``user``) are accepted. Extensions, as vLLM has
them: ``ignore_eos`` and ``stop_token_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunehub.errors import InvalidRequest, TunehubError

MAX_STOP_STRINGS = 16
CHAT_ROLES = {"system", "user", "assistant"}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) and t >= 0 for t in value)


def parse_request(body: Any, *, chat: bool) -> ParsedRequest:
    """Validate a ``/v1/completions`` or ``/v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    problems: list[str] = []
    model = body.get("model")
    if model is None:
        problems.append("'model' is required: a module reference such as acme/summarize@prod, or the base model's name")
    elif not isinstance(model, str):
        problems.append(f"'model' must be a string, got {type(model).__name__}")
    elif not model:
        problems.append("'model' is empty")
    parsed = ParsedRequest(model=model if isinstance(model, str) else "", chat=chat)

    if chat:
        parsed.messages = _parse_messages(body.get("messages"), problems)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        for unsupported in ("tools", "functions"):
            if body.get(unsupported):
                problems.append(f"'{unsupported}' is not supported")
        if body.get("tool_choice") not in (None, "none"):
            problems.append("'tool_choice' is not supported")
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            problems.append("'response_format' other than {'type': 'text'} is not supported")
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
            problems.append("'logprobs' is not supported")
    else:
        _parse_prompt(body.get("prompt"), parsed, problems)
        max_tokens = body.get("max_tokens")
        if body.get("echo") not in (None, False):
            problems.append("'echo' is not supported")
        if body.get("best_of") not in (None, 1):
            problems.append("'best_of' must be 1")
        if body.get("suffix") is not None:
            problems.append("'suffix' is not supported")
        if body.get("logprobs") not in (None, 0, False):
            problems.append("'logprobs' is not supported")

    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens < 1:
            problems.append(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        else:
            parsed.max_tokens = max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            problems.append(f"'temperature' must be a number from 0 to 2, got {temperature!r}")
        else:
            parsed.temperature = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0 < top_p <= 1:
            problems.append(f"'top_p' must be a number in (0, 1], got {top_p!r}")
        else:
            parsed.top_p = float(top_p)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            problems.append(f"'seed' must be an integer, got {seed!r}")
        else:
            parsed.seed = seed
    n = body.get("n")
    if n not in (None, 1):
        problems.append("'n' must be 1: send one request per completion")
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = body.get(penalty)
        if value not in (None, 0, 0.0):
            problems.append(f"'{penalty}' is not supported")
    if body.get("logit_bias"):
        problems.append("'logit_bias' is not supported")
    stop = body.get("stop")
    if isinstance(stop, str):
        parsed.stop = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        parsed.stop = list(stop)
    elif stop is not None:
        problems.append(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not (isinstance(stop_ids, list) and all(_is_int(t) and t >= 0 for t in stop_ids)):
            problems.append("'stop_token_ids' must be a list of token ids")
        else:
            parsed.stop_token_ids = list(stop_ids)
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        problems.append("'ignore_eos' must be true or false")
    else:
        parsed.ignore_eos = bool(ignore_eos)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        problems.append("'stream' must be true or false")
    parsed.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            problems.append("'stream_options' must be an object like {\"include_usage\": true}")
        else:
            parsed.include_usage = bool(options.get("include_usage"))
    if problems:
        raise InvalidRequest("; ".join(problems))
    return parsed


def _parse_prompt(prompt: Any, parsed: ParsedRequest, problems: list[str]) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_list(prompt[0])):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        parsed.prompt = prompt
    elif _is_token_list(prompt):
        parsed.input_ids = list(prompt)
    elif prompt is None:
        problems.append("'prompt' is required")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        problems.append("only one prompt per request: send one request per prompt")
    else:
        problems.append("'prompt' must be a string or a list of token ids")


def _parse_messages(messages: Any, problems: list[str]) -> list[dict[str, str]] | None:
    if messages is None:
        problems.append("'messages' is required")
        return None
    if not isinstance(messages, list) or not messages:
        problems.append("'messages' must be a non-empty list of {role, content} objects")
        return None
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{i}] must be an object")
            continue
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in CHAT_ROLES:
            problems.append(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}")
            continue
        content = message.get("content")
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                problems.append(f"messages[{i}].content parts must all be text parts")
                continue
            content = "".join(texts)
        if not isinstance(content, str):
            problems.append(f"messages[{i}].content must be a string")
            continue
        out.append({"role": role, "content": content})
    return out


# --- responses -----------------------------------------------------------------------------------


def error_body(exc: TunehubError, status: int) -> dict[str, Any]:
    """An OpenAI-style error object that also names the tunehub error class."""
    name = getattr(exc, "error_name", type(exc).__name__)  # errors relayed from the worker keep theirs
    return {
        "error": {
            "message": str(exc),
            "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": None,
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
    *, chat: bool, request_id: str, created: int, model: str, fingerprint: str, text: str, reason: str | None,
    prompt_tokens: int, completion_tokens: int, tunehub: dict[str, Any],
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
    *, chat: bool, request_id: str, created: int, model: str, fingerprint: str, text: str | None = None,
    reason: str | None = None, first: bool = False, usage_: dict[str, int] | None = None,
    tunehub: dict[str, Any] | None = None, no_choices: bool = False,
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
