"""Module kinds are plugins of the engine (server/engine/kinds/): a kind registered from outside
the engine is served in a mixed batch, every ModuleKind is either served or refused by name with
what to do instead, and a mixed batch's plan follows its rows' order."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import Manifest, ModuleKind
from tunehub.server.engine import (
    Engine,
    GenerationRequest,
    SamplingParams,
    UnsupportedModule,
    kinds,
    load_base,
)
from tunehub.server.engine.kinds import ServedKind, register_kind, unregister_kind
from tunehub.server.engine.modules import (
    WEIGHTS_FILE,
    ModuleMaterializer,
    layer_and_param,
)

#: what the engine serves today (a kind added here needs a group in server/engine/kinds/)
SERVED = {
    "lora",
    "dora",
    "adalora",
    "ia3",
    "prompt",
    "ptuning",
    "multitask_prompt",
    "prefix",
    "bottleneck",
    "selective",
    "tokenizer",
}
TOY_LAYER = "model.layers.0.mlp.down_proj"


# --- a kind of the test's own, registered with no edit of the engine ------------------------------


class _ScaleOutputPart:
    """The batch's output scales at one layer: ones for rows of other modules."""

    before = None  # nothing to do to the layer's input

    def __init__(self, scale: torch.Tensor):
        self.scale = scale  # (B, 1, out)

    def after(self, layer: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale


class ScaleOutput(ServedKind):
    """A toy kind: a vector that scales the output of one linear layer. It reuses the
    ``full`` kind value (no engine group mixes it) under a test-only group."""

    name = "test_scale_output"
    kinds = (ModuleKind.FULL,)

    def materialize(self, materializer: ModuleMaterializer, loaded: Any, weights: dict[str, Any], name: str) -> None:
        for key, tensor in weights.items():
            layer, _ = layer_and_param(key)
            target = materializer.target_layer(layer, name)
            vector = tensor.float().reshape(-1)
            assert vector.numel() == target.out_features
            loaded.layers[layer] = vector.contiguous()

    def plan_layer(self, deltas: list[Any], layer: Any, shared: bool, device: Any, dtype: Any) -> _ScaleOutputPart:
        scale = torch.ones(len(deltas), 1, layer.out_features)
        for i, vector in enumerate(deltas):
            if vector is not None:
                scale[i, 0] = vector
        return _ScaleOutputPart(scale.to(device=device, dtype=dtype))


@pytest.fixture
def scale_output_kind():
    group = register_kind(ScaleOutput())
    try:
        yield group
    finally:
        unregister_kind(group)  # the other tests see the engine's own kinds only


def _toy_module(source: Path, dest: Path, vector: torch.Tensor) -> Path:
    """A copy of a module folder turned into a toy-kind module scaling TOY_LAYER by ``vector``."""
    from safetensors.torch import save_file

    from tunehub.registry.module import write_module

    shutil.copytree(source, dest)
    save_file({f"base_model.model.{TOY_LAYER}.scale": vector}, dest / WEIGHTS_FILE)
    (dest / "adapter_config.json").unlink()  # not a PEFT module any more
    write_module(dest, Manifest.read(dest).with_updates(kind=ModuleKind.FULL.value, params={}))
    return dest


def test_a_kind_registered_outside_the_engine_is_served_next_to_a_lora_row(
    scale_output_kind, tiny_llama_path, lora_module, tmp_path
):
    from transformers import AutoModelForCausalLM

    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    lora = lora_module(seed=1)
    store.push(lora, "t/lora")
    vector = 1.0 + 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    width = reference.get_submodule(TOY_LAYER).out_features
    vector = vector[:width] if width <= 64 else torch.cat([vector, torch.ones(width - 64)])
    store.push(_toy_module(lora, tmp_path / "toy", vector), "t/toy")

    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    tok = engine.tokenizer
    rows = [(tok("the river runs")["input_ids"], "t/lora"), (tok("seven apples")["input_ids"], "t/toy")]
    mixed = engine.logits(rows)
    # the toy row equals the plain model with that layer's output scaled; the LoRA row its module alone
    hook = reference.get_submodule(TOY_LAYER).register_forward_hook(lambda module, args, out: out * vector)
    with torch.no_grad():
        expected_toy = reference(input_ids=torch.tensor([rows[1][0]])).logits[0].float()
    hook.remove()
    with torch.no_grad():
        plain = reference(input_ids=torch.tensor([rows[1][0]])).logits[0].float()
    torch.testing.assert_close(mixed[1], expected_toy, atol=1e-4, rtol=0)
    assert not torch.allclose(mixed[1], plain, atol=1e-3)  # the toy kind did change the row
    torch.testing.assert_close(mixed[0], engine.logits([rows[0]])[0], atol=1e-5, rtol=0)
    # decode steps too: each row of the mixed batch generates what it generates alone
    params = SamplingParams(max_tokens=5, stop_token_ids=[])
    together = engine.generate([GenerationRequest(input_ids=ids, module=ref, params=params) for ids, ref in rows])
    for (ids, ref), result in zip(rows, together, strict=True):
        alone = engine.generate([GenerationRequest(input_ids=ids, module=ref, params=params)])[0]
        assert result.token_ids == alone.token_ids, ref
        assert result.module == f"{ref}@1"
    engine.close()


# --- every ModuleKind is served or refused by name -------------------------------------------------


def test_every_module_kind_is_served_or_refused_with_what_to_do_instead(lora_module):
    manifest = Manifest.read(lora_module(seed=0))
    base = SimpleNamespace(
        name="tiny-llama",
        fingerprint=manifest.base.fingerprint,
        vocab_size=manifest.base.vocab_size,
        tokenizer_fingerprint=manifest.tokenizer.fingerprint if manifest.tokenizer else None,
    )
    materializer = ModuleMaterializer(base, {})
    served, refused = set(), set()
    for kind in ModuleKind:
        group = kinds.served_kind(kind)
        if group is not None:
            assert kind in group.kinds
            materializer.admit(manifest.with_updates(kind=kind.value, params={}), "t/m@1")  # admitted
            served.add(kind.value)
            continue
        with pytest.raises(UnsupportedModule) as refusal:
            materializer.admit(manifest.with_updates(kind=kind.value, params={}), "t/m@1")
        message = str(refusal.value)
        # today's message, then what to do instead
        assert message.startswith(f"t/m@1: modules of kind {kind.value} cannot be served in mixed batches yet; ")
        assert message.endswith(kinds.NOT_SERVABLE[kind])
        refused.add(kind.value)
    assert served == SERVED
    assert refused == {"full", "template"}
    assert "serve it as the base (tunehub serve --base" in kinds.NOT_SERVABLE[ModuleKind.FULL]
    assert "applied to the prompt by tunehub serve" in kinds.NOT_SERVABLE[ModuleKind.TEMPLATE]


def test_registering_a_kind_twice_or_under_a_taken_kind_is_refused():
    class Duplicate(ServedKind):
        name = "test_duplicate"
        kinds = (ModuleKind.LORA,)

    with pytest.raises(ValueError, match="kind lora is already served by group 'low_rank'"):
        register_kind(Duplicate())
    assert kinds.served_kind(ModuleKind.LORA).name == "low_rank"
    with pytest.raises(ValueError, match="lowercase"):
        register_kind(type("Bad", (ServedKind,), {"name": "Bad-Name"})())


# --- a plan follows its rows' order ------------------------------------------------------------------


def test_mixed_batches_in_any_row_order_match_each_module_alone(tiny_llama_path, lora_module, tmp_path):
    from tunehub.trainer.testing import make_peft_module

    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    store.push(lora_module(seed=1, r=4), "t/a")
    store.push(lora_module(seed=2, kind="dora", r=2), "t/b")  # another rank and a DoRA gain
    # bottleneck blocks after the same layers the LoRA adapts (and another kind group's part)
    store.push(make_peft_module(tiny_llama_path, tmp_path / "c", "bottleneck", seed=3), "t/c")
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    tok = engine.tokenizer
    first, second = tok("the river runs")["input_ids"], tok("a small red house near the")["input_ids"]
    params = SamplingParams(max_tokens=4, stop_token_ids=[])
    batches = [
        [(first, "t/a"), (second, "t/b")],
        [(first, "t/b"), (second, "t/a")],
        [(first, None), (second, "t/a")],
        [(first, "t/c"), (second, "t/a")],
        [(first, "t/a"), (second, "t/c")],
        [(first, None), (second, "t/c")],
    ]
    got = []
    for rows in batches:  # one engine: a plan cached for one order must not serve another
        logits = engine.logits(rows)
        results = engine.generate([GenerationRequest(input_ids=ids, module=ref, params=params) for ids, ref in rows])
        got.append((logits, [r.token_ids for r in results]))
    assert len(engine._plans) >= len(batches)  # every composition got its own plan
    for rows, (logits, tokens) in zip(batches, got, strict=True):
        for row, row_logits, row_tokens in zip(rows, logits, tokens, strict=True):
            alone = engine.logits([row])[0]
            torch.testing.assert_close(row_logits, alone, atol=1e-5, rtol=0)
            ids, ref = row
            expected = engine.generate([GenerationRequest(input_ids=ids, module=ref, params=params)])[0].token_ids
            assert row_tokens == expected, (rows, ref)
    # the two modules really differ at the same prompt (a swapped plan could not pass unseen)
    assert not torch.allclose(engine.logits([(first, "t/a")])[0], engine.logits([(first, "t/b")])[0], atol=1e-3)
    assert not torch.allclose(engine.logits([(first, "t/a")])[0], engine.logits([(first, "t/c")])[0], atol=1e-3)
    engine.close()


# --- selective modules: per-row norm and bias deltas --------------------------------------------------


class _OnePlusWeightNorm(torch.nn.Module):
    """An RMS norm that scales by (1 + weight), as Gemma's does: the engine must not assume y = w * n(x)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


def _layer_norm(width: int) -> torch.nn.Module:
    norm = torch.nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(width))
        norm.bias.copy_(0.2 * torch.randn(width))
    return norm


def _llama_rms_norm(width: int) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(width)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(width))
    return norm


@pytest.mark.parametrize(
    "make_norm", [_layer_norm, _llama_rms_norm, _OnePlusWeightNorm], ids=["layernorm", "rmsnorm", "one-plus-w"]
)
@pytest.mark.parametrize("shape", [(3, 5, 16), (3, 5, 2, 16)], ids=["tokens", "per-head"])
def test_selective_rows_of_a_norm_equal_the_norm_with_their_own_tensors(make_norm, shape):
    from tunehub.server.engine.layers import BatchState, build_plan, patch_norm_layers
    from tunehub.server.engine.modules import LoadedModule

    torch.manual_seed(0)
    container = torch.nn.ModuleDict({"norm": make_norm(16)})
    reference = {name: p.detach().clone() for name, p in container["norm"].named_parameters()}
    state = BatchState()
    norms = patch_norm_layers(container, state)
    assert list(norms) == ["norm"]
    materializer = ModuleMaterializer(SimpleNamespace(), {}, norm_layers=norms)
    group = kinds.served_kind(ModuleKind.SELECTIVE)
    modules, tensors = [], []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        trained = {f"norm.{n}": v + 0.5 * torch.randn(v.shape, generator=generator) for n, v in reference.items()}
        loaded = LoadedModule(key=f"t/s{seed}@1", kind=ModuleKind.SELECTIVE, manifest=None, served=group, uid=seed)
        group.materialize(materializer, loaded, trained, f"t/s{seed}@1")
        modules.append(loaded)
        tensors.append(trained)
    x = torch.randn(*shape)
    state.layers = build_plan([modules[0], None, modules[1]], norms, "cpu", torch.float32)
    mixed = container["norm"](x)
    state.layers = {}
    for row, trained in ((0, tensors[0]), (1, None), (2, tensors[1])):
        expected_norm = copy.deepcopy(norms["norm"].base)
        if trained is not None:
            with torch.no_grad():
                for name, value in trained.items():
                    getattr(expected_norm, name.removeprefix("norm.")).copy_(value)
        torch.testing.assert_close(mixed[row], expected_norm(x[row : row + 1])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the deltas are visible


def test_selective_module_refusals_name_the_tensor_and_what_to_do(tiny_biased_llama_path, tmp_path):
    from tunehub.errors import IncompatibleBase
    from tunehub.server.engine.modules import InvalidModuleWeights
    from tunehub.trainer.testing import make_selective_module

    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    store.push(make_selective_module(tiny_biased_llama_path, tmp_path / "block", seed=1, layers=[1]), "t/block")
    store.push(make_selective_module(tiny_biased_llama_path, tmp_path / "bitfit", seed=2, bitfit=True), "t/bitfit")
    engine = Engine(load_base(tiny_biased_llama_path, quantization="none"), store)
    try:
        with pytest.raises(
            UnsupportedModule, match=r"t/block@1: its tensor model\.layers\.1\..* is not a bias .*apply_selective"
        ):
            engine.pool.acquire("t/block")
        loaded = engine.pool.acquire("t/bitfit")
        # every linear layer of the blocks has a bias delta, and nothing else
        assert set(loaded.layers) == set(engine.layers) and all(d.weight is None for d in loaded.layers.values())
        engine.pool.release(loaded)
        materializer = engine.materializer
        group = kinds.served_kind(ModuleKind.SELECTIVE)
        bias = "model.layers.0.mlp.up_proj.bias"
        for weights, error, message in [
            ({}, InvalidModuleWeights, "no tensors"),
            ({bias: torch.zeros(7)}, IncompatibleBase, r"has shape \(7,\), this base's has \(128,\)"),
            ({"lm_head.weight": torch.zeros(512, 64)}, UnsupportedModule, "lm_head.weight is not a bias"),
            ({"model.layers.0.mlp.up_proj.lora_A": torch.zeros(128)}, UnsupportedModule, "not a bias"),
        ]:
            loaded = SimpleNamespace(layers={}, manifest=None)
            with pytest.raises(error, match=message):
                group.materialize(materializer, loaded, weights, "t/x@1")
    finally:
        engine.close()
