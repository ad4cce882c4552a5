"""VGPU part (c) of issue 12: training capacity and step time with device memory capped.

Capacity: the most blocks of an APT model (the ``xl`` width, ``--vocab`` tokens, batch
``--batch`` x ``--seq``) that train ``--steps`` steps with the device capped at ``--cap-gib``
(``torch.cuda.set_per_process_memory_fraction``; peak ``max_memory_allocated`` reported):

* ``plain``: fp32 eager, ``torch.optim.AdamW(fused=True)`` on the card, nothing else; doubling,
  then bisection over the block count;
* ``vb``: VB's ``--mode`` (default full: FP4 layers, bf16 autocast, fused attention and loss,
  checkpointed blocks; memory: the same without FP4) on bf16 compute weights (FP4 layers
  quantize them at each use, streamed blocks included), a VGPU stack whose Level 0 gets
  ``--level0-share`` of the cap (the rest is for activations and gradients in flight) over
  host RAM (and ``--ssd DIR``), fp32 masters and AdamW in host RAM (``vb.offload_optimizer``).
  It starts from the most blocks whose host state (``HOST_BYTES_PER_PARAM``) fits in
  ``--host-share`` of the free host RAM and tries 15% fewer after each failure. The model is built on the card before the cap is set (fast
  initialization); placement moves the streamed blocks out before the cap applies.

Step time at ``--compare-layers`` blocks (default: plain's largest, so it fits both ways),
median of ``--iters`` steps after ``--warmup``, tokens/s: ``resident`` (``--mode``, fp32
weights, fused AdamW on the card), ``offloaded`` (``--mode``, bf16 weights, masters and
AdamW on the host, every block in Level 0) and ``streamed`` (the same with Level 0 holding
the rest of the model, ``--streamed-resident`` blocks and three slots). Each trial runs in a
fresh process.

    python bench/vgpu_train.py --json vgpu_c.json        # one H200, a few minutes
    python bench/vgpu_train.py --mode memory             # VB without FP4 (BENCHMARKS.md's first run)
    python bench/vgpu_train.py --device cpu --tiny       # smoke test (no cap on the CPU), seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modes import device_name  # noqa: E402
from variants import cuda_timed, write_results  # noqa: E402

TRIALS = ("plain", "vb", "resident", "offloaded", "streamed")
HOST_BYTES_PER_PARAM = 18  # bf16 home, fp32 master, exp_avg, exp_avg_sq, bf16 transfer; the bf16 build
GIB = 1 << 30
MIB = 1 << 20


def config(args: argparse.Namespace, layers: int):
    from apt_model.modeling.apt_model import APTConfig

    if args.tiny:
        return APTConfig(vocab_size=256, d_model=64, n_layers=layers, n_heads=4, d_ff=128, max_seq_len=args.seq)
    return APTConfig.from_preset("xl", vocab_size=args.vocab, n_layers=layers, max_seq_len=args.seq)


def build(args: argparse.Namespace, layers: int, dtype: torch.dtype):
    from apt_model.modeling.apt_model import APTModel

    torch.manual_seed(0)
    with torch.device(args.device):
        return APTModel(config(args, layers)).to(dtype).train()


def set_cap(args: argparse.Namespace) -> None:
    """Cap the device at ``--cap-gib`` from now on (CUDA only), peak statistics reset."""
    if args.device != "cuda":
        return
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / torch.cuda.mem_get_info()[1]))
    torch.cuda.reset_peak_memory_stats()


def train(args: argparse.Namespace, model, optimizer, steps: int, warmup: int = 0) -> dict:
    """``steps`` steps of the user's loop after ``warmup``; median step time, tokens/s, peak."""
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size

    def step() -> float:
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    for _ in range(warmup):
        step()
    times, losses = [], []
    for _ in range(steps):
        if args.device == "cuda":
            ms, loss = cuda_timed(step)
        else:
            start = time.perf_counter()
            loss = step()
            ms = 1e3 * (time.perf_counter() - start)
        times.append(ms)
        losses.append(loss.item())
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    return {"step_ms": ms, "tokens_per_s": args.batch * args.seq / ms * 1e3, "peak_gib": peak and peak / GIB,
            "losses": losses}


