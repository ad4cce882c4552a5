"""Decode speed of ``APTModel.generate`` at batch 1: VB speed mode against fp32 eager and bf16.

    python bench/decode.py --preset xl --json bench/results/decode-h100.json

At batch 1 a decode step reads every weight once: it is memory-bound, so smaller weights
should be faster, but only once launch overhead stops hiding that. So every variant but the
baseline decodes with a static KV cache and one CUDA graph per token.

Variants (each in a fresh subprocess, the same seeded model built on the card):
  fp32-eager       the plain model, eager attention, plain ``generate`` (the seed's baseline)
  bf16             model.to(bfloat16), SDPA, ``generate(static_cache=True, cuda_graph=True)``
  vb-speed         ``vb.enable_speed_mode()`` before the model is built; the same ``generate``
                   call; FP4 layers use whatever inference path ``FP4Linear`` has
  vb-speed-frozen  the same + ``vb.freeze_fp4(model)`` (fp32 masters dropped), where
                   that function exists
  bf16-compiled / vb-speed-compiled
                   bf16 / vb-speed-frozen with ``generate(..., compile_step=True)``: the step
                   is compiled (fused elementwise kernels) before the graph is captured

Decode time: ``generate(new)`` minus ``generate(1)`` (the same prefill, no decode step), each
CUDA-event timed, median of ``--runs`` after a warm-up (which also captures the graphs);
tokens/s = (new - 1) / decode time. End-to-end tokens/s = new / ``generate(new)`` time.
"of floor": ms/token as a percentage of the weight-read floor (the bytes a step must read,
at the read bandwidth measured in the same process: ``variants.floor_fields``).
Checks: greedy tokens against fp32-eager's over the first ``--check`` new tokens, and in each
variant its graphed tokens against its own plain ``generate`` and static-cache-without-graph.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from variants import (
    add_variant_arguments,
    cuda_timed,
    floor_fields,
    read_bandwidth,
    run_in_subprocesses,
)

from apt_model.storage import module_nbytes

VARIANTS = ("fp32-eager", "bf16", "vb-speed", "vb-speed-frozen", "bf16-compiled", "vb-speed-compiled")


def _agreement(a: list[int], b: list[int]) -> float:
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n], strict=True)) / n if n else 0.0


def run_variant(args: argparse.Namespace) -> dict:
    import apt_model.optimization.vb_global as vb
    from apt_model.modeling.apt_model import APTConfig, APTModel

    variant = args.variant
    device = torch.device("cuda")
    bandwidth = read_bandwidth()  # before the model: the allocations below are the model's
    if variant in ("vb-speed-frozen", "vb-speed-compiled") and not hasattr(vb, "freeze_fp4"):
        return {"variant": variant, "skipped": "vb.freeze_fp4 does not exist"}
    if variant.startswith("vb-"):
        vb.enable_speed_mode(verbose=False)
    config = APTConfig.from_preset(args.preset, vocab_size=args.vocab)
    torch.manual_seed(0)
    with torch.device(device):
        model = APTModel(config)
    if variant.startswith("bf16"):
        model.to(torch.bfloat16)
        model.set_attn_implementation("sdpa")
    if variant in ("vb-speed-frozen", "vb-speed-compiled"):
        vb.freeze_fp4(model)
    model.eval()
    torch.cuda.synchronize()
    allocated_after_build = torch.cuda.memory_allocated(device)
    fp4_layers = sum(type(m).__name__ == "FP4Linear" for m in model.modules())

    gen = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device=device, generator=gen)
    fast = {} if variant == "fp32-eager" else {"static_cache": True, "cuda_graph": True}
    if variant.endswith("-compiled"):
        fast["compile_step"] = True

    def timed(new_tokens: int, **kw) -> tuple[float, torch.Tensor]:
        ms, out = cuda_timed(lambda: model.generate(prompt, new_tokens, do_sample=False, **kw))
        return ms, out[0, args.prompt:]

    wall = time.perf_counter()
    first_ms, tokens = timed(args.new, **fast)  # warm-up; captures the graph
    first_wall_s = time.perf_counter() - wall
    timed(1, **fast)
    allocated_after_warmup = torch.cuda.memory_allocated(device)
    full, prefill, repeat_agreement = [], [], []
    for _ in range(args.runs):
        ms, again = timed(args.new, **fast)
        full.append(ms)
        prefill.append(timed(1, **fast)[0])
        # bf16 logits may round differently between runs (cuBLAS split-K); near-ties of a
        # seeded random model then flip a greedy token: reported, not fatal.
        repeat_agreement.append(_agreement(again.tolist(), tokens.tolist()))
    decode_ms = statistics.median(f - p for f, p in zip(full, prefill, strict=True))

    checks = {}
    if args.check:  # fraction of the first ``check`` greedy tokens equal to plain generate's
        def new_tokens(**kw) -> list[int]:
            return model.generate(prompt, args.check, do_sample=False, **kw)[0, args.prompt:].tolist()

        reference = new_tokens()
        graphed = tokens[:args.check].tolist() if fast else new_tokens(static_cache=True, cuda_graph=True)
        checks["graph_vs_plain_generate"] = _agreement(graphed, reference)
        checks["static_no_graph_vs_plain_generate"] = _agreement(new_tokens(static_cache=True), reference)
    return {
        "variant": variant,
        "generate_kwargs": fast,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "fp4_layers": fp4_layers,
        "param_buffer_bytes": module_nbytes(model),
        "allocated_after_build": allocated_after_build,
        "allocated_after_warmup": allocated_after_warmup,
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "first_call_ms": first_ms,
        "first_call_wall_s": first_wall_s,
        "generate_ms": statistics.median(full),
        "generate_ms_runs": full,
        "prefill_ms": statistics.median(prefill),
        "decode_ms_per_token": decode_ms / (args.new - 1),
        "decode_tok_s": (args.new - 1) / (decode_ms / 1000),
        **floor_fields(model, decode_ms / (args.new - 1), bandwidth),
        "e2e_tok_s": args.new / (statistics.median(full) / 1000),
        "self_checks": checks,
        "repeat_agreement": min(repeat_agreement),
        "tokens": tokens.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="xl")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--check", type=int, default=32, help="new tokens compared between variants")
    add_variant_arguments(parser, VARIANTS)
    args = parser.parse_args()
    if args.new < 2:
        parser.error("--new must be at least 2")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = run_in_subprocesses(__file__, args.only, args, ("preset", "vocab", "prompt", "new", "runs", "check"))

    ok = {r["variant"]: r for r in results if "decode_tok_s" in r}
    base, bf16 = ok.get("fp32-eager"), ok.get("bf16")
    for r in ok.values():
        if base is not None:
            r["agreement_vs_fp32"] = _agreement(r["tokens"][:args.check], base["tokens"][:args.check])
        r["speedup_vs_fp32_eager"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
        r["speedup_vs_bf16"] = r["decode_tok_s"] / bf16["decode_tok_s"] if bf16 else None

    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} preset={args.preset} vocab={args.vocab} "
          f"batch=1 prompt={args.prompt} new={args.new} greedy, median of {args.runs}")
    print(f"{'variant':16} {'weights GiB':>11} {'alloc GiB':>9} {'prefill ms':>10} {'ms/token':>8} "
          f"{'decode tok/s':>12} {'of floor':>8} {'vs fp32':>8} {'vs bf16':>8} {f'agree@{args.check}':>9} "
          f"{'graph=plain':>11}")
    for r in results:
        if "decode_tok_s" not in r:
            print(f"{r['variant']:16} {'SKIPPED ' + r['skipped'] if 'skipped' in r else 'ERROR ' + str(r['error'])}")
            continue
        vs_fp32 = f"{r['speedup_vs_fp32_eager']:.2f}x" if r["speedup_vs_fp32_eager"] else "-"
        vs_bf16 = f"{r['speedup_vs_bf16']:.2f}x" if r["speedup_vs_bf16"] else "-"
        agree = f"{100 * r['agreement_vs_fp32']:.0f}%" if "agreement_vs_fp32" in r else "-"
        self_check = f"{100 * r['self_checks'].get('graph_vs_plain_generate', float('nan')):.0f}%"
        print(f"{r['variant']:16} {r['param_buffer_bytes'] / 2**30:11.2f} {r['allocated_after_build'] / 2**30:9.2f} "
              f"{r['prefill_ms']:10.1f} {r['decode_ms_per_token']:8.3f} {r['decode_tok_s']:12.1f} "
              f"{r['pct_of_floor']:7.0f}% {vs_fp32:>8} {vs_bf16:>8} {agree:>9} {self_check:>11}")
    speed = ok.get("vb-speed")
    if speed and base and bf16:
        met = speed["speedup_vs_fp32_eager"] >= 2.57 and speed["speedup_vs_bf16"] >= 2.0
        print(f"target (vb-speed >= 2.57x fp32-eager and >= 2x bf16): {'met' if met else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
