"""The hub behaves like the Hugging Face Hub where huggingface_hub's own repo-level tests look
(#15 item 4): each test drives the real client (``HfApi``, ``hf_hub_download``) against an
in-process hub. ``benchmarks/hub_conformance.py`` runs the client's own test suite the same way."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tunehub.registry.hub_server import make_server, parse_gitignore, validate_card

TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "ops": "tok-ops", "auditor": "tok-auditor", "carol": "tok-carol"}
USER = "__dummy_user__"  # the Hub's CI user starts with an underscore; so may ours
TOKENS[USER] = "tok-dummy"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


ACCESS = f"""\
anonymous:
  "*": read
  secret: none
tokens:
  - name: alice
    sha256: {_sha(TOKENS["alice"])}
    access: {{alice: write, "*": read}}
    admin: true
  - name: bob
    sha256: {_sha(TOKENS["bob"])}
    access: {{bob: write, "*": read}}
  - name: ops
    sha256: {_sha(TOKENS["ops"])}
    access: {{"*": write}}
    admin: true
  - name: auditor
    sha256: {_sha(TOKENS["auditor"])}
    access: {{secret: read}}
  - name: carol
    sha256: {_sha(TOKENS["carol"])}
    access: {{carol: write}}
  - name: "{USER}"
    sha256: {_sha(TOKENS[USER])}
    access: {{"{USER}": write}}
    admin: true
