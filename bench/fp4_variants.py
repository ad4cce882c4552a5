"""Kernel variants of ``fp4_linear`` side by side, to pick configs and thresholds.

    python bench/fp4_variants.py --json variants.json

Each row pins one kernel of ``apt_model.fp4.triton_matmul.fp4_matmul`` through a
``KernelPlan`` ("gemv", "small", "gemm" with a config, or "chunked" with a slice size;
``apt_model.fp4.kernel_plan.plan`` says what runs by default), checks it
against fp64 on the timing input, then times it next to bf16 cuBLAS on the same input: up to
``--graph-max-m`` rows by CUDA-graph replay (``fp4_linear.bench_graph``: kernels of a few
microseconds, whose launch gaps ``do_bench`` would count), above that by
``triton.testing.do_bench`` (median); the L2 flushed before each call either way.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from fp4_linear import bench_graph  # bench/ is on the path when this runs as a script

from apt_model.fp4.format import quantize_fp4
from apt_model.fp4.kernel_plan import KernelPlan
from apt_model.fp4.triton_matmul import fp4_matmul


def _c(bn, bk, w, st, pf, **kw):
    return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, PREFETCH=pf, **kw)


def _variants(m: int) -> list[tuple[str, dict | None, int | None]]:
    """(kernel, config, chunked slice rows) to try at ``m`` rows."""
    small = [("small", _c(bn, bk, w, st, pf, GROUP_M=1, SWAP=sw), None)
             for bn, bk, w, st, sw, pf in (
                 (64, 256, 4, 3, False, False), (64, 256, 4, 4, False, False),
                 (32, 256, 4, 4, False, False), (64, 128, 4, 4, False, False),
                 (64, 512, 4, 3, False, False), (128, 256, 8, 3, False, False),
                 (64, 256, 4, 4, True, False), (64, 256, 4, 3, False, True))]
    gemm = [("gemm", _c(bn, bk, w, st, pf, BLOCK_M=bm, GROUP_M=8, SWAP=False), None)
            for bm, bn, bk, w, st, pf in (
                (256, 128, 64, 8, 3, True), (256, 128, 64, 8, 4, False),
                (256, 128, 64, 8, 3, False), (128, 128, 64, 4, 3, True),
                (128, 128, 64, 4, 4, False), (128, 256, 64, 8, 4, False))]
    # SWAP: out^T = W @ x^T, the dequantized weight tile as the first (register) operand.
    swapped = [("gemm", _c(bn, bk, w, st, pf, BLOCK_M=bm, GROUP_M=8, SWAP=True), None)
               for bm, bn, bk, w, st, pf in (
                   (128, 128, 64, 4, 3, False), (128, 128, 64, 8, 3, False),
                   (256, 128, 64, 8, 3, False), (256, 128, 64, 8, 4, False),
                   (256, 64, 64, 4, 3, False), (256, 64, 128, 4, 3, False),
                   (256, 128, 128, 8, 3, False), (128, 128, 128, 4, 3, False),
                   (256, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, False),
                   (256, 256, 64, 8, 3, False), (128, 64, 64, 4, 4, False))]
    chunked = [("chunked", None, r) for r in (None, 2048, 4096, 8192)]
    if m == 1:
        gemv = [("gemv", _c(bn, bk, w, 1, pf), None) for bn, bk, w, pf in (
            (16, 1024, 8, 1), (32, 1024, 4, 0), (32, 2048, 8, 0), (16, 2048, 8, 1),
            (64, 1024, 8, 0), (64, 512, 4, 0), (16, 512, 4, 2), (32, 512, 8, 1),
            (64, 1024, 8, 1), (32, 1024, 8, 2), (64, 2048, 8, 0), (128, 1024, 8, 0),
            (16, 4096, 8, 1), (32, 1024, 4, 2))]
        return gemv + small[:2]
    if m <= 16:
        return small
    if m <= 64:
        return small[:3] + gemm[3:5]
    return gemm[:3] + swapped + chunked


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes",
                   default="8192x28672:1,16,64,256,4096;8192x8192:1,16,4096;28672x8192:1,16,4096")
    p.add_argument("--formats", default="nvfp4")
    p.add_argument("--json")
    p.add_argument("--rep", type=int, default=60)
    p.add_argument("--graph-max-m", type=int, default=16)
    p.add_argument("--device", default="cuda", help="cpu only for smoke runs (interpreter)")
    p.add_argument("--kernels", default="", help="comma-separated kernels to keep (default all)")
    args = p.parse_args()
    dev = torch.device(args.device)

    def timed(fn, m: int) -> float:
        if dev.type != "cuda":
            fn()
            return 1.0
        if m <= args.graph_max_m:
            return bench_graph(lambda _x: fn(), [torch.empty(1, device=dev)])
        from triton.testing import do_bench

        return do_bench(fn, rep=args.rep, return_mode="median")

    rows = []
    for spec in args.shapes.split(";"):
        shape, ms_ = spec.split(":")
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        for fmt in args.formats.split(","):
            q = quantize_fp4(w, fmt)
            wd = q.dequantize(torch.float64)
            for m in (int(v) for v in ms_.split(",")):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = x.double() @ wd.T
                base = timed(lambda x=x, w=w: F.linear(x, w), m)
                rows.append(dict(k=k, n=n, m=m, fmt=fmt, impl="bf16-cublas", ms=base))
                print(f"{k}->{n} M={m} {fmt} bf16-cublas {base:.4f} ms", flush=True)
                for kern, cfg, chunk in _variants(m):
                    if args.kernels and kern not in args.kernels.split(","):
                        continue
                    name = f"{kern} {cfg}" if cfg else f"{kern} rows={chunk}"
                    try:
                        out = torch.full((m, n), float("nan"), device=dev, dtype=x.dtype)

                        plan = KernelPlan(kern, config=cfg, chunk_rows=chunk)

                        def run(x=x, q=q, k=k, plan=plan, out=out):
                            return fp4_matmul(x, q.packed, q.scales, q.tensor_scale, k,
                                              plan=plan, out=out)

                        run()
                        err = ((out.double() - ref).norm() / ref.norm()).item()
                        t = timed(run, m)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        rows.append(dict(k=k, n=n, m=m, fmt=fmt, impl=name, error=str(exc)[:300]))
                        continue
                    gbs = (q.nbytes() + 2 * m * (k + n)) / t / 1e6
                    rows.append(dict(k=k, n=n, m=m, fmt=fmt, impl=name, ms=t, rel_err=err,
                                     gb_s=gbs, vs_cublas=t / base))
                    print(f"{k}->{n} M={m} {fmt} {name}: {t:.4f} ms  {gbs:.0f} GB/s  "
                          f"x{t / base:.2f} cuBLAS  err {err:.1e}"
                          f"{'' if err <= 1e-2 else '  WRONG'}", flush=True)
            wd = q = None
        w = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
