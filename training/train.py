#!/usr/bin/env python3
"""Main training launcher: ``python training/train.py --enable-vb --vb-mode balanced``.

The user's guide shows how a launcher switches VB on from ``--enable-vb`` / ``--vb-mode``.
This one passes those flags to VB as its CLI level (explicit > CLI > environment > ``.vbrc``
> defaults), so a mode left out comes from ``VB_MODE`` or ``.vbrc``, and a bad setting from
any level stops the run with one line and exit code 2. The flags and the training itself live
in ``apt_model.training.launcher``, shared with ``vb train`` and ``train_vb_apt.py``.
"""

import sys
from collections.abc import Sequence

from apt_model.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    from apt_model.training import launcher

    return launcher.main(argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(run_cli(main))
