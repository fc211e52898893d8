"""PWL segment sums on Hopper in one pass: every element adds into per-thread accumulators.

The gradients of Σ g·pwl(x) w.r.t. a PWL's K+1 slopes and intercepts are

    S_j = Σ_{t_{j-1} <= x < t_j} g·x,    C_j = Σ_{t_{j-1} <= x < t_j} g      (j = 0..K)

(t_{-1} = -inf, t_K = +inf; ``pallas_kernels.activation.pwl_segment_sums`` is the XLA form, whose
2(K+1) reductions take 0.23 ms for 4096 x 1536 f32 on the H200, ten times the 50 MB they read).
Here x and g [R, C] f32 (or x as the forward's saved parts, see ``segment_sums``) stream through
SMEM in [TILE_ROWS, TILE_COLS] tiles
(``plgpu.emit_pipeline``); CTA b owns a contiguous run of tiles and one warpgroup adds each
[sub_rows, TILE_COLS] slice into 2(K+1) register accumulators of that shape (sub_rows f32 per
thread each), masked by the slice's segment bands. Each CTA stores its accumulators as a partial
[2(K+1), sub_rows, TILE_COLS]; XLA sums the partials. A shape that is not whole tiles is padded
with zeros (g = 0 adds exactly 0 to every sum). An empty segment adds only zeros, so its sums
are exactly 0; NaN x compares false everywhere and lands in segment 0.

H200, 4096 x 1536, PWL-16 (benchmarks/results/pwl-grads-2026-12-01-kernel-default.json): 0.049 ms
with [2, 128] slices, 0.051 with [1, 128], 0.068 with [4, 128] (the XLA form 0.220); SmolLM2's FFN
training step with PWL gradients 0.443 -> 0.276 ms, the fine-tune loop 0.69x -> 0.97x of the
exact XLA loop's tokens/s (benchmarks/results/finetune-h200-2026-12-01c/). CTAs: the largest
divisor of the tile count up to the SM count, so a tile count with no large divisor (e.g. a
prime) uses few SMs.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.activation import segment_bands
from pallas_kernels.gpu.backward import join_saved
from pallas_kernels.gpu.fused_ffn_sm90 import H100_SMS
from pallas_kernels.gpu.hinge_table import TABLE_ALIGN

TILE_ROWS = 32
TILE_COLS = 128
# Accumulator f32 per thread, 2 (K+1) sub_rows, the default slice keeps within. H200, 4096 x
# 1536: PWL-16 [2, 128] slices (68 f32) 0.049 ms, [1, 128] 0.051; uniform PWL-64 [2, 128] (260
# f32, spills) 0.513 ms, [1, 128] (130 f32) 0.138
# (benchmarks/results/pwl-grads-2026-12-03-pwl64-uniform.json).
ACCUMULATOR_BUDGET = 160


def default_sub_rows(num_knots: int) -> int:
  """Rows per register slice: 2 while 2 (K+1) x 2 accumulators fit ``ACCUMULATOR_BUDGET``,
  else 1."""
  return 2 if 4 * (num_knots + 1) <= ACCUMULATOR_BUDGET else 1
STAGES = 2


def unsupported_reason(parts: tuple, g: jax.Array) -> str | None:
  """Why the kernel cannot take the activation's input as ``parts`` with g, or None."""
  described = ", ".join(f"{a.dtype.name}{list(a.shape)}" for a in (*parts, g))
  if g.ndim != 2 or any(part.shape != g.shape for part in parts):
    return f"expected 2-D arrays of one shape, got {described}"
  dtypes = [part.dtype for part in parts]
  halves = (jnp.bfloat16, jnp.float16)
  floor_bits = dtypes == [jnp.bfloat16, jnp.uint8]
  if g.dtype == jnp.float32 and (dtypes == [jnp.float32] or floor_bits or (
      len(dtypes) == 2 and dtypes[0] in halves and dtypes[1] in (dtypes[0], jnp.int8))):
    return None
  return ("expected float32 g, and p as float32, a bf16/f16 (hi, lo) pair, (hi, int8 seg) or "
          "(bf16 hi, uint8 floor bits); "
          f"got {described}")


def _num_ctas(tiles: int) -> int:
  """The most CTAs, at most one per SM, that split the tiles evenly."""
  sms = getattr(jax.devices()[0], "core_count", None) or H100_SMS
  return max(c for c in range(1, min(sms, tiles) + 1) if tiles % c == 0)


