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
