"""The HTTP side of ``tunehub serve``: :class:`TunehubHttp`, hosted by LitServe as a ``LitSpec``
(:class:`TunehubSpec`, whose endpoints run in LitServe's API server process) or, with ``--ray``,
by a Ray Serve ingress (``ray_app.py``). It reaches the inference workers through a
:class:`Transport` only.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (OpenAI-compatible, with
server-sent events), ``GET /v1/models``, ``GET /metrics``, ``/admin/*`` (LitServe itself adds
``/health``). Each endpoint checks the caller (tenant key or admin key), validates the body,
applies the tenant's rules and limits, then talks to the inference worker through LitServe's own
request queue and response buffer (see ``api.py`` for the messages). Answers name the module
version and base fingerprint that produced them (``X-Tunehub-Module``, ``X-Tunehub-Base``,
``model``, ``system_fingerprint`` and a ``tunehub`` object in the body).

Signed modules: a tenant's ``require_signed_by`` rules that match the requested name travel with
the request to the worker, which checks them on the exact version it resolves to; a refusal, like
one of the server's ``--require-signed`` policy, is a 403 for that request alone. Module entries of
``/v1/models`` carry ``tunehub.provenance``: the signers (each checked against the server's
``--trust`` keys) and the signed lineage, ancestors the caller may not use withheld (see
:mod:`tunehub.server.trust`).

Every error, including a route that does not exist (404) or a wrong method (405), is answered
with an OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}`` (see
:func:`error_response`, :func:`install_error_handlers`); bad input is a 4xx, never a 5xx.

Shutdown: the process that receives SIGTERM starts the :class:`ShutdownClock` (``serve.py``).
In-flight requests may finish until its deadline; those still running then end with an error:
a stream gets a final ``data: {"error": ...}`` event and ``data: [DONE]``, a plain request a
503. Requests that arrive meanwhile get a 503 at once.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import hmac
import json
import logging
import mmap
import os
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve import Callback
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tunehub.errors import (
    Forbidden,
    InvalidReference,
    InvalidRequest,
    ModuleNotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    TunehubError,
    Unauthorized,
)
from tunehub.registry.refs import parse_ref
from tunehub.server.litserve_bridge import (
    LitServeTransport,
    LitSpec,
    spec_state_for_worker,
    stop_inference_workers,
)
from tunehub.server.metrics import AuditLog, CallRecord, ServerMetrics
from tunehub.server.protocol import (
    MAX_MODEL_LENGTH,
    MAX_MODULES,
    ParsedRequest,
    chunk_body,
    completion_body,
    error_body,
    finish_reason,
    parse_request,
    usage,
)
from tunehub.server.tenants import Admission, Tenant, Tenants
from tunehub.server.trust import ProvenanceCache, lineage_for

log = logging.getLogger("tunehub.server")

DEFAULT_MAX_TOKENS = 256
_NOT_FOUND_NAMES = {"ModuleNotFound", "VersionNotFound", "AliasNotFound"}
_ADMIN_ACTIONS = ("load", "unload", "pin", "unpin", "reload")
_POLL_S = 0.25  # how often a waiting request checks for a gone client and for the shutdown deadline
_SHORT = 200  # characters of a path or value quoted in an error message


@dataclass
class HttpSettings:
    """What the HTTP side needs (plain values)."""

    tenants_file: str | None = None
    admin_key_hash: str | None = None  # sha256 hex digest of the admin key
    registry: str | None = None
    max_body_bytes: int = 1 << 20
    audit_log: str | None = None  # None or "-": stderr
    trust: list[str] = field(default_factory=list)  # the server's trusted public keys (provenance)
    require_signed: bool = False


class WorkerStream(Protocol):
    """One message to the inference worker and its answers (``api.py``'s JSON dicts)."""

    def ready(self) -> bool:
        """Whether :meth:`next` would answer without waiting."""
        ...

    async def next(self) -> dict[str, Any] | None:
        """The next message, or None once the worker finished this call; raises a TunehubError
        (a ServerError when the worker failed)."""
        ...

    def close(self) -> None:
        """Stop listening (the worker may still be at it: send a cancel for that)."""
        ...


class Transport(Protocol):
    """How the HTTP side reaches inference workers: LitServe's queues
    (:class:`~tunehub.server.litserve_bridge.LitServeTransport`) or Ray Serve's handles
    (``ray_app.RayTransport``). Everything else of the HTTP side is the same for both."""

    def call(self, payload: dict[str, Any]) -> WorkerStream: ...

    def post(self, payload: dict[str, Any]) -> None:
        """Fire and forget (a cancel)."""
        ...


class _StatusError(TunehubError):
    """An error with a given HTTP status and tunehub class name: one the inference worker
    answered with, or one the framework raised (no such route, wrong method)."""

    def __init__(self, message: str, status: int, name: str):
        super().__init__(message)
        self.http_status = status
        self.error_name = name


class _ShuttingDown(ServerError):
    """The server is stopping and this request could not finish within the drain period."""

    http_status = 503
    error_name = "ServerError"  # what clients (the SDK) know it by


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class ShutdownClock:
    """When in-flight requests must end: a deadline that the process receiving SIGTERM (LitServe's
    main process) sets and the API server process reads. It lives in anonymous shared memory,
    created before LitServe forks the API server, so both processes see the same 8 bytes; the
    deadline is a ``time.monotonic()`` value (one clock for every process of the machine)."""

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, 8)  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children
        self._memory[:] = struct.pack("d", 0.0)

    def start(self, drain_s: float) -> None:
        """Shutdown begins: requests may run ``drain_s`` more seconds. Signal-handler safe."""
        self._memory[:] = struct.pack("d", time.monotonic() + max(0.0, drain_s))

    @property
    def started(self) -> bool:
        return self._deadline() > 0

    def expired(self) -> bool:
        deadline = self._deadline()
        return deadline > 0 and time.monotonic() >= deadline

    def _deadline(self) -> float:
        return struct.unpack("d", self._memory[:])[0]


