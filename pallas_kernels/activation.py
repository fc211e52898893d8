"""Elementwise activation math shared by the kernels and the XLA reference.

Everything here is plain ``jax.numpy`` on values already loaded (a tile inside a kernel, or a
whole array in XLA), computes in float32 and contains no gathers, so it lowers on Mosaic TPU,
Mosaic GPU and XLA alike.

Piecewise-linear (PWL) activation with K sorted knots t_0 < ... < t_{K-1} and K+1 segments:

    seg(x) = #{k : x >= t_k}                 (0 = left tail, K = right tail)
    pwl(x) = s[seg(x)] * x + c[seg(x)]

``pwl_select`` returns (s[seg], c[seg]) with a chain of K compares and 2K selects, so the
activation is one FMA on top and its input-gradient is s[seg] itself. NaN fails every compare,
lands in the left tail and gives s_0 * NaN + c_0 = NaN. For evenly spaced knots XLA paths find
seg in O(1) instead (``lookup_segment``: floor(x / δ + 1 - t_0 / δ), clamped; NaN -> 0) and
gather (s, c) (``segment_lines``); kernels keep gather-free forms.

Exact activations and their derivatives are written in closed form (kernels evaluate both in
one pass in the backward):

    gelu      x Φ(x)                          d = Φ(x) + x φ(x)
    gelu_tanh x/2 (1 + tanh(u)), u = √(2/π)(x + 0.044715 x³)
                                              d = ½(1 + tanh u) + ½ x (1 - tanh² u) u'
    silu      x σ(x)                          d = σ(x) (1 + x (1 - σ(x)))
    relu      max(x, 0)                       d = [x > 0]
    tanh, sigmoid, identity
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

EXACT_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "tanh", "sigmoid", "identity")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def exact_activation(name: str, x: jax.Array) -> jax.Array:
  """Exact activation ``name`` of ``x`` (computed in x's dtype; pass float32)."""
  if name == "gelu":
    return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT_2))
  if name == "gelu_tanh":
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
  if name == "silu":
    return x * jax.nn.sigmoid(x)
  if name == "relu":
    return jnp.maximum(x, 0.0)
  if name == "tanh":
    return jnp.tanh(x)
  if name == "sigmoid":
    return jax.nn.sigmoid(x)
  if name == "identity":
    return x
  raise ValueError(f"activation must be one of {EXACT_ACTIVATIONS}, got {name!r}")


def exact_activation_and_derivative(name: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(act(x), act'(x)) in closed form, sharing the transcendental work between the two."""
  if name == "gelu":
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _INV_SQRT_2))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
    return x * cdf, cdf + x * pdf
  if name == "gelu_tanh":
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    t = jnp.tanh(u)
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
  if name == "silu":
    s = jax.nn.sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s))
  if name == "relu":
    return jnp.maximum(x, 0.0), (x > 0).astype(x.dtype)
  if name == "tanh":
    t = jnp.tanh(x)
    return t, 1.0 - t * t
  if name == "sigmoid":
    s = jax.nn.sigmoid(x)
    return s, s * (1.0 - s)
  if name == "identity":
    return x, jnp.ones_like(x)
  raise ValueError(f"activation must be one of {EXACT_ACTIVATIONS}, got {name!r}")


def pwl_select(x: jax.Array, knots, slopes, intercepts) -> tuple[jax.Array, jax.Array]:
  """Per-element segment (slope, intercept) of a PWL; ``knots`` has K entries, the others K+1.

  ``knots``/``slopes``/``intercepts`` may be arrays or Python sequences of scalars (kernels pass
  scalars read from SMEM). K compares and 2K selects per element; no gather.
  """
  slope = jnp.full_like(x, slopes[0])
  intercept = jnp.full_like(x, intercepts[0])
  for k in range(len(knots)):
    above = x >= knots[k]
    slope = jnp.where(above, slopes[k + 1], slope)
    intercept = jnp.where(above, intercepts[k + 1], intercept)
  return slope, intercept


def segment_bands(x: jax.Array, thresholds) -> list[jax.Array]:
  """The K+1 masks t_{j-1} <= x < t_j (t_{-1} = -inf, t_K = +inf) for K >= 1 sorted thresholds
  (an array or scalars; a PiecewiseLinear has at least 2 knots); NaN x is in band 0 only."""
  at_or_above = [x >= t for t in thresholds]
  return ([~at_or_above[0]] + [lower & ~upper for lower, upper in zip(at_or_above, at_or_above[1:])]
          + [at_or_above[-1]])


