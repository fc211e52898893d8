"""Piecewise-linear (PWL) activations: the pytree, its custom VJP, and knot fitting.

A ``PiecewiseLinear`` with K sorted knots t_0 < ... < t_{K-1} and values v_k is continuous:

    x < t_0:            v_0     + s_L (x - t_0)              (left tail)
    t_k <= x < t_{k+1}: v_k     + (v_{k+1} - v_k) (x - t_k) / (t_{k+1} - t_k)
    x >= t_{K-1}:       v_{K-1} + s_R (x - t_{K-1})          (right tail)

It has K - 1 interior segments ("segments" everywhere in this library) plus two tails. The fits
put the end values on the activation's asymptotes (GELU/SiLU: y = 0 on the left, y = x on the
right), so the tails ARE the asymptotes and the error is bounded on the whole real line.

An evenly spaced PWL (``evenly_spaced=True``, what ``fit(..., method="uniform")`` returns) is
evaluated at the knots t_0 + k (t_{K-1} - t_0) / (K - 1): the end knots place the grid, the
interior entries of ``knots`` are not read (zero gradient; ``validate`` checks that concrete ones
sit on it). The promise is static, so it survives tracing, and Hopper kernels evaluate such a
PWL by one table lookup per element for any K.

Evaluation is ``s[seg] * x + c[seg]`` with the per-segment slopes and intercepts derived from
(knots, values, tail slopes) — see ``pallas_kernels.activation``. The custom VJP stores only x:
dx = g · s[seg]; d s_j = Σ_{seg=j} g x; d c_j = Σ_{seg=j} g, then the chain rule to the knots,
values and tail slopes through the (tiny) map (t, v, s_L, s_R) -> (s, c). Moving a knot moves a
kink of a continuous function, so the boundary term vanishes and this gradient is exact.

Fitting methods (all float64):
  uniform    knots evenly spaced over ``knot_range``, interpolating (``evenly_spaced=True``).
  curvature  knot density ∝ |f''|^½ (equidistributes the interpolation error h²|f''|/8).
  optimal    minimax interpolating knots: for a target ε a greedy sweep makes every segment as
             long as its max error allows (the fewest segments for ε); bisection on ε finds the
             smallest ε that needs ``segments`` segments.
  data       density ∝ (p(x) f''(x)²)^⅕ for the sample density p (minimises the expected squared
             error), values by least squares on the sample with the tails pinned.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from flashffn_jax import activations
from flashffn_jax.activations import Line
from pallas_kernels.activation import even_grid, evenly_spaced, pwl_apply

FitMethod = Literal["uniform", "curvature", "optimal", "data"]
FIT_METHODS: tuple[str, ...] = ("uniform", "curvature", "optimal", "data")


def _is_concrete(*leaves) -> bool:
  return all(not isinstance(leaf, jax.core.Tracer) and hasattr(leaf, "shape") or
             isinstance(leaf, (int, float)) for leaf in leaves)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PiecewiseLinear:
  """Continuous PWL function; a pytree whose four leaves are trainable float32 arrays.

  Build with ``PiecewiseLinear.create`` (validates) or ``fit``. The plain constructor does not
  validate, because JAX rebuilds pytrees with placeholder leaves (e.g. optax's zero moments).
  """

  knots: jax.Array  # [K], strictly increasing
  values: jax.Array  # [K], function value at each knot
  left_slope: jax.Array  # [], slope of the left tail
  right_slope: jax.Array  # [], slope of the right tail
  evenly_spaced: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @classmethod
  def create(cls, knots, values, left_slope, right_slope, *,
             evenly_spaced: bool = False) -> PiecewiseLinear:
    """Validated constructor: ValueError on unsorted, non-finite or mis-shaped parameters."""
    pwl = cls(*(jnp.asarray(a, jnp.float32) for a in (knots, values, left_slope, right_slope)),
              evenly_spaced=evenly_spaced)
    pwl.validate()
    return pwl

  @classmethod
  def from_lines(cls, knots, values, left: Line, right: Line, *,
                 evenly_spaced: bool = False) -> PiecewiseLinear:
    return cls.create(knots, values, left.slope, right.slope, evenly_spaced=evenly_spaced)

  def validate(self) -> None:
    """Raise ValueError if the (concrete) parameters do not describe a valid PWL."""
    if not _is_concrete(self.knots, self.values, self.left_slope, self.right_slope):
      return
    knots, values = np.asarray(self.knots, np.float64), np.asarray(self.values, np.float64)
    if knots.ndim != 1 or knots.shape[0] < 2:
      raise ValueError(f"knots: expected a 1-D array of at least 2 knots (1 segment), got shape {knots.shape}")
    if values.shape != knots.shape:
      raise ValueError(f"values: expected shape {knots.shape} (one per knot), got {values.shape}")
    if not np.all(np.isfinite(knots)):
      raise ValueError(f"knots: expected finite numbers, got {knots.tolist()}")
    if not np.all(np.diff(knots) > 0):
      raise ValueError(f"knots: expected strictly increasing knots, got {knots.tolist()}")
    if self.evenly_spaced and not evenly_spaced(knots):
      raise ValueError(f"knots: evenly_spaced=True needs t_0 + k δ, got {knots.tolist()}")
    if not np.all(np.isfinite(values)):
      raise ValueError(f"values: expected finite numbers, got {values.tolist()}")
    for name in ("left_slope", "right_slope"):
      s = np.asarray(getattr(self, name))
      if s.shape != () or not np.isfinite(s):
        raise ValueError(f"{name}: expected a finite scalar, got {s!r}")

  @property
  def num_segments(self) -> int:
    """Interior segments (K - 1); the two tails are not counted."""
    return self.knots.shape[-1] - 1

  def knot_positions(self) -> jax.Array:
    """The knots the PWL is evaluated at: ``knots``, or for an evenly spaced PWL the grid its
    end knots place (see the module docstring)."""
    if not self.evenly_spaced:
      return self.knots
    return even_grid(self.knots[0], self.knots[-1], self.knots.shape[-1])

  def slopes(self) -> jax.Array:
    """Per-segment slopes [K+1]: left tail, K-1 interior segments, right tail."""
    interior = jnp.diff(self.values) / jnp.diff(self.knot_positions())
    return jnp.concatenate([self.left_slope[None], interior, self.right_slope[None]])

  def intercepts(self) -> jax.Array:
    """Per-segment intercepts [K+1], c_j = v - s_j t at the segment's left knot (tail: first knot)."""
    knots = self.knot_positions()
    anchor_knots = jnp.concatenate([knots[:1], knots])
    anchor_values = jnp.concatenate([self.values[:1], self.values])
    return anchor_values - self.slopes() * anchor_knots

  def __call__(self, x: jax.Array) -> jax.Array:
    return pwl_apply(x, self.knot_positions(), self.slopes(), self.intercepts(),
                     self.evenly_spaced)

  def numpy(self, x: np.ndarray) -> np.ndarray:
    """Float64 NumPy evaluation (for error reports and plots)."""
    knots = np.asarray(self.knot_positions(), np.float64)
    values = np.asarray(self.values, np.float64)
    x = np.asarray(x, np.float64)
    y = np.interp(x, knots, values)
    y = np.where(x < knots[0], values[0] + float(self.left_slope) * (x - knots[0]), y)
    return np.where(x > knots[-1], values[-1] + float(self.right_slope) * (x - knots[-1]), y)

  def error_report(self, activation: str | Callable, samples: np.ndarray | None = None) -> dict:
    """Max |err| over the whole line (dense grid reaching far into both tails), RMS over the knot
    span ± 1, and the RMS under ``samples`` when given."""
    fn = _as_numpy_fn(activation)
    knots = np.asarray(self.knots, np.float64)
    span = knots[-1] - knots[0]
    lo, hi = knots[0] - 2 * span - 20.0, knots[-1] + 2 * span + 20.0
    grid = np.unique(np.concatenate([np.linspace(lo, hi, 400_001), np.linspace(knots[0] - 1, knots[-1] + 1, 200_001)]))
    err = self.numpy(grid) - fn(grid)
    inner = (grid >= knots[0] - 1) & (grid <= knots[-1] + 1)
    report = {
        "segments": self.num_segments,
        "max_abs_error": float(np.max(np.abs(err))),
        "max_error_at": float(grid[np.argmax(np.abs(err))]),
        "rms_error": float(np.sqrt(np.mean(err[inner] ** 2))),
    }
    if samples is not None:
      s = np.asarray(samples, np.float64).ravel()
      report["sample_rms_error"] = float(np.sqrt(np.mean((self.numpy(s) - fn(s)) ** 2)))
    return report


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


def _as_numpy_fn(activation: str | Callable) -> Callable[[np.ndarray], np.ndarray]:
  if isinstance(activation, str):
    return activations.lookup(activation).fn
  if callable(activation):
    return lambda x: np.asarray(activation(x), np.float64)
  raise ValueError(f"activation: expected a name or a callable, got {type(activation).__name__}")


def _resolve(activation, tails, knot_range):
  """(float64 fn, left asymptote, right asymptote, default knot range)."""
  fn = _as_numpy_fn(activation)
  if isinstance(activation, str):
    named = activations.lookup(activation)
    left, right, default_range = named.left, named.right, named.default_range
  else:
    left, right = activations.estimate_asymptotes(fn)
    default_range = None
  if tails is not None:
    left, right = tails
  if default_range is None:
    default_range = _TailGaps(fn, left, right).cutoffs(1e-3)
  return fn, left, right, knot_range if knot_range is not None else default_range


class _TailGaps:
  """Running max of |f - asymptote| walking in from ±far, to find tail cut-offs for any ε."""

  def __init__(self, fn, left: Line, right: Line, far: float = 60.0):
    self.xl = np.linspace(-far, 0.0, 600_001)
    self.gap_l = np.maximum.accumulate(np.abs(fn(self.xl) - left(self.xl)))
    self.xr = np.linspace(far, 0.0, 600_001)
    self.gap_r = np.maximum.accumulate(np.abs(fn(self.xr) - right(self.xr)))
    self.settled = int(np.searchsorted(self.xl, -40.0))  # the tails must fit beyond ±40

  def cutoffs(self, eps: float) -> tuple[float, float]:
    """Largest t_L with |f - left| <= eps on (-far, t_L], smallest t_R likewise on [t_R, far)."""
    if self.gap_l[self.settled] > eps or self.gap_r[self.settled] > eps:
      raise ValueError(f"activation: it does not approach its tail lines within {eps:g} beyond "
                       "±40; pass tails= lines it does approach")
    n_l = np.searchsorted(self.gap_l, eps, side="right")
    n_r = np.searchsorted(self.gap_r, eps, side="right")
    t_left, t_right = self.xl[n_l - 1], self.xr[n_r - 1]
    if t_right - t_left < 1e-3:  # e.g. relu: both tails exact up to the kink
      t_left, t_right = t_left - 0.5, t_right + 0.5
    return float(t_left), float(t_right)


def _segment_errors(fn, a, va, b, vb, points: int = 257) -> np.ndarray:
  """Max |f - chord| on each segment [a_i, b_i] with chord through (a_i, va_i), (b_i, vb_i)."""
  u = np.linspace(0.0, 1.0, points)
  a, va, b, vb = (np.atleast_1d(np.asarray(v, np.float64))[:, None] for v in (a, va, b, vb))
  x = a + (b - a) * u
  return np.max(np.abs(fn(x) - (va + (vb - va) * u)), axis=1)


def _greedy_knots(fn, left: Line, right: Line, tails: _TailGaps, eps: float, max_segments: int):
  """Fewest interpolating knots with max error <= eps (None if more than max_segments needed)."""
  t_first, t_last = tails.cutoffs(eps)
  knots, vals = [t_first], [left(t_first)]
  while len(knots) <= max_segments:
    a, va = knots[-1], vals[-1]
    if _segment_errors(fn, a, va, t_last, right(t_last))[0] <= eps:
      knots.append(t_last)
      vals.append(right(t_last))
      return np.array(knots), np.array(vals)
    # Largest b in (a, t_last) whose chord stays within eps: 64 candidates per round, 4 rounds.
    lo, hi = a, t_last
    for _ in range(4):
      cand = np.linspace(lo, hi, 65)[1:]
      ok = _segment_errors(fn, np.full_like(cand, a), np.full_like(cand, va), cand, fn(cand)) <= eps
      n_ok = np.argmin(ok) if not ok.all() else len(ok)  # first failing candidate
      lo, hi = (cand[n_ok - 1] if n_ok else lo), cand[min(n_ok, len(cand) - 1)]
    if lo <= a:
      lo = a + (hi - a) * 1e-3
    knots.append(lo)
    vals.append(float(fn(np.array([lo]))[0]))
  return None


def _split_to(fn, knots, vals, segments: int):
  """Halve the worst segments until there are exactly `segments` (never raises the max error)."""
  knots, vals = list(knots), list(vals)
  while len(knots) - 1 < segments:
    errs = _segment_errors(fn, knots[:-1], vals[:-1], knots[1:], vals[1:])
    lengths = np.diff(knots)
    i = int(np.argmax(errs)) if errs.max() > 1e-12 else int(np.argmax(lengths))  # exact fit: split the longest
    mid = 0.5 * (knots[i] + knots[i + 1])
    knots.insert(i + 1, mid)
    vals.insert(i + 1, float(fn(np.array([mid]))[0]))
  return np.array(knots), np.array(vals)


def _fit_optimal(fn, left, right, segments):
  tails = _TailGaps(fn, left, right)
  hi_eps, lo_eps = 1.0, 1e-9
  best = _greedy_knots(fn, left, right, tails, hi_eps, segments)
  if best is None:
    raise ValueError("activation: could not fit it within error 1.0; is it bounded by its tails?")
  for _ in range(40):
    mid = np.sqrt(hi_eps * lo_eps)
    try:
      found = _greedy_knots(fn, left, right, tails, mid, segments)
    except ValueError:  # the tails themselves miss this ε
      found = None
    if found is None:
      lo_eps = mid
    else:
      hi_eps, best = mid, found
    if hi_eps / lo_eps < 1.002:
      break
  return _split_to(fn, *best, segments)


def _knots_from_density(density: np.ndarray, grid: np.ndarray, segments: int) -> np.ndarray:
  """Invert the CDF of a density on a grid at segments+1 equally spaced levels."""
  cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])
  return np.interp(np.linspace(0.0, cdf[-1], segments + 1), cdf, grid)


