"""One bad request fails only itself (engine level, no HTTP): bad token ids, sampling
parameters the sampler cannot compute, modules with NaN weights or impossible shapes, a module
poisoned after load, faults injected into the shared forward. Every good request batched with
them answers exactly what it answers alone."""

from __future__ import annotations

import math
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tunehub.errors import IncompatibleBase, InvalidRequest
from tunehub.registry.local import LocalStore
from tunehub.server.engine import Engine, GenerationRequest, SamplingParams, UnsupportedModule, load_base
from tunehub.server.engine.engine import NonFiniteLogits
from tunehub.server.engine.modules import WEIGHTS_FILE, InvalidModuleWeights

MAX_RANK = 8


# --- modules with bad weights (the integration test imports these) -----------------------------


def rewrite_weights(source: Path, dest: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    """A copy of module ``source`` whose tensors ``change`` edits in place (or whose file it
    replaces, when it returns bytes), re-hashed: only the engine can tell it is bad."""
    from safetensors.torch import load_file, save_file

    from tunehub.registry.manifest import Manifest
    from tunehub.registry.module import write_module

    shutil.copytree(source, dest)
    tensors = load_file(dest / WEIGHTS_FILE)
    replaced = change(tensors)
    if isinstance(replaced, bytes):
        (dest / WEIGHTS_FILE).write_bytes(replaced)
    else:
        save_file(tensors, dest / WEIGHTS_FILE)
    write_module(dest, Manifest.read(dest))
    return dest


def push_unchecked(store: Any, folder: Path, ref: str) -> Any:
    """Push ``folder`` as a store without push-time weight checks (an older tunehub, another
    writer) would have taken it: stores now refuse such weights at push, and a server must
    still refuse them at load, for the request that asks for them only."""
    import tunehub.registry.module as module_io

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module_io, "check_safetensors_file", lambda *args, **kwargs: None, raising=False)
        return store.push(folder, ref)


