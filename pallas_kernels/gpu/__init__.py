"""Hopper (sm_90) Pallas Mosaic GPU kernels for the FFN: see ``fused_ffn_sm90`` and ``dispatch``."""
