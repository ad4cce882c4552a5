"""Throughput of the Triton FP4 dequantization (the large-M chunked path's and the input
gradient's first pass) by tile, against a same-run bf16 copy of the output's size.

    python bench/fp4_dequant.py --shapes 4096x4096,14336x4096 --json results/fp4-dequant.json

GB/s counts the bytes a pass must move: packed codes and block scales read, bf16 written.
Timed by CUDA-graph replay (:func:`fp4_linear.bench_graph`), so launch gaps do not count.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from fp4_linear import bench_graph
from variants import write_results


def _shape_rows(shape: str, fmt: str) -> list[dict]:
    """The copy reference and every tile for one NxK weight."""
    from apt_model.fp4 import triton_matmul
    from apt_model.fp4.format import quantize_fp4

    n, k = map(int, shape.split("x"))
    w = quantize_fp4(torch.randn(n, k, device="cuda"), fmt)
    out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
    src = torch.empty_like(out)
    moved = w.packed.nbytes + w.scales.nbytes + out.nbytes
    copy_ms = bench_graph(lambda _: out.copy_(src), [out])
    rows = [{"shape": shape, "tile": "bf16 copy (reads and writes 2 B each)", "ms": copy_ms,
             "gbps": 2 * out.nbytes / copy_ms / 1e6}]
    default = dict(triton_matmul.DEQUANT_BLOCK)
    for bn, bkw, warps in itertools.product((4, 8, 16, 32), (16, 32, 64), (4, 8)):
        triton_matmul.DEQUANT_BLOCK.update(BLOCK_N=bn, BKW=bkw, num_warps=warps)
        ms = bench_graph(lambda _: triton_matmul.fp4_dequantize(w.packed, w.scales, w.tensor_scale, k, out=out),
                         [out])
        rows.append({"shape": shape, "tile": f"{bn} rows x {bkw} words, {warps} warps", "ms": ms,
                     "gbps": moved / ms / 1e6,
                     "default": (bn, bkw, warps) == (default["BLOCK_N"], default["BKW"], default["num_warps"])})
    triton_matmul.DEQUANT_BLOCK.update(default)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4096x4096,14336x4096", help="NxK weights, comma-separated")
    p.add_argument("--fmt", default="nvfp4")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = [row for shape in args.shapes.split(",") for row in _shape_rows(shape, args.fmt)]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} {args.fmt}")
    for r in rows:
        print(f"{r['shape']:>12} {r['tile']:38} {r['ms'] * 1000:8.1f} µs {r['gbps']:8.0f} GB/s"
              f"{'  (default)' if r.get('default') else ''}")
    write_results(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
