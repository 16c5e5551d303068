"""The inference side of ``tunehub serve``: one worker holding the base and the engine.

:class:`InferenceWorker` is the worker itself; LitServe runs it as :class:`TunehubAPI` (a
``LitAPI``), and with ``--ray`` each Ray Serve replica holds one (``ray_app.py``). LitServe runs
this ``LitAPI`` in its own process (``workers_per_device=1``) with
``enable_async=True``: every request becomes an asyncio task in the worker, which submits it to
the engine at once and awaits its own handle. Requests that arrive together therefore reach the
engine together, and the engine batches them (continuous batching, mixed modules).

The HTTP side (``spec.py``) sends small dict messages through LitServe's request queue:

- ``generate``: run one request; answers ``start`` (first token, streaming only), ``text``
  pieces (streaming only), then ``done`` or ``error``. With ``require_signed_by`` (the tenant's
  signing rules that match the module's name), the reference is resolved to ``repo@N`` first,
  that version checked against the rules and then acquired (:class:`~tunehub.server.trust.SigningChecks`);
- ``cancel``: the client went away, cancel that request's engine handle;
- ``admin``: load, unload, pin, unpin, reload, status of the module pool;
- ``info``: the base's name, fingerprint and context size.

Errors are answered as ``{"type": "error", "status": ..., "error": ..., "message": ...}``
messages, never raised into LitServe (which would turn them into a 500).
Nothing here imports torch at module level: the LitServe main and HTTP processes import this
module too, and only the worker needs the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator

import litserve as ls

from tunehub.errors import InvalidRequest, TunehubError, public_error_name
from tunehub.server.trust import rules_from_wire

log = logging.getLogger("tunehub.server")

#: how long a cancel for a request the worker has not seen yet is remembered
_EARLY_CANCEL_TTL_S = 120.0


@dataclass
class WorkerSettings:
    """What the worker needs to build the engine (plain values: LitServe pickles this)."""

    base: str
    quantization: str = "nf4"
    registry: str | None = None
    pool_bytes: int = 1 << 30
    max_batch: int = 16
    alias_ttl_s: float = 5.0
    join_steps: int = 8  # Engine's join_steps: steps ready rows may wait to join with others
    # glibc's allocator policy for this worker process (Engine's cpu_allocator), chosen by the
    # serve entry point: an Engine left to its default changes nothing process-wide
    cpu_allocator: str = "auto"
    # the server's trust policy (--trust, --require-signed): the store's, so every load checks it
    trust: list[str] = field(default_factory=list)
    require_signed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_message(exc: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """The wire form of an error: tunehub errors keep their class and HTTP status.

    A client error (a tunehub error with a 4xx status: a bad request, a module that cannot be
    served) is logged as one line with the request id, never with a traceback: a client can
    send thousands. Server-side errors keep their traceback."""
    where = f"request {request_id}" if request_id else "the inference worker"
    if isinstance(exc, TunehubError):
        if exc.http_status < 500:
            log.info("%s refused (%d %s): %s", where, exc.http_status, type(exc).__name__, exc)
        else:
            log.error("%s failed (%d %s): %s", where, exc.http_status, type(exc).__name__, exc, exc_info=exc)
        # a private helper class travels under its public parent's name: the SDK raises that type
        return {"type": "error", "status": exc.http_status, "error": public_error_name(exc), "message": str(exc)}
    log.error("unexpected error in %s: %r", where, exc, exc_info=exc)
    return {"type": "error", "status": 500, "error": "ServerError", "message": f"internal error ({type(exc).__name__})"}


_KIND_CACHE_ENTRIES = 4096  # versions whose kind (template or not) the worker remembers


class InferenceWorker:
    """The inference worker's core, framework-free: ``setup`` builds the engine and ``predict``
    answers one message (see module docstring). LitServe runs it as :class:`TunehubAPI`; Ray
    Serve's replicas (``ray_app.py``) hold one each."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings

    # --- run in the worker process ----------------------------------------------------------------
    def setup(self, device: str) -> None:
        from tunehub.logs import configure_logging_from_env
        from tunehub.registry.store import open_store
        from tunehub.server.engine import Engine, load_base
        from tunehub.server.trust import SigningChecks, server_trust_policy

        configure_logging_from_env()  # a spawned process: TUNEHUB_LOG_LEVEL, when the user chose one
        s = self.settings
        store = open_store(s.registry, trust=server_trust_policy(s.trust, s.require_signed))
        base = load_base(s.base, quantization=s.quantization, device=device)  # type: ignore[arg-type]
        self.signing = SigningChecks(store.resolve, s.alias_ttl_s)
        # tenants' signing checks resolve and verify (I/O, one ECDSA verification) off the event
        # loop, and never wait behind a cold load on the load thread
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunehub-verify")
        self.engine = Engine(
            base,
            store,
            pool_bytes=s.pool_bytes,
            max_batch=s.max_batch,
            alias_ttl_s=s.alias_ttl_s,
            join_steps=s.join_steps,
            cpu_allocator=s.cpu_allocator,  # type: ignore[arg-type]
        )
        self._store = store
        # repo@N -> its Template, or None for a module the engine applies: a version's kind never
        # changes, so the registry is asked once per version, not on every cold load
        self._templates: dict[str, Any] = {}
        self._loads: dict[str, int] = {}
        self._evictions: dict[str, int] = {}
        self.engine.pool.on_event = self._on_pool_event
        # one thread loads modules: cold loads stay off the engine's decode loop, and module
        # materialisation never runs twice at once
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunehub-load")
        self._active: dict[str, Any] = {}
        self._early_cancels: dict[str, float] = {}
        self._cancelled = 0  # requests whose client went away before the end
        self._requests = 0  # generate requests in this worker now, waiting for a module or running
        self._loading = 0  # of those, the ones waiting on the load thread
        # reference as requested -> the version it was served with, for routing (see routing_stats)
        self._served: OrderedDict[str, str] = OrderedDict()
        self._warm_up()
        log.info("engine ready: base %s (%s, %s) on %s", base.name, base.fingerprint[:12], base.quantization, device)

    async def predict(self, request: dict, context: dict | None = None) -> AsyncGenerator[dict, None]:
        op = request.get("op") if isinstance(request, dict) else None
        try:
            if op == "generate":
                async for message in self._generate(request):
                    yield message
            elif op == "cancel":
                self._cancel(str(request.get("request_id")))
                yield {"type": "result", "data": {}}
            elif op == "admin":
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(self._loader, self._admin, request.get("action"), request.get("model"))
                yield {"type": "result", "data": data}
            elif op == "info":
                yield {"type": "result", "data": self._info()}
            else:
                yield error_message(InvalidRequest(f"unknown worker operation {op!r}"))
        except Exception as exc:  # every failure becomes an error message, never a dead worker
            yield error_message(exc, request.get("request_id") if isinstance(request, dict) else None)

    # --- generation -----------------------------------------------------------------------------
    async def _generate(self, request: dict) -> AsyncIterator[dict]:
        from tunehub.server.engine import GenerationRequest, SamplingParams

        loop = asyncio.get_running_loop()
        request_id = str(request["request_id"])
        stream = bool(request.get("stream"))
        held: list[Any] = []  # the modules this request acquired, released when it ends
        engine_parts: list[tuple[str, float]] = []  # (repo@N, weight) the engine applies together
        template: tuple[str, Any] | None = None  # (repo@N, Template) when a part is a template
        cold = False
        handle = None
        finished = False
        self._requests += 1
        try:
            for part in request.get("parts") or []:
                ref, weight = str(part["model"]), float(part.get("weight", 1.0))
                asked = ref
                rules = rules_from_wire(part.get("require_signed_by"))
                signed: dict[str, str] | None = None
                if rules:  # the tenant's rules, on the exact version this request will use
                    ref, signed = await self._check_signing(ref, rules)
                # acquire here and hold it for the whole request: the engine then always finds the
                # module resident, and an alias moved meanwhile does not matter. A resident exact
                # version is taken at once; anything that may load or ask the registry goes to the
                # load thread, off this event loop
                module = self._acquire_resident(ref)
                part_template = None
                if module is None:
                    self._loading += 1
                    try:
                        module, part_cold, part_template = await loop.run_in_executor(
                            self._loader, self._acquire_or_template, ref
                        )
                    finally:
                        self._loading -= 1
                    cold = cold or part_cold
                if module is not None:
                    held.append(module)
                    self._remember_served(asked, module.key)
                    if signed is not None:
                        self.signing.confirm_loaded(rules, module.key, signed, module.manifest.files)
                    engine_parts.append((module.key, weight))
                elif part_template is not None:
                    if template is not None:
                        raise InvalidRequest(f"{template[0]} and {part_template[0]} are both templates: a request takes one")
                    if weight != 1.0:
                        raise InvalidRequest(f"{part_template[0]} is a template: it takes no weight (1, not {weight:g})")
                    template = part_template
            input_ids = request.get("input_ids")
            prompt = request.get("prompt")
            messages = request.get("messages")
            if template is not None:  # a hard prompt: rendered here, then run on the base
                template[1].check_endpoint(chat=messages is not None)
                if messages is None and input_ids is not None:
                    raise InvalidRequest("a template's prompt is text: send 'prompt' as a string (or 'slots')")
                values = template[1].values(request.get("slots"), prompt if messages is None else None)
                if messages is not None:
                    messages = template[1].render_messages(values) + list(messages)
                else:
                    prompt = template[1].render_text(values)
            params = self._sampling(SamplingParams, dict(request.get("params", {})))
            # messages are rendered by the engine, with the row's tokenizer (a tokenizer module's own)
            handle = self.engine.submit(
                GenerationRequest(
                    prompt=prompt if input_ids is None and messages is None else None,
                    input_ids=input_ids if messages is None else None,
                    messages=messages,
                    modules=list(engine_parts) if engine_parts else None,
                    params=params,
                    request_id=request_id,
                )
            )
            self._active[request_id] = handle
            if self._early_cancels.pop(request_id, None) is not None:
                handle.cancel()
            events: asyncio.Queue = asyncio.Queue()
            threading.Thread(
                target=_pump, args=(handle, loop, events, stream), name=f"pump-{request_id[:8]}", daemon=True
            ).start()
            started = False
            while True:
                batch = [await events.get()]
                while not events.empty():  # send every token that is ready as one message
                    batch.append(events.get_nowait())
                text = "".join(p.text for kind, p in batch if kind == "token")
                tokens = sum(1 for kind, _ in batch if kind == "token")
                final = next(((k, p) for k, p in batch if k != "token"), None)
                if final is not None and final[0] == "error":
                    finished = True
                    yield error_message(final[1], request_id)
                    return
                answered_by = _answered_by(template, handle.module_key)
                if stream and not started and tokens:
                    started = True
                    yield {"type": "start", "module": answered_by, "cold_load": cold}
                if stream and text:
                    yield {"type": "text", "text": text}
                if final is not None:
                    finished = True
                    result = final[1]
                    yield {
                        "type": "done",
                        "module": _answered_by(template, result.module),
                        "text": None if stream else result.text,
                        "finish_reason": result.finish_reason,
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                        "cold_load": cold,
                    }
                    return
        except Exception as exc:
            yield error_message(exc, request_id)
        finally:
            self._requests -= 1
            if handle is not None and not finished:
                handle.cancel()  # the stream was abandoned: free the engine slot
            self._active.pop(request_id, None)
            for module in held:
                self.engine.pool.release(module)

    async def _check_signing(self, ref: str, rules: list[Any]) -> tuple[str, dict[str, str]]:
        """``ref`` resolved to ``repo@N`` (as the pool resolves it, alias TTL included) and the
        digests a signature by the rules' keys covers; raises what the rules refuse. A success
        seen before costs no I/O."""
        from tunehub.registry.refs import parse_ref

        loop = asyncio.get_running_loop()
        parsed = parse_ref(ref)
        pool = self.engine.pool
        key = str(parsed) if parsed.version is not None else await loop.run_in_executor(self._verifier, pool.resolve_key, parsed)
        digests = self.signing.cached(rules, key)
        if digests is None:
            digests = await loop.run_in_executor(self._verifier, self.signing.check, rules, key)
        return key, digests

    def _sampling(self, cls: Any, params: dict[str, Any]) -> Any:
        # stop_token_ids add to eos, as in vLLM; ignore_eos drops it
        ignore_eos = bool(params.pop("ignore_eos", False))
        if params.get("stop_token_ids") is not None or ignore_eos:
            ids = set(params.get("stop_token_ids") or [])
            if not ignore_eos:
                ids |= self.engine.default_stop_ids
            params["stop_token_ids"] = sorted(ids)
        return cls(**params)

    def _acquire_resident(self, ref: str) -> Any:
        from tunehub.registry.refs import parse_ref

        parsed = parse_ref(ref)
        if parsed.version is None or str(parsed) not in self.engine.pool:
            return None
        return self.engine.pool.acquire(parsed)  # a hit: no I/O (evicted meanwhile: a rare inline load)

    def _acquire(self, ref: str) -> tuple[Any, bool]:
        pool = self.engine.pool
        misses = pool.stats.misses
        module = pool.acquire(ref)
        # only this thread loads, so a change in misses is this request's cold load
        return module, pool.stats.misses > misses

    def _acquire_or_template(self, ref: str) -> tuple[Any, bool, tuple[str, Any] | None]:
        """(module, cold, None) for a module the engine applies; (None, False, (repo@N,
        template)) for a template module, read once per version (verified, under the server's
        trust policy) and kept: a template is applied to the prompt, not by the engine."""
        from tunehub.registry.template import TEMPLATE_FILE, parse_template

        key = self.engine.pool.resolve_key(ref)
        if key not in self._templates:
            template = None
            if self._store.resolve(key).kind == "template":
                content = self._store.read(key, [TEMPLATE_FILE])
                template = parse_template(bytes(content.files[TEMPLATE_FILE]), f"{key}/{TEMPLATE_FILE}")
            if len(self._templates) >= _KIND_CACHE_ENTRIES:
                self._templates.clear()
            self._templates[key] = template
        template = self._templates[key]
        if template is not None:
            return None, False, (key, template)
        module, cold = self._acquire(key)
        return module, cold, None

    def _cancel(self, request_id: str) -> None:
        handle = self._active.get(request_id)
        if handle is not None:
            handle.cancel()
            self._cancelled += 1
            return
        now = time.monotonic()
        self._early_cancels[request_id] = now
        for rid, at in list(self._early_cancels.items()):
            if at < now - _EARLY_CANCEL_TTL_S:
                del self._early_cancels[rid]

    def _warm_up(self) -> None:
        # the first forward pass initialises lazy kernels; pay it before /health says ready
        from tunehub.server.engine import GenerationRequest, SamplingParams

        bos = self.engine.tokenizer.bos_token_id
        ids = [bos if bos is not None else 0, 5, 6]
        self.engine.generate([GenerationRequest(input_ids=ids, params=SamplingParams(max_tokens=2, stop_token_ids=[]))])

    # --- admin and info -------------------------------------------------------------------------
    def _on_pool_event(self, event: str, key: str) -> None:
        counts = self._loads if event == "load" else self._evictions
        counts[key] = counts.get(key, 0) + 1

    def _admin(self, action: Any, model: Any) -> dict[str, Any]:
        pool = self.engine.pool
        if action == "status":
            return self._status()
        if action == "reload":
            pool.refresh()
            return {"reloaded": True}
        if action == "load":
            module = pool.acquire(model)
            pool.release(module)
            return {"module": module.key, "loaded": True}
        if action == "unload":
            key = pool.resolve_key(model)
            in_pool = key in pool
            unloaded = pool.unload(model)
            # a module in use stays until its requests release it; then LRU eviction may drop it
            return {"module": key, "loaded": in_pool, "unloaded": unloaded, "in_use": in_pool and not unloaded}
        if action == "pin":
            return {"module": pool.pin(model), "pinned": True}
        if action == "unpin":
            return {"module": pool.unpin(model), "pinned": False}
        raise InvalidRequest(f"unknown admin action {action!r}")

    def _status(self) -> dict[str, Any]:
        status = self.engine.pool.status()
        status["cold_load_seconds"] = round(self.engine.pool.stats.cold_load_seconds, 4)
        status["loads_by_module"] = dict(self._loads)
        status["evictions_by_module"] = dict(self._evictions)
        status["active_requests"] = len(self._active)
        status["cancelled_requests"] = self._cancelled
        status["engine_rows"] = len(self.engine._rows)  # rows in the running batch
        status["engine_steps"] = self.engine.steps
        return status

    def _remember_served(self, asked: str, key: str) -> None:
        self._served[asked] = key
        self._served.move_to_end(asked)
        while len(self._served) > _KIND_CACHE_ENTRIES:
            self._served.popitem(last=False)

    def routing_stats(self) -> dict[str, Any]:
        """What a router needs to place requests on this worker (see ``routing.ReplicaLoad``):
        the resident module versions, the references last served with each of them, and the
        pool's pressure (bytes used of the budget, loads under way, requests in the worker)."""
        pool = self.engine.pool
        status = pool.status()
        resident = [entry["module"] for entry in status["modules"]]
        held = set(resident)
        return {
            "modules": resident,
            "refs": {ref: key for ref, key in self._served.items() if key in held},
            "used_bytes": status["resident_bytes"],
            "budget_bytes": status["budget_bytes"],
            "loading": self._loading,
            "requests": self._requests,
            "capacity": self.settings.max_batch,
            "hits": status["hits"],
            "misses": status["misses"],
            "at": time.time(),  # the router counts what it sent since then as not seen here yet
        }

    def _info(self) -> dict[str, Any]:
        base = self.engine.base
        return {
            "base": base.name,
            "base_fingerprint": base.fingerprint,
            "quantization": base.quantization,
            "max_positions": base.max_positions,
            "device": str(base.device),
            "chat_template": bool(getattr(self.engine.tokenizer, "chat_template", None)),
        }


