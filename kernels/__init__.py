"""Triton kernels of curvfast (installed as ``curvfast.kernels``)."""
