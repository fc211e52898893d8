"""Experiment: a PWL with uniform knots evaluated by one table lookup per element, in place of
the forward epilogue's hinges (``run_epilogue_kernel.py --activation uniform-lookup``).

For knots t_k = t_0 + k δ (k < K) the segment of h is j = clamp(floor(h / δ + 1 - t_0 / δ), 0, K),
and pwl(h) = s_j h + c_j. Per f32 element that is one fma, one cvt (float -> u32 rounds down and
saturates: negative values and NaN give 0), one min, one mad for the address, two 4-byte shared
loads (s_j, then c_j at a constant offset) and one fma: 7 instructions, against 15 packed max + 16
packed fma per pair of elements (plus 3 conversions) for PWL-16's hinges, and the same 7 for any
number of knots. Slopes and intercepts sit in separate rows so that a warp's 32 loads conflict
only for segments 32 apart (an 8-byte (s_j, c_j) load, measured first: 64.9 us at gpt2-small
with 65 segments, 60.4 with 17; its half-warps conflict for segments 16 apart).
A point rounded into a neighbouring segment is within f32 rounding of the knot between them,
where the two lines agree (the PWL is continuous). NaN takes segment 0: s_0 NaN + c_0 = NaN.
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
from pallas_kernels.gpu.hinge_table import TABLE_ALIGN

LINES = 2  # table entries before the lines: 1 / δ and 1 - t_0 / δ


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


def lookup_table(activation: Activation) -> jax.Array:
  """[1 / δ, 1 - t_0 / δ, s_0, .., s_K, c_0, .., c_K] (padded to ``TABLE_ALIGN``) for a PWL
  whose K knots are evenly spaced; ValueError otherwise."""
  knots = np.asarray(activation.knots, np.float64)
  gaps = np.diff(knots)
  if not np.allclose(gaps, gaps[0], rtol=1e-4):
    raise ValueError(f"activation: expected evenly spaced knots, got gaps {gaps.tolist()}")
  delta = (knots[-1] - knots[0]) / (knots.shape[0] - 1)
  table = np.concatenate([[1 / delta, 1 - knots[0] / delta], np.asarray(activation.slopes),
                          np.asarray(activation.intercepts)])
  return jnp.asarray(np.pad(table, (0, -table.shape[0] % TABLE_ALIGN)), jnp.float32)


def lookup_in_jnp(h: jax.Array, table: jax.Array, num_knots: int) -> jax.Array:
  """The kernel's lookup in jnp (f32): what ``lookup_table`` means."""
  position = jnp.floor(h * table[0] + table[1])
  segment = jnp.where(position > 0, jnp.minimum(position, num_knots), 0).astype(jnp.int32)
  lines = table[LINES:LINES + 2 * (num_knots + 1)].reshape(2, -1)
  return lines[0, segment] * h + lines[1, segment]


def uniform_lookup(kind: str, h: jax.Array, table_ref, num_knots: int, *_) -> jax.Array:
  """``fused_ffn_sm90.apply_activation``'s place in the epilogue: pwl(h) for an f32 WGMMA-layout
  tile by ``_lookup_ptx`` per element, reading ``lookup_table`` from SMEM."""
  del kind
  tile = plgpu.ShapeDtypeStruct(h.shape, jnp.float32, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=tile)
  def run(_, x, table):
    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    entry = lambda i: memref.load(table, [arith.constant(ir.IndexType.get(), i)])
    scale, offset = entry(0), entry(1)
    lines = arith.addi(llvm.ptrtoint(i32, utils.memref_ptr(table)),
                       arith.constant(i32, 4 * LINES))
    last = arith.constant(i32, num_knots)
    line = lambda v: llvm.inline_asm(f32, [v, scale, offset, lines, last],
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
