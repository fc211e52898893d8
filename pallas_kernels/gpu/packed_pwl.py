"""A PWL in PTX on packed f16 pairs (Hopper epilogues): its value and slope in one select chain
(``value_and_slope``, the dgrad kernel), its value as relu hinges (``relu_hinges``, the
forward kernel's ``hinges="relu"``), and each element's segment as a count of the knots at or
below it (``knots_at_or_below``, the forward that saves segments: ``pwl_lookup``).

For ascending knots t_k, slope steps ds_k, leftmost slope s_0 and leftmost intercept c_0
(``hinge_table``), segment j (t_{j-1} <= p < t_j) has

    slope_j = s_0 + sum_{k < j} ds_k,    intercept_j = c_0 - sum_{k < j} ds_k t_k,
    pwl(p) = slope_j p + intercept_j.

The per-segment scalars are summed in f32 while tracing; per element and knot, one
``set.ge.u32.f16x2`` makes a mask (0xFFFF in each half where p >= t_k, so NaN stays in segment 0)
and two ``lop3.b32`` (LUT 0xCA: mask ? new : old) move slope and intercept up a segment; then one
``fma.rn.f16x2``. That is 3 instructions per pair of elements and knot, where the hinges
(max + fma) and a separate select chain (compare + select, which jnp lowers to more) take 4+.
H200, 64 x 128 ping-pong dgrad tiles, 15 knots: the dgrad kernel 133 -> 119 us at gpt2-small,
78 -> 68 us at SmolLM2 (benchmarks/NOTES.md, 2026-12-02 sixteenth session). Two roundings
(intercept, fma) instead of the hinges' sixteen: emulated in f16 on a GELU fit, max |error| /
max |h| 2.4e-4 against 1.2e-3.

Inline PTX has no interpret mode: under ``plgpu.force_gpu_interpret_mode`` callers must take the
jnp forms (``interpreting``).
"""

from __future__ import annotations

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax._src import config as jax_config  # the interpret-mode switch has no public reader
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref

from pallas_kernels.gpu.hinge_table import HingeTable


def interpreting() -> bool:
  """Whether Pallas kernels traced now run in GPU interpret mode (``force_gpu_interpret_mode``)."""
  return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None


def ptx_on_pairs(asm: str):
  """A register-level op for ``FragmentedArray._pointwise``: ``asm`` (operands $1.. the
  arguments, $0 the result) on 32-bit registers holding f16 pairs."""
  def op(*registers):
    if utils.bitwidth(registers[0].type) != 32:
      raise NotImplementedError(f"registers of f16 pairs expected, got {registers[0].type}")
    i32 = ir.IntegerType.get_signless(32)
    out = llvm.inline_asm(i32, [utils.bitcast(v, i32) for v in registers], asm,
                          "=r" + ",r" * len(registers))
    return utils.bitcast(out, registers[0].type)
  return op


_AT_LEAST_MASK = ptx_on_pairs("set.ge.u32.f16x2 $0, $1, $2;")  # 0xFFFF per half where x >= t
_AT_LEAST_ONE = ptx_on_pairs("set.ge.f16x2.f16x2 $0, $1, $2;")  # 1.0 per half where x >= t
_ADD = ptx_on_pairs("add.rn.f16x2 $0, $1, $2;")
_BITWISE_SELECT = ptx_on_pairs("lop3.b32 $0, $1, $2, $3, 0xCA;")  # mask ? a : b
FMA = ptx_on_pairs("fma.rn.f16x2 $0, $1, $2, $3;")  # a b + c
_RELU_FMA = ptx_on_pairs("fma.rn.relu.f16x2 $0, $1, $2, $3;")  # max(a b + c, 0), NaN kept


