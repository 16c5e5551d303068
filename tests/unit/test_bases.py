"""One base resolver (tunehub.bases) for `tunehub train` and `tunehub serve`: same answers, same errors."""

import subprocess
import sys

import pytest

from tunehub.bases import is_hub_id, resolve_base_folder
from tunehub.errors import ConfigError


def _both(reference):
    """What the trainer's and the server's resolvers answer (a path, or the ConfigError's text)."""
    from types import SimpleNamespace

    from tunehub.server.serve import resolve_base as serve_resolve
    from tunehub.trainer.run import resolve_base as train_resolve

    answers = []
    for resolve in (
        lambda: train_resolve(SimpleNamespace(base=SimpleNamespace(path=reference, revision=None))),
        lambda: serve_resolve(reference),
    ):
        try:
            answers.append(("ok", str(resolve())))
        except ConfigError as exc:
            answers.append(("error", str(exc).removeprefix("base.path: ")))
    return answers


def test_a_model_folder_is_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base_folder(tmp_path) == tmp_path
    assert resolve_base_folder(str(tmp_path), field="base.path") == tmp_path
    train, serve = _both(str(tmp_path))
    assert train == ("ok", str(tmp_path)) and serve == ("ok", str(tmp_path.resolve()))


def test_a_folder_without_config_json_is_not_a_model_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"^base\.path: .* is not a model folder \(no config\.json\)$"):
        resolve_base_folder(tmp_path, field="base.path")
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is not a model folder"):
        resolve_base_folder(afile)
    train, serve = _both(str(tmp_path))
    assert train == serve and train[0] == "error" and "is not a model folder" in train[1]


def test_a_hub_id_offline_and_not_cached_is_one_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ConfigError) as info:
        resolve_base_folder("acme/no-such-base")
    message = str(info.value)
    assert message == (
        "'acme/no-such-base' is not a local folder and could not be fetched from the Hub:"
        " HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
    )
    assert "\n" not in message
    train, serve = _both("acme/no-such-base")
    assert train == serve == ("error", message)


@pytest.mark.parametrize("garbage", ["", "a/b/c", "../nowhere/at/all", "bad name", "acme//x", "acme/x..y", "-x"])
def test_garbage_is_neither_a_folder_nor_a_hub_id(garbage):
    assert not is_hub_id(garbage)
    with pytest.raises(ConfigError, match="is neither a model folder nor a Hub id"):
        resolve_base_folder(garbage)
    train, serve = _both(garbage)
    assert train == serve and "is neither a model folder nor a Hub id" in train[1]


def test_hub_ids():
    assert all(is_hub_id(ref) for ref in ("gpt2", "meta-llama/Llama-3.2-1B", "acme/base_v1.5"))


def test_the_resolver_does_not_import_torch():
    code = "import sys, tunehub.bases; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
