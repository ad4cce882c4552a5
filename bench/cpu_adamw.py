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

Then the host step of a bf16 model's offloaded optimizer, per tensor in one worker thread as
``apt_model.vgpu.offload`` runs it: fp32 masters and moments, a bf16 gradient, the new weight
narrowed back to bf16 (``--bf16`` rows, same tensors):

  fp32-grad     the fused kernel on an fp32 gradient, no casts (the floor)
  widen-each    ``grad.to(float32)`` per tensor (a fresh buffer each time), fused, narrow
  widen-kept    widened into one kept fp32 buffer (what the offloaded optimizer does), fused, narrow
  widen-sliced  4 M-element slices through a 16 MiB buffer, each narrowed at once
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from variants import write_results

HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
SLICE = 1 << 22


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


def bf16_host_steps(start: list[torch.Tensor], steps: int) -> dict[str, dict]:
    """Seconds per step of each bf16-gradient variant (module doc), median of ``steps``."""
    from torch.optim.adam import adam

    lr, (beta1, beta2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    kw = dict(amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps, maximize=False,
              decoupled_weight_decay=True, fused=True)
    grads16 = [(0.01 * t).bfloat16() for t in start]
    grads32 = [g.float() for g in grads16]
    outs = [torch.empty_like(g) for g in grads16]
    kept = torch.empty(max(t.numel() for t in start))
    sliced = torch.empty(SLICE)

    def one(name: str, master: torch.Tensor, m: torch.Tensor, v: torch.Tensor, i: int) -> None:
        step = torch.tensor(1.0)
        if name == "widen-sliced":
            for a in range(0, master.numel(), SLICE):
                b = min(a + SLICE, master.numel())
                wide = sliced[: b - a]
                wide.copy_(grads16[i][a:b])
                adam([master[a:b]], [wide], [m[a:b]], [v[a:b]], [], [step.clone()], **kw)
                outs[i][a:b].copy_(master[a:b])
            return
        if name == "fp32-grad":
            grad = grads32[i]
        elif name == "widen-each":
            grad = grads16[i].to(torch.float32)
        else:
            grad = kept[: master.numel()]
            grad.copy_(grads16[i])
        adam([master], [grad], [m], [v], [], [step], **kw)
        if name != "fp32-grad":
            outs[i].copy_(master)

    rows = {}
    total = sum(t.numel() for t in start)
    with ThreadPoolExecutor(1) as worker:
        for name in ("fp32-grad", "widen-each", "widen-kept", "widen-sliced"):
            masters = [t.clone() for t in start]
            moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in start]
            times = []
            for k in range(steps + 2):
                tick = time.perf_counter()
                list(worker.map(one, [name] * len(start), masters, *zip(*moments, strict=True), range(len(start))))
                if k >= 2:
                    times.append(time.perf_counter() - tick)
            seconds = statistics.median(times)
            rows[name] = {"ms_per_step": 1e3 * seconds, "mparams_per_s": total / seconds / 1e6}
            print(f"bf16 {name:13s} {1e3 * seconds:9.2f} ms/step  {total / seconds / 1e6:8.1f} Mparam/s")
    return rows


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
    bf16 = bf16_host_steps(start, args.steps)
    write_results(args.json, {"device": "cpu", "threads": torch.get_num_threads(), "params": total,
                              "tensors": args.tensors, "rows": rows, "bf16_rows": bf16,
                              "deepspeed": deepspeed is not None})


if __name__ == "__main__":
    main()