def _on_f16_pairs(p: jax.Array, table_ref, num_outputs: int, body):
  """``body(x, entry, pairs)`` -> one f16 FragmentedArray (or a tuple of ``num_outputs``), run on
  f16(p) for an f32 WGMMA-layout tile p; ``entry(i)`` loads the SMEM table's f32 entry i and
  ``pairs(v)`` splats an f32 scalar as f16 pairs. Returns the output(s) in f32."""
  x = p.astype(jnp.float16)
  tile = plgpu.ShapeDtypeStruct(x.shape, jnp.float16, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
                     return_type=tile if num_outputs == 1 else (tile,) * num_outputs)
  def run(_, x, table):
    entry = lambda i: memref.load(table, [arith.constant(ir.IndexType.get(), i)])
    pairs = lambda value: mgpu.FragmentedArray.splat(arith.truncf(ir.F16Type.get(), value),
                                                     x.shape, x.layout)
    return body(x, entry, pairs)

  return jax.tree.map(lambda out: out.astype(jnp.float32), run(x, table_ref))


def relu_hinges(p: jax.Array, table_ref, num_knots: int) -> jax.Array:
  """pwl(p) = s_0 p + c_0 + sum_k ds_k relu(p - t_k) in f32 for an f32 WGMMA-layout tile p,
  evaluated on f16(p) (the hinge table's s_0, c_0, t_k, ds_k): per pair of elements
  and knot one ``fma.rn.relu.f16x2`` (p 1 - t_k) and one ``fma.rn.f16x2``, both on the FMA pipe,
  where max(p, t_k) takes the ALU pipe's HMNMX2."""
  at = HingeTable(num_knots)

  def body(x, entry, pairs):
    one = pairs(arith.constant(ir.F32Type.get(), ir.FloatAttr.get(ir.F32Type.get(), 1.0)))
    out = x._pointwise(FMA, pairs(entry(at.first_slope)), pairs(entry(at.first_intercept)))
    for k in range(num_knots):
      hinge = x._pointwise(_RELU_FMA, one, pairs(arith.negf(entry(at.knot(k)))))
      out = hinge._pointwise(FMA, pairs(entry(at.step(k))), out)
    return out

  return _on_f16_pairs(p, table_ref, 1, body)


def knots_at_or_below(p: jax.Array, table_ref, first_knot: int, num_knots: int) -> jax.Array:
  """#{k : f16(t_k) <= f16(p)} as f32 for an f32 WGMMA-layout tile p, the knots t_k at entries
  ``first_knot + k`` of the SMEM table: per pair of elements and knot one ``set.ge.f16x2`` (1.0
  where p >= t_k; NaN counts 0) and one ``add.rn.f16x2`` (exact up to 2048 knots)."""

  def body(x, entry, pairs):
    at_least = lambda k: x._pointwise(_AT_LEAST_ONE, pairs(entry(first_knot + k)))
    count = at_least(0)
    for k in range(1, num_knots):
      count = count._pointwise(_ADD, at_least(k))
    return count

  return _on_f16_pairs(p, table_ref, 1, body)


def value_and_slope(p: jax.Array, table_ref, num_knots: int) -> tuple[jax.Array, jax.Array]:
  """(pwl(p), pwl'(p)) in f32 for an f32 WGMMA-layout tile p, evaluated on f16(p) with f16
  segment scalars; ``table_ref`` is the SMEM hinge table. A point on a knot takes the segment
  above it, like ``pwl_select``."""
  at = HingeTable(num_knots)

  def chain(x, entry, pairs):
    steps = [entry(at.step(k)) for k in range(num_knots)]
    hinge_offsets = [arith.mulf(step, entry(at.knot(k))) for k, step in enumerate(steps)]
    segment_slope, segment_intercept = entry(at.first_slope), entry(at.first_intercept)
    slope, intercept = pairs(segment_slope), pairs(segment_intercept)
    for k in range(num_knots):
      segment_slope = arith.addf(segment_slope, steps[k])
      segment_intercept = arith.subf(segment_intercept, hinge_offsets[k])
      above = x._pointwise(_AT_LEAST_MASK, pairs(entry(at.knot(k))))
      slope = above._pointwise(_BITWISE_SELECT, pairs(segment_slope), slope)
      intercept = above._pointwise(_BITWISE_SELECT, pairs(segment_intercept), intercept)
    return slope._pointwise(FMA, x, intercept), slope

  return _on_f16_pairs(p, table_ref, 2, chain)
