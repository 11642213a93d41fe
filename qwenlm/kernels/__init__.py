"""Triton kernels; each has a plain-torch reference it is tested against (TRITON_INTERPRET=1 on CPU)."""
