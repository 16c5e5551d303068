#!/usr/bin/env python3
"""huggingface_hub's own repo-level API tests, pointed at ``tunehub hub serve``.

    python benchmarks/hub_conformance.py                     # the sdist of the installed huggingface_hub
    python benchmarks/hub_conformance.py --tests DIR         # a huggingface_hub ``tests`` folder
    python benchmarks/hub_conformance.py --tests DIR -k tag  # a part of the selection (pytest -k)

The script starts a hub in this process (:class:`tunehub.registry.hub_server.HubServer` on a free
port, a temporary root, a YAML token file: testing_constants' ``TOKEN`` is ``USER``, ``OTHER_TOKEN``
is ``OTHER_USER``, each writing its own namespace, reading every other one, and admin so that the
tests can delete what they create). It copies the tests folder to a temporary one, points it at the
hub there (``ENDPOINT_STAGING`` and every literal staging URL of the copied files; the folder
given is never modified), adds a ``conftest.py`` of its own (the sdist ships none: the fixtures
``api``, ``repo_factory`` and ``mocker`` the tests use, the constants pointed at the hub, a fresh
cache per test, Xet off) and runs the fixed selection below with pytest in a child process.

The selection (``SELECTED``) is every test of the repo-level kinds: create/delete, upload and
commits with LFS, tree and paths-info, refs, tags and branches, commits, file/repo/revision
exists, downloads and snapshots. Everything else in the four files read (``FILES``) is in
``EXCLUDED`` with its reason; the script checks that each collected test is in exactly one of the
two, so the selection cannot shrink silently. It prints the counts (passed, failed, skipped) and
every failing test with a one-line reason class; the last line is JSON. The exit status is 0 when
no selected test failed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

BENCHMARK = "hub_conformance"
STAGING = "https://hub-ci.huggingface.co"
#: the test files read; every test they hold is either selected or excluded
FILES = ("test_hf_api.py", "test_file_download.py", "test_snapshot_download.py", "test_commit_api.py")

API = "test_hf_api.py"
DOWNLOAD = "test_file_download.py"
SNAPSHOT = "test_snapshot_download.py"

#: node-id prefixes (``file::Class::test`` or ``file::Class``) of the tests run against the hub
SELECTED: tuple[str, ...] = (
    # file / repo / revision exists (on a private repo: anonymous callers must not see it)
    f"{API}::TestHfApiRepoFileExists",
    # delete: a missing repo is RepoNotFound (with a request id), missing_ok swallows it
    f"{API}::TestHfApiEndpoints::test_delete_repo_error_message",
    f"{API}::TestHfApiEndpoints::test_delete_repo_missing_ok",
    # create and upload: files, folders, .gitignore, commits, conflicts, LFS, model cards, no-op commits
    f"{API}::TestCommitApi::test_upload_file_str_path",
    f"{API}::TestCommitApi::test_upload_file_pathlib_path",
    f"{API}::TestCommitApi::test_upload_file_fileobj",
    f"{API}::TestCommitApi::test_upload_file_bytesio",
    f"{API}::TestCommitApi::test_upload_data_files_to_model_repo",
    f"{API}::TestCommitApi::test_create_repo_return_value",
    f"{API}::TestCommitApi::test_create_repo_already_exists_but_no_write_permission",
    f"{API}::TestCommitApi::test_create_repo_with_visibility",
    f"{API}::TestCommitApi::test_delete_file",
    f"{API}::TestCommitApi::test_get_full_repo_name",
    f"{API}::TestCommitApi::test_upload_folder",
    f"{API}::TestCommitApi::test_upload_folder_git_folder_excluded",
    f"{API}::TestCommitApi::test_upload_folder_gitignore_already_exists",
    f"{API}::TestCommitApi::test_upload_folder_gitignore_in_commit",
    f"{API}::TestCommitApi::test_create_commit",
    f"{API}::TestCommitApi::test_create_commit_conflict",
    f"{API}::TestCommitApi::test_create_commit_repo_does_not_exist",
    f"{API}::TestCommitApi::test_create_commit_lfs_file_implicit_token",
    f"{API}::TestCommitApi::test_create_commit_huge_regular_files",
    f"{API}::TestCommitApi::test_commit_preflight_on_lots_of_lfs_files",
    f"{API}::TestCommitApi::test_create_commit_repo_id_case_insensitive",
    f"{API}::TestCommitApi::test_create_commit_mutates_operations",
    f"{API}::TestCommitApi::test_pre_upload_before_commit",
    f"{API}::TestCommitApi::test_commit_modelcard_invalid_metadata",
    f"{API}::TestCommitApi::test_commit_modelcard_empty_metadata",
    f"{API}::TestCommitApi::test_create_file_with_relative_path",
    f"{API}::TestCommitApi::test_prevent_empty_commit_if_no_op",
    f"{API}::TestCommitApi::test_prevent_empty_commit_if_no_new_addition",
    f"{API}::TestCommitApi::test_prevent_empty_commit_if_no_new_copy",
    f"{API}::TestCommitApi::test_continue_commit_without_existing_files",
    f"{API}::TestCommitApi::test_continue_commit_if_copy_is_identical",
    f"{API}::TestCommitApi::test_continue_commit_if_only_deletion",
    f"{API}::TestHfApiUploadEmptyFile",
    # deleting folders and files (by path, folder and pattern) in a commit
    f"{API}::TestHfApiDeleteFolder",
    f"{API}::TestHfApiDeleteFiles",
    # the tree (listing, recursion, unknown folders)
    f"{API}::TestHfApiListRepoTree::test_list_tree",
    f"{API}::TestHfApiListRepoTree::test_list_tree_recursively",
    f"{API}::TestHfApiListRepoTree::test_list_unknown_tree",
    f"{API}::TestHfApiListRepoTree::test_list_with_empty_path",
    # tags and branches
    f"{API}::TestHfApiTagEndpoint::test_create_tag_on_main",
    f"{API}::TestHfApiTagEndpoint::test_invalid_tag_name",
    f"{API}::TestHfApiTagEndpoint::test_create_tag_on_missing_revision",
    f"{API}::TestHfApiTagEndpoint::test_create_tag_twice",
    f"{API}::TestHfApiTagEndpoint::test_create_and_delete_tag",
    f"{API}::TestHfApiTagEndpoint::test_delete_tag_missing_tag",
    f"{API}::TestHfApiTagEndpoint::test_delete_tag_with_branch_name",
    f"{API}::TestHfApiBranchEndpoint",
    # listing models
    f"{API}::TestHfApiPublicStaging::test_staging_list_models",
    # commits queued in the background, in order; squashing a branch's history
    f"{API}::TestSquashHistory::test_super_squash_history_on_branch",
    f"{API}::TestCommitInBackground::test_commit_to_repo_in_background",
    # auth-check on a missing repo
    f"{API}::TestHfApiAuthCheck::test_auth_check_repo_missing",
    # repo_info + the cache's checksums against the hub's
    f"{API}::TestHfApiVerifyChecksums",
    # downloads: hf_hub_download to a local dir (etags, commit hashes, LFS sha256) and awful file names
    f"{DOWNLOAD}::TestHfHubDownloadToLocalDir",
    f"{DOWNLOAD}::TestStagingCachedDownloadOnAwfulFilenames",
    # snapshots: branches, commit ids, patterns, local dirs, offline reuse; resolving revisions
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_local_only",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_to_local_dir_with_offline_mode",
    f"{SNAPSHOT}::TestSnapshotDownload::test_offline_mode_with_cache_and_empty_local_dir",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_offline_mode_not_in_local_dir",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_offline_mode_not_cached",
    f"{SNAPSHOT}::TestSnapshotDownload::test_tree_cache_written_and_incomplete_detected",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_local_only_multiple",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_with_allow_pattern",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_with_allow_pattern_list",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_with_ignore_pattern",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_model_with_ignore_pattern_list",
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_to_local_dir",
    f"{SNAPSHOT}::TestResolveRevision",
)

_DATASETS = "datasets: this hub serves model repositories only"
_SPACES = "spaces: this hub serves model repositories only"
_PR = "pull requests and discussions: not served by this hub"
_SETTINGS = "repo settings (visibility, gating) and moves: not served by this hub"
_PRODUCTION = "real-Hub fixture: runs against huggingface.co (production model ids)"
_CLIENT = "client-only: mocks the network, never reaches the hub"
_ACCOUNT = "account API (whoami, likes, users, orgs), not repo-level; whoami needs the staging account's org fixture"
_XET = "xet: this hub speaks classic LFS only"

#: node-id prefix -> why it is not run
EXCLUDED: dict[str, str] = {
    # --- test_hf_api.py ---
    f"{API}::TestHfApiEndpoints::test_whoami": _ACCOUNT,
    f"{API}::TestHfApiEndpoints::test_move_repo": _SETTINGS,
    f"{API}::TestHfApiEndpoints::test_update_repo_settings": _SETTINGS,
    f"{API}::TestHfApiEndpoints::test_update_dataset_repo_settings": _SETTINGS,
    f"{API}::TestCommitApi::test_upload_file_validation": _CLIENT,
    f"{API}::TestCommitApi::test_commit_operation_validation": _CLIENT,
    f"{API}::TestCommitApi::test_create_repo_already_exists_but_no_write_permission_returns_correct_repo_id": _DATASETS,
    f"{API}::TestCommitApi::test_create_repo_private_by_default": "enterprise org defaults (ENTERPRISE_TOKEN): a Hub plan feature",
    f"{API}::TestCommitApi::test_update_repo_settings_with_visibility": _SETTINGS,
    f"{API}::TestCommitApi::test_upload_file_create_pr": _PR,
    f"{API}::TestCommitApi::test_upload_folder_create_pr": _PR,
    f"{API}::TestCommitApi::test_create_commit_create_pr": _PR,
    f"{API}::TestCommitApi::test_empty_commit_on_pr": _PR,
    f"{API}::TestHfApiListRepoTree::test_list_tree_with_expand": _PRODUCTION,
    f"{API}::TestHfApiListRepoTree::test_list_files_without_expand": _PRODUCTION,
    f"{API}::TestHfApiListRepoTree::test_list_tree_with_xethash": _PRODUCTION,
    f"{API}::TestHfApiTagEndpoint::test_create_tag_on_pr": _PR,
    f"{API}::TestHfApiTagEndpoint::test_create_tag_on_commit_oid": _DATASETS
    + " (short commit ids are covered by tests/unit/test_hub_conformance.py)",
    f"{API}::TestHfApiPublicStaging::test_staging_list_datasets": _DATASETS,
    f"{API}::TestHfApiPublicProduction": _PRODUCTION,
    f"{API}::TestHfApiPrivate": "its class fixture creates a private dataset repo too ("
    + _DATASETS
    + "); private model repos are covered by TestHfApiRepoFileExists and the unit tests",
    f"{API}::TestUploadFolderMocked": _CLIENT,
    f"{API}::TestHfLargefiles": "git push with git-lfs (skipped upstream): this hub has no git transport",
    f"{API}::TestHfApiDiscussions": _PR,
    f"{API}::TestActivityApi": _ACCOUNT,
    f"{API}::TestSquashHistory::test_super_squash_history_on_special_ref": _PR,
    f"{API}::TestListAndPermanentlyDeleteLFSFiles": "LFS storage management (list/permanently delete LFS files): not served",
    f"{API}::TestSpaceAPIProduction": _SPACES,
    f"{API}::TestCommitInBackground::test_run_as_future": _SETTINGS,
    f"{API}::TestDownloadHfApiAlias": _CLIENT,
    f"{API}::TestSpaceAPIMocked": _SPACES,
    f"{API}::TestListGitRefs": _PRODUCTION,
    f"{API}::TestListGitCommits": "its class fixture opens a pull request (" + _PR + "); commits are covered elsewhere",
    f"{API}::TestHfApiTokenAttribute": _CLIENT,
    f"{API}::TestRepoUrl": _CLIENT,
    f"{API}::TestCollectionAPI": "collections: not served by this hub",
    f"{API}::TestAccessRequestAPI": "gated repos and access requests: not served by this hub",
    f"{API}::TestAccessRequestHiddenPII": _CLIENT,
    f"{API}::TestUserApi": _ACCOUNT,
    f"{API}::TestPaperApi": "papers: not served by this hub",
    f"{API}::TestWebhookApi": "webhooks: not served by this hub",
    f"{API}::TestExpandPropertyType": _PRODUCTION,
    f"{API}::TestHfApiAuthCheck::test_auth_check_success": _DATASETS,
    f"{API}::TestHfApiAuthCheck::test_auth_check_gated_repo": "gated repos and repo settings: not served by this hub",
    f"{API}::TestHfApiInferenceCatalog": "inference: not served by this hub",
    f"{API}::test_build_endpoint_image_payload": "inference endpoints: " + _CLIENT,
    f"{API}::test_create_inference_endpoint": "inference endpoints: " + _CLIENT,
    f"{API}::test_update_inference_endpoint": "inference endpoints: " + _CLIENT,
    f"{API}::test_set_parallelism_in_image": "inference endpoints: " + _CLIENT,
    # --- test_file_download.py ---
    f"{DOWNLOAD}::test_download_without_head_content_length": _CLIENT,
    f"{DOWNLOAD}::TestDiskUsageWarning": _CLIENT,
    f"{DOWNLOAD}::TestStagingDownload::test_download_from_a_gated_repo_with_hf_hub_download": "gated repos: not served",
    f"{DOWNLOAD}::TestStagingDownload::test_download_regular_file_from_private_renamed_repo": _SETTINGS,
    f"{DOWNLOAD}::TestCachedDownload": _PRODUCTION,
    f"{DOWNLOAD}::TestFileDownloadDryRun": _PRODUCTION,
    f"{DOWNLOAD}::TestHfHubDownloadRelativePaths": "its class fixture uploads 'folder/..\\\\..\\\\..\\\\file': this hub refuses"
    " backslashes in repo paths by design (a Windows client would read them as folders); the client-side check it"
    " tests needs no hub",
    f"{DOWNLOAD}::TestHttpGet": _CLIENT,
    f"{DOWNLOAD}::TestCreateSymlink": _CLIENT,
    f"{DOWNLOAD}::TestNormalizeEtag::test_strong_reference": _CLIENT,
    f"{DOWNLOAD}::TestNormalizeEtag::test_weak_reference": _CLIENT,
    f"{DOWNLOAD}::TestNormalizeEtag::test_resolve_endpoint": _PRODUCTION,
    f"{DOWNLOAD}::TestExtraLargeFileDownloadPaths": _PRODUCTION,
    # --- test_snapshot_download.py ---
    f"{SNAPSHOT}::test_tree_with_redacted_xet_hash_is_not_cached": _CLIENT,
    f"{SNAPSHOT}::test_pinned_revision_offline_without_cached_tree": _CLIENT,
    f"{SNAPSHOT}::TestSnapshotDownload::test_xet_file_skips_per_file_head_call": _XET,
    f"{SNAPSHOT}::TestSnapshotDownload::test_download_private_model": _SETTINGS + " (update_repo_settings(private=...))",
    f"{SNAPSHOT}::test_revision_str": _CLIENT,
    # --- test_commit_api.py ---
    "test_commit_api.py": _CLIENT + " (CommitOperation* validation)",
}

TOKEN_NAMES = ("TOKEN", "USER", "OTHER_TOKEN", "OTHER_USER")

CONFTEST = '''\
"""Written by tunehub's benchmarks/hub_conformance.py: the fixtures of these tests, pointed at a
private hub (the sdist ships no conftest.py)."""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol
from unittest import mock

import pytest

from huggingface_hub import HfApi, RepoUrl, constants

from .testing_constants import ENDPOINT_STAGING, TOKEN
from .testing_utils import repo_name

MARKERS = ("api", "transfer", "inference", "xet", "no_xet", "production", "deprecated", "git_lfs", "vcr")


def pytest_configure(config: Any) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", f"{marker}: huggingface_hub test marker")


@pytest.fixture(autouse=True)
def _hub_constants(tmp_path_factory: Any, monkeypatch: pytest.MonkeyPatch, request: Any) -> None:
    """A fresh HF home per test, the hub as the endpoint, Xet off; production tests are skipped."""
    if request.node.get_closest_marker("production") is not None:
        pytest.skip("runs against huggingface.co")
    if request.node.get_closest_marker("xet") is not None:
        pytest.skip("needs Xet")
    home = str(tmp_path_factory.mktemp("hf_home"))
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(home, "hub"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "ENDPOINT": ENDPOINT_STAGING,
        "HUGGINGFACE_CO_URL_TEMPLATE": ENDPOINT_STAGING + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_EXPERIMENTAL_WARNING": True,
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


@pytest.fixture(scope="session")
def api() -> HfApi:
    return HfApi(endpoint=ENDPOINT_STAGING, token=TOKEN)


class RepoFactory(Protocol):
    def __call__(self, repo_type: str = "model", **kwargs: Any) -> RepoUrl: ...


@pytest.fixture
def repo_factory(api: HfApi) -> Any:
    """Creates repos (``repo_name()`` unless a repo_id is given) and deletes them after the test."""
    made: list[tuple[str, str, Any]] = []

    def factory(repo_type: str = "model", **kwargs: Any) -> RepoUrl:
        kwargs.setdefault("repo_id", repo_name(prefix=repo_type))
        url = api.create_repo(repo_type=repo_type, **kwargs)
        made.append((url.repo_id, repo_type, kwargs.get("token")))
        return url

    yield factory
    for repo_id, repo_type, token in made:
        try:
            api.delete_repo(repo_id=repo_id, repo_type=repo_type, token=token)
        except Exception:  # noqa: BLE001 - cleanup only
            pass


class _Mocker:
    """The part of pytest-mock's ``mocker`` these tests use: patch, patch.object, patch.dict."""

    def __init__(self) -> None:
        self._patchers: list[Any] = []
        mocker = self

        class _Patch:
            def __call__(self, target: str, *args: Any, **kwargs: Any) -> Any:
                return mocker._start(mock.patch(target, *args, **kwargs))

            def object(self, target: Any, attribute: str, *args: Any, **kwargs: Any) -> Any:
                return mocker._start(mock.patch.object(target, attribute, *args, **kwargs))

            def dict(self, target: Any, *args: Any, **kwargs: Any) -> Any:
                return mocker._start(mock.patch.dict(target, *args, **kwargs))

        self.patch = _Patch()
        self.Mock, self.MagicMock, self.ANY, self.call = mock.Mock, mock.MagicMock, mock.ANY, mock.call

    def _start(self, patcher: Any) -> Any:
        started = patcher.start()
        self._patchers.append(patcher)
        return started

    def spy(self, target: Any, name: str) -> Any:
        return self._start(mock.patch.object(target, name, wraps=getattr(target, name)))

    def stopall(self) -> None:
        for patcher in reversed(self._patchers):
            patcher.stop()
        self._patchers.clear()


