"""Layer-level speed of ``fp4_linear`` next to bf16 cuBLAS and other 4-bit paths, one run.

    python bench/fp4_linear.py --check --json bench/results/fp4_linear-h100.json

Rows per (layer K -> N, M activation rows), all timed in the same process:
  bf16-cublas        F.linear with the bf16 weight (the speed to beat)
  dequant+cublas     the reference path: dequantize the whole weight to bf16, then F.linear
  ours-nvfp4/mxfp4   apt_model.fp4.fp4_linear (fused Triton kernels, autotuned; each row
                     records the kernel and config run, from apt_model.fp4.kernel_plan.plan)
  torchao-nvfp4      torchao NVFP4WeightOnlyConfig, eager and torch.compile'd (if importable)
  bnb-fp4            bitsandbytes Linear4bit(quant_type="fp4") (if importable)
Times are ``triton.testing.do_bench`` medians (it flushes L2 before every call), with the
input rotated among several fresh random tensors; up to ``--graph-max-m`` rows also by
CUDA-graph replay (no launch gaps, L2 flushed before each call inside the graph). GB/s counts the packed weight, scales,
x and the output once. ``--check`` first compares ours with fp64 on every shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from apt_model.fp4.format import quantize_fp4
from apt_model.fp4.kernel_plan import chosen_large_kernels, plan
from apt_model.fp4.ops import fp4_linear, fp4_linear_reference

try:
    import triton
except ImportError:  # smoke runs on a machine without Triton
    triton = None


def _bench(fn, inputs, rep_ms: int) -> float:
    """Median ms of ``fn(x)`` with x rotating through ``inputs``."""
    state = {"i": 0}

    def call():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(x)

    if inputs[0].device.type != "cuda":  # smoke runs (TRITON_INTERPRET=1 on CPU)
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(call, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")


def bench_graph(fn, inputs, reps: int = 20) -> float:
    """Median ms per call from CUDA-graph replays, without launch gaps (what decode with
    CUDA graphs sees). Each call follows an L2 flush inside the graph; a graph of the
    flushes alone is timed the same way and subtracted."""
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=inputs[0].device)

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(2):
                fn(inputs[i % len(inputs)])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                flush.zero_()
                if with_fn:
                    fn(inputs[i % len(inputs)])
        return graph

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    with_fn, flushes = capture(True), capture(False)
    replay_ms(with_fn)
    return (replay_ms(with_fn) - replay_ms(flushes)) / reps


def _torchao_linear(w: torch.Tensor, compiled: bool):
    try:
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig
        from torchao.quantization import quantize_
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"torchao unavailable: {type(exc).__name__}: {exc}"
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    quantize_(lin, NVFP4WeightOnlyConfig())
    fn = torch.compile(lin) if compiled else lin
    return fn, None


def _bnb_linear(w: torch.Tensor):
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001
        return None, f"bitsandbytes unavailable: {type(exc).__name__}: {exc}"
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=w.dtype,
                            quant_type="fp4")
    lin.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="fp4")
    return lin.to(w.device), None


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8192x28672,8192x8192", help="KxN layers, comma-separated")
    p.add_argument("--m", default="1,16,4096", help="activation rows, comma-separated")
    p.add_argument("--formats", default="nvfp4,mxfp4")
    p.add_argument("--baselines", default="cublas,dequant,torchao,torchao-compile,bnb")
    p.add_argument("--inputs", type=int, default=4, help="fresh x tensors rotated per timing")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--check", action="store_true", help="accuracy vs fp64 first")
    p.add_argument("--graph-max-m", type=int, default=16,
                   help="also time up to this many rows by CUDA-graph replay (0: never)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--device", default="cuda", help="cpu only for smoke runs (interpreter)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms_list = [int(v) for v in args.m.split(",")]
    formats = args.formats.split(",")
    baselines = set(args.baselines.split(","))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None), "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta))
    rows, checks, notes = [], [], {}

    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        qs = {fmt: quantize_fp4(w, fmt) for fmt in formats}
        if args.check:
            for fmt, q in qs.items():
                wd = q.dequantize(torch.float64)
                for m in ms_list:
                    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
                    err = _rel_err(fp4_linear(x, q, b), x.double() @ wd.T + b.double())
                    checks.append(dict(k=k, n=n, m=m, fmt=fmt, rel_err=err))
                    print(f"check {k}->{n} M={m} {fmt}: rel err {err:.2e}"
                          f"{'' if err <= 1e-2 else '  FAIL'}", flush=True)
                del wd
        fns = {}
        if "cublas" in baselines:
            fns["bf16-cublas"] = lambda x, w=w: F.linear(x, w)
        if "dequant" in baselines:
            fns["dequant+cublas"] = lambda x, q=qs[formats[0]]: fp4_linear_reference(x, q)
        for fmt, q in qs.items():
            fns[f"ours-{fmt}"] = lambda x, q=q: fp4_linear(x, q)
        for name, make in (("torchao-nvfp4", lambda w=w: _torchao_linear(w, False)),
                           ("torchao-nvfp4-compiled", lambda w=w: _torchao_linear(w, True)),
                           ("bnb-fp4", lambda w=w: _bnb_linear(w))):
            key = {"torchao-nvfp4": "torchao", "torchao-nvfp4-compiled": "torchao-compile",
                   "bnb-fp4": "bnb"}[name]
            if key not in baselines:
                continue
            try:
                fn, why = make()
            except Exception as exc:  # noqa: BLE001 - a baseline failing must not stop the run
                fn, why = None, f"{type(exc).__name__}: {exc}"
            if fn is None:
                notes[name] = why
                print(f"skip {name}: {why}", flush=True)
            else:
                fns[name] = fn
        for m in ms_list:
            inputs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                      for _ in range(args.inputs)]
            for name, fn in fns.items():
                t0 = time.time()
                try:
                    with torch.no_grad():
                        fn(inputs[0])
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        ms = _bench(fn, inputs, args.rep)
                except Exception as exc:  # noqa: BLE001
                    notes[f"{name} {k}->{n} M={m}"] = f"{type(exc).__name__}: {exc}"
                    print(f"fail {name} {k}->{n} M={m}: {exc}", flush=True)
                    continue
                row = dict(k=k, n=n, m=m, impl=name, ms=ms, tflops=2 * m * n * k / ms / 1e9,
                           first_call_s=round(time.time() - t0, 2))
                if dev.type == "cuda" and m <= args.graph_max_m:
                    try:
                        with torch.no_grad():
                            row["graph_ms"] = bench_graph(fn, inputs)
                    except Exception as exc:  # noqa: BLE001 - not every baseline captures
                        notes[f"{name} {k}->{n} M={m} graph"] = f"{type(exc).__name__}: {exc}"
                if name.startswith("ours-"):
                    q = qs[name[5:]]
                    nbytes = q.nbytes() + (m * k + m * n) * 2
                    row["gb_s"] = nbytes / ms / 1e6
                    # what ran: the plan (the large-M kernel is measured by now), and the
                    # autotuner's pick where the plan leaves the config open
                    ran = plan(m, n, k, device=dev, dtype=inputs[0].dtype, fmt=name[5:])
                    cfg = ran.config
                    if cfg is None and ran.kernel in ("gemv", "small", "gemm"):
                        from apt_model.fp4.triton_matmul import autotuned_config

                        cfg = autotuned_config(ran.kernel)
                    row["kernel"] = ran.kernel
                    row["config"] = str(cfg) if cfg is not None else None
                rows.append(row)
                print(f"{k}->{n} M={m:5d} {name:24s} {ms:8.4f} ms  {row['tflops']:7.1f} TFLOP/s"
                      + (f"  {row['gb_s']:6.0f} GB/s" if "gb_s" in row and m <= 16 else "")
                      + (f"  graph {row['graph_ms']:.4f} ms" if "graph_ms" in row else ""),
                      flush=True)
            inputs = None
        fns = qs = w = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    print("\n| layer | M | impl | ms | graph ms | TFLOP/s | GB/s (ours, M<=16) | vs bf16 cuBLAS |")
    print("|---|---|---|---|---|---|---|---|")
    base = {(r["k"], r["n"], r["m"]): r["ms"] for r in rows if r["impl"] == "bf16-cublas"}
    for r in rows:
        ref = base.get((r["k"], r["n"], r["m"]))
        gbs = f"{r['gb_s']:.0f}" if "gb_s" in r and r["m"] <= 16 else ""
        rel = f"{r['ms'] / ref:.2f}x" if ref else ""
        graph = f"{r['graph_ms']:.4f}" if "graph_ms" in r else ""
        print(f"| {r['k']}->{r['n']} | {r['m']} | {r['impl']} | {r['ms']:.4f} | {graph} | "
              f"{r['tflops']:.1f} | {gbs} | {rel} |")
    if args.json:
        with open(args.json, "w") as f:
            choice = {str(key): v for key, v in chosen_large_kernels().items()}
            json.dump(dict(meta=meta, rows=rows, checks=checks, notes=notes,
                           large_choice=choice), f, indent=1)
    bad = [c for c in checks if not c["rel_err"] <= 1e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
