"""The outlier predictor: a b-bit copy of the activation-input weights (W_up of an MLP, W_gate
of a GLU), float64 NumPy at build time.

Each column i is quantised midrise with its own scale s_i, w ≈ (q + ½) s_i with integer
q ∈ [−2^(b−1), 2^(b−1) − 1] (int4: 16 levels, int2: 4 levels, no level at 0). The scale
minimises the column's squared quantisation error over a grid of clipping ratios. The
prediction is then one narrow matmul plus a rank-one term:

    ẑ = x (Q + ½) s + b = (x Q) s + ½ s Σ_d x_d + b

A neuron is flagged as an outlier when ẑ leaves its hot range shrunk by a margin of κ σ_i,
with σ_i the standard deviation of ẑ_i − z_i on the calibration tokens:
    flag = ẑ < lo + κσ  or  ẑ > hi − κσ.
Larger κ flags more (better recall, more corrections).
"""

from __future__ import annotations

import numpy as np

PREDICTOR_BITS = (2, 4, 8)
_CLIP_RATIOS = np.linspace(0.15, 1.0, 35)


def quantize_columns(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """(q int8 [D, F], scale float64 [F]) with w ≈ (q + ½) · scale (see the module docstring)."""
  if bits not in PREDICTOR_BITS:
    raise ValueError(f"predictor_bits: expected one of {PREDICTOR_BITS}, got {bits!r}")
  w = np.asarray(w, np.float64)
  levels = 2 ** (bits - 1)
  peak = np.maximum(np.max(np.abs(w), axis=0), 1e-30)  # [F]
  best_q, best_scale, best_err = None, None, np.full(w.shape[1], np.inf)
  for ratio in _CLIP_RATIOS:
    scale = ratio * peak / (levels - 0.5)
    q = np.clip(np.floor(w / scale), -levels, levels - 1)
    err = np.sum(((q + 0.5) * scale - w) ** 2, axis=0)
    better = err < best_err
    if best_q is None:
      best_q, best_scale = q.copy(), scale.copy()
    best_q[:, better], best_scale[better], best_err[better] = q[:, better], scale[better], err[better]
  return best_q.astype(np.int8), best_scale


def predict(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
  """ẑ [N, F] for x [N, D] (float64)."""
  x = np.asarray(x, np.float64)
  z = (x @ q.astype(np.float64)) * scale + 0.5 * scale * np.sum(x, axis=1, keepdims=True)
  return z if bias is None else z + bias
