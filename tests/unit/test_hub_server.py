"""The hub server's protocol details, against an in-process server on a loopback port (fast)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tunehub.errors import ConfigError
from tunehub.registry.hub_server import (
    Caller,
    HubError,
    authorize,
    card_data,
    check_file_path,
    check_ref_name,
    check_repo_part,
    git_blob_oid,
    is_scoped_token_file,
    load_access,
    load_tokens,
    make_server,
    parse_access_yaml,
)

TOKEN = "unit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def hub(tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    with make_server(tmp_path / "root", port=0, token_file=tokens, max_body_bytes=256 * 1024) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client, server


def _commit(client: httpx.Client, repo: str, *lines: dict, rev: str = "main", parent: str | None = None) -> httpx.Response:
    header = {"summary": "test commit"}
    if parent:
        header["parentCommit"] = parent
    body = b"".join(json.dumps(x).encode() + b"\n" for x in ({"key": "header", "value": header}, *lines))
    return client.post(f"/api/models/{repo}/commit/{rev}", content=body, headers=AUTH)


def _file(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


def _new_repo(client: httpx.Client, repo: str = "acme/demo") -> str:
    namespace, name = repo.split("/")
    answer = client.post("/api/repos/create", json={"name": name, "organization": namespace}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return client.get(f"/api/models/{repo}/refs").json()["branches"][0]["targetCommit"]


def test_validators_and_helpers(tmp_path):
    assert git_blob_oid(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`
    for bad in ("", "../a", "/abs", "a//b", "a/./b", "a\\b", "a\x00b", ".git/config", "x" * 2000, None, 3):
        with pytest.raises(HubError):
            check_file_path(bad)
    assert check_file_path("dir/file.txt") == "dir/file.txt"
    for bad in ("..", "a..b", "-x", "x-", "a/b", "a b", "name.git", "", "x" * 97):
        with pytest.raises(HubError):
            check_repo_part(bad, "name")
    assert check_repo_part("Org_1.x", "name") == "Org_1.x"
    for bad in ("../x", "a..b", "x/", "x.lock", "a" * 40, "", "a b"):
        with pytest.raises(HubError):
            check_ref_name(bad)
    assert check_ref_name("refs/pr/1") == "refs/pr/1"
    assert card_data("---\nlibrary_name: peft\ntags: [a]\n---\n# x\n") == {"library_name": "peft", "tags": ["a"]}
    assert card_data("no front matter") is None and card_data("---\n[unclosed\n") is None
    (tmp_path / "t").write_text("# comment\n\n tok \n")
    assert load_tokens(tmp_path / "t") == frozenset({"tok"})
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ValueError):
        load_tokens(tmp_path / "empty")


def test_preupload_commit_tree_and_resolve_headers(hub):
    client, _ = hub
    initial = _new_repo(client)
    files = [
        {"path": "config.json", "size": 10, "sample": base64.b64encode(b'{"a": 1}').decode()},
        {"path": "w.safetensors", "size": 10, "sample": base64.b64encode(b"{}").decode()},
        {"path": "blob.dat", "size": 4, "sample": base64.b64encode(b"\x00\x01\x02\x03").decode()},
        {"path": "empty.txt", "size": 0, "sample": ""},
    ]
    modes = client.post("/api/models/acme/demo/preupload/main", json={"files": files}, headers=AUTH).json()["files"]
    assert [f["uploadMode"] for f in modes] == ["regular", "lfs", "lfs", "regular"]
    assert all("oid" not in f for f in modes)

    answer = _commit(client, "acme/demo", _file("config.json", b'{"a": 1}\n'), _file("sub/dir/notes.txt", b"hi"), parent=initial)
    assert answer.status_code == 200, answer.text
    head = answer.json()["commitOid"]
    assert answer.json()["commitUrl"].endswith(f"/acme/demo/commit/{head}")
    again = client.post("/api/models/acme/demo/preupload/main", json={"files": files[:1]}, headers=AUTH).json()
    assert again["files"][0]["oid"] == git_blob_oid(b'{"a": 1}\n')  # unchanged files can be skipped

    top = client.get("/api/models/acme/demo/tree/main").json()
    assert sorted((e["type"], e["path"]) for e in top) == [
        ("directory", "sub"),
        ("file", ".gitattributes"),
        ("file", "config.json"),
    ]
    deep = client.get("/api/models/acme/demo/tree/main", params={"recursive": "true"}).json()
    assert {e["path"] for e in deep} >= {"sub", "sub/dir", "sub/dir/notes.txt"}
    inside = client.get("/api/models/acme/demo/tree/main/sub%2Fdir").json()
    assert [e["path"] for e in inside] == ["sub/dir/notes.txt"]

    head_answer = client.head("/acme/demo/resolve/main/config.json")
    assert head_answer.status_code == 200
    assert head_answer.headers["X-Repo-Commit"] == head
    config_oid = git_blob_oid(b'{"a": 1}\n')
    assert head_answer.headers["ETag"] == f'"{config_oid}"'
    assert head_answer.headers["Content-Length"] == "9"
    assert client.get(f"/acme/demo/resolve/{head}/config.json").content == b'{"a": 1}\n'
    ranged = client.get("/acme/demo/resolve/main/config.json", headers={"Range": "bytes=2-4"})
    assert ranged.status_code == 206 and ranged.content == b'a":' and ranged.headers["Content-Range"] == "bytes 2-4/9"
    assert client.get("/acme/demo/resolve/main/config.json", headers={"Range": "bytes=50-"}).status_code == 416
    info = client.post("/api/models/acme/demo/paths-info/main", data={"paths": ["config.json", "sub", "nope"]}).json()
    assert [(i["type"], i["path"]) for i in info] == [("file", "config.json"), ("directory", "sub")]
    commits = client.get("/api/models/acme/demo/commits/main").json()
    assert [c["id"] for c in commits] == [head, initial]

    stale = _commit(client, "acme/demo", _file("x.txt", b"x"), parent=initial)
    assert stale.status_code == 412
    deleted = _commit(client, "acme/demo", {"key": "deletedFolder", "value": {"path": "sub/"}})
    assert deleted.status_code == 200
    assert "sub/dir/notes.txt" not in {e["path"] for e in client.get("/api/models/acme/demo/tree/main?recursive=1").json()}
    missing = _commit(client, "acme/demo", {"key": "deletedFile", "value": {"path": "nope.txt"}})
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


def test_lfs_upload_round_trip_and_signature(hub):
    client, _ = hub
    _new_repo(client)
    data = bytes(range(256)) * 40
    oid = hashlib.sha256(data).hexdigest()
    batch = client.post(
        "/acme/demo.git/info/lfs/objects/batch",
        headers=AUTH,
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
    ).json()
    action = batch["objects"][0]["actions"]
    wrong = client.put(action["upload"]["href"], content=data[:-1] + b"!")
    assert wrong.status_code == 400  # content that does not match its oid never enters the store
    assert client.put(action["upload"]["href"], content=data).status_code == 200
    assert client.post(action["verify"]["href"], json={"oid": oid, "size": len(data)}, headers=AUTH).status_code == 200
    again = client.post(
        "/acme/demo.git/info/lfs/objects/batch",
        headers=AUTH,
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
    ).json()
    assert "actions" not in again["objects"][0]  # already stored: nothing to upload
    tampered = action["upload"]["href"].replace(f"size={len(data)}", "size=1")
    assert client.put(tampered, content=b"x").status_code == 403
    lfs = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": oid, "size": len(data)}}
    assert _commit(client, "acme/demo", lfs).status_code == 200
    got = client.get("/acme/demo/resolve/main/w.safetensors")
    assert got.content == data and got.headers["ETag"] == f'"{oid}"'  # LFS files: the sha256
    entry = next(e for e in client.get("/api/models/acme/demo/tree/main").json() if e["path"] == "w.safetensors")
    assert entry["lfs"]["oid"] == oid and entry["size"] == len(data)
    too_big = client.post(
        "/acme/demo.git/info/lfs/objects/batch",
        headers=AUTH,
        json={"operation": "upload", "objects": [{"oid": "cd" * 32, "size": 10**9}]},
    ).json()
    assert too_big["objects"][0]["error"]["code"] == 413


def test_refs_listing_card_and_repo_lifecycle(hub):
    client, _ = hub
    _new_repo(client)
    card = b"---\nlibrary_name: peft\nbase_model: org/base\ntags: [tunehub, lora]\n---\n# demo\n"
    head = _commit(client, "acme/demo", _file("README.md", card)).json()["commitOid"]
    assert client.post("/api/models/acme/demo/tag/main", json={"tag": "v1"}, headers=AUTH).status_code == 200
    assert client.post("/api/models/acme/demo/tag/main", json={"tag": "v1"}, headers=AUTH).status_code == 409
    assert client.post("/api/models/acme/demo/branch/prod", json={"startingPoint": "v1"}, headers=AUTH).status_code == 200
    assert client.post("/api/models/acme/demo/branch/prod", json={}, headers=AUTH).status_code == 409
    missing = client.post("/api/models/acme/demo/branch/x", json={"startingPoint": "nope"}, headers=AUTH)
    assert missing.headers["X-Error-Code"] == "RevisionNotFound"
    refs = client.get("/api/models/acme/demo/refs").json()
    assert {b["name"]: b["targetCommit"] for b in refs["branches"]} == {"main": head, "prod": head}
    assert refs["tags"] == [{"name": "v1", "ref": "refs/tags/v1", "targetCommit": head}]
    assert _commit(client, "acme/demo", _file("a", b"a"), rev="v1").status_code == 400  # not a branch

    info = client.get("/api/models/acme/demo/revision/v1").json()
    assert info["sha"] == head and info["library_name"] == "peft"
    assert set(info["tags"]) >= {"tunehub", "lora", "peft", "base_model:org/base"}
    assert info["cardData"]["base_model"] == "org/base"
    _new_repo(client, "other/thing")
    assert [m["id"] for m in client.get("/api/models", params={"filter": "lora"}).json()] == ["acme/demo"]
    assert [m["id"] for m in client.get("/api/models", params={"author": "other"}).json()] == ["other/thing"]
    assert [m["id"] for m in client.get("/api/models", params={"search": "THI"}).json()] == ["other/thing"]
    assert client.post("/api/validate-yaml", json={"content": "---\n[bad\n---\n"}).status_code == 400
    assert client.post("/api/validate-yaml", json={"content": card.decode()}).json()["errors"] == []
    assert client.get("/api/whoami-v2", headers=AUTH).json()["type"] == "user"
    assert client.get("/api/whoami-v2").status_code == 401
    assert client.post("/api/models/acme/demo/preupload/main?create_pr=1", json={"files": []}, headers=AUTH).status_code == 400

    assert client.delete("/api/models/acme/demo/branch/prod", headers=AUTH).status_code == 200
    assert client.delete("/api/models/acme/demo/tag/v1", headers=AUTH).status_code == 200
    assert (
        client.request("DELETE", "/api/repos/delete", json={"name": "demo", "organization": "acme"}, headers=AUTH).status_code
        == 200
    )
    assert client.get("/api/models/acme/demo").headers["X-Error-Code"] == "RepoNotFound"
    assert client.get("/api/datasets/acme/demo").status_code == 404


def test_body_limit_and_keep_alive_after_errors(hub):
    client, server = hub
    _new_repo(client)
    limit = server.config.max_body_bytes
    for body in (b"x" * (limit + 1), iter([b"y" * limit, b"y"])):  # sized, then chunked
        refused = client.post("/api/models/acme/demo/commit/main", content=body, headers=AUTH)
        # the server closes after a refused body and says so, or the client's next request on this
        # connection races the close ("server disconnected without sending a response")
        assert refused.status_code == 413 and refused.headers.get("connection") == "close"
    # a refused write with a body does not poison the next request on a reused connection
    for _ in range(3):
        assert client.post("/api/repos/create", json={"name": "x", "organization": "acme"}).status_code == 401
        assert client.get("/api/models/acme/demo/refs").status_code == 200


def test_random_requests_never_get_a_server_error(hub):
    """Seeded junk over every route: always a 4xx with a JSON error, never a 500."""
    import random

    client, _ = hub
    _new_repo(client, "a/r")
    _commit(client, "a/r", _file("d/f.txt", b"hi"))
    rng = random.Random(7)
    pieces = [
        "a",
        "r",
        "..",
        "%2e%2e",
        "%2F",
        "%00",
        "%5C",
        "main",
        "v1",
        "x" * 300,
        "%ZZ",
        "refs%2Fheads%2Fmain",
        "",
        "~",
        "resolve",
        "tree",
        "api",
        "models",
        "commit",
        "preupload",
        "tag",
        "branch",
        "refs",
        "revision",
        "commits",
        "paths-info",
        "r.git",
        "info",
        "lfs",
        "objects",
        "batch",
        "verify",
        "ab" * 32,
        "0" * 40,
        "d",
        "f.txt",
        "d%2Ff.txt",
        "repos",
        "create",
        "delete",
        "validate-yaml",
    ]
    bodies = [
        b"",
        b"{}",
        b"[]",
        b"null",
        b"\xff\xfe",
        b'{"files": [{"path": 1}]}',
        b'{"files": [{"path": "a", "size": 1, "sample": 5}]}',
        b'{"name": null}',
        b'{"tag": 5}',
        b'{"startingPoint": 5}',
        b'{"operation": "upload", "objects": [{"oid": 1}]}',
        b'{"key":"header","value":{"summary":"s"}}\n{"key":"file","value":{"path":"p","content":5}}',
        b'{"key":"header","value":{"summary":"s"}}\n{"key":"deletedFolder","value":{"path":5}}',
        b'{"key":"header","value":[]}',
        b'{"paths": "x"}',
        b"paths=../x",
        b'{"content": 5}',
    ]
    queries = [
        "",
        "?recursive=1",
        "?cursor=-1",
        "?cursor=x",
        "?limit=99999999999999999999",
        "?create_pr=1",
        "?size=1&expires=1&sig=x",
        "?blobs=1&expand=1",
    ]
    for _ in range(600):
        path = "/" + "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))) + rng.choice(queries)
        method = rng.choice(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
        body = rng.choice(bodies) if method not in ("GET", "HEAD") else None
        answer = client.request(method, path, content=body, headers=AUTH if rng.random() < 0.8 else {})
        assert answer.status_code < 500, (method, path, answer.text)
        if answer.status_code >= 400 and method != "HEAD":
            assert "error" in answer.json(), (method, path)


# --- malformed requests: one 400 at the parsing boundary, never a 5xx -----------------------------
def _raw(server, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Send bytes exactly as given (httpx would encode or refuse them) and read until the server closes."""
    import socket

    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.setdefault(key.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def _request(method: str, target: bytes | str, *headers: bytes, body: bytes = b"", length: bool = True) -> bytes:
    target = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: x", b"Connection: close", *headers]
    if body and length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


AUTH_LINE = f"Authorization: Bearer {TOKEN}".encode()
NESTED = b"[" * 100_000  # json.loads raises RecursionError on it (was a 500)
HUGE_INT = b'{"files": [{"path": "a", "size": ' + b"1" * 5000 + b"}]}"  # json.loads raises a bare ValueError


def _ndjson_line(item: object) -> bytes:
    return json.dumps(item).encode() + b"\n"


COMMIT_HEADER = _ndjson_line({"key": "header", "value": {"summary": "s"}})

#: requests uvicorn's HTTP parser refuses while framing them (raw non-ASCII bytes in the target, a
#: malformed or conflicting Content-Length, a transfer coding other than chunked, a bad chunk size):
#: they never reach the hub, and get uvicorn's plain-text 400 instead of the hub's JSON body
FRAMING_ERRORS: set[bytes] = set()


def _framing(request: bytes) -> bytes:
    FRAMING_ERRORS.add(request)
    return request


# (request, exact status): every one of them was a 5xx, a silent misreading or a 401 before
HOSTILE = [
    # query parameters: numbers are ASCII digits of a sane size, strings valid percent-encoded UTF-8
    (_request("GET", "/api/models?limit=%C2%B2"), 400),  # '²': isdigit() True, int() raised
    (_request("GET", "/api/models?limit=" + "9" * 5000), 400),  # int() raised past 4300 digits
    (_request("GET", "/api/models?cursor=%EF%BC%91"), 400),  # full-width '１' read as 1
    (_request("GET", "/api/models/a/r/tree/main?cursor=%D9%A1"), 400),  # Arabic-Indic '١'
    (_request("GET", "/api/models/a/r/tree/main?cursor=+1"), 400),
    (_request("GET", "/api/models?search=%ZZ"), 400),  # bad percent-encoding was passed through
    (_request("GET", "/api/models?search=%FF"), 400),  # not UTF-8 once decoded: was replaced by U+FFFD
    (_request("GET", "/api/models/a/r/tree/main?expand="), 400),  # a flag that is neither true nor false
    (_request("GET", "/api/models/a/r/tree/main?recursive=maybe"), 400),
    (_request("PUT", f"/a/r.git/info/lfs/objects/{'ab' * 32}?size=%C2%B2&expires=1&sig=x", body=b"x"), 400),
    (_request("PUT", f"/a/r.git/info/lfs/objects/{'ab' * 32}?size=1&expires=1&sig=%C3%A9", body=b"x"), 403),
    # the request target itself
    (_request("GET", "/a/r/resolve/main/%FF.txt"), 400),
    (_framing(_request("GET", b"/a/r/resolve/main/\xc3\xa9.txt")), 400),  # raw non-ASCII bytes
    (_request("GET", "http://[x/api/models"), 400),  # absolute-form: urlsplit raised ValueError
    # framing headers
    (_framing(_request("POST", "/api/validate-yaml", b"Content-Length: \xb2", body=b"{}", length=False)), 400),
    (_framing(_request("POST", "/api/validate-yaml", b"Content-Length: -2", body=b"{}", length=False)), 400),
    (_framing(_request("POST", "/api/validate-yaml", b"Content-Length: 1_0", body=b"{}", length=False)), 400),
    (_framing(_request("POST", "/api/validate-yaml", b"Content-Length: 2", b"Content-Length: 3", body=b"{}", length=False)), 400),
    (_framing(_request("POST", "/api/validate-yaml", b"Content-Length: 2, 3", body=b"{}", length=False)), 400),
    (_framing(_request("POST", "/api/validate-yaml", b"Content-Length: " + b"9" * 40, body=b"{}", length=False)), 400),
    (
        _request(
            "POST",
            "/api/validate-yaml",
            b"Transfer-Encoding: chunked",
            b"Content-Length: 7",
            body=b"2\r\n{}\r\n0\r\n\r\n",
            length=False,
        ),
        400,
    ),
    (_framing(_request("POST", "/api/validate-yaml", b"Transfer-Encoding: gzip", body=b"{}", length=False)), 400),
    (
        _framing(
            _request("POST", "/api/validate-yaml", b"Transfer-Encoding: chunked", body=b"1_0\r\n{}\r\n0\r\n\r\n", length=False)
        ),
        400,
    ),
    # Range: malformed is 400, well-formed but outside the file stays 416
    (_request("GET", "/a/r/resolve/main/d/f.txt", b"Range: bytes=abc"), 400),
    (_request("GET", "/a/r/resolve/main/d/f.txt", b"Range: bytes=\xb2-"), 400),  # \d matched '²', int() raised
    (_request("GET", "/a/r/resolve/main/d/f.txt", b"Range: bytes=0-" + b"9" * 5000), 400),
    (_request("GET", "/a/r/resolve/main/d/f.txt", b"Range: bytes=0-0,1-1"), 400),
    (_request("GET", "/a/r/resolve/main/d/f.txt", b"Range: items=0-1"), 400),
    (_request("GET", "/a/r/resolve/main/d/f.txt", b"Range: bytes=0-0", b"Range: bytes=1-1"), 400),
    (_request("GET", "/a/r/resolve/main/d/f.txt", b"Range: bytes=9-"), 416),
    # Authorization that is not "Bearer <token>": 400 before any auth decision, reads and writes alike
    (_request("POST", "/api/repos/create", b"Authorization: Bearer", body=b'{"name": "a/x"}'), 400),
    (_request("POST", "/api/repos/create", b"Authorization: Bearer a b", body=b'{"name": "a/x"}'), 400),
    (_request("POST", "/api/repos/create", b"Authorization: Bearer t\xf6k", body=b'{"name": "a/x"}'), 400),
    (_request("GET", "/api/models/a/r", b"Authorization: "), 400),
    (_request("GET", "/api/models/a/r", AUTH_LINE, b"Authorization: Bearer other"), 400),
    # bodies: nesting, huge numbers and bad encodings are malformed JSON, not server errors
    (_request("POST", "/api/repos/create", AUTH_LINE, body=NESTED), 400),
    (_request("POST", "/api/validate-yaml", body=NESTED), 400),  # no token needed to be told it is malformed
    (_request("POST", "/api/models/a/r/preupload/main", AUTH_LINE, body=HUGE_INT), 400),
    (_request("POST", "/api/models/a/r/paths-info/main", b"Content-Type: application/json", body=NESTED), 400),
    (
        _request(
            "POST", "/api/models/a/r/paths-info/main", b"Content-Type: application/x-www-form-urlencoded", body=b"paths=%FF"
        ),
        400,
    ),
    (_request("POST", "/a/r.git/info/lfs/objects/batch", AUTH_LINE, body=NESTED), 400),
    (_request("POST", "/api/models/a/r/commit/main", AUTH_LINE, body=COMMIT_HEADER + NESTED + b"\n"), 400),
    (_request("POST", "/api/models/a/r/commit/main", AUTH_LINE, body=NESTED + b"\n"), 400),
    (
        _request("POST", "/api/validate-yaml", body=json.dumps({"content": "---\n" + "[" * 5000 + "\n---\n"}).encode()),
        400,
    ),  # PyYAML raised RecursionError
    # methods the stdlib does not know were a 501
    (_request("FOO", "/api/models"), 405),
]


@pytest.mark.parametrize("request_bytes, status", HOSTILE, ids=[f"{i}" for i in range(len(HOSTILE))])
def test_malformed_requests_get_a_hub_shaped_400(hub, request_bytes, status):
    client, server = hub
    _new_repo(client, "a/r")
    _commit(client, "a/r", _file("d/f.txt", b"hi"))
    got, _, body = _raw(server, request_bytes)
    assert got == status, body[:300]
    if request_bytes not in FRAMING_ERRORS:  # uvicorn's own 400 is plain text
        assert isinstance(json.loads(body)["error"], str)
    assert client.get("/api/models/a/r/refs").status_code == 200  # and the server still serves


def test_a_stalled_body_gets_a_408_and_the_server_keeps_serving(hub, monkeypatch):
    import socket

    from tunehub.registry import hub_server

    monkeypatch.setattr(hub_server, "_BODY_IDLE_TIMEOUT_S", 0.5)
    client, server = hub
    with socket.create_connection(server.server_address, timeout=10) as sock:
        sock.sendall(b'POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"con')
        data = b""
        while chunk := sock.recv(65536):  # the server answers, then closes
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    assert "stalled" in json.loads(body)["error"]
    assert client.get("/api/models").status_code == 200


def test_error_messages_cannot_inject_headers(hub):
    client, server = hub
    _new_repo(client, "a/r")
    got, headers, body = _raw(server, _request("GET", "/api/models/a/r/revision/x%0D%0ASet-Cookie:%20a=b"))
    assert got == 404 and "set-cookie" not in headers
    assert json.loads(body)["error"] == "Invalid rev id: x\r\nSet-Cookie: a=b"  # the JSON body keeps it, escaped


def test_card_metadata_of_any_shape_never_breaks_model_info(hub):
    client, _ = hub
    _new_repo(client, "a/r")
    for card in ("---\ntags: 5\nbase_model: 7\n---\n", "---\n" + "[" * 5000 + "\n---\n", "---\ntags: {a: 1}\n---\n"):
        assert _commit(client, "a/r", _file("README.md", card.encode())).status_code == 200
        info = client.get("/api/models/a/r")
        assert info.status_code == 200, info.text
        assert client.get("/api/models", params={"full": "true"}).status_code == 200


def test_hostile_corpus_over_one_server_then_a_good_request(hub):
    """Every hostile request in a row on one server: none gets a 5xx, and it still answers."""
    client, server = hub
    _new_repo(client, "a/r")
    _commit(client, "a/r", _file("d/f.txt", b"hi"))
    for request_bytes, _ in HOSTILE:
        got, _, body = _raw(server, request_bytes)
        assert 400 <= got < 500, (request_bytes[:80], body[:200])
    assert client.get("/a/r/resolve/main/d/f.txt").content == b"hi"


def test_every_name_check_repo_part_accepts_is_a_valid_hub_repo_name():
    import itertools

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    corpus = ["".join(c) for n in range(1, 5) for c in itertools.product("aA0._-", repeat=n)]
    corpus += ["x" * 96, "x" * 97, "x.git", "X.GIT", "x.gitx", "_x", "x_"]
    accepted = 0
    for name in corpus:
        try:
            check_repo_part(name, "name")
        except HubError:
            continue
        accepted += 1
        try:
            validate_repo_id(f"{name}/{name}")
        except HFValidationError as exc:
            pytest.fail(f"the hub server accepts {name!r} but huggingface_hub refuses it: {exc}")
    assert accepted > 100


# --- scoped tokens, private namespaces, the audit log ----------------------------------------------
SCOPED = {"ci-acme": "tok-ci-acme", "ops": "tok-ops", "auditor": "tok-auditor"}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SCOPED[name]}"}


