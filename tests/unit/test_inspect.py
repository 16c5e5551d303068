"""`tunehub inspect`: manifest summary, lineage, parameter counts and the singular values of every
low-rank layer's delta, for modules made with PEFT (and hostile ones made by hand)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from tests.helpers import FAKE_FINGERPRINT, make_fake_module
from tunehub.errors import (
    ConfigError,
    IntegrityError,
    InvalidModuleWeights,
    InvalidReference,
    ModuleNotFound,
    UntrustedSigner,
)
from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import BaseInfo, Manifest, ModuleKind
from tunehub.registry.module import write_module
from tunehub.registry.store import VersionInfo
from tunehub.sdk.cli import app, main
from tunehub.sdk.inspect import (
    LINEAGE_DEPTH,
    effective_rank,
    inspect_module,
    layer_table,
    low_rank_singular_values,
    plot_spectrum,
    summary_lines,
)
from tunehub.sdk.registry import Registry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WEIGHTS = "adapter_model.safetensors"
RANK, ALPHA, TRUE_RANK = 8, 16, 2
TRUE_SINGULAR_VALUES = (1.0, 0.8)
_FOLDER_NUMBERS = itertools.count()


@pytest.fixture(scope="module")
def made_modules(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One module of each kind the tests read, made once (tests copy before they change one)."""
    from tunehub.trainer.testing import make_lora_module, make_peft_module

    root = tmp_path_factory.mktemp("inspect-modules")
    return {
        "lora": make_lora_module(tiny_llama_path, root / "lora", r=RANK, alpha=ALPHA, task="demo"),
        "dora": make_lora_module(tiny_llama_path, root / "dora", r=4, alpha=8, kind="dora"),
        "adalora": make_peft_module(tiny_llama_path, root / "adalora", "adalora", r=4),
        "ia3": make_peft_module(tiny_llama_path, root / "ia3", "ia3"),
    }


def _copy(made: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made[kind], tmp_path / kind))


def _rewrite(folder: Path, change_weights: Callable[[dict], dict] | None = None, **manifest_changes: object) -> Path:
    """Change a module's weights and/or manifest, then re-hash it: a module that verifies."""
    from safetensors.torch import load_file, save_file

    if change_weights is not None:
        tensors = load_file(folder / WEIGHTS)
        save_file({k: v.contiguous() for k, v in change_weights(tensors).items()}, folder / WEIGHTS)
    manifest = Manifest.read(folder)
    if manifest_changes:
        manifest = manifest.with_updates(**manifest_changes)
    write_module(folder, manifest)
    return folder


def _factors(tensors: dict, layer: str) -> tuple:
    prefix = f"base_model.model.{layer}"
    return tensors[f"{prefix}.lora_A.weight"].double(), tensors[f"{prefix}.lora_B.weight"].double()


