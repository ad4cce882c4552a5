"""The one-row FP4 GEMV compiled for a GPU architecture on any machine: registers and the
instructions of its main loop, without a GPU.

    python bench/fp4_gemv_sass.py --arch 90 --configs "16,1024,8,1;32,1024,4,0"

The GEMV is issue-bound on the H200 (BENCHMARKS.md, seventh session): instructions per packed
word decide its speed at least as much as bytes in flight. This compiles
``apt_model.fp4.triton_matmul._fp4_gemv_kernel`` with Triton's own ``ptxas`` for
``--arch`` (no driver needed), specialized as the device specializes a decode call (pointers
and the shape's integers divisible by 16), and prints for each config (BLOCK_N, BLOCK_K,
num_warps, PREFETCH) the registers per thread (``cuobjdump -res-usage``) and the loop's
instructions by opcode, in total and per packed int32 word a thread owns. Static counts: what
one iteration issues, not a profile; timings need ``fp4_read_floor.py`` on the card.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from fp4_read_floor import loop_instruction_mix  # bench/ is on the path when this runs

from apt_model.fp4 import triton_matmul

_POINTERS = {"x_ptr": "*bf16", "u_ptr": "*bf16", "p_ptr": "*i32", "s_ptr": "*u8", "ts_ptr": "*fp32", "b_ptr": "*bf16",
             "o_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
_DIVISIBLE = {"N", "K", "KW", "stride_pn", "stride_sn", "K_SPLIT"}


def compile_gemv(arch: int, block_n: int, block_k: int, warps: int, prefetch: int, fmt: str,
                 norm: bool = False):
    """The GEMV's compiled kernel for ``arch`` (e.g. 90), one config, bf16 rows, no bias,
    normalizing its row (RMSNorm) with ``norm``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton_matmul._fp4_gemv_kernel
    consts = dict(IS_NV=fmt == "nvfp4", HAS_BIAS=False, SPLIT_K=1, USE_ASM=True,
                  HW_E4M3=arch >= 89, PDL=arch >= 90, TS_ROWS=False, PREFETCH=prefetch,
                  NORM=norm, INTERP=False, BLOCK_N=block_n, BLOCK_K=block_k, M_KEY=1)
    names = fn.arg_names
    unknown = set(names) - set(consts) - set(_POINTERS) - _DIVISIBLE - {"EPS"}
    signature = {n: "constexpr" if n in consts else "fp32" if n == "EPS" else _POINTERS.get(n, "i32")
                 for n in names}
    if unknown:
        raise SystemExit(f"the GEMV's parameters changed ({sorted(unknown)}): update this tool")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in _POINTERS or n in _DIVISIBLE}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=1))


def registers(cubin: bytes) -> int:
    """Registers per thread of a compiled kernel, from Triton's bundled ``cuobjdump``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--fmt", default="nvfp4", choices=("nvfp4", "mxfp4"))
    p.add_argument("--configs", default="16,1024,8,1;32,1024,4,0;32,2048,8,0;16,2048,8,1",
                   help="BLOCK_N,BLOCK_K,num_warps,PREFETCH;...")
    p.add_argument("--norm", action="store_true", help="the GEMV normalizing its row (RMSNorm)")
    p.add_argument("--sass", help="folder for each config's SASS")
    p.add_argument("--json")
    args = p.parse_args()
    if not triton_matmul.HAS_TRITON:
        print("needs Triton", file=sys.stderr)
        return 1
    rows = []
    for spec in args.configs.split(";"):
        block_n, block_k, warps, prefetch = (int(v) for v in spec.split(","))
        kernel = compile_gemv(args.arch, block_n, block_k, warps, prefetch, args.fmt, args.norm)
        sass = kernel.asm["sass"]
        if args.sass:
            os.makedirs(args.sass, exist_ok=True)
            with open(os.path.join(args.sass, f"gemv_{spec.replace(',', '_')}.sass"), "w") as f:
                f.write(sass)
        mix = loop_instruction_mix(sass)
        words = block_n * block_k // 8 / (32 * warps)  # packed words a thread owns a tile
        total = sum(mix.values())
        row = dict(config=spec, regs=registers(kernel.asm["cubin"]), loop_instructions=total,
                   per_word=total / words, mix=mix)
        rows.append(row)
        print(f"{spec:16s} regs {row['regs']:4d}  loop {total:5d} instructions, "
              f"{row['per_word']:5.1f} a word  " + " ".join(f"{k}:{v}" for k, v in list(mix.items())[:10]),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, fmt=args.fmt, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
