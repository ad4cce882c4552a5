"""The memory floor of batch-1 FP4 layers: how fast can this GPU just read their packed bytes?

    python bench/fp4_read_floor.py --json bench/results/fp4_read_floor-h100.json

A GEMV over a packed weight cannot beat reading the weight once. This times, in one run,
for each layer shape (``--shapes``, K x N):
  copy-1GiB / copy-layer   a device-to-device copy (bytes read + written), the card's ceiling
  read-<tiling>            a Triton kernel that reads the layer's packed words and scales
                           with the GEMV's tilings and only XORs them (no decode, no FMAs);
                           ``-s<stages>`` lets Triton's pipeliner keep that many tiles in
                           flight through shared memory
  gemv                     the real GEMV (``fp4_matmul`` with its default plan for one row:
                           the "gemv" kernel, autotuned)
  gemv <config>            the GEMV pinned to each config of ``--gemv-configs``
All by CUDA-graph replay with the L2 flushed before each call (``bench/fp4_linear.py``'s
method), so launch gaps do not count. The gap between ``gemv`` and the best ``read`` row is
what decoding and arithmetic cost over the bytes. Each GEMV row records its compiled
kernel's registers and spills per thread; ``--sass DIR`` also writes each GEMV kernel's
SASS there and prints the instructions of its main loop by opcode
(``loop_instruction_mix``; ``fp4_gemv_sass.py`` does the same without a GPU).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import sys

import torch
from fp4_linear import bench_graph  # bench/ is on the path when this runs as a script

from apt_model.fp4 import triton_matmul
from apt_model.fp4.format import quantize_fp4
from apt_model.fp4.kernel_plan import KernelPlan, plan
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

# (BLOCK_N, BLOCK_K, num_warps, num_stages, PREFETCH) pinned GEMV configs timed by default.
_GEMV_CONFIGS = "16,1024,8,1,1;16,1024,8,3,0;16,1024,8,4,0;32,1024,8,3,0;16,512,4,4,0;" \
                "32,512,4,3,0;16,2048,8,2,0"


def _graph_ms(fn, reps: int = 20) -> float:
    """Median ms per call by CUDA-graph replay, L2 flushed inside the graph, flushes removed."""
    return bench_graph(lambda _x: fn(), [torch.empty(1, device="cuda")], reps)


def _compiled_gemvs() -> dict:
    """Every compiled GEMV kernel so far, by its cache key."""
    fn = triton_matmul._fp4_gemv_kernel
    out = {}
    for caches in fn.device_caches.values():
        out.update(caches[0])
    return out


def loop_instruction_mix(sass: str) -> dict[str, int]:
    """Opcode counts in a kernel's main loop: the longest span from a label back to a branch
    to it, in SASS as Triton's ``get_sass`` prints it (control codes, a tab, the
    instruction). Each instruction once: what one iteration issues, not a profile."""
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if line.strip().endswith(":")}
    loop = None
    for i, line in enumerate(lines):
        target = re.search(r"BRA (\w+);", line)
        start = labels.get(target.group(1)) if target else None
        if start is not None and start < i and (loop is None or i - start > loop[1] - loop[0]):
            loop = (start, i)
    if loop is None:
        return {}
    ops = collections.Counter()
    for line in lines[loop[0] + 1: loop[1] + 1]:
        instruction = re.sub(r"^@!?U?P\w+\s+", "", line.split("\t")[-1].strip())
        if instruction and not instruction.endswith(":"):
            ops[instruction.split()[0].split(".")[0].rstrip(";")] += 1
    return dict(ops.most_common())


def _copy_ms(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return _graph_ms(lambda: dst.copy_(src))


def _shape_rows(shape: str, fmt: str, configs: list[tuple[int, ...]], sass_dir: str | None,
                record) -> None:
    """Time the copy, read and GEMV rows of one K x N layer."""
    k, n = (int(v) for v in shape.split("x"))
    q = quantize_fp4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, fmt)
    # quantize_fp4's packed bytes are contiguous rows of a whole number of int32 words
    words, scales = q.packed.view(torch.int32), q.scales.view(torch.uint8)
    layer_bytes = words.numel() * 4 + scales.numel()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ q.dequantize(torch.float64).T
    record(shape, "copy-layer", _copy_ms(layer_bytes), 2 * layer_bytes)
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    spb_per_word = scales.shape[1] / words.shape[1]
    for block_n, bkw, warps, stages in ((16, 128, 8, 1), (32, 128, 4, 1), (16, 256, 8, 1),
                                        (32, 64, 4, 1), (16, 128, 8, 3), (32, 128, 4, 4)):
        if n % block_n or words.shape[1] % bkw:
            continue
        spb = int(bkw * spb_per_word)

        def read(bn=block_n, b=bkw, s=spb, w=warps, st=stages):
            _read_kernel[(n // bn,)](words, scales, out, words.shape[1], words.stride(0),
                                     scales.stride(0), BLOCK_N=bn, BKW=b, SPB=s, num_warps=w,
                                     num_stages=st)

        record(shape, f"read-{block_n}x{8 * bkw}-w{warps}-s{stages}", _graph_ms(read),
               layer_bytes)
    assert plan(1, n, k, fmt=fmt).kernel == "gemv"
    variants = [("gemv", None)] + [
        (f"gemv {bn}x{bk} w{w} s{st} pf{pf}",
         dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, PREFETCH=pf))
        for bn, bk, w, st, pf in configs]
    for name, config in variants:
        run_plan = KernelPlan("gemv", config=config) if config else None
        before = set(_compiled_gemvs())

        def run(run_plan=run_plan):
            return fp4_matmul(x, q.packed, q.scales, q.tensor_scale, k, plan=run_plan)

        try:
            err = ((run().double() - ref).norm() / ref.norm()).item()
            ms = _graph_ms(run)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{shape} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        extra = dict(rel_err=float(f"{err:.2e}"))
        if config is None:  # what the autotuner picked
            extra["config"] = triton_matmul.autotuned_config("gemv")
        new = [kern for key, kern in _compiled_gemvs().items() if key not in before]
        if len(new) == 1:
            kern = new[0]
            extra.update(regs=kern.n_regs, spills=kern.n_spills)
            if sass_dir:
                sass = kern.asm["sass"]
                os.makedirs(sass_dir, exist_ok=True)
                fname = re.sub(r"[^\w.-]+", "_", f"{shape}_{name}") + ".sass"
                with open(os.path.join(sass_dir, fname), "w") as f:
                    f.write(sass)
                extra["mix"] = loop_instruction_mix(sass)
        record(shape, name, ms, layer_bytes, **extra)
        if "mix" in extra:
            print("    " + " ".join(f"{op}:{c}" for op, c in list(extra["mix"].items())[:24]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x28672", help="layer shapes K x N, comma separated")
    p.add_argument("--fmt", default="nvfp4")
    p.add_argument("--gemv-configs", default=_GEMV_CONFIGS,
                   help="BLOCK_N,BLOCK_K,num_warps,num_stages,PREFETCH;... ('' for none)")
    p.add_argument("--sass", help="folder for the GEMV kernels' SASS")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available() or triton is None:
        print("needs a CUDA GPU and Triton", file=sys.stderr)
        return 1
    rows = []

    def record(shape: str, name: str, ms: float, nbytes: int, **extra) -> None:
        rows.append(dict(shape=shape, name=name, ms=ms, tb_s=nbytes / ms / 1e9, **extra))
        more = "  ".join(f"{k}={v}" for k, v in extra.items() if k != "mix")
        print(f"{shape:11s} {name:44s} {ms:8.4f} ms  {nbytes / ms / 1e9:5.2f} TB/s  {more}",
              flush=True)

    record("-", "copy-1GiB", _copy_ms(2**30), 2 * 2**30)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.gemv_configs.split(";") if c]
    for shape in args.shapes.split(","):
        _shape_rows(shape, args.fmt, configs, args.sass, record)
        torch.cuda.empty_cache()
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=triton.__version__, python=platform.python_version(),
                    command="bench/fp4_read_floor.py " + " ".join(sys.argv[1:]), fmt=args.fmt)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