def _rank_two_deltas(tensors: dict) -> dict:
    """Dense A and B whose product is U diag(1, 0.8) V^T (U, V orthonormal, 2 columns): every
    layer's delta has rank exactly 2, and both effective ranks are 2 (1 holds 1/1.64 of the energy)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    changed = dict(tensors)
    for key in sorted(tensors):
        if ".lora_A." not in key:
            continue
        key_b = key.replace(".lora_A.", ".lora_B.")
        rank, in_features = tensors[key].shape
        out_features = tensors[key_b].shape[0]
        u, _ = torch.linalg.qr(torch.randn(out_features, TRUE_RANK, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(in_features, TRUE_RANK, generator=generator, dtype=torch.float64))
        mix = torch.randn(TRUE_RANK, rank, generator=generator, dtype=torch.float64)  # B = U mix
        pinv = torch.linalg.pinv(mix)
        noise = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
        # mix @ A = diag(S) V^T; the second term lies in mix's null space and adds nothing to B @ A
        a = (
            pinv @ torch.diag(torch.tensor(TRUE_SINGULAR_VALUES, dtype=torch.float64)) @ v.T
            + (torch.eye(rank, dtype=torch.float64) - pinv @ mix) @ noise
        )
        changed[key] = a.float()
        changed[key_b] = (u @ mix).float()
    return changed


@pytest.fixture
def registry_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TUNEHUB_HOME", str(tmp_path / "home"))  # the pull cache of this test
    monkeypatch.setenv("TUNEHUB_USER", "tester")
    return f"file://{tmp_path / 'registry'}"


# --- the linear algebra -------------------------------------------------------------------------


def test_low_rank_singular_values_equal_those_of_the_full_product():
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 40, generator=generator)
    b = torch.randn(24, 6, generator=generator)
    expected = torch.linalg.svdvals(1.5 * (b.double() @ a.double()))
    assert torch.allclose(low_rank_singular_values(a, b, 1.5), expected[:6], rtol=1e-10, atol=1e-12)
    # a rank larger than a side: the QR factors are not square, the values still match
    wide = torch.randn(12, 5, generator=generator), torch.randn(30, 12, generator=generator)
    values = low_rank_singular_values(*wide)
    assert torch.allclose(values, torch.linalg.svdvals(wide[1].double() @ wide[0].double())[: len(values)], atol=1e-10)


def test_effective_rank_is_the_smallest_k_holding_the_share_of_energy():
    assert effective_rank([4.0, 3.0, 0.0], 0.6) == 1  # 16 of 25
    assert effective_rank([4.0, 3.0, 0.0], 0.9) == 2
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 0.99) == 4
    assert effective_rank([1.0] + [1e-9] * 7, 0.99) == 1
    assert effective_rank([0.0, 0.0], 0.9) == 0 and effective_rank([], 0.9) == 0


# --- kinds ------------------------------------------------------------------------------------------


def test_lora_of_known_rank_two_reports_effective_rank_two(made_modules, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = _rewrite(_copy(made_modules, "lora", tmp_path), _rank_two_deltas)
    report = inspect_module(folder)
    assert report.source == "folder" and report.ref is None and report.manifest.kind.value == "lora"
    assert len(report.layers) == 14  # every linear layer of the 2-layer Llama
    for layer in report.layers:
        assert layer.rank == RANK and layer.scale == ALPHA / RANK
        assert layer.effective_rank_90 == TRUE_RANK and layer.effective_rank_99 == TRUE_RANK
        assert len(layer.singular_values) == RANK and layer.singular_values[TRUE_RANK] < 1e-5  # float32 factors
        for value, expected in zip(layer.singular_values, TRUE_SINGULAR_VALUES):
            assert math.isclose(value, layer.scale * expected, rel_tol=1e-4)
    assert report.median_effective_rank_90 == 2 and report.layers_under_half_rank == 14
    # the values are those of scale * B @ A itself
    tensors = load_file(folder / WEIGHTS)
    layer = report.layers[0]
    a, b = _factors(tensors, layer.layer)
    expected = torch.linalg.svdvals(layer.scale * (b @ a))[:RANK]
    assert torch.allclose(torch.tensor(layer.singular_values, dtype=torch.float64), expected, rtol=1e-6, atol=1e-12)
    assert math.isclose(layer.energy, float((layer.scale * (b @ a)).square().sum()), rel_tol=1e-9)
    assert report.module_params == sum(t.numel() for t in tensors.values())
    assert [row[:4] for row in layer_table(report)[1]][0] == [layer.layer, "8", "2", "2"]


def test_lora_scale_follows_rslora_and_alpha_pattern(made_modules, tmp_path):
    folder = _copy(made_modules, "lora", tmp_path)
    params = Manifest.read(folder).params
    _rewrite(folder, params={**params, "use_rslora": True, "alpha_pattern": {"q_proj": 32}})
    layers = {layer.layer: layer for layer in inspect_module(folder).layers}
    assert layers["model.layers.0.self_attn.q_proj"].scale == 32 / math.sqrt(RANK)
    assert layers["model.layers.1.mlp.down_proj"].scale == ALPHA / math.sqrt(RANK)


def test_adalora_spectrum_is_that_of_p_diag_e_q(made_modules, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = made_modules["adalora"]
    report = inspect_module(folder)
    assert report.layers and any("P diag(E) Q" in note for note in report.notes)
    tensors = load_file(folder / WEIGHTS)
    layer = report.layers[0]
    prefix = f"base_model.model.{layer.layer}"
    a, b = tensors[f"{prefix}.lora_A"].double(), tensors[f"{prefix}.lora_B"].double()
    e = tensors[f"{prefix}.lora_E"].double()
    alpha = float(Manifest.read(folder).params["lora_alpha"])
    assert layer.rank == 4 and math.isclose(layer.scale, alpha / (4 + 1e-5))
    expected = torch.linalg.svdvals(layer.scale * (b @ (e.reshape(-1, 1) * a)))[:4]
    assert torch.allclose(torch.tensor(layer.singular_values, dtype=torch.float64), expected, rtol=1e-6, atol=1e-12)


def test_dora_reports_the_direction_update_and_says_so(made_modules):
    report = inspect_module(made_modules["dora"])
    assert report.manifest.kind.value == "dora" and len(report.layers) == 14
    assert all(0 < layer.effective_rank_90 <= layer.rank == 4 for layer in report.layers)
    assert any("magnitude vector" in note for note in report.notes)
    assert any(entry.name.endswith("lora_magnitude_vector") for entry in report.tensors)


def test_ia3_has_no_spectrum_but_a_tensor_table_by_layer_kind(made_modules, tmp_path):
    report = inspect_module(made_modules["ia3"])
    assert report.layers == () and report.median_effective_rank_90 is None
    kinds = {group.layer_kind: group for group in report.tensor_groups}
    k_proj = next(group for kind, group in kinds.items() if "k_proj" in kind)
    assert "*" in k_proj.layer_kind and k_proj.tensors == 2  # one per decoder layer
    assert sum(group.numel for group in report.tensor_groups) == report.module_params
    header, rows = layer_table(report)
    assert header[0] == "layer kind" and len(rows) == len(report.tensor_groups)
    with pytest.raises(ConfigError, match="no low-rank layers"):
        plot_spectrum(report, tmp_path / "ia3.png")


# --- parameters and lineage ---------------------------------------------------------------------------


def test_share_of_base_comes_from_recorded_total_params(made_modules, tmp_path):
    folder = _copy(made_modules, "lora", tmp_path)
    report = inspect_module(folder)
    assert report.base_params is None and report.share_of_base is None
    assert report.to_dict()["parameters"]["share_of_base"] is None
    params = report.module_params
    _rewrite(folder, metrics={"total_params": 1_000_000.0 + params, "trainable_params": float(params)})
    report = inspect_module(folder)
    assert report.base_params == 1_000_000 and report.share_of_base == params / 1_000_000


def _push_with_parent(store: LocalStore, tmp_path: Path, name: str, parent: str | None) -> str:
    folder = make_fake_module(tmp_path / f"module-{next(_FOLDER_NUMBERS)}", kind="ia3")
    _rewrite(folder, parent=parent)
    return store.push(folder, name).ref


def test_lineage_lists_ancestors_and_a_missing_one_with_its_reason(registry_uri, tmp_path):
    store = LocalStore(registry_uri.removeprefix("file://"))
    root = _push_with_parent(store, tmp_path, "acme/root", None)
    middle = _push_with_parent(store, tmp_path, "acme/uft", root)
    child = _push_with_parent(store, tmp_path, "acme/sft", middle)
    store.delete(root, force=True)  # its children stay, naming a parent that is gone
    report = inspect_module("acme/sft", registry=registry_uri)  # latest: resolved to the exact version
    assert report.ref == child and report.source == "registry"
    steps = report.lineage
    assert [(s.ref, s.resolved, s.kind, s.error) for s in steps[:1]] == [(middle, middle, "ia3", None)]
    assert steps[1].ref == root and steps[1].resolved is None and "acme/root" in (steps[1].error or "")
    assert len(steps) == 2 and report.lineage_cut is None
    assert "lineage    acme/uft@1 (ia3, task demo)" in summary_lines(report)


class _ScriptedRegistry(Registry):
    """A registry whose versions and parents are given in memory: push refuses the loops and
    over-long chains that a damaged or hand-edited store could still hold, so they are made here."""

    def __init__(self, uri: str, parents: dict[str, str | None]):
        super().__init__(uri)
        self.parents = parents

    def resolve(self, ref):
        if ref not in self.parents:
            raise ModuleNotFound(f"no version {ref}")
        repo, _, version = str(ref).partition("@")
        return VersionInfo(repo, int(version), "0" * 64, "lora", "", "tester", FAKE_FINGERPRINT, "tiny-base", task="t")

    def manifest(self, ref):
        base = BaseInfo(model_id="tiny-base", fingerprint=FAKE_FINGERPRINT)
        return Manifest(kind=ModuleKind.LORA, base=base, parent=self.parents[str(ref)])


def test_lineage_stops_at_a_cycle_and_at_the_depth_limit(registry_uri, tmp_path):
    folder = _rewrite(make_fake_module(tmp_path / "looped", kind="ia3"), parent="acme/a@1")
    looped = _ScriptedRegistry(registry_uri, {"acme/a@1": "acme/b@1", "acme/b@1": "acme/a@1"})
    report = inspect_module(folder, registry=looped)
    assert [s.resolved for s in report.lineage] == ["acme/a@1", "acme/b@1", "acme/a@1"]
    assert "cycle" in (report.lineage[-1].error or "") and "cycle" in (report.lineage_cut or "")

    folder = _rewrite(make_fake_module(tmp_path / "deep", kind="ia3"), parent="acme/c@1")
    chain = {f"acme/c@{n}": f"acme/c@{n + 1}" for n in range(1, LINEAGE_DEPTH + 10)}
    report = inspect_module(folder, registry=_ScriptedRegistry(registry_uri, chain))
    assert len(report.lineage) == LINEAGE_DEPTH and all(step.error is None for step in report.lineage)
    assert f"depth {LINEAGE_DEPTH}" in (report.lineage_cut or "")


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_json_and_plot_for_a_pushed_lora(made_modules, registry_uri, tmp_path, monkeypatch):
    folder = _rewrite(_copy(made_modules, "lora", tmp_path), _rank_two_deltas)
    Registry(registry_uri).push(folder, "acme/demo")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["inspect", "acme/demo@1", "--registry", registry_uri, "--json", "--plot", "spectrum.png"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["ref"] == "acme/demo@1" and payload["kind"] == "lora" and payload["task"] == "demo"
    assert payload["base"]["fingerprint_short"].startswith("w1:") and payload["files"][0]["size_bytes"] > 0
    assert payload["summary"]["median_effective_rank_90"] == 2 and payload["summary"]["layers"] == 14
    assert payload["layers"][0]["effective_rank_99"] == 2 and len(payload["layers"][0]["singular_values"]) == RANK
    assert payload["parameters"]["module"] > 0 and payload["parameters"]["share_of_base"] is None
    assert payload["plot"] == "spectrum.png" and payload["manifest"]["kind"] == "lora"
    assert (work / "spectrum.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in work.iterdir()) == ["spectrum.png"]  # the pull went to the cache, not here

    result = CliRunner().invoke(app, ["inspect", "acme/demo", "--registry", registry_uri, "--plot", "again.png"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["module", "acme/demo@1"] and lines[1].startswith("kind       lora (r=8, lora_alpha=16")
    assert "layer\trank\teff. rank 90%\teff. rank 99%\ttop singular value\tsum of squares" in lines
    assert any(line.startswith("model.layers.0.self_attn.q_proj\t8\t2\t2\t") for line in lines)
    assert any(line.startswith("median effective rank 2 (90% energy)") and "14 of 14 layers" in line for line in lines)
    assert lines[-1] == "wrote the spectrum plot to again.png"
    assert (work / "again.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cli_refuses_a_missing_ref_and_trust_for_a_folder(made_modules, registry_uri, capsys, tmp_path):
    Registry(registry_uri)  # an empty registry
    assert main(["inspect", "acme/nothing@1", "--registry", registry_uri]) == 1
    assert "acme/nothing" in capsys.readouterr().err
    with pytest.raises(ModuleNotFound):
        inspect_module("acme/nothing", registry=registry_uri)
    with pytest.raises(InvalidReference, match="neither a module folder nor a registry reference"):
        inspect_module(str(tmp_path / "no-such-folder"), registry=registry_uri)
    key = tmp_path / "key.pub"
    key.write_text("unused")
    with pytest.raises(ConfigError, match="registry references only"):
        inspect_module(made_modules["ia3"], trust=[key])


def test_trust_keys_check_the_signature_before_anything_is_read(made_modules, registry_uri, tmp_path):
    from tunehub.registry.signing import generate_key_pair

    for name in ("release", "stranger"):
        generate_key_pair(tmp_path / name)
    Registry(registry_uri).push(made_modules["ia3"], "acme/signed", sign=tmp_path / "release")
    with pytest.raises(UntrustedSigner):
        inspect_module("acme/signed@1", registry=registry_uri, trust=[tmp_path / "stranger.pub"], require_signed=True)
    cache = tmp_path / "home" / "modules"  # the pull cache of registry_uri's TUNEHUB_HOME
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))
    report = inspect_module("acme/signed@1", registry=registry_uri, trust=[tmp_path / "release.pub"], require_signed=True)
    assert report.ref == "acme/signed@1" and any(cache.rglob("*.safetensors"))


# --- hostile modules ----------------------------------------------------------------------------------


def _hostile(made_modules, tmp_path: Path, change: Callable[[dict], dict]) -> Path:
    return _rewrite(_copy(made_modules, "lora", tmp_path), change)


def _first_key(tensors: dict, part: str) -> str:
    return next(key for key in sorted(tensors) if part in key)


def test_hostile_weights_are_refused_with_a_clear_error(made_modules, tmp_path):
    def three_dimensional_a(tensors: dict) -> dict:
        key = _first_key(tensors, ".lora_A.")
        return {**tensors, key: tensors[key].reshape(RANK, 2, -1)}

    def mismatched_b(tensors: dict) -> dict:
        key = _first_key(tensors, ".lora_B.")
        return {**tensors, key: tensors[key][:, : RANK - 3]}

    def missing_b(tensors: dict) -> dict:
        return {k: v for k, v in tensors.items() if k != _first_key(tensors, ".lora_B.")}

    def rank_not_in_config(tensors: dict) -> dict:  # consistent A and B of rank 3, config says 8
        changed = dict(tensors)
        for part, cut in ((".lora_A.", lambda t: t[:3]), (".lora_B.", lambda t: t[:, :3])):
            key = _first_key(tensors, part)
            changed[key] = cut(tensors[key])
        return changed

    def integer_factor(tensors: dict) -> dict:
        import torch

        key = _first_key(tensors, ".lora_A.")
        return {**tensors, key: tensors[key].to(dtype=torch.int32)}

    cases = [
        (three_dimensional_a, "must be matrices"),
        (mismatched_b, "B's columns must match A's rows"),
        (missing_b, "no lora_B"),
        (rank_not_in_config, "gives it r=8"),
        (integer_factor, "low-rank factors are floats"),
    ]
    for i, (change, message) in enumerate(cases):
        folder = _hostile(made_modules, tmp_path / str(i), change)
        with pytest.raises(InvalidModuleWeights, match=message):
            inspect_module(folder)


def test_hostile_module_in_a_registry_fails_the_cli_with_one_line(made_modules, registry_uri, tmp_path, capsys):
    def mismatched(tensors: dict) -> dict:
        key = _first_key(tensors, ".lora_B.")
        return {**tensors, key: tensors[key][:, :2]}

    Registry(registry_uri).push(_hostile(made_modules, tmp_path, mismatched), "acme/bad")  # shapes pass push's checks
    assert main(["inspect", "acme/bad@1", "--registry", registry_uri]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: acme/bad@1: ") and "must match" in err and len(err.splitlines()) == 1


def test_tampered_or_non_safetensors_weights_are_refused(made_modules, tmp_path):
    tampered = _copy(made_modules, "ia3", tmp_path / "a")
    with open(tampered / WEIGHTS, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x7f")  # a changed value: its sha256 no longer matches
    with pytest.raises(IntegrityError, match="sha256|does not match"):
        inspect_module(tampered)
    fake = _copy(made_modules, "ia3", tmp_path / "b")
    (fake / WEIGHTS).write_bytes(b"this is not a safetensors file")
    _rewrite(fake)  # hashes match: only the format is wrong
    with pytest.raises(IntegrityError, match="not a valid safetensors file"):
        inspect_module(fake)
