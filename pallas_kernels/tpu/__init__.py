"""Mosaic TPU kernels: ``fused_ffn`` (forward + recomputing backward) and its ``tiling`` model."""