class StopWorkersAfterDrain(Callback):
    """Lets the inference workers exit normally at shutdown (``serve.py``'s docstring, step 3).

    LitServe calls ``on_server_end`` in the API server process when uvicorn's lifespan ends,
    i.e. after its connections are closed: no request needs the workers any more. This puts
    LitServe's stop value (four Nones: what its inference loop returns on) on the request queue,
    once per worker, and waits up to ``exit_s`` for the workers to exit, before LitServe's main
    process would terminate them (and leave what they hold to the resource tracker).

    LitServe pickles callbacks into the workers too (this one holds a number only), and calls
    ``on_after_setup`` there: a worker then ends its process as soon as multiprocessing has run
    its finalizers (which unlink its semaphores), skipping the interpreter's teardown of the
    model, which takes seconds and can abort in native threads ("terminate called without an
    active exception")."""

    def __init__(self, exit_s: float):
        self.exit_s = exit_s

    def on_after_setup(self, *args: Any, **kwargs: Any) -> None:
        atexit.register(exit_without_teardown)  # registered last, so it runs first of the atexit handlers

    def on_server_end(self, *args: Any, litserver: Any = None, **kwargs: Any) -> None:
        stop_inference_workers(litserver, self.exit_s)


def exit_without_teardown(code: int = 0) -> None:
    """End a server process whose work is done: flush the logs and standard streams, then exit
    without the interpreter's teardown of torch and transformers (seconds on a busy machine,
    counted against the shutdown's grace period; native threads may abort in it)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def error_response(
    exc: TunehubError,
    *,
    request_id: str | None = None,
    base_fingerprint: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The answer for an error: its HTTP status, the OpenAI-shaped body and the headers clients
    rely on (Retry-After on 429, WWW-Authenticate on 401, the request id)."""
    status = _status_of(exc)
    out = dict(headers or {})
    if request_id:
        out["X-Request-Id"] = request_id
    if base_fingerprint:
        out["X-Tunehub-Base"] = base_fingerprint[:12]
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        out["Retry-After"] = str(int(exc.retry_after))
    if status == 401:
        out["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc, status), status_code=status, headers=out)


def install_error_handlers(app: FastAPI) -> None:
    """Answer the framework's own errors (unknown route, wrong method, a path parameter FastAPI
    refuses) with the OpenAI-shaped body instead of FastAPI's ``{"detail": ...}``."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = int(getattr(exc, "status_code", 500))
    where = f"{request.method} {_short(request.url.path)}"
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 404:
        message = f"no such endpoint: {where}"
    elif status == 405:
        allowed = headers.get("Allow") or headers.get("allow")
        message = f"method not allowed: {where}" + (f"; use {allowed}" if allowed else "")
    else:
        message = str(getattr(exc, "detail", "") or f"HTTP {status}")
    error = _StatusError(message, status, _STATUS_NAMES.get(status, "ServerError" if status >= 500 else "InvalidRequest"))
    return error_response(error, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    errors: list[dict[str, Any]] = getattr(exc, "errors", list)()
    details = "; ".join(f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:5])
    return error_response(InvalidRequest(f"invalid request: {_short(details) or 'malformed'}"))


class MetadataAuth:
    """ASGI middleware (LitServer's ``middlewares``): LitServe's own metadata routes, ``/`` and
    ``/info``, need a tenant's key or the admin key when tenants are configured, as tunehub's
    routes do. ``/health`` stays open for probes; it says only "ok"."""

    GUARDED_PATHS = frozenset({"/", "/info"})

    def __init__(self, app: Any, spec: TunehubHttp):
        self.app = app
        self.spec = spec

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in self.GUARDED_PATHS:
            try:
                self.spec.check_metadata_access(Request(scope))
            except TunehubError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_STATUS_NAMES = {400: "InvalidRequest", 401: "Unauthorized", 403: "Forbidden", 413: "PayloadTooLarge", 429: "RateLimited"}


def not_found(model: str) -> ModuleNotFound:
    # one message for "no such module" and "not yours": a tenant learns nothing about others
    return ModuleNotFound(f"model {model!r} does not exist or this API key may not use it")


class TunehubHttp:
    """The HTTP side, whatever hosts it: the routes (:attr:`routes`), tenants, limits, metrics,
    audit and the answers' headers. It reaches the inference workers through :attr:`transport`
    only. :class:`TunehubSpec` is it under LitServe; ``ray_app.py`` mounts it on a FastAPI app
    behind Ray Serve."""

    def __init__(self, settings: HttpSettings, transport: Transport | None = None):
        self.settings = settings
        self._ready = False
        self.shutdown_clock = ShutdownClock()  # created before any fork: LitServe's processes share it
        self.transport: Transport | None = transport
        self.routes: list[tuple[str, Any, list[str]]] = [  # (path, endpoint, methods)
            ("/v1/completions", self.completions, ["POST"]),
            ("/v1/chat/completions", self.chat_completions, ["POST"]),
            ("/v1/models", self.list_models, ["GET"]),
            ("/v1/models/{model_id:path}", self.get_model, ["GET"]),
            ("/metrics", self.metrics_endpoint, ["GET"]),
            ("/admin/pool", self.admin_pool, ["GET"]),
            *((f"/admin/{action}", self._admin_endpoint(action), ["POST"]) for action in _ADMIN_ACTIONS),
        ]

    def init_http_state(self) -> None:
        """Builds the HTTP state (tenants, metrics, audit log) once, in the process that serves."""
        if self._ready:
            return
        self.tenants = Tenants.load(self.settings.tenants_file)
        self.metrics = ServerMetrics()
        self.audit = AuditLog(self.settings.audit_log)
        self._store: Any = None
        self._provenance: ProvenanceCache | None = None
        self._info: dict[str, Any] | None = None
        self._ready = True

    def _transport(self) -> Transport:
        if self.transport is None:
            raise ServerError("the HTTP side has no way to the inference worker (no transport)")
        return self.transport

    # --- OpenAI endpoints -------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        call = CallRecord(endpoint="chat" if chat else "completions", request_id=uuid.uuid4().hex)
        admission: Admission | None = None
        streaming = False  # the SSE generator owns the admission and the worker call from then on
        try:
            if self.shutdown_clock.started:
                raise _ShuttingDown("the server is shutting down; send the request again to another server")
            tenant = self._tenant(request)
            call.tenant = tenant.name
            parsed = parse_request(await self._json(request), chat=chat)
            call.model, call.stream = parsed.model, parsed.stream
            info = await self._base_info()
            call.base_fingerprint = info["base_fingerprint"]
            modules = self._modules_for(parsed.model, tenant, info)
            weights = parsed.weights or [1.0] * len(modules)
            parts = []
            for ref, weight in zip(modules, weights, strict=True):
                part: dict[str, Any] = {"model": ref, "weight": weight}
                rules = tenant.signing_rules(parse_ref(ref).repo)
                if rules:  # the worker checks them on the exact version it resolves the module to
                    part["require_signed_by"] = [rule.to_wire() for rule in rules]
                parts.append(part)
            max_tokens = self._max_tokens(parsed, tenant)
            admission = self.tenants.admit(tenant, max_tokens)
            payload = {
                "op": "generate",
                "request_id": call.request_id,
                "tenant": tenant.name,
                "parts": parts,  # the modules to apply together, each with its weight and signing rules
                "prompt": parsed.prompt,
                "input_ids": parsed.input_ids,
                "messages": parsed.messages,
                "slots": parsed.slots,
                "stream": parsed.stream,
                "params": parsed.sampling(max_tokens),
            }
            worker = self._transport().call(payload)
            try:
                first = await self._next(worker, request)
            except BaseException as exc:
                worker.close()
                if not isinstance(exc, _ClientGone):  # (that one cancels below) the engine may still be at it
                    self._cancel(call.request_id)
                raise
            if first is None:
                raise ServerError("the inference worker answered nothing")
            call.replica = first.get("replica")
            if first["type"] == "error":
                worker.close()
                raise self._remote_error(first, parsed.model)
            call.module = first.get("module") or info["base"]
            call.cold_load = bool(first.get("cold_load"))
            headers = self._answer_headers(call, info)
            if parsed.stream:
                if first["type"] == "start":
                    call.mark_first_token()
                events = self._sse(call, admission, worker, first, parsed, info)
                streaming = True
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            worker.close()
            self._finish(call, admission, first)
            body = completion_body(
                chat=chat,
                request_id=call.request_id,
                created=int(time.time()),
                model=call.module,
                fingerprint=self._fingerprint(info),
                text=first.get("text") or "",
                reason=first.get("finish_reason"),
                prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens,
                tunehub=self._tunehub_object(call, info),
            )
            self._record(call)
            return JSONResponse(body, headers=headers)
        except _ClientGone:
            self._cancel(call.request_id)
            call.status = 499
            call.error = "client disconnected"
            self._record(call)
            return Response(status_code=499)
        except TunehubError as exc:
            return self._fail(call, exc)
        except Exception as exc:  # noqa: BLE001 - a bug here must still answer cleanly and keep serving
            return self._fail(call, self._unexpected(call, exc))
        finally:
            if admission is not None and not streaming:
                # refund what the request did not use (all of it when it failed before generating)
                self.tenants.settle(admission, call.prompt_tokens + call.completion_tokens)

    async def _sse(
        self,
        call: CallRecord,
        admission: Admission,
        worker: WorkerStream,
        first: dict[str, Any],
        parsed: ParsedRequest,
        info: dict[str, Any],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        common: dict[str, Any] = {
            "chat": parsed.chat,
            "request_id": call.request_id,
            "created": created,
            "model": call.module,
            "fingerprint": self._fingerprint(info),
        }
        answered = False  # the client got its last event (the final chunk or an error)
        worker_done = False  # the worker finished this request (done or error): nothing to cancel
        pieces = 0  # text messages sent: each carries at least one generated token
        error: TunehubError | None = None
        try:
            if parsed.chat:
                yield sse_event(chunk_body(**common, text="", first=True))
            message: dict[str, Any] | None = first
            while True:
                if message is None:
                    worker_done = True
                    raise ServerError("the inference worker ended the stream early")
                kind = message["type"]
                if kind == "text":
                    call.mark_first_token()
                    pieces += 1
                    yield sse_event(chunk_body(**common, text=message["text"]))
                elif kind == "error":
                    worker_done = True
                    raise self._remote_error(message, parsed.model)
                elif kind == "done":
                    worker_done = True
                    break
                message = await self._next(worker)
            self._finish(call, admission, message)
            yield sse_event(
                chunk_body(
                    **common,
                    text=None,
                    reason=finish_reason(message.get("finish_reason")),
                    tunehub=self._tunehub_object(call, info),
                )
            )
            if parsed.include_usage:
                yield sse_event(chunk_body(**common, no_choices=True, usage_=usage(call.prompt_tokens, call.completion_tokens)))
            answered = True
            yield "data: [DONE]\n\n"
        except TunehubError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug: the stream still ends with an error event
            error = self._unexpected(call, exc)
        finally:
            worker.close()
            if not worker_done:  # the client went away, or the stream was ended: free the engine slot now
                self._cancel(call.request_id)
            if error is None and not answered:
                call.status, call.error = 499, "client disconnected"
            if not admission.settled:  # ended early: charge what was surely generated, refund the rest
                self.tenants.settle(admission, call.prompt_tokens + max(call.completion_tokens, pieces))
            if error is not None:
                call.status, call.error = _status_of(error), str(error)
            self._record(call)
        if error is not None:
            # the status line is gone already: the error travels as an event, as OpenAI sends it,
            # and the stream still ends as every stream does
            yield sse_event(error_body(error, _status_of(error)))
            yield "data: [DONE]\n\n"

    # --- models ------------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        call = CallRecord(endpoint="models", request_id=uuid.uuid4().hex)
        try:
            tenant = self._tenant(request)
            call.tenant = tenant.name
            data = await self._models(tenant)
            self._record(call)
            return JSONResponse({"object": "list", "data": data})
        except TunehubError as exc:
            return self._fail(call, exc)
        except Exception as exc:  # noqa: BLE001 - a bug: a clean 500, one log line
            return self._fail(call, self._unexpected(call, exc))

    async def get_model(self, request: Request, model_id: str) -> Response:
        """One model by the id a listing shows (``acme/sum``, the base's name) or by the versioned
        id answers carry (``acme/sum@1``, ``acme/sum@prod``); 404 alike for unknown and not yours."""
        call = CallRecord(endpoint="models", request_id=uuid.uuid4().hex, model=_short(model_id))
        try:
            tenant = self._tenant(request)
            call.tenant = tenant.name
            info = await self._base_info()
            if model_id == info["base"]:
                if not tenant.may_use_base(model_id):
                    raise not_found(model_id)
                entry = self._base_entry(info)
            else:
                try:
                    ref = parse_ref(model_id)
                except InvalidReference:
                    raise not_found(model_id) from None  # no model has such an id
                if not tenant.may_use_module(ref.repo, info["base"]):
                    raise not_found(model_id)
                entry = await asyncio.to_thread(self._module_entry, model_id, info)
                entry["root"] = info["base"]
                self._for_tenant(entry, tenant, info["base"])
            self._record(call)
            return JSONResponse(entry)
        except TunehubError as exc:
            if isinstance(exc, ModuleNotFound):
                exc = not_found(model_id)  # the registry's own wording would tell versions from names
            return self._fail(call, exc)
        except Exception as exc:  # noqa: BLE001 - a bug: a clean 500, one log line
            return self._fail(call, self._unexpected(call, exc))

    async def _models(self, tenant: Tenant) -> list[dict[str, Any]]:
        info = await self._base_info()
        base_name, fingerprint = info["base"], info["base_fingerprint"]
        entries: list[dict[str, Any]] = []
        if tenant.may_use_base(base_name):
            entries.append(self._base_entry(info))
        for item in await asyncio.to_thread(self._list_modules, fingerprint):
            if tenant.may_use_module(item["id"], base_name):
                item["root"] = base_name
                entries.append(self._for_tenant(item, tenant, base_name))
        return entries

    @staticmethod
    def _base_entry(info: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": info["base"],
            "object": "model",
            "created": 0,
            "owned_by": "tunehub",
            "root": info["base"],
            "parent": None,
            "tunehub": {
                "base": True,
                "base_fingerprint": info["base_fingerprint"],
                "quantization": info["quantization"],
                "max_positions": info["max_positions"],
            },
        }

    def _registry(self) -> Any:
        if self._store is None:
            from tunehub.registry.store import open_store, provenance_with_lineage
            from tunehub.server.trust import server_trust_policy

            # the server's policy: provenance says which signatures its keys verify (listing and
            # resolving never refuse; loading is the inference worker's)
            policy = server_trust_policy(self.settings.trust, self.settings.require_signed)
            store = open_store(self.settings.registry, trust=policy)
            check = store.check_trust if policy is not None and policy.require_signed else None
            self._provenance = ProvenanceCache(lambda ref: provenance_with_lineage(store, ref, policy), check)
            self._store = store
        return self._store

    def _provenance_of(self, info: Any) -> dict[str, Any]:
        """Who signed the version and its signed lineage (cached per version); never raises."""
        self._registry()
        assert self._provenance is not None
        try:
            return self._provenance.get(info)
        except TunehubError as exc:  # the registry could not say: the entry still lists the module
            return {"error": str(exc)}

    @staticmethod
    def _for_tenant(entry: dict[str, Any], tenant: Tenant, base_name: str) -> dict[str, Any]:
        """The entry as ``tenant`` may see it: ancestors it may not use are withheld."""
        provenance = entry["tunehub"].get("provenance")
        if isinstance(provenance, dict) and "lineage" in provenance:
            entry["tunehub"] = {
                **entry["tunehub"],
                "provenance": lineage_for(provenance, lambda repo: tenant.may_use_module(repo, base_name)),
            }
        return entry

    def _list_modules(self, fingerprint: str) -> list[dict[str, Any]]:
        return [self._version_entry(info.repo, info) for info in self._registry().list(base=fingerprint)]

    def _module_entry(self, model_id: str, base: dict[str, Any]) -> dict[str, Any]:
        """The entry of the version ``model_id`` names now; ModuleNotFound if none, or if it was
        made for another base than the one served."""
        info = self._registry().resolve(model_id)
        if info.base_fingerprint != base["base_fingerprint"]:
            raise not_found(model_id)
        return self._version_entry(model_id, info)

    def _version_entry(self, model_id: str, info: Any) -> dict[str, Any]:
        try:
            aliases = self._registry().aliases(info.repo)
        except TunehubError:
            aliases = {}
        return {
            "id": model_id,
            "object": "model",
            "created": _epoch(info.created_at),
            "owned_by": info.repo.split("/")[0] if "/" in info.repo else "tunehub",
            "parent": info.parent,
            "tunehub": {
                "version": info.version,
                "ref": info.ref,
                "aliases": aliases,
                "kind": info.kind,
                "task": info.task,
                "objective": info.objective,
                "parent": info.parent,
                "base": {"model_id": info.base_model_id, "fingerprint": info.base_fingerprint},
                # signers (each checked against the server's --trust keys) and the signed lineage
                "provenance": self._provenance_of(info),
            },
        }

    # --- operator endpoints ------------------------------------------------------------------
    async def metrics_endpoint(self, request: Request) -> Response:
        try:
            if self.settings.admin_key_hash:
                self._check_admin(request)
            else:  # tenant labels are server metadata too
                self.check_metadata_access(request)
            try:
                self.metrics.pool.snapshot = await self._worker_result({"op": "admin", "action": "status"})
            except TunehubError:
                log.warning("could not fetch the pool status for /metrics")
            return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)
        except TunehubError as exc:
            return self._fail(CallRecord(endpoint="metrics", request_id=uuid.uuid4().hex), exc, audit=False)

    async def admin_pool(self, request: Request) -> Response:
        return await self._admin(request, "status")

    def _admin_endpoint(self, action: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return await self._admin(request, action)

        endpoint.__name__ = f"admin_{action}"
        return endpoint

    async def _admin(self, request: Request, action: str) -> Response:
        name = "pool" if action == "status" else action
        call = CallRecord(endpoint=f"admin/{name}", request_id=uuid.uuid4().hex, tenant="admin")
        try:
            self._check_admin(request)
            model = None
            if action in ("load", "unload", "pin", "unpin"):
                body = await self._json(request)
                model = body.get("model") if isinstance(body, dict) else None
                if not isinstance(model, str):
                    raise InvalidRequest("'model' is required: the module reference to act on, e.g. acme/summarize@prod")
                if len(model) > MAX_MODEL_LENGTH:
                    raise InvalidRequest(f"'model' is longer than {MAX_MODEL_LENGTH} characters")
                call.model = _short(model)
                info = await self._base_info()
                if model == info["base"]:
                    raise InvalidRequest("the base model is always loaded; name a module")
                parse_ref(model)
            result = await self._worker_result({"op": "admin", "action": action, "model": model})
            call.module = result.get("module") if isinstance(result, dict) else None
            self._record(call)
            return JSONResponse(result)
        except TunehubError as exc:
            return self._fail(call, exc)
        except Exception as exc:  # noqa: BLE001 - a bug: a clean 500, one log line
            return self._fail(call, self._unexpected(call, exc))

    # --- helpers -----------------------------------------------------------------------------
    def _tenant(self, request: Request) -> Tenant:
        key = _bearer(request)
        tenant = self.tenants.authenticate(key)
        if tenant is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'" if not key else "unknown API key")
        return tenant

    def check_metadata_access(self, request: Request) -> None:
        """Server metadata with tenants configured: a tenant's key or the admin key (Unauthorized
        otherwise); anyone in open mode."""
        if self.tenants.open_mode:
            return
        key = _bearer(request)
        expected = self.settings.admin_key_hash
        if key and expected and hmac.compare_digest(hashlib.sha256(key.encode("utf-8")).hexdigest(), expected):
            return
        self._tenant(request)

    def _check_admin(self, request: Request) -> None:
        expected = self.settings.admin_key_hash
        if not expected:
            raise Forbidden("admin endpoints are disabled: start the server with --admin-key-file")
        key = _bearer(request)
        if not key:
            raise Unauthorized("missing admin key: send 'Authorization: Bearer <admin key>'")
        if not hmac.compare_digest(hashlib.sha256(key.encode("utf-8")).hexdigest(), expected):
            if not self.tenants.open_mode and self.tenants.authenticate(key) is not None:
                raise Forbidden("a tenant key cannot use admin endpoints")
            raise Unauthorized("unknown admin key")

    async def _json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body has {declared} bytes; this server accepts at most {limit}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise _ClientGone() from None
        raw = b"".join(chunks)
        if not raw.strip():
            raise InvalidRequest("the request body is empty: send a JSON object")
        try:
            return json.loads(raw)
        except RecursionError:  # json raises it for nesting deeper than the interpreter's stack allows
            raise InvalidRequest("the request body nests JSON arrays or objects too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None

    async def _base_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._worker_result({"op": "info"})
        return self._info

    def _modules_for(self, model: str, tenant: Tenant, info: dict[str, Any]) -> list[str]:
        """The module references to apply together ([]: the base alone): ``model`` is one
        reference or several joined by '+'; 404 (for the whole model) when the tenant may not use
        one of them, so a refusal says nothing about which part exists."""
        if model == info["base"]:
            if not tenant.may_use_base(model):
                raise not_found(model)
            return []
        refs = []
        for part in model.split("+"):
            if part == info["base"]:
                raise InvalidRequest(f"{part!r} is the base model: a composition names modules only (the base is always applied)")
            try:
                ref = parse_ref(part)
            except InvalidReference as exc:  # a 400 that names the field at fault
                exc.param = "model"  # type: ignore[attr-defined]
                raise
            if not tenant.may_use_module(ref.repo, info["base"]):  # a grant of the base's name is not one
                raise not_found(model)
            refs.append(str(ref))
        if len(refs) > MAX_MODULES:
            raise InvalidRequest(f"a request may compose at most {MAX_MODULES} modules, got {len(refs)}")
        return refs

    @staticmethod
    def _max_tokens(parsed: ParsedRequest, tenant: Tenant) -> int:
        """The effective max_tokens: the request's own (refused above the key's limit), else the
        default capped by the key's per-request and per-minute limits."""
        limit = tenant.max_tokens
        if parsed.max_tokens is None:
            caps = [c for c in (limit, tenant.tokens_per_minute) if c is not None]
            return min([DEFAULT_MAX_TOKENS, *caps])
        if limit is not None and parsed.max_tokens > limit:
            raise InvalidRequest(f"max_tokens {parsed.max_tokens} is above this API key's limit of {limit}")
        return parsed.max_tokens

    async def _next(self, worker: WorkerStream, request: Request | None = None) -> dict[str, Any] | None:
        """The worker's next message. Raises _ShuttingDown once the shutdown drain is over and,
        with ``request``, _ClientGone if its client disconnects meanwhile."""
        if self.shutdown_clock.expired():
            raise _ShuttingDown("the server is shutting down and this request did not finish in time")
        if worker.ready():
            return await worker.next()  # no waiting, no task
        task = asyncio.ensure_future(worker.next())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_POLL_S)
                if done:
                    return task.result()
                if request is not None and await request.is_disconnected():
                    raise _ClientGone()
                if self.shutdown_clock.expired():
                    raise _ShuttingDown("the server is shutting down and this request did not finish in time")
        finally:
            if not task.done():
                task.cancel()

    async def _worker_result(self, payload: dict[str, Any]) -> Any:
        worker = self._transport().call(payload)
        try:
            message = await worker.next()
        finally:
            worker.close()
        if message is None:
            raise ServerError("the inference worker answered nothing")
        if message["type"] == "error":
            raise self._remote_error(message, payload.get("model"))
        return message.get("data")

    def _cancel(self, request_id: str) -> None:
        # fire and forget: nobody waits for the answer, so no response buffer entry is needed
        try:
            self._transport().post({"op": "cancel", "request_id": request_id})
        except Exception:  # noqa: BLE001 - the worker is gone (shutdown): nothing left to cancel
            log.debug("could not send cancel for %s", request_id)

    @staticmethod
    def _remote_error(message: dict[str, Any], model: Any) -> TunehubError:
        name = str(message.get("error", "ServerError"))
        if name in _NOT_FOUND_NAMES and isinstance(model, str):
            return not_found(model)
        try:
            status = int(message.get("status", 500))
        except (TypeError, ValueError):
            status = 500
        return _StatusError(str(message.get("message", "error")), status, name)

    def _finish(self, call: CallRecord, admission: Admission, done: dict[str, Any]) -> None:
        call.prompt_tokens = int(done.get("prompt_tokens") or 0)
        call.completion_tokens = int(done.get("completion_tokens") or 0)
        call.finish_reason = done.get("finish_reason")
        call.module = done.get("module") or call.module
        self.tenants.settle(admission, call.prompt_tokens + call.completion_tokens)

    @staticmethod
    def _unexpected(call: CallRecord, exc: Exception) -> ServerError:
        """A failure no check foresaw: one log line with the request id (the traceback only at
        debug level), and a clean 500 for the client."""
        log.error("request %s (%s): unexpected %s: %s", call.request_id, call.endpoint, type(exc).__name__, _short(str(exc)))
        log.debug("request %s: traceback", call.request_id, exc_info=exc)
        return ServerError(f"internal error ({type(exc).__name__}); request id {call.request_id}")

    @staticmethod
    def _fingerprint(info: dict[str, Any]) -> str:
        return "tunehub-" + info["base_fingerprint"][:12]

    @staticmethod
    def _tunehub_object(call: CallRecord, info: dict[str, Any]) -> dict[str, Any]:
        out = {
            "module": call.module if call.module != info["base"] else None,
            "base": info["base"],
            "base_fingerprint": info["base_fingerprint"],
            "request_id": call.request_id,
            "cold_load": call.cold_load,
        }
        if call.replica:  # several replicas serve (Ray): which one answered
            out["replica"] = call.replica
        return out

    @staticmethod
    def _answer_headers(call: CallRecord, info: dict[str, Any]) -> dict[str, str]:
        headers = {
            "X-Tunehub-Module": call.module or info["base"],
            "X-Tunehub-Base": info["base_fingerprint"][:12],
            "X-Request-Id": call.request_id,
        }
        if call.replica:
            headers["X-Tunehub-Replica"] = call.replica
        return headers

    def _fail(self, call: CallRecord, exc: TunehubError, *, audit: bool = True) -> Response:
        call.status, call.error = _status_of(exc), str(exc)
        if audit:
            self._record(call)
        fingerprint = self._info["base_fingerprint"] if self._info is not None else None
        headers = {"X-Tunehub-Replica": call.replica} if call.replica else None
        return error_response(exc, request_id=call.request_id, base_fingerprint=fingerprint, headers=headers)

    def _record(self, call: CallRecord) -> None:
        try:
            self.metrics.observe(call)
            self.audit.write(call)
        except Exception:  # accounting must never break an answer
            log.exception("could not record request %s", call.request_id)