def _second_derivative(fn, grid: np.ndarray) -> np.ndarray:
  h = 1e-3
  return (fn(grid + h) - 2 * fn(grid) + fn(grid - h)) / h**2


def _interpolating_values(fn, knots, left: Line, right: Line) -> np.ndarray:
  vals = fn(knots)
  vals[0], vals[-1] = left(knots[0]), right(knots[-1])
  return vals


def _fit_data(fn, left, right, segments, samples, knot_range):
  s = np.asarray(samples, np.float64).ravel()
  s = s[np.isfinite(s)]
  if s.size < 2 * (segments + 1):
    raise ValueError(f"samples: expected at least {2 * (segments + 1)} finite values, got {s.size}")
  q_lo, q_hi = np.quantile(s, [1e-4, 1 - 1e-4])
  lo, hi = min(q_lo, knot_range[0]), max(q_hi, knot_range[1])
  grid = np.linspace(lo, hi, 4001)
  hist, edges = np.histogram(np.clip(s, lo, hi), bins=400, range=(lo, hi), density=True)
  kernel = np.exp(-0.5 * np.linspace(-3, 3, 13) ** 2)
  p = np.interp(grid, 0.5 * (edges[1:] + edges[:-1]), np.convolve(hist, kernel / kernel.sum(), "same"))
  rho = (p * _second_derivative(fn, grid) ** 2) ** 0.2
  rho = rho + 0.02 * rho.mean() + 1e-12
  knots = _knots_from_density(rho, grid, segments)
  # Least squares for the interior values; end values pinned to the asymptotes (exact tails).
  rng = np.random.default_rng(0)
  fit_s = rng.choice(s, size=min(s.size, 200_000), replace=False)
  basis = np.stack([np.interp(fit_s, knots, np.eye(len(knots))[k]) for k in range(len(knots))], axis=1)
  inside = (fit_s >= knots[0]) & (fit_s <= knots[-1])
  vals = _interpolating_values(fn, knots, left, right)
  target = fn(fit_s) - basis[:, 0] * vals[0] - basis[:, -1] * vals[-1]
  a, b = basis[inside][:, 1:-1], target[inside]
  ridge = 1e-8 * np.eye(a.shape[1])
  vals[1:-1] = np.linalg.solve(a.T @ a + ridge, a.T @ b + ridge @ vals[1:-1])
  return knots, vals


