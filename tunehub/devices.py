"""Device facts the trainer and the engine both need: where to compute, in which dtype, and how
to load a base into 4-bit without holding its full-precision weights.

Everything here takes the same path on CUDA and on the CPU; only the answers differ.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path
from typing import Any, Literal

ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX).

    Without them PyTorch's CPU bf16 GEMMs run 2-20x slower than fp32 ones."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_compute_dtype(name: ComputeDtype, device: str | None = None) -> Any:
    """The dtype 4-bit/8-bit layers compute in. ``auto`` is bf16 (QLoRA's choice) where the
    hardware does bf16 natively, else fp32: on such CPUs fp32 gives the same results faster."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    device = device or device_type()
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_quantized(model_cls: Any, path: str | Path, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained(path, **kwargs)`` for a 4-bit/8-bit load, reading each tensor
    with ``pread`` as it is quantized instead of memory-mapping the checkpoint.

    Its 4-bit layers keep the layout that dequantizing reads (:func:`tunehub.quantization.keep_4bit_layout`).

    transformers maps every safetensors file for the whole load and keeps the pages it touched
    resident, so a quantizing load peaks at the full-precision checkpoint's size next to the
    quantized copy: more than the 4-bit model will ever need. Reading tensor by tensor keeps
    the peak near the quantized model. Falls back to the plain load where that is not possible
    (no local safetensors files, an older safetensors without the pread backend)."""
    from transformers import AutoConfig

    from tunehub.quantization import keep_4bit_layout

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files or kwargs.get("state_dict") is not None:
        model = model_cls.from_pretrained(path, **kwargs)
        keep_4bit_layout(model)
        return model
    try:
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    except TypeError:  # safetensors without the backend argument
        model = model_cls.from_pretrained(path, **kwargs)
        keep_4bit_layout(model)
        return model
    config = kwargs.pop("config", None)
    state_dict = {}
    for handle in handles:
        for key in handle.keys():
            state_dict[key] = handle.get_slice(key)  # read when the loader asks for it
    config = config or AutoConfig.from_pretrained(path)
    # an Auto class picks the concrete class from the config; from_pretrained(None, state_dict=...)
    # needs that class itself
    concrete = model_cls
    mapping = getattr(model_cls, "_model_mapping", None)
    if mapping is not None:
        concrete = mapping[type(config)]
    try:
        model = concrete.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    finally:
        state_dict.clear()
        del handles
    # what from_pretrained(path) records: PEFT reads it (a name of None sends its checkpoint saves
    # looking for the base's config on the Hub, a warning offline)
    model.config.name_or_path = str(path)
    model.name_or_path = str(path)
    keep_4bit_layout(model)  # dequantizing must stay right after the first forward
    return model


#: glibc's mallopt parameters: the size from which allocations get their own mapping, and the
#: free space at the top of the heap above which glibc hands memory back to the OS
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
LEAN_MMAP_THRESHOLD = 1 << 20
REUSING_MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
REUSING_TRIM_THRESHOLD = 1 << 30


def use_lean_cpu_allocator(threshold: int = LEAN_MMAP_THRESHOLD) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more from their own mappings, which
    go back to the OS when freed. For the rest of the process; True if it took effect.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), so
    after the first training step activations live in the heap, and freed ones stay resident
    there, fragmented: a QLoRA step of a 300M model then peaks at more than twice the memory it
    uses. The price is a page fault per fresh page of each such allocation (some speed)."""
    return _mallopt((_M_MMAP_THRESHOLD, threshold))


def use_reusing_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse: allocations up to 32 MiB come from the heap and
    freed heap memory stays mapped. For the rest of the process; True if it took effect.

    What a long-running server wants: every decode step frees and allocates the same shapes
    again, and each fresh page costs a page fault (on some VMs 5 us per 4 KiB page, a 7 MB module
    8 ms), while glibc's defaults hand mid-sized blocks back to the OS and map them anew. Resident
    memory stays at its high-water mark instead of shrinking; evicted modules' memory is reused
    by the next ones."""
    return _mallopt((_M_MMAP_THRESHOLD, REUSING_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, REUSING_TRIM_THRESHOLD))


_MADV_PAGEOUT = 21  # Linux 5.4+
_PAGE = 4096


def release_file_pages(tensors: list[Any]) -> int:
    """For each tensor whose bytes lie in a file mapping (a checkpoint mapped zero-copy), ask the
    kernel to reclaim the whole pages only it occupies (``MADV_PAGEOUT``: the pages are clean, so
    they are dropped, and read again from the file if ever touched). For weights copied into
    another layout while their checkpoint stays mapped for other tensors: every page read while
    copying would otherwise stay resident. Anonymous memory is left alone (it is freed with the
    tensor, and paging it out would write it to swap). Returns how many the kernel took."""
    libc = _libc()
    if libc is None:
        return 0
    file_maps = _file_mappings()  # read once for all the tensors
    released = 0
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first = -(-start // _PAGE) * _PAGE  # whole pages inside the tensor only
        last = end // _PAGE * _PAGE
        if last > first and any(low <= first and last <= high for low, high in file_maps):
            released += libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT) == 0
    return released


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's file mappings (those with an inode and a path)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[4] != "0" and not fields[5].startswith("["):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high))
    except (OSError, ValueError):
        pass
    return ranges


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc through ctypes, loaded once; None off Linux or without glibc."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def _mallopt(*settings: tuple[int, int]) -> bool:
    libc = _libc()
    try:
        return libc is not None and all(bool(libc.mallopt(param, int(value))) for param, value in settings)
    except AttributeError:  # not glibc (musl has no mallopt)
        return False
