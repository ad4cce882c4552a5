"""FP4 inference on the CPU: ``model.generate`` speed and weight bytes, fp32 against VB speed mode.

    python bench/cpu_decode.py --threads 2 --preset small --prompt 64 --new 64 --runs 3

On the CPU an FP4 layer has no fused kernel: every call dequantizes the packed weight to the
activations' dtype and multiplies with ``F.linear`` (``apt_model.fp4.ops``, the
reference path). So FP4 should save memory there, not time; this bench measures both.

Variants (each in a fresh subprocess, the same seeded model, batch 1, greedy):
  fp32             the plain model, plain ``generate`` (the baseline)
  vb-balanced      ``vb.enable_balanced_mode()`` before the model is built (bf16 autocast, SDPA)
  vb-speed         ``vb.enable_speed_mode()`` before the model is built (FP4 layers, fp32
                   master weights kept)
  vb-speed-frozen  the same + ``vb.freeze_fp4(model)`` (master weights dropped, packed FP4 only)

Weight bytes: ``weight_bytes`` = bytes of the model's parameters and buffers as it serves
(for a frozen model: the packed FP4 codes and scales plus the layers left in fp32);
``vb_param_bytes_before/after`` = ``vb.get_stats()["param_bytes_before"/"param_bytes_after"]``
(the plain model's bytes / the weights the computation reads). Speed: decode time =
``generate(new)`` minus ``generate(1)`` (the same prefill), ``time.perf_counter``, median of
``--runs`` after a warm-up; decode tokens/s = (new - 1) / decode time. The same difference
in process CPU time (``time.process_time``, all threads) is recorded, and the variants run
with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set (see ``bench/modes.py``: on a shared
machine CPU time stays the work done when wall time does not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from modes import cpu_name
from variants import add_variant_arguments, run_in_subprocesses

from apt_model.storage import module_nbytes

VARIANTS = ("fp32", "vb-balanced", "vb-speed", "vb-speed-frozen")


def run_variant(args: argparse.Namespace) -> dict:
    from apt_model.modeling.apt_model import APTConfig, APTModel

    torch.set_num_threads(args.threads)
    variant = args.variant
    vb = None
    if variant.startswith("vb-"):
        import apt_model.optimization.vb_global as vb

        getattr(vb, "enable_balanced_mode" if variant == "vb-balanced" else "enable_speed_mode")(verbose=False)
    torch.manual_seed(0)
    model = APTModel(APTConfig.from_preset(args.preset, vocab_size=args.vocab)).eval()
    if variant == "vb-speed-frozen":
        vb.freeze_fp4(model)
    stats = vb.get_stats() if vb else {}
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=gen)

    def timed(new_tokens: int) -> tuple[float, float, list[int]]:
        """(wall ms, CPU ms of the process, new tokens)"""
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model.generate(prompt, new_tokens, do_sample=False)
        wall, cpu = (time.perf_counter() - start) * 1000, (time.process_time() - cpu_start) * 1000
        return wall, cpu, out[0, args.prompt:].tolist()

    load_before = os.getloadavg()[0]
    _, _, tokens = timed(args.new)  # warm-up
    full, prefill, full_cpu, prefill_cpu = [], [], [], []
    for _ in range(args.runs):
        ms, cpu_ms, again = timed(args.new)
        full.append(ms)
        full_cpu.append(cpu_ms)
        ms, cpu_ms, _ = timed(1)
        prefill.append(ms)
        prefill_cpu.append(cpu_ms)
        if again != tokens:
            raise RuntimeError("greedy tokens changed between runs")
    decode_ms = statistics.median(f - p for f, p in zip(full, prefill, strict=True))
    decode_cpu_ms = statistics.median(f - p for f, p in zip(full_cpu, prefill_cpu, strict=True))
    return {
        "variant": variant,
        "threads": torch.get_num_threads(),
        "fp4_layers": sum(type(m).__name__ == "FP4Linear" for m in model.modules()),
        "weight_bytes": module_nbytes(model),
        "vb_param_bytes_before": stats.get("param_bytes_before"),
        "vb_param_bytes_after": stats.get("param_bytes_after"),
        "generate_ms": statistics.median(full),
        "generate_ms_runs": full,
        "prefill_ms": statistics.median(prefill),
        "decode_ms_per_token": decode_ms / (args.new - 1),
        "best_generate_ms": min(full),
        "decode_cpu_ms_per_token": decode_cpu_ms / (args.new - 1),
        "decode_tok_s": (args.new - 1) / (decode_ms / 1000),
        "e2e_tok_s": args.new / (statistics.median(full) / 1000),
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    add_variant_arguments(parser, VARIANTS)
    args = parser.parse_args()
    if args.new < 2:
        parser.error("--new must be at least 2")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/modes.py
    results = run_in_subprocesses(__file__, args.only, args, ("threads", "preset", "vocab", "prompt", "new", "runs"))
    base = next((r for r in results if r["variant"] == "fp32" and "error" not in r), None)
    print(f"\n{cpu_name()} torch {torch.__version__} threads={args.threads} preset={args.preset} "
          f"vocab={args.vocab} batch=1 prompt={args.prompt} new={args.new} greedy, median of {args.runs}")
    print(f"{'variant':16} {'weights MiB':>11} {'vs fp32':>8} {'ms/token':>9} {'CPU ms/token':>12} "
          f"{'decode tok/s':>12} {'vs fp32':>8} {'CPU vs fp32':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:16} ERROR {r['error']}")
            continue
        if base:
            r["weight_ratio_vs_fp32"] = r["weight_bytes"] / base["weight_bytes"]
            r["speed_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["cpu_time_vs_fp32"] = r["decode_cpu_ms_per_token"] / base["decode_cpu_ms_per_token"]
        ratio = f"{r['weight_ratio_vs_fp32']:.3f}" if base else "-"
        speed = f"{r['speed_vs_fp32']:.3f}x" if base else "-"
        cpu = f"{r['cpu_time_vs_fp32']:.2f}x" if base else "-"
        print(f"{r['variant']:16} {r['weight_bytes'] / 2**20:11.2f} {ratio:>8} {r['decode_ms_per_token']:9.2f} "
              f"{r['decode_cpu_ms_per_token']:12.2f} {r['decode_tok_s']:12.1f} {speed:>8} {cpu:>11}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": cpu_name(), "torch": torch.__version__, "args": vars(args),
                       "date": time.strftime("%Y-%m-%d"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