def pwl_segment_sums(x: jax.Array, g: jax.Array, knots,
                     evenly_spaced: bool = False) -> tuple[jax.Array, jax.Array]:
  """Gradients of sum(g * pwl(x)) w.r.t. the per-segment slopes and intercepts.

  d/ds_j = Σ_{seg(x)=j} g·x,   d/dc_j = Σ_{seg(x)=j} g     (j = 0..K), each of shape [K+1].

  An empty segment sums only zeros, so its gradient is exactly 0 (Adam would turn a rounding
  residue into full-size steps of an unused segment), and no sum is a difference of two others.
  NaN x lands in segment 0, which is NaN. x and g pass an optimization barrier first, so XLA
  materialises them once; without it the H200's training step was 1.5x slower (likely XLA
  recomputing their producers inside the 2(K+1)-output reduction fusion; SmolLM2's FFN at M =
  4096, benchmarks/results/pwl-grads-2026-12-01-passes.json: 0.45 vs 0.69 ms).
  On CPU each element's segment index and a scatter-add (``segment_sums_by_index``), elsewhere
  one reduction per band (``segment_sums_by_bands``, measured on the H200; the scatter was not:
  K+1 bins would make a GPU's atomics contend). CPU (2 cores), 2048 x 1536: PWL-16 157 -> 22 ms,
  uniform PWL-64 629 -> 24 ms.
  """
  x, g = jax.lax.optimization_barrier((x, g))
  knots = jnp.asarray(knots, x.dtype)
  return jax.lax.platform_dependent(
      x, g, cpu=lambda x, g: segment_sums_by_index(x, g, knots, evenly_spaced),
      default=lambda x, g: segment_sums_by_bands(x, g, knots))


def segment_sums_by_bands(x: jax.Array, g: jax.Array, knots) -> tuple[jax.Array, jax.Array]:
  """``pwl_segment_sums`` as one masked reduction per segment band t_{j-1} <= x < t_j (NaN x
  compares false everywhere: band 0). O(K) per element, no scatter."""
  bands = segment_bands(x, knots)
  per_segment = lambda v: jnp.stack([jnp.sum(jnp.where(band, v, 0.0)) for band in bands])
  return per_segment(g * x), per_segment(g)


def segment_sums_by_index(x: jax.Array, g: jax.Array, knots,
                          evenly_spaced: bool) -> tuple[jax.Array, jax.Array]:
  """``pwl_segment_sums`` by each element's segment (``segment_index``): a scatter-add into K+1
  bins per row of x (last axis), then a sum over rows (an empty bin stays exactly 0). Per row, so
  no bin's sequential f32 sum runs longer than a row: one scatter into K+1 bins over 2048 x 1536
  was 1.6e-5 off the float64 sums (the bands 1.2e-7), these 1e-7, at the same speed."""
  num_segments = knots.shape[0] + 1
  # a scalar x (e.g. under vmap) or an empty one is a single row
  rows = x.reshape(-1, x.shape[-1]) if x.ndim and x.shape[-1] else x.reshape(1, -1)
  bins = (segment_index(rows, knots, evenly_spaced)
          + num_segments * jnp.arange(rows.shape[0], dtype=jnp.int32)[:, None]).ravel()
  per_segment = lambda v: jax.ops.segment_sum(
      v.ravel(), bins, num_segments=rows.shape[0] * num_segments).reshape(-1, num_segments).sum(0)
  return per_segment(g * x), per_segment(g)


def segment_index(x: jax.Array, knots: jax.Array, evenly_spaced: bool) -> jax.Array:
  """seg(x) (t_{j-1} <= x < t_j: a knot starts its segment; NaN: 0), int32. Evenly spaced knots
  by ``lookup_segment`` (O(1)); otherwise the number of knots at or below x, by K fused compares
  up to 32 knots, by binary search beyond (CPU, 2048 x 1536, 65 knots: 271 vs 92 ms; 9 or 17
  knots: the compares 19-26 ms, the search 64-69)."""
  if evenly_spaced:
    return lookup_segment(x, *lookup_header(knots), knots.shape[0])
  if knots.shape[0] <= 32:
    return jnp.sum(x[..., None] >= knots, axis=-1, dtype=jnp.int32)
  return jnp.where(jnp.isnan(x), 0, jnp.searchsorted(knots, x, side="right")).astype(jnp.int32)


def lookup_header(knots: jax.Array) -> jax.Array:
  """[1 / δ, 1 - t_0 / δ] (f32) of evenly spaced knots, δ = (t_{K-1} - t_0) / (K - 1): what
  ``lookup_segment`` and the kernels' lookup tables take (traceable; callers check the
  spacing)."""
  knots = jnp.asarray(knots, jnp.float32)
  delta = (knots[-1] - knots[0]) / (knots.shape[0] - 1)
  return jnp.stack([1 / delta, 1 - knots[0] / delta])


def lookup_segment(x: jax.Array, inverse_spacing, offset, num_knots: int) -> jax.Array:
  """seg(x) of evenly spaced knots t_k = t_0 + k δ in O(1): min(floor(x / δ + 1 - t_0 / δ), K)
  from ``inverse_spacing`` = 1 / δ and ``offset`` = 1 - t_0 / δ, 0 below t_0 and for NaN; int32.
  The rule of the GPU kernels' table lookup (``pallas_kernels.gpu.pwl_lookup``)."""
  position = jnp.floor(x * inverse_spacing + offset)
  return jnp.where(position > 0, jnp.minimum(position, num_knots), 0).astype(jnp.int32)


