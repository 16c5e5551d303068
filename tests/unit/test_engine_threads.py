"""A decode step's delta ops run on one CPU thread (the base's matmuls keep every thread): on a
machine with as many cores as torch threads, waking OpenMP's team for microsecond-sized ops cost
ten times the ops (see layers._SingleThreaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunehub.server.engine.layers import SMALL_CALL_TOKENS, AdaptedLinear, BatchState, LayerPlan


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _layer_recording(seen: list[tuple[str, int]]) -> tuple[AdaptedLinear, BatchState]:
    state = BatchState()

    class Base(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(("base", torch.get_num_threads()))
            return super().forward(x)

    layer = AdaptedLinear("proj", Base(8, 8), state)

    def before(x: torch.Tensor) -> torch.Tensor:
        seen.append(("before", torch.get_num_threads()))
        return x

    def after(_layer: object, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(("after", torch.get_num_threads()))
        return y + 1

    state.layers["proj"] = LayerPlan(before=(before,), after=(after,))
    return layer, state


def test_a_small_calls_delta_ops_run_on_one_thread_and_the_base_on_all(two_threads):
    seen: list[tuple[str, int]] = []
    layer, _ = _layer_recording(seen)
    x = torch.randn(4, 1, 8)  # a decode step of 4 rows
    expected = layer.base(x) + 1
    seen.clear()
    torch.testing.assert_close(layer(x), expected)
    assert seen == [("before", 1), ("base", 2), ("after", 1)]
    assert torch.get_num_threads() == 2  # restored


def test_a_large_call_and_an_error_keep_the_thread_count(two_threads):
    seen: list[tuple[str, int]] = []
    layer, state = _layer_recording(seen)
    layer(torch.randn(2, SMALL_CALL_TOKENS, 8))  # a long prefill: its delta ops are real work
    assert seen == [("before", 2), ("base", 2), ("after", 2)]

    def failing(_layer: object, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a row's delta failed")

    state.layers["proj"] = LayerPlan(after=(failing,))
    with pytest.raises(RuntimeError, match="delta failed"):
        layer(torch.randn(1, 1, 8))
    assert torch.get_num_threads() == 2
