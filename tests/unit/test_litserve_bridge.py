"""The LitServe internals that server/litserve_bridge.py relies on still hold: each test fails
when an upgrade of litserve changes one of them (the version range is pinned in pyproject.toml)."""

from __future__ import annotations

import asyncio
import inspect
import json
import queue
import re
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import litserve
import pytest
from packaging.requirements import Requirement

from tunehub.errors import ServerError
from tunehub.server.litserve_bridge import STOP_VALUE, LitSpec, WorkerCall, post_to_worker, spec_state_for_worker

REPO = Path(__file__).resolve().parents[2]


def test_installed_litserve_is_in_the_pinned_range():
    pin = Requirement(re.search(r'"(litserve[^"]*)"', (REPO / "pyproject.toml").read_text()).group(1))
    assert pin.specifier and "<" in str(pin.specifier), "litserve must have an upper bound"
    assert version("litserve") in pin.specifier


def test_the_spec_state_reset_for_the_worker_covers_every_field_of_litspec():
    spec = LitSpec()
    state = spec_state_for_worker(spec)
    assert set(vars(spec)) == set(state), "LitSpec's fields changed: review spec_state_for_worker"


def test_litspec_setup_hands_the_spec_the_servers_queue_and_buffer():
    request_queue, buffer = queue.Queue(), {}
    server = SimpleNamespace(
        response_buffer=buffer, _get_request_queue=lambda path: request_queue if path == "/v1/x" else None, data_streamer=None
    )
    spec = LitSpec()
    spec.api_path = "/v1/x"
    spec.setup(server)
    assert spec.request_queue is request_queue and spec.response_buffer is buffer


def test_a_worker_call_speaks_litservers_queue_and_buffer_protocol():
    """What WorkerCall puts on the queue is what LitServe's loops read, and what LitServe's
    response task writes into the buffer entry is what WorkerCall reads."""
    from litserve.server import response_queue_to_buffer
    from litserve.utils import LitAPIStatus

    spec = LitSpec()
    spec.request_queue, spec.response_buffer, spec.response_queue_id = queue.Queue(), {}, 3

    async def scenario() -> list:
        call = WorkerCall(spec, {"op": "generate"})
        queue_id, uid, submitted, payload = spec.request_queue.get_nowait()
        assert (queue_id, uid, payload) == (3, call.uid, {"op": "generate"}) and isinstance(submitted, float)

        answers = [
            (call.uid, (json.dumps({"type": "text"}), LitAPIStatus.OK, "stream", 0)),
            (call.uid, ("", LitAPIStatus.FINISH_STREAMING, "stream", 0)),
        ]

        class Transport:
            async def areceive(self, consumer_id: int):
                if answers:
                    return answers.pop(0)
                raise asyncio.CancelledError

        connector = SimpleNamespace(lit_apis=[object()], any_stream=lambda: True)
        await response_queue_to_buffer(Transport(), spec.response_buffer, 3, connector)
        got = [await call.next(), await call.next()]
        assert call.uid not in spec.response_buffer  # closed at the end of its stream
        return got

    assert asyncio.run(scenario()) == [{"type": "text"}, None]

    async def failing() -> None:
        call = WorkerCall(spec, {"op": "generate"})
        spec.response_buffer[call.uid].response_queue.append(("boom", LitAPIStatus.ERROR))
        spec.response_buffer[call.uid].event.set()
        await call.next()

    with pytest.raises(ServerError, match="^the inference worker failed on this request$"):
        asyncio.run(failing())


def test_fire_and_forget_messages_carry_a_fresh_uid():
    spec = LitSpec()
    spec.request_queue, spec.response_queue_id = queue.Queue(), 0
    post_to_worker(spec, {"op": "cancel"})
    post_to_worker(spec, {"op": "cancel"})
    first, second = spec.request_queue.get_nowait(), spec.request_queue.get_nowait()
    assert first[1] != second[1] and first[3] == {"op": "cancel"}


def test_the_workers_stop_value_and_the_servers_shutdown_fields():
    from litserve.loops.base import _SENTINEL_VALUE

    assert STOP_VALUE == _SENTINEL_VALUE

    class Echo(litserve.LitAPI):
        def setup(self, device):  # noqa: ANN001 - LitServe's signature
            pass

        def predict(self, x):  # noqa: ANN001
            return x

    server = litserve.LitServer(Echo(), accelerator="cpu", devices=1)
    assert server._shutdown_event is None  # set by run(); request_shutdown reads it
    assert isinstance(server.uvicorn_graceful_timeout, (int, float))
    assert [api.spec for api in server.litapi_connector] == [None]
    assert "self.inference_workers" in inspect.getsource(litserve.LitServer.run)
