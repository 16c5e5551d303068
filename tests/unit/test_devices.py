"""Device helpers: compute dtype choice, the lean CPU allocator, the quantizing load."""

import subprocess
import sys
import textwrap

import pytest
import torch

from tunehub import devices


def test_compute_dtype_auto_follows_the_hardware(monkeypatch):
    assert devices.resolve_compute_dtype("float16", "cpu") is torch.float16
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.resolve_compute_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.resolve_compute_dtype("auto", "cpu") is torch.bfloat16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_lean_allocator_returns_freed_activation_memory():
    # in a child process: mallopt changes the allocator for the rest of the process
    script = textwrap.dedent("""
        import sys, torch
        from tunehub.devices import use_lean_cpu_allocator
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        lean = sys.argv[1] == "lean"
        if lean:
            assert use_lean_cpu_allocator()
        # a warm-up round frees a 2 MiB block: glibc's default then serves such blocks from the heap
        warm = torch.ones(512 * 1024)
        del warm
        blocks = [torch.ones(512 * 1024) for _ in range(64)]  # 64 x 2 MiB activations, written
        pin = torch.ones(512 * 1024)  # still alive above them, as later activations are
        before = rss()
        del blocks
        print(before - rss())
    """)
    freed = {}
    for mode in ("lean", "default"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        freed[mode] = int(out.stdout.strip())
    assert freed["lean"] >= 120 * 1024 * 1024  # the 128 MiB went back to the OS
    assert freed["default"] < 16 * 1024 * 1024  # glibc's default keeps them resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reusing_allocator_keeps_freed_blocks_for_the_next_ones():
    # in a child process: mallopt changes the allocator for the rest of the process
    script = textwrap.dedent("""
        import sys, torch
        from tunehub.devices import use_reusing_cpu_allocator
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        if sys.argv[1] == "reuse":
            assert use_reusing_cpu_allocator()
        # no warm-up: glibc's default maps these 2 MiB blocks on their own and unmaps them when freed
        blocks = [torch.ones(512 * 1024) for _ in range(64)]
        pin = torch.ones(512 * 1024)
        before = rss()
        del blocks
        after_free = rss()
        again = [torch.ones(512 * 1024) for _ in range(64)]  # the next step's blocks
        print(before - after_free, rss() - after_free)
    """)
    seen = {}
    for mode in ("reuse", "default"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        seen[mode] = [int(x) for x in out.stdout.split()]
    assert seen["default"][0] >= 120 * 1024 * 1024  # glibc's default returned the 128 MiB ...
    assert seen["default"][1] >= 120 * 1024 * 1024  # ... and faulted it in again for the next blocks
    assert seen["reuse"][0] < 16 * 1024 * 1024  # kept ...
    assert seen["reuse"][1] < 16 * 1024 * 1024  # ... and reused: no fresh pages for the next blocks


def test_quantizing_load_reads_tensor_by_tensor_and_equals_the_plain_load(tiny_llama_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunehub.quantization import keep_4bit_layout

    def nf4():
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=nf4(), device_map={"": "cpu"})
    keep_4bit_layout(plain)  # as load_quantized keeps its layers (bitsandbytes' CPU repacking computes otherwise)
    lean = devices.load_quantized(AutoModelForCausalLM, tiny_llama_path, quantization_config=nf4(), device_map={"": "cpu"})
    assert type(lean) is type(plain) and type(lean.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = torch.arange(4, 30)[None]
    with torch.no_grad():
        assert torch.equal(lean(ids).logits, plain(ids).logits)
    # no parameter lives in a file mapping: nothing keeps the checkpoint's pages resident
    maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps.splitlines() if line.endswith(".safetensors")]
    assert not any(lo <= p.data_ptr() < hi for p in lean.parameters() for lo, hi in spans)


def _rss_file_kib() -> int:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssFile"].split()[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc")
def test_release_file_pages_drops_a_mapped_weights_pages_and_keeps_its_content(tmp_path):
    path = tmp_path / "weights.bin"
    expected = torch.arange(16 * 1024 * 1024, dtype=torch.float32)  # 64 MiB
    expected.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=expected.numel(), dtype=torch.float32)
    assert torch.equal(mapped, expected)  # every page read: resident and mapped
    before = _rss_file_kib()
    if not devices.release_file_pages([mapped]):
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    assert before - _rss_file_kib() >= 48 * 1024  # most of the 64 MiB left the process
    assert torch.equal(mapped, expected)  # read back from the file when touched again
    # anonymous memory is not paged out (it is freed with the tensor; paging would write swap)
    anonymous = torch.ones(1024 * 1024)
    assert not devices.release_file_pages([anonymous]) and bool((anonymous == 1).all())


def test_constructing_an_engine_changes_nothing_process_wide(tiny_llama_path, monkeypatch):
    import os

    from tunehub.server.engine import Engine, load_base

    calls = []
    monkeypatch.setattr(devices, "_mallopt", lambda *settings: calls.append(settings) or True)
    base = load_base(tiny_llama_path, quantization="none", device="cpu")
    environ = dict(os.environ)
    Engine(base)  # on the CPU: the reusing allocator is the serve entry point's choice, not the engine's
    assert calls == [] and dict(os.environ) == environ
    Engine(base, cpu_allocator="auto")  # what `tunehub serve` passes
    assert calls == [
        ((devices._M_MMAP_THRESHOLD, devices.REUSING_MMAP_THRESHOLD), (devices._M_TRIM_THRESHOLD, devices.REUSING_TRIM_THRESHOLD))
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_an_engine_leaves_glibcs_default_allocator_in_place(tiny_llama_path):
    # observed as the allocator tests above do: in a child process, freed 2 MiB blocks go back to
    # the OS under glibc's default policy and stay resident under the reusing one
    script = textwrap.dedent("""
        import os, sys, torch
        from tunehub.server.engine import Engine, load_base
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        environ = dict(os.environ)
        Engine(load_base(sys.argv[1], quantization="none", device="cpu"))
        assert dict(os.environ) == environ, "the engine changed the environment"
        blocks = [torch.ones(512 * 1024) for _ in range(64)]
        pin = torch.ones(512 * 1024)
        before = rss()
        del blocks
        print(before - rss())
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tiny_llama_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 120 * 1024 * 1024  # glibc's default returned the 128 MiB
