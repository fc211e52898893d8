"""The folded FFN op: ``folded_ffn(x, weights)`` with a dense and a decode (gather) path.

With F folded neurons (line l_i(z) = a_i z + c_i on their hot range) and K kept neurons:

    y = x W_fold + b_fold + kept_ffn(x) + Σ_{i ∈ S(x)} r_i(x) W_down[i]

    MLP: r_i = act(z_i) − l_i(z_i),        z_i = x W_in[i] + b_in,i
    GLU: r_i = (act(z_i) − c_i) · u_i,     u_i = x W_up[i] + b_up,i   (a_i = 0)

S(x) is the set of folded neurons flagged as outliers for token x (``outliers``):
  "predicted"  the b-bit predictor's flags (the deployable mode)
  "oracle"     z_i outside [lo_i, hi_i], computed exactly (the predictor's upper bound)
  "ignored"    none: the fold alone
  "all"        every folded neuron: y equals the exact FFN up to rounding when W_fold, b_fold
               are the lines' fold (``FoldSpec(refit=False)``); a refitted fold keeps its
               least-squares deviation from it
  "predicted_or_oracle"  both (no missed outliers; measures what the predictor's misses cost)

The predictor flags neuron i when ẑ_i < lo_i + κ σ_i or ẑ_i > hi_i − κ σ_i (κ = ``margin``,
σ_i = the predictor's error std on the calibration tokens; ``flashffn_jax.fold.predictor``).

Implementations (both compute the same function):
  "dense"   r for every folded neuron, masked by the flags (prefill, training, CPU reference).
  "gather"  decode (M ≤ ``DECODE_MAX_TOKENS``): the union of the M tokens' flags picks at most
            ``capacity`` neurons and only their rows of W_in (W_up) and W_down are read. With
            ``selection="priority"`` (top-k) they are ranked by ‖W_down[i]‖ · how far ẑ_i is
            outside the range; with "index" (a prefix sum, cheaper for large F) by neuron index.
            When the union exceeds the capacity the last-ranked flags are dropped (missed
            outliers): the only case in which "gather" differs from "dense".
By default (``implementation=None``) "gather" runs only on CPU, at M ≤ ``DECODE_MAX_TOKENS``
with a capacity of at most ``GATHER_MAX_CAPACITY`` of F; "dense" everywhere else. Measured: on
the H200 "dense" was faster than "gather" at every decode size (M = 1-64, gpt2-small / gpt2-xl /
SmolLM2 shapes; the selection and gathers cost more launches than the rows they save), and on
CPU "gather" won only at M = 1 of gpt2-small (capacity 28% of F, 1.3-2.7× faster than "dense" in
three runs) — benchmarks/results/fold-decode-*.md. TPU: not measured, "dense". On GPUs "dense"
pads a single token to 8 rows (XLA's GEMMs instead of its matrix-vector reductions: gpt2-small
M = 1 on the H200's clock 28.2 → 15.0 us; fold-decode-gpu-device-time-2026-12-01-m1-padded.md).
Matmuls accumulate in float32 and the activation runs in float32, like ``flashffn_jax.ffn``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from flashffn_jax.checks import check_positive_int
from flashffn_jax.ops import PADDED_ROWS, ffn
from pallas_kernels.activation import exact_activation

OUTLIER_MODES = ("predicted", "oracle", "ignored", "all", "predicted_or_oracle")
IMPLEMENTATIONS = ("dense", "gather")
SELECTIONS = ("priority", "index")
DECODE_MAX_TOKENS = 64
GATHER_MAX_CAPACITY = 0.5  # of F: above it the default is "dense" (module docstring)
_F32 = jnp.float32
_static = dict(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FoldedWeights:
  """Arrays of one folded FFN (F folded neurons, K kept). Row layouts [F, D] make the decode
  path's gathers contiguous. Optional biases / GLU weights are None when absent."""

  w_fold: jax.Array  # [D, D_out]
  b_fold: jax.Array  # [D_out] (includes b_down)
  w_in: jax.Array  # [F, D] activation-input rows (MLP: W_up, GLU: W_gate)
  w_down: jax.Array  # [F, D_out]
  slope: jax.Array  # [F] float32
  intercept: jax.Array  # [F] float32
  hot_lower: jax.Array  # [F] float32, the hot range
  hot_upper: jax.Array
  predictor_error: jax.Array  # [F] float32, σ_i: std of ẑ_i − z_i on the calibration tokens
  predictor: jax.Array  # [D, F] int2/int4/int8 (b bits), ẑ = (x Q) s + ½ s Σx + b_in
  predictor_scale: jax.Array  # [F] float32
  priority: jax.Array  # [F] float32, ‖W_down[i]‖ (ranks flags in the decode path)
  b_in: jax.Array | None = None  # [F]
  w_up: jax.Array | None = None  # [F, D] (GLU)
  b_up: jax.Array | None = None  # [F] (GLU)
  kept_w_in: jax.Array | None = None  # [D, K] (None when K = 0)
  kept_b_in: jax.Array | None = None
  kept_w_up: jax.Array | None = None  # [D, K] (GLU)
  kept_b_up: jax.Array | None = None
  kept_w_down: jax.Array | None = None  # [K, D_out]
  activation: str = dataclasses.field(default="gelu", **_static)
  margin: float = dataclasses.field(default=1.0, **_static)  # κ
  union_fractions: tuple = dataclasses.field(default=(), **_static)  # ((M, fraction), ...)

  @property
  def glu(self) -> bool:
    return self.w_up is not None

  @property
  def num_folded(self) -> int:
    return self.w_in.shape[0]

  def capacity(self, tokens: int) -> int:
    """Neurons the decode path reads for ``tokens`` tokens: the calibration's high quantile of
    the flag union of that many tokens (next measured size up), +10%, rounded up to 8."""
    fraction = next((f for m, f in self.union_fractions if m >= tokens), 1.0)
    return min(self.num_folded, 8 * math.ceil(1.1 * fraction * self.num_folded / 8))


