"""The HTTP side of ``tunehub serve``: a LitServe ``LitSpec`` whose endpoints run in LitServe's
API server process.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (OpenAI-compatible, with
server-sent events), ``GET /v1/models``, ``GET /metrics``, ``/admin/*`` (LitServe itself adds
``/health``). Each endpoint checks the caller (tenant key or admin key), validates the body,
applies the tenant's rules and limits, then talks to the inference worker through LitServe's own
request queue and response buffer (see ``api.py`` for the messages). Answers name the module
version and base fingerprint that produced them (``X-Tunehub-Module``, ``X-Tunehub-Base``,
``model``, ``system_fingerprint`` and a ``tunehub`` object in the body).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

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
from tunehub.registry.refs import parse_ref
from tunehub.server.metrics import AuditLog, CallRecord, ServerMetrics
from tunehub.server.protocol import ParsedRequest, chunk_body, completion_body, error_body, finish_reason, parse_request, usage
from tunehub.server.tenants import Tenant, Tenants

log = logging.getLogger("tunehub.server")

DEFAULT_MAX_TOKENS = 256
_NOT_FOUND_NAMES = {"ModuleNotFound", "VersionNotFound", "AliasNotFound"}
_ADMIN_ACTIONS = ("load", "unload", "pin", "unpin", "reload")
_DISCONNECT_POLL_S = 0.25


@dataclass
class HttpSettings:
    """What the HTTP side needs (plain values)."""

    tenants_file: str | None = None
    admin_key_hash: str | None = None  # sha256 hex digest of the admin key
    registry: str | None = None
    max_body_bytes: int = 1 << 20
    audit_log: str | None = None  # None or "-": stderr


class _RemoteError(TunehubError):
    """An error the inference worker answered with: its class name and HTTP status travel along."""

    def __init__(self, message: str, status: int, name: str):
        super().__init__(message)
        self.http_status = status
        self.error_name = name


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def not_found(model: str) -> ModuleNotFound:
    # one message for "no such module" and "not yours": a tenant learns nothing about others
    return ModuleNotFound(f"model {model!r} does not exist or this API key may not use it")


class _WorkerCall:
    """One message to the inference worker and its stream of answers, over LitServe's queues."""

    def __init__(self, spec: "TunehubSpec", payload: dict[str, Any]):
        self.uid = uuid.uuid4().hex
        self.queue: deque = deque()
        self.event = asyncio.Event()
        self.buffer = spec.response_buffer
        self.ended = False
        self.buffer[self.uid] = ResponseBufferItem(event=self.event, response_queue=self.queue)
        spec.request_queue.put((spec.response_queue_id, self.uid, time.monotonic(), payload))

    async def next(self) -> dict[str, Any] | None:
        """The next message, or None once the worker finished this call."""
        if self.ended:
            return None
        while not self.queue:
            self.event.clear()
            await self.event.wait()
        data, status = self.queue.popleft()
        if status == LitAPIStatus.FINISH_STREAMING:
            self.close()
            return None
        if status == LitAPIStatus.ERROR:
            self.close()
            raise ServerError("the inference worker failed on this request")
        return json.loads(data)

    def close(self) -> None:
        self.ended = True
        self.buffer.pop(self.uid, None)


