"""FFN gradients one hidden chunk at a time (XLA), from recomputed or saved pre-activations.

For a chunk c of hidden columns (f32 math, matmuls accumulate in f32):

    u_c = x W_up[:, c] + b_up[c]             g_c = x W_gate[:, c] + b_gate[c]     (GLU)
    (recomputed, or sliced from the forward kernel's saved pre-activations u, g [M, H])
    a_c = act(g_c) (GLU) | act(u_c) (MLP)    hidden_c = a_c * u_c (GLU) | a_c, cast to x's dtype
    dW_down[c, :] = hidden_c^T dy            dhidden_c = dy W_down[c, :]^T
    GLU: du_c = dhidden_c a_c,  da_c = dhidden_c u_c,  dg_c = da_c act'(g_c)
    MLP: du_c = da_c act'(u_c),  da_c = dhidden_c
    dW_up[:, c] = x^T du_c      dW_gate[:, c] = x^T dg_c
    db_up[c] = Σ du_c           db_gate[c] = Σ dg_c
    dx += du_c W_up[:, c]^T + dg_c W_gate[:, c]^T
    PWL: d slope_j += Σ_{seg(p)=j} da_c p,  d intercept_j += Σ_{seg(p)=j} da_c   (p = g_c or u_c)

A ``lax.fori_loop`` walks the chunks, so XLA keeps one chunk's intermediates alive at a time: the
peak extra memory is a few [M, chunk] arrays instead of XLA autodiff's [M, H] residuals.
Recomputing costs GEMM1 again (2 of a GLU's 9 training GEMM units, 1 of an MLP's 6); saving the
pre-activations (``save_preactivations``) costs, per [M, H] element kept between forward and
backward:

  * "preactivations" -- ``split_preactivation``'s (hi, lo) pairs: 4 (MLP) or 8 (GLU) bytes;
  * "segments"       -- PWL only: the activation's input p as (bf16 hi, int8 seg(p)) and a GLU's
                        u as bf16: 3 (MLP) or 5 (GLU) bytes. seg(p) is exact, so act'(p) and the
                        PWL-parameter sums see the forward's segment; ``join_segmented`` clips
                        hi into that segment (|p - joined| <= 2^-8 |p|).
  * "floor-bits"     -- bf16 only: p as (bf16 hi, uint8 low bits) (``split_floor_bits``) and a
                        GLU's u as bf16, the bytes of "segments" without the per-knot count:
                        p' <= p within 2^-14 |p|, on p's side of every knot of 15 significant
                        bits (the GPU op rounds a PWL's knots so, ``snap_knots``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.activation import (Activation, exact_activation_and_derivative,
                                       pwl_segment_sums, segment_lines)


def chunk_columns(rows: int, hidden: int, budget_elements: int) -> int:
  """Hidden columns per chunk: H split into n = ⌈M·H / budget⌉ near-equal chunks, each rounded up
  to a multiple of 128 (so the zero padding of H to n chunks stays under 128 columns a chunk)."""
  chunks = -(-rows * hidden // budget_elements)
  columns = -(-hidden // max(chunks, 1))
  return min(-(-columns // 128) * 128, hidden)


def split_preactivation(p: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """The saved form of an f32 pre-activation p: (hi, lo), hi = p rounded to ``dtype``,
  lo = p - hi rounded to ``dtype``; hi + lo keeps ~2m + 2 of f32's mantissa bits (bf16: |error|
  <= 2^-17 |p|). One bf16 alone moves PWL inputs across knots and cost the PWL-parameter
  gradients 5-8%; an int8 correction (2^-15) still 0.7-1.3% (benchmarks/NOTES.md). Plain jnp:
  also the kernel's epilogue encoder (``fused_ffn_sm90.gemm1_activation``), on its registers."""
  hi = p.astype(dtype)
  return hi, (p - hi.astype(jnp.float32)).astype(dtype)


