"""The distribution: a regular wheel install and the editable install expose the same layout,
and the registry path never needs torch."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import make_fake_module

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SUBPACKAGES = ["registry", "trainer", "server", "sdk"]


def _package_dirs() -> list[str]:
    """Every folder under the mapped top-level folders that holds an __init__.py, and every
    package that lives in tunehub/ itself (not through a link: tunehub.peft_methods)."""
    found = []
    for top in SUBPACKAGES:
        for init in sorted((REPO / top).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO).as_posix()
            found.append("tunehub." + rel.replace("/", "."))
    for init in sorted((REPO / "tunehub").glob("*/__init__.py")):
        if not init.parent.is_symlink():
            found.append("tunehub." + init.parent.name)
    return found


def test_package_discovery_finds_every_subpackage_through_the_namespace_links():
    """A new folder with an __init__.py is packaged with no edit to pyproject.toml, and the import
    name of each top-level folder is a real path (tunehub/<folder> links to it) that static tools
    resolve without setuptools' import hook."""
    import tomllib
    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in config and set(config["packages"]) == {"find"}, "packages are found, not listed"
    include = config["packages"]["find"]["include"]
    found = set(find_packages(str(REPO), include=include))
    assert set(_package_dirs()) | {"tunehub"} == found
    for top in SUBPACKAGES:
        link = REPO / "tunehub" / top
        assert link.is_symlink() and link.resolve() == (REPO / top).resolve(), f"tunehub/{top} must link to {top}/"


def _venv_seeing_our_dependencies(venv: Path) -> Path:
    """A new venv whose interpreter also finds the packages of the one running the tests.

    ``venv --system-site-packages`` would expose the *base* interpreter's site-packages, which is
    not where the dependencies are when the tests run inside a venv (the README's setup). A
    ``.pth`` line naming our site-packages adds them to ``sys.path`` after the new venv's own
    folder, and (unlike a site dir) its own ``.pth`` files are not run, so the editable install of
    tunehub living there stays invisible: only the wheel can provide ``tunehub``.
    """
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    child_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(child_site) / "_tunehub_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def test_wheel_installs_under_one_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("tunehub-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in _package_dirs() + ["tunehub"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names
    assert not [n for n in names if n.split("/")[0] in ("registry", "server", "sdk", "trainer", "tests")]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tunehub = tunehub.sdk.cli:run" in entry_points

    # install the wheel into a fresh venv, then import from a folder outside the repo so only the
    # installed copy can be found
    venv = tmp_path / "venv"
    python = _venv_seeing_our_dependencies(venv)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    out = subprocess.run(
        [python, "-c", "import tunehub.registry as r, tunehub.sdk.cli as c; print(r.__file__); print(c.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.split()
    for path in out:
        assert str(venv) in path, f"{path} was not imported from the installed wheel"
    tunehub_script = venv / "bin" / "tunehub"
    assert subprocess.run([tunehub_script, "--help"], capture_output=True).returncode == 0


def test_registry_and_push_pull_work_without_torch(tmp_path):
    module = make_fake_module(tmp_path / "m")
    script = f"""
import sys
sys.modules['torch'] = None  # any import of torch now fails
from tunehub.sdk.cli import main
import tunehub.registry, tunehub.sdk
assert main(['push', {str(module)!r}, 'x', '--registry', {str(tmp_path / "reg")!r}]) == 0
assert main(['pull', 'x@1', '--dest', {str(tmp_path / "out")!r}, '--registry', {str(tmp_path / "reg")!r}]) == 0
assert main(['show', 'x@1', '--registry', {str(tmp_path / "reg")!r}]) == 0
loaded = [m for m in sys.modules if m.startswith(('transformers', 'peft', 'safetensors.torch'))]
assert not loaded, loaded
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "manifest.json").exists()
