"""Block sizes for the Mosaic TPU fused FFN kernels, chosen with a model of VMEM use and run time.

The kernels of ``fused_ffn`` tile the padded problem x [Mp, Dp], W_up/W_gate [Dp, Hp],
W_down [Hp, Op] (Mp = M rounded up to block_m, Hp = H to block_h, Dp / Op = D / D_out to the
128 lanes) with blocks (bm, bh); n = 2 weight matrices in front of the activation for a GLU, 1
for an MLP; b = bytes per element of x:

  kernel             grid           streamed per step                   resident accumulator
  forward            (Mp/bm, Hp/bh) W_in[:, h], W_down[h, :]            y tile  [bm, Op] f32
  backward_dx        (Mp/bm, Hp/bh) W_in[:, h], W_down[h, :]            dx tile [bm, Dp] f32
  backward_dweights  (Hp/bh, Mp/bm) x[m, :], dy[m, :]                   dW_in[:, h] [Dp, bh],
                                                                        dW_down[h, :] [bh, Op] f32
  backward_fused     (Mp/bm, Hp/bh) W_in[:, h], W_down[h, :]            dx tile and ALL of dW_in
                                                                        [Dp, Hp], dW_down [Hp, Op]

Pallas re-fetches a block only when its index changes between consecutive grid steps, so the
forward/backward_dx kernels read the weights once per M tile (once in total when Hp = bh) and
the weight-gradient kernel reads x and dy once per H tile.

Weight-stream arithmetic intensity: every weight byte fetched feeds 2 * bm flops, i.e. bm
flops/byte in bf16. The kernel is compute bound once that exceeds the chip's ridge point
(peak / HBM bandwidth, from ``jax._src.tpu_info``): v4 224, v5e 240, v5p 187, v6e 561 flops/byte.
So bm wants to be 512 on v4/v5e/v5p and 1024 on v6e, and the [bm, Op] f32 accumulator plus
double-buffered x/y tiles then dominate VMEM: at llama-8B (D = 4096) bm = 1024 needs ~48 MiB
before the weight tiles, which v5e/v6e (128 MiB) hold, v5p (64 MiB) holds with bm = 512, and
v4 (16 MiB) only with bm = 128..256 -- there the kernel runs memory bound by design. The weight
gradient kernel has the mirror-image trade-off: x/dy bytes feed 2 * bh flops each, so it wants a
large bh and a moderate bm.

The backward runs either backward_dx + backward_dweights or backward_fused; the fused one does
n + 1 fewer [M, D, H] matmuls (no second recompute) but needs every weight gradient in VMEM as
f32 plus its output buffers, so it only fits small models (gpt2-small, SmolLM2 on v5e/v5p/v6e).

``choose_tiling`` enumerates bm in {sublane * 2^k} ∪ {M rounded to the sublane} and bh in
{MXU width * 2^k} ∪ {H rounded to 128} (both capped at 2048) and, per kernel, picks the blocks
with the least modelled time
    max(flops / MXU peak, HBM bytes / bandwidth) + grid steps * 0.35 µs
      + (one step's blocks) / bandwidth        (the pipeline's exposed fill and drain)
whose VMEM footprint fits 3/4 of the chip's VMEM (the rest is headroom for Mosaic's internal
scratch and for this model's error). Padding is counted as real work, so shapes that a block
divides win; of the two backward paths it takes the faster that fits. This is a MODEL: nobody has run these kernels on a TPU yet (no TPU here).
"""

from __future__ import annotations

import dataclasses
import math

from jax._src import tpu_info

