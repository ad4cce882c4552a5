"""The ``vb`` command: ``vb info`` (device, capabilities, memory, effective configuration)
and ``vb train`` (the training launcher)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from apt_model import accelerator
from apt_model.errors import run_cli
from apt_model.i18n import tr
from apt_model.optimization import vb_global


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _yes(flag: bool) -> str:
    return tr("是", "yes") if flag else tr("否", "no")


def info(device_name: str | None) -> str:
    """The text of ``vb info``."""
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
        lines.append(f"    L0 {device}: {_gib(dev_mem[0])} / {_gib(dev_mem[1])}")
    host_free, host_total = desc.memory["host"]
    lines.append(f"    {'L1' if dev_mem else 'L0'} cpu: {_gib(host_free)} / {_gib(host_total)}")
    vgpu = effective["vgpu_config"][0]
    ssd_paths = [lv.get("path") or "." for lv in (vgpu or {}).get("levels", []) if lv["device"] == "ssd"] or ["."]
    for path in ssd_paths:
        lines.append(f"    ssd {path}: {_gib(accelerator.disk_free(path))} {tr('可用', 'free')}")
    lines.append(tr("  生效配置 (值 ← 来源):", "  effective configuration (value ← source):"))
    for key, (value, source) in effective.items():
        lines.append(f"    {key} = {value!r}  ← {source}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vb", description=tr("虚拟Blackwell命令行", "Virtual Blackwell command line"))
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help=tr("显示设备与生效配置", "show the device and the effective configuration"))
    p_info.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, npu, ...")
    sub.add_parser("train", help=tr("训练APT模型（同 training/train.py）", "train an APT model (as training/train.py)"),
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from apt_model.training.launcher import main as train_main

        return int(train_main(rest) or 0)
    if rest:
        parser.error(tr(f"未知参数: {' '.join(rest)}", f"unrecognized arguments: {' '.join(rest)}"))
    print(info(args.device))
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