def _dot(a, b, transpose_b: bool = False):
  """a @ b (or a @ bᵀ) with float32 accumulation."""
  contract = ((a.ndim - 1,), (1 if transpose_b else 0,))
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=_F32)


def _add_bias(value, bias):
  return value if bias is None else value + bias.astype(_F32)


def predict(x: jax.Array, w: FoldedWeights) -> jax.Array:
  """ẑ [M, F] float32 from the b-bit predictor (``flashffn_jax.fold.predictor``)."""
  q = w.predictor.astype(x.dtype)  # small integers: exact in bf16
  row_sums = jnp.sum(x.astype(_F32), axis=-1, keepdims=True)
  z = (_dot(x, q) + 0.5 * row_sums) * w.predictor_scale
  return _add_bias(z, w.b_in)


def outlier_flags(x: jax.Array, w: FoldedWeights, outliers: str, z: jax.Array | None = None):
  """(flags [M, F] bool, violation [M, F] float32, ≥ 0 where predicted) for a mode (module
  docstring); ``z`` (exact activation inputs) is needed by the oracle modes."""
  shape = (x.shape[0], w.num_folded)
  if outliers in ("predicted", "predicted_or_oracle"):
    z_hat = predict(x, w)
    spread = w.margin * w.predictor_error
    violation = jnp.maximum(w.hot_lower + spread - z_hat, z_hat - (w.hot_upper - spread))
    flags = violation >= 0
  else:
    flags, violation = jnp.full(shape, outliers == "all"), jnp.zeros(shape, _F32)
  if outliers in ("oracle", "predicted_or_oracle"):
    flags = flags | (z < w.hot_lower) | (z > w.hot_upper)
  return flags, violation


def _residual(x, w_in, b_in, w_up, b_up, slope, intercept, activation):
  """(r [M, n] float32, z [M, n]) for the neurons whose rows are given (module docstring)."""
  z = _add_bias(_dot(x, w_in, transpose_b=True), b_in)
  r = exact_activation(activation, z) - (slope * z + intercept)
  if w_up is not None:
    r = r * _add_bias(_dot(x, w_up, transpose_b=True), b_up)
  return r, z


def _dense_correction(x, w: FoldedWeights, outliers: str):
  r, z = _residual(x, w.w_in, w.b_in, w.w_up, w.b_up, w.slope, w.intercept, w.activation)
  flags, _ = outlier_flags(x, w, outliers, z)
  return _dot(jnp.where(flags, r, 0.0).astype(x.dtype), w.w_down)