KERNELS = ("forward", "backward_dx", "backward_dweights", "backward_fused")
BACKWARDS = (("backward_dx", "backward_dweights"), ("backward_fused",))  # the two ways to backprop
LANES = 128
MAX_BLOCK = 2048
STEP_OVERHEAD_S = 0.35e-6  # per grid step, from the Pallas TPU pipelining docs
VMEM_FRACTION = 0.75
F32_MATMUL_SLOWDOWN = 3  # f32 operands take several MXU passes; a rough factor for the model
DEFAULT_CHIP = "v5e"  # what interpret mode on a CPU models


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def sublane_multiple(itemsize: int) -> int:
  """Rows per native (sublane, 128) tile: 8 for 32-bit, 16 for 16-bit types."""
  return 8 * (4 // itemsize)


def chip_info(chip: str) -> tpu_info.TpuInfo:
  """JAX's per-TensorCore hardware table for "v4", "v5e", "v5p", "v6e", ... (one core)."""
  return tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion(chip), 1)


@dataclasses.dataclass(frozen=True)
class Problem:
  """The FFN as the kernels see it: 2-D x [m, d] and its weights, `itemsize` bytes per element."""

  m: int
  d: int
  h: int
  d_out: int
  itemsize: int
  glu: bool
  pwl_segments: int = 0  # K + 1 for a PWL activation (its gradient rows), 0 otherwise

  @property
  def weights_in(self) -> int:
    return 2 if self.glu else 1


