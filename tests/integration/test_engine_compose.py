"""Several modules in one row: per-request compositions (weighted, across kinds) and chains
(a module trained on top of another), against PEFT where PEFT can express the stack and against
the deltas computed directly where it cannot; compositions mixed in one batch; refusals."""

import pytest
import torch

from tunehub.errors import IncompatibleBase, InvalidRequest, ModuleNotFound
from tunehub.registry.local import LocalStore
from tunehub.registry.manifest import Manifest
from tunehub.registry.module import write_module
from tunehub.server.engine import Engine, GenerationRequest, SamplingParams, UnsupportedModule, load_base

pytestmark = pytest.mark.integration
IDS = [1, 17, 33, 60, 101, 7, 45]
OTHER_IDS = [1, 88, 12, 250, 3, 9]


def _with_parent(folder, parent, fingerprint=None):
    """Rewrite ``folder``'s manifest as if it had been trained on top of ``parent``."""
    manifest = Manifest.read(folder)
    changes = {"parent": parent}
    if fingerprint is not None:
        changes["base"] = {**manifest.base.model_dump(mode="json"), "fingerprint": fingerprint}
    write_module(folder, manifest.with_updates(**changes))
    return folder


@pytest.fixture(scope="module")
def modules(tiny_llama_path, tmp_path_factory):
    from tunehub.trainer.testing import make_peft_module, make_selective_module

    root = tmp_path_factory.mktemp("compose")
    store = LocalStore(root / "reg", cache_dir=root / "cache")
    folders = {}
    plan = [
        ("lora-a", "lora", 1, {}),
        ("lora-b", "lora", 2, {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
        ("dora", "dora", 3, {}),
        ("ia3-a", "ia3", 4, {}),
        ("ia3-b", "ia3", 5, {}),
        ("prompt", "prompt", 6, {}),
        ("prompt-2", "prompt", 7, {}),
        ("bottleneck", "bottleneck", 8, {}),
        ("bottleneck-2", "bottleneck", 9, {}),
    ]
    for name, kind, seed, options in plan:
        folders[name] = make_peft_module(tiny_llama_path, root / name, kind, seed=seed, **options)
        store.push(folders[name], f"t/{name}")
    folders["norms"] = make_selective_module(tiny_llama_path, root / "norms", seed=10, layernorm=True)
    store.push(folders["norms"], "t/norms")
    # a chain: lora-b trained on top of lora-a, then a grandchild (ia3 is another group) on top of it
    folders["child"] = _with_parent(make_peft_module(tiny_llama_path, root / "child", "lora", seed=11), "t/lora-a@1")
    store.push(folders["child"], "t/child")
    # a DoRA trained on the LoRA: order matters (the trainer runs the child's adapter first)
    folders["dora-child"] = _with_parent(make_peft_module(tiny_llama_path, root / "dora-child", "dora", seed=12), "t/lora-a@1")
    store.push(folders["dora-child"], "t/dora-child")
    return store, folders


@pytest.fixture(scope="module")
def engine(tiny_llama_path, modules):
    engine = Engine(load_base(tiny_llama_path, quantization="none"), modules[0])
    yield engine
    engine.close()


def _base(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()


def _stacked(tiny_llama_path, folders, names):
    """PEFT with every adapter of ``names`` loaded and all active at once (PEFT sums or multiplies them)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(tiny_llama_path), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.base_model.set_adapter(list(names))
    return model.eval()


def _logits(model, ids, inputs_embeds=None):
    with torch.no_grad():
        if inputs_embeds is None:
            return model(input_ids=torch.tensor([ids])).logits[0].float()
        return model(inputs_embeds=inputs_embeds).logits[0, -len(ids) :].float()


def test_weighted_loras_equal_peft_add_weighted_adapter_cat(tiny_llama_path, modules, engine):
    store, folders = modules
    model = _stacked(tiny_llama_path, folders, ["lora-a", "lora-b"])
    model.add_weighted_adapter(["lora-a", "lora-b"], [0.7, 0.3], "mix", combination_type="cat")
    model.set_adapter("mix")
    [got] = engine.logits([(IDS, [("t/lora-a", 0.7), ("t/lora-b", 0.3)])])
    torch.testing.assert_close(got, _logits(model, IDS), atol=1e-4, rtol=0)
    result = engine.generate([GenerationRequest(input_ids=IDS, modules=[("t/lora-a", 0.7), ("t/lora-b", 0.3)])])[0]
    assert result.module == "t/lora-a@1*0.7+t/lora-b@1*0.3"


@pytest.mark.parametrize(
    "names", [["lora-a", "dora"], ["ia3-a", "ia3-b"], ["lora-b", "ia3-a"]], ids=["lora+dora", "ia3+ia3", "lora+ia3"]
)
def test_stacked_modules_equal_peft_with_every_adapter_active(names, tiny_llama_path, modules, engine):
    store, folders = modules
    if names == ["lora-b", "ia3-a"]:
        # PEFT keeps one tuner type per model: a LoRA with an IA3 is IA3's PeftModel over the base
        # with the LoRA merged in (a full-precision base merges exactly)
        from peft import PeftModel

        merged = PeftModel.from_pretrained(_base(tiny_llama_path), folders[names[0]]).merge_and_unload()
        expected = _logits(PeftModel.from_pretrained(merged, folders[names[1]]).eval(), IDS)
    else:
        expected = _logits(_stacked(tiny_llama_path, folders, names), IDS)
    [got] = engine.logits([(IDS, "+".join(f"t/{n}" for n in names))])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_prompt_with_a_lora_and_norms_with_a_lora_equal_the_deltas_computed_directly(tiny_llama_path, modules, engine):
    from peft import PeftModel
    from safetensors.torch import load_file

    from tunehub.trainer.methods.selective import apply_selective

    store, folders = modules
    lora = PeftModel.from_pretrained(_base(tiny_llama_path), folders["lora-a"]).eval()
    prompt = load_file(str(folders["prompt"] / "adapter_model.safetensors"))["prompt_embeddings"]
    tokens = lora.get_input_embeddings()(torch.tensor([IDS]))
    expected_prompt = _logits(lora, IDS, inputs_embeds=torch.cat([prompt[None].float(), tokens], dim=1))
    normed = PeftModel.from_pretrained(apply_selective(_base(tiny_llama_path), folders["norms"]), folders["lora-a"]).eval()
    got_prompt, got_norms = engine.logits([(IDS, "t/prompt+t/lora-a"), (IDS, "t/norms+t/lora-a")])
    torch.testing.assert_close(got_prompt, expected_prompt, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_norms, _logits(normed, IDS), atol=1e-4, rtol=0)


def test_rows_with_different_compositions_share_a_batch_and_each_equals_itself_alone(modules, engine):
    rows = [
        (IDS, "t/lora-a+t/lora-b"),
        (OTHER_IDS, [("t/lora-a", 0.5), ("t/ia3-a", 1.0)]),
        (IDS, None),
        (OTHER_IDS, "t/prompt+t/dora+t/norms"),
        (IDS, "t/lora-a"),
        (OTHER_IDS, "t/child"),
        (IDS, "t/bottleneck+t/lora-b"),
        (OTHER_IDS, [("t/lora-b", -0.5)]),
    ]
    mixed = engine.logits(rows)
    for row, got in zip(rows, mixed, strict=True):
        torch.testing.assert_close(got, engine.logits([row])[0], atol=1e-5, rtol=0)
    # and generation: the same tokens in a batch as alone
    params = SamplingParams(max_tokens=5, stop_token_ids=[])

    def request(ids, ref):
        return (
            GenerationRequest(input_ids=ids, modules=ref, params=params)
            if isinstance(ref, list)
            else (GenerationRequest(input_ids=ids, module=ref, params=params))
        )

    together = engine.generate([request(ids, ref) for ids, ref in rows])
    for (ids, ref), result in zip(rows, together, strict=True):
        assert result.token_ids == engine.generate([request(ids, ref)])[0].token_ids, ref
    assert not torch.allclose(mixed[0], mixed[4], atol=1e-3)  # the composition is not its first part


def test_a_chain_applies_its_parent_and_answers_as_the_child(tiny_llama_path, modules, engine):
    store, folders = modules
    expected = _logits(_stacked(tiny_llama_path, folders, ["lora-a", "child"]), IDS)
    [got] = engine.logits([(IDS, "t/child")])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    result = engine.generate([GenerationRequest(input_ids=IDS, module="t/child", params=SamplingParams(max_tokens=3))])[0]
    assert result.module == "t/child@1"
    # a DoRA child runs first, as training ran it (PEFT's active adapters: the child, then its parents)
    [dora_child] = engine.logits([(IDS, "t/dora-child")])
    torch.testing.assert_close(
        dora_child, _logits(_stacked(tiny_llama_path, folders, ["dora-child", "lora-a"]), IDS), atol=1e-4, rtol=0
    )
    # naming the parent as well applies it once
    [named] = engine.logits([(IDS, "t/lora-a+t/child")])
    torch.testing.assert_close(named, got, atol=1e-6, rtol=0)


def test_chains_whose_parent_is_missing_on_another_base_or_looping_are_refused(tiny_llama_path, modules, tmp_path):
    from tunehub.trainer.testing import make_peft_module

    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")

    def push_unchecked(folder, ref):
        # as a registry written before parents were checked at push (or edited by hand) holds
        # it: the engine must refuse such a chain by itself
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LocalStore, "check_parent", lambda self, manifest: [])
            store.push(folder, ref)

    for name, parent in [("orphan", "t/gone@1"), ("loop-a", "t/loop-b@1"), ("loop-b", "t/loop-a@1")]:
        push_unchecked(_with_parent(make_peft_module(tiny_llama_path, tmp_path / name, "lora", seed=1), parent), f"t/{name}")
    push_unchecked(_with_parent(make_peft_module(tiny_llama_path, tmp_path / "alien", "lora", seed=2), None, "0" * 64), "t/alien")
    push_unchecked(
        _with_parent(make_peft_module(tiny_llama_path, tmp_path / "adopted", "lora", seed=3), "t/alien@1"), "t/adopted"
    )
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store)
    try:
        for ref, error, message in [
            ("t/orphan", ModuleNotFound, r"t/orphan@1 was trained on top of t/gone@1, which cannot be applied"),
            ("t/adopted", IncompatibleBase, r"t/adopted@1 was trained on top of t/alien@1.*fingerprint"),
            ("t/loop-a", UnsupportedModule, r"chain of parents loops"),
        ]:
            with pytest.raises(error, match=message):
                engine.logits([(IDS, ref)])
        # every module a refused chain acquired was released
        loaded = engine.pool.status()["modules"]
        assert {m["module"] for m in loaded} >= {"t/orphan@1", "t/adopted@1", "t/loop-a@1", "t/loop-b@1"}
        assert all(m["in_use"] == 0 for m in loaded), loaded
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("parts", "error", "message"),
    [
        ("t/prompt+t/prompt-2", UnsupportedModule, "2 modules of the prompt group cannot be applied together"),
        ("t/bottleneck+t/bottleneck-2", UnsupportedModule, "2 modules of the bottleneck group cannot be applied together"),
        ([("t/prompt", 0.5)], UnsupportedModule, r"t/prompt@1 \(prompt\) takes no weight: it must be 1, not 0.5"),
        ([("t/lora-a", 0.5), ("t/child", 1.0)], InvalidRequest, r"t/lora-a@1 is applied twice .*with weights 0.5 and 1"),
        ("t/lora-a+t/lora-a@1", InvalidRequest, "t/lora-a@1 is named twice in this request"),
        ([("t/lora-a", float("nan"))], InvalidRequest, "weight of t/lora-a must be a finite number"),
        ([("t/lora-a", 11.0)], InvalidRequest, "from -10 to 10"),
        ("+".join(["t/lora-a"] * 9), InvalidRequest, "at most 8 modules"),
        ("t/lora-a++t/lora-b", InvalidRequest, "has an empty part"),
        ([("t/lora-a", True)], InvalidRequest, "weight of t/lora-a must be a finite number"),
        ([42], InvalidRequest, "a reference or a \\(reference, weight\\) pair"),
    ],
    ids=[
        "two-prompts",
        "two-bottlenecks",
        "weighted-prompt",
        "parent-twice",
        "twice",
        "nan",
        "too-heavy",
        "nine",
        "empty",
        "bool",
        "int",
    ],
)
def test_compositions_that_cannot_be_applied_fail_alone(parts, error, message, modules, engine):
    fields = {"modules": parts} if isinstance(parts, list) else {"module": parts}
    params = SamplingParams(max_tokens=3, stop_token_ids=[])
    bad = engine.submit(GenerationRequest(input_ids=IDS, params=params, **fields))
    good = engine.submit(GenerationRequest(input_ids=IDS, module="t/lora-a+t/lora-b", params=params))
    with pytest.raises(error, match=message):
        bad.result(timeout=60)
    assert good.result(timeout=60).completion_tokens == 3
    with pytest.raises(InvalidRequest, match="not both"):
        engine.submit(GenerationRequest(input_ids=IDS, module="t/lora-a", modules=["t/lora-b"])).result(timeout=60)


def test_a_composition_leaves_nothing_behind_when_a_member_is_evicted(modules, engine):
    engine.logits([(IDS, "t/lora-a+t/ia3-b")])
    with_member = [c for c in engine._compositions.values() if "t/ia3-b@1" in c.key]
    assert "t/lora-a@1+t/ia3-b@1" in [c.key for c in with_member]
    assert all(any(c.uid in key for key in engine._plans) for c in with_member)
    engine.pool.unload("t/ia3-b@1")
    assert not any("t/ia3-b@1" in c.key for c in engine._compositions.values())
    assert not any(c.uid in key for c in with_member for key in engine._plans)  # nor any plan built with them
    engine.logits([(IDS, "t/lora-a+t/ia3-b")])  # and it loads again
