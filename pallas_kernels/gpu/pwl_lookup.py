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

Other knots ("pwl_counted", ``counted_value_and_segment``): a training forward that saves
segments for the dgrad kernel finds j = #{k : t_k <= h} by counting - on f16 pairs, one
``set.ge.f16x2`` and one ``add.rn.f16x2`` per pair and knot (``packed_pwl.knots_at_or_below``),
the hinges' instruction count - then takes the line (s_j, c_j) from ``counted_table`` as the
lookup does (cvt, mad, two shared loads, fma): ~6 instructions per element beyond the hinges, where
saving floor bits instead costs the forward their encoding and the dgrad kernel a decode, the
PWL's value and its slope by a select chain, and h's store.
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
from pallas_kernels.gpu.hinge_table import MAX_TMA_BOX, TABLE_ALIGN

HEADER = 2  # table entries before the slopes: 1 / δ and 1 - t_0 / δ
# ``counted_table`` (2 + 2 (K + 1) + K entries) fits one TMA box up to this many knots
MAX_COUNTED_KNOTS = (MAX_TMA_BOX - HEADER - 2) // 3


def lookup_table(activation: Activation) -> jax.Array:
  """[1 / δ, 1 - t_0 / δ, s_0, .., s_K, c_0, .., c_K] in f32, padded to ``TABLE_ALIGN``, with
  δ = (t_{K-1} - t_0) / (K - 1) (traceable; the dispatcher checks the spacing)."""
  table = jnp.concatenate([lookup_header(activation.knots),
                           jnp.asarray(activation.slopes, jnp.float32),
                           jnp.asarray(activation.intercepts, jnp.float32)])
  return jnp.pad(table, (0, -table.shape[0] % TABLE_ALIGN))


def counted_table(activation: Activation) -> jax.Array:
  """[0, 0, s_0, .., s_K, c_0, .., c_K, t_0, .., t_{K-1}] in f32, padded to ``TABLE_ALIGN``: the
  lines where ``lookup_table`` has them (``slope_of_segment`` reads either), then the knots the
  count compares with (``first_counted_knot``). At most ``MAX_COUNTED_KNOTS`` knots."""
  if activation.knots.shape[0] > MAX_COUNTED_KNOTS:
    raise ValueError(f"counted_table: at most {MAX_COUNTED_KNOTS} knots fit one TMA box, got "
                     f"{activation.knots.shape[0]}")
  table = jnp.concatenate([jnp.zeros((HEADER,), jnp.float32),
                           *(jnp.asarray(v, jnp.float32) for v in (
                               activation.slopes, activation.intercepts, activation.knots))])
  return jnp.pad(table, (0, -table.shape[0] % TABLE_ALIGN))


def first_counted_knot(num_knots: int) -> int:
  """The entry of t_0 in ``counted_table``."""
  return HEADER + 2 * (num_knots + 1)


def _lines_in_jnp(h: jax.Array, table: jax.Array, segment: jax.Array, num_knots: int):
  """(s_j h + c_j, s_j, j) in jnp from a table's lines (interpret mode)."""
  lines = table[HEADER:HEADER + 2 * (num_knots + 1)].reshape(2, -1)
  return lines[0, segment] * h + lines[1, segment], lines[0, segment], segment


def lookup_in_jnp(h: jax.Array, table: jax.Array, num_knots: int):
  """(pwl(h), pwl'(h), segment j as int32) by the lookup in jnp on f32 ``h`` (interpret mode;
  what the PTX computes)."""
  return _lines_in_jnp(h, table, lookup_segment(h, table[0], table[1], num_knots), num_knots)


# what ``_lookup_ptx`` writes besides pwl(x): nothing, the slope s_j (f32) or the segment j (u32)
SECOND_OUTPUTS = (None, "slope", "segment")


def _lookup_ptx(num_knots: int, second: str | None, counted: bool = False) -> str:
  """$0 = pwl(x), and $1 = s_j (``second`` "slope") or j ("segment"), from the next operands:
  x, 1 / δ, 1 - t_0 / δ, the shared address of s_0, K; or with ``counted`` x, j as an f32 count
  (``counted_value_and_segment``), the shared address of s_0."""
  if counted:
    x, count, slopes = (f"${i + 1 + bool(second)}" for i in range(3))
    segment = f"cvt.rzi.u32.f32 j, {count};"
  else:
    x, scale, offset, slopes, last = (f"${i + 1 + bool(second)}" for i in range(5))
    segment = f"fma.rn.f32 u, {x}, {scale}, {offset};\ncvt.rmi.u32.f32 j, u;\nmin.u32 j, j, {last};"
  slope = "$1" if second == "slope" else "s"
  return f"""{{
.reg .f32 u{"" if second == "slope" else ", s"}, c;
.reg .u32 j;
{segment}{"""
mov.u32 $1, j;""" if second == "segment" else ""}
mad.lo.u32 j, j, 4, {slopes};
ld.shared.f32 {slope}, [j];
ld.shared.f32 c, [j+{4 * (num_knots + 1)}];
fma.rn.f32 $0, {slope}, {x}, c;
}}"""


def _per_element(registers, line) -> list:
  """``line`` (one scalar of each register in, a list of scalars out) over a register or a tuple
  of registers alike: scalars or vectors of them."""
  registers = registers if isinstance(registers, tuple) else (registers,)
  if not isinstance(registers[0].type, ir.VectorType):
    return line(*registers)
  outs = None
  for i in range(ir.VectorType(registers[0].type).shape[0]):
    at = dict(dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))
    scalars = line(*(vector.extract(register, **at) for register in registers))
    if outs is None:
      outs = [llvm.mlir_undef(ir.VectorType.get(ir.VectorType(registers[0].type).shape, v.type))
              for v in scalars]
    outs = [vector.insert(new, out, **at) for new, out in zip(scalars, outs)]
  return outs