def first_key(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return min(k for k in tensors if k.endswith(suffix))


def _nan(tensors):
    key = first_key(tensors, "lora_B.weight")
    tensors[key][0, 0] = math.nan


def _inf(tensors):
    key = first_key(tensors, "lora_A.weight")
    tensors[key][1, 2] = math.inf


def _wrong_width(tensors):
    key = first_key(tensors, "lora_A.weight")
    tensors[key] = torch.randn(tensors[key].shape[0], 7)


def _vector_a(tensors):
    key = first_key(tensors, "lora_A.weight")
    tensors[key] = tensors[key].reshape(-1)


def _giant_zero_dim(tensors):
    # a consistent file (no bytes) whose tensor claims a dimension of 2**40
    key = first_key(tensors, "lora_A.weight")
    tensors[key] = torch.empty(0, 2**40)


def _not_safetensors(tensors):
    return b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"


#: name -> (how to spoil a LoRA module, the error it must raise, a regex of its message)
BAD_MODULES: dict[str, tuple[Callable, type, str]] = {
    "nan-weights": (_nan, InvalidModuleWeights, r"t/nan-weights@1: tensor '.*lora_B\.weight' holds NaN or Inf values"),
    "inf-weights": (_inf, InvalidModuleWeights, r"t/inf-weights@1: tensor '.*lora_A\.weight' holds NaN or Inf values"),
    "wrong-width": (_wrong_width, IncompatibleBase, r"t/wrong-width@1: .* has shapes \(4, 7\)/.*the base layer is"),
    "vector-a": (_vector_a, InvalidModuleWeights, r"t/vector-a@1: tensor '.*lora_A' has shape \(\d+,\), expected 2 dimensions"),
    "giant-dim": (_giant_zero_dim, IncompatibleBase, r"t/giant-dim@1: .* has shapes \(0, 1099511627776\)/"),
    "not-safetensors": (
        _not_safetensors,
        InvalidModuleWeights,
        r"t/not-safetensors@1: adapter_model\.safetensors is not a readable",
    ),
}


def _bottleneck_nan(tensors):
    key = first_key(tensors, "bottleneck_up.weight")
    tensors[key][0, 0] = math.nan


def _bottleneck_wrong_width(tensors):
    key = first_key(tensors, "bottleneck_down.weight")
    tensors[key] = torch.randn(tensors[key].shape[0], 7)


def _bottleneck_vector_up(tensors):
    key = first_key(tensors, "bottleneck_up.weight")
    tensors[key] = tensors[key].reshape(-1)


#: name -> (how to spoil a bottleneck module, the error it must raise, a regex of its message)
BAD_BOTTLENECK_MODULES: dict[str, tuple[Callable, type, str]] = {
    "bn-nan": (_bottleneck_nan, InvalidModuleWeights, r"t/bn-nan@1: tensor '.*bottleneck_up\.weight' holds NaN or Inf values"),
    "bn-wrong-width": (
        _bottleneck_wrong_width,
        IncompatibleBase,
        r"t/bn-wrong-width@1: .* has bottleneck shapes \(8, 7\)/.*the base layer gives 64 features",
    ),
    "bn-vector-up": (
        _bottleneck_vector_up,
        InvalidModuleWeights,
        r"t/bn-vector-up@1: tensor '.*bottleneck_up\.weight' has shape \(\d+,\), expected 2 dimensions",
    ),
}


NORM = "model.layers.0.input_layernorm.weight"


def _selective_nan(tensors):
    tensors[NORM][3] = math.nan


def _selective_matrix(tensors):
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.randn(64, 128)


def _selective_bias_the_base_lacks(tensors):
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.randn(64)


def _selective_wrong_shape(tensors):
    tensors[NORM] = torch.ones(7)


def _selective_integers(tensors):
    tensors[NORM] = torch.ones(64, dtype=torch.int32)


#: name -> (how to spoil a selective (LayerNorm tuning) module, the error it must raise, a regex of its message)
BAD_SELECTIVE_MODULES: dict[str, tuple[Callable, type, str]] = {
    "sel-nan": (_selective_nan, InvalidModuleWeights, r"t/sel-nan@1: tensor '.*input_layernorm\.weight' holds NaN or Inf"),
    "sel-matrix": (
        _selective_matrix,
        UnsupportedModule,
        r"t/sel-matrix@1: its tensor model\.layers\.0\.mlp\.down_proj\.weight is not a bias .* cannot be served in mixed"
        r" batches; load its tensors into the base .* serve it as the base \(tunehub serve --base DIR\)",
    ),
    "sel-no-bias": (
        _selective_bias_the_base_lacks,
        IncompatibleBase,
        r"t/sel-no-bias@1: its tensor model\.layers\.1\.self_attn\.q_proj\.bias has no counterpart: .* has no bias",
    ),
    "sel-wrong-shape": (
        _selective_wrong_shape,
        IncompatibleBase,
        r"t/sel-wrong-shape@1: tensor .*input_layernorm\.weight has shape \(7,\), this base's has \(64,\)",
    ),
    "sel-integers": (_selective_integers, InvalidModuleWeights, r"t/sel-integers@1: tensor .* holds torch\.int32 values"),
}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tiny_llama_path, tmp_path_factory):
    from tunehub.trainer.testing import make_peft_module, make_selective_module

    root = tmp_path_factory.mktemp("isolation")
    store = LocalStore(root / "reg", cache_dir=root / "cache")
    for name, kind, seed, options in [
        ("lora", "lora", 1, {}),
        ("dora", "dora", 2, {}),
        ("prompt", "prompt", 3, {}),
        ("poisoned", "lora", 4, {}),
        ("high-rank", "lora", 5, {"r": 16}),
        ("bottleneck", "bottleneck", 6, {}),  # width 64 // 8 = 8: the server's maximum
        ("wide-bottleneck", "bottleneck", 7, {"reduction_factor": 4}),  # width 16
    ]:
        store.push(make_peft_module(tiny_llama_path, root / name, kind, seed=seed, **options), f"t/{name}")
    for name, (change, _, _) in BAD_MODULES.items():
        push_unchecked(store, rewrite_weights(root / "lora", root / name, change), f"t/{name}")
    for name, (change, _, _) in BAD_BOTTLENECK_MODULES.items():
        push_unchecked(store, rewrite_weights(root / "bottleneck", root / name, change), f"t/{name}")
    # LayerNorm tuning: the tiny Llama has no biases, so its selective modules tune norms only
    store.push(make_selective_module(tiny_llama_path, root / "norms", seed=8, layernorm=True), "t/norms")
    for name, (change, _, _) in BAD_SELECTIVE_MODULES.items():
        push_unchecked(store, rewrite_weights(root / "norms", root / name, change), f"t/{name}")
    return store


@pytest.fixture(scope="module")
def engine(tiny_llama_path, store):
    engine = Engine(load_base(tiny_llama_path, quantization="none"), store, max_batch=8, max_rank=MAX_RANK)
    yield engine
    engine.close()


def _params(**changes) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 10, "stop_token_ids": [], **changes})


def _good_requests() -> list[GenerationRequest]:
    prompts = ["the river runs", "she reads a book", "seven apples", "a small red house near the", "we", "they walked"]
    modules = [None, "t/lora", "t/dora", "t/prompt", "t/bottleneck", "t/norms"]
    requests = []
    for i in range(12):
        sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i} if i % 3 == 0 else {}
        requests.append(
            GenerationRequest(
                prompt=prompts[i % len(prompts)],
                module=modules[i % len(modules)],
                params=_params(max_tokens=8 + i % 5, **sampled),
            )
        )
    return requests


