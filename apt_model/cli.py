"""The ``vb`` command: ``vb info`` (device, capabilities, memory, effective configuration),
``vb train`` (the training launcher), ``vb generate`` (text from a trained APT checkpoint),
``vb plot`` (a training log's loss curve) and ``vb estimate`` (one step's peak memory per mode)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apt_model import accelerator
from apt_model.argparsing import ArgumentParser
from apt_model.errors import VBConfigError, VBDataError, first_line, run_cli
from apt_model.i18n import tr
from apt_model.optimization import vb_global
from apt_model.storage import free_bytes, human_bytes, parse_size

if TYPE_CHECKING:
    from apt_model.estimator import Estimate
    from apt_model.modeling.apt_model import APTModel


def _yes(flag: bool) -> str:
    return tr("是", "yes") if flag else tr("否", "no")


def info(device_name: str | None, preset: str | None = None, hf_config: str | None = None) -> str:
    """The text of ``vb info``; for a model named by ``preset`` or ``hf_config``, also the
    VGPU plan of the configured ``vgpu_config`` for it (what each level holds, what streams:
    the estimator's placement of a training step in the configured mode)."""
    effective = vb_global.explain_config()
    device = accelerator.resolve_device(device_name or effective["device"][0])
    desc = accelerator.describe(device)
    lines = [
        tr("虚拟Blackwell 设备信息", "Virtual Blackwell device info"),
        f"  torch {torch.__version__}",
        tr(f"  加速器: {device} ({desc.name})", f"  accelerator: {device} ({desc.name})"),
        tr(f"  bf16: {_yes(desc.bf16)}  Flash SDPA: {_yes(desc.flash_sdpa)}  Triton: {_yes(desc.triton)}"
           f"  锁页内存: {_yes(desc.pinned_memory)}",
           f"  bf16: {_yes(desc.bf16)}  flash SDPA: {_yes(desc.flash_sdpa)}  Triton: {_yes(desc.triton)}"
           f"  pinned memory: {_yes(desc.pinned_memory)}"),
        tr("  各级可用内存:", "  free memory per level:"),
    ]
    dev_mem = desc.memory.get("device")
    if dev_mem is not None:
        lines.append(f"    L0 {device}: {human_bytes(dev_mem[0])} / {human_bytes(dev_mem[1])}")
    host_free, host_total = desc.memory["host"]
    lines.append(f"    {'L1' if dev_mem else 'L0'} cpu: {human_bytes(host_free)} / {human_bytes(host_total)}")
    vgpu = effective["vgpu_config"][0]
    ssd_paths = [lv.get("path") or "." for lv in (vgpu or {}).get("levels", []) if lv["device"] == "ssd"] or ["."]
    for path in ssd_paths:
        lines.append(f"    ssd {path}: {human_bytes(free_bytes(path))} {tr('可用', 'free')}")
    lines.append(tr("  生效配置 (值 ← 来源):", "  effective configuration (value ← source):"))
    for key, (value, source) in effective.items():
        lines.append(f"    {key} = {value!r}  ← {source}")
    if preset is not None or hf_config is not None:
        lines.append(_plan_text(preset, hf_config, vgpu))
    return "\n".join(lines)


def _plan_text(preset: str | None, hf_config: str | None, vgpu: Any) -> str:
    """The configured VGPU plan for one model (``vb info --preset/--hf-config``)."""
    from apt_model.estimator import estimate as run_estimate

    if preset is not None and hf_config is not None:
        raise VBConfigError(tr("请只给出 --preset 或 --hf-config 之一", "give only one of --preset or --hf-config"))
    if vgpu is None:
        return tr("  VGPU 计划: 未配置 vgpu_config (整个模型在设备上)",
                  "  VGPU plan: no vgpu_config configured (the whole model on the device)")
    target = preset if preset is not None else Path(hf_config)
    est = run_estimate(target, mode=vb_global.explain_config()["mode"][0], levels=vgpu)
    return tr("  VGPU 计划 (训练一步, batch 1):\n", "  VGPU plan (a training step, batch 1):\n") + est.table()


APT_CLASSES = ("APTModel", "APTLargeModel")
DEFAULT_PROMPT = "The "


def resolve_checkpoint(path: str | Path) -> Path:
    """A run's output folder, a checkpoint root or one ``ckpt-XXXXXXXX`` folder → the
    checkpoint folder to read (the root's latest). Raises ``VBDataError`` when there is none."""
    from apt_model.training.checkpoint import META_FILE, latest_checkpoint

    given = Path(path).expanduser()
    if not given.exists():
        raise VBDataError(tr(f"检查点路径不存在: {given}", f"checkpoint path does not exist: {given}"))
    if (given / META_FILE).is_file():
        return given
    root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    folder = latest_checkpoint(root)
    if folder is None:
        raise VBDataError(tr(
            f"{given} 中没有检查点 (应为训练输出目录、其 checkpoints/ 目录或某个 ckpt-XXXXXXXX 目录)",
            f"no checkpoint in {given} (give a run's output folder, its checkpoints/ folder or a "
            "ckpt-XXXXXXXX folder)"))
    return folder


def load_apt_model(path: str | Path, device: torch.device) -> APTModel:
    """The APT model saved in the checkpoint at ``path`` (see ``resolve_checkpoint``), with
    its weights, in eval mode on ``device``. Raises ``VBConfigError`` for a checkpoint of
    another model class or whose weights do not fit its recorded configuration."""
    from apt_model.modeling.apt_model import APTConfig, APTLargeModel, APTModel
    from apt_model.training.checkpoint import load_checkpoint

    state = load_checkpoint(resolve_checkpoint(path))
    model_class = state.get("model_class")
    if model_class not in APT_CLASSES or not isinstance(state.get("model_config"), dict):
        raise VBConfigError(tr(
            f"vb generate 只支持 APT 模型的检查点 ({', '.join(APT_CLASSES)}); {state['path']} 中是 {model_class}",
            f"vb generate supports only APT checkpoints ({', '.join(APT_CLASSES)}); {state['path']} holds "
            f"{model_class}"))
    try:
        config = APTConfig(**state["model_config"])
        model = (APTLargeModel if model_class == "APTLargeModel" else APTModel)(config)
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError) as exc:
        raise VBConfigError(tr(f"检查点 {state['path']} 的权重与其模型配置不符: {first_line(exc)}",
                               f"checkpoint {state['path']} does not match its model configuration: "
                               f"{first_line(exc)}")) from None
    return model.to(device).eval()


