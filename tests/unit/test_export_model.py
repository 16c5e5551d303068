"""tunehub export: a module merged into a standalone transformers model, or converted into a plain
PEFT LoRA, checked against the module itself (PEFT unmerged, apply_selective) on tiny bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from tests.helpers import make_fake_module
from tunehub.errors import ConfigError, Conflict, IncompatibleBase, IntegrityError, ManifestError, UnsignedModule
from tunehub.registry.manifest import Manifest, ModuleKind
from tunehub.registry.module import verify_module, write_module
from tunehub.registry.signing import TrustPolicy, generate_key_pair
from tunehub.sdk.cli import app, main
from tunehub.sdk.export import MERGE_TOLERANCE, export_as_lora, export_merged
from tunehub.sdk.registry import Registry
from tunehub.trainer.export import save_peft_module
from tunehub.trainer.methods.selective import apply_selective
from tunehub.trainer.run import peft_deprecations_silenced
from tunehub.trainer.testing import load_base, make_lora_model, make_lora_module, make_peft_module, make_selective_module

IDS = torch.tensor([[1, 7, 42, 99, 3, 250, 17, 8], [300, 2, 64, 5, 128, 11, 400, 9]])


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _exported(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())


def _unmerged(base: Path, module: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    with peft_deprecations_silenced():
        model = PeftModel.from_pretrained(load_base(base), module)
    return _logits(model.eval(), ids)


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Registry:
    monkeypatch.setenv("TUNEHUB_USER", "tester")
    return Registry(f"file://{tmp_path / 'reg'}", cache_dir=tmp_path / "cache")


# --- merge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "ia3"])
def test_merged_model_gives_the_unmerged_modules_logits(tiny_llama_path, tmp_path, kind):
    module = make_peft_module(tiny_llama_path, tmp_path / "module", kind, seed=3)
    report = export_merged(module, tmp_path / "merged", tiny_llama_path)

    merged = _exported(tmp_path / "merged")
    unmerged = _unmerged(tiny_llama_path, module)
    assert (merged - unmerged).abs().max() <= MERGE_TOLERANCE
    assert (merged - _logits(load_base(tiny_llama_path))).abs().max() > 1e-2  # the module is in there
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "manifest.json" not in names and "adapter_config.json" not in names  # a plain model
    assert report.mode == "merge" and report.kind == kind and report.dtype == "float32"
    assert report.chain == [f"{module} ({kind})"] and 0 <= report.max_logit_diff <= report.tolerance
    assert report.steps[0]["max_logit_diff"] <= MERGE_TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "module"]  # no staging left behind


def test_selective_bitfit_merges_into_the_biased_base(tiny_biased_llama_path, tmp_path):
    module = make_selective_module(tiny_biased_llama_path, tmp_path / "module", bitfit=True, seed=1)
    (tmp_path / "merged").mkdir()  # an empty folder is fine too
    report = export_merged(module, tmp_path / "merged", tiny_biased_llama_path)
    expected = _logits(apply_selective(load_base(tiny_biased_llama_path), module))
    assert (_exported(tmp_path / "merged") - expected).abs().max() <= MERGE_TOLERANCE
    assert (expected - _logits(load_base(tiny_biased_llama_path))).abs().max() > 1e-2
    assert report.kind == "selective" and "apply_selective" in report.method


def test_a_chain_of_two_loras_merges_parent_first(tiny_llama_path, tmp_path, registry):
    parent = make_lora_module(tiny_llama_path, tmp_path / "uft", seed=1)
    assert registry.push(parent, "acme/uft").ref == "acme/uft@1"
    child = tmp_path / "sft"
    save_peft_module(make_lora_model(tiny_llama_path, seed=2), child, base_path=tiny_llama_path, kind="lora", parent="acme/uft@1")
    registry.push(child, "acme/sft")

    report = export_merged("acme/sft@1", tmp_path / "merged", tiny_llama_path, registry=registry)

    both = PeftModel.from_pretrained(load_base(tiny_llama_path), parent, adapter_name="uft")
    both.load_adapter(str(child), adapter_name="sft")
    both.base_model.set_adapter(["uft", "sft"])
    expected = _logits(both.eval())
    merged = _exported(tmp_path / "merged")
    assert (merged - expected).abs().max() <= MERGE_TOLERANCE
    # both deltas are there: neither module alone gives these logits
    assert (merged - _unmerged(tiny_llama_path, child)).abs().max() > 1e-3
    assert (merged - _unmerged(tiny_llama_path, parent)).abs().max() > 1e-3
    assert report.chain == ["acme/uft@1 (lora)", "acme/sft@1 (lora)"]
    assert [step["module"] for step in report.steps] == ["acme/uft@1", "acme/sft@1"]


def test_a_parent_that_names_no_exact_version_is_refused(tmp_path, registry):
    folder = make_fake_module(tmp_path / "m")
    write_module(folder, Manifest.read(folder).with_updates(parent="acme/uft@prod"))
    with pytest.raises(ConfigError, match="no exact version"):
        export_merged(folder, tmp_path / "out", tmp_path / "unused-base", registry=registry)
    assert not (tmp_path / "out").exists()


def test_an_unsigned_version_is_refused_when_signatures_are_required(tmp_path, registry):
    generate_key_pair(tmp_path / "key")
    registry.push(make_fake_module(tmp_path / "m"), "acme/unsigned")
    policy = TrustPolicy.from_paths([tmp_path / "key.pub"], require_signed=True)
    with pytest.raises(UnsignedModule):
        export_merged("acme/unsigned@1", tmp_path / "out", tmp_path / "unused-base", registry=registry, trust=policy)
    with pytest.raises(UnsignedModule):
        export_as_lora("acme/unsigned", tmp_path / "out", tmp_path / "unused-base", registry=registry, trust=policy)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kind", "why"), [("prompt", "virtual tokens"), ("bottleneck", "non-linear residual branch")])
def test_kinds_that_cannot_merge_are_refused_with_why(tiny_llama_path, tmp_path, kind, why):
    module = make_peft_module(tiny_llama_path, tmp_path / "module", kind)
    with pytest.raises(ConfigError, match=why) as refused:
        export_merged(module, tmp_path / "merged", tiny_llama_path)
    assert "tunehub serve" in str(refused.value)
    assert not (tmp_path / "merged").exists()


def test_a_module_for_another_base_is_refused(tiny_llama_path, tiny_biased_llama_path, tmp_path):
    module = make_lora_module(tiny_llama_path, tmp_path / "module")
    with pytest.raises(IncompatibleBase, match="fingerprint"):
        export_merged(module, tmp_path / "merged", tiny_biased_llama_path)
    with pytest.raises(IncompatibleBase):
        export_as_lora(module, tmp_path / "lora", tiny_biased_llama_path)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "lora").exists()


def test_an_out_folder_that_holds_files_is_refused_and_left_alone(tiny_llama_path, tmp_path):
    module = make_lora_module(tiny_llama_path, tmp_path / "module")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text("{}")
    with pytest.raises(Conflict, match="not empty"):
        export_merged(module, out, tiny_llama_path)
    with pytest.raises(Conflict, match="not empty"):
        export_as_lora(module, out, tiny_llama_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.json").read_text() == "{}"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(Conflict, match="not a folder"):
        export_merged(module, tmp_path / "a-file", tiny_llama_path)
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_merge_whose_logits_disagree_writes_nothing(tiny_llama_path, tmp_path, monkeypatch):
    module = make_lora_module(tiny_llama_path, tmp_path / "module")
    monkeypatch.setattr("tunehub.sdk.export.MERGE_TOLERANCE", -1.0)  # no difference passes, not even 0
    with pytest.raises(IntegrityError, match="nothing was written"):
        export_merged(module, tmp_path / "merged", tiny_llama_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["module"]  # no output, no staging folder


def test_a_tampered_module_folder_is_refused(tiny_llama_path, tmp_path):
    module = make_lora_module(tiny_llama_path, tmp_path / "module")
    weights = module / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IntegrityError):
        export_merged(module, tmp_path / "merged", tiny_llama_path)
    (tmp_path / "not-a-module").mkdir()
    with pytest.raises(ManifestError):
        export_merged(tmp_path / "not-a-module", tmp_path / "merged", tiny_llama_path)
    assert not (tmp_path / "merged").exists()


# --- as a LoRA --------------------------------------------------------------------------------------


def test_adalora_as_lora_is_exact_at_its_rank(tiny_llama_path, tmp_path):
    module = make_peft_module(tiny_llama_path, tmp_path / "module", "adalora", seed=2, r=4)
    report = export_as_lora(module, tmp_path / "lora", tiny_llama_path)

    assert report.rank == 4 and report.max_error < 1e-5 and report.mean_error <= report.max_error
    assert len(report.layer_errors) == 14  # 7 linear layers x 2 blocks
    manifest = verify_module(tmp_path / "lora").manifest
    assert manifest.kind is ModuleKind.LORA and manifest.params["r"] == manifest.params["lora_alpha"] == 4
    assert manifest.base.fingerprint == verify_module(module).manifest.base.fingerprint
    converted = _unmerged(tiny_llama_path, tmp_path / "lora")
    assert (converted - _unmerged(tiny_llama_path, module)).abs().max() < 1e-4
    assert report.max_logit_diff < 1e-4


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_low_rank_export_reports_its_error(tiny_llama_path, tmp_path, kind):
    module = make_peft_module(tiny_llama_path, tmp_path / "module", kind, seed=2)
    report = export_as_lora(module, tmp_path / "lora", tiny_llama_path, rank=2)

    assert report.rank == 2 and json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 2
    assert 0 < report.max_error <= 1 and 0 < report.mean_error <= report.max_error
    assert report.max_error == max(report.layer_errors.values())
    ids = torch.tensor(report.token_ids)  # the report's figure, measured again on its token ids
    converted = _unmerged(tiny_llama_path, tmp_path / "lora", ids)  # PEFT loads it
    measured = (converted - _unmerged(tiny_llama_path, module, ids)).abs().max()
    assert report.max_logit_diff == pytest.approx(float(measured), abs=1e-5) and measured > 0
    assert verify_module(tmp_path / "lora").manifest.kind is ModuleKind.LORA
    # a higher rank is closer
    assert export_as_lora(module, tmp_path / "lora8", tiny_llama_path, rank=8).max_error < report.max_error


def test_lora_exports_as_a_copy(tiny_llama_path, tmp_path):
    module = make_lora_module(tiny_llama_path, tmp_path / "module")
    report = export_as_lora(module, tmp_path / "lora", tiny_llama_path)
    assert report.method == "copied as it is" and report.max_logit_diff == 0.0
    for path in module.iterdir():
        assert (tmp_path / "lora" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("kind", ["prompt", "bottleneck"])
def test_as_lora_refuses_what_is_not_a_weight_delta(tiny_llama_path, tmp_path, kind):
    module = make_peft_module(tiny_llama_path, tmp_path / "module", kind)
    with pytest.raises(ConfigError, match="not a weight delta on linear layers"):
        export_as_lora(module, tmp_path / "lora", tiny_llama_path)
    assert not (tmp_path / "lora").exists()


def test_as_lora_refuses_selective_biases_and_a_rank_below_one(tiny_biased_llama_path, tmp_path):
    module = make_selective_module(tiny_biased_llama_path, tmp_path / "module", bitfit=True)
    with pytest.raises(ConfigError, match="biases, norms or embeddings"):
        export_as_lora(module, tmp_path / "lora", tiny_biased_llama_path)
    with pytest.raises(ConfigError, match="at least 1"):
        export_as_lora(module, tmp_path / "lora", tiny_biased_llama_path, rank=0)
    assert not (tmp_path / "lora").exists()


def test_as_lora_refuses_ia3_that_rescales_biased_outputs(tiny_biased_llama_path, tmp_path):
    # k_proj and v_proj outputs are rescaled: their biases change too, which no LoRA carries
    module = make_peft_module(tiny_biased_llama_path, tmp_path / "module", "ia3", seed=1)
    with pytest.raises(ConfigError, match="cannot change a bias") as refused:
        export_as_lora(module, tmp_path / "lora", tiny_biased_llama_path)
    assert "k_proj" in str(refused.value) and "--merge" in str(refused.value)
    assert not (tmp_path / "lora").exists()


def test_selective_linear_weights_export_as_lora(tiny_llama_path, tmp_path):
    module = make_selective_module(tiny_llama_path, tmp_path / "module", patterns=["*.0.self_attn.q_proj.weight"])
    report = export_as_lora(module, tmp_path / "lora", tiny_llama_path, rank=64)  # q_proj is 64 x 64: exact
    assert list(report.layer_errors) == ["model.layers.0.self_attn.q_proj"] and report.max_error < 1e-5
    expected = _logits(apply_selective(load_base(tiny_llama_path), module))
    assert (_unmerged(tiny_llama_path, tmp_path / "lora") - expected).abs().max() < 1e-4


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_export_prints_json_for_scripts(tiny_llama_path, tmp_path, registry):
    registry.push(make_peft_module(tiny_llama_path, tmp_path / "module", "ia3", seed=1), "acme/ia3")
    runner = CliRunner()
    common = ["--base", str(tiny_llama_path), "--registry", registry.uri]
    merged = runner.invoke(app, ["export", "acme/ia3@1", "--merge", "--out", str(tmp_path / "merged"), "--json", *common])
    assert merged.exit_code == 0, merged.output
    report = json.loads(merged.stdout)  # stderr has the loading bars
    assert report["mode"] == "merge" and report["module"] == "acme/ia3@1" and report["out"] == str(tmp_path / "merged")
    assert report["max_logit_diff"] <= report["tolerance"]

    lora = runner.invoke(
        app, ["export", "acme/ia3", "--as-lora", "--rank", "3", "--out", str(tmp_path / "lora"), "--json", *common]
    )
    assert lora.exit_code == 0, lora.output
    report = json.loads(lora.stdout)
    assert report["mode"] == "lora" and report["rank"] == 3 and report["kind"] == "ia3"
    assert set(report["layer_errors"]) and report["max_error"] == max(report["layer_errors"].values())

    text = runner.invoke(app, ["export", "acme/ia3@1", "--as-lora", "--out", str(tmp_path / "lora16"), *common])
    assert text.exit_code == 0, text.output
    assert "wrote a rank-16 LoRA of acme/ia3@1 (ia3)" in text.stdout and "max |difference|" in text.stdout


def test_cli_export_usage_and_refusals(tiny_llama_path, tmp_path, capsys):
    runner = CliRunner()
    out = ["--out", str(tmp_path / "out"), "--base", str(tiny_llama_path)]
    both = runner.invoke(app, ["export", "./m", "--merge", "--as-lora", *out])
    neither = runner.invoke(app, ["export", "./m", *out])
    rank = runner.invoke(app, ["export", "./m", "--merge", "--rank", "4", *out])
    assert (both.exit_code, neither.exit_code, rank.exit_code) == (2, 2, 2)
    assert "one of --merge and --as-lora" in both.output
    module = make_peft_module(tiny_llama_path, tmp_path / "module", "prefix")
    capsys.readouterr()  # what making the module printed
    assert main(["export", str(module), "--merge", *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "virtual tokens" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
