"""The backward's first GEMM with the activation's derivative in its epilogue (Hopper, sm_90).

For saved pre-activations (``backward.split_preactivation`` pairs) p = g (GLU) or u (MLP):

    d_hidden = dy W_down^T                       [M, H], f32 in registers only
    MLP:  h = act(u),        d_u = d_hidden act'(u),                  d_act = d_hidden
    GLU:  a = act(g), h = a u,  d_u = d_hidden a,  d_g = d_hidden u act'(g),  d_act = d_hidden u

written in dy's dtype (d_act only for a PWL, whose parameter gradients sum it per segment).
XLA then runs dW_down = h^T dy, dW_up = x^T d_u, dx = d_u W_up^T (+ the gate terms). Against the
chunked XLA backward this removes the f32 d_hidden round trip through HBM and one elementwise
pass (benchmarks/NOTES.md, fifth 12-01 session: ~57 us of gpt2-small's 500 us step).

Same skeleton as ``fused_ffn_sm90.gemm1_activation``: persistent grid over [2 tile_m, tile_n]
tiles, two compute warpgroups, a warp-specialized pipeline over D_out. W_down [H, D_out] is read
in [tile_n, 64] blocks and used transposed as wgmma's B operand. The epilogue walks [tile_m, 64]
slices; each slice's saved pairs are TMA-loaded into one of two SMEM buffers while the previous
slice computes (the first slice's while the K loop runs). PWL derivatives come from the hinge
table: pwl'(p) = s_0 + sum_k ds_k [p >= t_k].

On the H200 (2026-12-01, benchmarks/NOTES.md) it is correct for exact activations and slower
than what it replaces (SmolLM2 ~135 vs ~85 us, gpt2-small ~205 vs ~155 us: the K loop, the part
loads, the activation math and the stores of a tile run one after another). With a PWL its
outputs match XLA elementwise, but the PWL-parameter gradients missed 1e-2 on rare inputs (1.5e-2
in one of three H200 runs; once in ~40 interpret-mode seeds; its bf16 d_act, or the saved pairs
moving a pre-activation across a knot, benchmarks/NOTES.md), so
``dispatch.ffn_mosaic_gpu`` refuses that combination (an f32 d_act would need an f32 staging
slot). No ``Plan`` selects it (opt-in: ``Plan(backward="epilogue")``).
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.activation import exact_activation_and_derivative
from pallas_kernels.gpu.backward import join_preactivation
from pallas_kernels.gpu.fused_ffn_sm90 import (EPILOGUE_N, MEMORY_REGISTERS, SMEM_BYTES,
                                               TABLE_ALIGN, TILE_K, EpilogueConfig, _split_refs,
                                               _swizzled, apply_activation, for_each_tile,
                                               launch_persistent, load_table, store_slice)


def _pwl_derivative(p: jax.Array, table_ref, num_knots: int) -> jax.Array:
  """pwl'(p) = s_0 + sum_k ds_k [p >= t_k] from ``activation_table`` (the segment convention of
  ``pwl_select``: a point on a knot takes the slope above it)."""
  slope = table_ref[2 * num_knots] + jnp.zeros_like(p)
  for k in range(num_knots):
    slope = slope + jnp.where(p >= table_ref[k], table_ref[num_knots + k], 0.0)
  return slope


def part_buffers(config: EpilogueConfig) -> int:
  """SMEM buffers for the slices' saved parts: two (the next slice's load overlaps this one's
  work), or one when a tile is a single slice (its load overlaps the K loop)."""
  return min(2, config.tile_n // EPILOGUE_N)


def smem_bytes(config: EpilogueConfig, num_parts: int, itemsize: int) -> int:
  """K-pipeline stages + per compute warpgroup two output staging slots and the part buffers."""
  stage = (2 * config.tile_m + config.tile_n) * TILE_K * itemsize
  slice_bytes = config.tile_m * EPILOGUE_N * itemsize
  return (config.stages * stage + 2 * (2 + part_buffers(config) * num_parts) * slice_bytes
          + 1024)


def dgrad_activation(dy, w_down, preactivations, table, *, kind: str, num_knots: int,
                     config: EpilogueConfig, with_d_act: bool):
  """(h, d_u, d_g or None, d_act or None), each [M, H] in dy's dtype (see the module docstring).

  dy [M, D_out]; w_down [H, D_out]; ``preactivations``: ((g_hi, g_lo), (u_hi, u_lo)) (GLU) or
  ((u_hi, u_lo),) (MLP), [M, H] in dy's dtype; ``table`` from ``activation_table`` (PWL) or None.
  D_out and H must be multiples of 64 (the caller pads).
  """
  m, d_out = dy.shape
  hidden = w_down.shape[0]
  dtype = dy.dtype
  glu = len(preactivations) == 2
  parts = [part for pair in preactivations for part in pair]
  num_outputs = (3 if glu else 2) + int(with_d_act)
  if config.schedule != "cooperative":
    raise NotImplementedError(f"dgrad_activation runs the cooperative schedule only, got {config}")
  config.check(1, dtype)
  needed = smem_bytes(config, len(parts), jnp.dtype(dtype).itemsize)
  if needed > SMEM_BYTES:
    raise NotImplementedError(f"{config} needs {needed} bytes of SMEM > {SMEM_BYTES}")
  tile_m, tile_n = config.tile_m, config.tile_n
  cta_m = 2 * tile_m
  slices, buffers = tile_n // EPILOGUE_N, part_buffers(config)
  m_iters, n_iters, k_iters = pl.cdiv(m, cta_m), pl.cdiv(hidden, tile_n), pl.cdiv(d_out, TILE_K)
  operand_transforms = _swizzled(TILE_K, dtype)
  slice_transforms = _swizzled(EPILOGUE_N, dtype)
  inputs = [dy, w_down, *parts] + ([table] if table is not None else [])

  def make_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=MEMORY_REGISTERS,
        in_specs=[plgpu.BlockSpec((cta_m, TILE_K), lambda k: (0, k), transforms=operand_transforms),
                  plgpu.BlockSpec((tile_n, TILE_K), lambda k: (0, k),
                                  transforms=operand_transforms)],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.stages,
        compute_context=compute_context)

  def kernel(*refs):
    (dy_gmem, w_gmem), part_gmems, table_gmem, out_gmems, (
        out_smem, part_smem, table_smem, part_barrier, table_barrier) = _split_refs(
            refs, (2, len(parts), int(table is not None), num_outputs, 5))
    wg = lax.axis_index("wg")
    if table is not None:
      load_table(table_gmem[0], table_smem, table_barrier.at[0], wg)

    def tile(m_slice, n_slice, allocations):
      wg_rows = pl.ds(wg * tile_m, tile_m)

      def slice_of(gmem, epi):
        return gmem.at[m_slice, n_slice].at[wg_rows, pl.ds(epi * EPILOGUE_N, EPILOGUE_N)]

      def fetch_parts(epi):  # the saved pairs of slice epi into buffer epi % buffers
        for i, gmem in enumerate(part_gmems):
          plgpu.copy_gmem_to_smem(slice_of(gmem, epi), part_smem.at[wg, epi % buffers, i],
                                  part_barrier.at[wg * buffers + epi % buffers])

      def compute_context(eval_pipeline):
        def with_accumulator(d_hidden):
          fetch_parts(0)  # lands while the K loop runs
          eval_pipeline(d_hidden)
          for epi in range(slices):
            if epi + 1 < slices:
              fetch_parts(epi + 1)  # its buffer's previous slice is already in registers
            plgpu.barrier_wait(part_barrier.at[wg * buffers + epi % buffers])
            loaded = [plgpu.load(part_smem.at[wg, epi % buffers, i], layout=plgpu.Layout.WGMMA)
                      for i in range(len(parts))]
            pre = [join_preactivation(loaded[2 * j], loaded[2 * j + 1])
                   for j in range(len(preactivations))]
            dh = d_hidden[:, epi * EPILOGUE_N:(epi + 1) * EPILOGUE_N]
            if kind == "pwl":
              act = apply_activation(kind, pre[0], table_smem, num_knots)
              slope = _pwl_derivative(pre[0], table_smem, num_knots)
            else:
              act, slope = exact_activation_and_derivative(kind, pre[0])
            if glu:
              d_act = dh * pre[1]
              values = [act * pre[1], dh * act, d_act * slope]
            else:
              d_act = dh
              values = [act, dh * slope]
            values += [d_act] if with_d_act else []
            store_slice(values, out_gmems, [out_smem], wg, epi,
                        lambda gmem: slice_of(gmem, epi))

        pl.run_scoped(with_accumulator, plgpu.ACC((tile_m, tile_n), jnp.float32))

      def mma(_, dy_smem, w_smem, d_hidden):
        plgpu.wgmma(d_hidden, dy_smem.at[wg_rows], w_smem.T)
        plgpu.wgmma_wait(0)  # see gemm1_activation: no wgmma left in flight across tiles
        return d_hidden

      make_pipeline(mma, compute_context)(
          dy_gmem.at[m_slice, :], w_gmem.at[n_slice, :], allocations=allocations)

    for_each_tile(config, m_iters, n_iters, make_pipeline, (dy_gmem, w_gmem), tile)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  scratch = [
      plgpu.SMEM((2, 2, tile_m, EPILOGUE_N), dtype, transforms=slice_transforms),
      plgpu.SMEM((2, buffers, len(parts), tile_m, EPILOGUE_N), dtype,
                 transforms=slice_transforms),
      plgpu.SMEM((TABLE_ALIGN if table is None else table.shape[0],), jnp.float32),
      plgpu.Barrier(num_arrivals=len(parts), num_barriers=2 * buffers),
      plgpu.Barrier(num_barriers=1),
  ]
  outputs = launch_persistent(kernel, [jax.ShapeDtypeStruct((m, hidden), dtype)] * num_outputs,
                              m_iters * n_iters, scratch, inputs)
  h, d_u, *rest = outputs
  d_g = rest.pop(0) if glu else None
  return h, d_u, d_g, (rest[0] if with_d_act else None)