def vb_model(args: argparse.Namespace, layers: int, level0_bytes: int | None):
    """VB's ``--mode`` on bf16 weights; with ``level0_bytes`` a VGPU stack (Level 0 that big,
    host RAM and ``--ssd`` below); fp32 masters and AdamW in host RAM."""
    import apt_model.optimization.vb_global as vb
    from apt_model.accelerator import host_memory_info

    model = build(args, layers, torch.bfloat16)
    levels = None
    if level0_bytes is not None:
        host = host_memory_info()[0] * args.host_share
        levels = [{"capacity_mb": level0_bytes / MIB, "device": args.device, "speed_gbps": 50},
                  {"capacity_mb": host / MIB, "device": "cpu", "speed_gbps": 50}]
        if args.ssd:
            levels.append({"capacity_mb": 1 << 30, "device": "ssd", "speed_gbps": 5, "path": args.ssd})
    vb.optimize(model, mode=args.mode, verbose=False, vgpu_config={"levels": levels} if levels else None)
    optimizer = vb.offload_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1))
    return model, optimizer


def stack_fields(model) -> dict:
    from apt_model import vgpu

    stack = vgpu.stack_of(model)
    if stack is None:
        return {}
    s = stack.stats()
    l0 = s["levels"][0]
    return {"streamed_blocks": s["streamed_blocks"], "resident_blocks": s["resident_blocks"], "slots": s["slots"],
            "hit_rate": l0["hit_rate"], "stall_ms": 1e3 * l0["stall_s"], "l0_capacity_gib": l0["capacity_bytes"] / GIB,
            "l0_peak_gib": l0["peak_bytes"] / GIB, "copy_gbps": l0["achieved_gbps"]}


def run_trial(args: argparse.Namespace) -> dict:
    """One trial: ``{"fits": False, "reason": ...}`` where the device (or the plan) is too
    small; other failures raise."""
    from apt_model.errors import VBConfigError

    cfg = config(args, args.layers)
    row = {"trial": args.trial, "layers": args.layers, "params": cfg.num_parameters()}
    cap = args.cap_gib * GIB
    try:
        if args.trial == "plain":
            set_cap(args)
            model = build(args, args.layers, torch.float32)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                          fused=args.device == "cuda")
            row.update(train(args, model, optimizer, args.steps))
        elif args.trial == "vb":
            model, optimizer = vb_model(args, args.layers, int(cap * args.level0_share))
            set_cap(args)
            row.update(train(args, model, optimizer, args.steps))
        elif args.trial == "resident":
            import apt_model.optimization.vb_global as vb

            model = build(args, args.layers, torch.float32)
            vb.optimize(model, mode=args.mode, verbose=False)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=args.device == "cuda")
            row.update(train(args, model, optimizer, args.iters, args.warmup))
        else:
            per_block, rest = block_and_rest(args)
            weights = 2 * cfg.num_parameters()
            streamed = 2 * (rest + (args.streamed_resident + 3) * per_block) * 1.01 + 64 * 1024
            model, optimizer = vb_model(args, args.layers, 2 * weights if args.trial == "offloaded" else int(streamed))
            row.update(train(args, model, optimizer, args.iters, args.warmup))
        row.update(stack_fields(model))
        if hasattr(optimizer, "stats"):  # the offloaded AdamW: host step and compute-stream wait, per step
            stats = optimizer.stats()
            row.update(host_step_ms=1e3 * stats["host_step_s"] / stats["steps"], wait_ms=1e3 * stats["wait_s"] / stats["steps"])
        row["fits"] = True
    except (torch.OutOfMemoryError, VBConfigError) as exc:
        row.update(fits=False, reason=str(exc).splitlines()[0][:300])
    return row


def block_and_rest(args: argparse.Namespace) -> tuple[int, int]:
    """Parameters of one block, and of the rest of the model (embedding, final norm)."""
    per_block = config(args, 2).num_parameters() - config(args, 1).num_parameters()
    return per_block, config(args, 1).num_parameters() - per_block