class TunehubAPI(InferenceWorker, ls.LitAPI):
    """The inference worker as LitServe runs it: one process, ``predict`` per message."""

    def __init__(self, settings: WorkerSettings, spec: ls.specs.base.LitSpec):
        ls.LitAPI.__init__(self, spec=spec, enable_async=True)
        InferenceWorker.__init__(self, settings)

    async def decode_request(self, request: dict, context: dict | None = None) -> dict:
        return request

    async def encode_response(self, output: AsyncIterator[dict], context: dict | None = None) -> AsyncIterator[dict]:
        async for message in output:
            yield message

    def health(self) -> bool:
        return True


def _answered_by(template: tuple[str, Any] | None, engine_key: str | None) -> str | None:
    """What answered: the template's version, then what the engine applied ('t@2+a@1')."""
    if template is None:
        return engine_key
    return template[0] if engine_key is None else f"{template[0]}+{engine_key}"


def _pump(handle: Any, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, stream: bool) -> None:
    """Move one engine handle's events (a blocking iterator) onto the worker's event loop; without
    streaming only the result travels (one wake-up of the loop per request, not per token)."""

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the worker is shutting down
            pass

    try:
        if stream:
            for event in handle:
                put(("token", event))
        put(("done", handle.result()))
    except BaseException as exc:  # noqa: BLE001 - forwarded to the request, never lost
        put(("error", exc))
