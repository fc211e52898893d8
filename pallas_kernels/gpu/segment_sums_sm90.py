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
from jax.experimental.mosaic.gpu import utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, vector

from pallas_kernels.activation import lookup_header, lookup_segment, segment_bands
from pallas_kernels.gpu import packed_pwl
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


def _tiled(x, g: jax.Array):
  """x as its parts and g, checked and padded to whole [TILE_ROWS, TILE_COLS] tiles (g = 0 adds
  exactly 0 to every sum), with the tiles' grid: (parts, g, col_tiles, ctas, per_cta)."""
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  reason = unsupported_reason(parts, g)
  if reason is not None:
    raise ValueError(f"x, g: {reason}")
  padding = [(0, -n % tile) for n, tile in zip(g.shape, (TILE_ROWS, TILE_COLS))]
  if any(high for _, high in padding):
    parts, g = tuple(jnp.pad(part, padding) for part in parts), jnp.pad(g, padding)
  rows, cols = g.shape
  col_tiles = cols // TILE_COLS
  tiles = rows // TILE_ROWS * col_tiles
  ctas = _num_ctas(tiles)
  return parts, g, col_tiles, ctas, tiles // ctas


def _tile_spec(col_tiles: int, per_cta: int) -> pl.BlockSpec:
  """CTA b's i-th [TILE_ROWS, TILE_COLS] tile: tile b per_cta + i, row-major."""
  def tile_index(i):
    t = lax.axis_index("cta") * per_cta + i
    return t // col_tiles, t % col_tiles
  return pl.BlockSpec((TILE_ROWS, TILE_COLS), tile_index)


def _lane_kernel(body, out_shape, scratch_types, *args):
  """``plgpu.kernel`` over the CTAs (first dim of ``out_shape``), lane semantics."""
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32), grid=(out_shape[0],),
      grid_names=("cta",), scratch_types=scratch_types,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(*args)


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
  parts, g, col_tiles, ctas, per_cta = _tiled(x, g)
  segmented = parts[-1].dtype == jnp.int8
  num_knots = knots.shape[0]
  segments = num_knots + 1
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

    zero = plgpu.layout_cast(jnp.zeros((sub_rows, TILE_COLS), jnp.float32), slice_layout)
    sums = plgpu.emit_pipeline(tile, grid=(per_cta,),
                               in_specs=[_tile_spec(col_tiles, per_cta)] * (len(parts) + 1),
                               max_concurrent_steps=STAGES,
                               init_carry=(zero,) * (2 * segments))(*part_gmems, g_gmem)
    for i, s in enumerate(sums):
      out_smem[i] = s
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[lax.axis_index("cta")])
    plgpu.wait_smem_to_gmem(0)

  partials = _lane_kernel(
      segment_sums_kernel, (ctas, 2 * segments, sub_rows, TILE_COLS),
      [plgpu.SMEM(table.shape, jnp.float32),
       plgpu.SMEM((2 * segments, sub_rows, TILE_COLS), jnp.float32),
       plgpu.Barrier(num_arrivals=1)], *parts, g, table)
  sums = partials.sum(axis=(0, 2, 3)).reshape(2, segments)
  return sums[0], sums[1]


def _bin_add_ptx(segments: int, lookup: bool) -> str:
  """Add g p into bin S_j of this thread (shared address $2 + 4 (128 j)) and g into C_j,
  ``segments`` rows further: both loads first, so their latencies overlap. Operands: $0 p,
  $1 g, $2 this thread's bin column (``_bin_column_ptx``), then j (u32), or with ``lookup`` the
  lookup's rule j = min(floor(p / δ + 1 - t_0 / δ), K) (``pwl_lookup``) from $3 1 / δ,
  $4 1 - t_0 / δ, $5 K."""
  segment = ("fma.rn.f32 u, $0, $3, $4;\ncvt.rmi.u32.f32 j, u;\nmin.u32 j, j, $5;" if lookup
             else "mov.u32 j, $3;")
  c_offset = 4 * TILE_COLS * segments
  return f"""{{
.reg .f32 u, s, c;
.reg .u32 j, a;
{segment}
mad.lo.u32 a, j, {4 * TILE_COLS}, $2;
ld.shared.f32 s, [a];
ld.shared.f32 c, [a+{c_offset}];
fma.rn.f32 s, $1, $0, s;
add.f32 c, c, $1;
st.shared.f32 [a], s;
st.shared.f32 [a+{c_offset}], c;
}}"""


