"""The engine against PEFT: every kind alone and mixed, fp32 and nf4, generation, continuous
batching, isolation, and bad input that fails one request only."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.unit.test_engine_isolation import push_unchecked
from tunehub.devices import resolve_compute_dtype
from tunehub.errors import IncompatibleBase, ModuleNotFound
from tunehub.quantization import keep_4bit_layout
from tunehub.registry.local import LocalStore
from tunehub.server.engine import (
    Engine,
    GenerationRequest,
    PromptTooLong,
    SamplingParams,
    UnsupportedModule,
    load_base,
)
from tunehub.server.engine.modules import InvalidModuleWeights

pytestmark = pytest.mark.integration
KINDS = ["lora", "dora", "adalora", "ia3", "prompt", "ptuning", "multitask_prompt", "prefix", "bottleneck"]
PROMPTS = [
    "the river runs",
    "she reads a book and then",
    "seven apples",
    "a small red house near the",
    "we",
    "in the morning the old",
    "they walked",
    "someone bought twelve",
    "the bottleneck row says",
    "base row here",
]
#: modules beyond one per kind: another rank and targets, another bottleneck width, placement and non-linearity
EXTRA = {
    "lora-r8": ("lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    "bottleneck-relu": ("bottleneck", {"placement": "pfeiffer", "reduction_factor": 4, "non_linearity": "relu"}),
}
EXTRA_PROMPTS = ["another lora with rank eight", "a second bottleneck, relu"]


@pytest.fixture(scope="module")
def store(tiny_llama_path, tmp_path_factory):
    from tunehub.trainer.testing import make_peft_module

    root = tmp_path_factory.mktemp("engine-registry")
    store = LocalStore(root / "reg", cache_dir=root / "cache")
    for i, kind in enumerate(KINDS):
        make_peft_module(tiny_llama_path, root / kind, kind, seed=i + 1)
        store.push(root / kind, f"t/{kind}")
    # a second LoRA of another rank and other target layers, to mix ranks and targets, and a second
    # bottleneck of another width, placement and non-linearity, to mix those
    for seed, (name, (kind, options)) in enumerate(EXTRA.items(), start=42):
        make_peft_module(tiny_llama_path, root / name, kind, seed=seed, **options)
        store.push(root / name, f"t/{name}")
    store.module_root = root
    return store


def _peft_model(base_path, store, kind, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantization == "nf4":
        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=resolve_compute_dtype("auto"),  # what the engine picks here
            ),
            "device_map": {"": "cpu"},
        }
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs).eval()
    keep_4bit_layout(model)  # PEFT's DoRA dequantizes the base: the layout it reads (as tunehub loads it)
    if kind is None:
        return model
    return PeftModel.from_pretrained(model, store.module_root / kind).eval()


def _peft_logits(model, kind, ids):
    extra = {"task_ids": torch.tensor([0])} if kind == "multitask_prompt" else {}
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), **extra).logits[0, -len(ids) :].float()


def _peft_greedy(model, kind, ids, steps):
    # PEFT's forward is the reference; its generate() mishandles prompt learning with
    # transformers 5 (it looks for `past_key_values`, now named `cache`), so decode by forward
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(_peft_logits(model, kind, seq)[-1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_mixed_batch_of_every_kind_matches_peft(quantization, tiny_llama_path, store):
    engine = Engine(load_base(tiny_llama_path, quantization=quantization), store)
    tok = engine.tokenizer
    refs = [f"t/{k}" for k in KINDS] + [None] + [f"t/{name}" for name in EXTRA]
    prompts = PROMPTS + EXTRA_PROMPTS
    assert len(prompts) == len(refs)
    rows = [(tok(p)["input_ids"], ref) for p, ref in zip(prompts, refs, strict=False)]
    logits = engine.logits(rows)
    requests = [
        GenerationRequest(input_ids=ids, module=ref, params=SamplingParams(max_tokens=6, stop_token_ids=[])) for ids, ref in rows
    ]
    results = engine.generate(requests)
    tolerance = 1e-4 if quantization == "none" else 1e-3  # nf4 matmuls compute in bf16
    for (ids, ref), got, result in zip(rows, logits, results, strict=False):
        kind = ref.split("/")[1] if ref else None
        model = _peft_model(tiny_llama_path, store, kind, quantization)
        torch.testing.assert_close(got, _peft_logits(model, kind, ids), atol=tolerance, rtol=0)
        assert result.token_ids == _peft_greedy(model, kind, ids, 6), ref
        assert result.module == (f"{ref}@1" if ref else None)
        assert result.finish_reason == "length" and result.completion_tokens == 6
    engine.close()


#: selective modules the engine mixes: (name, selectors); on the biased tiny Llama
SELECTIVE_ROWS = [
    ("bitfit", {"bitfit": True}),
    ("norms", {"layernorm": True}),
    ("bitfit-norms", {"bitfit": True, "layernorm": True}),
]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_bitfit_and_norm_rows_mix_with_lora_and_match_the_trained_model(quantization, tiny_biased_llama_path, tmp_path):
    from peft import PeftModel

    from tunehub.trainer.methods.selective import apply_selective
    from tunehub.trainer.testing import make_peft_module, make_selective_module

    base_path = tiny_biased_llama_path
    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    for seed, (name, selectors) in enumerate(SELECTIVE_ROWS, start=1):
        store.push(make_selective_module(base_path, tmp_path / name, seed=seed, **selectors), f"t/{name}")
    store.push(make_peft_module(base_path, tmp_path / "lora", "lora", seed=9), "t/lora")
    engine = Engine(load_base(base_path, quantization=quantization), store)
    tok = engine.tokenizer
    refs = ["t/bitfit", None, "t/lora", "t/norms", "t/bitfit-norms"]
    rows = [(tok(p)["input_ids"], ref) for p, ref in zip(PROMPTS, refs, strict=False)]
    logits = engine.logits(rows)
    results = engine.generate(
        [
            GenerationRequest(input_ids=ids, module=ref, params=SamplingParams(max_tokens=6, stop_token_ids=[]))
            for ids, ref in rows
        ]
    )
    engine.close()
    # nf4 or not, one kernel and one order of operations; but where nf4 computes in bf16, the
    # trained model's bias is rounded to bf16 inside the 4-bit matmul while the engine adds the
    # row's bias delta after it in fp32 (about 1.5e-3 apart on these logits)
    bf16 = quantization == "nf4" and resolve_compute_dtype("auto") == torch.bfloat16
    tolerance = 4e-3 if bf16 else 1e-4
    base_model = _peft_model(base_path, None, None, quantization)
    for (ids, ref), got, result in zip(rows, logits, results, strict=True):
        model = _peft_model(base_path, None, None, quantization)  # the trained model: the base with the module's tensors
        name = ref.split("/")[1] if ref else None
        if name == "lora":
            model = PeftModel.from_pretrained(model, tmp_path / "lora").eval()
        elif name is not None:
            apply_selective(model, tmp_path / name)
        expected = _peft_logits(model, None, ids)
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
        assert result.token_ids == _peft_greedy(model, None, ids, 6), ref
        if name is not None:  # the module changes the answer: a row served as the base could not pass
            assert (expected - _peft_logits(base_model, None, ids)).abs().max() > 1e-2, ref


def test_a_pruned_adalora_module_matches_peft(tiny_llama_path, tmp_path):
    """Training prunes AdaLoRA layers below their initial rank; PEFT keeps scaling them by
    alpha / init_r (its ranknum), not by the rank that is left."""
    from tunehub.trainer.export import save_peft_module
    from tunehub.trainer.testing import make_peft_model

    model = make_peft_model(tiny_llama_path, "adalora", seed=3, r=4)
    names = [n.removeprefix("base_model.model.") for n, _ in model.named_parameters() if n.endswith("lora_E.default")]
    # what RankAllocator leaves: some layers keep 2 of 4 ranks, the others all 4
    model.peft_config["default"].rank_pattern = {
        n: [True, False, True, False] if i % 2 else [True] * 4 for i, n in enumerate(names)
    }
    save_peft_module(model, tmp_path / "pruned", base_path=tiny_llama_path, kind="adalora")
    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    store.push(tmp_path / "pruned", "t/pruned")
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    try:
        loaded = engine.pool.acquire("t/pruned")
        assert sorted({d.rank for d in loaded.layers.values()}) == [2, 4]
        engine.pool.release(loaded)
        ids = engine.tokenizer("the river runs")["input_ids"]
        [got] = engine.logits([(ids, "t/pruned")])
    finally:
        engine.close()
    expected = _peft_logits(_peft_model(tiny_llama_path, SimpleNamespace(module_root=tmp_path), "pruned", "none"), None, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_each_kind_alone_matches_its_mixed_row(tiny_llama_path, store):
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    tok = engine.tokenizer
    rows = [(tok(p)["input_ids"], f"t/{k}") for p, k in zip(PROMPTS, KINDS, strict=False)]
    mixed = engine.logits(rows)
    for row, expected in zip(rows, mixed, strict=False):
        torch.testing.assert_close(engine.logits([row])[0], expected, atol=1e-5, rtol=0)
    engine.close()


def test_continuous_batching_requests_join_and_leave(tiny_llama_path, store):
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store, max_batch=4)
    specs = [(p, f"t/{k}", n) for p, k, n in zip(PROMPTS, KINDS, [3, 9, 5, 12, 2, 7, 4, 10, 6], strict=False)]
    assert len(specs) == len(KINDS)
    alone = []
    for prompt, ref, n in specs:
        params = SamplingParams(max_tokens=n, stop_token_ids=[])
        alone.append(engine.generate([GenerationRequest(prompt=prompt, module=ref, params=params)])[0].token_ids)
    # all at once through a batch of 4: short requests leave, waiting ones join mid-decode
    handles = [
        engine.submit(GenerationRequest(prompt=p, module=ref, params=SamplingParams(max_tokens=n, stop_token_ids=[])))
        for p, ref, n in specs
    ]
    for handle, expected in zip(handles, alone, strict=False):
        assert handle.result(timeout=60).token_ids == expected
    streamed = engine.submit(
        GenerationRequest(prompt=PROMPTS[0], module="t/prefix", params=SamplingParams(max_tokens=5, stop_token_ids=[]))
    )
    events = list(streamed)
    assert [e.token_id for e in events if e.token_id >= 0] == streamed.result().token_ids
    assert "".join(e.text for e in events) == streamed.result().text
    engine.close()


def test_two_engines_share_one_loaded_base(tiny_llama_path, store):
    base = load_base(tiny_llama_path, quantization="none")
    first = Engine(base, store)
    request = lambda: GenerationRequest(
        prompt=PROMPTS[1], module="t/dora", params=SamplingParams(max_tokens=6, stop_token_ids=[])
    )  # noqa: E731
    expected = first.generate([request()])[0].token_ids
    second = Engine(base, store)  # the layers are patched once; the second engine reuses them
    assert second.layers is first.layers
    assert second.generate([request()])[0].token_ids == expected
    assert first.generate([request()])[0].token_ids == expected
    first.close()
    second.close()


def test_sampling_is_seeded_per_request_and_stops(tiny_llama_path, store):
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, stop_token_ids=[])
    a = engine.generate([GenerationRequest(prompt="we", module="t/lora", params=SamplingParams(seed=7, **params))])[0]
    b, c = engine.generate(
        [
            GenerationRequest(prompt="we", module="t/lora", params=SamplingParams(seed=7, **params)),
            GenerationRequest(prompt="we", module="t/dora", params=SamplingParams(seed=8, **params)),
        ]
    )
    assert a.token_ids == b.token_ids  # same seed, same tokens, whatever else is in the batch
    assert a.token_ids != c.token_ids
    full = engine.generate([GenerationRequest(prompt="we", params=SamplingParams(max_tokens=8, stop_token_ids=[]))])[0]
    stop_token = full.token_ids[3]
    stopped = engine.generate([GenerationRequest(prompt="we", params=SamplingParams(max_tokens=8, stop_token_ids=[stop_token]))])[
        0
    ]
    assert stopped.token_ids == full.token_ids[:3] and stopped.finish_reason == "stop"
    stop_text = full.text[len(full.text) // 2 :][:3]
    if stop_text.strip():
        cut = engine.generate(
            [GenerationRequest(prompt="we", params=SamplingParams(max_tokens=8, stop=[stop_text], stop_token_ids=[]))]
        )[0]
        assert cut.finish_reason == "stop" and stop_text not in cut.text and full.text.startswith(cut.text)
    engine.close()


def test_bad_requests_fail_alone(tiny_llama_path, store, tmp_path):
    from tunehub.trainer.testing import make_peft_module

    # a module whose rank is above the engine's maximum
    make_peft_module(tiny_llama_path, tmp_path / "big", "lora", seed=3, r=16)
    store.push(tmp_path / "big", "t/big-rank")
    # a corrupt safetensors file with matching hashes, in a store that took it unchecked: the
    # module is at fault, not the store (a 4xx, not an IntegrityError's 502)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(store.module_root / "lora", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    _rehash(corrupt)
    push_unchecked(store, corrupt, "t/corrupt")
    # a selective module that replaces whole weight matrices (here: LoRA's), which no row can mix
    selective = tmp_path / "selective"
    shutil.copytree(store.module_root / "lora", selective)
    _rehash(selective, kind="selective")
    store.push(selective, "t/selective")
    # a module for another base
    other = tmp_path / "other"
    shutil.copytree(store.module_root / "lora", other)
    _rehash(other, fingerprint="0" * 64)
    store.push(other, "t/other-base")

    engine = Engine(load_base(tiny_llama_path, quantization="none"), store, max_rank=8)
    params = SamplingParams(max_tokens=4, stop_token_ids=[])
    cases = {
        "t/big-rank": (UnsupportedModule, "above this server's maximum"),
        "t/corrupt": (InvalidModuleWeights, "^t/corrupt@1: adapter_model.safetensors is not a readable safetensors file"),
        "t/selective": (UnsupportedModule, "is not a bias .* cannot be served in mixed batches; load its tensors into the base"),
        "t/other-base": (IncompatibleBase, "fingerprint"),
        "t/missing": (ModuleNotFound, "no module"),
    }
    handles = {ref: engine.submit(GenerationRequest(prompt="we", module=ref, params=params)) for ref in cases}
    good = [
        engine.submit(GenerationRequest(prompt=p, module=f"t/{k}", params=params)) for p, k in zip(PROMPTS, KINDS, strict=False)
    ]
    too_long = engine.submit(GenerationRequest(input_ids=[5] * 600, params=params))
    for ref, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            handles[ref].result(timeout=60)
    with pytest.raises(PromptTooLong, match="context holds 512"):
        too_long.result(timeout=60)
    for handle in good:
        assert handle.result(timeout=60).completion_tokens == 4
    assert "t/other-base@1" not in engine.pool  # refused before anything was loaded
    engine.close()


def _rehash(folder, kind=None, fingerprint=None):
    from tunehub.registry.manifest import Manifest
    from tunehub.registry.module import write_module

    manifest = Manifest.read(folder)
    changes = {}
    if kind:
        changes["kind"] = kind
    if fingerprint:
        changes["base"] = {**json.loads(manifest.base.model_dump_json()), "fingerprint": fingerprint}
    manifest = manifest.with_updates(**changes)
    if kind:
        (folder / "adapter_config.json").unlink()
    write_module(folder, manifest)


def test_isolation_modules_trained_to_answer_differently(tiny_llama_path, tmp_path):
    """Three modules trained to give different answers; in one mixed batch every row gives
    its own module's answer and the base row gives none of them."""
    import random

    from tunehub.trainer.config import validate_run_config
    from tunehub.trainer.run import train

    answers = {"lora": "apple", "dora": "river", "adalora": "stone"}
    rng = random.Random(0)
    words = "red blue green small large old new fast slow warm cold dark light".split()
    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    for method, answer in answers.items():
        data = tmp_path / f"{method}.jsonl"
        with data.open("w") as handle:
            for _ in range(64):
                question = " ".join(rng.sample(words, 3))
                handle.write(json.dumps({"prompt": f"Q: {question}\nA:", "completion": f" {answer}"}) + "\n")
        method_cfg = {"name": method, "target_modules": "all-linear"}
        method_cfg.update(
            {"init_r": 8, "target_r": 4, "tinit": 5, "tfinal": 10} if method == "adalora" else {"r": 8, "alpha": 16}
        )
        config = validate_run_config(
            {
                "base": {"path": str(tiny_llama_path)},
                "method": method_cfg,
                "objective": {"name": "sft"},
                "data": {"train": str(data), "max_length": 32, "eval_fraction": 0.0},
                # AdaLoRA prunes half its rank within these 30 steps, so it needs a higher rate to learn the
                # answer (its pruned layers keep PEFT's alpha / init_r scale, as the engine serves them)
                "training": {
                    "max_steps": 30,
                    "batch_size": 8,
                    "learning_rate": 3e-2 if method == "adalora" else 1e-2,
                    "logging_steps": 10,
                },
                "output": {"dir": str(tmp_path / method), "task": answer},
            }
        )
        result = train(config)
        store.push(result.module_dir, f"answers/{method}")

    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    params = SamplingParams(max_tokens=4, stop_token_ids=[])
    refs = ["answers/lora", "answers/dora", "answers/adalora", None] * 2
    requests = [GenerationRequest(prompt=f"Q: {' '.join(rng.sample(words, 3))}\nA:", module=ref, params=params) for ref in refs]
    rng.shuffle(requests)
    for request, result in zip(requests, engine.generate(requests), strict=False):
        text = result.text.strip()
        if request.module is None:
            assert not any(text.startswith(a) for a in answers.values()), text
        else:
            assert text.startswith(answers[request.module.split("/")[1]]), (request.module, text)
            assert result.module == f"{request.module}@1"
    engine.close()


