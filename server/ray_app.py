"""``tunehub serve --ray``: the same HTTP side and inference worker as the LitServe server, run
as a Ray Serve application with many replicas (the only module that imports Ray; install it with
``pip install "tunehub[ray]"``).

Layout::

    HTTP (Ray Serve's proxy) -> TunehubIngress (FastAPI: spec.TunehubHttp with a RayTransport)
                                  └─ handle, ModuleAffinityRouter -> TunehubReplica x N
                                                                     (api.InferenceWorker each)

- :class:`TunehubIngress` mounts :class:`~tunehub.server.spec.TunehubHttp`'s routes on a FastAPI
  app (``serve.ingress``): the same tenants, limits, metrics, audit lines, headers and error
  bodies as LitServe's. It reaches the replicas through :class:`RayTransport`, which streams
  each request's messages through a deployment handle (``handle.options(stream=True)``).
- :class:`TunehubReplica` holds one :class:`~tunehub.server.api.InferenceWorker` (base, engine,
  pool) and adds ``replica`` (its Ray Serve replica id) to its answers: clients get it as the
  ``X-Tunehub-Replica`` header and in the body's ``tunehub`` object. Its
  ``record_routing_stats`` reports the pool (resident modules, pressure) to the router.
- :class:`ModuleAffinityRouter` is a Ray Serve custom request router: it ranks the replicas with
  :func:`tunehub.server.routing.rank_replicas` (a replica that holds the request's modules and is
  not overloaded first, else the least pressured). The replicas report every
  ``stats_period_s``; the router corrects those reports with its own requests still running
  (``on_request_completed``) and the modules it placed lately. Each replica still batches rows
  of different modules together.
- Faults: a replica that dies is replaced by Ray Serve. A request it held that had produced no
  message yet (no token reached the client) is sent again, to another replica; a stream already
  started ends with an error event and ``data: [DONE]``. Every wait on a replica has a timeout
  (``request_timeout_s``), so the ingress never hangs.
- Admin operations (load, pin, reload...) reach every replica; ``/admin/pool`` and ``/metrics``
  show the replicas' pools merged (:func:`tunehub.server.routing.merge_statuses`), each one's
  own status under ``replicas``.

Two ways to run it: ``tunehub serve --ray --replicas N`` (a local Ray cluster, see
:func:`run_local`) and Ray Serve's own ``serve run`` / ``serve deploy`` with
``import_path: tunehub.server.ray_app:build_app`` and the options as ``args`` (see
:func:`build_app`; autoscaling through the ``TunehubReplica`` deployment's ``autoscaling_config``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tunehub.errors import ConfigError, ServerError
from tunehub.server.api import InferenceWorker, WorkerSettings, error_message
from tunehub.server.routing import OwnRequests, ReplicaLoad, merge_statuses, rank_replicas, request_refs
from tunehub.server.serve import RAY_REQUEST_TIMEOUT_S as REQUEST_TIMEOUT_S
from tunehub.server.serve import RAY_RETRIES as RETRIES
from tunehub.server.serve import RayOptions, http_settings, worker_settings
from tunehub.server.spec import HttpSettings, TunehubHttp, install_error_handlers

log = logging.getLogger("tunehub.server")

APP_NAME = "tunehub"
REPLICA_DEPLOYMENT = "TunehubReplica"
INGRESS_DEPLOYMENT = "TunehubIngress"
#: how long the router counts a module as placed on the replica it sent it to (its load may not
#: show in a report yet)
PLACEMENT_TTL_S = 5.0
OBJECT_STORE_BYTES = 128 << 20  # a local cluster's object store: only small messages travel


# --- the router ------------------------------------------------------------------------------------


def _payload(pending: PendingRequest | None) -> Any:
    return pending.args[0] if pending is not None and pending.args else None


class ModuleAffinityRouter(RequestRouter):
    """Ranks replicas by module affinity and pool pressure (:mod:`tunehub.server.routing`)."""

    def initialize_state(self, placement_ttl_s: float = PLACEMENT_TTL_S, **kwargs: Any) -> None:
        self._placement_ttl_s = placement_ttl_s
        # replica id -> [(time routed, module references)], newest last
        self._routed: dict[str, list[tuple[float, list[str]]]] = {}
        self._own = OwnRequests()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        refs = request_refs(_payload(pending_request))
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [self._load(replica_id, replica.routing_stats) for replica_id, replica in by_id.items()]
        # one replica per rank: Ray Serve then tries them strictly in this order
        return [[by_id[replica_id]] for replica_id in rank_replicas(refs, loads)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        now = time.time()
        self._own.sent(pending_request.metadata.internal_request_id, replica_id.unique_id, now)
        refs = request_refs(_payload(pending_request))
        if refs:
            routed = self._routed.setdefault(replica_id.unique_id, [])
            routed.append((now, refs))
            while routed and routed[0][0] < now - self._placement_ttl_s:
                routed.pop(0)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._own.ended(internal_request_id, time.time())

    def _load(self, replica_id: str, stats: Mapping[str, Any] | None) -> ReplicaLoad:
        reported = (stats or {}).get("at")
        now = time.time()
        placed = [ref for at, refs in self._routed.get(replica_id, []) if at > now - self._placement_ttl_s for ref in refs]
        return ReplicaLoad.from_stats(
            replica_id,
            stats,
            own_now=self._own.running(replica_id),
            own_at_report=self._own.running(replica_id, float(reported)) if reported else 0,
            placed=placed,
        )


class RandomRouter(RequestRouter):
    """Uniform random routing (the baseline of ``benchmarks/scale.py``'s affinity figure)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        order = list(candidate_replicas)
        random.shuffle(order)
        return [[replica] for replica in order]


# --- the replica -----------------------------------------------------------------------------------


class TunehubReplica:
    """One inference worker (base, engine, module pool) in a Ray Serve replica."""

    def __init__(self, settings: dict[str, Any], threads: int = 0):
        from tunehub.devices import device_type
        from tunehub.logs import configure_logging_from_env
        from tunehub.server.serve import resolve_base
        from tunehub.server.trust import server_trust_policy

        configure_logging_from_env()
        worker_settings = WorkerSettings(**settings)
        # the base by its Hub id is fetched here, by each replica, into its machine's HF cache
        worker_settings.base = resolve_base(
            worker_settings.base,
            registry=worker_settings.registry,
            trust=server_trust_policy(worker_settings.trust, worker_settings.require_signed),
        )
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        if threads > 0:  # as many compute threads as CPUs the replica reserved: replicas share the machine
            import torch

            torch.set_num_threads(threads)
        self.worker = InferenceWorker(worker_settings)
        self.worker.setup("cuda:0" if device_type() == "cuda" else "cpu")
        log.info("replica %s ready (pid %d)", self.replica_id, os.getpid())

    async def __call__(self, payload: dict[str, Any]) -> Any:
        """The worker's answers to one message (``api.py``), each but text pieces naming this replica."""
        async for message in self.worker.predict(payload):
            if message.get("type") != "text":
                message["replica"] = self.replica_id
            yield message

    async def admin(self, payload: dict[str, Any]) -> dict[str, Any]:
        """An admin operation (sent to every replica by ``handle.broadcast``): the worker's answer."""
        answers = self.worker.predict(payload)
        try:
            message = await answers.__anext__()
        except StopAsyncIteration:
            message = error_message(ServerError("the worker answered nothing"))
        finally:
            await answers.aclose()
        if payload.get("action") == "status" and isinstance(message.get("data"), dict):
            message["data"] = {**message["data"], "pid": os.getpid()}  # which process, for operators
        return {**message, "replica": self.replica_id}

    def replica(self) -> str:
        """This replica's id (``handle.broadcast("replica")`` lists the running ones)."""
        return self.replica_id

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Ray Serve's controller every ``stats_period_s``; the routers read it."""
        return {**self.worker.routing_stats(), "replica": self.replica_id, "pid": os.getpid()}


# --- the ingress -----------------------------------------------------------------------------------


class RayCall:
    """One message to the replicas and its answers (``spec.WorkerStream``), through a handle.

    A replica that dies before its first answer is replaced by another (up to ``retries`` times):
    nothing of the request reached the client yet. After that, its death is a ServerError, which
    ends a stream with an error event."""

    def __init__(self, transport: RayTransport, payload: dict[str, Any]):
        self.transport = transport
        self.payload = payload
        self.request_id = payload.get("request_id") if payload.get("op") == "generate" else None
        self.ended = False
        self.answered = False  # a message came back: the request may not be sent again
        self.finished = False  # the last message came (done, error, result): nothing to cancel
        self.attempts = 0
        self._response: Any = self._send()
        if self.request_id:
            transport.calls[str(self.request_id)] = self

    def _send(self) -> Any:
        self.attempts += 1
        return self.transport.handle.remote(self.payload)

    def ready(self) -> bool:
        return self.ended

    async def next(self) -> dict[str, Any] | None:
        if self.ended:
            return None
        while True:
            try:
                message: dict[str, Any] = await asyncio.wait_for(self._response.__anext__(), self.transport.timeout_s)
            except StopAsyncIteration:
                self._end()
                return None
            except asyncio.TimeoutError:
                self.close()
                raise ServerError(f"no answer from the replica within {self.transport.timeout_s:g} s") from None
            except (RayActorError, ReplicaUnavailableError) as exc:
                if self.answered or self.attempts > self.transport.retries:
                    self._end()
                    raise ServerError("the replica serving this request died; send the request again") from None
                log.warning("a replica died before answering (%s); sending the request again", type(exc).__name__)
                self._response = self._send()
                continue
            except RequestCancelledError:
                self._end()
                return None
            except RayTaskError as exc:  # the replica's code failed outside the worker's own error handling
                self._end()
                raise ServerError(f"the replica failed on this request ({exc.cause.__class__.__name__})") from None
            self.answered = True
            self.finished = message.get("type") in ("done", "error", "result")
            return message

    def close(self) -> None:
        """Stop listening; a request still running on its replica is cancelled there (Ray Serve
        cancels the replica's generator, and the worker frees the engine's slot)."""
        if not self.ended and not self.finished:
            self._response.cancel()
        self._end()

    def _end(self) -> None:
        self.ended = True
        if self.request_id:
            self.transport.calls.pop(str(self.request_id), None)


class _Result:
    """A finished call's one message (``spec.WorkerStream``): an admin operation's merged answers."""

    def __init__(self, message: dict[str, Any]):
        self.message: dict[str, Any] | None = message

    def ready(self) -> bool:
        return True

    async def next(self) -> dict[str, Any] | None:
        message, self.message = self.message, None
        return message

    def close(self) -> None:
        self.message = None


class _Broadcast(_Result):
    """An admin operation sent to every replica (``handle.broadcast``); one merged answer."""

    def __init__(self, transport: RayTransport, payload: dict[str, Any]):
        super().__init__({})
        self.transport = transport
        self.payload = payload
        self.done = False

    def ready(self) -> bool:
        return self.done

    async def next(self) -> dict[str, Any] | None:
        if self.done:
            return await super().next()
        self.done = True
        try:
            response = self.transport.handle.broadcast("admin", self.payload)
            answers = await response.results_async(timeout_s=self.transport.timeout_s, return_exceptions=True)
        except TimeoutError:
            raise ServerError(f"the replicas did not answer within {self.transport.timeout_s:g} s") from None
        # a replica that died meanwhile is left out: Ray Serve replaces it
        answers = [a for a in answers if isinstance(a, dict)]
        errors = [a for a in answers if a.get("type") == "error"]
        if errors or not answers:
            self.message = errors[0] if errors else error_message(ServerError("no replica is running"))
            return await super().next()
        results = {str(a.get("replica")): a.get("data") or {} for a in answers}
        if self.payload.get("action") == "status":
            data = merge_statuses(results)
        else:
            data = {**next(iter(results.values())), "replicas": results}
        self.message = {"type": "result", "data": data}
        return await super().next()


class RayTransport:
    """The HTTP side's way to the replicas (``spec.Transport``) through a deployment handle."""

    def __init__(self, handle: Any, *, timeout_s: float = REQUEST_TIMEOUT_S, retries: int = RETRIES):
        # one streaming handle for every call: a handle made by options() has a request router of
        # its own once used (the replicas it knows, what it routed where)
        self.handle = handle.options(stream=True)
        self.timeout_s = timeout_s
        self.retries = retries
        self.calls: dict[str, RayCall] = {}  # generate calls in flight, by request id (to cancel)

    async def replica_ids(self) -> list[str]:
        """The replicas running now (those the handle's router knows), by id."""
        try:
            answers = await self.handle.broadcast("replica").results_async(timeout_s=10.0, return_exceptions=True)
        except TimeoutError:
            return []
        return sorted(a for a in answers if isinstance(a, str))

    def call(self, payload: dict[str, Any]) -> Any:
        if payload.get("op") == "admin":
            return _Broadcast(self, payload)
        return RayCall(self, payload)

    def post(self, payload: dict[str, Any]) -> None:
        if payload.get("op") == "cancel":
            # the replica that runs the request is the one its call streams from
            call = self.calls.pop(str(payload.get("request_id")), None)
            if call is not None:
                call.close()
            return
        self.handle.remote(payload)  # fire and forget: nobody reads the answer


_HTTP: TunehubHttp | None = None  # this ingress replica's HTTP side (Ray runs one per process)


def _ingress_app() -> FastAPI:
    """The ingress's ASGI app, built by Ray Serve after :class:`TunehubIngress`'s constructor:
    :class:`TunehubHttp`'s routes, ``/health``, and the OpenAI-shaped error bodies."""
    http = _HTTP
    if http is None:
        raise ServerError("the ingress's HTTP side was not built")
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    for path, endpoint, methods in http.routes:
        app.add_api_route(path, endpoint, methods=methods)
    app.add_api_route("/health", _health, methods=["GET"])
    install_error_handlers(app)
    return app


_ready = False  # a replica was up once: health is ok from then on (Ray Serve replaces dead ones)


async def _health() -> PlainTextResponse:
    """Ok once a replica can answer (Ray Serve's proxy routes here as soon as the ingress is up,
    while the replicas may still be loading the base)."""
    global _ready
    http = _HTTP
    if not _ready and http is not None and isinstance(http.transport, RayTransport):
        _ready = bool(await http.transport.replica_ids())
    if not _ready:
        return PlainTextResponse("starting", status_code=503)
    return PlainTextResponse("ok")


@serve.ingress(_ingress_app)
class TunehubIngress:
    """The OpenAI-compatible HTTP side (spec.TunehubHttp) in front of the replicas."""

    def __init__(
        self,
        replicas: Any,
        http: dict[str, Any],
        timeout_s: float = REQUEST_TIMEOUT_S,
        retries: int = RETRIES,
    ):
        global _HTTP
        from tunehub.logs import configure_logging_from_env

        configure_logging_from_env()
        transport = RayTransport(replicas, timeout_s=timeout_s, retries=retries)
        front = TunehubHttp(HttpSettings(**http), transport)
        front.init_http_state()
        _HTTP = front


# --- the application -------------------------------------------------------------------------------


def application(config: Any, admin_key_hash: str | None, options: RayOptions) -> Any:
    """The Ray Serve application for a checked :class:`~tunehub.server.serve.ServeConfig`
    (its base unresolved: each replica resolves it)."""
    router_config: dict[str, Any] = {
        "request_router_class": ModuleAffinityRouter if options.router == "affinity" else RandomRouter,
        "request_routing_stats_period_s": options.stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 10 * options.stats_period_s),
    }
    replica_options: dict[str, Any] = {
        "name": REPLICA_DEPLOYMENT,
        # the engine batches up to max_batch rows; more requests wait in the replica, where a
        # request for a resident module can still join the next batch
        "max_ongoing_requests": max(32, 4 * config.max_batch),
        "request_router_config": RequestRouterConfig(**router_config),
        "ray_actor_options": {"num_cpus": options.replica_cpus},
        "graceful_shutdown_timeout_s": config.drain_s,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if options.autoscaling_config is not None:
        replica_options["autoscaling_config"] = options.autoscaling_config
    else:
        replica_options["num_replicas"] = options.replicas
    worker = worker_settings(config)
    http = http_settings(config, admin_key_hash)
    threads = max(1, int(options.replica_cpus)) if options.replica_cpus > 0 else 0
    replicas = serve.deployment(**replica_options)(TunehubReplica).bind(worker.to_dict(), threads)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=1000,  # HTTP requests wait here for replicas, not in Ray's proxy
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=config.drain_s,
    )(TunehubIngress)
    return ingress.bind(replicas, asdict(http), options.request_timeout_s, options.retries)


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder: ``serve run tunehub.server.ray_app:build_app base=...
    registry=...``, or ``import_path`` of a ``serve run`` / ``serve deploy`` config with these
    as ``args``: every option of ``tunehub serve`` by its ServeConfig name (``base``,
    ``registry``, ``quantization``, ``pool_bytes``, ``max_batch``, ``tenants``,
    ``admin_key_file``, ``alias_ttl_s``, ``trust``...) and ``replicas``, ``router``
    (affinity|random), ``replica_cpus``, ``stats_period_s``, ``request_timeout_s``, ``retries``,
    ``autoscaling_config``. Values given as text (the command line's ``key=value``) are converted.

    Raises:
        ConfigError: every problem with the options at once.
    """
    from tunehub.server.serve import ServeConfig, check_config

    serve_fields = {f.name: f for f in fields(ServeConfig) if f.name != "ray"}
    ray_fields = {f.name: f for f in fields(RayOptions)}
    serve_args: dict[str, Any] = {}
    ray_args: dict[str, Any] = {}
    problems = []
    for key, value in dict(args).items():
        if key in ("host", "port", "log_level"):
            continue  # Ray Serve's proxy listens (its http_options); Ray's logging config
        target = serve_args if key in serve_fields else ray_args if key in ray_fields else None
        if target is None:
            problems.append(f"unknown option {key!r}")
            continue
        try:
            target[key] = _convert(value, (serve_fields.get(key) or ray_fields[key]).type)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    if "base" not in serve_args:
        problems.append("base is required (a model folder, a Hub id or a full module of the registry)")
    if problems:
        raise ConfigError(problems)
    options = RayOptions(**ray_args)
    if options.problems():
        raise ConfigError(options.problems())
    resolved = check_config(ServeConfig(**serve_args), resolve_base_path=False)
    if not resolved.config.tenants:
        # tunehub serve refuses a non-loopback host without tenants; here Ray Serve's proxy listens
        log.warning("no tenants file: anyone who reaches Ray Serve's HTTP proxy may use every module")
    return application(resolved.config, resolved.admin_key_hash, options)


def _convert(value: Any, kind: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind = str(kind)
    if kind.startswith("bool"):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith(("list", "dict")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            if kind.startswith("list"):
                return [part for part in value.split(",") if part]
            raise ValueError(f"not JSON: {value!r}") from None
    return value


# --- tunehub serve --ray ---------------------------------------------------------------------------


def run_local(config: Any, admin_key_hash: str | None, options: RayOptions) -> int:
    """``tunehub serve --ray``: a local Ray cluster (the machine's CPUs, a small object store, no
    dashboard), the application on ``config.host:config.port``, until SIGTERM or SIGINT; then the
    application and the cluster stop (requests in flight get ``drain_s`` to finish)."""
    cpus = os.cpu_count() or 1
    if options.autoscaling_config is None and options.replicas * options.replica_cpus > cpus:
        # every replica must fit on this machine's CPUs, or Ray waits for resources forever
        options = replace(options, replica_cpus=cpus / options.replicas)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    ray.init(
        address="local",  # a cluster of its own, never one found running on the machine
        num_cpus=cpus,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        namespace=f"tunehub-{uuid.uuid4().hex[:8]}",
        log_to_driver=config.log_level in ("debug", "info"),
        configure_logging=False,
    )
    # after ray.init, which installs a handler of its own for SIGTERM (it dumps a stack and dies)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        try:
            serve.run(application(config, admin_key_hash, options), name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as exc:  # noqa: BLE001 - a replica could not start (its error is in the message)
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            log.error("tunehub serve --ray: the application did not start: %s", first)
            return 1
        while not stop.wait(0.5):
            pass
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - the cluster is going away anyway
            log.warning("Ray Serve did not shut down cleanly: %s", exc)
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


__all__ = [
    "ModuleAffinityRouter",
    "RandomRouter",
    "RayOptions",
    "RayTransport",
    "TunehubIngress",
    "TunehubReplica",
    "application",
    "build_app",
    "run_local",
]