SCOPED_YAML = f"""\
# who may do what on this hub
anonymous:
  "*": read
  secret: none
tokens:
  - name: ci-acme
    sha256: {_sha(SCOPED["ci-acme"])}
    access: {{"acme/*": write, "*": read}}
  - name: ops
    sha256: {_sha(SCOPED["ops"])}
    access: {{"*": write}}
    admin: true
  - name: auditor
    sha256: "sha256:{_sha(SCOPED["auditor"]).upper()}"
    access: {{"secret": read}}
"""


@pytest.fixture
def scoped(tmp_path: Path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(SCOPED_YAML)
    with make_server(tmp_path / "root", port=0, token_file=tokens, max_body_bytes=256 * 1024) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for repo in ("acme/demo", "other/thing", "secret/plans"):
                namespace, name = repo.split("/")
                made = client.post("/api/repos/create", json={"name": name, "organization": namespace}, headers=_bearer("ops"))
                assert made.status_code == 200, made.text
            yield client, server


def _scoped_commit(client: httpx.Client, repo: str, who: str | None, path: str = "a.txt") -> httpx.Response:
    header = {"key": "header", "value": {"summary": "scoped"}}
    body = b"".join(json.dumps(x).encode() + b"\n" for x in (header, _file(path, b"data")))
    return client.post(f"/api/models/{repo}/commit/main", content=body, headers=_bearer(who) if who else {})


def _audit(server) -> list[dict]:
    path = server.storage.root / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_scoped_token_writes_only_in_its_namespaces(scoped):
    client, _ = scoped
    assert _scoped_commit(client, "acme/demo", "ci-acme").status_code == 200
    refused = [
        _scoped_commit(client, "other/thing", "ci-acme"),
        client.post("/api/repos/create", json={"name": "new", "organization": "other"}, headers=_bearer("ci-acme")),
        client.post("/api/models/other/thing/tag/main", json={"tag": "v1"}, headers=_bearer("ci-acme")),
        client.post("/api/models/other/thing/branch/dev", json={}, headers=_bearer("ci-acme")),
        client.delete("/api/models/other/thing/branch/dev", headers=_bearer("ci-acme")),
        client.post("/api/models/other/thing/preupload/main", json={"files": []}, headers=_bearer("ci-acme")),
        client.post(
            "/other/thing.git/info/lfs/objects/batch", json={"operation": "upload", "objects": []}, headers=_bearer("ci-acme")
        ),
    ]
    for answer in refused:
        assert answer.status_code == 403, answer.text
        assert "'other'" in answer.json()["error"] and "ci-acme" in answer.json()["error"]
    # a namespace it may not even read: a write there is a 404 like a missing repo, or a 403 to create
    hidden = _scoped_commit(client, "secret/plans", None)
    assert hidden.status_code == 404 and hidden.headers["X-Error-Code"] == "RepoNotFound"
    assert _scoped_commit(client, "secret/plans", "ci-acme").status_code == 403  # "*": read covers secret
    assert _scoped_commit(client, "secret/plans", "auditor").status_code == 403  # read only
    # anonymous writes need a token (401, as with the line format), unknown tokens are a 401
    assert _scoped_commit(client, "acme/demo", None).status_code == 401
    assert (
        client.post("/api/models/acme/demo/tag/main", json={"tag": "x"}, headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    assert client.get("/api/models/acme/demo", headers={"Authorization": "Bearer nope"}).status_code == 401
    # deleting needs an admin token, even in the token's own namespace
    delete = {"name": "demo", "organization": "acme"}
    assert client.request("DELETE", "/api/repos/delete", json=delete, headers=_bearer("ci-acme")).status_code == 403
    assert client.request("DELETE", "/api/repos/delete", json=delete).status_code == 401
    assert client.get("/api/models/acme/demo").status_code == 200  # still there
    assert client.request("DELETE", "/api/repos/delete", json=delete, headers=_bearer("ops")).status_code == 200
    assert client.get("/api/models/acme/demo").headers["X-Error-Code"] == "RepoNotFound"
    assert [client.get("/api/whoami-v2", headers=_bearer(n)).json()["name"] for n in SCOPED] == list(SCOPED)


def test_a_private_namespace_is_a_404_exactly_like_a_missing_repo(scoped):
    client, _ = scoped
    assert _scoped_commit(client, "secret/plans", "ops").status_code == 200
    routes = [
        ("GET", "/api/models/{}"),
        ("GET", "/api/models/{}/revision/main"),
        ("GET", "/api/models/{}/refs"),
        ("GET", "/api/models/{}/tree/main"),
        ("GET", "/api/models/{}/commits/main"),
        ("POST", "/api/models/{}/paths-info/main"),
        ("GET", "/{}/resolve/main/a.txt"),
        ("HEAD", "/{}/resolve/main/a.txt"),
    ]
    for method, route in routes:
        hidden = client.request(method, route.format("secret/plans"))
        missing = client.request(method, route.format("secret/nothing"))
        assert hidden.status_code == missing.status_code == 404, (route, hidden.text)
        assert hidden.headers["X-Error-Code"] == missing.headers["X-Error-Code"] == "RepoNotFound"
        assert hidden.content == missing.content.replace(b"secret/nothing", b"secret/plans")
        assert hidden.headers["X-Error-Message"] == missing.headers["X-Error-Message"].replace("nothing", "plans")
        for who in ("auditor", "ci-acme", "ops"):  # tokens with read access see it
            assert client.request(method, route.format("secret/plans"), headers=_bearer(who)).status_code == 200, (route, who)
    assert client.get("/secret/plans/resolve/main/a.txt", headers=_bearer("auditor")).content == b"data"
    listed = {
        who: {m["id"] for m in client.get("/api/models", headers=_bearer(who) if who else {}).json()} for who in (None, *SCOPED)
    }
    assert listed[None] == {"acme/demo", "other/thing"}
    assert listed["ci-acme"] == listed["ops"] == listed["auditor"] == {"acme/demo", "other/thing", "secret/plans"}
    assert client.get("/api/models", params={"author": "secret"}).json() == []


def test_the_audit_log_holds_one_line_per_accepted_write(scoped):
    client, server = scoped
    data = bytes(range(256)) * 4
    oid = hashlib.sha256(data).hexdigest()
    batch = client.post(
        "/acme/demo.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
        headers=_bearer("ci-acme"),
    )
    upload = batch.json()["objects"][0]["actions"]["upload"]["href"]
    assert client.put(upload, content=data).status_code == 200  # signed URL, no Authorization
    lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}}
    body = b"".join(json.dumps(x).encode() + b"\n" for x in ({"key": "header", "value": {"summary": "w"}}, lfs))
    head = client.post("/api/models/acme/demo/commit/main", content=body, headers=_bearer("ci-acme")).json()["commitOid"]
    assert client.post("/api/models/acme/demo/tag/main", json={"tag": "v1"}, headers=_bearer("ci-acme")).status_code == 200
    assert client.post("/api/models/acme/demo/branch/prod", json={}, headers=_bearer("ci-acme")).status_code == 200
    assert client.delete("/api/models/acme/demo/branch/prod", headers=_bearer("ci-acme")).status_code == 200
    assert client.delete("/api/models/acme/demo/tag/v1", headers=_bearer("ops")).status_code == 200
    # refused writes leave no line: wrong namespace, no admin, no token, a stale parent, a taken tag
    assert _scoped_commit(client, "other/thing", "ci-acme").status_code == 403
    assert (
        client.request(
            "DELETE", "/api/repos/delete", json={"name": "thing", "organization": "other"}, headers=_bearer("ci-acme")
        ).status_code
        == 403
    )
    assert _scoped_commit(client, "acme/demo", None).status_code == 401
    stale = {"key": "header", "value": {"summary": "s", "parentCommit": "0" * 40}}
    body = b"".join(json.dumps(x).encode() + b"\n" for x in (stale, _file("s.txt", b"s")))
    assert client.post("/api/models/acme/demo/commit/main", content=body, headers=_bearer("ci-acme")).status_code == 412
    assert (
        client.post("/api/repos/create", json={"name": "demo", "organization": "acme"}, headers=_bearer("ops")).status_code == 409
    )
    assert (
        client.request(
            "DELETE", "/api/repos/delete", json={"name": "thing", "organization": "other"}, headers=_bearer("ops")
        ).status_code
        == 200
    )

    lines = _audit(server)
    assert [(r["who"], r["action"], r["repo"]) for r in lines] == [
        ("ops", "create_repo", "acme/demo"),
        ("ops", "create_repo", "other/thing"),
        ("ops", "create_repo", "secret/plans"),
        ("ci-acme", "lfs_upload", "acme/demo"),
        ("ci-acme", "commit", "acme/demo"),
        ("ci-acme", "create_tag", "acme/demo"),
        ("ci-acme", "create_branch", "acme/demo"),
        ("ci-acme", "delete_branch", "acme/demo"),
        ("ops", "delete_tag", "acme/demo"),
        ("ops", "delete_repo", "other/thing"),
    ]
    assert lines[3]["oid"] == oid and lines[3]["size"] == len(data)
    assert lines[4]["commit"] == head and lines[4]["revision"] == "main"
    assert lines[5]["revision"] == "v1" and lines[5]["commit"] == head
    assert all(r["time"].endswith("Z") and "T" in r["time"] for r in lines)


def test_the_audit_log_is_whole_under_concurrent_writes(scoped):
    from concurrent.futures import ThreadPoolExecutor

    client, server = scoped
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: client.post("/api/models/acme/demo/tag/main", json={"tag": f"t{i}"}, headers=_bearer("ci-acme")),
                range(40),
            )
        )
    assert all(a.status_code == 200 for a in answers)
    tags = [r["revision"] for r in _audit(server) if r["action"] == "create_tag"]  # every line parses
    assert sorted(tags) == sorted(f"t{i}" for i in range(40))