def join_preactivation(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """f32 pre-activation from ``split_preactivation``'s parts: hi + lo where hi is finite, else hi
  (lo = p - hi is then NaN or infinite, and hi alone is the value). Plain jnp without
  ``isfinite`` (Mosaic GPU lacks it): also the decoder of ``dgrad_sm90``'s epilogue."""
  high, low = hi.astype(jnp.float32), lo.astype(jnp.float32)
  return jnp.where(jnp.abs(high) < jnp.inf, high + low, high)


def segment_index(p: jax.Array, knots, num_knots: int) -> jax.Array:
  """seg(p) = #{k : p >= t_k} as int8 (``pwl_select``'s convention: a point on a knot takes the
  segment above; NaN -> 0). ``knots``: K scalars by index, an array in XLA or the SMEM hinge
  table in a kernel's epilogue (its first K entries are the knots)."""
  count = jnp.zeros_like(p)
  for k in range(num_knots):
    count = count + jnp.where(p >= knots[k], 1.0, 0.0)
  return count.astype(jnp.int8)


def join_segmented(hi: jax.Array, seg: jax.Array, knots: jax.Array) -> jax.Array:
  """f32 p from (hi, seg(p)): hi clipped into segment seg, [t_{seg-1}, t_seg) (a rounding that
  crossed a knot is undone to the knot's side the forward saw). NaN and infinities survive."""
  f32 = jnp.float32
  knots = knots.astype(f32)
  lower = jnp.concatenate([jnp.full((1,), -jnp.inf, f32), knots])
  upper = jnp.concatenate([jnp.nextafter(knots, jnp.full_like(knots, -jnp.inf)),
                           jnp.full((1,), jnp.inf, f32)])
  index = seg.astype(jnp.int32)
  return jnp.clip(hi.astype(f32), lower[index], upper[index])


# Floor bits: p' = p rounded toward -inf onto the grid of f32 numbers whose 9 low bits are zero
# (15 significant bits for normal numbers, spacing 2^-140 among subnormals), split into its high
# 16 bits (exactly a bf16) and the next 7 (a uint8). A knot t on that grid has t <= p' iff
# t <= p, so segments and act' are exact without the per-knot count. Bit operations only: no
# float rounding, so flush-to-zero arithmetic cannot move p', and the decoder is a shift and an
# or. The rounding keeps infinities and quiet NaNs (every NaN arithmetic makes) - a signalling
# NaN whose payload lies in the low 16 bits alone would become an infinity.
_LOW_MASK = (1 << 9) - 1


def _floor_to_grid(p: jax.Array) -> jax.Array:
  """The int32 bits of p rounded toward -inf onto the 9-low-bits-zero grid: truncation moves a
  negative p up, so an inexact negative p takes the grid step below (adding to the bits of a
  negative float grows its magnitude; -max rounds to -inf). The sign test is on the bits (a
  float compare may flush subnormals): as int32, -0 ... -inf are INT_MIN ... -2^23, negative NaNs
  above that (kept)."""
  bits = lax.bitcast_convert_type(p.astype(jnp.float32), jnp.int32)
  kept = bits & ~_LOW_MASK
  return kept + jnp.where((bits <= -(1 << 23)) & (kept != bits), _LOW_MASK + 1, 0)


def split_floor_bits(p: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """(hi, lo) of ``_floor_to_grid(p)``: hi its high 16 bits as bf16, lo its next 7 as uint8.
  Plain jnp without floor or shifts of unsigned types: also the kernel's epilogue encoder."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"residuals='floor-bits': expected bfloat16 inputs, got {jnp.dtype(dtype)}")
  floored = _floor_to_grid(p)
  hi = lax.bitcast_convert_type(floored & ~0xFFFF, jnp.float32).astype(jnp.bfloat16)
  lo = lax.shift_right_logical(floored, 9) & 0x7F
  return hi, lo.astype(jnp.uint8)


def join_floor_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """p' from ``split_floor_bits``' parts: the bits of hi, then lo's 7 bits below them."""
  high = lax.bitcast_convert_type(hi.astype(jnp.float32), jnp.int32)
  return lax.bitcast_convert_type(high | (lo.astype(jnp.int32) << 9), jnp.float32)


def snap_knots(knots: jax.Array) -> jax.Array:
  """Knots rounded to the floor-bits grid (15 significant bits; the nearest point, ties away
  from zero): a PWL moves by at most |Δslope| 2^-15 |t|."""
  bits = lax.bitcast_convert_type(knots.astype(jnp.float32), jnp.int32)
  return lax.bitcast_convert_type((bits + (_LOW_MASK + 1) // 2) & ~_LOW_MASK, jnp.float32)


def save_preactivations(pre: list, dtype, residuals: str, knots=None, num_knots: int = 0) -> tuple:
  """The saved parts of [p, u] (GLU: p = g) or [p] (MLP), f32 pre-activations, for ``residuals``
  "preactivations" (a (hi, lo) pair each), "segments" ((hi, seg(p)) for p, (hi,) for u) or
  "floor-bits" ((hi, uint8 lo) for p, (hi,) for u); see the module docstring. Plain jnp: also the
  forward kernel's epilogue encoder."""
  if residuals == "preactivations":
    return tuple(split_preactivation(p, dtype) for p in pre)
  if residuals == "floor-bits":
    first = split_floor_bits(pre[0], dtype)
  else:
    first = (pre[0].astype(dtype), segment_index(pre[0], knots, num_knots))
  return (first,) + tuple((p.astype(dtype),) for p in pre[1:])


def join_saved(parts: tuple, knots=None) -> jax.Array:
  """f32 pre-activation from one entry of ``save_preactivations``: a pair, (hi, int8 seg),
  (hi, uint8 floor bits) or hi."""
  if len(parts) == 1:
    return parts[0].astype(jnp.float32)
  if parts[1].dtype == jnp.int8:
    return join_segmented(*parts, knots)
  if parts[1].dtype == jnp.uint8:
    return join_floor_bits(*parts)
  return join_preactivation(*parts)


def xla_segment_sums(p_parts: tuple, g: jax.Array, knots) -> tuple[jax.Array, jax.Array]:
  """``pwl_segment_sums`` of p given as (f32 p,) or a ``save_preactivations`` entry, joined."""
  return pwl_segment_sums(join_saved(p_parts, knots), g, knots)


def _dot(a, b, contract, dtype, precision):
  """a . b over the ``contract`` dimension pair, no batch dimensions, accumulated in ``dtype``."""
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=dtype)


def column_gradients(x, dy, w_up, w_gate, w_down_dtype, hidden, d_up, d_gate, precision=None,
                     dx_dtype=jnp.float32) -> tuple:
  """The GEMM gradients of hidden columns c from h_c and the pre-activation cotangents d_u (, d_g):
  (dx part, dW_up[:, c], dW_down[c, :], dW_gate[:, c], Σ_rows d_u, Σ_rows d_g), with

      dx part = d_u W_up[:, c]^T (+ d_g W_gate[:, c]^T),  dW_up = x^T d_u,  dW_down = h^T dy,
      dW_gate = x^T d_g

  (the gate entries None without d_g). The sums in f32, dx in ``dx_dtype`` (f32 for a chunk's
  part), each dW in its weight's dtype (``w_down_dtype`` for W_down) straight from its GEMM: f32
  accumulation and one rounding, as an f32 product cast after (which, on the H200, XLA ran as a
  convert pass of its own: 8 us of gpt2-small's step for the two dW,
  backward-profile-2026-12-02-sixteenth-packed.md). Shared by ``ffn_backward`` (per chunk) and
  the dgrad kernel's backward (``dispatch``, all columns at once).

  A GLU's dW_up waits for dW_gate (an optimization barrier): XLA's dot merger otherwise joins the
  two x^T products into one GEMM on [d_g | d_u], which it ran as a Triton fusion. H200, SmolLM2's
  training step (2026-12-03, twenty-fourth session, backward-profile-2026-12-03-twentyfourth-dw-
  *.md): that fusion 63.4 us + 4.7 us slicing its [D, 2H] result -> two cuBLAS GEMMs 24.2 + 23.7
  us + 2 x 2.5 us split-K sums; the step 296.0 -> 280.5 us GPU-busy (llama-1B: the same kernels
  either way)."""
  f32 = jnp.float32
  dot = lambda a, b, contract, dtype=f32: _dot(a, b, contract, dtype, precision)
  if d_gate is None:
    d_w_gate = None
    dx = dot(d_up, w_up, ((1,), (1,)), dx_dtype)
  else:
    d_w_gate = dot(x, d_gate, ((0,), (0,)), w_gate.dtype)
    d_up, d_w_gate = lax.optimization_barrier((d_up, d_w_gate))
    # the two products summed in f32, then rounded
    dx = (dot(d_up, w_up, ((1,), (1,))) + dot(d_gate, w_gate, ((1,), (1,)))).astype(dx_dtype)
  return (dx, dot(x, d_up, ((0,), (0,)), w_up.dtype), dot(hidden, dy, ((0,), (0,)), w_down_dtype),
          d_w_gate, jnp.sum(d_up.astype(f32), 0),
          None if d_gate is None else jnp.sum(d_gate.astype(f32), 0))


def joint_column_gradients(x, dy, w_gate_up, w_down_dtype, hidden, d_gate_up, precision=None,
                           dx_dtype=jnp.float32) -> tuple:
  """``column_gradients`` of a GLU from d_gu = [d_g | d_u] [M, 2H] and W_gu = [W_gate | W_up]
  [D, 2H], each one array: dx = d_gu W_gu^T (one GEMM with K = 2H, in ``dx_dtype``; no f32 sum
  of two products and its rounding pass), [dW_gate | dW_up] = x^T d_gu (one GEMM, split after).
  Same tuple: (dx, dW_up, dW_down, dW_gate, Σ_rows d_u, Σ_rows d_g). H200, SmolLM2 at M = 8192
  (benchmarks/bench_glu_input_grads.py, twenty-fifth session): 155.1 -> 133.5 us of GEMMs with
  W_gu concatenated per call; llama-1B 1809.5 -> 1846.7 (XLA's kernels for K = 2H lose there)."""
  f32, half = jnp.float32, d_gate_up.shape[1] // 2
  dot = lambda a, b, contract, dtype: _dot(a, b, contract, dtype, precision)
  dx = dot(d_gate_up, w_gate_up, ((1,), (1,)), dx_dtype)
  d_w = dot(x, d_gate_up, ((0,), (0,)), w_gate_up.dtype)
  sums = jnp.sum(d_gate_up.astype(f32), 0)
  return (dx, d_w[:, half:], dot(hidden, dy, ((0,), (0,)), w_down_dtype), d_w[:, :half],
          sums[half:], sums[:half])


def _activation_and_derivative(activation: Activation, pre: jax.Array):
  if activation.kind == "pwl":
    slope, intercept = segment_lines(pre, activation.knots, activation.slopes,
                                     activation.intercepts, activation.evenly_spaced)
    return slope * pre + intercept, slope
  return exact_activation_and_derivative(activation.kind, pre)


def _pad_columns(array, columns: int, axis: int):
  if array is None or array.shape[axis] == columns:
    return array
  pad = [(0, 0)] * array.ndim
  pad[axis] = (0, columns - array.shape[axis])
  return jnp.pad(array, pad)


def ffn_backward(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation: Activation, dy, *,
                 chunk: int, precision=None, preactivations: tuple | None = None,
                 segment_sums: Callable | None = None, d_hidden_dtype=None):
  """Cotangents (dx, dw_up, dw_down, dw_gate, db_up, db_gate, db_down, d_slopes, d_intercepts).

  x [M, D], dy [M, D_out]; entries for absent arguments are None (d_slopes / d_intercepts are None
  unless the activation is a PWL). Zero-padded hidden columns (H rounded up to ``chunk``) carry
  zero weights, so they add nothing to dx or to the PWL gradients and are sliced off.
  ``preactivations``: the forward's saved (g, u) (GLU) or (u,) (MLP), biases included, in
  ``save_preactivations``' form; given, GEMM1 is not recomputed.
  ``segment_sums(p_parts, da, knots)`` computes a chunk's PWL gradients from the activation's
  input p, given as (f32 p,) or as the saved parts (``xla_segment_sums`` by default here;
  ``dispatch.SEGMENT_SUMS`` lists the kernel forms).
  ``d_hidden_dtype``: the dtype d_hidden = dy W_down^T is rounded to (f32 accumulation); None
  keeps f32.
  """
  f32 = jnp.float32
  segment_sums = segment_sums or xla_segment_sums
  hidden = w_up.shape[1]
  num_chunks = -(-hidden // chunk)
  padded = num_chunks * chunk
  glu = w_gate is not None
  w_up_p, w_gate_p = _pad_columns(w_up, padded, 1), _pad_columns(w_gate, padded, 1)
  w_down_p = _pad_columns(w_down, padded, 0)
  b_up_p, b_gate_p = _pad_columns(b_up, padded, 0), _pad_columns(b_gate, padded, 0)
  saved = None if preactivations is None else [
      [_pad_columns(part, padded, 1) for part in parts] for parts in preactivations]
  is_pwl = activation.kind == "pwl"
  num_segments = activation.slopes.shape[0] if is_pwl else 0

  dot = lambda a, b, contract, dtype=f32: _dot(a, b, contract, dtype, precision)

  def columns(array, index, axis):
    return None if array is None else lax.dynamic_slice_in_dim(array, index * chunk, chunk, axis)

  def body(index, carry):
    dx, dw_up, dw_down, dw_gate, db_up, db_gate, d_slopes, d_intercepts = carry
    wu, wd, wg = columns(w_up_p, index, 1), columns(w_down_p, index, 0), columns(w_gate_p, index, 1)
    bu, bg = columns(b_up_p, index, 0), columns(b_gate_p, index, 0)
    if saved is None:
      up = dot(x, wu, ((1,), (0,))) + (0.0 if bu is None else bu.astype(f32))
      pre = dot(x, wg, ((1,), (0,))) + (0.0 if bg is None else bg.astype(f32)) if glu else up
    else:
      sliced = [tuple(columns(part, index, 1) for part in parts) for parts in saved]
      up = join_saved(sliced[-1], activation.knots)
      pre = join_saved(sliced[0], activation.knots) if glu else up
    act, act_prime = _activation_and_derivative(activation, pre)
    hidden_c = (act * up if glu else act).astype(x.dtype)
    d_hidden = dot(dy, wd, ((1,), (1,)), d_hidden_dtype or f32).astype(f32)
    d_act = d_hidden * up if glu else d_hidden
    d_pre = d_act * act_prime
    if is_pwl:
      seg_slopes, seg_intercepts = segment_sums((pre,) if saved is None else sliced[0], d_act,
                                                activation.knots)
      d_slopes, d_intercepts = d_slopes + seg_slopes, d_intercepts + seg_intercepts
    d_up = (d_hidden * act if glu else d_pre).astype(x.dtype)
    d_gate = d_pre.astype(x.dtype) if glu else None
    dx_c, dw_up_c, dw_down_c, dw_gate_c, db_up_c, db_gate_c = column_gradients(
        x, dy, wu, wg, w_down.dtype, hidden_c, d_up, d_gate, precision)
    put = lambda total, part, axis: lax.dynamic_update_slice_in_dim(
        total, part.astype(total.dtype), index * chunk, axis)
    dx, dw_up, dw_down = dx + dx_c, put(dw_up, dw_up_c, 1), put(dw_down, dw_down_c, 0)
    if b_up is not None:
      db_up = put(db_up, db_up_c, 0)
    if glu:
      dw_gate = put(dw_gate, dw_gate_c, 1)
      if b_gate is not None:
        db_gate = put(db_gate, db_gate_c, 0)
    return dx, dw_up, dw_down, dw_gate, db_up, db_gate, d_slopes, d_intercepts

  zeros = lambda like, shape=None: None if like is None else jnp.zeros(shape or like.shape, f32)
  init = (jnp.zeros(x.shape, f32), jnp.zeros(w_up_p.shape, w_up.dtype),
          jnp.zeros(w_down_p.shape, w_down.dtype),
          None if w_gate is None else jnp.zeros(w_gate_p.shape, w_gate.dtype),
          zeros(b_up, (padded,)), zeros(b_gate, (padded,)),
          jnp.zeros((num_segments,), f32), jnp.zeros((num_segments,), f32))
  dx, dw_up, dw_down, dw_gate, db_up, db_gate, d_slopes, d_intercepts = lax.fori_loop(
      0, num_chunks, body, init)
  cast = lambda grad, like: None if like is None else grad.astype(like.dtype)
  db_down = None if b_down is None else jnp.sum(dy.astype(f32), 0).astype(b_down.dtype)
  return (dx.astype(x.dtype), dw_up[:, :hidden], dw_down[:hidden],
          None if w_gate is None else dw_gate[:, :hidden],
          cast(None if b_up is None else db_up[:hidden], b_up),
          cast(None if b_gate is None else db_gate[:hidden], b_gate), db_down,
          d_slopes if is_pwl else None, d_intercepts if is_pwl else None)
