"""Pallas kernels for the fused FFN, one file per backend; no Flax in here.

* ``activation``            elementwise math shared by every kernel and the XLA reference.
* ``tpu/fused_ffn.py``      Mosaic TPU dual-GEMM kernel (forward + recomputing backward).
* ``gpu/fused_ffn_sm90.py`` Mosaic GPU (Hopper) kernels.
"""
