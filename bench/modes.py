"""Peak memory and step time of each VB mode next to plain-PyTorch baselines, one run.

    python bench/modes.py --preset large --vocab 50304 --batch 8 --seq 1024
    python bench/modes.py --device cpu --threads 2 --preset small --vocab 256 --batch 2 --seq 128 --warmup 1 --steps 3

Variants (each in a fresh subprocess so allocator state never leaks between them):
  fp32-eager         the plain APT model, eager attention, fp32 (the seed's baseline)
  bf16-sdpa          hand-written: model.set_attn_implementation("sdpa") + torch.autocast(bf16)
  bf16-sdpa-ckpt     the same + torch.utils.checkpoint around every block (hand-written)
  vb-balanced / vb-memory / vb-speed / vb-full
                     the plain model and loop, with one VB line before the model is built, and
                     where the mode offloads the optimizer (full, on a GPU) the one documented
                     line ``opt = vb.offload_optimizer(model, opt)``: fp32 masters and AdamW
                     state in host RAM, stepped there

Every variant runs the same training step: AdamW, ``loss = model(x, labels=x).loss``, on
fresh random tokens each step; step time is the median of the steps after warm-up.
- CUDA: peak memory is ``max_memory_allocated`` over model, optimizer state and steps; steps
  are timed with CUDA events.
- CPU (``--device cpu``): the CPU has no allocator counter, so peak memory is the peak
  resident set size of the variant's own process (``getrusage(RUSAGE_SELF).ru_maxrss`` after
  the last step) minus its resident set size just before the model is built (read from
  ``/proc/self/statm``, Linux): what model, optimizer state and steps added to the process at
  their peak. ``--threads`` sets torch's threads. Steps are timed with ``time.perf_counter``
  (median and minimum) and with ``time.process_time`` (CPU time of all the process's
  threads), and the load average is recorded. The variants run with
  ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: OpenMP threads that spin at barriers make a
  step 10-30x slower as soon as another process takes a core, and count the spinning as CPU
  time; passive threads sleep, so CPU time stays the work done on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
from variants import add_variant_arguments, run_in_subprocesses

VARIANTS = ("fp32-eager", "bf16-sdpa", "bf16-sdpa-ckpt", "vb-balanced", "vb-memory", "vb-speed", "vb-full")


def _hand_checkpoint(model: torch.nn.Module) -> None:
    """The hand-written baseline's checkpointing: wrap each block's forward."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward: checkpoint(_f, *a, use_reentrant=False)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def run_variant(args: argparse.Namespace) -> dict:
    from apt_model.modeling.apt_model import APTConfig, APTModel

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = APTConfig.from_preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq)
    variant = args.variant
    if variant.startswith("vb-"):
        import apt_model.optimization.vb_global as vb

        vb.enable(mode=variant[3:], verbose=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before, peak_rss_before = rss_bytes(), peak_rss_bytes()
    model = APTModel(config).to(device)
    autocast = variant in ("bf16-sdpa", "bf16-sdpa-ckpt")
    if autocast:
        model.set_attn_implementation("sdpa")
    if variant == "bf16-sdpa-ckpt":
        _hand_checkpoint(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if variant.startswith("vb-") and vb.offloads_training(vb.active_config()):
        opt = vb.offload_optimizer(model, opt)
    gen = torch.Generator(device=device).manual_seed(1)

    def step() -> float:
        x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def timed_step() -> tuple[float, float, float]:
        """(loss, milliseconds, CPU milliseconds of this process: all its threads, CPU only)"""
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            return float(loss), start.elapsed_time(end), float("nan")
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = float(step())
        return loss, (time.perf_counter() - start) * 1000, (time.process_time() - cpu_start) * 1000

    times, cpu_times, losses = [], [], []
    load_before = os.getloadavg()[0]
    for i in range(args.warmup + args.steps):
        loss, ms, cpu_ms = timed_step()
        losses.append(loss)
        if i >= args.warmup:
            times.append(ms)
            cpu_times.append(cpu_ms)
    if cuda:
        memory = {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    else:
        peak = peak_rss_bytes()
        memory = {"peak_gib": (peak - rss_before) / 2**30, "rss_before_model_gib": rss_before / 2**30,
                  "peak_rss_gib": peak / 2**30, "peak_rss_before_model_gib": peak_rss_before / 2**30,
                  "threads": torch.get_num_threads(), "step_cpu_ms": statistics.median(cpu_times),
                  "loadavg_1min": [load_before, os.getloadavg()[0]]}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    kernels = sorted({e.name[:60] for e in prof.events() if any(
        k in e.name.lower() for k in ("flash", "fmha", "attention", "softmax"))})
    return {
        "variant": variant,
        "attention_kernels": kernels,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        **memory,
        "step_ms": statistics.median(times),
        "step_ms_spread": [min(times), max(times)],
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on the CPU")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    add_variant_arguments(parser, VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.device == "cpu":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = run_in_subprocesses(__file__, args.only, args,
                                  ("device", "threads", "preset", "vocab", "batch", "seq", "warmup", "steps"))
    base = next((r for r in results if r["variant"] == "fp32-eager" and "error" not in r), None)
    hand = next((r for r in results if r["variant"] == "bf16-sdpa" and "error" not in r), None)
    memory = "peak GiB" if args.device == "cuda" else "peak RSS+"
    print(f"\n{device_name(args.device)} torch {torch.__version__} preset={args.preset} vocab={args.vocab} "
          f"batch={args.batch} seq={args.seq}" + (f" threads={args.threads}" if args.device == "cpu" else ""))
    print(f"{'variant':16} {memory:>10} {'vs fp32':>8} {'step ms':>8} {'min ms':>8} {'CPU ms':>8} {'tok/s':>9} "
          f"{'vs bf16-sdpa':>12} {'vs fp32':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:16} ERROR {r['error']}")
            continue
        saving = f"{100 * (r['peak_gib'] / base['peak_gib'] - 1):+.0f}%" if base else "-"
        rel = f"{hand['step_ms'] / r['step_ms']:.3f}x" if hand else "-"
        rel_fp32 = f"{base['step_ms'] / r['step_ms']:.3f}x" if base else "-"
        tok = args.batch * args.seq / (r["step_ms"] / 1000)
        cpu_ms = f"{r['step_cpu_ms']:8.1f}" if "step_cpu_ms" in r else f"{'-':>8}"
        print(f"{r['variant']:16} {r['peak_gib']:10.3f} {saving:>8} {r['step_ms']:8.1f} {r['step_ms_spread'][0]:8.1f} "
              f"{cpu_ms} {tok:9.0f} {rel:>12} {rel_fp32:>8}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_name(args.device), "torch": torch.__version__, "args": vars(args),
                       "date": time.strftime("%Y-%m-%d"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "memory": "max_memory_allocated" if args.device == "cuda" else
                       "peak RSS (ru_maxrss) minus RSS before the model was built, per fresh process",
                       "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
