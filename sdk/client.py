"""Inference client for ``tunehub serve``: ``Client`` (blocking) and ``AsyncClient``.

    from tunehub.sdk import Client

    client = Client("http://127.0.0.1:8000", api_key="th-...")
    out = client.complete("acme/summarize@prod", "The meeting notes:", max_tokens=64)
    print(out.text, out.module, out.base_fingerprint)      # module = "acme/summarize@3"
    with client.stream_chat("acme/summarize", "Summarise: ...") as stream:
        for chunk in stream:
            print(chunk.text, end="")
    print(stream.completion.completion_tokens)

HTTP errors become tunehub's typed errors: 401 ``Unauthorized``, 403 ``Forbidden``, 404
``ModuleNotFound``, 429 ``RateLimited`` (with ``retry_after``), 413 ``PayloadTooLarge``, other
4xx ``InvalidRequest`` (or the exact class the server named), 5xx and unreachable servers
``ServerError``. Each carries ``status_code``. Only httpx is needed: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import httpx

from tunehub import errors as _errors
from tunehub.errors import (
    Forbidden,
    InvalidRequest,
    ModuleNotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    TunehubError,
    Unauthorized,
)

Messages = list[dict[str, Any]]

_BY_STATUS: dict[int, type[TunehubError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: ModuleNotFound,
    409: _errors.Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
}


@dataclass
class Completion:
    """One finished answer, and what produced it."""

    text: str
    model: str  # what answered: "ns/name@3", or the base's name
    module: str | None  # the exact module version, None when the base answered alone
    base: str | None
    base_fingerprint: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    request_id: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Chunk:
    """One piece of a streamed answer."""

    text: str
    finish_reason: str | None = None


def error_from_response(status: int, body: bytes | str, headers: Any = None) -> TunehubError:
    """The typed error for an HTTP error answer from a tunehub server."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    message, name = text[:300] or f"HTTP {status}", None
    try:
        err = json.loads(text)["error"]
        message, name = err.get("message") or message, err.get("tunehub_error")
    except (ValueError, KeyError, TypeError):
        pass
    return _make_error(status, message, name, headers)


def _make_error(status: int, message: str, name: str | None, headers: Any = None) -> TunehubError:
    cls: type[TunehubError] | None = None
    candidate = getattr(_errors, name, None) if name else None
    if isinstance(candidate, type) and issubclass(candidate, TunehubError):
        cls = candidate
    if cls is None:
        cls = _BY_STATUS.get(status) or (ServerError if status >= 500 or status == 0 else InvalidRequest)
    if cls is RateLimited:
        retry = (headers or {}).get("retry-after") if headers is not None else None
        exc: TunehubError = RateLimited(
            message, retry_after=float(retry) if retry and retry.isascii() and retry.isdigit() else None
        )
    else:
        try:
            exc = cls(message)
        except TypeError:  # a class with another constructor: keep the category
            exc = (_BY_STATUS.get(status) or InvalidRequest)(message)
    exc.status_code = status  # type: ignore[attr-defined]
    return exc