class TunehubSpec(LitSpec):
    def __init__(self, settings: HttpSettings):
        super().__init__()
        self.api_path = "/v1/completions"  # LitServe keys its request queue by this path
        self.settings = settings
        self._ready = False
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/v1/models/{model_id:path}", self.get_model, ["GET"])
        self.add_endpoint("/metrics", self.metrics_endpoint, ["GET"])
        self.add_endpoint("/admin/pool", self.admin_pool, ["GET"])
        for action in _ADMIN_ACTIONS:
            self.add_endpoint(f"/admin/{action}", self._admin_endpoint(action), ["POST"])

    @property
    def stream(self) -> bool:
        return True  # every call streams messages from the worker; plain JSON is assembled here

    def __getstate__(self) -> dict[str, Any]:
        # LitServe pickles the spec into the inference worker, which needs none of the HTTP state
        return {"api_path": self.api_path, "settings": self.settings, "_endpoints": [], "_server": None,
                "_max_batch_size": 1, "response_buffer": None, "request_queue": None, "response_queue_id": None,
                "_ready": False}

    def setup(self, server: Any) -> None:
        """Called by LitServe in its main process before the API server forks; builds HTTP state."""
        super().setup(server)
        if self._ready:
            return
        self.tenants = Tenants.load(self.settings.tenants_file)
        self.metrics = ServerMetrics()
        self.audit = AuditLog(self.settings.audit_log)
        self._store: Any = None
        self._info: dict[str, Any] | None = None
        self._ready = True

    # --- OpenAI endpoints -------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        call = CallRecord(endpoint="chat" if chat else "completions", request_id=uuid.uuid4().hex)
        tenant: Tenant | None = None
        try:
            tenant = self._tenant(request)
            call.tenant = tenant.name
            parsed = parse_request(await self._json(request), chat=chat)
            call.model, call.stream = parsed.model, parsed.stream
            info = await self._base_info()
            call.base_fingerprint = info["base_fingerprint"]
            module = self._module_for(parsed.model, tenant, info)
            max_tokens = self._max_tokens(parsed, tenant)
            self.tenants.admit(tenant)
            payload = {
                "op": "generate",
                "request_id": call.request_id,
                "tenant": tenant.name,
                "model": module,
                "prompt": parsed.prompt,
                "input_ids": parsed.input_ids,
                "messages": parsed.messages,
                "stream": parsed.stream,
                "params": parsed.sampling(max_tokens),
            }
            worker = _WorkerCall(self, payload)
            try:
                first = await self._next_watching(worker, request)
            except BaseException:
                worker.close()
                raise
            if first is None:
                raise ServerError("the inference worker answered nothing")
            if first["type"] == "error":
                worker.close()
                raise self._remote_error(first, parsed.model)
            call.module = first.get("module") or info["base"]
            call.cold_load = bool(first.get("cold_load"))
            headers = self._answer_headers(call, info)
            if parsed.stream:
                if first["type"] == "start":
                    call.mark_first_token()
                events = self._sse(call, tenant, worker, first, parsed, info)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            worker.close()
            self._finish(call, tenant, first)
            body = completion_body(
                chat=chat, request_id=call.request_id, created=int(time.time()), model=call.module,
                fingerprint=self._fingerprint(info), text=first.get("text") or "", reason=first.get("finish_reason"),
                prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
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
        except Exception as exc:  # a bug here must still answer cleanly and keep serving
            log.exception("unexpected error in %s", call.endpoint)
            return self._fail(call, ServerError(f"internal error ({type(exc).__name__})"))

    async def _sse(
        self, call: CallRecord, tenant: Tenant, worker: _WorkerCall, first: dict[str, Any],
        parsed: ParsedRequest, info: dict[str, Any],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        common = {
            "chat": parsed.chat, "request_id": call.request_id, "created": created, "model": call.module,
            "fingerprint": self._fingerprint(info),
        }
        finished = False
        try:
            if parsed.chat:
                yield _sse(chunk_body(**common, text="", first=True))
            message: dict[str, Any] | None = first
            while True:
                if message is None:
                    raise ServerError("the inference worker ended the stream early")
                kind = message["type"]
                if kind == "text":
                    call.mark_first_token()
                    yield _sse(chunk_body(**common, text=message["text"]))
                elif kind == "error":
                    raise self._remote_error(message, parsed.model)
                elif kind == "done":
                    break
                message = await worker.next()
            self._finish(call, tenant, message)
            yield _sse(chunk_body(
                **common, text=None, reason=finish_reason(message.get("finish_reason")),
                tunehub=self._tunehub_object(call, info),
            ))
            if parsed.include_usage:
                yield _sse(chunk_body(**common, no_choices=True, usage_=usage(call.prompt_tokens, call.completion_tokens)))
            yield "data: [DONE]\n\n"
            finished = True
        except TunehubError as exc:
            # the status line is gone already: the error travels as an event, as OpenAI sends it
            call.status, call.error = _status_of(exc), str(exc)
            finished = True
            yield _sse(error_body(exc, call.status))
        finally:
            worker.close()
            if not finished:  # the client went away mid-stream: free the engine slot now
                self._cancel(call.request_id)
                call.status, call.error = 499, "client disconnected"
            self._record(call)

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

    async def get_model(self, request: Request, model_id: str) -> Response:
        call = CallRecord(endpoint="models", request_id=uuid.uuid4().hex, model=model_id)
        try:
            tenant = self._tenant(request)
            call.tenant = tenant.name
            for entry in await self._models(tenant):
                if entry["id"] == model_id:
                    self._record(call)
                    return JSONResponse(entry)
            raise not_found(model_id)
        except TunehubError as exc:
            return self._fail(call, exc)

    async def _models(self, tenant: Tenant) -> list[dict[str, Any]]:
        info = await self._base_info()
        base_name, fingerprint = info["base"], info["base_fingerprint"]
        entries: list[dict[str, Any]] = []
        if tenant.may_use(base_name):
            entries.append({
                "id": base_name, "object": "model", "created": 0, "owned_by": "tunehub", "root": base_name,
                "parent": None,
                "tunehub": {"base": True, "base_fingerprint": fingerprint, "quantization": info["quantization"],
                            "max_positions": info["max_positions"]},
            })
        for item in await asyncio.to_thread(self._list_modules, fingerprint):
            if tenant.may_use(item["id"]):
                item["root"] = base_name
                entries.append(item)
        return entries

    def _list_modules(self, fingerprint: str) -> list[dict[str, Any]]:
        if self._store is None:
            from tunehub.registry.store import open_store

            self._store = open_store(self.settings.registry)
        out = []
        for info in self._store.list(base=fingerprint):
            try:
                aliases = self._store.aliases(info.repo)
            except TunehubError:
                aliases = {}
            out.append({
                "id": info.repo,
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
                },
            })
        return out

    # --- operator endpoints ------------------------------------------------------------------
    async def metrics_endpoint(self, request: Request) -> Response:
        try:
            if self.settings.admin_key_hash:
                self._check_admin(request)
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
                call.model = model
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

    # --- helpers -----------------------------------------------------------------------------
    def _tenant(self, request: Request) -> Tenant:
        key = _bearer(request)
        tenant = self.tenants.authenticate(key)
        if tenant is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'" if not key else "unknown API key")
        return tenant

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
        if declared.isdigit() and int(declared) > limit:
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
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None

    async def _base_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._worker_result({"op": "info"})
        return self._info

    def _module_for(self, model: str, tenant: Tenant, info: dict[str, Any]) -> str | None:
        """The module reference to run (None: the base alone); 404 for names the tenant lacks."""
        if model == info["base"]:
            if not tenant.may_use(model):
                raise not_found(model)
            return None
        ref = parse_ref(model)
        if not tenant.may_use(ref.repo):
            raise not_found(model)
        return str(ref)

    @staticmethod
    def _max_tokens(parsed: ParsedRequest, tenant: Tenant) -> int:
        limit = tenant.max_tokens
        if parsed.max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, limit) if limit else DEFAULT_MAX_TOKENS
        if limit is not None and parsed.max_tokens > limit:
            raise InvalidRequest(f"max_tokens {parsed.max_tokens} is above this API key's limit of {limit}")
        return parsed.max_tokens

    async def _next_watching(self, worker: _WorkerCall, request: Request) -> dict[str, Any] | None:
        """The worker's next message; raises _ClientGone if the client disconnects meanwhile."""
        task = asyncio.ensure_future(worker.next())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise _ClientGone()
        finally:
            if not task.done():
                task.cancel()

    async def _worker_result(self, payload: dict[str, Any]) -> Any:
        worker = _WorkerCall(self, payload)
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
            self.request_queue.put((self.response_queue_id, uuid.uuid4().hex, time.monotonic(),
                                    {"op": "cancel", "request_id": request_id}))
        except Exception:  # the worker is gone (shutdown): nothing left to cancel
            log.debug("could not send cancel for %s", request_id)

    @staticmethod
    def _remote_error(message: dict[str, Any], model: Any) -> TunehubError:
        name = message.get("error", "ServerError")
        if name in _NOT_FOUND_NAMES and isinstance(model, str):
            return not_found(model)
        return _RemoteError(message.get("message", "error"), int(message.get("status", 500)), name)

    def _finish(self, call: CallRecord, tenant: Tenant, done: dict[str, Any]) -> None:
        call.prompt_tokens = int(done.get("prompt_tokens") or 0)
        call.completion_tokens = int(done.get("completion_tokens") or 0)
        call.finish_reason = done.get("finish_reason")
        call.module = done.get("module") or call.module
        self.tenants.charge_tokens(tenant, call.prompt_tokens + call.completion_tokens)

    @staticmethod
    def _fingerprint(info: dict[str, Any]) -> str:
        return "tunehub-" + info["base_fingerprint"][:12]

    @staticmethod
    def _tunehub_object(call: CallRecord, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "module": call.module if call.module != info["base"] else None,
            "base": info["base"],
            "base_fingerprint": info["base_fingerprint"],
            "request_id": call.request_id,
            "cold_load": call.cold_load,
        }

    @staticmethod
    def _answer_headers(call: CallRecord, info: dict[str, Any]) -> dict[str, str]:
        return {
            "X-Tunehub-Module": call.module or info["base"],
            "X-Tunehub-Base": info["base_fingerprint"][:12],
            "X-Request-Id": call.request_id,
        }

    def _fail(self, call: CallRecord, exc: TunehubError, *, audit: bool = True) -> Response:
        status = _status_of(exc)
        call.status, call.error = status, str(exc)
        headers = {"X-Request-Id": call.request_id}
        if self._info is not None:
            headers["X-Tunehub-Base"] = self._info["base_fingerprint"][:12]
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            headers["Retry-After"] = str(int(exc.retry_after))
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if audit:
            self._record(call)
        return JSONResponse(error_body(exc, status), status_code=status, headers=headers)

    def _record(self, call: CallRecord) -> None:
        try:
            self.metrics.observe(call)
            self.audit.write(call)
        except Exception:  # accounting must never break an answer
            log.exception("could not record request %s", call.request_id)

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


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0
