"""Every use of LitServe beyond its documented API, in this one file.

tunehub's HTTP side (``spec.py``) is a ``LitSpec``: the extension point LitServe's own
``OpenAISpec`` is built on. It has to be: one inference worker (one copy of the base) must serve
both OpenAI routes and the admin operations, and a plain ``LitAPI`` gets a worker of its own per
route; the tenant's key, admission and the models listing need the request's headers and state
that LitServe does not pass to ``decode_request`` in the worker. A spec reaches the worker the
way ``OpenAISpec`` does: it puts ``(response_queue_id, uid, time, payload)`` on the request queue
LitServe gives it and reads ``(data, LitAPIStatus)`` pairs from the response buffer entry it
registers under ``uid``.

Those message shapes, the status values, the worker's stop value, the list of worker processes
and the shutdown event are LitServe internals. They are used only here; ``pyproject.toml`` pins
``litserve>=0.2.19,<0.3``, and ``tests/unit/test_litserve_bridge.py`` fails when any of them
changes (``tests/unit/test_private_names.py`` fails when one is used outside this file).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from multiprocessing.connection import wait
from typing import Any

from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from tunehub.errors import ServerError

__all__ = [
    "LitServeTransport",
    "LitSpec",
    "WorkerCall",
    "post_to_worker",
    "request_shutdown",
    "set_graceful_timeout",
    "spec_state_for_worker",
    "stop_inference_workers",
]

# what LitServe's inference loop returns on when it reads it from the request queue
STOP_VALUE = (None, None, None, None)


def post_to_worker(spec: LitSpec, payload: dict[str, Any], uid: str | None = None) -> None:
    """Put one message on the spec's request queue; the worker answers under ``uid`` (if anyone
    registered a buffer entry for it: fire and forget otherwise)."""
    spec.request_queue.put((spec.response_queue_id, uid or uuid.uuid4().hex, time.monotonic(), payload))


class WorkerCall:
    """One message to the inference worker and its stream of answers (JSON dicts)."""

    def __init__(self, spec: LitSpec, payload: dict[str, Any]):
        self.uid = uuid.uuid4().hex
        self.queue: deque[tuple[Any, Any]] = deque()
        self.event = asyncio.Event()
        self.buffer = spec.response_buffer
        self.ended = False
        self.buffer[self.uid] = ResponseBufferItem(event=self.event, response_queue=self.queue)
        post_to_worker(spec, payload, self.uid)

    def ready(self) -> bool:
        """Whether :meth:`next` would answer without waiting."""
        return bool(self.queue) or self.ended

    async def next(self) -> dict[str, Any] | None:
        """The next message, or None once the worker finished this call.

        Raises:
            ServerError: the worker's LitServe loop failed on this call.
        """
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
        message: dict[str, Any] = json.loads(data)
        return message

    def close(self) -> None:
        """Stop listening: later answers for this call are dropped by LitServe."""
        self.ended = True
        self.buffer.pop(self.uid, None)


class LitServeTransport:
    """The spec's way to its inference worker under LitServe (``spec.Transport``): LitServe's own
    request queue and response buffer."""

    def __init__(self, spec: LitSpec):
        self.spec = spec

    def call(self, payload: dict[str, Any]) -> WorkerCall:
        return WorkerCall(self.spec, payload)

    def post(self, payload: dict[str, Any]) -> None:
        post_to_worker(self.spec, payload)


def spec_state_for_worker(spec: LitSpec, **ours: Any) -> dict[str, Any]:
    """What of the spec LitServe may pickle into the inference worker: LitSpec's own fields
    reset (the worker needs no HTTP state, queues or server), plus ``ours``."""
    return {
        "api_path": spec.api_path,
        "_endpoints": [],
        "_server": None,
        "_max_batch_size": 1,
        "response_buffer": None,
        "request_queue": None,
        "response_queue_id": None,
        **ours,
    }


def stop_inference_workers(litserver: Any, exit_s: float) -> None:
    """Put LitServe's stop value on the request queue once per worker and wait up to ``exit_s``
    for the workers to exit (called once no request needs them)."""
    workers = list(getattr(litserver, "inference_workers", None) or [])
    if not workers:
        return
    try:
        for lit_api in litserver.litapi_connector:
            if lit_api.spec is not None and lit_api.spec.request_queue is not None:
                for _ in workers:
                    lit_api.spec.request_queue.put(STOP_VALUE)
    except (OSError, EOFError):  # the manager is gone already: LitServe terminates the workers
        return
    # a Process's sentinel is readable once it has exited; wait() needs no parenthood (the
    # workers are LitServe main's children, this process their sibling)
    sentinels = [worker.sentinel for worker in workers]
    deadline = time.monotonic() + exit_s
    while sentinels and time.monotonic() < deadline:
        for ready in wait(sentinels, timeout=max(0.0, deadline - time.monotonic())):
            sentinels.remove(ready)


def set_graceful_timeout(litserver: Any, seconds: float) -> None:
    """How long uvicorn may take to close its connections at shutdown (LitServer takes no
    argument for it)."""
    litserver.uvicorn_graceful_timeout = seconds


def request_shutdown(litserver: Any) -> bool:
    """Ask a running LitServer to shut down, as its own shutdown route does; False when it has
    not started (nothing to drain yet).

    Safe in a signal handler: the event is set from a thread, since the main thread waits on the
    same manager connection, which a signal handler must not reenter."""
    event = getattr(litserver, "_shutdown_event", None)
    if event is None:
        return False
    threading.Thread(target=_set_event, args=(event,), daemon=True).start()
    return True


def _set_event(event: Any) -> None:
    try:
        event.set()
    except (OSError, EOFError):  # the manager is already gone: the server is stopping anyway
        return
