"""A PWL with evenly spaced knots evaluated by one table lookup per element (Hopper epilogues).

For knots t_k = t_0 + k δ (k < K) the segment of h is
j = clamp(floor(h / δ + 1 - t_0 / δ), 0, K), pwl(h) = s_j h + c_j and pwl'(h) = s_j. In PTX
(``lookup``, ``value_and_slope``), per f32 element: one fma, one cvt (float -> u32 rounds down
and saturates: negative values and NaN give segment 0, so NaN stays NaN), one min, one mad for
the address, two 4-byte shared loads (s_j, then c_j at a constant offset) and one fma - 7
instructions for any number of knots, where the f16 hinges (``packed_pwl``) take ~17 per element
at 17 knots and grow with K. A point rounded into a neighbouring segment is within f32 rounding
of the knot between them, where the two lines agree (the PWL is continuous).

Slopes and intercepts sit in separate rows of the table so that a warp's 32 loads conflict only
for segments 32 apart; an 8-byte (s_j, c_j) load, measured first, conflicts in half-warps for
segments 16 apart (H200, gpt2-small's forward kernel: 64.9 us at 65 segments, 60.4 at 17,
against 71.7 for PWL-16's hinges and 56.3 with no activation; benchmarks/NOTES.md).

An MLP's training forward may also write each element's segment j (``value_and_segment``, one mov
more), from which the dgrad kernel takes the slope s_j alone (``slope_of_segment``: one mad and
one shared load per element; ``dispatch.Plan.lookup_residuals``).

The dispatcher takes this form (forward, and the dgrad kernel's ``value_and_slope``) where a PWL's
knots are evenly spaced: by construction (``Activation.evenly_spaced``: ``fit(...,
method="uniform")``, a layer's uniform parametrisation, traced or not) or found so in concrete
knots (``pallas_kernels.activation.evenly_spaced``); other PWLs keep the hinges.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, vector

from pallas_kernels.activation import Activation, lookup_header, lookup_segment
from pallas_kernels.gpu import packed_pwl
from pallas_kernels.gpu.hinge_table import TABLE_ALIGN

HEADER = 2  # table entries before the slopes: 1 / δ and 1 - t_0 / δ


def lookup_table(activation: Activation) -> jax.Array:
  """[1 / δ, 1 - t_0 / δ, s_0, .., s_K, c_0, .., c_K] in f32, padded to ``TABLE_ALIGN``, with
  δ = (t_{K-1} - t_0) / (K - 1) (traceable; the dispatcher checks the spacing)."""
  table = jnp.concatenate([lookup_header(activation.knots),
                           jnp.asarray(activation.slopes, jnp.float32),
                           jnp.asarray(activation.intercepts, jnp.float32)])
  return jnp.pad(table, (0, -table.shape[0] % TABLE_ALIGN))


def lookup_in_jnp(h: jax.Array, table: jax.Array, num_knots: int):
  """(pwl(h), pwl'(h), segment j as int32) by the lookup in jnp on f32 ``h`` (interpret mode;
  what the PTX computes)."""
  segment = lookup_segment(h, table[0], table[1], num_knots)
  lines = table[HEADER:HEADER + 2 * (num_knots + 1)].reshape(2, -1)
  return lines[0, segment] * h + lines[1, segment], lines[0, segment], segment


# what ``_lookup_ptx`` writes besides pwl(x): nothing, the slope s_j (f32) or the segment j (u32)
SECOND_OUTPUTS = (None, "slope", "segment")


def _lookup_ptx(num_knots: int, second: str | None) -> str:
  """$0 = pwl(x), and $1 = s_j (``second`` "slope") or j ("segment"), from the next operands:
  x, 1 / δ, 1 - t_0 / δ, the shared address of s_0, K."""
  x, scale, offset, slopes, last = (f"${i + 1 + bool(second)}" for i in range(5))
  slope = "$1" if second == "slope" else "s"
  return f"""{{
.reg .f32 u{"" if second == "slope" else ", s"}, c;
.reg .u32 j;
fma.rn.f32 u, {x}, {scale}, {offset};
cvt.rmi.u32.f32 j, u;
min.u32 j, j, {last};{"""
mov.u32 $1, j;""" if second == "segment" else ""}
mad.lo.u32 j, j, 4, {slopes};
ld.shared.f32 {slope}, [j];
ld.shared.f32 c, [j+{4 * (num_knots + 1)}];
fma.rn.f32 $0, {slope}, {x}, c;
}}"""


def _per_element(register, line) -> list:
  """``line`` (one scalar in, a list of scalars out) over a register: a scalar or a vector of
  them."""
  if not isinstance(register.type, ir.VectorType):
    return line(register)
  outs = None
  for i in range(ir.VectorType(register.type).shape[0]):
    at = dict(dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))
    scalars = line(vector.extract(register, **at))
    if outs is None:
      outs = [llvm.mlir_undef(ir.VectorType.get(ir.VectorType(register.type).shape, v.type))
              for v in scalars]
    outs = [vector.insert(new, out, **at) for new, out in zip(scalars, outs)]
  return outs


def _lookup_tiles(h: jax.Array, table_ref, num_knots: int, second: str | None):
  """pwl(h) (and ``second``: its slope s_j, f32, or segment j, int32) for an f32 WGMMA-layout
  tile in a kernel, ``table_ref`` holding ``lookup_table`` in SMEM: ``_lookup_ptx`` per element,
  or ``lookup_in_jnp`` in interpret mode (no inline PTX there)."""
  if second not in SECOND_OUTPUTS:
    raise ValueError(f"second={second!r}: expected one of {SECOND_OUTPUTS}")
  if packed_pwl.interpreting():
    value, slope, segment = lookup_in_jnp(h, table_ref[...], num_knots)
    return value if second is None else (value, slope if second == "slope" else segment)
  tile = lambda dtype: plgpu.ShapeDtypeStruct(h.shape, dtype, layout=plgpu.Layout.WGMMA)
  second_dtype = jnp.float32 if second == "slope" else jnp.int32

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
                     return_type=(tile(jnp.float32), tile(second_dtype)) if second
                     else tile(jnp.float32))
  def run(_, x, table):
    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    entry = lambda i: memref.load(table, [arith.constant(ir.IndexType.get(), i)])
    scale, offset = entry(0), entry(1)
    slopes = arith.addi(llvm.ptrtoint(i32, utils.memref_ptr(table)),
                        arith.constant(i32, 4 * HEADER))
    last = arith.constant(i32, num_knots)
    asm, operands = _lookup_ptx(num_knots, second), [scale, offset, slopes, last]
    outputs = [("=f", f32)] + ([("=f", f32)] if second == "slope" else
                               [("=r", i32)] if second == "segment" else [])
    constraints = ",".join([c for c, _ in outputs] + ["f"] * 3 + ["r"] * 2)

    def line(v):  # [value (, second)] of one f32
      if not second:
        return [llvm.inline_asm(f32, [v, *operands], asm, constraints)]
      out = llvm.inline_asm(llvm.StructType.get_literal([t for _, t in outputs]),
                            [v, *operands], asm, constraints)
      return [llvm.extractvalue(t, out, [i]) for i, (_, t) in enumerate(outputs)]

    if not second:  # the forward: one output, what _pointwise maps over the registers
      return x._pointwise(lambda register: _per_element(register, line)[0])
    lines = [_per_element(register, line) for register in x.registers.flat]
    return tuple(mgpu.FragmentedArray(
        _registers=np.asarray([line[i] for line in lines], dtype=object).reshape(
            x.registers.shape), _layout=x.layout, _is_signed=signed)
        for i, signed in enumerate((None, None if second == "slope" else True)))

  return run(h, table_ref)


def lookup(h: jax.Array, table_ref, num_knots: int) -> jax.Array:
  """pwl(h) for an f32 WGMMA-layout tile in a kernel (the forward epilogue)."""
  return _lookup_tiles(h, table_ref, num_knots, None)


def value_and_slope(h: jax.Array, table_ref, num_knots: int) -> tuple[jax.Array, jax.Array]:
  """(pwl(h), pwl'(h)) for an f32 WGMMA-layout tile in a kernel (the dgrad epilogue): one lookup
  gives both, the slope of h's segment (a point on a knot takes the segment above it, as
  ``pwl_select``, up to f32 rounding of h / δ)."""
  return _lookup_tiles(h, table_ref, num_knots, "slope")


def value_and_segment(h: jax.Array, table_ref, num_knots: int) -> tuple[jax.Array, jax.Array]:
  """(pwl(h), j) for an f32 WGMMA-layout tile in a kernel, j (int32, 0..K) the segment the
  lookup took: the forward epilogue that saves it for the dgrad kernel
  (``slope_of_segment``), one mov more than ``lookup``."""
  return _lookup_tiles(h, table_ref, num_knots, "segment")


def slope_of_segment(segment: jax.Array, table_ref) -> jax.Array:
  """s_j (f32) for an int32 WGMMA-layout tile of segments j (``value_and_segment``'s), from
  ``lookup_table`` in SMEM: one mad for the address and one shared load per element."""
  if packed_pwl.interpreting():
    return table_ref[...][HEADER + segment]
  tile = plgpu.ShapeDtypeStruct(segment.shape, jnp.float32, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=tile)
  def run(_, j, table):
    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    slopes = arith.addi(llvm.ptrtoint(i32, utils.memref_ptr(table)),
                        arith.constant(i32, 4 * HEADER))
    asm = "{\n.reg .u32 a;\nmad.lo.u32 a, $1, 4, $2;\nld.shared.f32 $0, [a];\n}"
    line = lambda v: [llvm.inline_asm(f32, [v, slopes], asm, "=f,r,r")]
    return j._pointwise(lambda register: _per_element(register, line)[0])

  return run(segment, table_ref)
