"""What the benchmarks share: each variant run in a fresh subprocess (no allocator state or
compiled kernels leak between variants, the one JSON line each prints last collected), CUDA
event timing, and the results file."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any


def add_variant_arguments(parser: argparse.ArgumentParser, variants: tuple[str, ...]) -> None:
    """``--variant`` (run one, in this process: what ``run_in_subprocesses`` calls),
    ``--only`` (which to run) and ``--json`` (where ``write_results`` puts them)."""
    parser.add_argument("--variant", choices=variants)
    parser.add_argument("--only", nargs="*", choices=variants, default=list(variants))
    parser.add_argument("--json", default=None)


def run_in_subprocesses(script: str, variants: Iterable[str], args: argparse.Namespace,
                        forwarded: Iterable[str]) -> list[dict]:
    """``python script --variant V --k=v ...`` for each variant; failures become error rows."""
    results = []
    for variant in variants:
        cmd = [sys.executable, script, "--variant", variant] + [f"--{k}={getattr(args, k)}" for k in forwarded]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VB_LANG": "en"})
        if proc.returncode != 0:
            results.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-3:]})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print({k: v for k, v in results[-1].items() if k != "tokens"}, flush=True)
    return results


def cuda_timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds by CUDA events, result) of ``call()``, the device idle before and after."""
    import torch

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), out


def write_results(path: str | None, payload: dict) -> None:
    """``payload`` with the card (unless it names its ``device``) and torch version, as JSON
    at ``path`` (nothing if None)."""
    if path:
        import torch

        device = payload["device"] if "device" in payload else torch.cuda.get_device_name()
        with open(path, "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, **payload}, fh, indent=1)
