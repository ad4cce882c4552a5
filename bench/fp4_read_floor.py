"""The memory floor of a batch-1 FP4 layer: how fast can this GPU just read its packed bytes?

    python bench/fp4_read_floor.py --json bench/results/fp4_read_floor-h100.json

A GEMV over a packed weight cannot beat reading the weight once. This times, in one run:
  copy-1GiB / copy-layer   a device-to-device copy (bytes read + written), the card's ceiling
  read-<tiling>            a Triton kernel that reads the layer's packed words and scales
                           with the GEMV's tilings and only XORs them (no decode, no FMAs)
  gemv                     the real GEMV (``fp4_matmul`` with its default plan for one row:
                           the "gemv" kernel, autotuned)
All by CUDA-graph replay with the L2 flushed before each call (``bench/fp4_linear.py``'s
method), so launch gaps do not count. The gap between ``gemv`` and the best ``read`` row is
what decoding and arithmetic cost over the bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch
from fp4_linear import bench_graph  # bench/ is on the path when this runs as a script

from apt_model.fp4.format import quantize_fp4
from apt_model.fp4.kernel_plan import plan
from apt_model.fp4.triton_matmul import fp4_matmul

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the bench needs a GPU with Triton
    triton = None

if triton is not None:
    @triton.jit
    def _read_kernel(p_ptr, s_ptr, o_ptr, KW, stride_pn, stride_sn, BLOCK_N: tl.constexpr,
                     BKW: tl.constexpr, SPB: tl.constexpr):
        """XOR of a row block's packed words and scale bytes (SPB scale bytes per word tile)."""
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BKW), dtype=tl.int32)
        acc_s = tl.zeros((BLOCK_N, SPB), dtype=tl.int32)
        for kw in range(0, KW, BKW):
            acc ^= tl.load(p_ptr + rows[:, None] * stride_pn + (kw + tl.arange(0, BKW))[None, :])
            acc_s ^= tl.load(s_ptr + rows[:, None] * stride_sn
                             + (kw * SPB // BKW + tl.arange(0, SPB))[None, :]).to(tl.int32)
        tl.store(o_ptr + rows, tl.sum(acc, axis=1) + tl.sum(acc_s, axis=1))


def _graph_ms(fn, reps: int = 20) -> float:
    """Median ms per call by CUDA-graph replay, L2 flushed inside the graph, flushes removed."""
    return bench_graph(lambda _x: fn(), [torch.empty(1, device="cuda")], reps)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8192x28672", help="layer K x N")
    p.add_argument("--fmt", default="nvfp4")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available() or triton is None:
        print("needs a CUDA GPU and Triton", file=sys.stderr)
        return 1
    k, n = (int(v) for v in args.shape.split("x"))
    q = quantize_fp4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, args.fmt)
    # quantize_fp4's packed bytes are contiguous rows of a whole number of int32 words
    words, scales = q.packed.view(torch.int32), q.scales.view(torch.uint8)
    layer_bytes = words.numel() * 4 + scales.numel()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    rows = []

    def record(name: str, ms: float, nbytes: int) -> None:
        rows.append(dict(name=name, ms=ms, tb_s=nbytes / ms / 1e9))
        print(f"{name:28s} {ms:8.4f} ms  {nbytes / ms / 1e9:5.2f} TB/s", flush=True)

    for size, name in ((2**30, "copy-1GiB"), (layer_bytes, "copy-layer")):
        src = torch.empty(size, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        record(name, _graph_ms(lambda s=src, d=dst: d.copy_(s)), 2 * size)
        del src, dst
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    spb_per_word = scales.shape[1] / words.shape[1]
    for block_n, bkw, warps in ((16, 128, 8), (32, 128, 4), (16, 256, 8), (32, 64, 4)):
        if n % block_n or words.shape[1] % bkw:
            continue
        spb = int(bkw * spb_per_word)
        grid = (n // block_n,)
        record(f"read-{block_n}x{8 * bkw}-w{warps}", _graph_ms(
            lambda g=grid, bn=block_n, b=bkw, s=spb, w=warps: _read_kernel[g](
                words, scales, out, words.shape[1], words.stride(0), scales.stride(0),
                BLOCK_N=bn, BKW=b, SPB=s, num_warps=w)), layer_bytes)
    assert plan(1, n, k, fmt=args.fmt).kernel == "gemv"
    record("gemv", _graph_ms(lambda: fp4_matmul(x, q.packed, q.scales, q.tensor_scale, k)),
           layer_bytes)
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=triton.__version__, python=platform.python_version(),
                    command="bench/fp4_read_floor.py " + " ".join(sys.argv[1:]),
                    shape=args.shape, fmt=args.fmt, layer_bytes=layer_bytes)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
