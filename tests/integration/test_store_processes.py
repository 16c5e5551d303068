"""The local store's guarantees under real processes: concurrent pushes and SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import make_fake_module
from tunehub.errors import ModuleNotFound
from tunehub.registry.local import LocalStore

pytestmark = pytest.mark.integration

PUSHER = textwrap.dedent(
    """
    import sys
    from tunehub.registry.local import LocalStore
    store = LocalStore(sys.argv[1])
    for _ in range(int(sys.argv[3])):
        info = store.push(sys.argv[2], "acme/race")
        print(info.version, flush=True)
    """
)


def _spawn(*args):
    return subprocess.Popen(
        [sys.executable, "-c", PUSHER, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def _check_consistent(store, tmp_path):
    try:
        versions = store.versions("acme/race")
    except ModuleNotFound:  # killed before its first push completed: nothing visible is consistent
        return []
    for info in versions:
        store.pull(info.ref, tmp_path / "check" / str(info.version))  # verifies every file
    return versions


def test_two_processes_push_twenty_times_each(tmp_path):
    root = tmp_path / "reg"
    LocalStore(root)
    modules = [make_fake_module(tmp_path / f"m{i}", payload=os.urandom(64 * 1024)) for i in range(2)]
    procs = [_spawn(root, modules[i], 20) for i in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append([int(line) for line in out.split()])
    claimed = outputs[0] + outputs[1]
    assert len(claimed) == 40 and sorted(claimed) == list(range(1, 41))
    store = LocalStore(root)
    versions = _check_consistent(store, tmp_path)
    assert [v.version for v in versions] == list(range(1, 41))
    manifests = {v.version: v.manifest_sha256 for v in versions}
    own = {o: i for i, out in enumerate(outputs) for o in out}
    expected_sha = [store.resolve(f"acme/race@{outputs[i][0]}").manifest_sha256 for i in range(2)]
    for version, sha in manifests.items():
        assert sha == expected_sha[own[version]]  # each version holds exactly what its pusher sent


def test_push_killed_at_random_points_leaves_store_consistent(tmp_path):
    root = tmp_path / "reg"
    store = LocalStore(root)
    rng = random.Random(1234)
    module = make_fake_module(tmp_path / "big", payload=os.urandom(8 * 1024 * 1024))
    for attempt in range(6):
        proc = _spawn(root, module, 50)
        # start-up takes a moment; kill somewhere inside the pushes that follow
        time.sleep(0.4 + rng.random() * 0.8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        versions = _check_consistent(store, tmp_path / f"a{attempt}")
        numbers = [v.version for v in versions]
        assert numbers == list(range(1, len(numbers) + 1))
        # the next push succeeds at once: no lock or half-written record blocks it
        info = store.push(module, "acme/race")
        assert info.version == len(numbers) + 1
        store.pull(info.ref, tmp_path / f"after{attempt}")
    store.gc()  # under its exclusive lock every leftover of the killed pushes goes, whatever its age
    assert not list((root / "tmp").iterdir())
