"""The engine's zero-copy safetensors reader: same tensors as safetensors, as strict on bad input."""

import json
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from tunehub.errors import IntegrityError
from tunehub.server.engine.modules import tensors_from_safetensors


def _mixed_tensors():
    return {
        "a.lora_A.weight": torch.randn(4, 12),
        "a.lora_B.weight": torch.randn(12, 4),
        "half": torch.randn(3, 5).to(torch.float16),
        "brain": torch.randn(7).to(torch.bfloat16),
        "ints": torch.arange(5, dtype=torch.int8),  # 5 bytes: the next tensor's offset is odd
        "after_odd": torch.randn(2, 3),
        "longs": torch.arange(3, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
    }


def _header(data: bytes) -> dict:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size])


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("wrap", [bytes, bytearray, lambda b: memoryview(bytearray(b))], ids=["bytes", "bytearray", "memoryview"])
def test_same_tensors_as_safetensors(wrap):
    data = save(_mixed_tensors(), metadata={"format": "pt"})
    expected = load(data)
    got = tensors_from_safetensors(wrap(data), "m")
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def test_tensors_view_the_buffer_without_a_copy():
    buffer = bytearray(save({"w": torch.zeros(4, 4)}))
    weight = tensors_from_safetensors(buffer, "m")["w"]
    weight[0, 0] = 1.0  # written through to the buffer: the tensor is a view of it
    assert load(bytes(buffer))["w"][0, 0].item() == 1.0


def test_an_empty_file_of_tensors_is_an_empty_dict():
    assert tensors_from_safetensors(save({}), "m") == {}


def test_bad_headers_are_integrity_errors_naming_the_file():
    good = save({"w": torch.randn(2, 3), "v": torch.randn(3)})
    header = _header(good)
    body = good[8 + struct.unpack("<Q", good[:8])[0] :]

    def variant(**changes):
        changed = json.loads(json.dumps(header))
        for key, entry in changes.items():
            changed[key] = entry
        return _with_header(changed, body)

    w = header["w"]
    cases = {
        "short": b"\x01\x02",
        "header size past the end": struct.pack("<Q", 1 << 40) + b"{}",
        "not json": struct.pack("<Q", 5) + b"{bad}",
        "not an object": _with_header([1, 2], b""),  # type: ignore[arg-type]
        "unknown dtype": variant(w={**w, "dtype": "F7"}),
        "no offsets": variant(w={"dtype": "F32", "shape": [2, 3]}),
        "negative dim": variant(w={**w, "shape": [-2, -3]}),
        "shape too big for its bytes": variant(w={**w, "shape": [2, 4]}),
        "overlapping ranges": variant(w={**w, "data_offsets": [8, 32]}),
        "trailing bytes": good + b"\x00" * 4,
        "truncated data": good[:-4],
    }
    for data in cases.values():
        with pytest.raises(IntegrityError, match="adapter_model.safetensors is not a readable safetensors file"):
            tensors_from_safetensors(data, "acme/x@1: adapter_model.safetensors")
        with pytest.raises(SafetensorError):  # safetensors itself refuses the same files
            load(data)


def test_finite_check_names_the_tensor_and_lets_large_finite_values_pass():
    import torch

    from tunehub.server.engine.modules import InvalidModuleWeights, _check_finite

    # sums that overflow (fp32 near its maximum, fp16 past 65504) are still finite values
    _check_finite({"big": torch.full((4, 4), 3e38), "half": torch.full((100,), 60000.0, dtype=torch.float16)}, "m")
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = torch.ones(5, 5)
        poisoned[2, 3] = bad
        with pytest.raises(InvalidModuleWeights) as info:
            _check_finite({"fine": torch.ones(2), "poisoned": poisoned, "ids": torch.arange(3)}, "m")
        assert str(info.value) == "m: tensor 'poisoned' holds NaN or Inf values"
    cancelling = torch.tensor([float("inf"), -float("inf"), 1.0])  # inf - inf: the sum is NaN, caught too
    with pytest.raises(InvalidModuleWeights, match="'c' holds NaN or Inf"):
        _check_finite({"c": cancelling}, "m")
