"""``tunehub serve``: check the configuration, run LitServe in a supervised child, stop cleanly.

Process layout::

    tunehub serve (supervisor: this module's ``serve``; no torch, no LitServe)
      └─ python -m tunehub.server.serve   (own process group; LitServer.run)
           ├─ LitServe API server (uvicorn, forked): HTTP, tenants, metrics, audit  (spec.py)
           ├─ LitServe inference worker (spawned): base model + engine            (api.py)
           └─ multiprocessing manager / resource tracker

Why a supervisor: LitServe shuts down cleanly on SIGINT, but a SIGTERM kills its main process
and leaves the worker processes running. The child translates SIGTERM and SIGINT into LitServe's
own shutdown (it sets the server's shutdown event, so uvicorn drains in-flight requests, then the
workers stop); the supervisor forwards the signal, and if anything is still alive after the grace
period, or once the child has exited, it kills the child's whole process group. Nothing the server
started outlives ``tunehub serve``.

Signed modules: ``--trust KEY_OR_DIR`` (repeatable) and ``--require-signed`` become the trust
policy of the registry store the inference worker reads modules from (so every cold load is
checked before a file is read), and of the store ``/v1/models`` reports provenance from; the keys
are checked here, at startup, like every other path (see :mod:`tunehub.server.trust`).

Shutdown, in order:

1. SIGTERM (or SIGINT) reaches the child: it starts the HTTP side's shutdown clock (in-flight
   requests may run ``drain_s`` more seconds, ``TUNEHUB_SERVE_DRAIN_S``, default
   :data:`DRAIN_S`) and sets LitServe's shutdown event.
2. LitServe stops uvicorn, which stops accepting connections and waits for the open ones. At the
   drain deadline requests still running end themselves: a stream with an error event and
   ``data: [DONE]``, a plain request with a 503 (``spec.py``); their generation is cancelled.
3. When uvicorn's connections are closed (its lifespan ends), the inference worker is asked to
   leave LitServe's loop and is waited for, so it exits normally: its ``multiprocessing``
   finalizers run and unlink the semaphores it created (tqdm's lock, when the model loads), and
   the resource tracker has nothing left to warn about. Killed by LitServe's terminate() instead,
   it would leave them behind ("leaked semaphore objects").
4. LitServe terminates what is left and stops its manager; the child exits 0. The worker and the
   child skip the interpreter's teardown of torch (``spec.exit_without_teardown``): seconds of
   garbage collection on a busy machine, for processes whose work is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunehub.bases import resolve_base_folder
from tunehub.errors import ConfigError
from tunehub.quantization import QUANTIZATIONS

log = logging.getLogger("tunehub.serve")

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
LITSERVE_HOSTS = {"127.0.0.1", "0.0.0.0", "::"}  # the hosts LitServe accepts
DRAIN_S = 4.0  # how long in-flight requests may still run after SIGTERM (TUNEHUB_SERVE_DRAIN_S)
MAX_DRAIN_S = 60.0
CPU_ALLOCATORS = ("auto", "reuse", "default")
DRAIN_ENV = "TUNEHUB_SERVE_DRAIN_S"
WORKER_EXIT_S = 2.0  # how long the inference worker may take to exit once asked to
# uvicorn's graceful timeout (and LitServe's wait for uvicorn): a backstop, since requests end
# themselves at the drain deadline; then the worker's exit
UVICORN_EXTRA_S = WORKER_EXIT_S + 1.0
GRACE_EXTRA_S = UVICORN_EXTRA_S + 1.0  # the supervisor kills what is left after drain_s + this
RAY_GRACE_EXTRA_S = 15.0  # and with --ray: Ray Serve's shutdown, then the local cluster's
RAY_STATS_PERIOD_S = 0.5  # how often each replica reports its pool to the router (Ray's default: 10 s)
RAY_REQUEST_TIMEOUT_S = 300.0  # the longest wait for a replica's next message
RAY_RETRIES = 2  # sends again of a request whose replica died before answering anything
RAY_ROUTERS = ("affinity", "random")  # module affinity with pool pressure; uniform random (a baseline)


def default_drain_s() -> float:
    """The drain period from ``TUNEHUB_SERVE_DRAIN_S`` (seconds), else :data:`DRAIN_S`;
    a value that is not a number is reported by :func:`check_config`."""
    value = os.environ.get(DRAIN_ENV, "").strip()
    if not value:
        return DRAIN_S
    try:
        return float(value)
    except ValueError:
        return math.nan


def grace_s(drain_s: float) -> float:
    """How long after SIGTERM the supervisor waits before killing the server's processes (8 s
    with the default drain: every process gone within 10 s even then)."""
    return drain_s + GRACE_EXTRA_S


@dataclass
class RayOptions:
    """What ``tunehub serve --ray`` (and ``ray_app.build_app``'s args) add to the server's options.
    Plain values: Ray itself is imported only by ``ray_app.py``."""

    replicas: int = 2
    router: str = "affinity"
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves (a local cluster has the machine's)
    stats_period_s: float = RAY_STATS_PERIOD_S
    request_timeout_s: float = RAY_REQUEST_TIMEOUT_S
    retries: int = RAY_RETRIES
    autoscaling_config: dict[str, Any] | None = None  # Ray Serve's; replaces ``replicas``

    def problems(self) -> list[str]:
        out = []
        if self.replicas < 1:
            out.append(f"replicas must be at least 1, got {self.replicas}")
        if self.router not in RAY_ROUTERS:
            out.append(f"router must be one of {', '.join(RAY_ROUTERS)}, got {self.router!r}")
        if self.replica_cpus < 0:
            out.append("replica_cpus must be >= 0")
        if self.stats_period_s <= 0 or self.request_timeout_s <= 0:
            out.append("stats_period_s and request_timeout_s must be > 0")
        if self.retries < 0:
            out.append("retries must be >= 0")
        if self.autoscaling_config is not None and not isinstance(self.autoscaling_config, dict):
            out.append("autoscaling_config must be a mapping (Ray Serve's AutoscalingConfig fields)")
        return out


@dataclass
class ServeConfig:
    base: str
    quantization: str = "nf4"
    registry: str | None = None
    tenants: str | None = None
    pool_bytes: int = 1 << 30
    max_batch: int = 16
    join_steps: int = 8
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key_file: str | None = None
    max_body_bytes: int = 1 << 20
    alias_ttl_s: float = 5.0
    audit_log: str | None = None
    log_level: str = "warning"
    drain_s: float = field(default_factory=default_drain_s)
    # the inference worker's glibc allocator policy (Engine's cpu_allocator): set by this entry
    # point, never by constructing an engine; "auto" keeps freed memory when the base is on the CPU
    cpu_allocator: str = "auto"
    # public keys (PEM files or folders of them) whose signatures are verified on every module
    # load; require_signed refuses versions without a valid signature by one of them
    trust: list[str] = field(default_factory=list)
    require_signed: bool = False
    # Ray Serve instead of LitServe (``tunehub serve --ray``): RayOptions' fields; None: LitServe
    ray: dict[str, Any] | None = None


@dataclass
class _Resolved:
    config: ServeConfig
    admin_key_hash: str | None


def read_admin_key(path: str | Path) -> str:
    """The sha256 hex digest of the admin key in ``path``: the key itself, or ``sha256:<hex>``."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read the admin key file {path}: {exc.strerror or exc}") from None
    if not lines:
        raise ConfigError(f"the admin key file {path} is empty")
    key = lines[0]
    if key.startswith("sha256:") and len(key) == 71 and all(c in "0123456789abcdef" for c in key[7:]):
        return key[7:]
    if len(key) < 16:
        raise ConfigError(f"the admin key in {path} is shorter than 16 characters")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def resolve_base(base: str, *, registry: str | None = None, trust: Any = None) -> str:
    """A local model folder for ``base`` (absolute): a path; a full module of the registry (a
    fully fine-tuned model, pulled and verified under ``trust``); or a Hub id fetched into the HF
    cache. A reference with ``@version`` or ``@alias`` must be a registry module; a bare
    ``namespace/name`` is the registry's module when it has one, else a Hub id.

    Raises ConfigError as :func:`tunehub.bases.resolve_base_folder` does, and for a registry
    module that is not a full model (a LoRA is requested by name, not served as the base)."""
    from tunehub.errors import InvalidReference, ModuleNotFound
    from tunehub.registry.refs import parse_ref
    from tunehub.registry.store import open_store

    if not Path(base).expanduser().exists():
        try:
            ref = parse_ref(base)
        except InvalidReference:
            ref = None
        if ref is not None and ref.namespace is not None:
            explicit = "@" in base
            store = open_store(registry, trust=trust)
            try:
                info = store.resolve(ref)
            except ModuleNotFound:
                if explicit:
                    raise ConfigError(f"--base {base}: no such module in {store.uri}") from None
                info = None
            if info is not None:
                if info.kind != "full":
                    raise ConfigError(
                        f"--base {base} is a {info.kind} module: serve its base (a folder, a Hub id or a full module)"
                        f" and request {info.ref} by name"
                    )
                return str(store.pull(info.ref).path.resolve())
    return str(resolve_base_folder(base).resolve())


