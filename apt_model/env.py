"""Every environment variable the package reads, named once, and the one rule for switches.

The user's guide names ``ENABLE_VIRTUAL_BLACKWELL``, ``VB_MODE`` and ``VB_AUTO_PATCH``; every
other variable of the package starts with ``VB_``. ``TRITON_INTERPRET`` is Triton's own.
"""

from __future__ import annotations

import os

# Options of VB's configuration (the environment level; see apt_model.optimization.config).
OPTION_VARS: dict[str, str] = {
    "ENABLE_VIRTUAL_BLACKWELL": "enabled",
    "VB_MODE": "mode",
    "VB_AUTO_PATCH": "auto_patch",
    "VB_AUTO_ESTIMATE": "auto_estimate",
    "VB_VERBOSE": "verbose",
    "VB_DEVICE": "device",
    "VB_FP4_FORMAT": "fp4_format",
}
CONFIG_FILE = "VB_CONFIG"  # names the `.vbrc` to read
LANG = "VB_LANG"  # "en" for English messages; Chinese otherwise
TRAIN_ARGS = "VB_TRAIN_ARGS"  # extra launcher flags, before the command line's
FP4_TRITON = "VB_FP4_TRITON"  # 0: the FP4 ops take the PyTorch reference on CUDA too
FP4_AUTOTUNE = "VB_FP4_AUTOTUNE"  # 0: the FP4 kernels run their first config, untuned
FP4_LARGE_KERNEL = "VB_FP4_LARGE_KERNEL"  # pins the large-M FP4 strategy (see apt_model.fp4)
TRITON_INTERPRET = "TRITON_INTERPRET"  # Triton's CPU interpreter

ALL = (*OPTION_VARS, CONFIG_FILE, LANG, TRAIN_ARGS, FP4_TRITON, FP4_AUTOTUNE, FP4_LARGE_KERNEL)

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def parse_switch(text: str) -> bool | None:
    """True / False for the switch words above (any case, spaces ignored), None otherwise."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def get(name: str) -> str | None:
    """The variable's value, or None when it is not set."""
    return os.environ.get(name)


def switch(name: str, default: bool) -> bool:
    """A developer switch: its value by ``parse_switch``; ``default`` when unset or not a switch word."""
    raw = os.environ.get(name)
    value = None if raw is None else parse_switch(raw)
    return default if value is None else value