def trial(args: argparse.Namespace, name: str, layers: int) -> dict:
    """``run_trial`` in a fresh process (an error row where it failed otherwise)."""
    forwarded = ("device", "mode", "vocab", "seq", "batch", "cap_gib", "level0_share", "host_share",
                 "streamed_resident", "ssd", "steps", "iters", "warmup")
    cmd = [sys.executable, __file__, "--trial", name, f"--layers={layers}"] + ["--tiny"] * args.tiny
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in forwarded if getattr(args, k) is not None]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VB_LANG": "en"})
    if proc.returncode:
        row = {"trial": name, "layers": layers, "fits": False, "error": proc.stderr.strip().splitlines()[-3:]}
    else:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: v for k, v in row.items() if k != "losses"}, flush=True)
    return row


def largest_plain(args: argparse.Namespace, rows: list[dict]) -> dict | None:
    """Doubling, then bisection: the largest block count ``plain`` trains under the cap."""
    best, lo, hi, n = None, 0, None, 1
    while hi is None and n <= args.max_layers:
        row = trial(args, "plain", n)
        rows.append(row)
        if row["fits"]:
            best, lo, n = row, n, 2 * n
        else:
            hi = n
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        row = trial(args, "plain", mid)
        rows.append(row)
        if row["fits"]:
            best, lo = row, mid
        else:
            hi = mid
    return best


def largest_vb(args: argparse.Namespace, rows: list[dict]) -> dict | None:
    """From the most blocks whose host state fits the free host RAM, 15% fewer per failure."""
    from apt_model.accelerator import host_memory_info

    per_block, rest = block_and_rest(args)
    host = host_memory_info()[0] * args.host_share
    n = min(args.max_vb_layers, max(1, int((host / HOST_BYTES_PER_PARAM - rest) // per_block)))
    for _ in range(args.vb_tries):
        row = trial(args, "vb", n)
        rows.append(row)
        if row["fits"]:
            return row
        n = max(1, int(n * 0.85))
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and fixed sizes: a smoke test")
    p.add_argument("--mode", choices=("full", "memory"), default="full", help="VB's mode for every trial but plain")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cap-gib", type=float, default=8.0)
    p.add_argument("--level0-share", type=float, default=0.75, help="of the cap, for the stack's Level 0")
    p.add_argument("--host-share", type=float, default=0.7, help="of the free host RAM, for the VB trials")
    p.add_argument("--streamed-resident", type=int, default=0, help="blocks kept in Level 0 by 'streamed'")
    p.add_argument("--ssd", default=None, help="a directory: an SSD level below host RAM")
    p.add_argument("--steps", type=int, default=2, help="steps a capacity trial must train")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-layers", type=int, default=256)
    p.add_argument("--max-vb-layers", type=int, default=1024)
    p.add_argument("--vb-tries", type=int, default=3)
    p.add_argument("--compare-layers", type=int, default=None)
    p.add_argument("--trial", choices=TRIALS, help="run one trial in this process (what the driver calls)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.trial:
        print(json.dumps(run_trial(args)))
        return 0
    if args.tiny:
        args.vocab, args.seq, args.batch, args.cap_gib = 256, 32, 2, 0.0004
        args.max_layers, args.max_vb_layers, args.iters, args.warmup = 2, 8, 2, 1
        args.compare_layers = args.compare_layers or 6  # more blocks than 'streamed' keeps in Level 0
    rows: list[dict] = []
    plain = largest_plain(args, rows)
    vb = largest_vb(args, rows)
    layers = args.compare_layers or (plain["layers"] if plain else 1)
    compare = [trial(args, name, layers) for name in ("resident", "offloaded", "streamed")]
    summary = {
        "cap_gib": args.cap_gib, "cap_enforced": args.device == "cuda",
        "plain_params": plain and plain["params"], "vb_params": vb and vb["params"],
        "capacity_ratio": plain and vb and vb["params"] / plain["params"],
        "compare_layers": layers,
        "offloaded_vs_resident": _ratio(compare[1], compare[0]), "streamed_vs_resident": _ratio(compare[2], compare[0]),
    }
    print(summary)
    write_results(args.json, {"device": device_name(args.device), "bench": "vgpu_train", "args": vars(args),
                              "summary": summary, "capacity": rows, "step_time": compare})
    return 0


def _ratio(row: dict, base: dict) -> float | None:
    """``row``'s tokens/s over ``base``'s."""
    if not (row.get("fits") and base.get("fits")):
        return None
    return row["tokens_per_s"] / base["tokens_per_s"]


if __name__ == "__main__":
    raise SystemExit(main())
