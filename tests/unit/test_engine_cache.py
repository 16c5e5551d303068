"""The engine's key/value cache layer: in-place writes, growth past the reserved room."""

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
    for (k, v), (ek, ev) in zip(_cache_tensors(cache), kv):
        assert torch.equal(k, ek) and torch.equal(v, ev)