if "pytest_mock" not in sys.modules:
    try:
        import pytest_mock  # noqa: F401
    except ImportError:

        @pytest.fixture
        def mocker() -> Any:
            patches = _Mocker()
            yield patches
            patches.stopall()
'''

PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider -p no:randomly
filterwarnings =
    ignore::DeprecationWarning
"""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _constants(tests: Path) -> dict[str, str]:
    """USER, TOKEN, OTHER_USER and OTHER_TOKEN as testing_constants.py sets them."""
    text = (tests / "testing_constants.py").read_text()
    found = {}
    for name in TOKEN_NAMES:
        match = re.search(rf'^{name}\s*=\s*"([^"]*)"', text, re.MULTILINE)
        if match is None:
            raise SystemExit(f"{tests / 'testing_constants.py'} sets no {name}")
        found[name] = match.group(1)
    return found


def token_file(constants: dict[str, str]) -> str:
    """The YAML token file of the hub: each test user writes its own namespace and reads the others
    (anonymous reads public repos), and is admin so that the tests can delete their repos."""
    lines = ['anonymous:\n  "*": read\ntokens:\n']
    for user, token in ((constants["USER"], constants["TOKEN"]), (constants["OTHER_USER"], constants["OTHER_TOKEN"])):
        lines.append(
            f"  - name: {json.dumps(user)}\n    sha256: {_sha256(token)}\n"
            f'    access: {{{json.dumps(user)}: write, "*": read}}\n    admin: true\n'
        )
    return "".join(lines)


def download_tests(into: Path) -> Path:
    """The tests folder of the sdist of the installed huggingface_hub, downloaded with pip."""
    from importlib.metadata import version

    wanted = version("huggingface_hub")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-build-isolation"]
        + ["-d", str(into), f"huggingface_hub=={wanted}"],
        check=True,
    )
    archives = sorted(into.glob("huggingface_hub-*.tar.gz"))
    if not archives:
        raise SystemExit(f"pip downloaded no sdist of huggingface_hub=={wanted}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(into, filter="data")
    tests = into / archives[0].name[: -len(".tar.gz")] / "tests"
    if not tests.is_dir():
        raise SystemExit(f"the sdist {archives[0].name} holds no tests folder")
    return tests


def prepare(source: Path, work: Path, url: str) -> Path:
    """A copy of the tests folder under ``work`` pointed at ``url``; returns its path."""
    tests = work / "tests"
    shutil.copytree(source, tests, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "conftest.py"))
    for path in tests.glob("*.py"):
        text = path.read_text()
        if STAGING in text:
            path.write_text(text.replace(STAGING, url))
    constants = tests / "testing_constants.py"
    text = constants.read_text()
    patched = re.sub(r"^ENDPOINT_STAGING\s*=.*$", f'ENDPOINT_STAGING = "{url}"', text, count=1, flags=re.MULTILINE)
    if patched == text and f'"{url}"' not in text:
        raise SystemExit(f"{source / 'testing_constants.py'} sets no ENDPOINT_STAGING")
    constants.write_text(patched)
    (tests / "__init__.py").write_text("")
    (tests / "conftest.py").write_text(CONFTEST)
    (work / "pytest.ini").write_text(PYTEST_INI)
    return tests


def _matches(node: str, prefix: str) -> bool:
    return node == prefix or node.startswith(prefix + "::") or node.startswith(prefix + "[") or node.startswith(prefix + "_")


def _short(node: str) -> str:
    return node.removeprefix("tests/")


def classify(nodes: list[str]) -> tuple[list[str], dict[str, str], list[str], list[str]]:
    """(selected node ids, excluded node id -> reason, unclassified, in both)."""
    selected, excluded, unknown, both = [], {}, [], []
    for node in nodes:
        short = _short(node)
        in_selected = any(short == p or short.startswith(p + "::") or short.startswith(p + "[") for p in SELECTED)
        reasons = [reason for prefix, reason in EXCLUDED.items() if _matches(short, prefix)]
        if in_selected and reasons:
            both.append(short)
        elif in_selected:
            selected.append(node)
        elif reasons:
            excluded[short] = reasons[0]
        else:
            unknown.append(short)
    return selected, excluded, unknown, both


_REASONS = (
    (r"Connect(ion)?Error|ConnectError|Connection refused", "connection"),
    (r"RepositoryNotFoundError|Repository Not Found", "repo not found"),
    (r"RevisionNotFoundError|Invalid rev id", "revision not found"),
    (r"EntryNotFoundError", "entry not found"),
    (r"(\d{3}) (Client|Server) Error", "HTTP {0}"),
    (r"HfHubHTTPError", "HTTP error"),
    (r"did not raise|DID NOT RAISE", "expected an error"),
    (r"DID NOT WARN", "expected a warning"),
    (r"AssertionError|assert ", "assertion"),
)


def reason_class(message: str) -> str:
    for pattern, label in _REASONS:
        match = re.search(pattern, message)
        if match:
            return label.format(*match.groups()) if "{0}" in label else label
    first = message.strip().splitlines()[0] if message.strip() else "error"
    return first[:80]


def run_pytest(work: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=work, env=env, text=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=Path, help="a huggingface_hub tests folder (default: the sdist of the installed version)")
    parser.add_argument("-k", dest="keyword", help="run only the selected tests matching this pytest -k expression")
    parser.add_argument("--keep", type=Path, help="keep the work folder (copied tests, hub root, report) here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    parser.add_argument("--list-excluded", action="store_true", help="print every excluded test with its reason")
    options = parser.parse_args()

    from tunehub.registry.hub_server import HubConfig, HubServer, load_access

    with tempfile.TemporaryDirectory(prefix="hub-conformance-") as temp:
        work = options.keep.resolve() if options.keep else Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        source = options.tests.resolve() if options.tests else download_tests(work / "sdist")
        constants = _constants(source)
        tokens = work / "tokens.yaml"
        tokens.write_text(token_file(constants))
        root = work / "hub-root"
        if root.exists():
            shutil.rmtree(root)
        config = HubConfig(root=root, access=load_access(tokens))
        with HubServer(config, "127.0.0.1", 0) as server:
            if (work / "tests").exists():
                shutil.rmtree(work / "tests")
            prepare(source, work, server.url)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
            env.update(
                HF_HUB_DISABLE_XET="1",
                HF_ENDPOINT=server.url,
                HF_HUB_DISABLE_TELEMETRY="1",
                HF_HUB_DISABLE_PROGRESS_BARS="1",
                HF_HOME=str(work / "hf-home"),
                NO_COLOR="1",
                PYTHONDONTWRITEBYTECODE="1",
            )
            collected = run_pytest(work, ["--collect-only", "-q", *[f"tests/{name}" for name in FILES]], env)
            nodes = [line.strip() for line in collected.stdout.splitlines() if line.startswith("tests/") and "::" in line]
            if collected.returncode != 0 or not nodes:
                print(collected.stdout[-4000:], collected.stderr[-4000:], sep="\n")
                raise SystemExit("pytest could not collect the tests")
            selected, excluded, unknown, both = classify(nodes)
            if unknown or both:
                for node in unknown:
                    print(f"neither selected nor excluded: {node}")
                for node in both:
                    print(f"both selected and excluded: {node}")
                raise SystemExit("every collected test must be either selected or excluded (edit SELECTED / EXCLUDED)")
            report = work / "report.xml"
            args = ["-q", "-rN", f"--junitxml={report}", "-o", "junit_family=xunit2"]
            if importlib.util.find_spec("pytest_timeout") is not None:
                args.append("--timeout=600")
            if options.keyword:
                args += ["-k", options.keyword]
            result = run_pytest(work, [*args, *selected], env)
            if options.verbose:
                print(result.stdout, result.stderr, sep="\n")
        outcomes, failures = read_report(report)

    print(f"huggingface_hub tests against tunehub hub serve: {len(selected)} selected, {len(excluded)} excluded")
    print(f"passed {outcomes['passed']}, failed {outcomes['failed']}, skipped {outcomes['skipped']}")
    for node, why in sorted(failures.items()):
        print(f"FAILED {node}  [{why}]")
    if options.list_excluded:
        for node, reason in sorted(excluded.items()):
            print(f"EXCLUDED {node}  [{reason}]")
    excluded_reasons = Counter(excluded.values())
    print(f"excluded ({len(excluded)}):")
    for reason, count in excluded_reasons.most_common():
        print(f"  {count:4d}  {reason}")
    summary = {
        "benchmark": BENCHMARK,
        "selected": len(selected),
        "excluded": len(excluded),
        "passed": outcomes["passed"],
        "failed": outcomes["failed"],
        "skipped": outcomes["skipped"],
        "failures": failures,
    }
    print(json.dumps(summary))
    if outcomes["failed"] or sum(outcomes.values()) == 0:
        return 1
    return 0


def read_report(path: Path) -> tuple[Counter[str], dict[str, str]]:
    """(counts by outcome, failing node id -> reason class) from pytest's JUnit XML report."""
    outcomes: Counter[str] = Counter(passed=0, failed=0, skipped=0)
    failures: dict[str, str] = {}
    if not path.exists():
        return outcomes, failures
    for case in ET.parse(path).getroot().iter("testcase"):
        module = (case.get("classname") or "").split(".")
        name = case.get("name") or ""
        file_part = module[1] + ".py" if len(module) > 1 else module[0]
        node = "::".join([file_part, *module[2:], name])
        problems = [child for child in case if child.tag in ("failure", "error")]
        if problems:
            outcomes["failed"] += 1
            text = " ".join(filter(None, [problems[0].get("message"), problems[0].text or ""]))
            failures[node] = reason_class(text)
        elif any(child.tag == "skipped" for child in case):
            outcomes["skipped"] += 1
        else:
            outcomes["passed"] += 1
    return outcomes, failures


if __name__ == "__main__":
    sys.exit(main())