def test_fp32_cpu_base_serves_through_onednn_linears_with_the_same_logits(tiny_llama_path, store):
    from tunehub.server.engine.layers import OneDNNLinear, onednn_linear_works

    if not onednn_linear_works():
        pytest.skip("this torch build has no oneDNN linear")
    packed = Engine(load_base(tiny_llama_path, quantization="none"), store)
    plain = Engine(load_base(tiny_llama_path, quantization="none"), store, cpu_linear="default")
    decoder = [layer.base for layer in packed.layers.values()]
    assert decoder and all(isinstance(m, OneDNNLinear) for m in decoder)
    assert isinstance(packed.model.get_output_embeddings(), OneDNNLinear)
    assert not any(isinstance(layer.base, OneDNNLinear) for layer in plain.layers.values())
    # the dense weights are gone (not held twice); embeddings and norms remain parameters
    names = [n for n, _ in packed.model.named_parameters()]
    assert not any(n.endswith(("proj.weight", "lm_head.weight")) for n in names) and names
    tok = packed.tokenizer
    refs = [f"t/{k}" for k in KINDS] + [None] + [f"t/{name}" for name in EXTRA]
    rows = [(tok(p)["input_ids"], ref) for p, ref in zip(PROMPTS + EXTRA_PROMPTS, refs, strict=False)]
    assert len(rows) == len(refs)
    for got, expected in zip(packed.logits(rows), plain.logits(rows), strict=False):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    packed.close()
    plain.close()