def _body(model: str, *, prompt: Any = None, messages: Any = None, stream: bool, options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a module reference (e.g. acme/summarize@prod) or the base's name")
    body: dict[str, Any] = {"model": model, "stream": stream}
    if messages is not None:
        body["messages"] = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update({k: v for k, v in options.items() if v is not None})
    return body


def _completion(payload: dict[str, Any], headers: Any) -> Completion:
    choice = (payload.get("choices") or [{}])[0]
    text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
    usage = payload.get("usage") or {}
    extra = payload.get("tunehub") or {}
    return Completion(
        text=text or "",
        model=payload.get("model", ""),
        module=extra.get("module"),
        base=extra.get("base"),
        base_fingerprint=extra.get("base_fingerprint") or headers.get("x-tunehub-base"),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        request_id=extra.get("request_id") or headers.get("x-request-id"),
        raw=payload,
    )


class _StreamState:
    """Parses server-sent events into chunks and the final completion."""

    def __init__(self, headers: Any):
        self.headers = headers
        self.module_header = headers.get("x-tunehub-module")
        self.texts: list[str] = []
        self.model = ""
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}
        self.extra: dict[str, Any] = {}
        self.done = False

    def feed(self, line: str) -> Chunk | None:
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return None
        payload = json.loads(data)
        if "error" in payload:
            err = payload["error"]
            raise _make_error(
                _status_for_name(err.get("tunehub_error")), err.get("message", "stream failed"), err.get("tunehub_error")
            )
        self.model = payload.get("model", self.model)
        self.usage = payload.get("usage") or self.usage
        self.extra = payload.get("tunehub") or self.extra
        choices = payload.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        reason = choice.get("finish_reason")
        if reason:
            self.finish_reason = reason
        if text:
            self.texts.append(text)
        return Chunk(text=text or "", finish_reason=reason) if (text or reason) else None

    def completion(self) -> Completion:
        return Completion(
            text="".join(self.texts),
            model=self.model,
            module=self.extra.get("module"),
            base=self.extra.get("base"),
            base_fingerprint=self.extra.get("base_fingerprint") or self.headers.get("x-tunehub-base"),
            finish_reason=self.finish_reason,
            prompt_tokens=int(self.usage.get("prompt_tokens", 0)),
            completion_tokens=int(self.usage.get("completion_tokens", 0)),
            request_id=self.extra.get("request_id") or self.headers.get("x-request-id"),
        )


def _status_for_name(name: str | None) -> int:
    candidate = getattr(_errors, name, None) if name else None
    if isinstance(candidate, type) and issubclass(candidate, TunehubError):
        return candidate.http_status
    return 500


