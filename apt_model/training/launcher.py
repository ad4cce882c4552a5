"""Command-line launcher shared by ``training/train.py``, ``training/train_vb_apt.py`` and
``vb train``: flags → ``TrainConfig`` → the playground trainer.

Every flag defaults to "not given". VB's flags (``--enable-vb``, ``--vb-mode``, ``--device``)
reach VB's configuration as its CLI level: below explicit arguments, above the environment,
``.vbrc`` and the defaults, so ``VB_MODE=memory train.py --enable-vb`` trains in memory mode.
The training flags take the launcher's defaults on a fresh run; with ``--resume`` or
``--resume-from`` they take the values the run was started with, and a flag given again
must agree with them, except those in ``RESUME_MAY_CHANGE`` (the run's length and how it
reports).

Every bad input ends as a ``VBError`` (argparse's own complaints included), which
``run_cli`` prints as one line with exit code 2, before any work starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt_model import env
from apt_model.argparsing import ArgumentParser
from apt_model.errors import VBConfigError
from apt_model.i18n import tr
from apt_model.modeling.apt_model import PRESETS
from apt_model.optimization import vb_global
from apt_model.optimization.config import MODES
from apt_model.training.trainer import TrainConfig, load_resume_state, train

BACKENDS = ("playground",)
# Learning rates that train each preset stably with batch 16 on bytes; larger models need less.
PRESET_LR = {"tiny": 3e-3, "small": 1e-3, "medium": 6e-4, "large": 3e-4, "xl": 2e-4}
# Flags a resumed run may change: its length and how it reports (a longer run changes the
# learning-rate schedule from the resumed step on). Every other flag must agree.
RESUME_MAY_CHANGE = frozenset({"epochs", "max_steps", "eval_interval", "save_interval", "eval_batches",
                               "sample_tokens", "keep_checkpoints", "progress", "device"})
# About this invocation only: never taken from a checkpoint.
INVOCATION = frozenset({"backend", "out_dir", "resume", "resume_from", "overwrite"})


def with_env_args(argv: Sequence[str] | None = None) -> list[str]:
    """``$VB_TRAIN_ARGS`` flags, then the command line's (``argv``, default ``sys.argv[1:]``),
    so the command line overrides them; lets a wrapper shorten a documented command."""
    try:
        extra = shlex.split(env.get(env.TRAIN_ARGS) or "")
    except ValueError as exc:
        raise VBConfigError(tr(f"${env.TRAIN_ARGS} 无法解析: {exc}", f"${env.TRAIN_ARGS} cannot be parsed: {exc}")) from None
    return extra + list(sys.argv[1:] if argv is None else argv)


def build_parser(prog: str, *, preset: str, out_prefix: str, seq_len: int) -> ArgumentParser:
    """Every launcher flag, each defaulting to "not given" (absent from the parsed namespace)."""
    parser = ArgumentParser(prog=prog, description=tr("训练APT模型", "train an APT model"),
                            argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--backend", choices=BACKENDS, help=tr("训练后端", "training backend"))
    add("--config", dest="preset", choices=list(PRESETS), help=tr(f"模型预设 (默认 {preset})", f"model preset (default {preset})"))
    add("--epochs", type=int, help=tr("训练轮数 (默认 1)", "epochs over the training split (default 1)"))
    add("--max-steps", type=int, help=tr("最多训练步数", "stop after this many optimizer steps"))
    add("--batch-size", type=int, help=tr(f"批大小 (默认 {TrainConfig.batch_size})", f"sequences per step (default {TrainConfig.batch_size})"))
    add("--seq-len", type=int, help=tr(f"每个序列预测的 token 数 (默认 {seq_len}, 不超过预设上限)",
                                       f"tokens predicted per sequence (default {seq_len}, capped by the preset)"))
    add("--lr", type=float, help=tr("峰值学习率 (默认随预设)", "peak learning rate (default: by preset)"))
    add("--warmup", type=int, help=tr(f"预热步数 (默认 {TrainConfig.warmup})", f"linear warm-up steps (default {TrainConfig.warmup})"))
    add("--data", nargs="+", help=tr("文本文件或文件夹 (默认: 内置 pydoc 语料)", "text files or folders (default: the embedded pydoc corpus)"))
    add("--device", help=tr("auto, cpu, cuda, cuda:1, npu, ... (默认: VB_DEVICE / .vbrc, 否则 auto)",
                            "auto, cpu, cuda, cuda:1, npu, ... (default: VB_DEVICE / .vbrc, else auto)"))
    add("--out", dest="out_dir", help=tr(f"输出目录 (默认 runs/{out_prefix}-<预设>)", f"output folder (default runs/{out_prefix}-<preset>)"))
    add("--resume", action="store_true", help=tr("从输出目录中最新的完好检查点继续", "continue from the newest intact checkpoint in --out"))
    add("--resume-from", metavar="PATH", help=tr("从指定的检查点文件夹继续", "continue from this checkpoint folder"))
    add("--overwrite", action="store_true", help=tr("输出目录已有检查点时重新开始 (旧检查点移到 checkpoints.prev)",
                                                    "start over where --out holds checkpoints (they move to checkpoints.prev)"))
    add("--keep-checkpoints", type=int, help=tr(f"保留最新的几个检查点 (默认 {TrainConfig.keep_checkpoints})",
                                                f"how many of the newest checkpoints to keep (default {TrainConfig.keep_checkpoints})"))
    add("--seed", type=int, help=tr(f"随机种子 (默认 {TrainConfig.seed})", f"random seed (default {TrainConfig.seed})"))
    add("--eval-interval", type=int, help=tr("每隔多少步验证 (0: 只在结束时)", "validate every N steps (0: only at the end)"))
    add("--save-interval", type=int, help=tr("每隔多少步保存检查点 (0: 只在结束时)", "checkpoint every N steps (0: only at the end)"))
    add("--eval-batches", type=int, help=tr("每次验证的批数", "batches per validation"))
    add("--sample-tokens", type=int, help=tr("结束时生成的样本长度", "length of the sample generated at the end"))
    add("--no-progress", dest="progress", action="store_false", help=tr("不显示进度条", "hide the progress bar"))
    add("--enable-vb", action="store_true", help=tr("启用虚拟Blackwell优化", "enable Virtual Blackwell"))
    add("--vb-mode", choices=list(MODES), help=tr("VB优化模式 (默认: VB_MODE / .vbrc, 否则 balanced)",
                                                 "VB optimization mode (default: VB_MODE / .vbrc, else balanced)"))
    return parser


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}


def fresh_settings(given: dict[str, Any], *, preset: str, out_prefix: str, seq_len: int,
                   vb_default: bool) -> dict[str, Any]:
    """A new run's settings: the given flags over the launcher's (preset-dependent) defaults."""
    name = given.get("preset", preset)
    defaults: dict[str, Any] = {
        "preset": name,
        "seq_len": min(seq_len, PRESETS[name]["max_seq_len"] - 1),
        "lr": PRESET_LR[name],
        "out_dir": os.path.join("runs", f"{out_prefix}-{name}"),
    }
    if vb_default:
        defaults["enable_vb"] = True
    return {**defaults, **given}


def resumed_settings(given: dict[str, Any], saved: dict[str, Any], names: dict[str, str],
                     checkpoint: str) -> dict[str, Any]:
    """A resumed run's settings: the saved ones, with the flags given again checked against them."""
    conflicts = [f"{names[key]} {value!r} ({tr('检查点', 'checkpoint')}: {saved.get(key)!r})"
                 for key, value in given.items()
                 if key not in RESUME_MAY_CHANGE | INVOCATION and saved.get(key) != value]
    if conflicts:
        raise VBConfigError(tr(
            f"参数与要继续的训练 {checkpoint} 不一致: {'; '.join(conflicts)}; 去掉这些参数, 或用 --out 开始新的训练",
            f"flags differ from the run being resumed ({checkpoint}): {'; '.join(conflicts)}; drop them, "
            "or start a new run with --out"))
    restored = {key: value for key, value in saved.items() if key not in INVOCATION}
    out_dir = str(Path(checkpoint).parent.parent)  # where the run's checkpoints are now
    return {**restored, "out_dir": out_dir, **given}