def test_the_line_format_still_gives_every_token_write_and_admin(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# a comment\nfirst-token\nsecond-token\n")
    policy = load_access(tokens)
    assert policy.anonymous.level("any") == 1 and all(e.grant.level("x") == 2 and e.grant.admin for e in policy.tokens.values())
    assert policy.identify("second-token").name == "user-" + _sha("second-token")[:8]
    assert policy.identify("third") is None


def _problems(text: str) -> str:
    with pytest.raises(ConfigError) as refused:
        parse_access_yaml(text, "t.yaml")
    return str(refused.value)


def test_a_malformed_token_file_is_refused_with_its_line(tmp_path):
    good = _sha("x")
    assert "t.yaml line 4: tokens[0] (a): unknown key 'adimn'" in _problems(
        f"tokens:\n  - name: a\n    sha256: {good}\n    adimn: true\n    access: {{}}\n"
    )
    assert "line 1: unknown key 'token'" in _problems("token: []\n")
    assert "line 2: anonymous: level of 'x' must be one of none, read, write" in _problems("anonymous:\n  x: admin\ntokens: []\n")
    assert "line 3: tokens[0] (a): sha256 must be 64 hex digits" in _problems(
        "tokens:\n  - name: a\n    sha256: not-hex\n    access: {}\n"
    )
    assert "line 3: tokens[0] (a): sha256 must be 64 hex digits" in _problems(
        "tokens:\n  - name: a\n    sha256: my-token\n    access: {}\n"
    )
    duplicate_name = (
        f"tokens:\n  - {{name: a, sha256: {good}, access: {{}}}}\n  - {{name: a, sha256: {_sha('y')}, access: {{}}}}\n"
    )
    assert "line 3: tokens[1] (a): the name 'a' is used by another token" in _problems(duplicate_name)
    duplicate_hash = (
        f"tokens:\n  - {{name: a, sha256: {good}, access: {{}}}}\n  - {{name: b, sha256: {good.upper()}, access: {{}}}}\n"
    )
    assert "line 3: tokens[1] (b): the same sha256 as token 'a'" in _problems(duplicate_hash)
    assert "invalid pattern 'a/b'" in _problems(f"tokens:\n  - {{name: a, sha256: {good}, access: {{a/b: read}}}}\n")
    assert "names the same namespace" in _problems(f"tokens:\n  - {{name: a, sha256: {good}, access: {{a: read, a/*: write}}}}\n")
    assert "missing 'access'" in _problems(f"tokens:\n  - {{name: a, sha256: {good}}}\n")
    assert "admin must be true or false" in _problems(f"tokens:\n  - {{name: a, sha256: {good}, access: {{}}, admin: 'yes'}}\n")
    assert "'anonymous' is given twice" in _problems("anonymous: {}\nanonymous: {}\ntokens: []\n")
    assert "invalid name" in _problems(f"tokens:\n  - {{name: anonymous, sha256: {good}, access: {{}}}}\n")
    assert "invalid YAML" in _problems("tokens: [\n")
    assert "2 problems" in _problems("anonymous: {x: all}\nfoo: 1\ntokens: []\n")  # every problem at once
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokens:\n  - name: a\n    sha256: nothex\n    access: {}\n")
    with pytest.raises(ConfigError, match="bad.yaml line 3"):
        make_server(tmp_path / "root", port=0, token_file=bad)
    # the CLI exits at startup with that message on one line
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunehub.sdk.cli",
            "hub",
            "serve",
            "--root",
            str(tmp_path / "root"),
            "--port",
            "0",
            "--token-file",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode == 2 and proc.stderr.startswith("error: ") and "bad.yaml line 3: tokens[0] (a): sha256" in proc.stderr
    ), proc.stderr
    # every problem of the file on that line, each with its line
    two = tmp_path / "tokens.yaml"
    two.write_text("tokens:\n  - name: ci\n    sha256: abc\n    access: {acme: owner}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tunehub.sdk.cli", "hub", "serve", "--root", str(tmp_path / "root"), "--port", "0"]
        + ["--token-file", str(two)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "tokens.yaml line 3: tokens[0] (ci): sha256 must be 64 hex digits" in proc.stderr
    assert "tokens.yaml line 4: tokens[0] (ci) access: level of 'acme' must be one of none, read, write" in proc.stderr


def test_scopes_resolve_the_most_specific_pattern_and_never_below_anonymous():
    policy = parse_access_yaml(SCOPED_YAML)
    ci = policy.identify(SCOPED["ci-acme"])
    assert ci is not None and (ci.grant.level("acme"), ci.grant.level("other"), ci.grant.level("secret")) == (2, 1, 1)
    auditor = policy.identify(SCOPED["auditor"])  # its hash was written upper-case with a sha256: prefix
    assert auditor is not None and (auditor.grant.level("secret"), auditor.grant.level("acme")) == (1, 1)
    assert (policy.anonymous.level("secret"), policy.anonymous.level("acme")) == (0, 1)
    assert not is_scoped_token_file("# tokens\nplain-token\n") and is_scoped_token_file("# x\ntokens:\n  - {}\n")
    caller = Caller("ci-acme", ci.grant, has_token=True)
    authorize(caller, "acme", "demo", 2)
    with pytest.raises(HubError) as refused:
        authorize(caller, "other", "demo", 2)
    assert refused.value.status == 403
    with pytest.raises(HubError) as hidden:
        authorize(Caller("anonymous", policy.anonymous, has_token=False), "secret", "plans", 1)
    assert (hidden.value.status, hidden.value.code, hidden.value.message) == (
        404,
        "RepoNotFound",
        "Repository not found",  # the Hub's words: nothing names the repo, hidden or missing
    )