def segment_sums(x, g: jax.Array, knots: jax.Array, *,
                 sub_rows: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(S, C), each [K+1] f32, for x, g [R, C] and sorted knots [K] (see the module docstring).

  ``x``: the activation's input p as an f32 array or in a saved form of
  ``backward.save_preactivations``, read as such (no f32 copy of p in HBM): a (hi, lo) pair,
  p = hi + lo, (bf16 hi, uint8 floor bits) decoded by ``backward.join_floor_bits``, or (hi, int8
  seg(p)), whose bands are seg == j (exact: the forward's segment) and
  whose p is hi (|hi - p| <= 2^-9 |p| for bf16; ``backward.join_segmented``'s clip into the
  segment, which cost ~4 instructions per band and element, is left out). g: f32.
  ``sub_rows`` (1, 2 or 4; None: ``default_sub_rows``): rows per register slice; each of the
  2(K+1) accumulators holds sub_rows f32 per thread (fewer: less register pressure, more loop
  steps).
  """
  sub_rows = default_sub_rows(knots.shape[0]) if sub_rows is None else sub_rows
  if sub_rows not in (1, 2, 4):
    raise ValueError(f"sub_rows: expected 1, 2 or 4, got {sub_rows!r}")
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  reason = unsupported_reason(parts, g)
  if reason is not None:
    raise ValueError(f"x, g: {reason}")
  segmented = parts[-1].dtype == jnp.int8
  padding = [(0, -n % tile) for n, tile in zip(g.shape, (TILE_ROWS, TILE_COLS))]
  if any(high for _, high in padding):
    parts, g = tuple(jnp.pad(part, padding) for part in parts), jnp.pad(g, padding)
  rows, cols = g.shape
  num_knots = knots.shape[0]
  segments = num_knots + 1
  col_tiles = cols // TILE_COLS
  tiles = rows // TILE_ROWS * col_tiles
  ctas = _num_ctas(tiles)
  per_cta = tiles // ctas
  table = jnp.zeros((pl.cdiv(num_knots, TABLE_ALIGN) * TABLE_ALIGN,), jnp.float32)
  table = table.at[:num_knots].set(knots.astype(jnp.float32))
  slice_layout = plgpu.Layout.WG_STRIDED((sub_rows, TILE_COLS), vec_size=sub_rows)

  def bands_and_p(loaded, thresholds):
    """The K+1 band masks of a slice and its p."""
    if segmented:
      seg = loaded[1].astype(jnp.int32)
      return [seg == j for j in range(segments)], loaded[0].astype(jnp.float32)
    p = join_saved(loaded)
    return segment_bands(p, thresholds), p

  def segment_sums_kernel(*refs):
    *part_gmems, g_gmem, table_gmem, out_gmem, table_smem, out_smem, ready = refs
    cta = lax.axis_index("cta")
    plgpu.copy_gmem_to_smem(table_gmem, table_smem, ready)
    plgpu.barrier_wait(ready)
    thresholds = [table_smem[k] for k in range(num_knots)]

    def tile(_, *smems_and_sums):
      *part_smems, g_smem, sums = smems_and_sums
      def add_slice(r, sums):
        rows_r = pl.ds(r * sub_rows, sub_rows)
        loaded = [plgpu.load(ref.at[rows_r], layout=slice_layout) for ref in part_smems]
        gs = plgpu.load(g_smem.at[rows_r], layout=slice_layout)
        bands, p = bands_and_p(loaded, thresholds)
        values = [gs * p] * segments + [gs] * segments
        return tuple(s + jnp.where(band, v, 0.0)
                     for s, band, v in zip(sums, bands + bands, values))
      return lax.fori_loop(0, TILE_ROWS // sub_rows, add_slice, sums)

    def tile_index(i):
      t = cta * per_cta + i
      return t // col_tiles, t % col_tiles

    spec = pl.BlockSpec((TILE_ROWS, TILE_COLS), tile_index)
    zero = plgpu.layout_cast(jnp.zeros((sub_rows, TILE_COLS), jnp.float32), slice_layout)
    sums = plgpu.emit_pipeline(tile, grid=(per_cta,), in_specs=[spec] * (len(parts) + 1),
                               max_concurrent_steps=STAGES,
                               init_carry=(zero,) * (2 * segments))(*part_gmems, g_gmem)
    for i, s in enumerate(sums):
      out_smem[i] = s
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[cta])
    plgpu.wait_smem_to_gmem(0)

  partials = plgpu.kernel(
      segment_sums_kernel,
      out_type=jax.ShapeDtypeStruct((ctas, 2 * segments, sub_rows, TILE_COLS), jnp.float32),
      grid=(ctas,), grid_names=("cta",),
      scratch_types=[plgpu.SMEM(table.shape, jnp.float32),
                      plgpu.SMEM((2 * segments, sub_rows, TILE_COLS), jnp.float32),
                      plgpu.Barrier(num_arrivals=1)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(*parts, g, table)
  sums = partials.sum(axis=(0, 2, 3)).reshape(2, segments)
  return sums[0], sums[1]
