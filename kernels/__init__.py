"""Fused Triton kernels for the loss and covariance terms (installed as ``ssltrain.kernels``)."""
