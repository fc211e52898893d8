"""A PWL with evenly spaced knots evaluated by one table lookup per element (Hopper epilogues).

For knots t_k = t_0 + k δ (k < K) the segment of h is
j = clamp(floor(h / δ + 1 - t_0 / δ), 0, K), and pwl(h) = s_j h + c_j. In PTX (``lookup``), per f32 element: one fma, one cvt (float -> u32
rounds down and saturates: negative values and NaN give segment 0, so NaN stays NaN), one min,
one mad for the address, two 4-byte shared loads (s_j, then c_j at a constant offset) and one fma
- 7 instructions for any number of knots, where the f16 hinges (``packed_pwl``) take ~17 per
element at 17 knots and grow with K. A point rounded into a neighbouring segment is within f32
rounding of the knot between them, where the two lines agree (the PWL is continuous).

Slopes and intercepts sit in separate rows of the table so that a warp's 32 loads conflict only
for segments 32 apart; an 8-byte (s_j, c_j) load, measured first, conflicts in half-warps for
segments 16 apart (H200, gpt2-small's forward kernel: 64.9 us at 65 segments, 60.4 at 17,
against 71.7 for PWL-16's hinges and 56.3 with no activation; benchmarks/NOTES.md).

The dispatcher takes this form where a call's knots are concrete and evenly spaced
(``evenly_spaced``; e.g. ``fit(..., method="uniform")``), and keeps the hinges for traced
(learnable) knots.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic.gpu import utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, vector

from pallas_kernels.activation import Activation
from pallas_kernels.gpu import packed_pwl
from pallas_kernels.gpu.hinge_table import TABLE_ALIGN

HEADER = 2  # table entries before the slopes: 1 / δ and 1 - t_0 / δ
SPACING_TOLERANCE = 1e-4  # of δ: how far a knot may sit from the even grid


def evenly_spaced(knots) -> bool:
  """Whether ``knots`` are concrete (not traced), at least two, and each within
  ``SPACING_TOLERANCE`` δ of t_0 + k δ. A knot that far off moves the PWL by at most
  |Δs_k| SPACING_TOLERANCE δ next to it under the lookup."""
  if knots is None or isinstance(knots, jax.core.Tracer) or knots.shape[0] < 2:
    return False
  knots = np.asarray(knots, np.float64)
  delta = (knots[-1] - knots[0]) / (knots.shape[0] - 1)
  grid = knots[0] + delta * np.arange(knots.shape[0])
  return bool(delta > 0 and np.max(np.abs(knots - grid)) <= SPACING_TOLERANCE * delta)


def lookup_table(activation: Activation) -> jax.Array:
  """[1 / δ, 1 - t_0 / δ, s_0, .., s_K, c_0, .., c_K] in f32, padded to ``TABLE_ALIGN``, with
  δ = (t_{K-1} - t_0) / (K - 1) (traceable; the caller checks ``evenly_spaced``)."""
  knots = jnp.asarray(activation.knots, jnp.float32)
  delta = (knots[-1] - knots[0]) / (knots.shape[0] - 1)
  table = jnp.concatenate([jnp.stack([1 / delta, 1 - knots[0] / delta]),
                           jnp.asarray(activation.slopes, jnp.float32),
                           jnp.asarray(activation.intercepts, jnp.float32)])
  return jnp.pad(table, (0, -table.shape[0] % TABLE_ALIGN))


def lookup_in_jnp(h: jax.Array, table: jax.Array, num_knots: int) -> jax.Array:
  """The lookup in jnp on f32 ``h`` (interpret mode; what the PTX computes)."""
  position = jnp.floor(h * table[0] + table[1])
  segment = jnp.where(position > 0, jnp.minimum(position, num_knots), 0).astype(jnp.int32)
  lines = table[HEADER:HEADER + 2 * (num_knots + 1)].reshape(2, -1)
  return lines[0, segment] * h + lines[1, segment]


def _lookup_ptx(num_knots: int) -> str:
  """pwl($1) from $2 = 1 / δ, $3 = 1 - t_0 / δ, $4 = shared address of s_0, $5 = K."""
  return f"""{{
.reg .f32 u, s, c;
.reg .u32 j;
fma.rn.f32 u, $1, $2, $3;
cvt.rmi.u32.f32 j, u;
min.u32 j, j, $5;
mad.lo.u32 j, j, 4, $4;
ld.shared.f32 s, [j];
ld.shared.f32 c, [j+{4 * (num_knots + 1)}];
fma.rn.f32 $0, s, $1, c;
}}"""


def lookup(h: jax.Array, table_ref, num_knots: int) -> jax.Array:
  """pwl(h) for an f32 WGMMA-layout tile ``h`` in a kernel, ``table_ref`` holding
  ``lookup_table`` in SMEM: ``_lookup_ptx`` per element, or ``lookup_in_jnp`` in interpret mode
  (no inline PTX there)."""
  if packed_pwl.interpreting():
    return lookup_in_jnp(h, table_ref[...], num_knots)
  tile = plgpu.ShapeDtypeStruct(h.shape, jnp.float32, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=tile)
  def run(_, x, table):
    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    entry = lambda i: memref.load(table, [arith.constant(ir.IndexType.get(), i)])
    scale, offset = entry(0), entry(1)
    slopes = arith.addi(llvm.ptrtoint(i32, utils.memref_ptr(table)),
                        arith.constant(i32, 4 * HEADER))
    last = arith.constant(i32, num_knots)
    line = lambda v: llvm.inline_asm(f32, [v, scale, offset, slopes, last],
                                     _lookup_ptx(num_knots), "=f,f,f,f,r,r")

    def per_element(register):
      if register.type == f32:
        return line(register)
      out = llvm.mlir_undef(register.type)
      for i in range(ir.VectorType(register.type).shape[0]):
        position = ir.DenseI64ArrayAttr.get([i])
        value = vector.extract(register, dynamic_position=[], static_position=position)
        out = vector.insert(line(value), out, dynamic_position=[], static_position=position)
      return out

    return x._pointwise(per_element)

  return run(h, table_ref)
