"""Pre-activations of a test problem, and PWL knots moved clear of them.

An element of the pre-activation p within f32 accumulation noise of a knot takes either segment
in a kernel and in its reference, which moves its slope (and its term dh p in the slopes'
gradient) to the neighbouring segment: a test failure that says nothing about the kernel. The
kernel tests (TPU and GPU) compare on PWLs whose knots are moved clear of p first.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.activation import evenly_spaced
from pallas_kernels.gpu import backward


def f32_preactivations(problem) -> list:
  """[g, u] (GLU) or [u] (MLP): x W + b of the problem in float32, the saved residuals' target."""
  f32 = lambda name: problem[name].astype(jnp.float32)
  weights = (("w_gate", "b_gate"),) * (problem.get("w_gate") is not None) + (("w_up", "b_up"),)
  return [jnp.dot(f32("x"), f32(w), precision="highest") + (0 if problem.get(b) is None else f32(b))
          for w, b in weights]


def knots_clear_of(activation, problem, margin_fraction=1e-5, step=2.0**-14, steps=256):
  """The PWL ``activation`` (a kernel ``Activation`` or an ``ff.PiecewiseLinear``, returned as
  the same kind) with each knot moved (by a multiple of ``step``, at most ``steps``
  of them; a knot on the floor-bits grid stays on it) to the nearest point with the fewest f32
  pre-activations p of ``problem`` within ``margin_fraction`` max|p| of it: none, at the
  interpret tests' sizes. An element of p within f32 accumulation noise of a knot takes either
  segment in the kernel and in the reference, which moves its term dh p from one slope's gradient
  to the next (1.3% of ‖d slopes‖ at M = 70, H = 200 in one CI run); at GPU sizes such terms are
  a negligible share of the norm. Evenly spaced knots move together (as far, by multiples of
  16 steps: on the floor-bits grid for |t| < 32), so the lookup still applies. Other activations
  come back unchanged."""
  given = activation
  if isinstance(given, ff.PiecewiseLinear):
    activation = to_kernel_activation(given)
  if activation.kind != "pwl":
    return given
  p = np.asarray(f32_preactivations(problem)[0]).ravel()
  p = np.sort(p[np.isfinite(p)])
  margin = margin_fraction * float(np.max(np.abs(p)))
  crowd = lambda at: np.searchsorted(p, at + margin) - np.searchsorted(p, at - margin)
  knots = np.asarray(activation.knots, np.float32)
  on_grid = bool(np.all(np.asarray(backward.snap_knots(knots)) == knots))
  offsets = step * np.asarray(sorted(range(-steps, steps + 1), key=abs), np.float32)
  if evenly_spaced(knots):
    shifted = knots[None, :] + 16 * offsets[:2 * (steps // 16) + 1, None]
    moved = shifted[np.argmin(crowd(shifted).sum(axis=1))]
  else:
    moved = []
    for knot in knots:
      candidates = knot + offsets
      if on_grid:
        candidates = np.asarray(backward.snap_knots(jnp.asarray(candidates)))
      moved.append(candidates[np.argmin(crowd(candidates))])  # the first minimum: the smallest
    moved = np.asarray(moved, np.float32)
  assert np.all(np.diff(moved) > 0), "knots closer than the moves"
  # the PWL through the old one's values at the moved knots: continuous, as the kernels assume
  # (keeping the old segment lines would open jumps of Δs_k x (the move) at the knots)
  moved = jnp.asarray(moved, jnp.float32)
  pwl = ff.PiecewiseLinear.create(moved, activation(moved), activation.slopes[0],
                                  activation.slopes[-1])
  return pwl if isinstance(given, ff.PiecewiseLinear) else to_kernel_activation(pwl)
