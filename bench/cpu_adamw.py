"""The host AdamW step of offloaded optimizer state: torch's CPU implementations against each
other (and DeepSpeed's CPUAdam where it imports), on the same fp32 tensors.

    python bench/cpu_adamw.py --params 16 --tensors 32 --steps 10 --threads 2

Each variant steps ``--tensors`` fp32 tensors of ``--params`` M elements in all (master,
gradient, exp_avg, exp_avg_sq on the host, as ``apt_model.vgpu.offload`` holds them) with
AdamW (lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1):

  single   ``torch.optim.AdamW`` default on CPU tensors (a loop over tensors)
  foreach  ``torch.optim.AdamW(foreach=True)`` (``torch._foreach_*`` ops)
  fused    ``torch.optim.AdamW(fused=True)`` (one vectorized kernel per tensor)
  deepspeed  ``deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True)``, when it imports

Time: wall time per step, median of ``--steps`` after two warm-up steps, with the parameter
rate (M params/s). Numerics: every variant's parameters after the timed steps against the
single-tensor loop's (max abs difference; 0 means bit for bit).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from variants import write_results

HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _tensors(total: int, count: int) -> list[torch.Tensor]:
    size = total // count
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=generator) for _ in range(count)]


def _deepspeed() -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None:
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return None
    return lambda params: DeepSpeedCPUAdam(params, adamw_mode=True, **HYPER)


def run(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], start: list[torch.Tensor],
        grads: list[list[torch.Tensor]], steps: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds per step over ``steps`` timed steps (after two), and the final params."""
    params = [torch.nn.Parameter(t.clone()) for t in start]
    optimizer = make(params)
    times = []
    for i in range(steps + 2):
        for p, g in zip(params, grads[i % len(grads)], strict=True):
            p.grad = g
        tick = time.perf_counter()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - tick)
    return statistics.median(times), [p.detach() for p in params]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=16, help="M elements in all")
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total = int(args.params * 1e6)
    start = _tensors(total, args.tensors)
    grads = [_tensors(total, args.tensors) for _ in range(3)]
    variants: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "single": lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPER),
        "foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER),
        "fused": lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER),
    }
    deepspeed = _deepspeed()
    if deepspeed is not None:
        variants["deepspeed"] = deepspeed
    rows = {}
    reference = None
    for name, make in variants.items():
        seconds, final = run(make, start, grads, args.steps)
        reference = reference or final
        diff = max(float((a - b).abs().max()) for a, b in zip(final, reference, strict=True))
        rows[name] = {"ms_per_step": 1e3 * seconds, "mparams_per_s": total / seconds / 1e6, "max_abs_diff": diff}
        print(f"{name:10s} {1e3 * seconds:9.2f} ms/step  {total / seconds / 1e6:8.1f} Mparam/s  "
              f"max |Δ| vs single {diff:.3g}")
    if deepspeed is None:
        print("deepspeed: not installed (DeepSpeedCPUAdam not measured)")
    write_results(args.json, {"device": "cpu", "threads": torch.get_num_threads(), "params": total,
                              "tensors": args.tensors, "rows": rows, "deepspeed": deepspeed is not None})


if __name__ == "__main__":
    main()
