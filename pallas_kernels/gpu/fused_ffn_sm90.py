"""Pallas Mosaic GPU kernels for the FFN on Hopper (sm_90): TMA loads, wgmma, warp specialisation.

Every kernel runs three warpgroups: two compute warpgroups issue wgmma (bf16/f16 operands, f32
accumulators in registers) and evaluate the activation in f32; one memory warpgroup issues the TMA
copies GMEM -> SMEM. TMA zero-fills reads past an array's end and clips writes, so M, D and H need
not be multiples of the tiles (the swizzled minor dimensions must be multiples of 64: the caller
pads the rare shapes that are not).

``gemm1_activation`` -- the first GEMM with the activation fused into its epilogue:

    MLP:  a = act(x @ W_up + b_up)
    GLU:  a = act(x @ W_gate + b_gate) * (x @ W_up + b_up)

written once to HBM in x's dtype; the caller runs ``a @ W_down`` in XLA. Persistent grid (one CTA
per SM); ``EpilogueConfig.schedule`` picks how its two compute warpgroups split the tiles:
"cooperative" -- [2 tile_m, tile_n] CTA tiles, tile_m rows each, stepping over D in tile_k slices
with `plgpu.emit_pipeline_warp_specialized`; "pingpong" -- whole [tile_m, tile_n] tiles in turn,
fed by a hand-written ring, so one warpgroup's epilogue overlaps the other's mainloop.

``fused_ffn`` -- both GEMMs in one kernel, for small D. A CTA owns 64 rows of x (all of D stays in
SMEM) and loops over hidden blocks j of ``block_h`` columns:

    h_j  = act(x W_gate[:, j] + b) * (x W_up[:, j] + b)    each compute WG: block_h/2 columns of h_j
    y   += h_j W_down[j, :]                                 each compute WG: D_out/2 columns of y

h_j goes registers -> SMEM (x's dtype) -> wgmma and never reaches HBM; y (64 x D_out/2 f32 per
warpgroup) stays in registers, which is what bounds D_out (<= 640). GEMM1 streams W_up/W_gate in
[64, block_h] chunks through ``stages`` buffers; W_down[j, :] has one buffer that the memory
warpgroup refills while GEMM1 of block j runs. With ``h_splits`` > 1 the hidden blocks are split
over that many CTAs per row block and each writes an f32 partial y that the caller sums: at decode
(M <= 64) this spreads the weight stream over many SMs.

Measured on the H200 (benchmarks/NOTES.md): ``gemm1_activation`` + XLA GEMM2 beats XLA at D = 576
and 768; ``fused_ffn`` is slower than that pair wherever it fits (its 64-row blocks re-stream
the weights from L2 for every 64 rows, and its wgmma tiles are only 32 columns wide), so the
dispatcher does not pick it; it stays as the measured starting point for a cluster version.
Large D (D_out > 640): a cluster splitting D_out with h shared through DSMEM is designed and
costed in benchmarks/NOTES.md ("Design for large D"); at most it saves the [M, H] round trip
(3-6% of the forward at the llama shapes), less than its L2 re-streaming costs, so it is not built.

PWL activations are evaluated as hinges (``hinge_table``), 2 instructions per knot, in f32
or in packed f16x2, as max(h, t_k) or relu(h - t_k) (``HINGES``); in ``gemm1_activation``, a PWL
with evenly spaced knots also by one table lookup per element (kind "pwl_lookup", ``pwl_lookup``);
a training forward that saves segments for the dgrad kernel counts other knots and looks up the
segment's line (kind "pwl_counted").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.activation import exact_activation
from pallas_kernels.gpu import packed_pwl, pwl_lookup
from pallas_kernels.gpu.backward import save_preactivations
from pallas_kernels.gpu.hinge_table import MAX_TMA_BOX, TABLE_ALIGN, HingeTable

WGMMA_ROWS = 64  # rows of one wgmma (and of a fused-kernel row block)
TILE_K = 64  # contraction slice: 64 bf16 = one 128-byte swizzle row
MAX_WGMMA_N = 256
EPILOGUE_N = 64  # columns per epilogue slice of gemm1_activation
SMEM_BYTES = 227 * 1024 - 4096  # sm_90's 227 KiB per block, less Pallas' barriers and scratch
H100_SMS = 132  # used when lowering without a GPU attached
MEMORY_REGISTERS = 40  # per thread, memory warpgroup (compute warpgroups get the rest)
COMPUTE_REGISTERS = 232


def num_sms() -> int:
  device = jax.devices()[0]
  return device.core_count if device.platform == "gpu" else H100_SMS


# How ``apply_activation`` writes the hinges (same PWL, 2 instructions per knot either way):
#   "max"  -- Δs_k max(h, t_k): the max is HMNMX2 / FMNMX, ALU pipe (half the FMA pipe's rate);
#   "relu" -- Δs_k relu(h - t_k): with f16 math on a GPU one ``fma.rn.relu.f16x2`` (h 1 - t_k;
#             FMA pipe, ``packed_pwl.relu_hinges``). Faster on the H200 where the ALU pipe is
#             also busy with the floor bits' encoding, and at gpt2-xl; slower at SmolLM2's and
#             gpt2-small's inference forward (which plans use it and the times: ``dispatch``).
HINGES = ("max", "relu")


def apply_activation(kind: str, h: jax.Array, table_ref, num_knots: int,
                     pwl_dtype: str = "float32", hinges: str = "max") -> jax.Array:
  """act(h) on an f32 register tile. ``kind`` "pwl" reads its hinge table (``hinge_table``) from
  SMEM, "pwl_lookup" (evenly spaced knots) its lookup table (``pwl_lookup``: one table lookup per
  element in f32; ``pwl_dtype`` and ``hinges`` do not apply); other kinds are exact.

  ``pwl_dtype="float16"`` evaluates the hinges in packed f16x2 arithmetic (half the instructions;
  pre-activations must stay below 65504 in magnitude); ``hinges`` picks their form (``HINGES``).
  Interpret mode has no inline PTX: it runs the relu form in jnp (same roundings, unfused fma).
  """
  if kind == "pwl_lookup":
    return pwl_lookup.lookup(h, table_ref, num_knots)
  if kind != "pwl":
    return exact_activation(kind, h)
  dtype = jnp.dtype(pwl_dtype)
  if hinges == "relu" and dtype == jnp.float16 and not packed_pwl.interpreting():
    return packed_pwl.relu_hinges(h, table_ref, num_knots)
  entry, at = lambda i: table_ref[i].astype(dtype), HingeTable(num_knots)
  x = h.astype(dtype)
  if hinges == "relu":  # s_0 h + c_0 + Σ Δs_k relu(h - t_k)
    constant, hinge = entry(at.first_intercept), lambda t: jnp.maximum(x - t, 0)
  else:  # s_0 h + c + Σ Δs_k max(h, t_k)
    constant, hinge = entry(at.max_constant), lambda t: jnp.maximum(x, t)
  out = entry(at.first_slope) * x + constant
  for k in range(num_knots):
    out = out + entry(at.step(k)) * hinge(entry(at.knot(k)))
  return out.astype(jnp.float32)


def _swizzled(minor: int, dtype) -> tuple:
  """SMEM transforms for a wgmma operand / TMA box whose minor dimension has ``minor`` elements."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _swizzle_64b(dtype) -> tuple:
  """64-byte swizzle: the fused kernel slices operands in 32-column halves, and wgmma needs the
  same swizzle on both operands."""
  return _swizzled(64 // jnp.dtype(dtype).itemsize, dtype)


def _add_bias(acc: jax.Array, bias_ref, axis: int = 1) -> jax.Array:
  """acc [rows, n] + bias [n] (a slice in SMEM), broadcast along the wgmma accumulator rows; with
  ``axis=0`` acc + bias[rows][:, None] (a bias per row: swapped operands)."""
  vector = plgpu.load(bias_ref, layout=plgpu.Layout.WGMMA.reduce(1 - axis)).astype(jnp.float32)
  return acc + lax.broadcast_in_dim(vector, acc.shape, [axis])


def _split_refs(refs, counts):
  """Split a flat sequence of kernel refs into groups of the given sizes."""
  groups, start = [], 0
  for count in counts:
    groups.append(refs[start:start + count])
    start += count
  return groups


def load_table(table_gmem, table_smem, barrier, wg) -> None:
  """Warpgroup 0 copies the PWL hinge table into SMEM; both compute warpgroups wait for it."""
  @pl.when(wg == 0)
  def _():
    plgpu.copy_gmem_to_smem(table_gmem, table_smem, barrier)

  @pl.when(wg < 2)
  def _():
    plgpu.barrier_wait(barrier)


def tile_slices(config, linear, m_iters: int, n_iters: int) -> tuple:
  """(rows, columns) of the ``linear``-th [config.cta_rows, tile_n] output tile in planar-snake
  order (``grid_minor_dim``, ``grid_tile_width``)."""
  mi, ni = plgpu.planar_snake(linear, (m_iters, n_iters), config.grid_minor_dim,
                              config.grid_tile_width)
  return pl.ds(mi * config.cta_rows, config.cta_rows), pl.ds(ni * config.tile_n, config.tile_n)


def for_each_tile(config, m_iters: int, n_iters: int, make_pipeline, gmems, tile_body) -> None:
  """The persistent loop of a warp-specialized GEMM kernel: the K pipeline's SMEM is allocated
  once, and each CTA walks its share of the [2 tile_m, tile_n] output tiles in planar-snake
  order calling ``tile_body(m_slice, n_slice, allocations)``."""
  ignore = lambda *_, **__: None

  @functools.partial(pl.run_scoped,
                     allocations=make_pipeline(ignore, ignore).get_allocations(*gmems),
                     collective_axes="wg")
  def _(allocations):
    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _(loop_info):
      (linear,) = loop_info.index
      tile_body(*tile_slices(config, linear, m_iters, n_iters), allocations)


def staging_order(buffer_of: list[int], slots: list[int], windows: int) -> list[tuple[int, int]]:
  """(buffer, slot) of each TMA store of a tile's first ``windows`` epilogue windows: store j of
  a window goes through buffer ``buffer_of[j]``, whose ``slots[b]`` slots are taken in turn."""
  taken = [0] * len(slots)
  order = []
  for _ in range(windows):
    for b in buffer_of:
      order.append((b, taken[b] % slots[b]))
      taken[b] += 1
  return order


def store_slice(values, gmems, staging, wg, epi: int, destination) -> None:
  """TMA-store epilogue window ``epi``'s values (one per output, ``destination(gmem)`` its
  window) through the warpgroup's SMEM staging: ``staging`` holds one [2 warpgroups, slots,
  rows, EPILOGUE_N] buffer per output (``EpilogueConfig.staging="per_output"``), or an x-dtype
  buffer the wide outputs take in turn plus, for one-byte outputs, a one-byte one ("shared"). A slot
  is refilled once the store that last used it has read it: with k stores issued since,
  ``wait_smem_to_gmem(k)``; a slot not yet used in this tile needs no wait, because a tile's
  first store waits for all (the previous tile's stores may have left the slots in another
  turn)."""
  if len(staging) == len(values):
    buffer_of = list(range(len(values)))
  else:
    buffer_of = [len(staging) - 1 if gmem.dtype.itemsize == 1 else 0 for gmem in gmems]
  order = staging_order(buffer_of, [buffer.shape[1] for buffer in staging], epi + 1)
  first = len(order) - len(values)
  for j, (value, gmem) in enumerate(zip(values, gmems)):
    index = first + j
    earlier = [i for i in range(index) if order[i] == order[index]]
    if index == 0 or earlier:
      plgpu.wait_smem_to_gmem(index - 1 - earlier[-1] if earlier else 0, wait_read_only=True)
    buffer, slot = order[index]
    slot_ref = staging[buffer].at[wg, slot]
    slot_ref[...] = value.astype(slot_ref.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(slot_ref, destination(gmem))


def pingpong_ring(config, num_b: int, dtype, *, b_transposed: bool) -> list:
  """Scratch of ``pingpong_mainloop``: the K-step ring ([stages] A blocks [tile_m, TILE_K] and
  [stages, num_b] B blocks, [TILE_K, tile_n] or [tile_n, TILE_K] when ``b_transposed``), its
  per-warpgroup ``ready`` barriers and per-buffer ``free`` barriers."""
  transforms = _swizzled(TILE_K, dtype)
  b_block = (config.tile_n, TILE_K) if b_transposed else (TILE_K, config.tile_n)
  return [
      plgpu.SMEM((config.stages, config.tile_m, TILE_K), dtype, transforms=transforms),
      plgpu.SMEM((config.stages, num_b, *b_block), dtype, transforms=transforms),
      plgpu.Barrier(num_arrivals=1 + num_b, num_barriers=2 * config.stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=config.stages),
  ]


def pingpong_mainloop(config, iters: tuple[int, int, int], a_gmem, b_gmems, ring, wg, *,
                      b_transposed: bool, before, after) -> None:
  """The "pingpong" schedule of a persistent GEMM kernel: acc_i = A B_i for each [tile_m, tile_n]
  output tile (B_i read as [K, N] blocks, or as [N, K] blocks used transposed).

  ``iters`` = (M, N, K) tile counts. Local tile i of a CTA belongs to compute warpgroup i % 2;
  its K step k is ring step s = i k_iters + k in buffer s % stages (``ring`` from
  ``pingpong_ring``). The memory warpgroup fills the ring in step order (waiting for
  ``free[slot]``, released by whichever warpgroup read it); warpgroup w waits on its own
  ``ready[w, slot]`` barriers, so each barrier's phases are waited on in order. The owner calls
  ``before(m_slice, n_slice)`` ahead of the tile's K loop (loads that land while it runs) and
  ``after(accumulators, m_slice, n_slice)`` once its wgmmas are done: one warpgroup's epilogue
  overlaps the other's mainloop."""
  m_iters, n_iters, k_iters = iters
  stages = config.stages
  a_smem, b_smem, ready, free = ring

  def ready_barrier(owner, slot):
    return ready.at[owner * stages + slot]

  @pl.when(wg == 2)
  def _memory_warpgroup():
    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _(info):
      m_slice, n_slice = tile_slices(config, info.index[0], m_iters, n_iters)
      owner = lax.rem(info.local_index, 2)

      @pl.loop(0, k_iters)
      def _(k):
        step = info.local_index * k_iters + k
        slot = lax.rem(step, stages)

        @pl.when(step >= stages)
        def _():
          plgpu.barrier_wait(free.at[slot])

        k_slice = pl.ds(k * TILE_K, TILE_K)
        plgpu.copy_gmem_to_smem(a_gmem.at[m_slice, k_slice], a_smem.at[slot],
                                ready_barrier(owner, slot))
        for i, b in enumerate(b_gmems):
          block = b.at[n_slice, k_slice] if b_transposed else b.at[k_slice, n_slice]
          plgpu.copy_gmem_to_smem(block, b_smem.at[slot, i], ready_barrier(owner, slot))

    # observe each buffer's last release before the barriers go away
    sm, grid = lax.axis_index("sm"), lax.axis_size("sm")
    steps = (m_iters * n_iters - sm + grid - 1) // grid * k_iters
    for slot in range(stages):
      @pl.when(slot < steps)
      def _():
        plgpu.barrier_wait(free.at[slot])

  @pl.when(wg < 2)
  def _compute_warpgroup():
    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _(info):
      @pl.when(lax.rem(info.local_index, 2) == wg)
      def _():
        m_slice, n_slice = tile_slices(config, info.index[0], m_iters, n_iters)
        before(m_slice, n_slice)

        def with_accumulators(*accumulators):
          first = info.local_index * k_iters

          @pl.loop(0, k_iters)
          def _(k):
            slot = lax.rem(first + k, stages)
            plgpu.barrier_wait(ready_barrier(wg, slot))
            for i, acc in enumerate(accumulators):
              block = b_smem.at[slot, i]
              plgpu.wgmma(acc, a_smem.at[slot], block.T if b_transposed else block)
            plgpu.wgmma_wait(1)  # the previous step's wgmma has read its buffers

            @pl.when(k > 0)
            def _():
              plgpu.barrier_arrive(free.at[lax.rem(first + k - 1, stages)])

          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[lax.rem(first + k_iters - 1, stages)])
          after(accumulators, m_slice, n_slice)

        pl.run_scoped(with_accumulators,
                      *[plgpu.ACC((config.tile_m, config.tile_n), jnp.float32)] * len(b_gmems))


def launch_persistent(kernel, out_type, tiles: int, scratch, inputs):
  """Run a three-warpgroup kernel (two compute, one memory) on one CTA per SM, at most ``tiles``."""
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(min(num_sms(), tiles),), grid_names=("sm",), num_threads=3,
      thread_name="wg", scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(*inputs)


# ------------------------------------------------------------------------------------------------
# GEMM1 + activation epilogue
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpilogueConfig:
  """Tiles of ``gemm1_activation``: each compute warpgroup owns [tile_m, tile_n] of ``a``.

  ``schedule`` says how the two compute warpgroups share the work:

    * "cooperative" -- both work on one [2 tile_m, tile_n] CTA tile (the weight slice of a K
      step is loaded once for both) and run its epilogue at the same time, so the tensor cores
      idle while the activation is evaluated and stored;
    * "pingpong"    -- each warpgroup owns whole [tile_m, tile_n] tiles, alternating; one ring
      of K-step buffers is filled in tile order, so one warpgroup's mainloop runs while the
      other evaluates and stores its epilogue.

  The epilogue walks a tile in [rows, EPILOGUE_N] windows (rows = tile_m cooperative, 64
  ping-pong) so the activation's temporaries stay small, and TMA-stores each window's outputs
  (``a`` and any saved parts) through SMEM staging slots, ``staging``:

    * "shared"     -- two slots per warpgroup in x's dtype taken in turn (plus one one-byte
      slot when segments or floor bits are saved): one store in flight while the next is staged;
    * "per_output" -- each output its own slot (two when ``a`` is the only output): with n
      outputs, n - 1 stores stay in flight. More SMEM. Built for the residual-saving forward
      (3-4 stores per window); on the H200 it changed the training step's forward kernel by
      under 1% (SmolLM2 79.0 -> 78.2 us, gpt2-small 91.6 -> 90.9), so no plan uses it: the
      stores were not what the residuals cost (benchmarks/NOTES.md, eighth session).
  """

  tile_m: int = 128
  tile_n: int = 128
  stages: int = 3
  grid_minor_dim: int = 1  # planar-snake tile order: 1 walks along H first, 0 along M first
  grid_tile_width: int = 8
  pwl_dtype: str = "float32"  # arithmetic of the PWL hinges (see apply_activation)
  schedule: str = "cooperative"
  staging: str = "shared"
  hinges: str = "max"  # form of the PWL hinges (``HINGES``)

  def __post_init__(self):
    if self.hinges not in HINGES:
      raise ValueError(f"hinges={self.hinges!r}: expected one of {HINGES}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r}: expected one of {SCHEDULES}")
    if self.staging not in STAGINGS:
      raise ValueError(f"staging={self.staging!r}: expected one of {STAGINGS}")

  @property
  def window_rows(self) -> int:
    """Rows of one epilogue window (and of its SMEM staging slots)."""
    return self.tile_m if self.schedule == "cooperative" else WGMMA_ROWS

  @property
  def cta_rows(self) -> int:
    """Rows of x one K step loads: both warpgroups' tiles when they cooperate."""
    return 2 * self.tile_m if self.schedule == "cooperative" else self.tile_m

  def check(self, num_weights: int, dtype, saved: tuple = ()) -> None:
    """NotImplementedError when the tiles break a wgmma / register / SMEM limit (``saved``: the
    dtypes of the saved parts the epilogue also stores besides ``a`` in x's ``dtype``; see
    ``saved_part_dtypes``)."""
    if self.stages < 2:
      raise NotImplementedError(f"stages={self.stages}: the pipeline keeps one wgmma in flight")
    if self.tile_m % WGMMA_ROWS or self.tile_n % EPILOGUE_N or self.tile_n > MAX_WGMMA_N:
      raise NotImplementedError(f"tiles {self.tile_m}x{self.tile_n}: need tile_m % 64 == 0 and "
                                f"tile_n a multiple of {EPILOGUE_N} up to {MAX_WGMMA_N}")
    accumulator_registers = num_weights * self.tile_m * self.tile_n // 128
    if accumulator_registers > 128:
      raise NotImplementedError(f"{accumulator_registers} accumulator registers per thread > 128")
    needed = self.smem_bytes(num_weights, dtype, saved)
    if needed > SMEM_BYTES:
      raise NotImplementedError(f"{self} needs {needed} bytes of SMEM > {SMEM_BYTES}" + (
          f" with the staging of saved parts {saved}" if saved else ""))

  def staging_buffers(self, out_dtypes: list) -> list[tuple[int, jnp.dtype]]:
    """(slots, dtype) of each SMEM staging buffer of a warpgroup for outputs of these dtypes
    (``a``'s first; see ``staging``)."""
    out_dtypes = [jnp.dtype(t) for t in out_dtypes]
    if self.staging == "per_output":
      return [(2 if len(out_dtypes) == 1 else 1, t) for t in out_dtypes]
    one_byte = [t for t in out_dtypes[1:] if t.itemsize == 1]
    if len(set(one_byte)) > 1:
      raise ValueError(f"staging: one one-byte output dtype per kernel, got {one_byte}")
    return [(2, out_dtypes[0])] + [(1, t) for t in one_byte[:1]]

  def smem_bytes(self, num_weights: int, dtype, saved: tuple = ()) -> int:
    itemsize = jnp.dtype(dtype).itemsize
    stage = (self.cta_rows + num_weights * self.tile_n) * TILE_K * itemsize
    staging = 2 * self.window_rows * EPILOGUE_N * sum(
        slots * t.itemsize for slots, t in self.staging_buffers([dtype, *saved]))
    return self.stages * stage + staging + 2 * num_weights * self.tile_n * itemsize + 1024


SCHEDULES = ("cooperative", "pingpong")
STAGINGS = ("shared", "per_output")


# ``gemm1_activation``'s saves= for a PWL evaluated by its segment's line (kinds
# ``SEGMENT_KINDS``): the segment j each element took, as uint8 (a GLU also a = act(g) and u in
# x's dtype) - with an MLP's output h, which its dgrad kernel then need not recompute, all the
# backward reads (a GLU's dgrad kernel writes h = a u; ``dispatch.Plan.lookup_residuals``)
LOOKUP_SEGMENTS = "lookup-segments"
# the same for a PWL whose slopes and intercepts are trained: the activation's input p in x's
# dtype - an MLP's (p, j), a GLU's (g, u, j) - from which the dgrad kernel writes h
# (s_j p + c_j, times u for a GLU) and also sums the PWL's gradients per segment (``dgrad_sm90``)
LOOKUP_SEGMENT_INPUTS = "lookup-segment-inputs"
SEGMENT_SAVES = (LOOKUP_SEGMENTS, LOOKUP_SEGMENT_INPUTS)
# kind -> (pwl(h), j) on an f32 tile (table, K, pwl_dtype): the lookup of evenly spaced knots
# ("pwl_lookup", ``pwl_lookup.lookup_table``), or a count of any knots ("pwl_counted",
# ``pwl_lookup.counted_table``; a forward that saves ``LOOKUP_SEGMENTS`` only)
SEGMENT_KINDS = {
    "pwl_lookup": lambda h, table, num_knots, _: pwl_lookup.value_and_segment(h, table, num_knots),
    "pwl_counted": pwl_lookup.counted_value_and_segment,
}


def saved_part_dtypes(saves: str | None, num_weights: int, dtype) -> list[tuple]:
  """The dtypes of each pre-activation's saved parts in ``backward.save_preactivations``' form
  (e.g. GLU "segments": [(bf16, int8), (bf16,)]), or ``LOOKUP_SEGMENTS``' [(uint8,)] (MLP) /
  [(x's dtype, x's dtype, uint8)] (GLU: a, u, j), ``LOOKUP_SEGMENT_INPUTS``' [(x's dtype,
  uint8)] (MLP: p, j) / the GLU's (g, u, j); [] without ``saves``."""
  if not saves:
    return []
  if saves in SEGMENT_SAVES:
    wide = 2 if num_weights == 2 else int(saves == LOOKUP_SEGMENT_INPUTS)
    return [(jnp.dtype(dtype),) * wide + (jnp.dtype(jnp.uint8),)]
  window = jax.ShapeDtypeStruct((WGMMA_ROWS, EPILOGUE_N), jnp.float32)
  parts = jax.eval_shape(lambda pre, knots: save_preactivations(pre, dtype, saves, knots, 1),
                         [window] * num_weights, jax.ShapeDtypeStruct((1,), jnp.float32))
  return [tuple(part.dtype for part in entry) for entry in parts]


def gemm1_activation(x, w_up, w_gate, b_up, b_gate, table, *, kind: str, num_knots: int,
                     config: EpilogueConfig, saves: str | None = None):
  """a = act(x W_gate + b_gate) * (x W_up + b_up) (GLU) or act(x W_up + b_up) (MLP), [M, H].

  Args: x [M, D]; w_up / w_gate [D, H]; biases [H] or None (both or neither when GLU); ``table``
  from ``hinge_table.activation_table`` (``kind`` "pwl"), ``pwl_lookup.lookup_table``
  ("pwl_lookup"), ``pwl_lookup.counted_table`` ("pwl_counted", with ``LOOKUP_SEGMENTS``) or
  None. D and H must be multiples of 64.

  With ``saves`` ("preactivations", "segments" (a PWL's) or "floor-bits") it returns
  ``(a, (g, u))`` (GLU: g = x W_gate + b_gate, u = x W_up + b_up) or ``(a, (u,))`` (MLP), written
  from the same epilogue: the residuals a backward needs instead of recomputing GEMM1, each a
  tuple of [M, H] arrays in ``backward.save_preactivations``' form ((hi, lo) pairs in x's dtype;
  or (hi, int8 segment) / (hi, uint8 floor bits) for the activation's input and (hi,) for u),
  staged for their TMA stores as ``config.staging`` says. ``LOOKUP_SEGMENTS`` (a kind in
  ``SEGMENT_KINDS``): ``(a, ((j,),))`` (MLP) or ``(a, ((act(g), u, j),))`` (GLU), j the uint8
  segment of each element; ``LOOKUP_SEGMENT_INPUTS``: ``(a, ((u, j),))`` (MLP) or
  ``(a, ((g, u, j),))`` (GLU).
  """
  m, d = x.shape
  hidden = w_up.shape[1]
  dtype = x.dtype
  weights = [w_up] if w_gate is None else [w_gate, w_up]
  biases = [b for b in ([b_up] if w_gate is None else [b_gate, b_up]) if b is not None]
  if biases and len(biases) != len(weights):
    raise ValueError("gemm1_activation: give both GLU biases or neither")
  if saves == "segments" and kind != "pwl":
    raise ValueError(f"gemm1_activation: saves='segments' needs the hinge table of a PWL (kind "
                     f"'pwl'), got kind {kind!r}")
  if saves in SEGMENT_SAVES and kind not in SEGMENT_KINDS:
    raise ValueError(f"gemm1_activation: saves={saves!r} needs a PWL by its segments' "
                     f"lines (kind in {tuple(SEGMENT_KINDS)}), got kind {kind!r}")
  if kind == "pwl_counted" and saves not in SEGMENT_SAVES:
    raise ValueError(f"gemm1_activation: kind 'pwl_counted' is the forward that saves one of "
                     f"{SEGMENT_SAVES} (an inference forward takes the hinges), got "
                     f"saves={saves!r}")
  saved_parts = saved_part_dtypes(saves, len(weights), dtype)
  saved_dtypes = tuple(part for parts in saved_parts for part in parts)
  out_dtypes = [jnp.dtype(dtype), *saved_dtypes]
  num_outputs = len(out_dtypes)
  config.check(len(weights), dtype, saved_dtypes)
  tile_m, tile_n, rows = config.tile_m, config.tile_n, config.window_rows
  m_iters, n_iters = pl.cdiv(m, config.cta_rows), pl.cdiv(hidden, tile_n)
  k_iters = pl.cdiv(d, TILE_K)
  operand_transforms = _swizzled(TILE_K, dtype)
  inputs = [x, *weights, *biases] + ([table] if table is not None else [])
  staging_buffers = config.staging_buffers(out_dtypes)

  def epilogue(accumulators, destination, *, bias_smem, table_smem, out_gmems, staging, wg):
    """Bias, activation (x u) and saved parts of each [rows, EPILOGUE_N] window of warpgroup
    ``wg``'s [tile_m, tile_n] accumulators, TMA-stored to ``destination(gmem)``'s window."""
    for epi, (r, c) in enumerate((r, c) for r in range(tile_m // rows)
                                 for c in range(tile_n // EPILOGUE_N)):
      window = (slice(r * rows, (r + 1) * rows), slice(c * EPILOGUE_N, (c + 1) * EPILOGUE_N))
      pre = [acc[window] for acc in accumulators]
      if bias_smem is not None:
        pre = [_add_bias(p, bias_smem.at[i, window[1]]) for i, p in enumerate(pre)]
      if saves in SEGMENT_SAVES:
        out, segment = SEGMENT_KINDS[kind](pre[0], table_smem, num_knots, config.pwl_dtype)
        inputs = saves == LOOKUP_SEGMENT_INPUTS  # p where LOOKUP_SEGMENTS has a = act(p)
        if len(pre) == 2:  # GLU: the output h = a u, then a (or g) and u for the dgrad kernel
          values = [out * pre[1], pre[0] if inputs else out, pre[1]]
        else:
          values = [out] + [pre[0]] * inputs
        values.append(segment.astype(jnp.uint8))
      else:
        out = apply_activation(kind, pre[0], table_smem, num_knots, config.pwl_dtype,
                               config.hinges)
        values = [out * pre[1] if len(pre) == 2 else out]
        for parts in save_preactivations(pre, dtype, saves, table_smem,
                                         num_knots) if saves else ():
          values += parts
      store_slice(values, out_gmems, staging, wg, epi, lambda gmem: destination(gmem).at[
          pl.ds(r * rows, rows), pl.ds(c * EPILOGUE_N, EPILOGUE_N)])

  def cooperative(x_gmem, w_gmems, b_gmems, bias_smem, bias_barrier, wg, write):
    cta_m = config.cta_rows

    def make_pipeline(body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=MEMORY_REGISTERS,
          in_specs=[plgpu.BlockSpec((cta_m, TILE_K), lambda k: (0, k),
                                    transforms=operand_transforms)]
          + [plgpu.BlockSpec((TILE_K, tile_n), lambda k: (k, 0),
                             transforms=operand_transforms)] * len(weights),
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=config.stages,
          compute_context=compute_context)

    def tile(m_slice, n_slice, allocations):
      def compute_context(eval_pipeline):
        def with_accumulators(*accumulators):
          for i, bias in enumerate(b_gmems):  # lands while the pipeline runs
            plgpu.copy_gmem_to_smem(bias.at[n_slice], bias_smem.at[wg, i], bias_barrier.at[wg])
          eval_pipeline(accumulators)
          if b_gmems:
            plgpu.barrier_wait(bias_barrier.at[wg])
          write(accumulators,
                lambda gmem: gmem.at[m_slice, n_slice].at[pl.ds(wg * tile_m, tile_m), :])

        pl.run_scoped(with_accumulators,
                      *[plgpu.ACC((tile_m, tile_n), jnp.float32)] * len(weights))

      def mma(_, x_smem, *rest):
        w_smems, accumulators = rest[:-1], rest[-1]
        for w_smem, acc in zip(w_smems, accumulators):
          plgpu.wgmma(acc, x_smem.at[pl.ds(wg * tile_m, tile_m)], w_smem)
        # Each K step waits for its wgmma before the pipeline releases its buffers. Until
        # 2026-12-01 one wgmma stayed in flight (delay_release = 1), which races across the
        # persistent loop's tiles: before the next tile's prologue refills every slot, the
        # memory warpgroup waits only for all but the last delay_release steps to be consumed
        # (jax 0.11.2, pallas/mosaic_gpu/pipeline.py, _quiesce), so the last step's buffer
        # could be overwritten under its wgmma. Seen on the H200: rel. err 1.7e-2 at gpt2-xl
        # with 64 x 256 tiles (2.5e-3 expected); waiting also made gpt2-xl faster (0.584 ->
        # 0.540 ms with 128 x 128 tiles).
        plgpu.wgmma_wait(0)
        return accumulators

      make_pipeline(mma, compute_context)(
          x_gmem.at[m_slice, :], *[w.at[:, n_slice] for w in w_gmems], allocations=allocations)

    for_each_tile(config, m_iters, n_iters, make_pipeline, (x_gmem, *w_gmems), tile)

  def pingpong(x_gmem, w_gmems, b_gmems, bias_smem, bias_barrier, wg, write, *ring):
    def load_biases(m_slice, n_slice):  # land while the K loop runs
      del m_slice
      for i, bias in enumerate(b_gmems):
        plgpu.copy_gmem_to_smem(bias.at[n_slice], bias_smem.at[wg, i], bias_barrier.at[wg])

    def epilogue_of_tile(accumulators, m_slice, n_slice):
      if b_gmems:
        plgpu.barrier_wait(bias_barrier.at[wg])
      write(accumulators, lambda gmem: gmem.at[m_slice, n_slice])

    pingpong_mainloop(config, (m_iters, n_iters, k_iters), x_gmem, w_gmems, ring, wg,
                      b_transposed=False, before=load_biases, after=epilogue_of_tile)

  def kernel(*refs):
    (x_gmem,), w_gmems, b_gmems, table_gmem, out_gmems, staging, (
        bias_smem, table_smem, bias_barrier, table_barrier, *ring) = _split_refs(
            refs, (1, len(weights), len(biases), int(table is not None), num_outputs,
                   len(staging_buffers), len(scratch) - len(staging_buffers)))
    wg = lax.axis_index("wg")
    if table is not None:
      load_table(table_gmem[0], table_smem, table_barrier.at[0], wg)
    write = functools.partial(epilogue, bias_smem=bias_smem.at[wg] if b_gmems else None,
                              table_smem=table_smem, out_gmems=out_gmems, staging=staging,
                              wg=wg)
    schedule = cooperative if config.schedule == "cooperative" else pingpong
    schedule(x_gmem, w_gmems, b_gmems, bias_smem, bias_barrier, wg, write, *ring)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  scratch = [
      plgpu.SMEM((2, slots, rows, EPILOGUE_N), t, transforms=_swizzled(EPILOGUE_N, t))
      for slots, t in staging_buffers] + [
      plgpu.SMEM((2, max(len(biases), 1), tile_n), dtype),
      plgpu.SMEM((TABLE_ALIGN if table is None else table.shape[0],), jnp.float32),
      plgpu.Barrier(num_arrivals=max(len(biases), 1), num_barriers=2),
      plgpu.Barrier(num_barriers=1),
  ]
  if config.schedule == "pingpong":
    scratch += pingpong_ring(config, len(weights), dtype, b_transposed=False)
  outputs = launch_persistent(kernel, [jax.ShapeDtypeStruct((m, hidden), t) for t in out_dtypes],
                              m_iters * n_iters, scratch, inputs)
  if not saves:
    return outputs[0]
  saved = iter(outputs[1:])
  return outputs[0], tuple(tuple(next(saved) for _ in parts) for parts in saved_parts)


# ------------------------------------------------------------------------------------------------
# Fully fused FFN for small D
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  """Tiles of ``fused_ffn``: hidden block width, GEMM1 weight buffers, CTAs per row block."""

  block_h: int = 64
  stages: int = 3
  h_splits: int = 1
  pwl_dtype: str = "float32"  # arithmetic of the PWL hinges (see apply_activation)

  def check(self, d_model: int, d_out: int, num_weights: int, itemsize: int) -> None:
    """NotImplementedError when the problem breaks the kernel's SMEM / register / layout limits."""
    if self.stages < 2:
      raise NotImplementedError(f"stages={self.stages}: GEMM1 keeps one wgmma in flight")
    if self.block_h % 64 or self.block_h > 2 * MAX_WGMMA_N:
      raise NotImplementedError(f"block_h={self.block_h}: need a multiple of 64 up to 512")
    if d_model % TILE_K or d_out % 64:
      raise NotImplementedError(f"D={d_model}, D_out={d_out}: need multiples of 64")
    if d_out > 640:
      raise NotImplementedError(f"D_out={d_out} > 640: the [64, D_out/2] f32 accumulator per "
                                "warpgroup would not fit in registers")
    if self.smem_bytes(d_model, d_out, num_weights, itemsize) > SMEM_BYTES:
      raise NotImplementedError(
          f"{self} with D={d_model}, D_out={d_out} needs "
          f"{self.smem_bytes(d_model, d_out, num_weights, itemsize)} bytes of SMEM > {SMEM_BYTES}")

  def smem_bytes(self, d_model: int, d_out: int, num_weights: int, itemsize: int) -> int:
    x_rows = WGMMA_ROWS * d_model
    gemm1 = self.stages * num_weights * TILE_K * self.block_h
    down = self.block_h * d_out
    hidden = 2 * WGMMA_ROWS * self.block_h
    small = (num_weights * self.block_h + d_out) * itemsize + 4 * 64 + 1024
    return (x_rows + gemm1 + down + hidden) * itemsize + small


def _output_chunks(width: int) -> tuple[int, int]:
  """(count, size): split one warpgroup's ``width`` output columns into equal wgmma N <= 256."""
  for count in range(1, width // 32 + 1):
    size = width // count
    if width % count == 0 and size % 32 == 0 and size <= MAX_WGMMA_N:
      return count, size
  raise NotImplementedError(f"cannot split {width} output columns into wgmma tiles")


def fused_ffn(x, w_up, w_gate, b_up, b_gate, table, w_down, b_down, *, kind: str,
              num_knots: int, config: FusedConfig) -> jax.Array:
  """Both GEMMs of the FFN in one kernel (see the module docstring).

  Returns [M_pad, D_out] in x's dtype (b_down added) when ``config.h_splits == 1``, else f32
  partial sums [h_splits, M_pad, D_out] without b_down; M_pad = M rounded up to 64.
  """
  m, d_model = x.shape
  hidden, d_out = w_down.shape
  dtype = x.dtype
  itemsize = jnp.dtype(dtype).itemsize
  weights = [w_up] if w_gate is None else [w_gate, w_up]
  biases = [b for b in ([b_up] if w_gate is None else [b_gate, b_up]) if b is not None]
  if biases and len(biases) != len(weights):
    raise ValueError("fused_ffn: give both GLU biases or neither")
  config.check(d_model, d_out, len(weights), itemsize)
  block_h, stages, splits = config.block_h, config.stages, config.h_splits
  half = block_h // 2  # hidden columns computed by one compute warpgroup
  k_steps = d_model // TILE_K
  h_blocks = pl.cdiv(hidden, block_h)
  blocks_per_split = pl.cdiv(h_blocks, splits)
  out_width = d_out // 2  # output columns owned by one compute warpgroup
  num_chunks, chunk = _output_chunks(out_width)
  m_blocks = pl.cdiv(m, WGMMA_ROWS)
  m_pad = m_blocks * WGMMA_ROWS
  has_b_down = b_down is not None and splits == 1
  # TMA boxes hold at most 256 elements a dimension: b_down [D_out] lands in pieces
  b_down_pieces = [pl.ds(start, min(MAX_TMA_BOX, d_out - start))
                   for start in range(0, d_out, MAX_TMA_BOX)] if has_b_down else []
  inputs = ([x, *weights, *biases, w_down] + ([b_down] if has_b_down else [])
            + ([table] if table is not None else []))
  down_issue_step = min(stages, k_steps) - 1  # refill W_down once GEMM1's first chunks are queued

  def kernel(*refs):
    ((x_gmem,), w_gmems, b_gmems, (w_down_gmem,), b_down_gmem, table_gmem,
     (out_gmem, x_smem, w1_smem, down_smem, hidden_smem, bias_smem, b_down_smem, table_smem,
      x_ready, w1_ready, w1_free, down_ready, down_free, hidden_ready)) = _split_refs(
        refs, (1, len(weights), len(biases), 1, int(has_b_down), int(table is not None), 14))
    wg = lax.axis_index("wg")
    row_block = lax.axis_index("m")
    split = lax.axis_index("split")
    rows = pl.ds(row_block * WGMMA_ROWS, WGMMA_ROWS)
    first_block = split * blocks_per_split
    num_blocks = jnp.clip(h_blocks - first_block, 0, blocks_per_split)

    @pl.when(wg == 2)
    def _memory_warpgroup():
      plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
      for k in range(k_steps):
        plgpu.copy_gmem_to_smem(x_gmem.at[rows, pl.ds(k * TILE_K, TILE_K)], x_smem.at[k],
                                x_ready.at[0])
      for piece in b_down_pieces:
        plgpu.copy_gmem_to_smem(b_down_gmem[0].at[piece], b_down_smem.at[piece], x_ready.at[0])
      if table is not None:
        plgpu.copy_gmem_to_smem(table_gmem[0], table_smem, x_ready.at[0])

      @pl.loop(0, num_blocks)
      def _block(j):
        h_cols = pl.ds((first_block + j) * block_h, block_h)

        @pl.loop(0, k_steps)
        def _k(k):
          step = j * k_steps + k
          slot = lax.rem(step, stages)

          @pl.when(step >= stages)
          def _():
            plgpu.barrier_wait(w1_free.at[slot])

          for i, w in enumerate(w_gmems):
            plgpu.copy_gmem_to_smem(w.at[pl.ds(k * TILE_K, TILE_K), h_cols], w1_smem.at[slot, i],
                                    w1_ready.at[slot])

          @pl.when(k == down_issue_step)
          def _():
            @pl.when(j > 0)
            def _():
              plgpu.barrier_wait(down_free.at[0])

            for piece in range(2 * num_chunks):
              plgpu.copy_gmem_to_smem(w_down_gmem.at[h_cols, pl.ds(piece * chunk, chunk)],
                                      down_smem.at[piece], down_ready.at[0])
            for i, bias in enumerate(b_gmems):
              plgpu.copy_gmem_to_smem(bias.at[h_cols], bias_smem.at[i], down_ready.at[0])

      # Observe the last release of every buffer before the barriers go away.
      for slot in range(stages):
        @pl.when(slot < num_blocks * k_steps)
        def _():
          plgpu.barrier_wait(w1_free.at[slot])

      @pl.when(num_blocks > 0)
      def _():
        plgpu.barrier_wait(down_free.at[0])

    @pl.when(wg < 2)
    def _compute_warpgroup():
      plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
      plgpu.barrier_wait(x_ready.at[0])
      my_cols = pl.ds(wg * half, half)

      def with_output_accumulators(*out_accs):
        @pl.loop(0, num_blocks)
        def _block(j):
          def gemm1(*h_accs):
            @pl.loop(0, k_steps)
            def _k(k):
              step = j * k_steps + k
              slot = lax.rem(step, stages)
              plgpu.barrier_wait(w1_ready.at[slot])
              for i, acc in enumerate(h_accs):
                plgpu.wgmma(acc, x_smem.at[k], w1_smem.at[slot, i, :, my_cols])
              plgpu.wgmma_wait(1)  # the previous step's wgmma has read its buffer: release it

              @pl.when(k > 0)
              def _():
                plgpu.barrier_arrive(w1_free.at[lax.rem(step - 1, stages)])

            values = [acc[...] for acc in h_accs]  # waits for every wgmma in flight
            plgpu.barrier_arrive(w1_free.at[lax.rem((j + 1) * k_steps - 1, stages)])
            return values

          pre = pl.run_scoped(gemm1, *[plgpu.ACC((WGMMA_ROWS, half), jnp.float32)] * len(w_gmems))
          plgpu.barrier_wait(down_ready.at[0])
          if b_gmems:
            pre = [_add_bias(p, bias_smem.at[i, my_cols]) for i, p in enumerate(pre)]
          h = apply_activation(kind, pre[0], table_smem, num_knots, config.pwl_dtype)
          if len(pre) == 2:
            h = h * pre[1]
          buffer = lax.rem(j, 2)
          hidden_smem.at[buffer, wg][...] = h.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(hidden_ready.at[buffer])
          plgpu.barrier_wait(hidden_ready.at[buffer])
          for c, acc in enumerate(out_accs):
            for part in range(2):
              plgpu.wgmma(acc, hidden_smem.at[buffer, part],
                          down_smem.at[wg * num_chunks + c, pl.ds(part * half, half), :])
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(down_free.at[0])

        for c, acc in enumerate(out_accs):
          cols = pl.ds((wg * num_chunks + c) * chunk, chunk)
          if splits > 1:
            out_gmem.at[split, rows, cols][...] = acc[...]
          else:
            y = _add_bias(acc[...], b_down_smem.at[cols]) if has_b_down else acc[...]
            out_gmem.at[rows, cols][...] = y.astype(dtype)

      pl.run_scoped(with_output_accumulators,
                    *[plgpu.ACC((WGMMA_ROWS, chunk), jnp.float32)] * num_chunks)

  num_weights = len(weights)
  x_ready_arrivals = k_steps + len(b_down_pieces) + int(table is not None)
  scratch = [
      plgpu.SMEM((k_steps, WGMMA_ROWS, TILE_K), dtype, transforms=_swizzle_64b(dtype)),
      plgpu.SMEM((stages, num_weights, TILE_K, block_h), dtype, transforms=_swizzle_64b(dtype)),
      plgpu.SMEM((2 * num_chunks, block_h, chunk), dtype, transforms=_swizzle_64b(dtype)),
      plgpu.SMEM((2, 2, WGMMA_ROWS, half), dtype, transforms=_swizzle_64b(dtype)),
      plgpu.SMEM((max(len(biases), 1), block_h), dtype),
      plgpu.SMEM((d_out,), dtype),
      plgpu.SMEM((TABLE_ALIGN if table is None else table.shape[0],), jnp.float32),
      plgpu.Barrier(num_arrivals=x_ready_arrivals, num_barriers=1),
      plgpu.Barrier(num_arrivals=num_weights, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2 * num_chunks + len(biases), num_barriers=1),
      plgpu.Barrier(num_arrivals=2, num_barriers=1),
      plgpu.Barrier(num_arrivals=2, num_barriers=2),
  ]
  if splits > 1:
    out_type = jax.ShapeDtypeStruct((splits, m_pad, d_out), jnp.float32)
  else:
    out_type = jax.ShapeDtypeStruct((m_pad, d_out), dtype)
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(m_blocks, splits), grid_names=("m", "split"),
      num_threads=3, thread_name="wg", scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(*inputs)
