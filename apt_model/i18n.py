"""User-facing message language: the seed's Chinese by default, English with ``VB_LANG=en``."""

from __future__ import annotations

from apt_model import env


def language() -> str:
    """The message language in force now ("zh" or "en"); read on every call so tests can switch."""
    return "en" if (env.get(env.LANG) or "").lower().startswith("en") else "zh"


def tr(zh: str, en: str) -> str:
    """Pick the Chinese or English wording of one message."""
    return en if language() == "en" else zh
