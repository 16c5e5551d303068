"""The Ray Serve side's transport (server/ray_app.py) against fake deployment handles: a replica
that dies before answering is replaced by another, one that dies after is an error, a replica
that says nothing times out, closing cancels, admin operations reach every replica and merge.
No Ray cluster: the handles are fakes with the shape Ray Serve's have."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from tunehub.errors import ServerError
from tunehub.server.ray_app import RayTransport


class FakeResponse:
    """What ``handle.remote`` returns with stream=True: an async iterator with ``cancel``."""

    def __init__(self, script: list[Any]):
        self.script = list(script)
        self.cancelled = False

    async def __anext__(self) -> Any:
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item == "hang":
            await asyncio.sleep(3600)
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeBroadcast:
    def __init__(self, answers: list[Any]):
        self.answers = answers

    async def results_async(self, *, timeout_s: float | None = None, return_exceptions: bool = False) -> list[Any]:
        return self.answers


class FakeHandle:
    def __init__(self, scripts: list[list[Any]], broadcast: dict[str, list[Any]] | None = None):
        self.scripts = scripts
        self.sent: list[dict[str, Any]] = []
        self.responses: list[FakeResponse] = []
        self.broadcasts = broadcast or {}

    def options(self, **kwargs: Any) -> FakeHandle:
        assert kwargs == {"stream": True}
        return self

    def remote(self, payload: dict[str, Any]) -> FakeResponse:
        self.sent.append(payload)
        response = FakeResponse(self.scripts.pop(0))
        self.responses.append(response)
        return response

    def broadcast(self, method: str, *args: Any) -> FakeBroadcast:
        return FakeBroadcast(self.broadcasts[method])


DONE = {"type": "done", "module": "a/b@1", "replica": "r2"}
GENERATE = {"op": "generate", "request_id": "req-1", "parts": [{"model": "a/b@1"}]}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_replica_dying_before_its_first_answer_is_replaced():
    handle = FakeHandle([[ActorDiedError()], [DONE]])
    call = RayTransport(handle).call(GENERATE)
    assert run(call.next()) == DONE
    assert len(handle.sent) == 2 and handle.sent[1] == GENERATE  # the same request, sent again
    assert run(call.next()) is None and call.ended


def test_retries_are_bounded():
    handle = FakeHandle([[ActorDiedError()], [ActorDiedError()]])
    call = RayTransport(handle, retries=1).call(GENERATE)
    with pytest.raises(ServerError, match="died"):
        run(call.next())
    assert len(handle.sent) == 2


def test_a_replica_dying_after_answering_is_an_error_not_a_resend():
    start = {"type": "start", "module": "a/b@1", "replica": "r1"}
    handle = FakeHandle([[start, {"type": "text", "text": "hi"}, ActorDiedError()]])
    call = RayTransport(handle).call({**GENERATE, "stream": True})

    async def drain() -> list[Any]:
        seen = [await call.next(), await call.next()]
        with pytest.raises(ServerError, match="died"):
            await call.next()
        return seen

    assert [m["type"] for m in run(drain())] == ["start", "text"]
    assert len(handle.sent) == 1 and call.ended


def test_a_silent_replica_times_out_and_is_cancelled():
    handle = FakeHandle([["hang"]])
    call = RayTransport(handle, timeout_s=0.05).call(GENERATE)
    with pytest.raises(ServerError, match="no answer from the replica"):
        run(call.next())
    assert handle.responses[0].cancelled and call.ended


def test_close_cancels_a_running_request_and_cancel_posts_reach_it():
    handle = FakeHandle([[{"type": "start", "replica": "r1"}, "hang"], [DONE]])
    transport = RayTransport(handle)
    call = transport.call({**GENERATE, "stream": True})
    run(call.next())
    transport.post({"op": "cancel", "request_id": "req-1"})
    assert handle.responses[0].cancelled and call.ended
    finished = transport.call({**GENERATE, "request_id": "req-2"})
    run(finished.next())  # its last message came: closing it cancels nothing
    finished.close()
    assert not handle.responses[1].cancelled


def test_admin_operations_reach_every_replica_and_merge():
    status = {"type": "result", "data": {"hits": 1, "misses": 1, "modules": []}}
    answers = [{**status, "replica": "r1"}, {**status, "replica": "r2"}, ActorDiedError()]  # one died meanwhile
    handle = FakeHandle([], {"admin": answers})
    message = run(RayTransport(handle).call({"op": "admin", "action": "status"}).next())
    assert message["type"] == "result" and set(message["data"]["replicas"]) == {"r1", "r2"}
    assert message["data"]["hits"] == 2 and message["data"]["hit_rate"] == 0.5
    loads = [{"type": "result", "data": {"module": "a/b@2", "loaded": True}, "replica": r} for r in ("r1", "r2")]
    message = run(RayTransport(FakeHandle([], {"admin": loads})).call({"op": "admin", "action": "load", "model": "a/b"}).next())
    assert message["data"]["module"] == "a/b@2" and set(message["data"]["replicas"]) == {"r1", "r2"}
    refused = [{"type": "error", "status": 404, "error": "ModuleNotFound", "message": "no", "replica": "r1"}]
    message = run(RayTransport(FakeHandle([], {"admin": refused})).call({"op": "admin", "action": "pin", "model": "x/y"}).next())
    assert message["type"] == "error" and message["status"] == 404
    assert run(RayTransport(FakeHandle([], {"replica": ["r2", "r1", ActorDiedError()]})).replica_ids()) == ["r1", "r2"]