def _lookup_tiles(h: jax.Array, table_ref, num_knots: int, second: str | None, counts=None):
  """pwl(h) (and ``second``: its slope s_j, f32, or segment j, int32) for an f32 WGMMA-layout
  tile in a kernel, ``table_ref`` holding ``lookup_table`` in SMEM (or, with ``counts``, an f32
  tile of each element's segment j, ``counted_table``): ``_lookup_ptx`` per element, or the jnp
  forms in interpret mode (no inline PTX there)."""
  if second not in SECOND_OUTPUTS:
    raise ValueError(f"second={second!r}: expected one of {SECOND_OUTPUTS}")
  if packed_pwl.interpreting():
    table = table_ref[...]
    value, slope, segment = (lookup_in_jnp(h, table, num_knots) if counts is None else
                             _lines_in_jnp(h, table, counts.astype(jnp.int32), num_knots))
    return value if second is None else (value, slope if second == "slope" else segment)
  tile = lambda dtype: plgpu.ShapeDtypeStruct(h.shape, dtype, layout=plgpu.Layout.WGMMA)
  second_dtype = jnp.float32 if second == "slope" else jnp.int32
  tiles = (h,) if counts is None else (h, counts)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * len(tiles) + (plgpu.RefType(),),
                     return_type=(tile(jnp.float32), tile(second_dtype)) if second
                     else tile(jnp.float32))
  def run(_, *args):
    *arrays, table = args
    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
    entry = lambda i: memref.load(table, [arith.constant(ir.IndexType.get(), i)])
    slopes = arith.addi(llvm.ptrtoint(i32, utils.memref_ptr(table)),
                        arith.constant(i32, 4 * HEADER))
    asm = _lookup_ptx(num_knots, second, counted=counts is not None)
    if counts is None:
      operands, inputs = [entry(0), entry(1), slopes, arith.constant(i32, num_knots)], "fffrr"
    else:
      operands, inputs = [slopes], "ffr"
    outputs = [("=f", f32)] + ([("=f", f32)] if second == "slope" else
                               [("=r", i32)] if second == "segment" else [])
    constraints = ",".join([c for c, _ in outputs] + list(inputs))

    def line(*v):  # [value (, second)] of one f32 (and its count)
      if not second:
        return [llvm.inline_asm(f32, [*v, *operands], asm, constraints)]
      out = llvm.inline_asm(llvm.StructType.get_literal([t for _, t in outputs]),
                            [*v, *operands], asm, constraints)
      return [llvm.extractvalue(t, out, [i]) for i, (_, t) in enumerate(outputs)]

    x = arrays[0]
    if not second:  # the forward: one output, what _pointwise maps over the registers
      return x._pointwise(lambda register: _per_element(register, line)[0])
    lines = [_per_element(registers, line)
             for registers in zip(*(array.registers.flat for array in arrays))]
    return tuple(mgpu.FragmentedArray(
        _registers=np.asarray([line[i] for line in lines], dtype=object).reshape(
            x.registers.shape), _layout=x.layout, _is_signed=signed)
        for i, signed in enumerate((None, None if second == "slope" else True)))

  return run(*tiles, table_ref)


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


def counted_value_and_segment(h: jax.Array, table_ref, num_knots: int,
                              pwl_dtype: str = "float32") -> tuple[jax.Array, jax.Array]:
  """(pwl(h), j) for an f32 WGMMA-layout tile in a kernel with any ascending knots, ``table_ref``
  holding ``counted_table`` in SMEM: j = #{k : t_k <= h} (int32, 0..K; NaN counts 0, so NaN
  stays NaN) counted in ``pwl_dtype`` - "float16": on packed pairs
  (``packed_pwl.knots_at_or_below``), so h within ~2^-11 |t_k| of a knot may take either side;
  "float32": by f32 compares, twice the instructions - then pwl(h) = s_j h + c_j in f32. The
  training forward that saves j for the dgrad kernel (``slope_of_segment``) where the knots are
  not evenly spaced."""
  first = first_counted_knot(num_knots)
  if jnp.dtype(pwl_dtype) == jnp.float16 and not packed_pwl.interpreting():
    counts = packed_pwl.knots_at_or_below(h, table_ref, first, num_knots)
  else:  # compares in pwl_dtype (in interpret mode the PTX's f16 roundings)
    x = h.astype(pwl_dtype)
    counts = sum((x >= table_ref[first + k].astype(pwl_dtype)).astype(jnp.float32)
                 for k in range(num_knots))
  return _lookup_tiles(h, table_ref, num_knots, "segment", counts=counts)


def line_of_segment(h: jax.Array, segment: jax.Array, table_ref,
                    num_knots: int) -> tuple[jax.Array, jax.Array]:
  """(s_j h + c_j, s_j) for f32 WGMMA-layout tiles of h and of its segments j (any integer
  dtype; ``value_and_segment``'s or ``counted_value_and_segment``'s), from ``lookup_table`` or
  ``counted_table`` in SMEM: the dgrad kernel that has the saved input p and j, not pwl(p)."""
  return _lookup_tiles(h, table_ref, num_knots, "slope", counts=segment.astype(jnp.float32))


def slope_of_segment(segment: jax.Array, table_ref) -> jax.Array:
  """s_j (f32) for an int32 WGMMA-layout tile of segments j (``value_and_segment``'s or
  ``counted_value_and_segment``'s), from ``lookup_table`` or ``counted_table`` in SMEM (their
  slopes sit at the same entries): one mad for the address and one shared load per element."""
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
