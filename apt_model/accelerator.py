"""Which accelerator this process runs on, what it supports, and its memory counters.

One place that knows about CUDA, Ascend NPU (``torch_npu``), XPU, MPS and other
``torch.accelerator`` devices, so the rest of the package never branches on the backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from apt_model.errors import VBDeviceError
from apt_model.i18n import tr

_KNOWN_TYPES = ("cuda", "npu", "xpu", "mps", "hpu", "mtia", "cpu")


def _import_torch_npu() -> bool:
    """Import torch_npu when installed: it registers the "npu" device type with torch."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    with contextlib.suppress(Exception):
        import torch_npu  # noqa: F401

        return True
    return False


def default_device() -> torch.device:
    """The accelerator torch would pick (CUDA, NPU, XPU, MPS, ...), else the CPU."""
    _import_torch_npu()
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return torch.device(acc.type, torch.accelerator.current_device_index()) if acc else torch.device("cpu")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """Turn "auto"/None/"cuda:1"/"npu"/... into a usable ``torch.device`` or fail clearly."""
    if name is None or str(name).lower() in ("", "auto"):
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise VBDeviceError(
            tr(f"未知设备 '{name}'，可用: auto, {', '.join(_KNOWN_TYPES)}",
               f"unknown device '{name}'; use auto or one of {', '.join(_KNOWN_TYPES)}")
        ) from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "npu":
        _import_torch_npu()
    module = getattr(torch, dev.type, None)
    available = bool(module is not None and getattr(module, "is_available", lambda: False)())
    if not available:
        raise VBDeviceError(tr(f"设备 '{name}' 在本机不可用", f"device '{name}' is not available here"))
    count = module.device_count() if hasattr(module, "device_count") else 1
    index = 0 if dev.index is None else dev.index
    if not 0 <= index < count:  # torch keeps the index in 8 bits: "cuda:999" reads as -25
        raise VBDeviceError(
            tr(f"设备 '{name}' 不存在（本机只有 {count} 个 {dev.type} 设备）",
               f"device '{name}' does not exist (this machine has {count} {dev.type} device(s))")
        )
    return torch.device(dev.type, index)


def _backend(device: torch.device):
    return getattr(torch, device.type, None)


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are native here (autocast to bf16 is worth it). On the
    CPU: x86 with AVX512-BF16 or AMX. Elsewhere (AVX2, AVX-512 without BF16, and CPUs torch
    cannot ask) bf16 products are emulated: a bf16 training step measured 10-15x slower than
    fp32 on an AVX2 CPU (BENCHMARKS.md)."""
    if device.type == "cpu":
        cpu = torch.cpu
        probes = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
        return any(callable(probe) and probe() for probe in probes)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        return False
    check = getattr(_backend(device), "is_bf16_supported", None)
    return bool(check()) if callable(check) else True


def supports_fp16(device: torch.device) -> bool:
    """Whether fp16 compute is worth using (GPUs/NPUs; not the CPU)."""
    return device.type != "cpu"


def has_flash_sdpa(device: torch.device) -> bool:
    """Whether scaled_dot_product_attention has a flash/memory-efficient kernel on this device."""
    if device.type == "cuda":
        return bool(torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled())
    return device.type in ("cpu", "npu", "xpu")


def has_triton(device: torch.device) -> bool:
    """Whether Triton kernels can run here (a CUDA/XPU device and an importable triton)."""
    return device.type in ("cuda", "xpu") and importlib.util.find_spec("triton") is not None


def supports_pinned_memory(device: torch.device) -> bool:
    """Whether page-locked host memory speeds host↔device copies for this device."""
    return device.type in ("cuda", "npu", "xpu")


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def memory_allocated(device: torch.device) -> int:
    """Bytes of device memory held by tensors now (0 on the CPU, which has no allocator counter)."""
    if device.type == "cpu":
        return 0
    return int(torch.accelerator.memory_allocated(device))


def max_memory_allocated(device: torch.device) -> int:
    """Peak bytes held by tensors since the last reset (0 on the CPU)."""
    if device.type == "cpu":
        return 0
    return int(torch.accelerator.max_memory_allocated(device))


def reset_peak_memory(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)


def device_memory_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of device memory, or None where the backend cannot say."""
    if device.type == "cpu":
        return None
    with contextlib.suppress(Exception):
        free, total = torch.accelerator.get_memory_info(device)
        return int(free), int(total)
    return None


def host_memory_info() -> tuple[int, int]:
    """(available, total) bytes of host RAM, read from the OS."""
    pages = os.sysconf("SC_PHYS_PAGES")
    page = os.sysconf("SC_PAGE_SIZE")
    avail = os.sysconf("SC_AVPHYS_PAGES")
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024 // page
                break
    return avail * page, pages * page


@dataclass
class DeviceInfo:
    """What ``vb info`` reports about one device."""

    device: torch.device
    name: str
    bf16: bool
    flash_sdpa: bool
    triton: bool
    pinned_memory: bool
    memory: dict[str, tuple[int, int] | None] = field(default_factory=dict)


def describe(device: torch.device) -> DeviceInfo:
    name = "CPU"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type != "cpu":
        get_name = getattr(_backend(device), "get_device_name", None)
        name = get_name(device) if callable(get_name) else device.type
    return DeviceInfo(
        device=device,
        name=name,
        bf16=supports_bf16(device),
        flash_sdpa=has_flash_sdpa(device),
        triton=has_triton(device),
        pinned_memory=supports_pinned_memory(device),
        memory={"device": device_memory_info(device), "host": host_memory_info()},
    )