def _gather_correction(x, w: FoldedWeights, capacity: int, selection: str):
  flags, violation = outlier_flags(x, w, "predicted")
  if selection == "priority":
    score = jnp.max(jnp.where(flags, (violation + 1e-6) * w.priority, -1.0), axis=0)  # [F]
    top, index = jax.lax.top_k(score, capacity)
    valid = top > 0
  else:
    union = jnp.any(flags, axis=0)
    index = jnp.nonzero(union, size=capacity, fill_value=0)[0]
    valid = jnp.arange(capacity) < jnp.sum(union)
  rows = lambda a: None if a is None else jnp.take(a, index, axis=0)
  r, _ = _residual(x, rows(w.w_in), rows(w.b_in), rows(w.w_up), rows(w.b_up), rows(w.slope),
                   rows(w.intercept), w.activation)
  chosen = jnp.take(flags, index, axis=1) & valid
  return _dot(jnp.where(chosen, r, 0.0).astype(x.dtype), rows(w.w_down))


def folded_ffn(x: jax.Array, weights: FoldedWeights, *, outliers: str = "predicted",
               implementation: str | None = None, capacity: int | None = None,
               selection: str = "priority") -> jax.Array:
  """The folded FFN of x [..., D] -> [..., D_out] in x's dtype (see the module docstring).

  Args:
    outliers: "predicted", "oracle", "ignored" or "all".
    implementation: None (on CPU "gather" for predicted outliers at M ≤ DECODE_MAX_TOKENS with
      a capacity ≤ GATHER_MAX_CAPACITY of F; "dense" otherwise and on GPU / TPU: see the module
      docstring), "dense" or "gather".
    capacity: neurons the gather path reads (default ``weights.capacity(M)``).
    selection: how the gather path ranks flagged neurons, "priority" or "index".
  """
  if outliers not in OUTLIER_MODES:
    raise ValueError(f"outliers: expected one of {OUTLIER_MODES}, got {outliers!r}")
  if selection not in SELECTIONS:
    raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected None or one of {IMPLEMENTATIONS}, got {implementation!r}")
  if x.ndim < 1 or x.shape[-1] != weights.w_fold.shape[0]:
    raise ValueError(f"x: expected [..., {weights.w_fold.shape[0]}], got {list(x.shape)}")
  if x.dtype != weights.w_fold.dtype:
    raise ValueError(f"x: expected dtype {weights.w_fold.dtype.name} (the weights' dtype), got {x.dtype.name}")
  x2d = x.reshape(-1, x.shape[-1])
  tokens = x2d.shape[0]
  if capacity is None:
    capacity = weights.capacity(tokens)
  else:
    check_positive_int("capacity", capacity)
  capacity = min(capacity, weights.num_folded)
  if implementation is None:
    gather_pays = (jax.default_backend() == "cpu" and tokens <= DECODE_MAX_TOKENS
                   and capacity <= GATHER_MAX_CAPACITY * weights.num_folded)
    implementation = "gather" if outliers == "predicted" and gather_pays else "dense"
  if implementation == "gather" and outliers != "predicted":
    raise ValueError(f"implementation: 'gather' needs outliers='predicted', got {outliers!r}")
  if implementation == "dense" and tokens == 1 and jax.default_backend() == "gpu":
    # one row: XLA's GPU matrix-vector reductions are slower than its GEMMs on 8 rows (each row of
    # the dense path is independent, so zero rows change nothing; ``flashffn_jax.ops.xla_padded_row``)
    padded = jnp.pad(x2d, ((0, PADDED_ROWS - 1), (0, 0)))
    return folded_ffn(padded, weights, outliers=outliers, implementation="dense")[:1].reshape(
        *x.shape[:-1], weights.w_fold.shape[1])

  y = _add_bias(_dot(x2d, weights.w_fold), weights.b_fold)
  if weights.num_folded and outliers != "ignored":
    y = y + (_gather_correction(x2d, weights, capacity, selection) if implementation == "gather"
             else _dense_correction(x2d, weights, outliers))
  if weights.kept_w_down is not None:
    if weights.glu:
      kept = ffn(x2d, weights.kept_w_up, weights.kept_w_down, w_gate=weights.kept_w_in,
                 b_up=weights.kept_b_up, b_gate=weights.kept_b_in, activation=weights.activation)
    else:
      kept = ffn(x2d, weights.kept_w_in, weights.kept_w_down, b_up=weights.kept_b_in,
                 activation=weights.activation)
    y = y + kept.astype(_F32)
  return y.astype(x.dtype).reshape(*x.shape[:-1], weights.w_fold.shape[1])
