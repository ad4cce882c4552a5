#!/usr/bin/env python3
"""Train an APT model with Virtual Blackwell on (mode from --vb-mode, VB_MODE or .vbrc; default
balanced):

    python training/train_vb_apt.py --config medium --epochs 20

Same flags as training/train.py; defaults suited to a real run: the "small" preset, 256-token
windows (capped by the preset), output in runs/vb-apt-<preset>.
"""

import sys
from collections.abc import Sequence

from apt_model.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    from apt_model.training import launcher

    return launcher.main(argv, prog="train_vb_apt.py", vb_default=True, preset="small",
                         out_prefix="vb-apt", seq_len=256)


if __name__ == "__main__":
    sys.exit(run_cli(main))
