"""Decode FFN for Hopper: CTAs split the hidden dimension and issue their whole weight stream early.

At decode (M <= 64 tokens) an FFN reads all of its weights for a few rows of x, so its time is the
weight stream (SmolLM2: 5.3 MB, ~1.6 us at the H200's bandwidth) plus launch latency. On the
GPU's clock XLA takes 9.9 us there (two GEMMs of 4.7 and 2.9 us and small fusions) and the
epilogue kernel + XLA GEMM2 14.9 us. Here CTA j owns the hidden columns J = [B j, B (j + 1)),
B = 32 or 64 (``DecodeConfig.block_h``):

    h_J = act(x W_gate[:, J] + b_gate[J]) * (x W_up[:, J] + b_up[J])    GLU    [64, B], registers
    h_J = act(x W_up[:, J] + b_up[J])                                   MLP
    P_j = h_J W_down[J, :]                                              [M, D_out] f32 -> HBM
    y   = sum_j P_j + b_down                                            the caller (one XLA fusion)
                                                                        or the kernel (below)

so H/B CTAs (SmolLM2 at B = 64: 24, gpt2-small 48) stream disjoint weight slices. Each CTA issues
its W_down[J, :] and the first ``stages`` K-slices of x and W_gate/W_up ([64, B] and [B, B]) at
once, then refills a slot once its wgmma has read it, waiting one step behind so the wgmmas
queue back to back (with every K-slice resident, the K loop never waits on a wgmma). x's rows
past M are zero-filled by TMA up to the wgmma's 64 (no HBM traffic), and the partial stores clip
to M rows (TMA stores through two SMEM slots; storing all 64 rows straight from registers
measured slower: benchmarks/NOTES.md).
One warpgroup: at decode the wgmma work is tiny and the loads need no producer warpgroup.

With ``DecodeConfig(sum_in_kernel=True)`` the FFN is one launch (XLA's command buffers made the
kernel + sum pair slower than XLA's own four launches in wall clock: benchmarks/NOTES.md). The
CTAs then meet twice at global semaphores (all H/B CTAs must be resident at once, so H/B <= the
SM count and M <= 64):
  1. each CTA zeroes its 32-column slices of an f32 accumulator A [M, D_out] (TMA stores) while
     its loads stream; after GEMM1 and the activation it signals and waits for every CTA's;
  2. P_j goes to A by TMA reduce-add (A += P_j in L2); after its last one each CTA signals and
     waits for all, then converts its slices: y[:, S] = (A[:, S] + b_down[S]) in x's dtype.
The reduce-adds land in any order, so y's f32 sum is not bitwise reproducible run to run.

Measured on the H200 (benchmarks/results/decode-profile-h200-2026-12-01-kloop.md, GPU clock,
M = 16): at SmolLM2 7.9 us for the kernel with 32-column blocks (8.6 with 64) + 1.6 us for the sum
(XLA 9.8), at gpt2-small 10.0 + 2.1 (XLA 9.2), against ~3 us predicted from its bytes. Not
waiting on each K step's wgmma saved 0.3 us (64) / 2.3 us (32). The in-kernel profile
(decode-kernel-profile-2026-12-04.md) says where the rest went: one warpgroup's issue work -
issuing the loads, the activation and GEMM2's stores on 64 rows of which M are tokens.
With the sum in the kernel (benchmarks/results/decode-profile-2026-12-04-summed-60calls.md,
SmolLM2, M = 16, XLA's default flags): 10.2 us on the GPU (+0.4 for the two meetings), 10.9 us
of wall clock a FFN against 15.4 for the kernel + XLA sum and 9.9 for XLA.

With ``DecodeConfig(swap_ab=True)`` the tokens go on wgmma's N axis (N = M, a multiple of 8, at
most 64; B = 64): pre^T [B, M] = W[:, J]^T x^T (W's slice as a transposed A operand, x as a
K-major B), h^T is stored through a transposed SMEM view as GEMM2's B, and P_j^T [D_out, M] =
W_down[J, :]^T h^T leaves in [64, M] pieces, so neither the activation nor the stores work on the
64 - M padding rows. Measured (decode-profile-2026-12-04-swapped.md, M = 16): SmolLM2 7.98 us
with its XLA sum against 9.70 unswapped and 9.95 for XLA; in the in-kernel profile
(decode-kernel-profile-2026-12-04-swapped.md) a CTA's span went from 13.6 to 10.3 kcycles
(activation 1.78 -> 0.54, GEMM2 and its stores 4.63 -> 2.20, issuing the loads 1.68 -> 0.87), 35%
of it now waiting for K slices. At M = 64 it loses to XLA (12.06 vs 10.93 us).

With ``DecodeConfig(cluster_pairs=True)`` (swapped operands, XLA sum) two CTAs of a 2-CTA cluster
share each hidden block: CTA r of the pair reads the K slices [r k, (r + 1) k) of x and W (k =
ceil(D / 64 / 2)) and the D_out columns [r c, (r + 1) c) of W_down[J, :] (c = ceil(D_out / 64 / 2)
* 64; with odd counts the second CTA's last K slice lies past D (not loaded, no wgmma) and its last
D_out piece past D_out (TMA's zero fill, no store)). After GEMM1 each CTA holds half of D's sum of
pre^T; it stores its half into the peer's SMEM (distributed shared memory, the store slots, still
unused), both pass ``barrier.cluster`` (release / acquire), and each adds the peer's half to its
own: both hold the whole pre^T, apply the activation, and project h^T onto their own D_out columns.
Twice the CTAs (SmolLM2: 48), each with half the bytes and half of GEMM2. Measured
(decode-profile-2026-12-04-pairs.md, M = 16, GPU clock with the XLA sum): SmolLM2 6.93 us (7.52
unpaired in the same run, XLA 9.88), gpt2-small 7.57 (8.39, XLA 8.81); in the in-kernel profile
(decode-kernel-profile-2026-12-04-pairs.md) the span went from 10.4 to 9.0 kcycles: GEMM1 5.9 ->
4.0 (3.1 of it still waiting for K slices), GEMM2 2.2 -> 1.2, and the exchange costs 1.7 (a median
over CTAs; it includes the wait of the CTA with 4 of the 9 K slices for the one with 5).
``dispatch.TUNED_FEW_TOKENS`` picks it (with the XLA sum) for SmolLM2 with a PWL at 2 <= M <= 16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir.dialects import nvvm

from pallas_kernels.gpu.fused_ffn_sm90 import (
    MAX_WGMMA_N, SMEM_BYTES, WGMMA_ROWS, _add_bias, _split_refs, _swizzled, apply_activation,
    num_sms)
from pallas_kernels.gpu.hinge_table import TABLE_ALIGN

BLOCK_WIDTHS = (32, 64)  # hidden columns per CTA = K slice width: a 64- or 128-byte swizzle row
BIAS_BOX = 64  # elements per bias copy: 128 bytes (Pallas copies a multiple of 128 bytes)
OUT_PIECE = 32  # f32 columns per partial-sum store: one 128-byte swizzle row
PAIRED_ACC_REGISTERS = 80  # f32 accumulator registers a thread, GEMM2 of ``cluster_pairs``
PROFILE_EVENTS = 256  # per warpgroup, with ``DecodeConfig.profile_dir`` (a K step records two)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """``block_h``: hidden columns per CTA, also the K-slice width (32: twice the CTAs, each with half
  the bytes); ``stages``: K-slices of x and W_gate/W_up in flight per CTA (None: all that fit);
  ``sum_in_kernel``: the CTAs sum their partials into y themselves (one launch; module doc);
  ``swap_ab``: tokens on wgmma's N axis (module doc), 64-column CTAs, M <= 64 and a multiple of 8;
  ``cluster_pairs`` (with ``swap_ab``): two CTAs of a cluster share each hidden block, each
  reading half of D and of D_out (module doc); ``pdl``: launched with programmatic dependent
  launch, so it may start (barrier set-up) while the kernel before it in the stream ends, and
  waits for that kernel (``griddepcontrol.wait``) before its first read of any input. Measured
  neutral in a 30-layer SmolLM2 decode step (H200, batch 8: 828.6 vs 833.2 us a step, within the
  noise), so the dispatcher leaves it off; reading the weights before the wait would overlap more
  but races when the kernel before computed them."""

  block_h: int = 64
  stages: int | None = None
  pwl_dtype: str = "float32"  # arithmetic of the PWL hinges (see apply_activation)
  sum_in_kernel: bool = False
  swap_ab: bool = False
  cluster_pairs: bool = False
  pdl: bool = False
  profile_dir: str = ""  # Mosaic GPU's in-kernel profile of the named regions, one file a launch

  def resolve_stages(self, d_model: int, d_out: int, num_weights: int, itemsize: int) -> int:
    """The stage count to run with; NotImplementedError when even one stage does not fit."""
    if self.block_h not in BLOCK_WIDTHS or (self.swap_ab and self.block_h != WGMMA_ROWS):
      raise NotImplementedError(f"block_h={self.block_h}: expected one of {BLOCK_WIDTHS} "
                                f"({WGMMA_ROWS} with swap_ab: wgmma's M)")
    if d_model % self.block_h or d_out % 64:
      raise NotImplementedError(f"D={d_model}, D_out={d_out}: need multiples of "
                                f"{self.block_h} and 64")
    if self.cluster_pairs and (not self.swap_ab or self.sum_in_kernel
                               or d_model < 2 * self.block_h or d_out < 2 * WGMMA_ROWS):
      raise NotImplementedError(
          f"cluster_pairs: needs swap_ab, no sum_in_kernel, and two K slices and two D_out pieces "
          f"to share (D={d_model}, D_out={d_out})")
    k_steps = self.k_steps(d_model)
    piece = self.out_piece()
    fixed = _fixed_smem_bytes(self.block_h, self.own_d_out(d_out), num_weights, itemsize, piece)
    if self.sum_in_kernel:  # y's store slot and b_down
      fixed += (WGMMA_ROWS * piece + d_out) * itemsize
    if self.profile_dir:  # the profiler's event buffer
      fixed += 4 * PROFILE_EVENTS + 1024
    stage = (WGMMA_ROWS + num_weights * self.block_h) * self.block_h * itemsize
    fitting = (SMEM_BYTES - fixed) // stage
    stages = min(k_steps, fitting if self.stages is None else self.stages)
    if stages < 1 or stages > fitting:
      raise NotImplementedError(
          f"D_out={d_out}: W_down[{self.block_h}, D_out] plus {max(stages, 1)} stage(s) need "
          f"{fixed + max(stages, 1) * stage} bytes of SMEM > {SMEM_BYTES}")
    return stages

  def ctas_per_block(self) -> int:
    """CTAs that share one hidden block (a cluster with ``cluster_pairs``)."""
    return 2 if self.cluster_pairs else 1

  def k_steps(self, d_model: int) -> int:
    """K slices one CTA reads (with ``cluster_pairs`` the second CTA's last may lie past D)."""
    return -(-d_model // self.block_h // self.ctas_per_block())

  def own_d_out(self, d_out: int) -> int:
    """D_out columns of W_down one CTA reads and projects onto (64-column pieces; with
    ``cluster_pairs`` the first CTA takes the larger half, the second's tail lies past D_out)."""
    return -(-d_out // WGMMA_ROWS // self.ctas_per_block()) * WGMMA_ROWS

  def out_piece(self) -> int:
    """Output columns (D_out) of one stored piece of a partial: [64 rows, 32] f32, or swapped
    [64 (D_out), M <= 64] f32 (counted at M = 64)."""
    return WGMMA_ROWS if self.swap_ab else OUT_PIECE


def _fixed_smem_bytes(block_h: int, d_out: int, num_weights: int, itemsize: int,
                      piece: int) -> int:
  """W_down slice, h, two f32 store slots, biases, PWL table, barriers."""
  return ((block_h * d_out + WGMMA_ROWS * block_h + num_weights * BIAS_BOX) * itemsize
          + 2 * WGMMA_ROWS * piece * 4 + 4 * TABLE_ALIGN * 4 + 1024)


def _output_chunk(d_out: int) -> int:
  """The widest wgmma N (a multiple of 64, <= 256) that divides D_out."""
  return max(n for n in range(64, MAX_WGMMA_N + 1, 64) if d_out % n == 0)


def _paired_chunk(own_d_out: int, m: int) -> int:
  """Swapped GEMM2's D_out rows per accumulator when CTAs pair up: D_out is wgmma's M there (any
  multiple of 64), so the widest divisor of the CTA's share whose f32 [rows, M] accumulator takes
  at most ``PAIRED_ACC_REGISTERS`` registers a thread (one wgmma wait instead of one a piece)."""
  return max(rows for rows in range(WGMMA_ROWS, own_d_out + 1, WGMMA_ROWS)
             if own_d_out % rows == 0
             and (rows == WGMMA_ROWS or rows * m <= PAIRED_ACC_REGISTERS * 128))


@plgpu.inline_mgpu()
def _cluster_sync(_):
  """barrier.cluster arrive (release) + wait (acquire), every thread of the cluster's CTAs: the
  distributed-shared-memory stores before it are visible to the peer after it."""
  nvvm.cluster_arrive()
  nvvm.cluster_wait()


@plgpu.inline_mgpu()
def _fence_async_global(_):
  """Orders this thread's global accesses between the generic proxy (semaphores) and the async
  proxy (TMA), which the reduce-adds and the accumulator's loads use."""
  nvvm.fence_proxy(nvvm.ProxyKind.async_global)


def decode_ffn(x, w_up, w_gate, b_up, b_gate, table, w_down, b_down=None, *, kind: str,
               num_knots: int, config: DecodeConfig) -> jax.Array:
  """Partial sums P [ceil(H / block_h), M, D_out] (f32, without b_down): y = P.sum(0) + b_down;
  with ``config.sum_in_kernel`` y itself [M, D_out] in x's dtype, b_down [D_out] (optional) added.

  Args as ``fused_ffn_sm90.gemm1_activation`` plus w_down [H, D_out]; D and D_out multiples of 64.
  Any M works (row blocks of 64 are a second grid axis); the kernel is meant for M <= 64.
  NotImplementedError where the sum in the kernel cannot run (M > 64, more CTAs than SMs) or
  swapped operands cannot (M > 64 or not a multiple of 8).
  """
  m, d_model = x.shape
  hidden, d_out = w_down.shape
  dtype = x.dtype
  weights = [w_up] if w_gate is None else [w_gate, w_up]
  biases = [b for b in ([b_up] if w_gate is None else [b_gate, b_up]) if b is not None]
  if biases and len(biases) != len(weights):
    raise ValueError("decode_ffn: give both GLU biases or neither")
  summing, swap = config.sum_in_kernel, config.swap_ab
  if b_down is not None and not summing:
    raise ValueError("decode_ffn: b_down is added by the caller unless config.sum_in_kernel")
  stages = config.resolve_stages(d_model, d_out, len(weights), jnp.dtype(dtype).itemsize)
  block_h = tile_k = config.block_h
  pairs = config.cluster_pairs
  k_total, k_steps = d_model // tile_k, config.k_steps(d_model)  # all K slices, one CTA's
  own_d_out = config.own_d_out(d_out)
  chunk = _paired_chunk(own_d_out, m) if pairs else _output_chunk(d_out)
  num_chunks = own_d_out // chunk
  h_blocks, m_blocks = pl.cdiv(hidden, block_h), pl.cdiv(m, WGMMA_ROWS)
  if summing and (m_blocks > 1 or h_blocks > num_sms()):
    raise NotImplementedError(
        f"sum_in_kernel: M={m} (needs <= {WGMMA_ROWS}) and H/{block_h}={h_blocks} CTAs (needs <= "
        f"{num_sms()} SMs, all resident at once)")
  if swap and (m > WGMMA_ROWS or m % 8):
    raise NotImplementedError(f"swap_ab: M={m}, needs a multiple of 8 <= {WGMMA_ROWS} "
                              "(wgmma's N)")
  down_biases = [b_down] if b_down is not None else []
  has_consts = bool(biases or down_biases) or table is not None
  inputs = ([x, *weights, *biases, w_down] + ([table] if table is not None else [])
            + down_biases)
  # Swapped, every array of tokens is transposed: x is read [M, K] and used as B (K-major); the
  # pre-activations, h and the partials are [hidden or D_out rows, M]; pieces of the partials
  # (and of A and y) are 64 D_out rows x M instead of 64 token rows x 32 D_out columns.
  piece = config.out_piece()
  x_rows = m if swap else WGMMA_ROWS
  piece_shape = (WGMMA_ROWS, m) if swap else (WGMMA_ROWS, OUT_PIECE)
  num_slices = d_out // piece  # of A and y, one CTA's share of the sum each
  pieces_per_chunk = chunk // piece
  # with cluster_pairs and odd counts the second CTA's last K slice lies past D (skipped) and its
  # last D_out piece past D_out (W_down's columns read TMA's zero fill; the store is skipped)
  odd_k, odd_pieces = pairs and k_total % 2, pairs and num_slices % 2
  bias_axis = 0 if swap else 1  # pre-activations and partials carry hidden / D_out on this axis

  def decode_ffn_kernel(*refs):  # the name profiles show
    ((x_gmem,), w_gmems, b_gmems, (w_down_gmem,), table_gmem, b_down_gmems, out_gmems,
     (x_smem, w_smem, down_smem, hidden_smem, out_smem, bias_smem, table_smem,
      k_ready, down_ready, consts_ready, *sum_scratch)) = _split_refs(
        refs, (1, len(weights), len(biases), 1, int(table is not None), len(down_biases),
               2 if summing else 1, 13 if summing else 10))
    rows = pl.ds(lax.axis_index("m") * x_rows, x_rows)
    block = lax.axis_index("h")
    h_cols = pl.ds(block * block_h, block_h)
    rank = lax.axis_index("pair") if pairs else 0  # this CTA's K slices and D_out pieces:
    first_k, first_piece = rank * k_steps, rank * (own_d_out // piece)  # the first of each
    out_cols = lambda s: pl.ds(s * piece, piece)  # D_out of piece s

    def piece_of(ref2d, s):
      """Piece s of a [M, D_out] (or swapped [D_out, M]) array in GMEM."""
      return ref2d.at[out_cols(s), :] if swap else ref2d.at[rows, out_cols(s)]

    if summing:
      (y_gmem, acc_gmem), (y_smem, down_bias_smem, acc_ready) = out_gmems, sum_scratch
      zeroed, summed = (pl.get_global(plgpu.SemaphoreType.REGULAR) for _ in range(2))
      own_slices = lambda body: pl.loop(block, num_slices, step=h_blocks)(body)

      def meet(semaphore):  # every CTA's TMA writes so far are visible to every CTA after it
        plgpu.wait_smem_to_gmem(0)
        _fence_async_global()
        plgpu.semaphore_signal(semaphore, memory_scope="gpu")
        plgpu.semaphore_wait(semaphore, h_blocks, decrement=False, memory_scope="gpu")
        _fence_async_global()
    else:
      (out_gmem,) = out_gmems

    def when_in_range(index, count, odd):
      """``body`` where ``index < count``; unguarded unless a paired CTA's last one can lie past."""
      return pl.when(index < count) if odd else lambda body: body()

    def issue(k, slot):  # this CTA's K slice k
      @when_in_range(first_k + k, k_total, odd_k)
      def _():
        k_cols = pl.ds((first_k + k) * tile_k, tile_k)
        plgpu.copy_gmem_to_smem(x_gmem.at[rows, k_cols], x_smem.at[slot], k_ready.at[slot])
        for i, w in enumerate(w_gmems):
          plgpu.copy_gmem_to_smem(w.at[k_cols, h_cols], w_smem.at[slot, i], k_ready.at[slot])

    if config.pdl:  # any input may be the previous kernel's output: nothing is read before this
      plgpu.griddepcontrol_wait()
    with jax.named_scope("issue_loads"):  # everything this CTA reads first is in flight after
      for slot in range(stages):
        issue(slot, slot)
      for c in range(num_chunks):
        plgpu.copy_gmem_to_smem(w_down_gmem.at[h_cols, pl.ds(first_piece * piece + c * chunk,
                                                             chunk)],
                                down_smem.at[c], down_ready.at[0])
      for i, bias in enumerate(b_gmems):
        # a 32-column CTA copies 64 (the last one's tail past H reads zeros)
        plgpu.copy_gmem_to_smem(bias.at[pl.ds(block * block_h, BIAS_BOX)], bias_smem.at[i],
                                consts_ready.at[0])
      if table is not None:
        plgpu.copy_gmem_to_smem(table_gmem[0], table_smem, consts_ready.at[0])
      for b_down_gmem in b_down_gmems:  # in pieces: a TMA box is at most 256 wide
        for part in range(d_out // BIAS_BOX):
          plgpu.copy_gmem_to_smem(b_down_gmem.at[pl.ds(part * BIAS_BOX, BIAS_BOX)],
                                  down_bias_smem.at[pl.ds(part * BIAS_BOX, BIAS_BOX)],
                                  consts_ready.at[0])
    if summing:  # zero this CTA's slices of A while the loads stream
      with jax.named_scope("zero_accumulator"):
        out_smem[0] = plgpu.layout_cast(jnp.zeros(piece_shape, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        own_slices(lambda s: plgpu.copy_smem_to_gmem(out_smem.at[0], piece_of(acc_gmem, s)))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # out_smem[0] is reused below

    def gemm1(*accumulators):
      @pl.loop(0, k_steps)
      def _k(k):
        slot = lax.rem(k, stages)

        @when_in_range(first_k + k, k_total, odd_k)
        def _():
          with jax.named_scope("wait_k_slice"):
            plgpu.barrier_wait(k_ready.at[slot])
          for i, acc in enumerate(accumulators):
            if swap:  # pre^T [block_h, M] += W[k, J]^T x[:, k]^T
              plgpu.wgmma(acc, w_smem.at[slot, i].T, x_smem.at[slot].T)
            else:
              plgpu.wgmma(acc, x_smem.at[slot], w_smem.at[slot, i])
        if stages < k_steps:  # slots get refilled, one step behind when there is a spare slot:
          lag = min(1, stages - 1)  # with step k's wgmma in flight, step k - 1's have read theirs
          plgpu.wgmma_wait(lag)
          done = k - lag

          @pl.when((done >= 0) & (done + stages < k_steps))
          def _():
            issue(done + stages, lax.rem(done, stages))

      return [acc[...] for acc in accumulators]  # waits for every wgmma in flight

    with jax.named_scope("gemm1"):
      pre_shape = (block_h, m) if swap else (WGMMA_ROWS, block_h)
      pre = pl.run_scoped(gemm1, *[plgpu.ACC(pre_shape, jnp.float32)] * len(weights))
    if pairs:  # each CTA of the pair holds half of D's sum: swap halves through DSMEM, add
      with jax.named_scope("exchange"):  # out_smem is free until GEMM2's stores
        for i, part in enumerate(pre):
          plgpu.cluster_ref(out_smem.at[i], {"pair": 1 - rank})[...] = part
        _cluster_sync()
        pre = [part + out_smem[i] for i, part in enumerate(pre)]
    with jax.named_scope("activation"):
      if has_consts:
        plgpu.barrier_wait(consts_ready.at[0])
      if b_gmems:
        pre = [_add_bias(p, bias_smem.at[i, :block_h], bias_axis) for i, p in enumerate(pre)]
      h = apply_activation(kind, pre[0], table_smem, num_knots, config.pwl_dtype)
      if len(pre) == 2:
        h = h * pre[1]
      (hidden_smem.T if swap else hidden_smem)[...] = h.astype(dtype)
      plgpu.commit_smem()
    with jax.named_scope("wait_w_down"):
      plgpu.barrier_wait(down_ready.at[0])
    if summing:
      with jax.named_scope("meet_zeroed"):
        meet(zeroed)

    for c in range(num_chunks):
      def gemm2(acc, c=c):
        if swap:  # P^T [chunk, M] = W_down[J, chunk]^T h^T
          plgpu.wgmma(acc, down_smem.at[c].T, hidden_smem.T)
        else:
          plgpu.wgmma(acc, hidden_smem, down_smem.at[c])
        plgpu.wgmma_wait(0)
        for p in range(pieces_per_chunk):
          step = c * pieces_per_chunk + p
          with jax.named_scope("wait_store_slot"):  # the slot's previous store has read it
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
          out_smem[step % 2] = (acc[p * piece:(p + 1) * piece, :] if swap
                                else acc[:, p * piece:(p + 1) * piece])
          plgpu.commit_smem()
          if summing:
            plgpu.copy_smem_to_gmem(out_smem.at[step % 2], piece_of(acc_gmem, step),
                                    reduction_op="add")
          else:
            @when_in_range(first_piece + step, num_slices, odd_pieces)
            def _(step=step):
              plgpu.copy_smem_to_gmem(out_smem.at[step % 2],
                                      piece_of(out_gmem.at[block], first_piece + step))

      with jax.named_scope("gemm2_chunk"):
        acc_shape = (chunk, m) if swap else (WGMMA_ROWS, chunk)
        pl.run_scoped(gemm2, plgpu.ACC(acc_shape, jnp.float32))
    if summing:
      with jax.named_scope("meet_summed"):
        meet(summed)

      with jax.named_scope("convert"):
        @own_slices
        def _convert(s):
          plgpu.copy_gmem_to_smem(piece_of(acc_gmem, s), out_smem.at[0], acc_ready.at[0])
          plgpu.barrier_wait(acc_ready.at[0])
          y = out_smem[0]
          if down_biases:
            y = _add_bias(y, down_bias_smem.at[out_cols(s)], bias_axis)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # y_smem's previous store has read it
          (y_smem.T if swap else y_smem)[...] = y.astype(dtype)
          plgpu.commit_smem()
          y_piece = y_gmem.at[:, out_cols(s)] if swap else y_gmem.at[rows, out_cols(s)]
          plgpu.copy_smem_to_gmem(y_smem, y_piece)
    with jax.named_scope("final_store_wait"):
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  operand = _swizzled(block_h, dtype)  # wgmma wants one swizzle on both operands
  scratch = [
      plgpu.SMEM((stages, x_rows, tile_k), dtype, transforms=operand),
      plgpu.SMEM((stages, len(weights), tile_k, block_h), dtype, transforms=operand),
      plgpu.SMEM((num_chunks, block_h, chunk), dtype, transforms=operand),
      plgpu.SMEM((x_rows, block_h), dtype, transforms=operand),
      plgpu.SMEM((2, *piece_shape), jnp.float32, transforms=_swizzled(piece_shape[1], jnp.float32)),
      plgpu.SMEM((max(len(biases), 1), BIAS_BOX), dtype),
      plgpu.SMEM((TABLE_ALIGN if table is None else table.shape[0],), jnp.float32),
      plgpu.Barrier(num_arrivals=1 + len(weights), num_barriers=stages),
      plgpu.Barrier(num_arrivals=num_chunks, num_barriers=1),
      plgpu.Barrier(num_arrivals=max(len(biases) + int(table is not None)
                                     + len(down_biases) * d_out // BIAS_BOX, 1), num_barriers=1),
  ]
  y_piece_shape = piece_shape[::-1] if swap else piece_shape  # [M, 64] or [64, 32]
  partial_shape = (d_out, m) if swap else (m, d_out)
  if summing:
    scratch += [plgpu.SMEM(y_piece_shape, dtype, transforms=_swizzled(y_piece_shape[1], dtype)),
                plgpu.SMEM((d_out,), dtype), plgpu.Barrier(num_arrivals=1, num_barriers=1)]
    out_type = (jax.ShapeDtypeStruct((m, d_out), dtype),
                jax.ShapeDtypeStruct(partial_shape, jnp.float32))  # y, A
  else:
    out_type = jax.ShapeDtypeStruct((h_blocks, *partial_shape), jnp.float32)
  out = plgpu.kernel(
      decode_ffn_kernel, out_type=out_type,
      grid=(m_blocks, h_blocks), grid_names=("m", "h"), scratch_types=scratch,
      cluster=(2,) if pairs else (), cluster_names=("pair",) if pairs else (),
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane,
          profile_space=PROFILE_EVENTS if config.profile_dir else 0,
          profile_dir=config.profile_dir),
  )(*inputs)
  if summing:
    return out[0]
  return jnp.swapaxes(out, 1, 2) if swap else out  # [blocks, M, D_out]; XLA's sum reads it so
