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


def read_bandwidth(device: str = "cuda", nbytes: int = 4 << 30, repeats: int = 7) -> float:
    """The card's read bandwidth, measured now (bytes/s): the median time of summing an fp32
    buffer of ``nbytes`` (one read of every byte; the buffer is freed afterwards)."""
    import statistics

    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buf.sum()
    times = [cuda_timed(buf.sum)[0] for _ in range(repeats)]
    del buf
    torch.cuda.empty_cache()
    return nbytes / (statistics.median(times) / 1000)


def decode_read_bytes(model) -> int:
    """Bytes one decode step reads at least: the model's parameters and buffers (each storage
    once), less the embedding tables it only gathers a row of. An embedding whose storage
    another module also uses (a head tied to it) is read in full."""
    import torch

    from apt_model.storage import module_nbytes, storage_key

    def storages(module) -> set:
        return {storage_key(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))}

    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    others = set().union(*(storages(m) for m in model.modules()
                           if not isinstance(m, torch.nn.Embedding)))
    gathered = sum(module_nbytes(m) for m in embeddings if not storages(m) & others)
    return module_nbytes(model) - gathered


def floor_fields(model, ms_per_token: float, bandwidth: float) -> dict:
    """The weight-read floor of one decode step at ``bandwidth`` (bytes/s) and the measured
    ``ms_per_token`` as a percentage of it (100% = at the floor)."""
    read = decode_read_bytes(model)
    floor_ms = 1000 * read / bandwidth
    return {"read_bytes_per_token": read, "read_gbps": bandwidth / 1e9, "floor_ms": floor_ms,
            "pct_of_floor": 100 * ms_per_token / floor_ms}


def write_results(path: str | None, payload: dict) -> None:
    """``payload`` with the card (unless it names its ``device``) and torch version, as JSON
    at ``path`` (nothing if None)."""
    if path:
        import torch

        device = payload["device"] if "device" in payload else torch.cuda.get_device_name()
        with open(path, "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, **payload}, fh, indent=1)
