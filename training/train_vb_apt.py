#!/usr/bin/env python3
"""Train an APT model with Virtual Blackwell on (mode from $VB_MODE, default balanced):

    python training/train_vb_apt.py --config medium --epochs 20

Same flags as training/train.py; defaults suited to a real run: the "small" preset, 256-token
windows, output in runs/vb-apt-<preset>. VB is enabled here, before the model is built.
"""

import sys

from apt_model.errors import run_cli
from apt_model.training import launcher

if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: launcher.main(argv, vb_default=True, preset="small",
                                                out_prefix="vb-apt", seq_len=256), sys.argv[1:]))
