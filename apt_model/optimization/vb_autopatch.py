"""Importing this module patches the model classes (the user's guide, method 2): APT models,
and Hugging Face models that transformers builds (``from_pretrained``, ``from_config``),
come out optimized when they are built while VB is enabled with ``auto_patch``.

    import apt_model.optimization.vb_autopatch  # 导入即patch
    import apt_model.optimization.vb_global as vb
    vb.enable()
"""

from __future__ import annotations

from apt_model.optimization import vb_global
from apt_model.optimization.autopatch import register, registered, unregister

__all__ = ["register", "registered", "unregister"]

vb_global.install_patches()
