"""The HTTP side (server/spec.py's TunehubHttp) reaches inference workers through a transport
only: here a scripted fake, mounted on a plain FastAPI app as the Ray Serve ingress mounts it.
The same tenants, headers, bodies and stream endings as under LitServe, plus the replica that
answered when the worker names one."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tunehub.errors import ServerError
from tunehub.server.spec import HttpSettings, TunehubHttp, install_error_handlers

INFO = {"base": "tiny", "base_fingerprint": "w1:" + "ab" * 32, "quantization": "none", "max_positions": 256}


class Stream:
    def __init__(self, script: list[Any]):
        self.script = list(script)
        self.closed = False

    def ready(self) -> bool:
        return bool(self.script)

    async def next(self) -> dict[str, Any] | None:
        if not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.closed = True


class Transport:
    def __init__(self, generate: list[Any]):
        self.generate = generate
        self.payloads: list[dict[str, Any]] = []
        self.posted: list[dict[str, Any]] = []

    def call(self, payload: dict[str, Any]) -> Stream:
        self.payloads.append(payload)
        if payload["op"] == "info":
            return Stream([{"type": "result", "data": INFO}])
        return Stream(self.generate)

    def post(self, payload: dict[str, Any]) -> None:
        self.posted.append(payload)


def client(transport: Transport) -> TestClient:
    http = TunehubHttp(HttpSettings(audit_log="-"), transport)
    http.init_http_state()
    app = FastAPI()
    for path, endpoint, methods in http.routes:
        app.add_api_route(path, endpoint, methods=methods)
    install_error_handlers(app)
    return TestClient(app)


def test_answers_name_the_replica_when_the_worker_does():
    done = {"type": "done", "module": "a/b@1", "text": "hi", "finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 1}
    transport = Transport([{**done, "replica": "r7"}])
    answer = client(transport).post("/v1/completions", json={"model": "a/b", "prompt": "x", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Tunehub-Module"] == "a/b@1" and answer.headers["X-Tunehub-Replica"] == "r7"
    assert answer.json()["tunehub"]["replica"] == "r7"
    generate = transport.payloads[-1]
    assert generate["op"] == "generate" and generate["parts"] == [{"model": "a/b", "weight": 1.0}]
    # a worker that names no replica (LitServe's single worker): neither header nor field
    plain = client(Transport([done])).post("/v1/completions", json={"model": "a/b", "prompt": "x", "max_tokens": 4})
    assert "X-Tunehub-Replica" not in plain.headers and "replica" not in plain.json()["tunehub"]


def test_worker_errors_keep_their_status_and_name_the_replica():
    refused = {"type": "error", "status": 422, "error": "IncompatibleBase", "message": "other base", "replica": "r2"}
    answer = client(Transport([refused])).post("/v1/completions", json={"model": "a/b", "prompt": "x"})
    assert answer.status_code == 422 and answer.json()["error"]["tunehub_error"] == "IncompatibleBase"
    assert answer.headers["X-Tunehub-Replica"] == "r2"
    failed = client(Transport([ServerError("the replica serving this request died")])).post(
        "/v1/completions", json={"model": "a/b", "prompt": "x"}
    )
    assert failed.status_code == 500 and "died" in failed.json()["error"]["message"]


def test_a_stream_cut_by_the_transport_ends_with_an_error_event_and_done():
    script = [
        {"type": "start", "module": "a/b@1", "replica": "r1"},
        {"type": "text", "text": "he"},
        ServerError("the replica serving this request died; send the request again"),
    ]
    transport = Transport(script)
    with client(transport).stream("POST", "/v1/completions", json={"model": "a/b", "prompt": "x", "stream": True}) as answer:
        assert answer.headers["X-Tunehub-Replica"] == "r1"
        events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "he"
    assert "died" in json.loads(events[-2])["error"]["message"]
    assert transport.posted == [{"op": "cancel", "request_id": transport.payloads[-1]["request_id"]}]