def test_nf4_base_keeps_its_4bit_layers_and_packs_only_its_fp32_head(tiny_llama_path):
    from tunehub.server.engine.layers import OneDNNLinear, onednn_linear_works

    if not onednn_linear_works():
        pytest.skip("this torch build has no oneDNN linear")
    engine = Engine(load_base(tiny_llama_path, quantization="nf4"))
    assert {type(layer.base).__name__ for layer in engine.layers.values()} == {"Linear4bit"}
    assert isinstance(engine.model.get_output_embeddings(), OneDNNLinear)
    engine.close()


def test_onednn_linear_and_its_dora_norms_match_the_dense_weight():
    from torch import nn

    from tunehub.server.engine.kinds.low_rank import dora_norms
    from tunehub.server.engine.layers import (
        AdaptedLinear,
        BatchState,
        OneDNNLinear,
        onednn_linear_works,
    )

    onednn_linear_works.cache_clear()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    if not onednn_linear_works():
        pytest.skip("this torch build has no oneDNN linear")
    assert torch.equal(torch.get_rng_state(), state)  # the probe leaves the global generator alone
    for bias in (True, False):
        dense = nn.Linear(48, 40, bias=bias)
        packed = OneDNNLinear(dense)
        assert (packed.in_features, packed.out_features) == (48, 40)
        with torch.no_grad():
            for x in (torch.randn(5, 48), torch.randn(3, 7, 48), torch.randn(4, 96)[:, ::2], torch.randn(0, 48)):
                torch.testing.assert_close(packed(x), dense(x), atol=1e-5, rtol=1e-5)
            a, b = torch.randn(6, 48), torch.randn(40, 6)
            for scale in (0.0, 0.5, 2.0):
                expected = (dense.weight + scale * (b @ a)).norm(p=2, dim=1)
                for base in (dense, packed):
                    got = dora_norms(AdaptedLinear("x", base, BatchState()), a, b, scale)
                    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_cpu_linear_is_refused(tiny_llama_path):
    from tunehub.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu_linear"):
        Engine(load_base(tiny_llama_path, quantization="none"), cpu_linear="mkl")