"""


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # this hub speaks classic LFS
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(ACCESS)
    with make_server(tmp_path / "root", port=0, token_file=tokens) as server:
        yield server


def _api(hub: Any, who: str | None = "alice") -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKENS[who] if who else False)


def _download(hub: Any, repo_id: str, filename: str, tmp_path: Path, who: str | None = "alice", **kwargs: Any) -> bytes:
    token = TOKENS[who] if who else False
    path = hf_hub_download(repo_id, filename, endpoint=hub.url, token=token, cache_dir=tmp_path / "dl", **kwargs)
    return Path(path).read_bytes()


def test_create_and_delete_without_a_namespace_use_the_callers(hub):
    api = _api(hub)
    url = api.create_repo("demo")
    assert url.repo_id == "alice/demo" and api.repo_exists("alice/demo")
    assert _api(hub, USER).create_repo("repo-x").repo_id == f"{USER}/repo-x"  # a leading '_' is a valid namespace
    api.delete_repo("demo")
    assert not api.repo_exists("alice/demo")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("demo")
    api.delete_repo("demo", missing_ok=True)


def test_a_missing_repo_is_repo_not_found_on_every_route(hub, tmp_path):
    api = _api(hub)
    api.create_repo("alice/there")
    assert api.repo_exists("alice/there")
    assert not api.repo_exists("nope") and not api.repo_exists("alice/nope")
    assert not api.revision_exists("nope", "main") and not api.revision_exists("alice/nope", "main")
    assert not api.file_exists("nope", "a.txt") and not api.file_exists("alice/nope", "a.txt")
    assert not api.revision_exists("alice/there", "nope") and not api.file_exists("alice/there", "nope.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.auth_check("alice/nope")
    api.auth_check("alice/there")
    for route in (
        "/api/models/nope",
        "/api/models/nope/revision/main",
        "/api/models/alice/nope/anything",
        "/nope/resolve/main/x",
    ):
        answer = httpx.get(hub.url + route)
        assert (answer.status_code, answer.headers.get("X-Error-Code")) == (404, "RepoNotFound"), route


def test_private_repos_are_private(hub, tmp_path):
    alice = _api(hub)
    alice.create_repo("alice/hidden", private=True)
    alice.upload_file(repo_id="alice/hidden", path_in_repo="a.txt", path_or_fileobj=b"secret data")
    alice.create_repo("alice/shown", visibility="public")
    assert alice.model_info("alice/hidden").private is True
    assert alice.model_info("alice/shown").private is False
    assert _api(hub, "bob").model_info("alice/hidden").private is True  # a token with read access
    assert _download(hub, "alice/hidden", "a.txt", tmp_path, who="bob") == b"secret data"
    anonymous = _api(hub, None)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("alice/hidden")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, "alice/hidden", "a.txt", tmp_path / "anonymous", who=None)  # its own cache
    assert not anonymous.repo_exists("alice/hidden") and anonymous.repo_exists("alice/shown")
    assert {m.id for m in anonymous.list_models(author="alice")} == {"alice/shown"}
    assert {m.id for m in _api(hub, "bob").list_models(author="alice")} == {"alice/hidden", "alice/shown"}
    # a private repo where a token may not read: the 404 of a missing repo, for it and for anonymous
    _api(hub, "ops").create_repo("secret/plans", private=True)
    assert _api(hub, "auditor").model_info("secret/plans").private is True
    hidden = httpx.get(f"{hub.url}/api/models/secret/plans", headers={"Authorization": f"Bearer {TOKENS['carol']}"})
    missing = httpx.get(f"{hub.url}/api/models/secret/nothing", headers={"Authorization": f"Bearer {TOKENS['carol']}"})
    assert hidden.status_code == missing.status_code == 404 and hidden.content == missing.content
    # anonymous never reads a private repo, even where anonymous may read everything
    anonymous_hidden = httpx.get(f"{hub.url}/api/models/alice/hidden")
    assert anonymous_hidden.status_code == 404 and anonymous_hidden.content == httpx.get(f"{hub.url}/api/models/alice/x").content
    odd = httpx.post(
        f"{hub.url}/api/repos/create",
        json={"name": "odd", "organization": "alice", "visibility": "protected"},
        headers={"Authorization": f"Bearer {TOKENS['alice']}"},
    )
    assert odd.status_code == 400 and not alice.repo_exists("alice/odd")  # never created public instead


def test_every_answer_carries_a_request_id(hub):
    ok = httpx.get(f"{hub.url}/api/models")
    missing = httpx.get(f"{hub.url}/api/models/alice/nope")
    ids = [ok.headers.get("X-Request-Id"), missing.headers.get("X-Request-Id")]
    assert all(ids) and ids[0] != ids[1]
    with pytest.raises(RepositoryNotFoundError) as raised:
        _api(hub).create_commit("alice/nope", [CommitOperationAdd("a.txt", b"x")], commit_message="x")
    request_id = raised.value.response.headers["X-Request-Id"]
    assert str(raised.value).startswith(f"404 Client Error. (Request ID: {request_id})\n\nRepository Not Found for url:")
    assert "Repository not found" not in str(raised.value)  # the Hub's words: the client says it already


def test_preupload_honours_the_gitignore(hub, tmp_path):
    api = _api(hub)
    api.create_repo("alice/ignore")
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "nested" / "file.bin").write_bytes(b"x" * 100)
    (folder / "keep.txt").write_text("keep")
    api.upload_file(repo_id="alice/ignore", path_in_repo=".gitignore", path_or_fileobj=b"nested/*\n")
    api.upload_folder(repo_id="alice/ignore", folder_path=folder)
    assert set(api.list_repo_files("alice/ignore")) == {".gitattributes", ".gitignore", "keep.txt"}
    # a .gitignore in the same commit applies to it (the client sends it with the preupload)
    api.create_repo("alice/ignore2")
    (folder / ".gitignore").write_text("*.bin\n!keep.bin\n")
    (folder / "keep.bin").write_bytes(b"k")
    api.upload_folder(repo_id="alice/ignore2", folder_path=folder)
    assert set(api.list_repo_files("alice/ignore2")) == {".gitattributes", ".gitignore", "keep.txt", "keep.bin"}


def test_gitignore_rules():
    ignored = parse_gitignore("# comment\n*.log\n!keep.log\nbuild/\n/top.txt\ndocs/**/draft*\n\\#hash\n")
    assert ignored("a.log") and ignored("deep/a.log") and not ignored("keep.log")
    assert ignored("build/x.txt") and ignored("src/build/x.txt") and not ignored("build")  # build/ is for folders
    assert ignored("top.txt") and not ignored("sub/top.txt")
    assert ignored("docs/draft1.md") and ignored("docs/a/b/draft.md") and not ignored("docs/final.md")
    assert ignored("#hash") and not ignored(".gitignore")
    assert not parse_gitignore("")("anything")


def test_validate_yaml_refuses_invalid_metadata_and_warns_on_none(hub):
    api = _api(hub)
    api.create_repo("alice/cards")
    invalid = b"\n---\nmodel-index: foo\n---\n\nA card.\n"
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.create_commit("alice/cards", [CommitOperationAdd("README.md", invalid)], commit_message="card")
    with pytest.warns(UserWarning, match="Warnings while validating metadata in README.md"):
        api.create_commit("alice/cards", [CommitOperationAdd("README.md", b"No metadata.")], commit_message="card")
    good = b"---\nlicense: mit\ntags: [a, b]\nmodel-index:\n- name: m\n  results:\n  - task: {type: text-generation}\n---\n"
    api.create_commit("alice/cards", [CommitOperationAdd("README.md", good)], commit_message="card")
    assert validate_card("---\nlicense: 3\nlibrary_name: [x]\n---\n")[0] == [
        '"library_name" must be a string',
        '"license" must be a string or an array of strings',
    ]
    assert validate_card("---\n[unclosed\n---\n")[0]  # broken YAML is an error too


def test_expand_gives_each_path_its_last_commit(hub):
    api = _api(hub)
    api.create_repo("alice/history")
    ops = [CommitOperationAdd(p, b"v1") for p in ("a.txt", "b.bin", "dir/c.txt", "dir/d.txt", "other/e.txt")]
    api.create_commit("alice/history", ops, commit_message="first")
    api.create_commit(
        "alice/history",
        [CommitOperationAdd("b.bin", b"v2"), CommitOperationAdd("dir/c.txt", b"v2")],
        commit_message="second",
    )
    paths = ["a.txt", "b.bin", "dir", "dir/d.txt", "other", ".gitattributes"]
    titles = {i.path: i.last_commit.title for i in api.get_paths_info("alice/history", paths, expand=True)}
    assert titles == {
        "a.txt": "first",
        "b.bin": "second",
        "dir": "second",
        "dir/d.txt": "first",
        "other": "first",
        ".gitattributes": "initial commit",
    }
    tree = {i.path: i.last_commit.title for i in api.list_repo_tree("alice/history", expand=True)}
    assert tree["a.txt"] == "first" and tree["dir"] == "second" and tree["b.bin"] == "second"
    assert all(i.last_commit is None for i in api.list_repo_tree("alice/history"))


def test_deleting_folders_in_a_commit(hub, tmp_path):
    api = _api(hub)
    api.create_repo("alice/folders")
    ops = [CommitOperationAdd(p, b"data") for p in ("1/a.md", "1/b.md", "2/c.md", "3/d.md")]
    api.create_commit("alice/folders", ops, commit_message="init")
    api.create_commit("alice/folders", [CommitOperationDelete("1/")], commit_message="explicit")
    api.create_commit("alice/folders", [CommitOperationDelete("2")], commit_message="implicit: a folder's path")
    api.delete_folder("3", repo_id="alice/folders")
    assert set(api.list_repo_files("alice/folders")) == {".gitattributes"}
    with pytest.raises(EntryNotFoundError):
        _download(hub, "alice/folders", "1/a.md", tmp_path)
    with pytest.raises(EntryNotFoundError):
        api.create_commit("alice/folders", [CommitOperationDelete("nothing/")], commit_message="missing")


def test_repo_ids_are_case_insensitive(hub, tmp_path):
    api = _api(hub)
    api.create_repo("alice/CaSe-Repo")
    api.create_commit("alice/case-repo", [CommitOperationAdd("a.txt", b"one")], commit_message="lower-case id")
    assert api.model_info("ALICE/CASE-REPO").id == "alice/CaSe-Repo"
    assert _download(hub, "Alice/case-REPO", "a.txt", tmp_path) == b"one"
    with pytest.raises(HfHubHTTPError) as taken:
        api.create_repo("alice/case-repo")
    assert taken.value.response.status_code == 409
    assert api.create_repo("alice/case-repo", exist_ok=True).repo_id == "alice/CaSe-Repo"  # the 409 names it
    assert [m.id for m in api.list_models(author="alice")] == ["alice/CaSe-Repo"]  # one repo
    # access follows the namespace as stored: anonymous may not read 'secret', in any case
    _api(hub, "ops").create_repo("secret/plans")
    for spelling in ("secret/plans", "SECRET/plans", "Secret/PLANS"):
        assert httpx.get(f"{hub.url}/api/models/{spelling}").headers["X-Error-Code"] == "RepoNotFound"
        assert _api(hub, "auditor").model_info(spelling).id == "secret/plans"
    # a new namespace spelled in another case joins the existing one
    assert _api(hub, "ops").create_repo("SECRET/more").repo_id == "secret/more"


def test_a_branch_may_share_a_tag_name_and_refs_use_the_hubs_texts(hub):
    api = _api(hub)
    api.create_repo("alice/refs")
    first = api.model_info("alice/refs").sha
    api.create_tag("alice/refs", tag="v1")
    second = api.create_commit("alice/refs", [CommitOperationAdd("a.txt", b"x")], commit_message="two").oid
    api.create_branch("alice/refs", branch="v1")  # same name as the tag
    refs = api.list_repo_refs("alice/refs")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "v1": second}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first}
    assert api.model_info("alice/refs", revision="v1").sha == second  # branches resolve first
    with pytest.raises(HfHubHTTPError, match=r"Reference refs/heads/v1 already exists"):
        api.create_branch("alice/refs", branch="v1")
    with pytest.raises(HfHubHTTPError, match="Cannot delete refs/heads/main"):
        api.delete_branch("alice/refs", branch="main")
    with pytest.raises(RevisionNotFoundError):
        api.create_tag("alice/refs", tag="invalid tag", revision="missing")  # the revision first, as on the Hub
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit("alice/refs", [CommitOperationAdd("b.txt", b"y")], commit_message="x", parent_commit=first)
    assert stale.value.response.status_code == 412
    assert "The branch was updated since you opened this page. Please refresh and try again." in str(stale.value)
    with pytest.raises(HfHubHTTPError) as bad_path:
        api.upload_file(repo_id="alice/refs", path_in_repo="..\\ddd", path_or_fileobj=b"x")
    assert bad_path.value.response.status_code == 422


def test_short_commit_ids_resolve(hub, tmp_path):
    api = _api(hub)
    api.create_repo("alice/short")
    sha = api.create_commit("alice/short", [CommitOperationAdd("a.txt", b"x")], commit_message="c").oid
    assert api.model_info("alice/short", revision=sha[:7]).sha == sha
    assert api.model_info("alice/short", revision=sha[:12]).sha == sha
    api.create_tag("alice/short", tag="pinned", revision=sha[:7])
    assert api.model_info("alice/short", revision="pinned").sha == sha
    assert _download(hub, "alice/short", "a.txt", tmp_path, revision=sha[:7]) == b"x"
    for too_short in (sha[:6], "0000000"):
        with pytest.raises(RevisionNotFoundError):
            api.model_info("alice/short", revision=too_short)


def test_super_squash_replaces_a_branchs_history(hub):
    api = _api(hub)
    api.create_repo("alice/squash")
    for i in range(3):
        api.upload_file(repo_id="alice/squash", path_in_repo=f"f{i}.txt", path_or_fileobj=b"x")
    api.create_branch("alice/squash", branch="keep")
    api.super_squash_history("alice/squash")
    commits = api.list_repo_commits("alice/squash")
    assert [c.title for c in commits] == ["Super-squash branch 'main' using huggingface_hub"]
    assert len(api.list_repo_commits("alice/squash", revision="keep")) == 4
    assert set(api.list_repo_files("alice/squash")) == {".gitattributes", "f0.txt", "f1.txt", "f2.txt"}
    with pytest.raises(HfHubHTTPError) as refused:
        _api(hub, "bob").super_squash_history("alice/squash")
    assert refused.value.response.status_code == 403