def fit(activation: str | Callable, segments: int, method: FitMethod = "optimal", *,
        samples: np.ndarray | None = None, knot_range: tuple[float, float] | None = None,
        tails: tuple[Line, Line] | None = None) -> PiecewiseLinear:
  """Fit a continuous PWL with ``segments`` interior segments to an activation.

  Args:
    activation: a name ("gelu", "gelu_tanh", "silu", "relu", "tanh", "sigmoid") or a callable
      mapping a float64 array to an array.
    segments: interior segments (knots = segments + 1), at least 1.
    method: "uniform", "curvature", "optimal" (minimax) or "data" (needs ``samples``).
    samples: real pre-activations for method="data".
    knot_range: knot span for uniform/curvature (default per activation).
    tails: (left, right) asymptote lines; default: known for names, estimated for callables.
  """
  if isinstance(segments, bool) or not isinstance(segments, (int, np.integer)) or segments < 1:
    raise ValueError(f"segments: expected an integer >= 1, got {segments!r}")
  if method not in FIT_METHODS:
    raise ValueError(f"method: expected one of {FIT_METHODS}, got {method!r}")
  if knot_range is not None and not (np.all(np.isfinite(knot_range)) and knot_range[0] < knot_range[1]):
    raise ValueError(f"knot_range: expected finite (lo, hi) with lo < hi, got {knot_range!r}")
  fn, left, right, span = _resolve(activation, tails, knot_range)
  if method == "optimal":
    knots, vals = _fit_optimal(fn, left, right, int(segments))
  elif method == "data":
    if samples is None:
      raise ValueError("samples: method='data' needs a sample of real pre-activations")
    knots, vals = _fit_data(fn, left, right, int(segments), samples, span)
  else:
    if method == "uniform":
      knots = np.linspace(span[0], span[1], segments + 1)
    else:
      grid = np.linspace(span[0], span[1], 20001)
      rho = np.sqrt(np.abs(_second_derivative(fn, grid)))
      knots = _knots_from_density(rho + 1e-3 * rho.max() + 1e-12, grid, int(segments))
    vals = _interpolating_values(fn, knots, left, right)
  return PiecewiseLinear.from_lines(knots, vals, left, right, evenly_spaced=method == "uniform")


_SPEC = re.compile(r"^pwl(?P<segments>\d+)(?:-(?P<method>[a-z]+))?$")


def from_spec(spec: str, activation: str | Callable) -> PiecewiseLinear:
  """Parse "pwl16" / "pwl8-uniform" / "pwl4-curvature" into a fit of ``activation``."""
  match = _SPEC.match(spec)
  if not match:
    raise ValueError(f"activation: expected a spec like 'pwl16' or 'pwl8-uniform', got {spec!r}")
  return fit(activation, int(match["segments"]), match["method"] or "optimal")