class CompletionStream:
    """A streamed answer: iterate for ``Chunk``s; ``completion`` once it ended; ``close()`` to
    stop early (the server then cancels the generation)."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self._state = _StreamState(response.headers)
        self.module: str | None = self._state.module_header
        self.base_fingerprint: str | None = response.headers.get("x-tunehub-base")
        self.request_id: str | None = response.headers.get("x-request-id")

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for line in self._response.iter_lines():
                chunk = self._state.feed(line)
                if chunk is not None:
                    yield chunk
        finally:
            self.close()
        if not self._state.done:
            raise ServerError("the stream ended before the server finished it")

    @property
    def completion(self) -> Completion:
        return self._state.completion()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> "CompletionStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncCompletionStream:
    """The async form of :class:`CompletionStream` (``async for``, ``async with``)."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self._state = _StreamState(response.headers)
        self.module: str | None = self._state.module_header
        self.base_fingerprint: str | None = response.headers.get("x-tunehub-base")
        self.request_id: str | None = response.headers.get("x-request-id")

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for line in self._response.aiter_lines():
                chunk = self._state.feed(line)
                if chunk is not None:
                    yield chunk
        finally:
            await self.aclose()
        if not self._state.done:
            raise ServerError("the stream ended before the server finished it")

    @property
    def completion(self) -> Completion:
        return self._state.completion()

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> "AsyncCompletionStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client for a ``tunehub serve`` server (OpenAI-compatible routes plus admin).

    Every call that reaches the server raises the error class the server named in its answer
    (any class of :mod:`tunehub.errors`, e.g. :class:`~tunehub.errors.PromptTooLong`), else
    one by HTTP status (see the module docstring); each carries ``status_code``. A server that
    cannot be reached raises :class:`~tunehub.errors.ServerError`."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        admin_key: str | None = None,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ):
        """Set up the client; nothing is sent until the first call.

        Args:
            url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
            api_key: the tenant key sent as ``Authorization: Bearer``; None sends none.
            admin_key: the key for the admin calls (:meth:`pool`, :meth:`load`...).
            timeout: seconds to wait on the server, per request.
            transport: an httpx transport (tests: ``httpx.MockTransport``, or an app's).
        """
        self.url = url.rstrip("/")
        self.admin_key = admin_key
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport)

    # --- generation ------------------------------------------------------------------------------
    def complete(
        self,
        model: str,
        prompt: str | list[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **options: Any,
    ) -> Completion:
        """Continue ``prompt`` with module ``model`` (a reference or the base's name).

        Args:
            model: a module reference (``acme/summarize@prod``) or the base's name.
            prompt: the text to continue, or its token ids.
            max_tokens: the most tokens to generate (None: the server's default).
            temperature: 0 (greedy) or more; None: the server's default.
            top_p: the nucleus, in (0, 1]; None: the server's default.
            seed: makes sampling reproducible.
            stop: a string or strings that end the answer (not included in it).
            **options: other fields of the request body, sent as given (None values are left out).

        Returns:
            The answer, with the exact module version that produced it and token counts.

        Raises:
            InvalidRequest: ``model`` is not a non-empty string, or the server refused the
                request (400 and other 4xx; a subclass when the server names one, e.g.
                PromptTooLong, NonFiniteLogits, UnsupportedModule, InvalidModuleWeights).
            Unauthorized: 401, no or an unknown API key.
            ModuleNotFound: 404, no such module, version or alias, or one this key may not use
                (or the subclass the server names).
            PayloadTooLarge: 413, the request body is too large.
            RateLimited: 429, over a limit (``retry_after`` says how long to wait).
            ServerError: a 5xx answer, or the server cannot be reached.
            TunehubError: any other class of :mod:`tunehub.errors` the server names
                (e.g. IncompatibleBase, IntegrityError).
        """
        body = _body(
            model,
            prompt=prompt,
            stream=False,
            options=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, **options),
        )
        response = self._post("/v1/completions", body)
        return _completion(response.json(), response.headers)

    def chat(
        self,
        model: str,
        messages: Messages | str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **options: Any,
    ) -> Completion:
        """Answer chat ``messages`` (a list of {role, content}, or one user message as a string).

        The server renders the messages with the base's chat template.

        Args:
            model: a module reference (``acme/summarize@prod``) or the base's name.
            messages: ``[{"role": ..., "content": ...}, ...]``, or one user message as a string.
            max_tokens, temperature, top_p, seed, stop, **options: as for :meth:`complete`.

        Returns:
            The answer, with the exact module version that produced it and token counts.

        Raises:
            InvalidRequest: as for :meth:`complete`, and also when the base has no chat template
                or the template refuses the messages.
            Unauthorized, ModuleNotFound, PayloadTooLarge, RateLimited, ServerError, TunehubError:
                as for :meth:`complete`.
        """
        body = _body(
            model,
            messages=messages,
            stream=False,
            options=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, **options),
        )
        response = self._post("/v1/chat/completions", body)
        return _completion(response.json(), response.headers)

    def stream_complete(self, model: str, prompt: str | list[int], **options: Any) -> CompletionStream:
        """Like :meth:`complete`, streamed; the returned stream already knows ``module``.

        Args:
            model: a module reference or the base's name.
            prompt: the text to continue, or its token ids.
            **options: ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``... as for
                :meth:`complete`.

        Returns:
            A stream: iterate it for :class:`Chunk` objects, then read ``completion``; use it
            in a ``with`` block (or ``close()`` it) to stop early.

        Raises:
            InvalidRequest, Unauthorized, ModuleNotFound, PayloadTooLarge, RateLimited, ServerError,
            TunehubError: as for :meth:`complete`, when the server refuses the request before
                streaming. Iterating raises the error the server sends mid-stream
                (by the class it names), and ServerError when the stream ends unfinished.
        """
        return CompletionStream(self._stream("/v1/completions", _body(model, prompt=prompt, stream=True, options=options)))

    def stream_chat(self, model: str, messages: Messages | str, **options: Any) -> CompletionStream:
        """Like :meth:`chat`, streamed.

        Args:
            model: a module reference or the base's name.
            messages: as for :meth:`chat`.
            **options: as for :meth:`stream_complete`.

        Returns:
            A stream, as :meth:`stream_complete` returns.

        Raises:
            InvalidRequest, Unauthorized, ModuleNotFound, PayloadTooLarge, RateLimited, ServerError,
            TunehubError: as for :meth:`chat`, when the server refuses the request before
                streaming; iterating raises as :meth:`stream_complete` says.
        """
        return CompletionStream(
            self._stream("/v1/chat/completions", _body(model, messages=messages, stream=True, options=options))
        )

    # --- discovery and operations --------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        """The modules (and base) this key may use, with version, aliases and lineage.

        Returns:
            The ``data`` list of ``/v1/models``: one dict per model (``id``, ...).

        Raises:
            Unauthorized: no or an unknown API key (when the server requires one).
            ServerError: a 5xx answer, or the server cannot be reached.
            TunehubError: another class the server names (e.g. StoreError: the registry failed).
        """
        return self._request("GET", "/v1/models").json()["data"]

    def health(self) -> bool:
        """Whether the server answers ``/health`` with 200; never raises (unreachable: False)."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def pool(self) -> dict[str, Any]:
        """Admin: what the module pool holds (modules, bytes, hits, pins).

        Returns:
            The pool's status as the server reports it.

        Raises:
            Forbidden: the client has no ``admin_key`` (nothing is sent), or the server refuses it.
            Unauthorized: the server does not know the key.
            ServerError: a 5xx answer, or the server cannot be reached.
            TunehubError: another class the server names.
        """
        return self._request("GET", "/admin/pool", admin=True).json()

    def load(self, model: str) -> dict[str, Any]:
        """Admin: load ``model`` into the pool now (a later request finds it warm).

        Args:
            model: a module reference; an alias is resolved now.

        Returns:
            The server's answer (the exact module version loaded, ...).

        Raises:
            Forbidden: the client has no ``admin_key`` (nothing is sent), or the server refuses it.
            Unauthorized: the server does not know the key.
            ModuleNotFound: no such module, version or alias (or the subclass the server names).
            InvalidRequest: the server refuses the module (e.g. UnsupportedModule,
                InvalidModuleWeights) or the request.
            ServerError: a 5xx answer, or the server cannot be reached.
            TunehubError: another class the server names (e.g. IncompatibleBase, IntegrityError).
        """
        return self._request("POST", "/admin/load", {"model": model}, admin=True).json()

    def unload(self, model: str) -> dict[str, Any]:
        """Admin: drop ``model`` from the pool (when a request still uses it: once released).

        Args:
            model: a module reference.

        Returns:
            The server's answer (whether the module was dropped, ...).

        Raises:
            Forbidden, Unauthorized, ModuleNotFound, InvalidRequest, ServerError, TunehubError:
                as for :meth:`load`.
        """
        return self._request("POST", "/admin/unload", {"model": model}, admin=True).json()

    def pin(self, model: str) -> dict[str, Any]:
        """Admin: load ``model`` and keep it in the pool (never evicted until :meth:`unpin`).

        Args:
            model: a module reference; an alias is resolved now.

        Returns:
            The server's answer (the exact module version pinned, ...).

        Raises:
            Forbidden, Unauthorized, ModuleNotFound, InvalidRequest, ServerError, TunehubError:
                as for :meth:`load`.
        """
        return self._request("POST", "/admin/pin", {"model": model}, admin=True).json()

    def unpin(self, model: str) -> dict[str, Any]:
        """Admin: let ``model`` be evicted again.

        Args:
            model: a module reference.

        Returns:
            The server's answer.

        Raises:
            Forbidden, Unauthorized, ModuleNotFound, InvalidRequest, ServerError, TunehubError:
                as for :meth:`load` (ModuleNotFound also when the module is not loaded).
        """
        return self._request("POST", "/admin/unpin", {"model": model}, admin=True).json()

    def reload(self) -> dict[str, Any]:
        """Admin: re-resolve aliases now (a promotion takes effect for the next requests).

        Returns:
            The server's answer.

        Raises:
            Forbidden, Unauthorized, ServerError, TunehubError: as for :meth:`pool`.
        """
        return self._request("POST", "/admin/reload", {}, admin=True).json()

    def close(self) -> None:
        """Close the connections (also done by leaving a ``with`` block)."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: Any = None, *, admin: bool = False) -> httpx.Response:
        headers = _admin_headers(self.admin_key) if admin else None
        try:
            response = self._http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response

    def _stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = self._http.send(self._http.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            content = response.read()
            response.close()
            raise error_from_response(response.status_code, content, response.headers)
        return response


def _admin_headers(admin_key: str | None) -> dict[str, str]:
    if not admin_key:
        raise Forbidden("admin calls need Client(..., admin_key=...)")
    return {"Authorization": f"Bearer {admin_key}"}


class AsyncClient:
    """The asyncio form of :class:`Client` (same methods, awaited)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        admin_key: str | None = None,
        timeout: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """Like :class:`Client`; ``transport`` is an httpx async transport."""
        self.url = url.rstrip("/")
        self.admin_key = admin_key
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def complete(
        self,
        model: str,
        prompt: str | list[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **options: Any,
    ) -> Completion:
        """The awaitable :meth:`Client.complete`: same arguments, result and errors."""
        body = _body(
            model,
            prompt=prompt,
            stream=False,
            options=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, **options),
        )
        response = await self._request("POST", "/v1/completions", body)
        return _completion(response.json(), response.headers)

    async def chat(
        self,
        model: str,
        messages: Messages | str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **options: Any,
    ) -> Completion:
        """The awaitable :meth:`Client.chat`: same arguments, result and errors."""
        body = _body(
            model,
            messages=messages,
            stream=False,
            options=dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, **options),
        )
        response = await self._request("POST", "/v1/chat/completions", body)
        return _completion(response.json(), response.headers)

    async def stream_complete(self, model: str, prompt: str | list[int], **options: Any) -> AsyncCompletionStream:
        """The awaitable :meth:`Client.stream_complete`; the stream is iterated with ``async for``."""
        return AsyncCompletionStream(
            await self._stream("/v1/completions", _body(model, prompt=prompt, stream=True, options=options))
        )

    async def stream_chat(self, model: str, messages: Messages | str, **options: Any) -> AsyncCompletionStream:
        """The awaitable :meth:`Client.stream_chat`; the stream is iterated with ``async for``."""
        return AsyncCompletionStream(
            await self._stream("/v1/chat/completions", _body(model, messages=messages, stream=True, options=options))
        )

    async def models(self) -> list[dict[str, Any]]:
        """The awaitable :meth:`Client.models`: same result and errors."""
        return (await self._request("GET", "/v1/models")).json()["data"]

    async def health(self) -> bool:
        """The awaitable :meth:`Client.health`; never raises."""
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def pool(self) -> dict[str, Any]:
        """The awaitable :meth:`Client.pool`: same result and errors."""
        return (await self._request("GET", "/admin/pool", admin=True)).json()

    async def reload(self) -> dict[str, Any]:
        """The awaitable :meth:`Client.reload`: same result and errors."""
        return (await self._request("POST", "/admin/reload", {}, admin=True)).json()

    async def pin(self, model: str) -> dict[str, Any]:
        """The awaitable :meth:`Client.pin`: same arguments, result and errors."""
        return (await self._request("POST", "/admin/pin", {"model": model}, admin=True)).json()

    async def unpin(self, model: str) -> dict[str, Any]:
        """The awaitable :meth:`Client.unpin`: same arguments, result and errors."""
        return (await self._request("POST", "/admin/unpin", {"model": model}, admin=True)).json()

    async def load(self, model: str) -> dict[str, Any]:
        """The awaitable :meth:`Client.load`: same arguments, result and errors."""
        return (await self._request("POST", "/admin/load", {"model": model}, admin=True)).json()

    async def unload(self, model: str) -> dict[str, Any]:
        """The awaitable :meth:`Client.unload`: same arguments, result and errors."""
        return (await self._request("POST", "/admin/unload", {"model": model}, admin=True)).json()

    async def aclose(self) -> None:
        """Close the connections (also done by leaving an ``async with`` block)."""
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, body: Any = None, *, admin: bool = False) -> httpx.Response:
        headers = _admin_headers(self.admin_key) if admin else None
        try:
            response = await self._http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response

    async def _stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = await self._http.send(self._http.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise error_from_response(response.status_code, content, response.headers)
        return response
