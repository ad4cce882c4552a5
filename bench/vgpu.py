"""VGPU weight streaming, part (a) of issue 12: a stack of bf16 linear layers (``--gib`` in
all) served at M = 1 with its weights in host RAM, each variant in a fresh process:

* ``floor``: the pinned-copy floor, the same bytes copied layer by layer from pinned host
  memory on a side stream (no compute), as GB/s;
* ``vb_bf16``: VB's VGPU stack (``vb.optimize`` with ``vgpu_config``: Level 0 holds
  ``--slots`` layers, host RAM all of them), layers prefetched on a side stream;
* ``vb_fp4``: the same layers in speed mode, frozen (``vb.freeze_fp4``): packed NVFP4 streams;
* ``accelerate``: accelerate's ``cpu_offload`` (skipped where accelerate does not import).

    python bench/vgpu.py --json vgpu.json                 # on the GPU: 3 GiB, 24 layers
    python bench/vgpu.py --device cpu --gib 0.05          # a smoke test anywhere

Times are medians of ``--iters`` forwards after ``--warmup`` (CUDA events on a GPU, the
clock on the CPU), fresh random input each time; ``stream_gbps`` is the bytes that crossed
into Level 0 per forward over that time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modes import device_name  # noqa: E402
from variants import (  # noqa: E402
    add_variant_arguments,
    cuda_timed,
    run_in_subprocesses,
    write_results,
)

VARIANTS = ("floor", "vb_bf16", "vb_fp4", "accelerate")
FORWARDED = ("device", "gib", "layers", "slots", "iters", "warmup")
MIB = 1 << 20


class LinearStack(nn.Module):
    """``n`` square bias-free linear layers applied in turn."""

    def __init__(self, width: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def width_for(gib: float, layers: int) -> int:
    """The layer width (a multiple of 64) that makes ``layers`` bf16 layers ``gib`` GiB."""
    return max(64, int(math.sqrt(gib * 2**30 / (2 * layers))) // 64 * 64)


def timed(device: torch.device, call: Callable[[], object]) -> float:
    """Milliseconds of ``call()``."""
    if device.type == "cuda":
        return cuda_timed(call)[0]
    start = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - start)


def median_ms(device: torch.device, call: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        call()
    return statistics.median(timed(device, call) for _ in range(iters))


def floor(args: argparse.Namespace, device: torch.device, width: int) -> dict:
    """Layer-sized copies from pinned host memory into two device buffers, on a side stream."""
    nbytes = width * width * 2
    pinned = device.type == "cuda"
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(args.layers)]
    dev = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    stream = torch.cuda.Stream(device) if pinned else None

    def run() -> None:
        if stream is None:
            for i, h in enumerate(host):
                dev[i % 2].copy_(h)
            return
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for i, h in enumerate(host):
                dev[i % 2].copy_(h, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(stream)

    ms = median_ms(device, run, args.warmup, args.iters)
    return {"ms": ms, "stream_gbps": nbytes * args.layers / ms / 1e6, "pinned": pinned}


def vb_stream(args: argparse.Namespace, device: torch.device, width: int, fp4: bool) -> dict:
    """The stack served by VB's VGPU stack, in bf16 or as packed NVFP4. Built on the device
    (FP4 quantizes there); the first forward moves the layers out to host RAM."""
    import apt_model.optimization.vb_global as vb
    from apt_model import vgpu

    torch.manual_seed(0)
    model = LinearStack(width, args.layers).to(device, torch.bfloat16).eval()
    layer_bytes = width * width * 2 if not fp4 else width * width // 2 + width * width // 16 + 512
    level0_mb = (args.slots + 0.5) * layer_bytes / MIB
    levels = [{"capacity_mb": level0_mb, "device": str(device), "speed_gbps": 50},
              {"capacity_mb": 1.1 * args.layers * width * width * 2 / MIB, "device": "cpu", "speed_gbps": 50}]
    vb.optimize(model, mode="speed", fp4=fp4, verbose=False, vgpu_config={"levels": levels})
    if fp4:
        vb.freeze_fp4(model)
    stack = vgpu.stack_of(model)
    x = lambda: torch.randn(1, width, dtype=torch.bfloat16, device=device)  # noqa: E731

    def run() -> None:
        with torch.no_grad():
            model(x())

    run()  # places the model
    before = stack.stats()["levels"][0]["bytes_in"]
    ms = median_ms(device, run, args.warmup, args.iters)
    s = stack.stats()
    l0, l1 = s["levels"][0], s["levels"][1]
    per_forward = (l0["bytes_in"] - before) / (args.warmup + args.iters)
    return {"ms": ms, "stream_gbps": per_forward / ms / 1e6, "streamed_blocks": s["streamed_blocks"],
            "resident_blocks": s["resident_blocks"], "depth": s["depth"], "hit_rate": l0["hit_rate"],
            "stall_ms": 1e3 * l0["stall_s"], "l0_peak_mib": l0["peak_bytes"] / MIB,
            "l0_capacity_mib": l0["capacity_bytes"] / MIB, "copy_gbps": l0["achieved_gbps"],
            "host_pinned": stack.host_memory.pin, "l1_mib": l1["resident_bytes"] / MIB}


def accelerate_offload(args: argparse.Namespace, device: torch.device, width: int) -> dict:
    """The stack under accelerate's ``cpu_offload`` (weights in host RAM, moved per layer)."""
    try:
        from accelerate import cpu_offload
    except ImportError:
        return {"skipped": "accelerate does not import"}
    torch.manual_seed(0)
    model = cpu_offload(LinearStack(width, args.layers).to(torch.bfloat16).eval(), execution_device=device)

    def run() -> None:
        with torch.no_grad():
            model(torch.randn(1, width, dtype=torch.bfloat16, device=device))

    ms = median_ms(device, run, args.warmup, args.iters)
    return {"ms": ms, "stream_gbps": args.layers * width * width * 2 / ms / 1e6}


def run_variant(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    width = width_for(args.gib, args.layers)
    row = {"variant": args.variant, "width": width, "layers": args.layers,
           "bf16_bytes": args.layers * width * width * 2}
    if args.variant == "floor":
        row.update(floor(args, device, width))
    elif args.variant == "accelerate":
        row.update(accelerate_offload(args, device, width))
    else:
        row.update(vb_stream(args, device, width, fp4=args.variant == "vb_fp4"))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gib", type=float, default=3.0, help="bf16 bytes of the whole stack")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--slots", type=int, default=3, help="Level 0 capacity, in layers")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    add_variant_arguments(p, VARIANTS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    results = run_in_subprocesses(__file__, args.only, args, FORWARDED)
    write_results(args.json, {"device": device_name(args.device), "bench": "vgpu", "args": vars(args),
                              "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
