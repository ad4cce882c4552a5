"""Run each benchmark variant in a fresh subprocess (no allocator state or compiled kernels
leak between variants) and collect the one JSON line each prints last."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable


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
