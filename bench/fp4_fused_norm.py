"""What the one-row GEMV's RMSNorm saves: the norm made inside the product (``RowProduct``
with ``norm``) against the norm's own kernel followed by the plain GEMV.

    python bench/fp4_fused_norm.py --model llama-8b --json bench/results/fp4-fused-norm-h200.json

For the two products of a decoder layer that read a norm's output (the fused q/k/v and
gate/up products of a Llama-shaped model, ``--model``), bf16 rows, NVFP4 weights, the time
per call (µs), two ways, each variant three ways:

* ``flushed``: CUDA-graph replay with the L2 flushed before each call, subtracted
  (``bench/fp4_linear.py``'s method): one product on its own;
* ``chained``: CUDA-graph replay of 32 calls in a row, each over its own weight (a model's
  32 layers), no flush: the launches follow each other as in a decode step (programmatic
  dependent launch overlapping a GEMV's first weight loads with the kernel before).

Variants: ``plain`` (the product alone, the floor), ``norm kernel + gemv`` (what a layer ran
before), ``gemv making the norm``. The fused result is checked against the unfused one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics

import torch
from fp4_linear import bench_graph  # bench/ is on the path when this runs as a script

from apt_model.fp4.format import quantize_fp4
from apt_model.fp4.triton_matmul import RowProduct
from apt_model.ops.decoder import rms_norm

SHAPES = {  # hidden, intermediate, q + k + v outputs
    "llama-8b": (4096, 14336, 6144),
    "llama-1b": (2048, 8192, 3072),
}
EPS = 1e-5
LAYERS = 32


def _chained_us(fns, reps: int = 15) -> float:
    """Median µs per call of a CUDA graph calling each of ``fns`` once, in order."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-8b", choices=sorted(SHAPES))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    hidden, inter, qkv = SHAPES[args.model]
    torch.manual_seed(0)
    x = torch.randn(1, hidden, device="cuda").bfloat16() * 4
    norm_w = (1 + torch.rand(hidden, device="cuda")).bfloat16()
    rows = []
    for shape, n in (("qkv", qkv), ("gate_up", 2 * inter)):
        weights = [quantize_fp4(torch.randn(n, hidden, device="cuda"), "nvfp4") for _ in range(LAYERS)]
        plain = [RowProduct(w.packed, w.scales, w.tensor_scale, hidden, torch.bfloat16, False)
                 for w in weights]
        fused = [RowProduct(w.packed, w.scales, w.tensor_scale, hidden, torch.bfloat16, False,
                            norm=True, eps=EPS) for w in weights]
        variants = {
            "plain": [lambda p=p: p(x, None) for p in plain],
            "norm kernel + gemv": [lambda p=p: p(rms_norm(x, norm_w, EPS), None) for p in plain],
            "gemv making the norm": [lambda p=p: p(x, None, u=norm_w) for p in fused],
        }
        want = variants["norm kernel + gemv"][0]()
        got = variants["gemv making the norm"][0]()
        diff = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        for variant, fns in variants.items():
            flushed = 1e3 * bench_graph(lambda _x, f=fns[0]: f(), [torch.empty(1, device="cuda")])
            chained = _chained_us(fns)
            rows.append(dict(shape=shape, n=n, k=hidden, variant=variant, flushed_us=flushed,
                             chained_us=chained))
            print(f"{args.model} {shape:8s} {variant:22s} flushed {flushed:7.2f} us  "
                  f"chained {chained:7.2f} us", flush=True)
        print(f"{args.model} {shape:8s} max |fused - unfused| / max |unfused| = {diff:.1e}")
        rows.append(dict(shape=shape, max_rel_diff=diff))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, card=torch.cuda.get_device_name(), torch=torch.__version__,
                           python=platform.python_version(), date=datetime.date.today().isoformat(),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