def check_config(config: ServeConfig, *, resolve_base_path: bool = True) -> _Resolved:
    """Validate everything that can be checked before loading a model; all problems at once.

    ``resolve_base_path``: replace ``base`` by a local folder (fetching a Hub id); Ray Serve's
    replicas resolve it themselves, each on its own machine."""
    from tunehub.server.tenants import parse_tenants_file

    problems: list[str] = []
    if config.ray is not None:
        problems.extend(_ray_problems(config.ray))
    if config.quantization not in QUANTIZATIONS:
        problems.append(f"--quantization must be one of {', '.join(QUANTIZATIONS)}")
    host = "127.0.0.1" if config.host == "localhost" else config.host
    if host not in LITSERVE_HOSTS:
        problems.append(f"--host must be 127.0.0.1 (loopback), 0.0.0.0 or :: (LitServe binds only these), got {config.host!r}")
    elif host not in LOOPBACK_HOSTS and not config.tenants:
        problems.append(
            f"refusing to listen on {host} without --tenants: with no tenants file anyone could use every"
            " module; give a tenants file, or serve on 127.0.0.1"
        )
    if not 1024 <= config.port <= 65535:
        problems.append(f"--port must be from 1024 to 65535, got {config.port}")
    for name, value, low in (
        ("--pool-bytes", config.pool_bytes, 1),
        ("--max-batch", config.max_batch, 1),
        ("--join-steps", config.join_steps, 0),
        ("--max-body-bytes", config.max_body_bytes, 256),
    ):
        if value < low:
            problems.append(f"{name} must be at least {low}, got {value}")
    if config.alias_ttl_s < 0:
        problems.append("--alias-ttl must be >= 0")
    if config.cpu_allocator not in CPU_ALLOCATORS:
        problems.append(f"cpu_allocator must be one of {', '.join(CPU_ALLOCATORS)}, got {config.cpu_allocator!r}")
    if not 0 <= config.drain_s <= MAX_DRAIN_S:  # NaN fails too
        problems.append(f"{DRAIN_ENV} must be a number of seconds from 0 to {MAX_DRAIN_S:g}")
    if config.tenants:
        try:
            parse_tenants_file(config.tenants)
        except ConfigError as exc:
            problems.extend(exc.problems)
    admin_hash = None
    if config.admin_key_file:
        try:
            admin_hash = read_admin_key(config.admin_key_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if config.registry:
        try:
            from tunehub.registry.store import open_store

            open_store(config.registry)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if config.trust or config.require_signed:
        from tunehub.server.trust import server_trust_policy

        try:
            server_trust_policy(config.trust, config.require_signed)
        except ConfigError as exc:
            problems.extend("--" + p if p.startswith("trust: ") else p for p in exc.problems)
    if problems:
        raise ConfigError(problems)
    policy = None
    if config.trust or config.require_signed:
        from tunehub.server.trust import server_trust_policy

        policy = server_trust_policy(config.trust, config.require_signed)
    base = resolve_base(config.base, registry=config.registry, trust=policy) if resolve_base_path else config.base
    if config.ray is not None or not resolve_base_path:
        # Ray Serve's replicas resolve a Hub id or registry module themselves, each on its own
        # machine (fetched above too, so a bad one stops the server now); a folder goes absolute
        local = Path(config.base).expanduser()
        base = str(local.resolve()) if local.exists() else config.base
    resolved = ServeConfig(**{**asdict(config), "host": host, "base": base})
    for name in ("tenants", "admin_key_file", "audit_log"):
        value = getattr(resolved, name)
        if value and value != "-":
            setattr(resolved, name, str(Path(value).resolve()))
    if resolved.registry and "://" not in resolved.registry:
        resolved.registry = str(Path(resolved.registry).resolve())
    resolved.trust = [str(Path(path).expanduser().resolve()) for path in resolved.trust]
    return _Resolved(resolved, admin_hash)


def _ray_problems(options: dict[str, Any]) -> list[str]:
    import importlib.util

    try:
        problems = RayOptions(**options).problems()
    except TypeError as exc:
        return [f"Ray options: {exc}"]
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        problems.append('--ray needs Ray Serve: pip install "tunehub[ray]"')
    return problems


# --- supervisor -----------------------------------------------------------------------------------


def serve(config: ServeConfig, *, echo: Any = None) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit code. Blocks. ``echo`` gets the
    supervisor's progress lines; by default they are logged (``tunehub.serve``: INFO, and WARNING
    for a forced kill or an unexpected exit)."""
    say = echo or log.info
    warn = echo or log.warning
    resolved = check_config(config)
    cfg = resolved.config
    payload = {"config": asdict(cfg), "admin_key_hash": resolved.admin_key_hash}
    env = dict(os.environ)
    env.pop("LIT_SERVER_API_KEY", None)  # LitServe would add its own X-API-Key check on top of ours
    # OpenMP threads that spin while idle starve the worker's Python threads (engine loop, token
    # pumps, LitServe's queue reader): on 2 CPU cores a 400-token decode took 5x longer
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["TUNEHUB_SERVE_CONFIG"] = json.dumps(payload)
    _become_subreaper()
    child = subprocess.Popen(
        [sys.executable, "-m", "tunehub.server.serve"],
        env=env,
        start_new_session=True,
        preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - one prctl call, no lock taken, nothing imported
    )
    display = "[::1]" if cfg.host == "::" else ("127.0.0.1" if cfg.host == "0.0.0.0" else cfg.host)
    say(f"tunehub serve: starting on http://{cfg.host}:{cfg.port} (base {cfg.base}, {cfg.quantization}; pid {child.pid})")
    stopping: dict[str, float] = {}

    def on_signal(signum: int, frame: Any) -> None:
        if "at" not in stopping:
            stopping["at"] = time.monotonic()
            _signal_group(child.pid, signal.SIGTERM, leader_only=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    ready = False
    code = 0
    try:
        while True:
            try:
                code = child.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if "at" in stopping:
                extra = RAY_GRACE_EXTRA_S if cfg.ray is not None else 0.0
                if time.monotonic() - stopping["at"] > grace_s(cfg.drain_s) + extra:
                    warn("tunehub serve: shutdown is taking too long; killing the server's processes")
                    _signal_group(child.pid, signal.SIGKILL)
            elif not ready and _healthy(display, cfg.port):
                ready = True
                say(f"tunehub serve: ready on http://{display}:{cfg.port}")
    finally:
        _sweep(child.pid)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "at" in stopping:
        say("tunehub serve: stopped")
        return 0
    warn(f"tunehub serve: the server exited with code {code}")
    return code or 1


def _healthy(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=0.5) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001 - not up yet, whatever the reason
        return False


def _signal_group(pgid: int, sig: int, *, leader_only: bool = False) -> None:
    try:
        if leader_only:
            os.kill(pgid, sig)
        else:
            os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep(pgid: int) -> None:
    """Make sure nothing of the server's session survives: TERM, a moment, then KILL. The child
    leads its own session (and group); Ray's worker processes take groups of their own in it."""
    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        members = _session_members(pgid)
        for pid in members:
            _signal_group(pid, sig, leader_only=True)
        if not members and not _group_alive(pgid):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap()
            if not _group_alive(pgid):
                return
            time.sleep(0.05)


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of the session ``sid``, from Linux /proc ([] elsewhere)."""
    return [pid for pid, (state, _, session) in _proc_stats().items() if state != "Z" and session == sid]


def _proc_stats() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, process group, session) of every process, from Linux /proc."""
    out: dict[int, tuple[str, int, int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (fields[0], int(fields[2]), int(fields[3]))
    return out


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is still in the group or session ``pgid`` (the child
    leads both); Linux /proc, else kill(0)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    return any(state != "Z" and pgid in (group, session) for state, group, session in _proc_stats().values())


def _become_subreaper() -> None:
    # orphans of the server (its children, once their parent is gone) are re-parented to us, so
    # the sweep can reap them instead of leaving zombies under a container's init
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _parent_death_signal() -> Any:
    """A preexec_fn that has the child get SIGTERM if this supervisor dies (even by SIGKILL), so
    the server then shuts itself down instead of running on unsupervised. Linux only."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: nothing to import after it
    except OSError:
        return None

    def set_signal() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_signal


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --- the LitServe child -------------------------------------------------------------------------


def worker_settings(config: ServeConfig) -> Any:
    """The inference worker's settings (``api.WorkerSettings``) for a checked config: one per
    LitServe worker or Ray Serve replica."""
    from tunehub.server.api import WorkerSettings

    return WorkerSettings(
        base=config.base,
        quantization=config.quantization,
        registry=config.registry,
        pool_bytes=config.pool_bytes,
        max_batch=config.max_batch,
        alias_ttl_s=config.alias_ttl_s,
        join_steps=config.join_steps,
        cpu_allocator=config.cpu_allocator,
        trust=list(config.trust),
        require_signed=config.require_signed,
    )


def http_settings(config: ServeConfig, admin_key_hash: str | None) -> Any:
    """The HTTP side's settings (``spec.HttpSettings``) for a checked config."""
    from tunehub.server.spec import HttpSettings

    return HttpSettings(
        tenants_file=config.tenants,
        admin_key_hash=admin_key_hash,
        registry=config.registry,
        max_body_bytes=config.max_body_bytes,
        audit_log=config.audit_log,
        trust=list(config.trust),
        require_signed=config.require_signed,
    )


def build_server(config: ServeConfig, admin_key_hash: str | None) -> tuple[Any, Any]:
    """The LitServer for a checked config (one API server process, one inference worker), and
    its HTTP spec."""
    import litserve as ls

    from tunehub import __version__
    from tunehub.server.api import TunehubAPI
    from tunehub.server.litserve_bridge import set_graceful_timeout
    from tunehub.server.spec import (
        MetadataAuth,
        StopWorkersAfterDrain,
        TunehubSpec,
        install_error_handlers,
    )

    spec = TunehubSpec(http_settings(config, admin_key_hash))
    api = TunehubAPI(worker_settings(config), spec)
    server = ls.LitServer(
        api,
        accelerator="auto",
        devices=1,
        workers_per_device=1,
        timeout=False,
        model_metadata={"server": "tunehub", "version": __version__},
        disable_openapi_url=True,
        callbacks=[StopWorkersAfterDrain(WORKER_EXIT_S)],
        middlewares=[(MetadataAuth, {"spec": spec})],
    )
    set_graceful_timeout(server, config.drain_s + UVICORN_EXTRA_S)
    install_error_handlers(server.app)  # 404, 405... answer the OpenAI error body too
    return server, spec


def _install_shutdown_handlers(server: Any, clock: Any, drain_s: float) -> None:
    from tunehub.server.litserve_bridge import request_shutdown

    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked helper inherited this handler: act as the default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not clock.started:
            clock.start(drain_s)  # in-flight requests end themselves by then (spec.py)
        if not request_shutdown(server):  # not started yet: nothing to drain
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _child_main() -> int:
    from tunehub.logs import configure_logging_from_env

    configure_logging_from_env()  # TUNEHUB_LOG_LEVEL (the CLI's --verbose/--quiet), when the user chose one
    payload = json.loads(os.environ.pop("TUNEHUB_SERVE_CONFIG"))
    config = ServeConfig(**payload["config"])
    if config.ray is not None:
        from tunehub.server.ray_app import run_local

        return run_local(config, payload["admin_key_hash"], RayOptions(**config.ray))
    server, spec = build_server(config, payload["admin_key_hash"])
    _install_shutdown_handlers(server, spec.shutdown_clock, config.drain_s)
    try:
        server.run(
            host=config.host,
            port=config.port,
            num_api_servers=1,
            log_level=config.log_level,
            generate_client_file=False,
            access_log=False,
        )
    except KeyboardInterrupt:
        pass
    from tunehub.server.spec import exit_without_teardown

    exit_without_teardown(0)  # LitServe stopped every process it started: nothing left to tear down
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
