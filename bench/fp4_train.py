"""One FP4 layer's training step (forward + backward) by each path, next to bf16, one run.

    python bench/fp4_train.py --json bench/results/fp4_train-h100.json

Rows per (layer K -> N, M activation rows), fp32 master weight, bf16 autocast, all timed
in the same process (``triton.testing.do_bench`` medians, L2 flushed before each call):
  bf16-linear        nn.Linear under autocast (no quantization: the speed to beat)
  ref-fakequant      the PyTorch reference fake quantization + cuBLAS (VB_FP4_TRITON=0)
  triton-fakequant   the Triton fake-quantization kernel (straight into bf16) + cuBLAS
  fused              Triton quantization to packed FP4, fused forward and input gradient
  auto               what FP4Linear picks for this M
Each step includes re-quantizing the master weight, as every training step must.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

from apt_model.fp4 import layer as fl


def _step(fn, x, grad_out):
    out = fn(x)
    out.backward(grad_out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8192x28672,4096x4096", help="KxN layers")
    p.add_argument("--m", default="16,64,256,4096")
    p.add_argument("--fmt", default="nvfp4")
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "python": platform.python_version(), "command": " ".join(sys.argv),
    }
    print(json.dumps(meta))
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, device="cuda")
        with torch.no_grad():
            lin.weight.mul_(0.02 * k**0.5)
        layer = fl.FP4Linear(lin, args.fmt).train()
        w, b, fmt = layer.weight, layer.bias, args.fmt

        def ref(x, w=w, b=b, fmt=fmt):
            os.environ["VB_FP4_TRITON"] = "0"
            try:
                return F.linear(x, fl.straight_through_fp4(w, fmt, x.dtype), b)
            finally:
                os.environ.pop("VB_FP4_TRITON")

        paths = {
            "bf16-linear": lambda x, lin=lin: lin(x),
            "ref-fakequant": ref,
            "triton-fakequant": lambda x, w=w, b=b, fmt=fmt: F.linear(
                x, fl.straight_through_fp4(w, fmt, x.dtype), b),
            "fused": lambda x, w=w, b=b, fmt=fmt: fl.fused_training_linear(x, w, b, fmt),
            "auto": layer,
        }
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            grad_out = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            for name, fn in paths.items():
                def call(fn=fn, x=x, grad_out=grad_out):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        _step(fn, x, grad_out)

                try:
                    call()
                    torch.cuda.synchronize()
                    ms = do_bench(call, warmup=25, rep=args.rep, return_mode="median",
                                  grad_to_none=[x, w, b, lin.weight, lin.bias])
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"fail {name} {k}->{n} M={m}: {exc}", flush=True)
                    continue
                rows.append(dict(k=k, n=n, m=m, impl=name, ms=ms))
                print(f"{k}->{n} M={m:5d} {name:18s} {ms:8.4f} ms", flush=True)
        del layer, lin, w, b
        torch.cuda.empty_cache()
    print("\n| layer | M | path | fwd+bwd ms | vs bf16 |")
    print("|---|---|---|---|---|")
    base = {(r["k"], r["n"], r["m"]): r["ms"] for r in rows if r["impl"] == "bf16-linear"}
    for r in rows:
        ref_ms = base.get((r["k"], r["n"], r["m"]))
        rel = f"{r['ms'] / ref_ms:.2f}x" if ref_ms else ""
        print(f"| {r['k']}->{r['n']} | {r['m']} | {r['impl']} | {r['ms']:.3f} | {rel} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
