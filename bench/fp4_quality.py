"""What serving in FP4 costs in quality: validation loss of a trained APT model in fp32,
NVFP4 and MXFP4 (post-training conversion, the form ``vb.save_fp4`` ships).

    python bench/fp4_quality.py                      # tiny preset, 600 steps: ~1.5 min on 2 CPU cores
    python bench/fp4_quality.py --preset small --steps 300 --json out.json

The model is trained on the embedded pydoc corpus by the playground ``Trainer`` (plain fp32,
VB off). Each FP4 variant is a copy converted by ``vb.optimize(mode="speed")`` (FP4 weights
only) and frozen to packed weights; it is also written to a packed checkpoint and loaded back
(then optimized in the same mode, as a server would), which must give the same loss bit for
bit. Every variant is scored on the same seeded held-out windows. The project's target is a relative loss increase within 5%.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import apt_model.optimization.vb_global as vb
from apt_model import accelerator
from apt_model.fp4.layer import FP4Linear
from apt_model.modeling.apt_model import APTConfig, APTModel
from apt_model.storage import module_nbytes
from apt_model.training.data import ByteCorpus
from apt_model.training.trainer import TrainConfig, Trainer, TrainResult

FORMATS = ("nvfp4", "mxfp4")
TARGET_REL = 0.05


def train_model(preset: str = "tiny", steps: int = 600, batch_size: int = 16, seq_len: int = 128,
                lr: float = 3e-3, seed: int = 1337, device: str = "auto",
                out_dir: str | None = None) -> tuple[nn.Module, TrainConfig, TrainResult]:
    """Train a plain fp32 APT model with the playground trainer; returns it with its config."""
    vb.disable()  # the fp32 reference must be the plain model
    model_holder: list[nn.Module] = []

    def factory() -> nn.Module:
        model_holder.append(APTModel(APTConfig.from_preset(preset)))
        return model_holder[-1]

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(preset=preset, max_steps=steps, batch_size=batch_size, seq_len=seq_len,
                          lr=lr, seed=seed, device=device, out_dir=out_dir or tmp, eval_interval=0,
                          save_interval=0, sample_tokens=0, progress=False, log_interval=50)
        result = Trainer(cfg, factory).run()
    return model_holder[-1], cfg, result


def val_loss(model: nn.Module, cfg: TrainConfig, corpus: ByteCorpus, eval_batches: int) -> float:
    """Mean loss on the trainer's fixed, seeded held-out windows (the same for every variant)."""
    device = next(iter(model.state_dict().values())).device
    return Trainer(dataclasses.replace(cfg, eval_batches=eval_batches)).evaluate(model, corpus, device)


def to_fp4(model: nn.Module, fmt: str) -> nn.Module:
    """A frozen FP4 copy of ``model``: FP4 weights only, master weights dropped."""
    converted = vb.optimize(copy.deepcopy(model), mode="speed", fp4_format=fmt, verbose=False)
    vb.freeze_fp4(converted)
    return converted


def measure(model: nn.Module, cfg: TrainConfig, eval_batches: int = 32,
            formats: tuple[str, ...] = FORMATS) -> list[dict[str, Any]]:
    """One row per variant: loss, relative change against fp32, model bytes."""
    corpus = ByteCorpus.load(cfg.data)
    base = val_loss(model, cfg, corpus, eval_batches)
    rows = [{"variant": "fp32", "val_loss": base, "rel_change": 0.0, "fp4_layers": 0,
             "model_bytes": module_nbytes(model), "checkpoint_exact": None}]
    for fmt in formats:
        fp4 = to_fp4(model, fmt)
        loss = val_loss(fp4, cfg, corpus, eval_batches)
        with tempfile.TemporaryDirectory() as tmp:
            path = vb.save_fp4(fp4, Path(tmp) / f"{fmt}.safetensors")
            # served as saved: the same device and VB mode (on a GPU, speed mode computes in bf16)
            reloaded = vb.optimize(vb.load_fp4(path).to(next(iter(fp4.state_dict().values())).device),
                                   mode="speed", fp4_format=fmt, verbose=False)
            exact = val_loss(reloaded, cfg, corpus, eval_batches) == loss
        rows.append({"variant": fmt, "val_loss": loss, "rel_change": (loss - base) / base,
                     "fp4_layers": sum(isinstance(m, FP4Linear) for m in fp4.modules()),
                     "model_bytes": module_nbytes(fp4), "checkpoint_exact": exact})
    return rows


def render(rows: list[dict[str, Any]], title: str) -> str:
    lines = [title, f"{'variant':8} {'val loss':>9} {'rel change':>11} {'FP4 layers':>11} "
                    f"{'model MiB':>10} {'ckpt exact':>10} {'within 5%':>9}"]
    for r in rows:
        exact = "-" if r["checkpoint_exact"] is None else ("yes" if r["checkpoint_exact"] else "NO")
        within = "-" if r["variant"] == "fp32" else ("yes" if abs(r["rel_change"]) <= TARGET_REL else "NO")
        lines.append(f"{r['variant']:8} {r['val_loss']:9.4f} {100 * r['rel_change']:+10.2f}% "
                     f"{r['fp4_layers']:11d} {r['model_bytes'] / 2**20:10.3f} {exact:>10} {within:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, cfg, result = train_model(args.preset, args.steps, args.batch, args.seq, args.lr,
                                     args.seed, args.device)
    train_s = time.perf_counter() - started
    rows = measure(model, cfg, args.eval_batches)
    device = accelerator.resolve_device(args.device)
    title = (f"\nFP4 serving quality: preset={args.preset} steps={args.steps} batch={args.batch} "
             f"seq={args.seq} device={device} torch {torch.__version__} "
             f"(train loss {result.losses[0]:.3f} -> {result.final_loss:.3f}, {train_s:.0f} s; "
             f"eval {args.eval_batches}x{args.batch}x{args.seq} tokens)")
    print(render(rows, title))
    ok = all(abs(r["rel_change"]) <= TARGET_REL and r["checkpoint_exact"] is not False
             for r in rows if r["variant"] != "fp32")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "device": str(device), "torch": torch.__version__,
            "train_first_loss": result.losses[0], "train_final_loss": result.final_loss,
            "train_seconds": train_s, "target_rel": TARGET_REL, "within_target": ok, "results": rows,
        }, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