def _train_config(settings: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})


def check_fits(cfg: TrainConfig, memory: int | None = None) -> None:
    """Stop a run whose training step cannot fit before anything is allocated: one
    ``VBConfigError`` naming the largest batch that fits (``apt_model.estimator.fit``).

    The step is the estimator's trace of ``cfg``'s preset at its batch and window, against
    ``memory`` bytes (default: what is free on the run's device now; on the CPU the available
    RAM), in the mode VB will use (off when VB is off). With ``auto_estimate`` picking, the
    pick is made here (``vb.auto_pick``: a mode, or a VGPU plan) and the model built later
    takes it without tracing again; when nothing fits, the check is of the most aggressive
    mode, the one the pick falls back to. With VGPU levels below Level 0 the step is traced
    placed over them, AdamW offloaded as VB's trainer offloads it (``vb.offloads_training``).
    Costs the traces of one pick, or one traced step; a few more when the run does not fit.
    """
    from apt_model.accelerator import resolve_device
    from apt_model.estimator import Traced
    from apt_model.estimator.fit import fits, free_memory, largest_batch, room
    from apt_model.modeling.apt_model import APTConfig
    from apt_model.optimization.config import MOST_AGGRESSIVE, auto_picks_mode
    from apt_model.storage import human_bytes

    resolved = vb_global.configure(cfg.vb_cli_options(), announce=False)
    seq = cfg.seq_len + 1  # the model sees seq_len + 1 tokens
    vb_global.set_workload(batch=cfg.batch_size, seq=seq, memory=memory)
    target = APTConfig.from_preset(cfg.preset)
    picks = vb_global.is_enabled() and auto_picks_mode(resolved)
    if picks and vb_global.auto_pick(target, training=True):
        return
    config = vb_global.active_config() or resolved.config
    mode = "off" if not vb_global.is_enabled() else MOST_AGGRESSIVE if picks else config.mode
    device = resolve_device(config.device)
    free = memory or free_memory(device)
    levels = config.vgpu_config if vb_global.offloads_training(vb_global.active_config()) else None
    traced = Traced(target, mode=mode, training=True, device=str(device), base=config, levels=levels)

    def step(batch: int):
        return traced.step(batch=batch, seq=seq)

    planned = step(cfg.batch_size)
    if fits(planned, free):
        return
    need = planned.peak_bytes
    best = largest_batch(step, free, cfg.batch_size, need)
    hint = (tr(f"能放下的最大批是 --batch-size {best}", f"the largest batch that fits is --batch-size {best}") if best
            else tr("batch 1 也放不下: 请换更小的 --config 或 --seq-len", "not even batch 1 fits: use a smaller --config "
                    "or --seq-len"))
    raise VBConfigError(tr(
        f"--batch-size {cfg.batch_size} × --seq-len {cfg.seq_len} 在 {device} 上放不下: 模式 {mode} 的一步训练需要 "
        f"{human_bytes(need)}, {room(free)}; {hint}",
        f"--batch-size {cfg.batch_size} × --seq-len {cfg.seq_len} does not fit on {device}: a training step in mode "
        f"{mode} needs {human_bytes(need)}, {room(free)}; {hint}"))


def main(argv: Sequence[str] | None = None, *, prog: str = "train", vb_default: bool = False,
         preset: str = "tiny", out_prefix: str = "playground", seq_len: int = 128) -> int:
    """Parse ``$VB_TRAIN_ARGS`` + ``argv`` and train; VB on by default when ``vb_default``."""
    parser = build_parser(prog, preset=preset, out_prefix=out_prefix, seq_len=seq_len)
    given = vars(parser.parse_args(with_env_args(argv)))
    settings = fresh_settings(given, preset=preset, out_prefix=out_prefix, seq_len=seq_len, vb_default=vb_default)
    first = _train_config(settings)
    first.validate()
    vb_global.configure(first.vb_cli_options(), announce=False)  # bad VB settings stop here
    state = None
    if first.resume or first.resume_from:
        state = load_resume_state(Path(first.out_dir).expanduser() / "checkpoints", first.resume_from)
        settings = resumed_settings(given, state["train_config"], _flag_names(parser), state["path"])
    run = _train_config(settings)
    check_fits(run)
    train(run, resume_state=state)
    return 0