@dataclasses.dataclass(frozen=True)
class Blocks:
  """One kernel's block sizes: rows of x per block, hidden columns per block."""

  block_m: int
  block_h: int

  def validate(self, problem: Problem, name: str) -> None:
    sublanes = sublane_multiple(problem.itemsize)
    if self.block_m <= 0 or self.block_m % sublanes:
      raise ValueError(f"{name}.block_m: expected a positive multiple of {sublanes} for "
                       f"{problem.itemsize}-byte inputs, got {self.block_m}")
    if self.block_h <= 0 or self.block_h % LANES:
      raise ValueError(f"{name}.block_h: expected a positive multiple of {LANES}, got {self.block_h}")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Blocks for the forward kernel and for one of the two backward paths: backward_dx +
  backward_dweights, or backward_fused (the other path's fields are None)."""

  forward: Blocks
  backward_dx: Blocks | None = None
  backward_dweights: Blocks | None = None
  backward_fused: Blocks | None = None

  @property
  def backward(self) -> tuple[str, ...]:
    """The backward kernels this tiling runs."""
    return BACKWARDS[1] if self.backward_fused else BACKWARDS[0]

  def validate(self, problem: Problem) -> None:
    given = tuple(name for name in KERNELS[1:] if getattr(self, name) is not None)
    if given not in BACKWARDS:
      raise ValueError(f"tiling: expected blocks for exactly one backward path, "
                       f"{' or '.join(' + '.join(path) for path in BACKWARDS)}; got {given}")
    for name in ("forward", *given):
      getattr(self, name).validate(problem, f"tiling.{name}")


@dataclasses.dataclass(frozen=True)
class PaddedShape:
  m: int
  d: int
  h: int
  d_out: int

  @classmethod
  def of(cls, problem: Problem, blocks: Blocks) -> PaddedShape:
    return cls(round_up(problem.m, blocks.block_m), round_up(problem.d, LANES),
               round_up(problem.h, blocks.block_h), round_up(problem.d_out, LANES))


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """What one kernel call costs in the model (bytes and flops include padding)."""

  vmem_bytes: int
  hbm_bytes: int  # kernel DMAs plus the wrapper's pad/slice copies
  flops: int
  grid_steps: int
  fill_bytes: int  # one step's blocks: fetched before the first step, written after the last

  def seconds(self, info: tpu_info.TpuInfo, itemsize: int = 2) -> float:
    """max(compute, memory) + per-step overhead + the pipeline's exposed fill and drain."""
    peak = info.bf16_ops_per_second / (F32_MATMUL_SLOWDOWN if itemsize == 4 else 1)
    bandwidth = info.mem_bw_bytes_per_second
    return (max(self.flops / peak, self.hbm_bytes / bandwidth) + self.grid_steps * STEP_OVERHEAD_S
            + self.fill_bytes / bandwidth)


def _copy_bytes(original: tuple[int, int], padded: tuple[int, int], itemsize: int) -> int:
  """HBM bytes of a pad (or slice) copy in the wrapper; zero when no padding is needed."""
  if original == padded:
    return 0
  return (math.prod(original) + math.prod(padded)) * itemsize


def kernel_cost(kernel: str, problem: Problem, blocks: Blocks) -> KernelCost:
  """VMEM footprint, HBM traffic, MXU flops and grid steps of one kernel (see module doc)."""
  p, b, n = PaddedShape.of(problem, blocks), problem.itemsize, problem.weights_in
  bm, bh = blocks.block_m, blocks.block_h
  m_tiles, h_tiles = p.m // bm, p.h // bh
  sublanes = 8
  weight_bytes = (n * p.d * p.h + p.h * p.d_out) * b
  # Double-buffered input blocks common to every kernel: weight tiles and (8-row padded) biases.
  weight_tiles = (n * p.d * bh + bh * p.d_out) * b
  weight_blocks = 2 * weight_tiles + 2 * sublanes * (n * bh + p.d_out) * 4
  tile = bm * bh  # one [bm, bh] f32 temporary
  x_pad = _copy_bytes((problem.m, problem.d), (p.m, p.d), b)  # also the size of the dx slice
  dy_pad = _copy_bytes((problem.m, problem.d_out), (p.m, p.d_out), b)  # and of the y slice
  weight_pads = (n * _copy_bytes((problem.d, problem.h), (p.d, p.h), b)
                 + _copy_bytes((problem.h, problem.d_out), (p.h, p.d_out), b))
  weight_reads = weight_bytes * (m_tiles if h_tiles > 1 else 1)
  if kernel == "forward":
    vmem = (2 * bm * p.d * b + weight_blocks + 2 * bm * p.d_out * b + bm * p.d_out * 4
            + (n + 1) * tile * 4 + tile * b)
    hbm = p.m * (p.d + p.d_out) * b + weight_reads + x_pad + weight_pads + dy_pad
    flops = 2 * p.m * p.h * (n * p.d + p.d_out)
    fill = bm * (p.d + p.d_out) * b + weight_tiles
  elif kernel == "backward_dx":
    vmem = (2 * bm * (2 * p.d + p.d_out) * b + weight_blocks + bm * p.d * 4
            + (2 * n + 3) * tile * 4 + n * tile * b)
    hbm = p.m * (2 * p.d + p.d_out) * b + weight_reads + 2 * x_pad + dy_pad + weight_pads
    flops = 2 * p.m * p.h * (2 * n * p.d + p.d_out)
    fill = bm * (2 * p.d + p.d_out) * b + weight_tiles
  elif kernel == "backward_dweights":
    gradient_blocks = 2 * (n * p.d * bh + bh * p.d_out) * b + 2 * sublanes * n * bh * 4
    pwl_rows = 2 * round_up(2 * problem.pwl_segments, sublanes) * bh * 4
    vmem = (2 * bm * (p.d + p.d_out) * b + weight_blocks + gradient_blocks + pwl_rows
            + (n * p.d * bh + bh * p.d_out) * 4 + (2 * n + 3) * tile * 4 + (n + 1) * tile * b
            + bm * (p.d + p.d_out) * b)  # transposed copies of the x / dy tiles
    activation_reads = p.m * (p.d + p.d_out) * b * (h_tiles if m_tiles > 1 else 1)
    hbm = activation_reads + 2 * weight_bytes + x_pad + dy_pad + 2 * weight_pads
    flops = 2 * p.m * p.h * (2 * n * p.d + 2 * p.d_out)
    fill = bm * (p.d + p.d_out) * b + 2 * weight_tiles
  elif kernel == "backward_fused":
    # backward_dx's blocks plus every weight gradient resident: f32 accumulators and
    # (double-buffered) whole-array outputs, written back once after the last step.
    vmem = (2 * bm * (2 * p.d + p.d_out) * b + weight_blocks + bm * p.d * 4
            + weight_bytes // b * (4 + 2 * b) + 2 * sublanes * n * p.h * 4
            + 2 * round_up(2 * problem.pwl_segments, sublanes) * p.h * 4
            + (2 * n + 3) * tile * 4 + (n + 1) * tile * b + bm * (p.d + p.d_out) * b)
    hbm = (p.m * (2 * p.d + p.d_out) * b + weight_reads + weight_bytes + 2 * x_pad + dy_pad
           + 2 * weight_pads)
    flops = 2 * p.m * p.h * (3 * n * p.d + 2 * p.d_out)
    fill = bm * (2 * p.d + p.d_out) * b + weight_tiles + weight_bytes
  else:
    raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
  return KernelCost(int(vmem), int(hbm), int(flops), m_tiles * h_tiles, int(fill))


def _candidates(size: int, quantum: int, smallest: int) -> list[int]:
  """Block sizes to try: `smallest` * 2^k, and `size` rounded up to `quantum`, all up to the
  smaller of `size` rounded up and MAX_BLOCK (largest first)."""
  limit = min(round_up(size, quantum), MAX_BLOCK)
  sizes = {smallest * 2**k for k in range(12) if smallest * 2**k <= limit}
  return sorted(sizes | {limit} if limit == round_up(size, quantum) else sizes, reverse=True)


def choose_blocks(kernel: str, problem: Problem, info: tpu_info.TpuInfo) -> Blocks:
  """The (bm, bh) with the least modelled time that fits VMEM_FRACTION of the chip's VMEM."""
  sublanes = sublane_multiple(problem.itemsize)
  mxu = min(info.mxu_column_size, round_up(problem.h, LANES))
  budget = VMEM_FRACTION * info.vmem_capacity_bytes
  best, best_seconds = None, math.inf
  for block_m in _candidates(problem.m, sublanes, sublanes):
    for block_h in _candidates(problem.h, LANES, mxu):
      blocks = Blocks(block_m, block_h)
      cost = kernel_cost(kernel, problem, blocks)
      seconds = cost.seconds(info, problem.itemsize)
      if cost.vmem_bytes <= budget and seconds < best_seconds:
        best, best_seconds = blocks, seconds
  if best is None:
    raise NotImplementedError(f"no {kernel} tiling of D={problem.d}, H={problem.h}, "
                              f"D_out={problem.d_out} fits "
                              f"{info.vmem_capacity_bytes >> 20} MiB of VMEM")
  return best


def choose_tiling(problem: Problem, info: tpu_info.TpuInfo) -> Tiling:
  """Best blocks per kernel, and the backward path (two kernels or fused) with the least
  modelled time among those that fit."""
  forward = choose_blocks("forward", problem, info)
  paths = []
  for path in BACKWARDS:
    try:
      blocks = {kernel: choose_blocks(kernel, problem, info) for kernel in path}
    except NotImplementedError as reason:
      paths.append((math.inf, str(reason), {}))
      continue
    seconds = sum(kernel_cost(kernel, problem, b).seconds(info, problem.itemsize)
                  for kernel, b in blocks.items())
    paths.append((seconds, "", blocks))
  seconds, reason, blocks = min(paths, key=lambda path: path[0])
  if not blocks:
    raise NotImplementedError(reason)
  return Tiling(forward, **blocks)


def vmem_limit_bytes(kernel: str, problem: Problem, blocks: Blocks, info: tpu_info.TpuInfo) -> int:
  """Scoped-VMEM limit to request for a kernel: its modelled footprint with 25% headroom (at
  least Mosaic's 32 MiB default, at most 90% of the chip's VMEM)."""
  footprint = kernel_cost(kernel, problem, blocks).vmem_bytes
  return int(min(0.9 * info.vmem_capacity_bytes, max(32 << 20, 1.25 * footprint)))