def generate(args: argparse.Namespace) -> str:
    """The text of ``vb generate``: the prompt and the model's continuation."""
    from apt_model.training.data import decode, encode

    if args.max_new_tokens < 0:
        raise VBConfigError(tr(f"--max-new-tokens 不能为负, 得到 {args.max_new_tokens}",
                               f"--max-new-tokens must not be negative, got {args.max_new_tokens}"))
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise VBConfigError(tr(f"--temperature 必须为正数, 得到 {args.temperature} (不采样请用 --greedy)",
                               f"--temperature must be positive, got {args.temperature} (--greedy does not sample)"))
    if args.top_k < 0:
        raise VBConfigError(tr(f"--top-k 不能为负, 得到 {args.top_k}", f"--top-k must not be negative, got {args.top_k}"))
    if not args.prompt:
        raise VBConfigError(tr("--prompt 不能为空", "--prompt must not be empty"))
    prompt = encode(args.prompt).long()
    device = accelerator.resolve_device(args.device)
    model = load_apt_model(args.checkpoint, device)
    limit = model.config.max_seq_len
    if prompt.numel() + args.max_new_tokens > limit:
        raise VBConfigError(tr(
            f"提示 ({prompt.numel()} 字节) + --max-new-tokens {args.max_new_tokens} 超过模型的上下文 {limit}; "
            f"最多 {max(0, limit - prompt.numel())} 个新 token",
            f"the prompt ({prompt.numel()} bytes) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"context of {limit}; at most {max(0, limit - prompt.numel())} new tokens fit"))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = model.generate(prompt[None].to(device), max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k or None,
                            do_sample=not args.greedy, generator=generator)
    return decode(tokens[0].cpu())


def plot(log: str, out: str | None) -> Path:
    """Draw the loss curve of ``log`` (a ``train_log.jsonl`` or the run folder holding it)."""
    from apt_model.figures import missing_matplotlib_message
    from apt_model.training.run_log import LOG_NAME, plot_log

    log_path = Path(log).expanduser()
    if log_path.is_dir():
        log_path = log_path / LOG_NAME
    png = plot_log(log_path, out)
    if png is None:
        raise VBConfigError(missing_matplotlib_message())
    return png


def _memory_budget(text: str | None) -> int | None:
    """The device memory ``vb estimate`` checks against (``--memory``), or None (no check)."""
    if text is None:
        return None
    size = parse_size(text)
    if size is None or size <= 0:
        raise VBConfigError(tr(f"--memory 应为正的大小 (如 24GiB, 8000MB), 得到 {text!r}",
                               f"--memory must be a positive size (such as 24GiB or 8000MB), got {text!r}"))
    return size


def _levels(text: str | None) -> tuple[Any, str] | None:
    """The VGPU levels ``vb estimate`` places the model over, and where they come from:
    ``--levels`` (JSON, or the path of a JSON file: the list of levels or ``vgpu_config``),
    else the configured ``vgpu_config``, else None."""
    if text is None:
        configured = vb_global.explain_config()["vgpu_config"]
        return None if configured[0] is None else configured
    path = Path(text).expanduser()
    try:
        return json.loads(path.read_text() if path.is_file() else text), "--levels"
    except (OSError, ValueError) as exc:
        raise VBConfigError(tr(f"--levels 应为 JSON 或 JSON 文件的路径: {first_line(exc)}",
                               f"--levels must be JSON or the path of a JSON file: {first_line(exc)}")) from None


def estimate(args: argparse.Namespace) -> tuple[str, list[Estimate]]:
    """The text of ``vb estimate`` and the largest step of each mode: one table per mode (with
    ``--decode``: weights, KV cache and peak by context length, up to ``--seq`` or the model's
    context). With VGPU levels (``_levels``) each table says what the stack puts on each level
    and the device's peak with it; a mode whose weights the levels cannot hold says why, and
    when no mode can be placed, that is one error. Against ``--memory`` each table says
    whether the device's peak fits; when no mode asked for fits, one error naming the smallest
    configuration that does (``fit.smallest_fit``), if any."""
    from apt_model.estimator import ESTIMATE_MODES, decode_sweep, decode_table
    from apt_model.estimator import estimate as run_estimate
    from apt_model.estimator.fit import fits, smallest_fit, usable
    from apt_model.estimator.levels import PlacementError

    if (args.preset is None) == (args.hf_config is None):
        raise VBConfigError(tr("请给出 --preset 或 --hf-config 之一", "give one of --preset or --hf-config"))
    if args.mode not in (*ESTIMATE_MODES, "all"):
        raise VBConfigError(tr(f"未知模式 {args.mode!r}, 可用: {', '.join(ESTIMATE_MODES)}, all",
                               f"unknown mode {args.mode!r}; valid: {', '.join(ESTIMATE_MODES)}, all"))
    free = _memory_budget(args.memory)
    levels, levels_from = _levels(args.levels) or (None, "")
    device = args.device or (None if levels is not None else "cpu")  # None: Level 0's
    target = args.preset if args.preset is not None else Path(args.hf_config)
    modes = ESTIMATE_MODES if args.mode == "all" else (args.mode,)
    tables: list[str] = []
    peaks: list[Estimate] = []  # the largest step of each table
    for mode in modes:
        try:
            if args.decode:
                rows = decode_sweep(target, mode=mode, batch=args.batch, longest=args.seq, device=device,
                                    levels=levels)
                tables.append(decode_table(rows))
                peaks.append(rows[-1])
            else:
                peaks.append(run_estimate(target, mode=mode, batch=args.batch, seq=args.seq,
                                          optimizer=args.optimizer, device=device, levels=levels))
                tables.append(peaks[-1].table())
        except PlacementError as exc:
            if len(modes) == 1 or (mode == modes[-1] and not peaks):
                raise PlacementError(tr(f"模式 {', '.join(modes)}: {levels_from} 的层级放不下: {exc}",
                                        f"mode {', '.join(modes)}: the levels of {levels_from} cannot hold "
                                        f"it: {exc}")) from None
            tables.append(tr(f"模式 {mode}: {levels_from} 的层级放不下: {exc}",
                             f"mode {mode}: the levels of {levels_from} cannot hold it: {exc}"))
    if free is None:
        return "\n\n".join(tables), peaks
    if not any(fits(est, free) for est in peaks):
        largest = min(peaks, key=lambda est: est.peak_bytes)
        better = smallest_fit(target, free=free, batch=args.batch, seq=largest.seq, training=not args.decode,
                              optimizer=args.optimizer, device=device, base=None, levels=levels,
                              known={est.mode: est.peak_bytes for est in peaks if est.seq == largest.seq})
        hint = (tr(f"能放下的最小配置: {better}", f"the smallest configuration that fits: {better}") if better
                else tr("任何模式下 batch 1 都放不下", "nothing fits, not even batch 1 in any mode"))
        raise VBConfigError(tr(
            f"模式 {', '.join(modes)} 都放不下: 最少需要 {human_bytes(largest.peak_bytes)} (模式 {largest.mode}), "
            f"--memory 为 {human_bytes(free)} (留出余量后 {human_bytes(usable(free))}); {hint}",
            f"mode {', '.join(modes)} does not fit: it needs at least {human_bytes(largest.peak_bytes)} (mode "
            f"{largest.mode}), --memory is {human_bytes(free)} ({human_bytes(usable(free))} after the margin); {hint}"))
    verdicts = {est.mode: (tr("  放得下", "  fits") if fits(est, free) else tr("  放不下", "  does not fit"))
                + f" (--memory {human_bytes(free)})" for est in peaks}
    placed = {est.mode: est for est in peaks}
    return "\n\n".join(f"{table}\n{verdicts[mode]}" if mode in placed else table
                        for table, mode in zip(tables, modes, strict=True)), peaks


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="vb", description=tr("虚拟Blackwell命令行", "Virtual Blackwell command line"))
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help=tr("显示设备与生效配置", "show the device and the effective configuration"))
    p_info.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, npu, ...")
    p_info.add_argument("--preset", default=None, help=tr("APT 预设名: 显示它的 VGPU 计划",
                                                         "an APT preset name: show its VGPU plan"))
    p_info.add_argument("--hf-config", default=None, help=tr("Hugging Face 的 config.json 路径: 显示它的 VGPU 计划",
                                                            "a Hugging Face config.json path: show its VGPU plan"))
    sub.add_parser("train", help=tr("训练APT模型（同 training/train.py）", "train an APT model (as training/train.py)"),
                   add_help=False)
    p_gen = sub.add_parser("generate", help=tr("用训练好的 APT 检查点生成文本", "generate text from a trained APT checkpoint"))
    p_gen.add_argument("checkpoint", help=tr("训练输出目录、其 checkpoints/ 目录或某个 ckpt-XXXXXXXX 目录",
                                             "a run's output folder, its checkpoints/ folder or a ckpt-XXXXXXXX folder"))
    p_gen.add_argument("--prompt", default=DEFAULT_PROMPT,
                       help=tr("开头的文本 (默认 %(default)r)", "the text to continue (default %(default)r)"))
    p_gen.add_argument("--max-new-tokens", type=int, default=200,
                       help=tr("生成的字节数 (默认 %(default)s)", "bytes to generate (default %(default)s)"))
    p_gen.add_argument("--temperature", type=float, default=0.8,
                       help=tr("采样温度 (默认 %(default)s)", "sampling temperature (default %(default)s)"))
    p_gen.add_argument("--top-k", type=int, default=40,
                       help=tr("只从概率最高的 k 个中采样, 0 表示不限 (默认 %(default)s)",
                               "sample among the k likeliest bytes only, 0 for all (default %(default)s)"))
    p_gen.add_argument("--greedy", action="store_true",
                       help=tr("每步取概率最高者 (不采样)", "always take the likeliest byte (no sampling)"))
    p_gen.add_argument("--seed", type=int, default=1337, help=tr("采样种子 (默认 %(default)s)",
                                                                 "sampling seed (default %(default)s)"))
    p_gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, npu, ...")
    p_plot = sub.add_parser("plot", help=tr("画训练日志的损失曲线 (需要 matplotlib)",
                                            "draw a training log's loss curve (needs matplotlib)"))
    p_plot.add_argument("log", help=tr("train_log.jsonl 或包含它的训练输出目录",
                                       "a train_log.jsonl, or the run's output folder holding it"))
    p_plot.add_argument("--out", default=None, help=tr("PNG 路径 (默认: 日志旁的 loss.png)",
                                                        "the PNG to write (default: loss.png beside the log)"))
    p_est = sub.add_parser("estimate", help=tr("估算一步训练 (或解码) 的峰值内存, 按模式",
                                               "estimate one training (or decode) step's peak memory, per mode"))
    p_est.add_argument("--preset", default=None, help=tr("APT 预设名", "an APT preset name"))
    p_est.add_argument("--hf-config", default=None, help=tr("Hugging Face 的 config.json 路径",
                                                           "the path of a Hugging Face config.json"))
    p_est.add_argument("--batch", type=int, default=1, help=tr("批大小 (默认 %(default)s)", "batch size (default %(default)s)"))
    p_est.add_argument("--seq", type=int, default=None, help=tr("序列长度 (默认: 模型的上下文长度)",
                                                               "sequence length (default: the model's context length)"))
    p_est.add_argument("--mode", default="all", help="speed, memory, balanced, full, off, all (default all)")
    p_est.add_argument("--optimizer", default="adamw", help="adamw, sgd (default adamw)")
    p_est.add_argument("--decode", action="store_true", help=tr("估算解码 (不是训练): 按上下文长度列出权重、KV 缓存与峰值",
                                "decode, not training: weights, KV cache and peak by context length"))
    p_est.add_argument("--memory", default=None, help=tr(
        "检查设备峰值能否放进这么多内存 (如 24GiB)", "check the device's peak fits in this much memory (such as 24GiB)"))
    p_est.add_argument("--levels", default=None, help=tr(
        "VGPU 层级 (JSON 或 JSON 文件路径, 同 vgpu_config; 默认: 配置的 vgpu_config): 每层放什么, 以及设备峰值",
        "VGPU levels (JSON or the path of a JSON file, as vgpu_config; default: the configured vgpu_config): "
        "what each level holds, and the device's peak"))
    p_est.add_argument("--plot", default=None, metavar="PNG", help=tr(
        "把各模式的峰值按组成画成堆叠柱状图 (需要 matplotlib)",
        "draw each mode's peak by component as stacked bars into this PNG (needs matplotlib)"))
    p_est.add_argument("--device", default=None, help=tr("目标设备类型, 决定固定开销 (默认 cpu; 有 VGPU 层级时为 Level 0 的设备)",
                                                        "the target device type, which sets the fixed overhead "
                                                        "(default cpu; with VGPU levels, Level 0's device)"))
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from apt_model.training.launcher import main as train_main

        return int(train_main(rest, prog="vb train") or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "generate":
        print(generate(args))
    elif args.command == "estimate":
        text, peaks = estimate(args)
        print(text)
        if args.plot is not None:
            from apt_model.estimator.plot import plot_estimates
            from apt_model.figures import missing_matplotlib_message

            png = plot_estimates(peaks, args.plot)
            if png is None:
                raise VBConfigError(missing_matplotlib_message(what=("内存估算图", "memory estimate plot")))
            print(tr(f"内存估算图: {png}", f"memory estimate plot: {png}"))
    elif args.command == "plot":
        png = plot(args.log, args.out)
        print(tr(f"损失曲线: {png}", f"loss curve: {png}"))
    else:
        print(info(args.device, args.preset, args.hf_config))
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