def segment_lines(x: jax.Array, knots, slopes, intercepts, evenly_spaced: bool):
  """(s[seg(x)], c[seg(x)]) for f32 x: ``pwl_select``'s K compares, or for evenly spaced knots
  ``lookup_segment`` and two gathers from the [K+1] tables (XLA paths only: no gathers in
  kernels)."""
  if not evenly_spaced:
    return pwl_select(x, knots, slopes, intercepts)
  segment = segment_index(x, knots, evenly_spaced=True)
  # the tables once, not their arithmetic inside the gathers' loop (CPU, d/dx of a uniform PWL-64
  # on 2048 x 1536: 8.8 -> 1.7 ms; the K compares 5.8)
  slopes, intercepts = jax.lax.optimization_barrier((slopes, intercepts))
  return jnp.take(slopes, segment), jnp.take(intercepts, segment)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def pwl_apply(x: jax.Array, knots: jax.Array, slopes: jax.Array, intercepts: jax.Array,
              evenly_spaced: bool = False):
  """s[seg(x)] * x + c[seg(x)] in float32, returned in x's dtype. knots [K], slopes/intercepts
  [K+1]; ``evenly_spaced``: the knots are t_0 + k δ, so seg(x) takes O(1) (``lookup_segment``)
  instead of K compares."""
  slope, intercept = segment_lines(x.astype(jnp.float32), knots, slopes, intercepts,
                                    evenly_spaced)
  return (slope * x.astype(jnp.float32) + intercept).astype(x.dtype)


def _pwl_apply_fwd(x, knots, slopes, intercepts, evenly_spaced):
  return (pwl_apply(x, knots, slopes, intercepts, evenly_spaced),
          (x, knots, slopes, intercepts))


def _pwl_apply_bwd(evenly_spaced, residuals, g):
  x, knots, slopes, intercepts = residuals
  x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
  slope, _ = segment_lines(x32, knots, slopes, intercepts, evenly_spaced)
  d_slopes, d_intercepts = pwl_segment_sums(x32, g32, knots, evenly_spaced)
  return ((g32 * slope).astype(x.dtype), jnp.zeros_like(knots), d_slopes.astype(slopes.dtype),
          d_intercepts.astype(intercepts.dtype))


pwl_apply.defvjp(_pwl_apply_fwd, _pwl_apply_bwd)



SPACING_TOLERANCE = 1e-4  # of δ: how far a knot may sit from the even grid and count as on it


def evenly_spaced(knots) -> bool:
  """Whether ``knots`` are concrete (not traced), at least two, and each within
  ``SPACING_TOLERANCE`` δ of t_0 + k δ. (A knot that far off moves a PWL evaluated on the grid
  by at most |Δs_k| SPACING_TOLERANCE δ next to it.)"""
  if knots is None or isinstance(knots, jax.core.Tracer) or knots.shape[0] < 2:
    return False
  knots = np.asarray(knots, np.float64)
  delta = (knots[-1] - knots[0]) / (knots.shape[0] - 1)
  grid = knots[0] + delta * np.arange(knots.shape[0])
  return bool(delta > 0 and np.max(np.abs(knots - grid)) <= SPACING_TOLERANCE * delta)


def even_grid(first: jax.Array, last: jax.Array, count: int) -> jax.Array:
  """t_k = t_0 (1 - k / (K - 1)) + t_{K-1} k / (K - 1), k < K = ``count`` (ends exact), f32."""
  weight = jnp.arange(count, dtype=jnp.float32) / (count - 1)
  return first * (1 - weight) + last * weight


@dataclasses.dataclass(frozen=True)
class Activation:
  """The activation as a kernel receives it: a static ``kind`` plus, for ``kind == "pwl"``, the
  per-segment tables (knots [K], slopes [K+1], intercepts [K+1], float32 arrays that may carry
  gradients), or, for ``kind == "callable"``, an arbitrary jnp function (XLA path only).
  ``evenly_spaced``: the knots are t_0 + k δ by construction (a static promise that holds for
  traced knots too, e.g. a layer's learnable uniform PWL), so a kernel may evaluate the PWL by
  table lookup (``pallas_kernels.gpu.pwl_lookup``). ``tables``: kernel tables by kernel kind,
  computed ahead from these arrays (``pallas_kernels.gpu.dispatch.with_kernel_tables``)."""

  kind: str
  knots: jax.Array | None = None
  slopes: jax.Array | None = None
  intercepts: jax.Array | None = None
  fn: Callable[[jax.Array], jax.Array] | None = None
  evenly_spaced: bool = False
  tables: dict[str, jax.Array] | None = None

  def __call__(self, h: jax.Array) -> jax.Array:
    """act(h) for a float32 array (the reference; PWL gradients come from the caller's VJP)."""
    if self.kind == "pwl":
      return pwl_apply(h, self.knots, self.slopes, self.intercepts, self.evenly_spaced)
    if self.kind == "callable":
      return self.fn(h)
    return exact_activation(self.kind, h)
