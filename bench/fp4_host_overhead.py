"""Host time of one eager FP4 product against ``F.linear``: where decode's (``--m 1``) and
prefill's (``--m 512``) host time goes.

    python bench/fp4_host_overhead.py --n 2048 --k 2048 --calls 2000
    python bench/fp4_host_overhead.py --n 4096 --k 4096 --m 512 --calls 200

For each path, ``--calls`` back-to-back calls without a sync in between (the host-side cost
per call while the GPU queue absorbs the kernels: keep ``--calls`` low enough that the queue
never fills when the kernels are long, as at large ``--m``), then the GPU time per call from CUDA
events, and a cProfile of the public call's Python frames (top entries by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from variants import write_results


def _host_us(fn, calls: int) -> tuple[float, float]:
    """(host µs per call, device µs per call) over ``calls`` calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return 1e6 * host / calls, 1000 * start.elapsed_time(end) / calls


def main() -> None:
    from apt_model.fp4.layer import FP4Linear
    from apt_model.fp4.ops import fp4_linear

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--m", type=int, default=1, help="activation rows")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    linear = torch.nn.Linear(args.k, args.n, bias=False, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, args.m, args.k, device=dev, dtype=torch.bfloat16)
    layer = FP4Linear(linear).freeze()
    w = layer.packed_weight()
    rows = {}
    with torch.inference_mode():
        rows["F.linear bf16"] = _host_us(lambda: F.linear(x, linear.weight), args.calls)
        rows["fp4_linear (op entry)"] = _host_us(lambda: fp4_linear(x, w), args.calls)
        rows["FP4Linear.forward (frozen)"] = _host_us(lambda: layer(x), args.calls)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            layer(x)
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} N={args.n} K={args.k} M={args.m} bf16")
    for name, (host, device) in rows.items():
        print(f"{name:28} host {host:7.1f} µs/call   device {device:7.1f} µs/call")
    print(text.getvalue())
    write_results(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