class TunehubSpec(TunehubHttp, LitSpec):
    """The HTTP side under LitServe: a ``LitSpec`` whose endpoints are :attr:`TunehubHttp.routes`
    and whose transport is LitServe's request queue and response buffer."""

    def __init__(self, settings: HttpSettings):
        LitSpec.__init__(self)
        TunehubHttp.__init__(self, settings)  # the shutdown clock: in LitServe's main process, before any fork
        self.transport = LitServeTransport(self)
        self.api_path = "/v1/completions"  # LitServe keys its request queue by this path
        for path, endpoint, methods in self.routes:
            self.add_endpoint(path, endpoint, methods)

    @property
    def stream(self) -> bool:
        return True  # every call streams messages from the worker; plain JSON is assembled here

    def __getstate__(self) -> dict[str, Any]:
        # LitServe pickles the spec into the inference worker, which needs none of the HTTP state
        return spec_state_for_worker(self, settings=self.settings, _ready=False)

    def setup(self, server: Any) -> None:
        """Called by LitServe in its main process before the API server forks; builds HTTP state."""
        LitSpec.setup(self, server)
        self.init_http_state()

    # --- LitSpec interface (the worker's LitAPI does its own decoding) ---------------------------
    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output


def _status_of(exc: TunehubError) -> int:
    status = int(getattr(exc, "http_status", 500) or 500)
    return status if 400 <= status <= 599 else 500


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _short(text: str) -> str:
    return text if len(text) <= _SHORT else text[:_SHORT] + "..."


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0
