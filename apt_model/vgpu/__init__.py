"""The VGPU stack ("virtual VRAM"): parameters, gradients and optimizer state placed over
GPU → pinned host RAM → SSD and streamed to the compute device ahead of use.

Empty for now: the levels are configured and validated (``vgpu_config`` in
``apt_model.optimization.config``) and ``vb.print_stats()`` says that nothing is tiered yet.
The stack itself lands here.
"""
