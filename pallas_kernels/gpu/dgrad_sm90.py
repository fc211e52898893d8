"""The backward's first GEMM with the activation's derivative in its epilogue (Hopper, sm_90).

For the forward's saved pre-activations p = g (GLU) or u (MLP) (``backward.save_preactivations``:
(hi, lo) pairs, or floor bits for p and bf16 for u):

    d_hidden = dy W_down^T                       [M, H], f32 in registers only
    MLP:  h = act(u),        d_u = d_hidden act'(u)
    GLU:  a = act(g), h = a u,  d_u = d_hidden a,  d_g = d_hidden u act'(g)

written in dy's dtype. A forward that evaluated its PWL by the segments' lines (a lookup, or a
count of the knots) and saved each element's segment j (``fused_ffn_sm90.LOOKUP_SEGMENTS``: j
for an MLP, (a, u, j) for a GLU) gives the slope as s_j (one shared load) and nothing to decode
or evaluate: MLP d_u = d_hidden s_j (h is the forward's output, not written again), GLU
h = a u, d_u = d_hidden a, d_g = d_hidden u s_j. XLA then
runs dW_down = h^T dy, dW_up = x^T d_u, dx = d_u W_up^T (+ the gate terms). Against the chunked
XLA backward this removes the f32 d_hidden round trip through HBM and one elementwise pass
(benchmarks/NOTES.md, fifth 12-01 session: ~57 us of gpt2-small's 500 us step).

A trained PWL's parameter gradients are sums per segment j of d_a = d_hidden (u) (GLU) or
d_hidden (MLP):

    d s_j = Σ_{seg(p) = j} d_a p,      d c_j = Σ_{seg(p) = j} d_a

``pwl_gradients`` reads the forward's ``LOOKUP_SEGMENT_INPUTS``, the PWL's input p in place of
a GLU's a ((g, u, j): a = s_j g + c_j, one more shared load and fma) or of an MLP's h ((p, j):
the kernel writes h = s_j p + c_j, so the residuals stay 3 bytes an element), and adds d_a p
and d_a into per-thread f32 bins in SMEM keyed by j (``segment_sums_sm90.add_to_bins``:
[2 (K+1), 128] a warpgroup, 34 KiB for both at K = 16). Each CTA stores its bins; XLA sums
them. p is the bf16 the forward saved: each term within 2^-9 |p|.
Other saved forms give no PWL gradients (``dispatch`` then runs the chunked backward).

W_down [H, D_out] is read in [tile_n, 64] blocks and used transposed as wgmma's B operand, in a
persistent grid with two compute warpgroups, on either schedule of ``EpilogueConfig``:
"cooperative" (``emit_pipeline_warp_specialized`` over D_out; the K loop, the part loads, the
activation math and the stores of a tile run one after another) or "pingpong"
(``fused_ffn_sm90.pingpong_mainloop``: one warpgroup's epilogue overlaps the other's K loop).
The epilogue walks [window_rows, 64] windows; each window's saved parts are TMA-loaded into one
of two SMEM buffers while the previous window computes (the first window's while the K loop
runs). A PWL's value and derivative come from one select chain over its knots
(``_pwl_value_and_slope``).

On the H200 (2026-12-01, benchmarks/NOTES.md) the cooperative kernel with exact activations was
slower than what it replaces (SmolLM2 ~135 vs ~85 us, gpt2-small ~205 vs ~155 us).
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.activation import exact_activation_and_derivative
from pallas_kernels.gpu import packed_pwl, pwl_lookup, segment_sums_sm90
from pallas_kernels.gpu.backward import join_saved
from pallas_kernels.gpu.fused_ffn_sm90 import (EPILOGUE_N, MEMORY_REGISTERS, SEGMENT_KINDS,
                                               SMEM_BYTES, TILE_K, EpilogueConfig, _split_refs,
                                               _swizzled, apply_activation, for_each_tile,
                                               launch_persistent, load_table, num_sms,
                                               pingpong_mainloop, pingpong_ring, store_slice)
from pallas_kernels.gpu.hinge_table import TABLE_ALIGN, HingeTable

BIN_COLUMNS = segment_sums_sm90.TILE_COLS  # one per thread of a warpgroup


def _pwl_derivative(p: jax.Array, table_ref, num_knots: int, pwl_dtype: str) -> jax.Array:
  """pwl'(p) from the hinge table by a select chain over the ascending knots: slope = s_0,
  then slope = s_{k+1} where p >= t_k (s_{k+1} = s_k + ds_k, on scalars), the segment convention
  of ``pwl_select`` (a point on a knot takes the slope above it). A compare and a select per knot
  (H200, gpt2-small, 64 x 128 ping-pong tiles: the kernel 133 us vs 170 summing
  where(p >= t_k, ds_k, 0); benchmarks/results/dgrad-kernel-2026-12-02-derivative-*.json).
  ``pwl_dtype`` "float16" compares f16(p) with f16 knots like ``apply_activation``'s hinges
  (within 2^-11 |t_k| of a knot the segment may be its neighbour)."""
  dtype = jnp.dtype(pwl_dtype)
  x, entry = p.astype(dtype), lambda i: table_ref[i].astype(jnp.float32)
  at = HingeTable(num_knots)
  segment_slope = entry(at.first_slope)
  slope = segment_slope.astype(dtype) + jnp.zeros_like(x)
  for k in range(num_knots):
    segment_slope = segment_slope + entry(at.step(k))
    slope = jnp.where(x >= entry(at.knot(k)).astype(dtype), segment_slope.astype(dtype), slope)
  return slope.astype(jnp.float32)


def _pwl_value_and_slope(p: jax.Array, table_ref, num_knots: int, pwl_dtype: str):
  """(pwl(p), pwl'(p)): with f16 PWL math on a GPU, one select chain in PTX on f16 pairs
  (``packed_pwl``: 119 vs 133 us at gpt2-small); otherwise, and in interpret mode (no inline
  PTX there), ``apply_activation``'s hinges and ``_pwl_derivative``'s chain in jnp."""
  if jnp.dtype(pwl_dtype) == jnp.float16 and not packed_pwl.interpreting():
    return packed_pwl.value_and_slope(p, table_ref, num_knots)
  return (apply_activation("pwl", p, table_ref, num_knots, pwl_dtype),
          _pwl_derivative(p, table_ref, num_knots, pwl_dtype))


def part_buffers(config: EpilogueConfig) -> int:
  """SMEM buffers for the windows' saved parts: two (the next window's load overlaps this one's
  work), or one when a tile is a single window (its load overlaps the K loop)."""
  return min(2, _num_windows(config))


def _num_windows(config: EpilogueConfig) -> int:
  return config.tile_m // config.window_rows * (config.tile_n // EPILOGUE_N)


def smem_bytes(config: EpilogueConfig, part_dtypes: list, itemsize: int,
               bin_segments: int = 0) -> int:
  """K-pipeline stages + per compute warpgroup two output staging slots, the part buffers and
  (``bin_segments`` K + 1 > 0: a PWL's gradients) its [2 (K+1), 128] f32 segment bins."""
  stage = (config.cta_rows + config.tile_n) * TILE_K * itemsize
  window = config.window_rows * EPILOGUE_N
  parts = part_buffers(config) * sum(jnp.dtype(t).itemsize for t in part_dtypes)
  bins = 2 * 2 * bin_segments * BIN_COLUMNS * 4
  return config.stages * stage + 2 * (2 * itemsize + parts) * window + bins + 1024


def dgrad_activation(dy, w_down, preactivations, table, *, kind: str, num_knots: int,
                     config: EpilogueConfig, segments: bool = False, joint: bool = False,
                     pwl_gradients: bool = False):
  """(h, d_u, d_g or None, None), each [M, H] in dy's dtype (see the module docstring); a GLU's
  with ``joint``: (h, [d_g | d_u] as one [M, 2H] array, None, None), so that XLA's dx is one
  GEMM with K = 2H (``backward.joint_column_gradients``). With ``pwl_gradients`` the last entry
  is the PWL's (d_slopes, d_intercepts), each [K+1] f32 (see the module docstring).

  dy [M, D_out]; w_down [H, D_out]; ``preactivations``: the forward's saved (g, u) (GLU) or (u,)
  (MLP), [M, H] each, in ``backward.save_preactivations``' "preactivations" ((hi, lo) pairs) or
  "floor-bits" ((hi, uint8 bits) for the activation's input, (hi,) for u) form, or with
  ``segments`` ``LOOKUP_SEGMENTS``' ((j,),) (MLP; then h is None: the forward's output is h) or
  ((a, u, j),) (GLU: h = a u), j uint8 (a kind in ``SEGMENT_KINDS``), or with
  ``pwl_gradients`` ``LOOKUP_SEGMENT_INPUTS``' ((p, j),) (MLP: h = s_j p + c_j is written) /
  ((g, u, j),); ``table``: the
  hinge table (``hinge_table.activation_table``, ``kind`` "pwl"), the lookup table
  (``pwl_lookup.lookup_table``, "pwl_lookup"), the counted one (``pwl_lookup.counted_table``,
  "pwl_counted": with ``segments`` only) or None. D_out and H must be multiples of 64
  (the caller pads).
  ``config.schedule``: "cooperative" (both warpgroups on one [2 tile_m, tile_n] tile) or
  "pingpong" (whole tiles in turn, ``pingpong_mainloop``: one warpgroup's epilogue overlaps the
  other's K loop).
  """
  m, d_out = dy.shape
  hidden = w_down.shape[0]
  dtype = dy.dtype
  parts = [part for entry in preactivations for part in entry]
  glu = len(parts) == 3 if segments else len(preactivations) == 2
  if joint and not glu:
    raise ValueError("dgrad_activation: joint=True writes a GLU's d_g and d_u as one array")
  part_dtypes = [part.dtype for part in parts]
  if jnp.dtype(jnp.int8) in part_dtypes:
    raise NotImplementedError("dgrad_activation reads pairs or floor bits, not int8 segments")
  if segments and kind not in SEGMENT_KINDS:
    raise ValueError(f"dgrad_activation: saved segments need a table of the segments' lines "
                     f"(kind in {tuple(SEGMENT_KINDS)}), got kind {kind!r}")
  if pwl_gradients and not (segments and len(parts) == 2 + glu):
    raise ValueError("dgrad_activation: pwl_gradients=True reads the saved segments and the "
                     "PWL's input (LOOKUP_SEGMENT_INPUTS: (p, j) or (g, u, j)), got parts of "
                     f"dtypes {[t.name for t in part_dtypes]} with segments={segments}")
  # h (not an MLP's from its segments alone), d_u, d_g
  num_outputs = 3 if glu else 1 if segments and not pwl_gradients else 2
  bin_segments = (num_knots + 1) * pwl_gradients
  config.check(1, dtype)
  needed = smem_bytes(config, part_dtypes, jnp.dtype(dtype).itemsize, bin_segments)
  if needed > SMEM_BYTES:
    raise NotImplementedError(f"{config} needs {needed} bytes of SMEM > {SMEM_BYTES}")
  tile_m, tile_n, rows = config.tile_m, config.tile_n, config.window_rows
  buffers = part_buffers(config)
  windows = [(r, c) for r in range(tile_m // rows) for c in range(tile_n // EPILOGUE_N)]
  iters = (pl.cdiv(m, config.cta_rows), pl.cdiv(hidden, tile_n), pl.cdiv(d_out, TILE_K))
  inputs = [dy, w_down, *parts] + ([table] if table is not None else [])
  bins_shape = (2, 2 * bin_segments, BIN_COLUMNS)  # per compute warpgroup: S_j, then C_j

  def kernel(*refs):
    (dy_gmem, w_gmem), part_gmems, table_gmem, out_gmems, part_smems, (
        out_smem, table_smem, part_barrier, table_barrier, *ring) = _split_refs(
            refs, (2, len(parts), int(table is not None), len(out_types), len(parts),
                   len(scratch) - len(parts)))
    if pwl_gradients:  # the bins' partial sums are the last output, the bins the next scratch
      *out_gmems, sums_gmem = out_gmems
      bins_smem, *ring = ring
    if joint:  # d_u into the right half of [d_g | d_u], d_g into the left
      h_gmem, gate_up_gmem = out_gmems
      out_gmems = [h_gmem, gate_up_gmem.at[:, pl.ds(hidden, hidden)],
                   gate_up_gmem.at[:, pl.ds(0, hidden)]]
    wg = lax.axis_index("wg")
    if table is not None:
      load_table(table_gmem[0], table_smem, table_barrier.at[0], wg)
    if pwl_gradients:  # each compute thread zeroes its bins before its epilogues add to them
      @pl.when(wg < 2)
      def _():
        segment_sums_sm90.zero_bins(bins_smem, wg)

    def window_of(region, epi):  # epilogue window epi of a warpgroup's [tile_m, tile_n] region
      r, c = windows[epi]
      return region.at[pl.ds(r * rows, rows), pl.ds(c * EPILOGUE_N, EPILOGUE_N)]

    def fetch_parts(region, epi):  # the saved parts of window epi into buffer epi % buffers
      for gmem, smem in zip(part_gmems, part_smems):
        plgpu.copy_gmem_to_smem(window_of(region(gmem), epi), smem.at[wg, epi % buffers],
                                part_barrier.at[wg * buffers + epi % buffers])

    def epilogue(d_hidden, region):
      """Window by window (window 0's parts already requested): decode p (and u), then
      h = act(p) (u), d_u, d_g from d_hidden; TMA-store them to ``region(gmem)``'s window."""
      for epi, (r, c) in enumerate(windows):
        if epi + 1 < len(windows):
          fetch_parts(region, epi + 1)  # its buffer's previous window is already in registers
        plgpu.barrier_wait(part_barrier.at[wg * buffers + epi % buffers])
        loaded = iter([plgpu.load(smem.at[wg, epi % buffers], layout=plgpu.Layout.WGMMA)
                       for smem in part_smems])
        dh = d_hidden[r * rows:(r + 1) * rows, c * EPILOGUE_N:(c + 1) * EPILOGUE_N]
        if segments:  # (j,) or (a, u, j); with pwl_gradients (p, j) or (g, u, j)
          *floats, segment = loaded
          floats = [part.astype(jnp.float32) for part in floats]
          segment = segment.astype(jnp.int32)
          if pwl_gradients:  # a = s_j p + c_j; Σ_j d_a p and Σ_j d_a into the bins
            p = floats[0]
            a, slope = pwl_lookup.line_of_segment(p, segment, table_smem, num_knots)
            d_act = dh * floats[1] if glu else dh
            segment_sums_sm90.add_to_bins(p, d_act, bins_smem, plgpu.Layout.WGMMA,
                                          segment=segment, wg=wg)
          else:
            slope = pwl_lookup.slope_of_segment(segment, table_smem)
            a = floats[0] if glu else None
          values = ([a * floats[-1], dh * a, dh * floats[-1] * slope] if glu
                    else [a, dh * slope] if pwl_gradients else [dh * slope])
          store_slice(values, out_gmems, [out_smem], wg, epi,
                      lambda gmem: window_of(region(gmem), epi))
          continue
        pre = [join_saved(tuple(next(loaded) for _ in entry)) for entry in preactivations]
        if kind == "pwl":
          act, slope = _pwl_value_and_slope(pre[0], table_smem, num_knots, config.pwl_dtype)
        elif kind == "pwl_lookup":
          act, slope = pwl_lookup.value_and_slope(pre[0], table_smem, num_knots)
        else:
          act, slope = exact_activation_and_derivative(kind, pre[0])
        values = [act * pre[1], dh * act, dh * pre[1] * slope] if glu else [act, dh * slope]
        store_slice(values, out_gmems, [out_smem], wg, epi,
                    lambda gmem: window_of(region(gmem), epi))

    if config.schedule == "pingpong":
      def tile_region(m_slice, n_slice):
        return lambda gmem: gmem.at[m_slice, n_slice]

      pingpong_mainloop(
          config, iters, dy_gmem, [w_gmem], ring, wg, b_transposed=True,
          before=lambda m_slice, n_slice: fetch_parts(tile_region(m_slice, n_slice), 0),
          after=lambda accumulators, m_slice, n_slice: epilogue(
              accumulators[0], tile_region(m_slice, n_slice)))
    else:
      cooperative(config, iters, dy_gmem, w_gmem, wg, fetch_parts, epilogue)
    if pwl_gradients:
      @pl.when(wg < 2)
      def _():
        plgpu.commit_smem()  # every thread's bin writes, before the TMA store reads them
        plgpu.copy_smem_to_gmem(bins_smem.at[wg], sums_gmem.at[lax.axis_index("sm"), wg])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  scratch = [plgpu.SMEM((2, buffers, rows, EPILOGUE_N), t, transforms=_swizzled(EPILOGUE_N, t))
             for t in part_dtypes] + [
      plgpu.SMEM((2, 2, rows, EPILOGUE_N), dtype, transforms=_swizzled(EPILOGUE_N, dtype)),
      plgpu.SMEM((TABLE_ALIGN if table is None else table.shape[0],), jnp.float32),
      plgpu.Barrier(num_arrivals=len(parts), num_barriers=2 * buffers),
      plgpu.Barrier(num_barriers=1),
  ]
  if pwl_gradients:
    scratch.append(plgpu.SMEM(bins_shape, jnp.float32))
  if config.schedule == "pingpong":
    scratch += pingpong_ring(config, 1, dtype, b_transposed=True)
  out_types = [jax.ShapeDtypeStruct((m, hidden), dtype)] * num_outputs
  if joint:
    out_types = [out_types[0], jax.ShapeDtypeStruct((m, 2 * hidden), dtype)]
  if pwl_gradients:  # one partial per CTA of the persistent grid
    ctas = min(num_sms(), iters[0] * iters[1])
    out_types.append(jax.ShapeDtypeStruct((ctas, *bins_shape), jnp.float32))
  outputs = launch_persistent(kernel, out_types, iters[0] * iters[1], scratch, inputs)
  pwl_sums = None
  if pwl_gradients:  # the CTAs' and warpgroups' bins: [ctas, 2, 2 (K+1), 128] -> S, C
    *outputs, partials = outputs
    pwl_sums = tuple(partials.sum(axis=(0, 1, 3)).reshape(2, bin_segments))
  if segments and not glu and not pwl_gradients:
    return None, outputs[0], None, pwl_sums
  h, d_u, *rest = outputs
  return h, d_u, (rest[0] if glu and not joint else None), pwl_sums


def cooperative(config: EpilogueConfig, iters, dy_gmem, w_gmem, wg, fetch_parts, epilogue):
  """The "cooperative" schedule: both compute warpgroups on one [2 tile_m, tile_n] tile,
  ``emit_pipeline_warp_specialized`` over D_out; each runs the epilogue of its tile_m rows."""
  m_iters, n_iters, k_iters = iters
  tile_m = config.tile_m
  transforms = _swizzled(TILE_K, dy_gmem.dtype)

  def make_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=MEMORY_REGISTERS,
        in_specs=[plgpu.BlockSpec((config.cta_rows, TILE_K), lambda k: (0, k),
                                  transforms=transforms),
                  plgpu.BlockSpec((config.tile_n, TILE_K), lambda k: (0, k),
                                  transforms=transforms)],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.stages,
        compute_context=compute_context)

  def tile(m_slice, n_slice, allocations):
    wg_rows = pl.ds(wg * tile_m, tile_m)
    region = lambda gmem: gmem.at[m_slice, n_slice].at[wg_rows, :]

    def compute_context(eval_pipeline):
      def with_accumulator(d_hidden):
        fetch_parts(region, 0)  # lands while the K loop runs
        eval_pipeline(d_hidden)
        epilogue(d_hidden, region)

      pl.run_scoped(with_accumulator, plgpu.ACC((tile_m, config.tile_n), jnp.float32))

    def mma(_, dy_smem, w_smem, d_hidden):
      plgpu.wgmma(d_hidden, dy_smem.at[wg_rows], w_smem.T)
      plgpu.wgmma_wait(0)  # see gemm1_activation: no wgmma left in flight across tiles
      return d_hidden

    make_pipeline(mma, compute_context)(
        dy_gmem.at[m_slice, :], w_gmem.at[n_slice, :], allocations=allocations)

  for_each_tile(config, m_iters, n_iters, make_pipeline, (dy_gmem, w_gmem), tile)