def _run(engine: Engine, request: GenerationRequest) -> Any:
    """The request's result, or the error it failed with (at submit or later)."""
    try:
        return engine.submit(request).result(timeout=120)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


def _alone(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    return [engine.generate([r])[0].token_ids for r in requests]


def _concurrently(engine: Engine, requests: list[GenerationRequest], threads: int = 6) -> list[Any]:
    """Submit from several threads at once, so bad and good rows share prefills and decode steps."""
    outcomes: list[Any] = [None] * len(requests)
    start = threading.Barrier(threads)

    def work(offset: int) -> None:
        start.wait()
        handles = {}
        for i in range(offset, len(requests), threads):
            try:
                handles[i] = engine.submit(requests[i])
            except Exception as exc:  # noqa: BLE001 - refused at submit
                outcomes[i] = exc
        for i, handle in handles.items():
            try:
                outcomes[i] = handle.result(timeout=120)
            except Exception as exc:  # noqa: BLE001
                outcomes[i] = exc

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return outcomes


# --- the corpus --------------------------------------------------------------------------------


def _bad_corpus() -> list[tuple[GenerationRequest, type, str]]:
    ids = r"input_ids must be token ids from 0 to 511, got "
    cases = [
        ({"input_ids": [1, 999999]}, InvalidRequest, ids + "999999$"),
        ({"input_ids": [5, -1, 6]}, InvalidRequest, ids + "-1$"),
        ({"input_ids": [5, "7"]}, InvalidRequest, ids + "'7'$"),
        ({"input_ids": [5, 2.5, True]}, InvalidRequest, ids + "2.5, True$"),
        ({"input_ids": []}, InvalidRequest, "^the prompt is empty$"),
        (
            {"prompt": "x", "params": _params(temperature=math.nan)},
            InvalidRequest,
            r"^temperature must be a finite number >= 0, got nan$",
        ),
        (
            {"prompt": "x", "params": _params(temperature=math.inf)},
            InvalidRequest,
            r"^temperature must be a finite number >= 0, got inf$",
        ),
        (
            {"prompt": "x", "params": _params(temperature=0.7, top_p=math.nan)},
            InvalidRequest,
            r"^top_p must be a number in \(0, 1\], got nan$",
        ),
        (
            {"prompt": "x", "params": _params(temperature=0.7, seed=2**64)},
            InvalidRequest,
            r"^seed must be an integer from 0 to 2\*\*64 - 1, got 18446744073709551616$",
        ),
        ({"prompt": "x", "params": _params(temperature=0.7, seed=-1)}, InvalidRequest, r"^seed must be an integer from 0"),
        (
            {"prompt": "x", "params": _params(max_tokens=0)},
            InvalidRequest,
            r"^max_tokens must be an integer from 1 to 2147483647, got 0$",
        ),
        ({"prompt": "x", "params": _params(max_tokens=2.5)}, InvalidRequest, r"^max_tokens must be an integer"),
        (
            {"prompt": "x", "params": _params(stop_token_ids=[3, 512])},
            InvalidRequest,
            r"^stop_token_ids must be token ids from 0 to 511, got 512$",
        ),
        ({"prompt": "x", "module": "t/high-rank"}, UnsupportedModule, r"rank 16 at .* above this server's maximum of 8"),
        (
            {"prompt": "x", "module": "t/wide-bottleneck"},
            UnsupportedModule,
            r"bottleneck width 16 at .* above this server's maximum of 8",
        ),
        # slipped past load validation (poisoned in place): a sampled row's logits are NaN
        (
            {"prompt": "the river", "module": "t/poisoned", "params": _params(temperature=0.9, seed=3)},
            NonFiniteLogits,
            r"^request .*: the logits are not finite \(NaN or Inf\) at temperature 0\.9",
        ),
    ]
    cases += [
        ({"prompt": "the river", "module": f"t/{name}", "params": _params(temperature=0.9, seed=1)}, error, message)
        for name, (_, error, message) in {**BAD_MODULES, **BAD_BOTTLENECK_MODULES, **BAD_SELECTIVE_MODULES}.items()
    ]
    return [(GenerationRequest(**{"params": _params(), **fields}), error, message) for fields, error, message in cases]


def test_bad_requests_fail_alone_under_concurrency(engine):
    good = _good_requests()
    expected = _alone(engine, good)
    # a module whose weights turn NaN after load validation: only the step can catch it
    poisoned = engine.pool.acquire("t/poisoned")
    try:
        next(iter(poisoned.layers.values())).lora_b.fill_(math.nan)
        bad = _bad_corpus()
        requests, kinds = [], []
        for i in range(max(len(good), len(bad))):  # interleaved: good, bad, good, bad...
            if i < len(good):
                requests.append(good[i]), kinds.append(("good", i))
            if i < len(bad):
                requests.append(bad[i][0]), kinds.append(("bad", i))
        outcomes = _concurrently(engine, requests)
    finally:
        engine.pool.release(poisoned)
        engine.pool.unload("t/poisoned@1")
    failed_good = [
        (good[i].prompt, good[i].module, o)
        for (kind, i), o in zip(kinds, outcomes)
        if kind == "good" and isinstance(o, BaseException)
    ]
    assert failed_good == []
    for (kind, i), outcome in zip(kinds, outcomes):
        if kind == "good":
            assert outcome.token_ids == expected[i], (good[i].prompt, good[i].module)
        else:
            request, error, message = bad[i]
            assert type(outcome) is error, (request, outcome)
            assert re.search(message, str(outcome)), (message, str(outcome))
    # and the engine keeps serving
    assert _alone(engine, good[:2]) == expected[:2]


def test_tiny_temperature_is_greedy_and_tiny_top_p_keeps_the_top_token(engine):
    prompts = ["the river runs", "seven apples"]
    greedy = _alone(engine, [GenerationRequest(prompt=p, params=_params()) for p in prompts])
    edge = [GenerationRequest(prompt=p, params=_params(temperature=1e-300, seed=5)) for p in prompts]
    edge += [GenerationRequest(prompt=p, params=_params(temperature=0.8, top_p=1e-300, seed=5)) for p in prompts]
    edge += [GenerationRequest(prompt=p, params=_params(temperature=1e-6, top_p=1e-300)) for p in prompts]
    outcomes = _concurrently(engine, edge, threads=3)
    assert [o.token_ids for o in outcomes] == greedy * 3


def test_sampling_params_refuse_what_cannot_be_computed():
    SamplingParams(temperature=2.0, top_p=1e-300, seed=2**64 - 1, stop_token_ids=[0, 511]).check(512)
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(max_tokens=True, temperature=-1.0, top_p=0.0, seed=1.5).check(512)  # type: ignore[arg-type]
    assert str(info.value) == (
        "max_tokens must be an integer from 1 to 2147483647, got True; temperature must be a finite number >= 0, got -1.0;"
        " top_p must be a number in (0, 1], got 0.0; seed must be an integer from 0 to 2**64 - 1, got 1.5"
    )
    assert info.value.http_status == 400


# --- faults injected into the shared forward ---------------------------------------------------


def _inject(monkeypatch, engine: Engine, *, prefill_from: int | None = None, decode_at: int | None = None) -> None:
    """Make the model's forward fail for any batch holding a row at a given position: the
    culprit is the only row with a prompt that long."""
    forward = engine.model.forward

    def faulty(*args, **kwargs):
        positions = kwargs["position_ids"]
        if prefill_from is not None and kwargs.get("inputs_embeds") is not None and bool((positions >= prefill_from).any()):
            raise RuntimeError("injected prefill fault")
        if decode_at is not None and kwargs.get("input_ids") is not None and bool((positions == decode_at).any()):
            raise RuntimeError("injected decode fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", faulty)


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_fault_in_the_shared_forward_fails_its_row_only(engine, monkeypatch, where):
    good = _good_requests()[:7]  # prompts of at most 8 tokens, at most 12 new ones: positions < 24
    expected = _alone(engine, good)
    culprit = GenerationRequest(input_ids=list(range(40, 80)), module="t/lora", params=_params(max_tokens=20))
    if where == "prefill":
        _inject(monkeypatch, engine, prefill_from=30)
    else:
        _inject(monkeypatch, engine, decode_at=44)  # the culprit's 4th decode step
    outcomes = _concurrently(engine, [*good[:3], culprit, *good[3:]], threads=4)
    culprit_outcome = outcomes.pop(3)
    assert type(culprit_outcome) is RuntimeError and str(culprit_outcome) == f"injected {where} fault"
    assert [o.token_ids for o in outcomes] == expected
    assert all(e["in_use"] == 0 for e in engine.pool.status()["modules"])  # the failed row released its module


# --- the worker's error messages -----------------------------------------------------------------


def test_client_errors_are_logged_as_one_line_without_traceback(caplog):
    from tunehub.server.api import error_message

    caplog.set_level("DEBUG", logger="tunehub.server")
    message = error_message(InvalidRequest("input_ids must be token ids from 0 to 511, got 999999"), "req-42")
    assert message == {
        "type": "error",
        "status": 400,
        "error": "InvalidRequest",
        "message": "input_ids must be token ids from 0 to 511, got 999999",
    }
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records] == [
        ("INFO", "request req-42 refused (400 InvalidRequest): input_ids must be token ids from 0 to 511, got 999999", None)
    ]
    caplog.clear()
    assert error_message(RuntimeError("boom"), "req-43")["status"] == 500
    (record,) = caplog.records
    assert record.levelname == "ERROR" and "req-43" in record.getMessage() and record.exc_info is not None
