"""The engine's caches: the key/value cache layer (in-place writes, growth past the reserved
room, rewinding a failed step) and the plan cache (nothing of a module outlives it in the pool)."""

import gc
import weakref

import pytest
import torch

from tunehub.server.engine.engine import _cache_tensors, _growing_cache, _GrowingLayer


def test_growing_layer_equals_concatenation_also_past_its_room():
    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    layer = _GrowingLayer(keys, values, room=2)
    expected_k, expected_v = keys.clone(), values.clone()
    storage = layer._keys.data_ptr()
    for step in range(7):  # 2 steps fit the room; the 3rd grows the buffers (doubling), later ones fit again
        new = 1 if step != 4 else 3  # a multi-token write too
        k, v = torch.randn(3, 2, new, 4), torch.randn(3, 2, new, 4)
        out_k, out_v = layer.update(k, v)
        expected_k, expected_v = torch.cat([expected_k, k], dim=2), torch.cat([expected_v, v], dim=2)
        assert torch.equal(out_k, expected_k) and torch.equal(out_v, expected_v)
        assert layer.get_seq_length() == expected_k.shape[2]
        if step == 1:
            assert layer._keys.data_ptr() == storage  # written in place while the room lasts
    assert layer._keys.shape[2] >= expected_k.shape[2]
    assert layer.keys is not None and torch.equal(layer.keys, expected_k)


def test_growing_cache_exposes_every_layer():
    kv = [(torch.full((1, 1, 2, 2), float(i)), torch.full((1, 1, 2, 2), -float(i))) for i in range(3)]
    cache = _growing_cache(kv, room=4)
    assert cache.get_seq_length() == 2
    for (k, v), (ek, ev) in zip(_cache_tensors(cache), kv, strict=False):
        assert torch.equal(k, ek) and torch.equal(v, ev)


def test_truncate_forgets_what_a_failed_step_wrote():
    keys, values = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    layer = _GrowingLayer(keys, values, room=2)
    layer.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))  # the step that then failed
    layer.truncate(3)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    new_k, new_v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    out_k, _ = layer.update(new_k, new_v)  # the retried step writes where the failed one did
    assert torch.equal(out_k, torch.cat([keys, new_k], dim=2))


# --- the plan cache (per-batch stacked module tensors) -------------------------------------------


@pytest.mark.parametrize("how", ["evicted", "unloaded"])
def test_a_module_that_leaves_the_pool_leaves_no_plan_behind(tiny_llama_path, lora_module, tmp_path, how):
    from tunehub.registry.local import LocalStore
    from tunehub.server.engine import (
        Engine,
        GenerationRequest,
        SamplingParams,
        load_base,
    )

    store = LocalStore(tmp_path / "reg", cache_dir=tmp_path / "cache")
    store.push(lora_module(seed=1, r=1), "t/a")  # rank 1: the plan's stacked A may view the module's own tensor
    store.push(lora_module(seed=2), "t/b")
    # evicted: a budget of one byte drops every module as soon as no request holds it
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store, pool_bytes=1 if how == "evicted" else 1 << 30)
    params = SamplingParams(max_tokens=3, stop_token_ids=[])
    held = [engine.pool.acquire("t/a@1"), engine.pool.acquire("t/b@1")]  # resident while the test looks
    module_ref, tensor_ref = weakref.ref(held[0]), weakref.ref(next(iter(held[0].layers.values())).lora_a)
    engine.generate(
        [
            GenerationRequest(prompt="the river", module="t/a@1", params=params),
            GenerationRequest(prompt="we", module="t/b@1", params=params),
        ]
    )
    # each layer's plan keeps its kind groups' parts; the low-rank part holds the stacked A and B
    plans = [
        part
        for plan in engine._plans.values()
        for layer in plan.values()
        for part in layer.parts.values()
        if getattr(part, "lora_a", None) is not None
    ]
    assert plans  # the batch's plan is cached while its modules are resident
    plan_refs = [weakref.ref(p.lora_a) for p in plans]
    del plans
    for module in held:
        engine.pool.release(module)  # evicted: over the budget, both leave now
    del module, held
    if how == "unloaded":
        assert engine.pool.unload("t/a@1") and engine.pool.unload("t/b@1")
    gc.collect()
    assert "t/a@1" not in engine.pool and "t/b@1" not in engine.pool
    assert engine._plans == {}
    assert all(ref() is None for ref in plan_refs), "a plan outlived its modules"
    assert module_ref() is None and tensor_ref() is None
    engine.close()
