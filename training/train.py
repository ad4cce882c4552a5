#!/usr/bin/env python3
"""Main training launcher: ``python training/train.py --enable-vb --vb-mode balanced``.

The ``parse_args``/``main`` structure and the VB block are the integration recipe from the
user's guide, kept as written; the flags and the training itself live in
``apt_model.training.launcher`` so ``vb train`` and ``train_vb_apt.py`` share them. The
launcher is imported inside the functions, under ``run_cli``: importing it reads the VB
environment variables, and a bad one must be a one-line error, not a traceback.
"""
# ruff: noqa: F401  (the recipe imports vb_autopatch for its side effect: patching APT)

import argparse
import sys

from apt_model.errors import run_cli


def parse_args():
    parser = argparse.ArgumentParser()

    # ... 其他参数
    from apt_model.training.launcher import add_training_arguments
    add_training_arguments(parser)

    # 虚拟Blackwell
    parser.add_argument('--enable-vb', action='store_true',
                       help='启用虚拟Blackwell优化')
    parser.add_argument('--vb-mode', default='balanced',
                       choices=['full', 'speed', 'memory', 'balanced'],
                       help='VB优化模式')

    return parser.parse_args()

def main():
    args = parse_args()

    # 启用VB
    if args.enable_vb:
        import apt_model.optimization.vb_autopatch
        import apt_model.optimization.vb_global as vb

        if args.vb_mode == 'full':
            vb.enable_full_optimization()
        elif args.vb_mode == 'speed':
            vb.enable_speed_mode()
        elif args.vb_mode == 'memory':
            vb.enable_memory_mode()
        else:
            vb.enable_balanced_mode()

    # ... 后续训练代码
    from apt_model.training.launcher import run
    return run(args)


def main_with_env_args(_argv: object = None) -> int:
    """``main()`` with ``$APT_TRAIN_ARGS`` placed before the command line's flags."""
    from apt_model.training.launcher import with_env_args
    sys.argv[1:] = with_env_args(sys.argv[1:])
    return main()


if __name__ == "__main__":
    sys.exit(run_cli(main_with_env_args))
