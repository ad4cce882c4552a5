"""Peak memory and step time of each VB mode next to plain-PyTorch baselines, one run.

    python bench/modes.py --preset large --vocab 50304 --batch 8 --seq 1024

Variants (each in a fresh subprocess so allocator state never leaks between them):
  fp32-eager         the plain APT model, eager attention, fp32 (the seed's baseline)
  bf16-sdpa          hand-written: model.set_attn_implementation("sdpa") + torch.autocast(bf16)
  bf16-sdpa-ckpt     the same + torch.utils.checkpoint around every block (hand-written)
  vb-balanced / vb-memory / vb-speed / vb-full
                     the plain model and loop, with one VB line before the model is built

Every variant runs the same training step: AdamW, ``loss = model(x, labels=x).loss``.
Peak memory is ``max_memory_allocated`` over model, optimizer state and steps; step time is
the median of CUDA-event-timed steps after warm-up, on fresh random tokens each step.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from variants import run_in_subprocesses

VARIANTS = ("fp32-eager", "bf16-sdpa", "bf16-sdpa-ckpt", "vb-balanced", "vb-memory", "vb-speed", "vb-full")


def _hand_checkpoint(model: torch.nn.Module) -> None:
    """The hand-written baseline's checkpointing: wrap each block's forward."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward: checkpoint(_f, *a, use_reentrant=False)


def run_variant(args: argparse.Namespace) -> dict:
    from apt_model.modeling.apt_model import APTConfig, APTModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = APTConfig.from_preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq)
    variant = args.variant
    if variant.startswith("vb-"):
        import apt_model.optimization.vb_global as vb

        getattr(vb, {"balanced": "enable_balanced_mode", "memory": "enable_memory_mode",
                     "speed": "enable_speed_mode", "full": "enable_full_optimization"}[variant[3:]])(verbose=False)
    torch.cuda.reset_peak_memory_stats(device)
    model = APTModel(config).to(device)
    autocast = variant in ("bf16-sdpa", "bf16-sdpa-ckpt")
    if autocast:
        model.set_attn_implementation("sdpa")
    if variant == "bf16-sdpa-ckpt":
        _hand_checkpoint(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device=device).manual_seed(1)

    def step() -> float:
        x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(start.elapsed_time(end))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted({e.name[:60] for e in prof.events() if any(
        k in e.name.lower() for k in ("flash", "fmha", "attention", "softmax"))})
    return {
        "variant": variant,
        "attention_kernels": kernels,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "step_ms": statistics.median(times),
        "step_ms_spread": [min(times), max(times)],
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="large")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = run_in_subprocesses(__file__, args.only, args, ("preset", "vocab", "batch", "seq", "warmup", "steps"))
    base = next((r for r in results if r["variant"] == "fp32-eager" and "error" not in r), None)
    hand = next((r for r in results if r["variant"] == "bf16-sdpa" and "error" not in r), None)
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} preset={args.preset} vocab={args.vocab} "
          f"batch={args.batch} seq={args.seq}")
    print(f"{'variant':16} {'peak GiB':>9} {'vs fp32':>8} {'step ms':>8} {'tok/s':>9} {'vs bf16-sdpa':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:16} ERROR {r['error']}")
            continue
        saving = f"{100 * (1 - r['peak_gib'] / base['peak_gib']):.0f}%" if base else "-"
        rel = f"{hand['step_ms'] / r['step_ms']:.3f}x" if hand else "-"
        tok = args.batch * args.seq / (r["step_ms"] / 1000)
        print(f"{r['variant']:16} {r['peak_gib']:9.2f} {saving:>8} {r['step_ms']:8.1f} {tok:9.0f} {rel:>12}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
