"""VGPU part (b) of issue 12: Hugging Face ``generate()`` of a Llama-shaped model larger than
Level 0, Level 0 capped at ``--level0-gib``, each variant in a fresh process:

* ``vb_bf16``: ``from_pretrained`` on the CPU, then ``vb.optimize(mode="speed", fp4=False,
  vgpu_config=...)`` with Level 0 = the cap and host RAM below: the first forward moves
  what fits to the card and streams the other decoder layers from pinned host RAM;
* ``vb_fp4``: ``vb.load_pretrained_fp4(folder, device=..., vgpu_config=...)``: the layers
  load straight into packed NVFP4 on the card and the first forward moves those that do
  not fit out to host RAM, from where they stream;
* ``accelerate``: ``from_pretrained(folder, device_map="auto", max_memory={0: cap, "cpu":
  ...})``, accelerate's documented big-model inference (skipped off CUDA or without it).

The checkpoint (seeded random bf16 weights, ``save_pretrained``) is written once, to
/dev/shm where it exists. Per token: ``generate(new)`` minus ``generate(1)``, over ``new - 1``
(CUDA events on a GPU, the clock on the CPU), median of ``--runs``; peak memory is
``max_memory_allocated`` over those calls. Greedy tokens are compared with vb_bf16's.

    python bench/vgpu_generate.py --json vgpu_b.json                  # 8B shape, 4 GiB
    python bench/vgpu_generate.py --device cpu --model llama-tiny --level0-gib 0.03
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_decode import LLAMA_SHAPES, always_n_tokens, build_llama  # noqa: E402
from modes import device_name  # noqa: E402
from variants import add_variant_arguments, run_in_subprocesses, write_results  # noqa: E402
from vgpu import timed  # noqa: E402

VARIANTS = ("vb_bf16", "vb_fp4", "accelerate")
FORWARDED = ("device", "model", "folder", "level0_gib", "prompt", "new", "runs")
GIB = 1 << 30


def levels(args: argparse.Namespace) -> dict:
    """Level 0 = the cap on the compute device, host RAM below it."""
    return {"levels": [{"capacity_mb": args.level0_gib * 1024, "device": args.device, "speed_gbps": 1000},
                       {"capacity_mb": 512 * 1024, "device": "cpu", "speed_gbps": 50}]}


def load(args: argparse.Namespace):
    """The variant's model, ready for ``generate`` (None and a reason where it cannot run)."""
    import transformers

    import apt_model.optimization.vb_global as vb

    if args.variant == "vb_bf16":
        model = transformers.LlamaForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16)
        vb.optimize(model, mode="speed", fp4=False, verbose=False, vgpu_config=levels(args))
        return model, None
    if args.variant == "vb_fp4":
        return vb.load_pretrained_fp4(args.folder, device=args.device, verbose=False,
                                      vgpu_config=levels(args)), None
    if not args.device.startswith("cuda"):
        return None, "accelerate's device_map offload runs from a CUDA device"
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return None, "accelerate does not import"
    index = torch.device(args.device).index or 0
    return transformers.LlamaForCausalLM.from_pretrained(
        args.folder, dtype=torch.bfloat16, device_map="auto",
        max_memory={index: f"{args.level0_gib}GiB", "cpu": "512GiB"}), None


def run_variant(args: argparse.Namespace) -> dict:
    from apt_model import vgpu

    device = torch.device(args.device)
    model, skipped = load(args)
    if model is None:
        return {"variant": args.variant, "skipped": skipped}
    model = always_n_tokens(model)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen).to(device)

    def generate(new: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    tokens = generate(args.new)[0, args.prompt:]  # warm-up (places a VB model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_token = []
    for _ in range(args.runs):
        full, first = timed(device, lambda: generate(args.new)), timed(device, lambda: generate(1))
        per_token.append((full - first) / (args.new - 1))
    row = {"variant": args.variant, "ms_per_token": statistics.median(per_token),
           "ms_runs": per_token, "tok_s": 1000 / statistics.median(per_token),
           "tokens": tokens.tolist()}
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    stack = vgpu.stack_of(model)
    if stack is not None:
        s = stack.stats()
        l0 = s["levels"][0]
        row.update(streamed_blocks=s["streamed_blocks"], resident_blocks=s["resident_blocks"],
                   depth=s["depth"], hit_rate=l0["hit_rate"], stall_s=l0["stall_s"],
                   l0_peak_gib=l0["peak_bytes"] / GIB, l0_capacity_gib=l0["capacity_bytes"] / GIB,
                   copy_gbps=l0["achieved_gbps"])
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=sorted(LLAMA_SHAPES), default="llama-8b")
    p.add_argument("--folder", default="", help="the checkpoint (written here first if empty)")
    p.add_argument("--level0-gib", "--level0_gib", dest="level0_gib", type=float, default=4.0)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--runs", type=int, default=2)
    add_variant_arguments(p, VARIANTS)
    args = p.parse_args()
    if args.new < 2:
        p.error("--new must be at least 2")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as folder:
        if not args.folder:
            build_llama(args.model, "cuda" if torch.cuda.is_available() else "cpu").save_pretrained(folder)
            args.folder = folder
        results = run_in_subprocesses(__file__, args.only, args, FORWARDED)
    reference = next((r["tokens"] for r in results if r.get("variant") == "vb_bf16" and "tokens" in r), None)
    for r in results:
        if reference is not None and "tokens" in r:
            r["tokens_equal_vb_bf16"] = sum(a == b for a, b in zip(r["tokens"], reference, strict=True)) / len(reference)
    print(f"\n{args.model}, Level 0 = {args.level0_gib} GiB on {args.device}, prompt {args.prompt}, new {args.new}")
    for r in results:
        print({k: v for k, v in r.items() if k not in ("tokens", "ms_runs")})
    write_results(args.json, {"device": device_name(args.device), "bench": "vgpu_generate", "args": vars(args),
                              "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
