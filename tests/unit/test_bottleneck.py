"""Bottleneck adapters: the PEFT method tunehub registers (tunehub/peft_methods/bottleneck.py),
the trainer method that builds it, and the engine's batched form of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 33, 60, 101, 7, 45, 2]])


def _run(script: str) -> str:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# --- registration ------------------------------------------------------------------------------

_CHECK_REGISTERED = """
from peft import PeftConfig, PeftModel, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
member = PeftType("BOTTLENECK")
assert member is PeftType.BOTTLENECK is PeftType["BOTTLENECK"] and member == "BOTTLENECK"
assert "BOTTLENECK" in list(PeftType) and member.name == member.value == "BOTTLENECK"
assert PEFT_TYPE_TO_CONFIG_MAPPING["BOTTLENECK"].__name__ == "BottleneckConfig"
assert PEFT_TYPE_TO_TUNER_MAPPING["BOTTLENECK"].__name__ == "BottleneckModel"
assert PEFT_TYPE_TO_PREFIX_MAPPING["BOTTLENECK"] == "bottleneck_"
config = PeftConfig.from_peft_type(peft_type="BOTTLENECK", reduction_factor=4)
assert type(config).__name__ == "BottleneckConfig" and config.peft_type is member
print("registered")
"""


def test_importing_the_trainer_registers_bottleneck_with_peft_when_peft_is_imported_later():
    script = (
        "import sys\nimport tunehub.trainer\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'tunehub.trainer imported torch or peft'\n"
        + _CHECK_REGISTERED
    )
    assert _run(script).strip() == "registered"


def test_the_engine_registers_bottleneck_too():
    script = (
        "import sys\nfrom tunehub.registry.manifest import ModuleKind\nfrom tunehub.server.engine import kinds\n"
        "assert kinds.served_kind(ModuleKind.BOTTLENECK).name == 'bottleneck'\n"
        "assert 'peft' not in sys.modules, 'the engine imported peft'\n" + _CHECK_REGISTERED
    )
    assert _run(script).strip() == "registered"


def test_registration_is_idempotent_and_holds_for_the_installed_peft_in_the_pinned_range():
    import peft

    from tunehub.peft_methods import install, register_now
    from tunehub.peft_methods.bottleneck import is_registered, register

    install()  # peft is imported: registers at once (the subprocess tests cover the later import)
    register_now()
    register()
    assert is_registered()
    pins = [line for line in (REPO / "pyproject.toml").read_text().splitlines() if line.strip().startswith('"peft')]
    assert len(pins) == 1, pins
    spec = pins[0].strip().strip('",')
    from packaging.specifiers import SpecifierSet

    assert peft.__version__ in SpecifierSet(spec.removeprefix("peft")), (peft.__version__, spec)


# --- the PEFT method -----------------------------------------------------------------------------


def _causal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _perturb(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "silu", "tanh"])
def test_peft_round_trip_computes_the_bottleneck_equation(tiny_llama_path, tmp_path, non_linearity):
    from peft import PeftModel, get_peft_model

    from tunehub.peft_methods.bottleneck import NON_LINEARITIES, BottleneckConfig, BottleneckLayer

    base_logits = _logits(_causal(tiny_llama_path))
    config = BottleneckConfig(placement="houlsby", reduction_factor=8, non_linearity=non_linearity, task_type="CAUSAL_LM")
    model = get_peft_model(_causal(tiny_llama_path), config).eval()
    torch.testing.assert_close(_logits(model), base_logits, atol=0, rtol=0)  # init zeros: the base exactly
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".bottleneck_down.default." in n or ".bottleneck_up.default." in n for n in trainable)
    # 2 layers x (o_proj, down_proj) x (down W, down b, up W, up b); width 64 // 8
    assert len(trainable) == 16
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["down_proj", "down_proj", "o_proj", "o_proj"]
    assert all(m.bottleneck_down["default"].out_features == 8 for m in layers.values())
    _perturb(model)
    adapted = _logits(model)
    assert (adapted - base_logits).abs().max() > 1e-2

    # the same equation written out on the plain model: y + up(f(down(y))) after each target
    reference = _causal(tiny_llama_path)
    act = NON_LINEARITIES[non_linearity]
    hooks = []
    for name, layer in layers.items():
        down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]

        def hook(module, args, y, down=down, up=up):
            return y + (act(y @ down.weight.t() + down.bias) @ up.weight.t() + up.bias)

        hooks.append(reference.get_submodule(name.removeprefix("base_model.model.")).register_forward_hook(hook))
    torch.testing.assert_close(_logits(reference), adapted, atol=1e-5, rtol=0)
    for handle in hooks:
        handle.remove()

    model.save_pretrained(tmp_path / "module")
    saved = json.loads((tmp_path / "module" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["non_linearity"] == non_linearity
    assert sorted(saved["target_modules"]) == ["down_proj", "o_proj"]
    loaded = PeftModel.from_pretrained(_causal(tiny_llama_path), tmp_path / "module").eval()
    torch.testing.assert_close(_logits(loaded), adapted, atol=0, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(_logits(loaded), base_logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_adapter()
    torch.testing.assert_close(_logits(loaded.unload()), base_logits, atol=0, rtol=0)


def test_placements_follow_the_llama_and_bert_layouts(tiny_llama_path, tiny_bert_path):
    from peft import get_peft_model
    from transformers import AutoModelForMaskedLM

    from tunehub.peft_methods.bottleneck import BottleneckConfig, BottleneckLayer

    def adapted(model, **options):
        peft_model = get_peft_model(model, BottleneckConfig(**options))
        return sorted(
            n.split(".layers.", 1)[-1].split(".layer.", 1)[-1]
            for n, m in peft_model.named_modules()
            if isinstance(m, BottleneckLayer)
        )

    assert adapted(_causal(tiny_llama_path), placement="houlsby") == [
        "0.mlp.down_proj",
        "0.self_attn.o_proj",
        "1.mlp.down_proj",
        "1.self_attn.o_proj",
    ]
    assert adapted(_causal(tiny_llama_path), placement="pfeiffer") == ["0.mlp.down_proj", "1.mlp.down_proj"]
    assert adapted(_causal(tiny_llama_path), placement="houlsby", target_modules=["v_proj"]) == [
        "0.self_attn.v_proj",
        "1.self_attn.v_proj",
    ]
    bert = lambda: AutoModelForMaskedLM.from_pretrained(tiny_bert_path).eval()  # noqa: E731
    assert adapted(bert(), placement="houlsby") == [
        "0.attention.output.dense",
        "0.output.dense",
        "1.attention.output.dense",
        "1.output.dense",
    ]
    assert adapted(bert(), placement="pfeiffer") == ["0.output.dense", "1.output.dense"]

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="set target_modules"):
        get_peft_model(Other(), BottleneckConfig())


def test_inits_and_config_checks(tiny_llama_path):
    from peft import get_peft_model

    from tunehub.peft_methods.bottleneck import BottleneckConfig, BottleneckLayer

    torch.manual_seed(0)
    for init, std in (("bert", 0.02), ("houlsby", 0.01)):
        model = get_peft_model(_causal(tiny_llama_path), BottleneckConfig(init=init, reduction_factor=2))
        layer = next(m for m in model.modules() if isinstance(m, BottleneckLayer))
        for projection in (layer.bottleneck_down["default"], layer.bottleneck_up["default"]):
            weight = projection.weight.detach()
            assert abs(float(weight.std()) - std) < 0.25 * std, (init, float(weight.std()))
            assert not projection.bias.any()
        if init == "houlsby":
            assert float(layer.bottleneck_down["default"].weight.detach().abs().max()) <= 2 * std
    zeros = get_peft_model(_causal(tiny_llama_path), BottleneckConfig())
    layer = next(m for m in zeros.modules() if isinstance(m, BottleneckLayer))
    assert not layer.bottleneck_up["default"].weight.any() and layer.bottleneck_down["default"].weight.any()
    for bad, message in (
        ({"placement": "middle"}, "placement must be"),
        ({"non_linearity": "softmax"}, "non_linearity must be"),
        ({"init": "ones"}, "init must be"),
        ({"reduction_factor": 0}, "reduction_factor must be"),
    ):
        with pytest.raises(ValueError, match=message):
            BottleneckConfig(**bad)


def test_a_4bit_base_trains_the_bottleneck_in_fp32(tiny_llama_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunehub.peft_methods.bottleneck import BottleneckConfig, BottleneckLayer

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=quantization, device_map={"": "cpu"})
    model = get_peft_model(base, BottleneckConfig(placement="houlsby", task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(m, BottleneckLayer)]
    assert layers and {type(m.base_layer).__name__ for m in layers} == {"Linear4bit"}
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "bottleneck_up" in n)


# --- the trainer's method ------------------------------------------------------------------------


def test_the_trainer_method_builds_the_peft_config(tiny_llama_path):
    from tunehub.errors import ConfigError
    from tunehub.peft_methods.bottleneck import BottleneckConfig
    from tunehub.trainer.config import validate_run_config
    from tunehub.trainer.methods import BuildContext, get_method

    def raw(**method):
        return {
            "base": {"path": str(tiny_llama_path)},
            "method": {"name": "bottleneck", **method},
            "objective": {"name": "clm"},
            "data": {"train": [str(REPO / "examples" / "data" / "harbor.txt")]},
            "output": {"dir": "out"},
        }

    config = validate_run_config(raw(placement="houlsby", reduction_factor=4, non_linearity="silu", init="bert"))
    method = get_method("bottleneck")
    assert method.kind.value == "bottleneck" and method.quantized_base
    ctx = BuildContext(task_type="CAUSAL_LM", total_steps=10, linear_module_names=("o_proj", "down_proj"))
    peft_config = method.build_peft_config(config.method, ctx)
    assert isinstance(peft_config, BottleneckConfig)
    assert (peft_config.placement, peft_config.reduction_factor, peft_config.non_linearity, peft_config.init) == (
        "houlsby",
        4,
        "silu",
        "bert",
    )
    assert peft_config.target_modules is None and peft_config.task_type == "CAUSAL_LM"
    assert config.resolved()["method"]["placement"] == "houlsby"
    with pytest.raises(ConfigError, match="method.target_modules is empty"):
        validate_run_config(raw(target_modules=[]))
    with pytest.raises(ConfigError, match="method.non_linearity"):
        validate_run_config(raw(non_linearity="softmax"))


def test_saved_module_is_peft_loadable_and_verifies(tiny_llama_path, tmp_path):
    from peft import PeftModel

    from tunehub.registry.module import verify_module
    from tunehub.trainer.testing import make_peft_model, make_peft_module

    folder = make_peft_module(tiny_llama_path, tmp_path / "m", "bottleneck", seed=3, placement="pfeiffer", non_linearity="tanh")
    manifest = verify_module(folder).manifest
    assert manifest.kind.value == "bottleneck" and manifest.peft_loadable
    assert manifest.params["non_linearity"] == "tanh" and manifest.params["target_modules"] == ["down_proj"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    expected = _logits(make_peft_model(tiny_llama_path, "bottleneck", seed=3, placement="pfeiffer", non_linearity="tanh"))
    loaded = PeftModel.from_pretrained(_causal(tiny_llama_path), folder).eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=0, rtol=0)
    assert (expected - _logits(_causal(tiny_llama_path))).abs().max() > 1e-2  # non-trivial weights


# --- the engine's batched form --------------------------------------------------------------------


def test_the_engine_applies_the_same_non_linearities():
    from tunehub.peft_methods.bottleneck import NON_LINEARITIES as PEFT_SIDE
    from tunehub.server.engine.kinds.bottleneck import NON_LINEARITIES as ENGINE_SIDE

    assert PEFT_SIDE == ENGINE_SIDE


def test_a_mixed_plan_applies_each_rows_own_block_and_leaves_other_rows_alone():
    from types import SimpleNamespace

    from tunehub.peft_methods.bottleneck import NON_LINEARITIES
    from tunehub.server.engine.kinds.bottleneck import Bottleneck, BottleneckDelta

    generator = torch.Generator().manual_seed(0)
    out = 12

    def delta(width, non_linearity):
        rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
        return BottleneckDelta(rand(width, out), rand(width), rand(out, width), rand(out), non_linearity)

    deltas = [delta(3, "gelu"), None, delta(5, "tanh"), delta(2, "gelu"), None]
    layer = SimpleNamespace(out_features=out, in_features=7)
    y = torch.randn(len(deltas), 4, out, generator=generator)
    part = Bottleneck().plan_layer(deltas, layer, False, "cpu", torch.float32)
    got = part.after(layer, torch.zeros(1), y)
    for i, d in enumerate(deltas):
        if d is None:
            assert torch.equal(got[i], y[i])  # untouched, bit for bit
            continue
        act = NON_LINEARITIES[d.non_linearity]
        expected = y[i] + act(y[i] @ d.down.t() + d.down_bias) @ d.up.t() + d.up_bias
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)
        alone = Bottleneck().plan_layer([d], layer, True, "cpu", torch.float32)
        torch.testing.assert_close(alone.after(layer, torch.zeros(1), y[i : i + 1])[0], expected, atol=1e-5, rtol=1e-5)
