"""Command-line launcher shared by ``training/train.py``, ``training/train_vb_apt.py`` and
``vb train``: flags → ``TrainConfig`` → the playground trainer.

Every bad input ends as a ``VBError`` (argparse's own complaints included), which
``run_cli`` prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from apt_model.errors import VBConfigError
from apt_model.i18n import tr
from apt_model.modeling.apt_model import PRESETS, APTConfig
from apt_model.training.trainer import VB_MODES, TrainConfig, train

BACKENDS = ("playground",)
TRAIN_ARGS_ENV = "APT_TRAIN_ARGS"
# Learning rates that train each preset stably with batch 16 on bytes; larger models need less.
PRESET_LR = {"tiny": 3e-3, "small": 1e-3, "medium": 6e-4, "large": 3e-4, "xl": 2e-4}


def _raise_config_error(message: str) -> NoReturn:
    raise VBConfigError(message)


def with_env_args(argv: Sequence[str] | None = None) -> list[str]:
    """``$APT_TRAIN_ARGS`` flags, then the command line's (``argv``, default ``sys.argv[1:]``),
    so the command line overrides them; lets a wrapper shorten a documented command."""
    try:
        extra = shlex.split(os.environ.get(TRAIN_ARGS_ENV, ""))
    except ValueError as exc:
        raise VBConfigError(tr(f"${TRAIN_ARGS_ENV} 无法解析: {exc}", f"${TRAIN_ARGS_ENV} cannot be parsed: {exc}")) from None
    return extra + list(sys.argv[1:] if argv is None else argv)


def add_training_arguments(parser: argparse.ArgumentParser, *, preset: str = "tiny",
                           out_prefix: str = "playground", seq_len: int = 128) -> argparse.ArgumentParser:
    """Add every training flag except the VB ones; argparse errors become one-line VB errors."""
    parser.error = _raise_config_error  # type: ignore[method-assign]
    parser.set_defaults(out_prefix=out_prefix, default_seq_len=seq_len)
    add = parser.add_argument
    add("--backend", default="playground", help=tr(f"训练后端: {', '.join(BACKENDS)}", f"training backend: {', '.join(BACKENDS)}"))
    add("--config", default=preset, help=tr(f"模型预设: {', '.join(PRESETS)}", f"model preset: {', '.join(PRESETS)}"))
    add("--epochs", type=int, default=None, help=tr("训练轮数 (默认 1)", "epochs over the training split (default 1)"))
    add("--max-steps", type=int, default=None, help=tr("最多训练步数", "stop after this many optimizer steps"))
    add("--batch-size", type=int, default=16, help=tr("批大小", "sequences per step"))
    add("--seq-len", type=int, default=None, help=tr(f"每个序列预测的 token 数 (默认 {seq_len}, 不超过预设上限)",
                                                    f"tokens predicted per sequence (default {seq_len}, capped by the preset)"))
    add("--lr", type=float, default=None, help=tr("峰值学习率 (默认随预设)", "peak learning rate (default: by preset)"))
    add("--warmup", type=int, default=20, help=tr("预热步数", "linear warm-up steps"))
    add("--data", nargs="+", default=None, help=tr("文本文件或文件夹 (默认: 内置 pydoc 语料)",
                                                  "text files or folders (default: the embedded pydoc corpus)"))
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, npu, ...")
    add("--out", default=None, help=tr(f"输出目录 (默认 runs/{out_prefix}-<预设>)", f"output folder (default runs/{out_prefix}-<preset>)"))
    add("--resume", action="store_true", help=tr("从输出目录的最新检查点继续", "continue from the latest checkpoint in --out"))
    add("--seed", type=int, default=1337, help=tr("随机种子", "random seed"))
    add("--eval-interval", type=int, default=100, help=tr("每隔多少步验证 (0: 只在结束时)", "validate every N steps (0: only at the end)"))
    add("--save-interval", type=int, default=100, help=tr("每隔多少步保存检查点 (0: 只在结束时)", "checkpoint every N steps (0: only at the end)"))
    add("--eval-batches", type=int, default=8, help=tr("每次验证的批数", "batches per validation"))
    add("--sample-tokens", type=int, default=200, help=tr("结束时生成的样本长度", "length of the sample generated at the end"))
    add("--no-progress", action="store_true", help=tr("不显示进度条", "hide the progress bar"))
    return parser


def add_vb_arguments(parser: argparse.ArgumentParser, *, enabled: bool, mode: str) -> None:
    """``--enable-vb`` / ``--vb-mode`` for launchers other than train.py (which spells them out)."""
    parser.add_argument("--enable-vb", action="store_true", default=enabled, help=tr("启用虚拟Blackwell优化", "enable Virtual Blackwell"))
    parser.add_argument("--vb-mode", default=mode, choices=list(VB_MODES), help=tr("VB优化模式", "VB optimization mode"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Check the flags that argparse cannot and build the run's configuration."""
    if args.backend not in BACKENDS:
        raise VBConfigError(tr(f"未知的训练后端 {args.backend!r}; 可用: {', '.join(BACKENDS)}",
                               f"unknown backend {args.backend!r}; available backends: {', '.join(BACKENDS)}"))
    APTConfig.from_preset(args.config)  # unknown preset: one clear error before any work
    return TrainConfig(
        preset=args.config,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len if args.seq_len is not None else min(args.default_seq_len, PRESETS[args.config]["max_seq_len"] - 1),
        lr=args.lr if args.lr is not None else PRESET_LR[args.config],
        warmup=args.warmup,
        data=list(args.data or []),
        device=args.device,
        out_dir=args.out or os.path.join("runs", f"{args.out_prefix}-{args.config}"),
        resume=args.resume,
        seed=args.seed,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        save_interval=args.save_interval,
        sample_tokens=args.sample_tokens,
        enable_vb=bool(args.enable_vb),
        vb_mode=args.vb_mode,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Train with parsed flags (VB, if asked for, is already on or is switched on here)."""
    train(config_from_args(args))
    return 0


def main(argv: Sequence[str] | None = None, *, vb_default: bool = False, preset: str = "tiny",
         out_prefix: str = "playground", seq_len: int = 128) -> int:
    """Parse ``$APT_TRAIN_ARGS`` + ``argv`` and train; VB on by default when ``vb_default``
    (mode from $VB_MODE)."""
    parser = argparse.ArgumentParser(prog="train", description=tr("训练APT模型", "train an APT model"))
    add_training_arguments(parser, preset=preset, out_prefix=out_prefix, seq_len=seq_len)
    mode = os.environ.get("VB_MODE", "balanced").lower() if vb_default else "balanced"
    if mode not in VB_MODES:
        raise VBConfigError(tr(f"$VB_MODE={mode!r} 无效; 可用: {', '.join(VB_MODES)}",
                               f"$VB_MODE={mode!r} is invalid; valid: {', '.join(VB_MODES)}"))
    add_vb_arguments(parser, enabled=vb_default, mode=mode)
    return run(parser.parse_args(with_env_args(argv)))
