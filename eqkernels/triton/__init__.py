"""Triton kernels and their host launchers (run on CPU tensors under TRITON_INTERPRET=1)."""