def _bin_column_ptx(segments: int) -> str:
  """$0 = the shared address of this thread's column in bins [warpgroups, 2 (K+1), 128] f32 at
  $1: warpgroup w = tid / 128 (a kernel's compute warpgroups come first), column tid % 128."""
  return f"""{{
.reg .u32 t, w;
mov.u32 t, %tid.x;
shr.u32 w, t, 7;
and.b32 t, t, {TILE_COLS - 1};
mad.lo.u32 w, w, {2 * segments * TILE_COLS}, t;
mad.lo.u32 $0, w, 4, $1;
}}"""


def _bin_column(bins) -> ir.Value:
  """This thread's column address in ``bins`` (a memref inside ``inline_mgpu``)."""
  i32 = ir.IntegerType.get_signless(32)
  return llvm.inline_asm(i32, [llvm.ptrtoint(i32, utils.memref_ptr(bins))],
                         _bin_column_ptx(ir.MemRefType(bins.type).shape[1] // 2), "=r,r")


def zero_bins(bins_ref, wg) -> None:
  """Each thread of a warpgroup zeroes its own column of ``bins_ref`` [warpgroups, 2 (K+1), 128]
  (warpgroup ``wg``'s, as ``add_to_bins`` addresses them): the adds that follow are its own, so
  no barrier is needed. In interpret mode, warpgroup ``wg``'s bins at once."""
  segments = bins_ref.shape[1] // 2
  if packed_pwl.interpreting():
    bins_ref[wg] = jnp.zeros(bins_ref.shape[1:], bins_ref.dtype)
    return

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def run(_, bins):
    stores = "\n".join(f"st.shared.f32 [$0+{4 * TILE_COLS * row}], 0f00000000;"
                        for row in range(2 * segments))
    llvm.inline_asm(None, [_bin_column(bins)], stores, "r", has_side_effects=True)

  run(bins_ref)


def add_to_bins(p, g, bins_ref, layout, *, segment=None, header_ref=None, wg=0) -> None:
  """Each element's g p and g into its segment's bins: S_j at bins_ref[w, j, t], C_j at
  bins_ref[w, K + 1 + j, t] for the calling thread's warpgroup w and column t (``bins_ref``
  [warpgroups, 2 (K+1), 128] f32 in SMEM), so no thread's read-modify-writes race another's and
  a warp's 32 lanes hit 32 banks. j: ``segment`` (an int32 tile) or, with ``header_ref`` (1 / δ,
  1 - t_0 / δ), the lookup's. p, g (and segment): f32 tiles of ``layout``. In interpret mode
  (no inline PTX there) the same sums in jnp, added per column into warpgroup ``wg``'s bins."""
  segments = bins_ref.shape[1] // 2
  if packed_pwl.interpreting():
    if segment is None:
      segment = lookup_segment(p, header_ref[0], header_ref[1], segments - 1)
    in_segment = segment[None] == jnp.arange(segments)[:, None, None]
    columns = pl.ds(0, p.shape[1])
    for offset, value in ((0, g * p), (segments, g)):
      bins_ref[wg, pl.ds(offset, segments), columns] += jnp.sum(
          jnp.where(in_segment, value, 0.0), axis=1)
    return

  tiles = (p, g) if segment is None else (p, g, segment)

  @plgpu.inline_mgpu(arg_types=(layout,) * len(tiles) + (plgpu.RefType(),) * (
      1 + (header_ref is not None)))
  def run(_, *args):
    i32 = ir.IntegerType.get_signless(32)
    arrays, (bins, *header) = args[:len(tiles)], args[len(tiles):]
    column = _bin_column(bins)
    if header:
      entry = lambda i: memref.load(header[0], [arith.constant(ir.IndexType.get(), i)])
      operands, constraints = [entry(0), entry(1), arith.constant(i32, segments - 1)], "f,f,r"
    else:
      operands, constraints = [], "r"
    asm = _bin_add_ptx(segments, lookup=bool(header))

    def scalars(register):  # an f32 or i32, or a vector of them
      if not isinstance(register.type, ir.VectorType):
        return [register]
      return [vector.extract(register, dynamic_position=[],
                             static_position=ir.DenseI64ArrayAttr.get([i]))
              for i in range(ir.VectorType(register.type).shape[0])]

    for registers in zip(*(array.registers.flat for array in arrays)):
      for p_value, g_value, *j in zip(*(scalars(register) for register in registers)):
        llvm.inline_asm(None, [p_value, g_value, column, *j, *operands], asm,
                        "f,f,r," + constraints, has_side_effects=True)

  run(*tiles, bins_ref, *([header_ref] if header_ref is not None else []))


def segment_sums_lookup(x, g: jax.Array, knots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(S, C) as ``segment_sums``, for evenly spaced knots, in O(1) work per element for any K:
  the element's segment by the lookup's fma + cvt (``pwl_lookup``), then g p and g added into
  that segment's bins in SMEM (``add_to_bins``) - where ``segment_sums`` masks 2 (K+1) register
  sums per element. Each CTA stores its bins as a partial; XLA sums them. x as ``segment_sums``
  takes it, except (hi, int8 seg): the lookup plans keep no segment indices. Serves plans with
  ``dispatch.Plan.segment_lookup`` (every lookup plan). H200, 4096 x 1536, uniform PWL-64:
  0.039 ms with both bin loads issued before the adds and the thread's column computed once
  (twenty-seventh session; one load-add-store after the other, 0.050), ``segment_sums`` 0.133
  (benchmarks/results/pwl-grads-2026-12-04-twentyseventh-pwl64-uniform.json)."""
  parts, g, col_tiles, ctas, per_cta = _tiled(x, g)
  if parts[-1].dtype == jnp.int8:
    raise ValueError("x: the lookup's segment sums read p, not (hi, int8 seg) segment indices")
  segments = knots.shape[0] + 1
  header = jnp.pad(lookup_header(knots), (0, TABLE_ALIGN - 2))
  zeros = jnp.zeros((1, 2 * segments, TILE_COLS), jnp.float32)
  slice_layout = plgpu.Layout.WG_STRIDED((1, TILE_COLS), vec_size=1)

  def segment_sums_kernel(*refs):
    *part_gmems, g_gmem, header_gmem, zeros_gmem, out_gmem, header_smem, bins_smem, ready = refs
    plgpu.copy_gmem_to_smem(header_gmem, header_smem, ready)
    plgpu.copy_gmem_to_smem(zeros_gmem, bins_smem, ready)  # every thread sees zeroed bins
    plgpu.barrier_wait(ready)

    def tile(_, *smems):
      *part_smems, g_smem = smems

      def add_row(r, carry):
        loaded = [plgpu.load(ref.at[pl.ds(r, 1)], layout=slice_layout) for ref in part_smems]
        gs = plgpu.load(g_smem.at[pl.ds(r, 1)], layout=slice_layout)
        add_to_bins(join_saved(loaded), gs, bins_smem, slice_layout, header_ref=header_smem)
        return carry
      lax.fori_loop(0, TILE_ROWS, add_row, None)

    plgpu.emit_pipeline(tile, grid=(per_cta,),
                        in_specs=[_tile_spec(col_tiles, per_cta)] * (len(parts) + 1),
                        max_concurrent_steps=STAGES)(*part_gmems, g_gmem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(bins_smem.at[0], out_gmem.at[lax.axis_index("cta")])
    plgpu.wait_smem_to_gmem(0)

  partials = _lane_kernel(
      segment_sums_kernel, (ctas, 2 * segments, TILE_COLS),
      [plgpu.SMEM(header.shape, jnp.float32), plgpu.SMEM(zeros.shape, jnp.float32),
       plgpu.Barrier(num_arrivals=2)], *parts, g, header, zeros)
  sums = partials.sum(axis=(0, 2)).reshape(2, segments)
  return sums[0], sums[1]
