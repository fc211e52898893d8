"""The "pallas_mosaic_gpu" implementation of ``flashffn_jax.ops.ffn``: path choice and custom VJP.

Which path runs (decided at trace time from the shape and activation kind; see ``choose_plan``):

  * ``epilogue`` -- ``fused_ffn_sm90.gemm1_activation`` (GEMM1 with the activation in its epilogue,
                    [M, H] written once in x's dtype) followed by XLA's GEMM2. Chosen for
                    every measured shape at M > 64 (SmolLM2, gpt2-small, gpt2-xl, llama-1B,
                    llama-8B) and untuned shapes with M > 64. Its two compute warpgroups
                    share each tile ("cooperative" schedule) except in the PWL plans of
                    SmolLM2, gpt2-small, gpt2-xl, llama-1B and untuned MLP shapes, where each
                    owns whole tiles ("pingpong"; see PINGPONG_*_TILES); gpt2-xl's and
                    llama-1B's write the PWL's hinges as relu(h - t_k) (``kernels.HINGES``).
                    The plans of SmolLM2, llama-1B and llama-8B (``Plan.down``) run GEMM2 on
                    the same kernel with the identity epilogue instead of XLA's dot. A PWL whose
                    knots are evenly spaced is evaluated by table lookup there and in the dgrad
                    kernel (``Plan.pwl_lookup``, ``pwl_lookup``): the same cost for any knot count.
  * ``fused``    -- ``fused_ffn_sm90.fused_ffn``: both GEMMs in one kernel, [M, H] never in HBM
                    (D_out <= 640). Measured slower than ``epilogue`` wherever it fits on the H200
                    (SmolLM2 M = 8192: 0.209 vs 0.122 ms; decode: 0.031 vs 0.022 ms), so no tuned
                    entry selects it; it runs when a caller passes its ``Plan``.
  * ``decode``   -- ``decode_sm90.decode_ffn``: one kernel, H split over 32/64-column CTAs, f32
                    partials summed by XLA, or by the CTAs themselves in the same launch
                    (``DecodeConfig.sum_in_kernel``) (D_out <= ~1000); with swapped operands
                    (``DecodeConfig.swap_ab``: tokens on wgmma's N axis) it does no work on
                    padding rows; in 2-CTA clusters (``DecodeConfig.cluster_pairs``) two CTAs
                    share each hidden block. Chosen at 2 <= M <= 16 for SmolLM2 with a PWL
                    (``TUNED_FEW_TOKENS``): swapped in pairs + XLA sum 6.93 vs 9.88 us on the
                    H200's clock, 8.8 vs 10.0 us of wall clock at M = 16 (benchmarks/results/
                    decode-profile-2026-12-04-pairs.md); it loses at M = 64 (11.84 vs 11.09 us),
                    and in one launch (the sum in the kernel, unpaired) it loses its gain to the
                    two grid-wide meetings.
  * XLA          -- NotImplementedError, so ``ffn`` falls back to the XLA reference: non-Hopper
                    devices, float32, callable activations, shapes where ``TUNED`` measured XLA
                    faster (llama-8B decode, SmolLM2 decode at 16 < M <= 64 or exact
                    activations), and untuned decode shapes. At M = 1
                    ``flashffn_jax.ops.xla_padded_row`` serves first (XLA on 8 padded rows).

``TUNED`` holds the measured winner per (glu, D, H, D_out, decode?, pwl?) from
``benchmarks/bench_gpu.py`` (``TUNED_FEW_TOKENS`` at M <= 16 first, from
``bench_decode_profile.py``); other shapes use ``default_plan``.

The backward pass (custom VJP) runs in XLA one hidden chunk at a time (``backward.ffn_backward``)
or, with ``Plan(backward="epilogue")`` (the ping-pong plans ``PINGPONG_MLP_F16`` and
``PINGPONG_GLU_F16``: the PWL and exact plans of SmolLM2 and gpt2-small, the PWL plans of
gpt2-xl and unmeasured MLPs), starts with ``dgrad_sm90.dgrad_activation``: dy W_down^T with the
activation's derivative in its epilogue, so the f32 [M, H] d_hidden never reaches HBM.
The forward rule sees which inputs are differentiated (``symbolic_zeros``); where a PWL's slopes
or intercepts are, the dgrad kernel gives their gradients too when it reads the saved segments
and its bins fit (``Plan.pwl_gradients_dgrad``, below), and otherwise such a plan runs the
chunked backward. The cooperative dgrad kernel with exact activations was slower
than the chunked backward on the H200 (2026-12-01, sixth session: fwd+bwd 0.90x vs 1.01x of XLA
at SmolLM2, 0.83x vs 0.86x at gpt2-small; the kernel ~135 / ~205 us where the XLA GEMM +
elementwise pass it replaces take ~85 / ~155). It gets the pre-activations one of these ways,
``Plan.residuals``:

  * "recompute"      -- the forward saves only its inputs; the backward recomputes GEMM1
                        (no [M, H] residual; +2/9 of a GLU training step's FLOPs, +1/6 MLP);
  * "preactivations" -- the epilogue kernel also writes g and u (GLU) or u (MLP) and the
                        backward reads them (epilogue path only): XLA autodiff's FLOPs, 4 (MLP)
                        or 8 (GLU) bytes per [M, H] element kept between forward and backward:
                        (hi, lo) pairs in x's dtype (``backward.split_preactivation``).
  * "segments"       -- the same for a PWL in 3 (MLP) or 5 (GLU) bytes: the activation's input
                        as bf16 + its int8 segment index, a GLU's u as bf16
                        (``backward.save_preactivations``); the index costs the forward kernel
                        13 us at SmolLM2, 50 us at gpt2-small (H200, M = 8192).
  * "floor-bits"     -- the same bytes for bf16 inputs without the per-knot count: the
                        activation's input as bf16 + uint8 low bits whose decoded value is on
                        its side of every knot of 15 significant bits (``backward.
                        split_floor_bits``); a PWL's knots are rounded to such (``backward.
                        snap_knots``: the PWL moves by <= |Δslope| 2^-15 |t|). The bf16 PWL
                        plans' choice: the forward kernel 67 us at SmolLM2 (segments 78),
                        95 us at gpt2-small (pairs 92; H200, M = 8192, tenth session). f16
                        inputs save "segments" (a GLU's PWL) or "preactivations" instead
                        (``float16_residuals``): hi is a bf16, and the kernel's two-byte
                        staging slot holds x's dtype.

A PWL that is not trained, on the dgrad backward, may save instead each element's segment
(uint8; ``Plan.lookup_residuals``) beside the forward's output h (MLP: the same 3 bytes as floor
bits) or beside a = act(g) and u (GLU: 5 bytes, as floor bits); the dgrad kernel reads them and
writes d_u (, h = a u and d_g) alone, where from floor bits it decodes p and evaluates act and
act'. The forward finds the segment by the lookup (evenly spaced knots) or by counting the knots
at or below p (others, up to ``pwl_lookup.MAX_COUNTED_KNOTS``; kind "pwl_counted": its value is
then that segment's line, not the hinges). On in the ping-pong plans. Their GLU dgrad kernel
also writes [d_g | d_u] as one array (``Plan.joint_glu_gradients``), so XLA's dx is one GEMM.
A PWL that is trained saves its input p in place of a (GLU: g, u, j) or of h (MLP: p, j; the
dgrad kernel writes h), the same bytes, and the dgrad kernel also sums d_a p and d_a per
segment in SMEM bins
(``kernels.LOOKUP_SEGMENT_INPUTS``, ``Plan.pwl_gradients_dgrad``: PWLs of up to 18 (GLU) / 22
(MLP) knots). H200, training step with the PWL's gradients, GPU-busy, twenty-seventh session
(backward-profile-2026-12-04-twentyseventh-sums*.md): chunked -> dgrad kernel SmolLM2 413.6 ->
298.5 us (frozen PWL 270.6, XLA exact 347.3: 1.16x), gpt2-small 633.2 -> 429.6 us (frozen
377.9, XLA 429.5: 1.00x; keeping the forward's h as well, 5 bytes an element, 409.5: the dgrad
kernel's h store costs ~22 us); SmolLM2's fine-tune loop 104.0k -> 119.0k tokens/s (exact XLA
120.1k on the same machine; 158.9k vs 149.5k once the loop read its metrics a step behind,
twenty-eighth session).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.activation import Activation, evenly_spaced
from pallas_kernels.gpu import (backward, decode_sm90, dgrad_sm90, fused_ffn_sm90 as kernels,
                                hinge_table, pwl_lookup, segment_sums_sm90)

DECODE_ROWS = 64  # M at or below this is "decode": one row block
# [M, chunk] elements per backward chunk: 128 Mi (one chunk up to llama-8B at M = 8192) was the
# fastest budget measured on the H200. At llama-8B two 64 Mi chunks cost ~0.85 ms of slicing,
# zero-fill and accumulation per step (fwd+bwd 14.93 vs 14.07 ms, XLA 14.28; temporary memory
# 1384 vs 1568 MB, XLA's 1568; thirteenth session); 16 Mi was 5-20% slower than 64 Mi.
BACKWARD_CHUNK_ELEMENTS = 128 * 1024 * 1024
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
RESIDUALS = ("recompute", "preactivations", "segments", "floor-bits")
# Plan.segment_sums -> f(p_parts, g, knots) (``backward.ffn_backward``'s segment_sums): XLA's
# band reductions, the one-pass kernel on an f32 copy of p, or the kernel reading the forward's
# saved parts (no f32 copy; with "segments" its bands come from the int8 index and its p is the
# bf16 hi: PWL-parameter gradients off by <= 2^-9 relative per term instead of exact-p sums).
# H200, 2026-12-02, SmolLM2 step with PWL-parameter gradients (GLU, saves segments): "kernel"
# 0.480 ms, "kernel-residuals" 0.465 at M = 8192 (0.277 / 0.275 at 4096); the floor-bits
# plans read theirs too (GPU-busy, same run: SmolLM2 417.2 us vs 420.3 reading segments,
# gpt2-small 644.8 vs 645.9 reading pairs).
SEGMENT_SUMS = {
    "xla": backward.xla_segment_sums,
    "kernel": lambda parts, g, knots: segment_sums_sm90.segment_sums(
        backward.join_saved(parts, knots), g, knots),
    "kernel-residuals": segment_sums_sm90.segment_sums,
}
BACKWARDS = ("xla", "epilogue")
DGRAD_RESIDUALS = ("preactivations", "floor-bits")  # what dgrad_sm90 decodes
D_HIDDEN = ("float32", "input")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to run one shape: ``path`` is "fused", "epilogue", "decode" or "xla" plus that path's
  config (``fused`` / ``epilogue`` / ``decode``), what the forward keeps for the backward
  (``residuals``: "recompute", or on the epilogue path "preactivations", "segments" or
  "floor-bits", see the module docstring) and how many [M, chunk] elements the backward handles
  per chunk; ``segment_sums``: how the backward sums a PWL's parameter gradients, "kernel"
  (``segment_sums_sm90``, one pass per chunk: 0.05 vs 0.23 ms at SmolLM2 M = 4096 on the H200),
  "kernel-residuals" (the same reading the saved residuals, see ``SEGMENT_SUMS``; the PWL
  plans' choice) or "xla" (``pwl_segment_sums``); ``backward``: "xla" (chunked) or "epilogue"
  (``dgrad_sm90``, needs residuals "preactivations" or "floor-bits"; tiles ``dgrad``, default
  ``DGRAD_GLU`` / ``DGRAD_MLP``; the chunked backward serves when a PWL's parameters are
  differentiated); ``d_hidden``: the dtype of the chunked backward's d_hidden = dy W_down^T,
  "float32" or "input" (x's dtype, as XLA autodiff of a bf16 model keeps it; f32 accumulation
  either way: half the bytes of that [M, H] array; on the H200 the step's GPU time -1%, its
  compiled temp memory -13-17%, gradients 1-2.4e-3 from f32); ``down``: on the epilogue path,
  GEMM2 (h W_down + b_down) by ``gemm1_activation`` with the identity epilogue on these tiles
  instead of XLA's dot (None) - for D_out where XLA's tiles quantize badly, e.g. 576 = 4.5 x 128
  (``DOWN_NARROW`` / ``DOWN_WIDE``, measured by ``benchmarks/bench_down_projection.py``);
  ``biased_down``: GEMM2's tiles instead of ``down`` when the FFN has b_down, where XLA's dot
  adds the bias in a pass of its own (``GPT2_SMALL_MLP_F16``);
  ``pwl_lookup``: the forward epilogue evaluates the PWL by table lookup (``pwl_lookup``, for
  evenly spaced knots) instead of hinges - not tuned per shape: ``ffn_mosaic_gpu`` sets it per
  call when the knots are evenly spaced (``with_pwl_lookup``); ``dgrad_lookup``: with it, the dgrad
  kernel (``backward="epilogue"``) also takes the PWL's value and slope from the lookup table
  (``pwl_lookup.value_and_slope``: one lookup for both, where the hinge table's select chain costs
  3 instructions per pair and knot; H200: SmolLM2 fwd+bwd with a uniform PWL-64 0.528 -> 0.315
  ms), set with ``pwl_lookup`` by ``with_pwl_lookup``; otherwise the backward keeps the hinge
  table; ``segment_lookup``: a trained PWL's segment sums by the lookup's bins
  (``segment_sums_sm90.segment_sums_lookup``, O(1) per element for any K) instead of
  ``segment_sums``, set with ``pwl_lookup`` by ``with_pwl_lookup`` (H200, SmolLM2's FFN at M =
  4096 with a uniform PWL-64: sums 0.133 -> 0.050 ms, training step with PWL gradients 0.339 ->
  0.254 ms, benchmarks/results/pwl-grads-2026-12-03-twentysecond-*.json); ``lookup_residuals``:
  for a PWL that is not trained, on the dgrad backward, the forward saves its output h and each
  element's segment j (uint8, ``kernels.LOOKUP_SEGMENTS``; a GLU a = act(g), u and j, not h)
  instead of ``residuals``' floor bits - the same 3 (MLP) or 5 (GLU) bytes per hidden element -
  and the dgrad kernel reads those, finds the slope as s_j and writes d_u (, h = a u, d_g)
  alone; j comes from the lookup (``dgrad_lookup``) or, for other knots (at most
  ``pwl_lookup.MAX_COUNTED_KNOTS``), from a count of the knots at or below p: on in the
  ping-pong plans (gpt2-small's step with a uniform PWL-64 402.8 -> 374.6 us, with PWL-16 431.3
  -> 374.7; SmolLM2's PWL-16 306.9 -> 288.6); other PWLs and exact activations keep
  ``residuals``; ``joint_glu_gradients``: a GLU's dgrad kernel writes [d_g | d_u] as one
  [M, 2H] array and XLA's dx is one GEMM with K = 2H (``backward.joint_column_gradients``; SmolLM2
  with both 306.9 -> 272.2 us; the chunked backward ignores it);
  ``segments_dgrad``: the dgrad kernel's tiles when it reads those (None: ``dgrad``'s) - with
  no select chain in its epilogue it affords wider ones (``DGRAD_PINGPONG_WIDE``);
  ``pwl_gradients_dgrad``: with ``lookup_residuals``, the tiles on which the dgrad kernel also
  gives a trained PWL's gradients (``dgrad_sm90``'s ``pwl_gradients``: the forward saves the
  PWL's input, ``kernels.LOOKUP_SEGMENT_INPUTS``) where its bins fit in SMEM beside them
  (``dgrad_sums_fit``); None, or more knots: a trained PWL runs the chunked backward.
  ``with_pwl_lookup`` clears the other three for a PWL whose knots are not evenly spaced."""

  path: str
  fused: kernels.FusedConfig | None = None
  epilogue: kernels.EpilogueConfig | None = None
  decode: decode_sm90.DecodeConfig | None = None
  backward_chunk_elements: int = BACKWARD_CHUNK_ELEMENTS
  residuals: str = "recompute"
  segment_sums: str = "kernel"
  backward: str = "xla"
  dgrad: kernels.EpilogueConfig | None = None
  d_hidden: str = "float32"
  down: kernels.EpilogueConfig | None = None
  biased_down: kernels.EpilogueConfig | None = None
  pwl_lookup: bool = False
  dgrad_lookup: bool = False
  segment_lookup: bool = False
  lookup_residuals: bool = False
  segments_dgrad: kernels.EpilogueConfig | None = None
  joint_glu_gradients: bool = False
  pwl_gradients_dgrad: kernels.EpilogueConfig | None = None

  def __post_init__(self):
    if self.residuals not in RESIDUALS:
      raise ValueError(f"residuals={self.residuals!r}: expected one of {RESIDUALS}")
    if self.segment_sums not in SEGMENT_SUMS:
      raise ValueError(
          f"segment_sums={self.segment_sums!r}: expected one of {tuple(SEGMENT_SUMS)}")
    if self.residuals != "recompute" and self.path != "epilogue":
      raise ValueError(f"residuals={self.residuals!r} needs the epilogue path, got {self.path!r}")
    if (self.down or self.biased_down) is not None and self.path != "epilogue":
      raise ValueError(f"down= / biased_down= (GEMM2 tiles) needs the epilogue path, got "
                       f"{self.path!r}")
    if self.d_hidden not in D_HIDDEN:
      raise ValueError(f"d_hidden={self.d_hidden!r}: expected one of {D_HIDDEN}")
    if self.backward not in BACKWARDS:
      raise ValueError(f"backward={self.backward!r}: expected one of {BACKWARDS}")
    if self.pwl_lookup and not self.takes_lookup:
      raise ValueError("pwl_lookup=True needs the epilogue path without segment residuals (they "
                       f"count knots from the hinge table), got {self.path!r} / {self.residuals!r}")
    if self.dgrad_lookup and not (self.pwl_lookup and self.backward == "epilogue"):
      raise ValueError("dgrad_lookup=True needs pwl_lookup=True and backward='epilogue'")
    if self.segment_lookup and not self.pwl_lookup:
      raise ValueError("segment_lookup=True needs pwl_lookup=True (evenly spaced knots)")
    if self.backward == "epilogue" and self.residuals not in DGRAD_RESIDUALS:
      raise ValueError("backward='epilogue' reads the saved pre-activations: it needs "
                       f"residuals in {DGRAD_RESIDUALS}, got {self.residuals!r}")

  def dgrad_sums_fit(self, glu: bool, dtype, num_knots: int) -> bool:
    """Whether the dgrad kernel gives a trained PWL of ``num_knots`` knots its gradients: the
    plan has ``pwl_gradients_dgrad`` tiles and a dgrad backward reading the saved segments
    (``lookup_residuals``), and the bins (2 KiB per segment) fit in SMEM beside the tiles' and
    the saved parts' buffers (bf16: up to 18 knots for the GLU plans, 22 for the MLP ones)."""
    if self.pwl_gradients_dgrad is None or not self.lookup_residuals or self.backward != "epilogue":
      return False
    parts = [t for entry in kernels.saved_part_dtypes(kernels.LOOKUP_SEGMENT_INPUTS, 1 + glu,
                                                      dtype) for t in entry]
    return dgrad_sm90.smem_bytes(self.pwl_gradients_dgrad, parts, jnp.dtype(dtype).itemsize,
                                 num_knots + 1) <= kernels.SMEM_BYTES

  @property
  def takes_lookup(self) -> bool:
    """Whether the PWL may be evaluated by table lookup here: the epilogue path, without segment
    residuals (they count knots from the hinge table)."""
    return self.path == "epilogue" and self.residuals != "segments"

  @property
  def saves(self) -> str | None:
    """What the forward kernel writes for the backward (``gemm1_activation``'s ``saves``):
    ``residuals``, or None when the backward recomputes GEMM1."""
    return None if self.residuals == "recompute" else self.residuals


XLA = Plan("xla")
# dgrad_sm90 tiles: a GLU's four saved parts leave SMEM for 64-column tiles only
DGRAD_GLU = kernels.EpilogueConfig(tile_m=64, tile_n=64, stages=3)
DGRAD_MLP = kernels.EpilogueConfig(tile_m=64, tile_n=128, stages=3)
# ping-pong dgrad tiles. H200, 2026-12-02, the kernel alone at M = 8192 (PWL-16, floor bits,
# benchmarks/results/dgrad-kernel-2026-12-02-*.json): 128 x 128 tiles spill (168 registers;
# gpt2-small 399 us), 64 x 128 x 4 f16: gpt2-small 133 us (cooperative 64 x 128: 178), SmolLM2
# 94 us (cooperative 64 x 64: 117).
DGRAD_PINGPONG = kernels.EpilogueConfig(tile_m=64, tile_n=128, stages=4, pwl_dtype="float16",
                                        schedule="pingpong")
# 128 x 128 x 3 ping-pong dgrad tiles. H200, 2026-12-03 (twenty-fourth session, training step
# GPU-busy, two rounds, backward-profile-2026-12-03-twentyfourth-dgrad-tiles.md), vs 64 x 128 x 4:
# reading the lookup residuals (uniform PWL-64) gpt2-small 377 -> 364 us, SmolLM2 280 -> 277,
# gpt2-xl 1533 -> 1451; decoding floor bits (PWL-16) gpt2-xl 1612 / 1621 -> 1571 / 1584, but
# gpt2-small 437 -> 450 and SmolLM2 307 -> 330 (the select chain's registers).
DGRAD_PINGPONG_WIDE = dataclasses.replace(DGRAD_PINGPONG, tile_m=128, stages=3)
_GLU_TILES = dict(tile_m=64, tile_n=128, stages=3)
_MLP_TILES = dict(tile_m=128, tile_n=128, stages=3)
# schedule="pingpong" tiles, one per warpgroup (a GLU's two accumulators or an MLP's one take
# 128 registers a thread). H200, 2026-12-01 (seventh session), forward vs the cooperative tiles in
# the same run: gpt2-small 0.1407 vs 0.1432 ms (its training step's forward kernel 91 vs 97 us),
# SmolLM2 0.0930 vs 0.0951 (but 85 vs 79 us saving segments in training), gpt2-xl 0.5582 vs
# 0.5515, llama-1B 1.327 vs 1.284. Saving floor bits (2026-12-02, eleventh session) SmolLM2's
# forward 0.0970 vs 0.1015 ms (tenth: 0.0878 vs 0.0914) and its training step 332.4 / 332.1 vs
# 334.4 / 334.7 us GPU-busy (variants alternated): the PWL plans of SmolLM2, gpt2-small, gpt2-xl
# use it.
PINGPONG_GLU_TILES = dict(tile_m=128, tile_n=64, stages=5)
PINGPONG_MLP_TILES = dict(tile_m=128, tile_n=128, stages=4)
# Epilogue plans save the pre-activations for the backward: faster than recomputing GEMM1 at every
# measured training shape (H200, 2026-12-01: e.g. llama-1B fwd+bwd 4.24 vs 5.05 ms). For the
# memory-lean recompute, wrap the layer in jax.checkpoint / nnx.remat, or pass a Plan.
# A bf16 PWL plan saves "floor-bits": 5 (GLU) / 3 (MLP) bytes per hidden element, 23% / 21% of
# XLA autodiff's residuals (pairs: 8 / 4 bytes, 36% / 29%). H200, 2026-12-02 (tenth session),
# training-step GPU time vs the former defaults: SmolLM2 332.9 vs 351.9 us ("segments", whose
# int8 segment count - two f32 instructions per knot and element - costs the ALU-bound epilogue
# 13 us at SmolLM2 and 50 at gpt2-small), llama-1B 3586 vs 3663 us; gpt2-small 494.5 vs 489.5
# (pairs, +1%), gpt2-xl 1664.8 (ping-pong) vs 1683.6 (cooperative pairs; its 128 x 128 x 3 tiles
# leave no SMEM for the one-byte staging slot). Exact activations keep pairs, except at SmolLM2
# and gpt2-small, whose exact plans are the PWL plans (``TUNED``, sixteenth session).
_SAVED = dict(residuals="preactivations")
_FLOOR_BITS = dict(residuals="floor-bits", segment_sums="kernel-residuals")
EPILOGUE_GLU = Plan("epilogue", epilogue=kernels.EpilogueConfig(**_GLU_TILES), **_SAVED)
EPILOGUE_MLP = Plan("epilogue", epilogue=kernels.EpilogueConfig(**_MLP_TILES), **_SAVED)
EPILOGUE_GLU_F16 = Plan("epilogue", epilogue=kernels.EpilogueConfig(**_GLU_TILES,
                                                                    pwl_dtype="float16"),
                        **_FLOOR_BITS)
EPILOGUE_MLP_F16 = Plan("epilogue", epilogue=kernels.EpilogueConfig(**_MLP_TILES,
                                                                    pwl_dtype="float16"), **_SAVED)
# The ping-pong PWL plans start their backward with the ping-pong dgrad kernel (the chunked
# backward when the PWL's parameters are differentiated). H200, training step GPU-busy with the
# dependent loss, chunked -> dgrad kernel: 2026-12-02 (fourteenth session, jnp select chain)
# gpt2-small 498.0 -> 473.2 us (XLA exact 460.2), gpt2-xl 1818 -> 1782 (XLA 1726), SmolLM2
# 336.2 -> 338.9 (then kept chunked); sixteenth session (``packed_pwl``'s chain) gpt2-small
# 456.5 (XLA 461.3), SmolLM2 339.7 -> 327.1 (XLA 381.5), gpt2-xl 1743 (XLA 1708)
# (benchmarks/results/backward-profile-2026-12-02-sixteenth-packed.md). The MLP plans' uniform
# PWLs save h and the lookup's segments (``lookup_residuals``). H200, 2026-12-03 (twenty-third
# session), gpt2-small uniform PWL-64 training step GPU-busy 402.8 -> 374.6 us (forward kernel
# 78.2 -> 63.0, dgrad kernel 102.1 -> 87.5; XLA exact 427.4;
# backward-profile-2026-12-03-twentythird-lookup-residuals.md); bench_gpu fwd+bwd 0.419 vs XLA
# exact 0.480 ms (1.15x), gpt2-xl 1.725 vs 1.797 (1.04x; h200-2026-12-03-twentythird-gpt2.md).
# 2026-12-03 (twenty-fifth session), other knots counted (kind "pwl_counted"): gpt2-small's
# PWL-16 step 431.3 -> 374.7 us (forward kernel 93.8 -> 81.1, dgrad kernel 116.8 -> 72.1; XLA
# exact 427.0), gpt2-xl 1538.3 -> 1450.6 (XLA 1518.8; backward-profile-2026-12-03-twentyfifth-
# counted.md); bench_gpu fwd+bwd gpt2-small 0.498 -> 0.431 ms vs XLA exact 0.488 (1.13x), gpt2-xl
# 1.834 -> 1.715 vs 1.815 (1.06x; h200-2026-12-03-twentyfifth-gpt2.md).
# A GLU's segments, act(g) and u (5 bytes per hidden element, as floor bits; the dgrad kernel
# writes h = act(g) u) and its [d_g | d_u] as one array (``joint_glu_gradients``): SmolLM2's
# PWL-16 step 306.9 -> 288.6 (segments) / 291.7 (joint) / 272.2 us (both), uniform PWL-64 285.0
# -> 267.8 (both; backward-profile-2026-12-03-twentyfifth-glu-*.md, twenty-fifth session). (The
# twenty-fourth session's form kept h too, 7 bytes: 32% of XLA's memory, so it stayed opt-in.)
# A trained PWL's gradients from the dgrad kernel's bins (``pwl_gradients_dgrad``): the GLU's
# three saved parts and PWL-16's bins (34 KiB) leave SMEM for 64 x 128 x 3 tiles (up to 18
# knots), an MLP's two for DGRAD_PINGPONG_WIDE's (up to 22).
DGRAD_PINGPONG_SUMS_GLU = dataclasses.replace(DGRAD_PINGPONG, stages=3)
_DGRAD_PINGPONG_PLAN = dict(**_FLOOR_BITS, backward="epilogue", dgrad=DGRAD_PINGPONG,
                           segments_dgrad=DGRAD_PINGPONG_WIDE, lookup_residuals=True)
PINGPONG_GLU_F16 = Plan("epilogue", epilogue=kernels.EpilogueConfig(
    **PINGPONG_GLU_TILES, pwl_dtype="float16", schedule="pingpong"), **_DGRAD_PINGPONG_PLAN,
    joint_glu_gradients=True, pwl_gradients_dgrad=DGRAD_PINGPONG_SUMS_GLU)
PINGPONG_MLP_F16 = Plan("epilogue", epilogue=kernels.EpilogueConfig(
    **PINGPONG_MLP_TILES, pwl_dtype="float16", schedule="pingpong"), **_DGRAD_PINGPONG_PLAN,
    pwl_gradients_dgrad=DGRAD_PINGPONG_WIDE)
# gpt2-xl's and llama-1B's plans write the f16 hinges as relu(h - t_k) (``kernels.HINGES``). H200,
# eighteenth session (benchmarks/NOTES.md), max -> relu hinges: the forward kernel alone (GPU
# time, ping-pong, M = 8192) saving floor bits SmolLM2 65.0 -> 63.7 us, llama-1B 845 -> 793,
# llama-8B 2782 -> 2649, gpt2-xl 284.9 -> 280.7, gpt2-small 94.2 -> 97.2 (llama-1B's cooperative
# 64 x 128 tiles 811 -> 823); saving nothing (inference) SmolLM2 50.6 -> 52.3, llama-1B 826 ->
# 820; whole forward, wall clock: gpt2-xl 0.5627 -> 0.5407 ms, SmolLM2 0.0864 -> 0.0888,
# gpt2-small 0.1387 -> 0.1423. The relu form pays where the floor bits' integer ops share the
# ALU pipe with the max hinges, and at gpt2-xl; SmolLM2 and gpt2-small keep max(h, t_k).
PINGPONG_MLP_F16_RELU = dataclasses.replace(PINGPONG_MLP_F16, epilogue=dataclasses.replace(
    PINGPONG_MLP_F16.epilogue, hinges="relu"))
# gpt2-xl decodes floor bits on the wide dgrad tiles as well (DGRAD_PINGPONG_WIDE's measurements;
# since its PWLs save segments, only those of more than pwl_lookup.MAX_COUNTED_KNOTS knots do)
GPT2_XL_MLP_F16 = dataclasses.replace(PINGPONG_MLP_F16_RELU, dgrad=DGRAD_PINGPONG_WIDE)
# llama-1B: the ping-pong relu forward (793 us saving floor bits vs the cooperative tiles' 811)
# with the chunked backward, which its training step measured faster than the dgrad kernel on
# floor bits (3780.8 vs 3813.5 us GPU-busy, sixteenth session). The dgrad kernel on the GLU's
# segments with [d_g | d_u] as one array (the SmolLM2 plan's backward) ties it: median of four
# rounds 3725 vs 3736 us (twenty-sixth session, backward-profile-2026-12-04-twentysixth-llama1b.md;
# the twenty-fifth's two calls disagreed by 9% with the clocks); at llama-8B (LLAMA_8B_GLU_F16's
# chunked backward) it loses, 13382 vs 13096 us (-llama8b.md). Both keep the chunked backward.
PINGPONG_GLU_F16_RELU_CHUNKED = Plan("epilogue", epilogue=dataclasses.replace(
    PINGPONG_GLU_F16.epilogue, hinges="relu"), **_FLOOR_BITS)

# GEMM2 (``Plan.down``) on the epilogue kernel with the identity epilogue, where XLA's dot tiles
# D_out badly. H200, 2026-12-03 (nineteenth session, results/down-projection-h200-2026-12-03*.json),
# GEMM2 alone at M = 8192, GPU time vs XLA's dot: SmolLM2 (D_out 576) 64 x 192 x 4 ping-pong 25.9
# vs 31.2 us (floor 20.7 at 700 TF/s), gpt2-small (768) 128 x 128 x 4 ping-pong 55.3 vs 60.9,
# llama-1B (2048) 64 x 256 x 3 cooperative 340.5 vs 361.5, llama-8B (4096) the same tiles 1195 vs
# 1228; gpt2-xl (1600): none won (128 x 128 x 4 ping-pong 244.0 vs 238.2). Whole forward, wall
# clock, with vs without in the same run (h200-2026-12-03-nineteenth-*.md): SmolLM2 0.0862 vs
# 0.0871 ms (lower in each of 5 rounds), llama-1B 1.2629 vs 1.2670, llama-8B 4.349 vs 4.373 (4 of
# 5 rounds); gpt2-small 0.1450 vs 0.1427 (slower in 4 of 5: it keeps XLA's dot). Training step,
# GPU-busy (backward-profile-2026-12-03-nineteenth-*.md): SmolLM2 321 vs 325 us, llama-1B 3696 vs
# 3726.
DOWN_NARROW = kernels.EpilogueConfig(tile_m=64, tile_n=192, stages=4, schedule="pingpong")
DOWN_WIDE = kernels.EpilogueConfig(tile_m=64, tile_n=256, stages=3)
SMOLLM2_GLU_F16 = dataclasses.replace(PINGPONG_GLU_F16, down=DOWN_NARROW)
LLAMA_1B_GLU_F16 = dataclasses.replace(PINGPONG_GLU_F16_RELU_CHUNKED, down=DOWN_WIDE)
LLAMA_8B_GLU_F16 = dataclasses.replace(EPILOGUE_GLU_F16, down=DOWN_WIDE)
# gpt2-small with biases (GPT-2's layers have them): XLA's dot adds b_down in a pass of its own
# (cuBLAS 52 us + 9.5 us), our kernel in its epilogue. Forward, GPU-busy per FFN (profiler,
# 2026-12-03 twentieth session, backward-profile-2026-12-03-twentieth-bias.md): 132.2 us with
# GEMM2 on 128 x 128 x 4 ping-pong tiles vs 137.9 with XLA's (XLA exact 161.7); without biases
# XLA's dot stays faster (52.2 vs 54.5 us alone). gpt2-xl: XLA's either way (501.5 vs 503.8).
GPT2_SMALL_MLP_F16 = dataclasses.replace(
    PINGPONG_MLP_F16, biased_down=kernels.EpilogueConfig(128, 128, 4, schedule="pingpong"))

# (glu, D, H, D_out, decode, pwl) -> the fastest path measured on the H200, forward, same run as
# XLA (benchmarks/results/h200-2026-11-30.md and h200-2026-12-01*.md; times in ms, kernel vs XLA
# with the same activation kind: exact vs exact, PWL vs XLA exact).
TUNED: dict[tuple[bool, int, int, int, bool, bool], Plan] = {
    (True, 576, 1536, 576, False, True): SMOLLM2_GLU_F16,  # 0.0862 vs 0.1186 (12-03)
    (False, 768, 3072, 768, False, True): GPT2_SMALL_MLP_F16,  # 0.1407 vs 0.1635
    # exact activations on the PWL plans (an exact kind ignores pwl_dtype): floor bits and the
    # ping-pong dgrad kernel against pairs and the chunked backward, H200 2026-12-02 (sixteenth
    # session, benchmarks/results/h200-2026-12-02-sixteenth.md), fwd+bwd SmolLM2 0.320 vs
    # 0.362 ms (XLA 0.389), gpt2-small 0.509 vs 0.555 (XLA 0.501); forward SmolLM2 0.0778 (XLA
    # 0.1173), gpt2-small 0.1562 (XLA 0.1678; cooperative 0.1564 on 12-01)
    (True, 576, 1536, 576, False, False): SMOLLM2_GLU_F16,
    (False, 768, 3072, 768, False, False): GPT2_SMALL_MLP_F16,
    # ping-pong forward 0.5582 (cooperative 0.5515); its training step saving floor bits:
    # GPU-busy 1664.8 us vs 1683.6 for cooperative tiles saving pairs (2026-12-02)
    (False, 1600, 6400, 1600, False, True): GPT2_XL_MLP_F16,  # 0.5407 vs 0.6116 (12-03)
    (False, 1600, 6400, 1600, False, False): EPILOGUE_MLP,  # 0.5768 vs 0.5961
    # ping-pong forward 1.2693 vs 1.3350 (12-02, max hinges; relu: kernel alone 820 vs 826 us)
    (True, 2048, 8192, 2048, False, True): LLAMA_1B_GLU_F16,  # 1.2629 vs 1.3955 (12-03)
    (True, 2048, 8192, 2048, False, False): EPILOGUE_GLU,  # 1.2597 vs 1.3894
    # cooperative max hinges: 4.3693 ms where ping-pong relu tiles took 4.5126 (same run, 12-03)
    (True, 4096, 14336, 4096, False, True): LLAMA_8B_GLU_F16,  # 4.3492 vs 4.4834 (12-03)
    (True, 4096, 14336, 4096, False, False): EPILOGUE_GLU,  # 4.3291 vs 4.5064
    # decode (M = 16): the epilogue path looked faster in wall clock on 11-30 (0.0220 vs 0.0250
    # ms) but lost in both measures on 12-01: wall clock 0.042 vs 0.028, GPU time (profiler)
    # 14.9 vs 9.9 us; the decode kernel ties XLA on the GPU (10.0 us) and loses in wall clock,
    # with its sum in the kernel too (10.9 vs 9.9 us a FFN, 12-04)
    (True, 576, 1536, 576, True, True): XLA,  # 16 < M <= 64; TUNED_FEW_TOKENS below that
    (True, 576, 1536, 576, True, False): XLA,  # kernel 0.0380 vs 0.0250
    (True, 4096, 14336, 4096, True, True): XLA,  # kernel 0.1203 vs 0.1009
    (True, 4096, 14336, 4096, True, False): XLA,  # kernel 0.1207 vs 0.1009
}


# At M <= 16 the decode kernel with swapped operands (tokens on wgmma's N axis, no padding rows)
# in 2-CTA clusters (each CTA half of D and of D_out) + XLA's sum of its partials, where it
# measured faster: SmolLM2 PWL-16, GPU time 6.93 vs 9.88 us at M = 16 (wall 8.8 vs 10.0) and 7.10
# vs 10.38 at M = 8 (bench_decode_profile, 60 calls, 12-04, thirtieth session). At M = 32 / 48 it
# is 1.11x on the GPU's clock but lost in wall clock in that run (18.2 vs 12.8 us, 18.0 vs 14.1);
# at M = 64 it loses (11.84 vs 11.09), so XLA keeps 16 < M <= 64. (gpt2-small: 1.39x / 1.16x GPU
# time at M = 8 / 16 but slower in wall clock, 12.1 vs 10.0 / 11.4 vs 9.0 us: not selected.)
FEW_TOKENS = 16
SMOLLM2_DECODE = Plan("decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16",
                                                                 swap_ab=True, cluster_pairs=True))
# M = 1 stays with XLA (``xla_padded_row``): in a 30-layer SmolLM2 decode step at batch 1 the
# kernel cost 2.5 us of GPU time a layer more than XLA (generate-step-2026-12-04.md).
TUNED_FEW_TOKENS = {  # (glu, D, H, D_out, pwl) -> plan at 1 < M <= FEW_TOKENS
    (True, 576, 1536, 576, True): SMOLLM2_DECODE,
}


def default_plan(rows: int, d_model: int, glu: bool, pwl: bool) -> Plan:
  """The plan for shapes ``TUNED`` has not measured, extrapolated from the measured ones: the
  epilogue kernel for M > 64 (its forward won at every measured D, 576 to 4096); XLA at decode
  (every kernel lost or tied at the measured decode shapes, SmolLM2, gpt2-small, llama-8B)."""
  if rows <= DECODE_ROWS:
    return XLA
  if pwl:
    return EPILOGUE_GLU_F16 if glu else PINGPONG_MLP_F16
  return EPILOGUE_GLU if glu else EPILOGUE_MLP


def pingpong_tiles(config: kernels.EpilogueConfig, glu: bool) -> kernels.EpilogueConfig:
  """``config`` with the ping-pong schedule and its measured tiles (``PINGPONG_*_TILES``)."""
  return dataclasses.replace(config, schedule="pingpong",
                             **PINGPONG_GLU_TILES if glu else PINGPONG_MLP_TILES)


def with_residuals(plan: Plan, glu: bool, residuals: str) -> Plan:
  """``plan`` (epilogue path) saving ``residuals`` (a ``RESIDUALS`` kind); epilogue tiles that
  leave no SMEM for the staging of the saved parts (gpt2-small's cooperative MLP 128 x 128 x 3
  with the one-byte slot of "segments" / "floor-bits") become 64 x 256; a dgrad backward that
  cannot read ``residuals``, or whose tiles leave no SMEM for their buffers (a GLU's pairs in
  ``DGRAD_PINGPONG``'s 64 x 128 x 4), becomes the chunked one."""
  chunked = dataclasses.replace(plan, residuals=residuals, backward="xla")
  saved = [t for parts in kernels.saved_part_dtypes(chunked.saves, 1 + glu, jnp.bfloat16)
           for t in parts]
  dgrad_fits = dgrad_sm90.smem_bytes(plan.dgrad or (DGRAD_GLU if glu else DGRAD_MLP), saved,
                                     jnp.dtype(jnp.bfloat16).itemsize) <= kernels.SMEM_BYTES
  keeps_dgrad = plan.backward == "epilogue" and residuals in DGRAD_RESIDUALS and dgrad_fits
  plan = dataclasses.replace(chunked, backward=plan.backward) if keeps_dgrad else chunked
  if plan.epilogue.smem_bytes(1 + glu, jnp.bfloat16, tuple(saved)) > kernels.SMEM_BYTES:
    plan = dataclasses.replace(plan, epilogue=dataclasses.replace(plan.epilogue, tile_m=64,
                                                                  tile_n=256))
  return plan


def float16_residuals(glu: bool, kind: str) -> str:
  """What a bf16 plan's "floor-bits" becomes for float16 inputs: a GLU's PWL saves "segments"
  (the same 5 bytes per hidden element), anything else (hi, lo) pairs ("segments" holds PWL
  segment indices, and an MLP's pairs keep the dgrad kernel, which cannot read segments)."""
  return "segments" if glu and kind == "pwl" else "preactivations"


def choose_plan(rows: int, d_model: int, hidden: int, d_out: int, glu: bool, pwl: bool) -> Plan:
  if 1 < rows <= FEW_TOKENS and (plan := TUNED_FEW_TOKENS.get((glu, d_model, hidden, d_out, pwl))):
    return plan
  key = (glu, d_model, hidden, d_out, rows <= DECODE_ROWS, pwl)
  return TUNED.get(key, default_plan(rows, d_model, glu, pwl))


def with_pwl_lookup(plan: Plan, activation: Activation) -> Plan:
  """``plan`` with ``pwl_lookup`` where it applies: a PWL whose knots are evenly spaced by
  construction (``Activation.evenly_spaced``, traced or not) or found so (concrete knots,
  ``activation.evenly_spaced``) on the epilogue path without segment residuals; and
  ``dgrad_lookup`` where the backward is the dgrad kernel, and ``segment_lookup`` (a trained
  PWL's segment sums by the same lookup); elsewhere none of the lookups, whatever
  the plan asked for (they would evaluate another PWL). (A floor-bits plan then rounds the
  knots to 15 significant bits, up to 2^-16 |t| further off the grid: the lookup's PWL moves by
  at most |Δs_k| times that next to knot k; dyadic knots, e.g. ``fit(..., method="uniform")``'s
  over its default spans, stay.)"""
  if (plan.takes_lookup and activation.kind == "pwl"
      and (activation.evenly_spaced or evenly_spaced(activation.knots))):
    return dataclasses.replace(plan, pwl_lookup=True, dgrad_lookup=plan.backward == "epilogue",
                               segment_lookup=True)
  return dataclasses.replace(plan, pwl_lookup=False, dgrad_lookup=False, segment_lookup=False)


def unsupported_reason(x, activation: Activation) -> str | None:
  """Why this implementation cannot serve the call, or None."""
  if activation.kind == "callable":
    return "a callable activation runs on the XLA path only"
  if activation.knots is not None and activation.knots.shape[0] > hinge_table.MAX_KNOTS:
    return (f"the kernels copy a PWL's table in one TMA box: at most {hinge_table.MAX_KNOTS} "
            f"knots, got {activation.knots.shape[0]}")
  if jax.default_backend() != "gpu":
    return f"needs an NVIDIA GPU, the default backend is {jax.default_backend()}"
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability != "9.0":
    return f"needs a Hopper GPU (compute capability 9.0; wgmma/TMA kernels), got {capability}"
  if x.dtype not in SUPPORTED_DTYPES:
    return f"kernels take bfloat16/float16, got {x.dtype.name}"
  return None


def _kernel_table(activation: Activation, lookup: bool, counted: bool = False) -> tuple:
  """(table, kernel kind) a kernel reads: ``pwl_lookup``'s table and kind "pwl_lookup"; with
  ``counted`` (a forward saving, or a dgrad kernel reading, ``kernels.LOOKUP_SEGMENTS`` of other
  knots) the counted table and "pwl_counted"; or the hinge table (None for exact activations)
  and the activation's kind. A table in ``activation.tables`` is taken as it is."""
  kind = "pwl_lookup" if lookup else "pwl_counted" if counted else activation.kind
  if activation.tables and kind in activation.tables:
    return activation.tables[kind], kind
  if lookup:
    return pwl_lookup.lookup_table(activation), kind
  if counted:
    return pwl_lookup.counted_table(activation), kind
  return hinge_table.activation_table(activation), kind


def with_kernel_tables(activation: Activation) -> Activation:
  """``activation`` carrying the tables a forward kernel reads - the hinge table, and for knots
  evenly spaced by construction the lookup table - computed now. Code that traces many FFN calls
  in a loop (a decode loop's ``lax.scan``) and prepares the activation outside it computes them
  once per loop: XLA leaves them inside (a few us a table a step on the H200, see
  benchmarks/NOTES.md)."""
  if activation.kind != "pwl" or activation.knots.shape[0] > hinge_table.MAX_KNOTS:
    return activation
  tables = {"pwl": hinge_table.activation_table(activation)}
  if activation.evenly_spaced:
    tables["pwl_lookup"] = pwl_lookup.lookup_table(activation)
  return dataclasses.replace(activation, tables=tables)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _pad(array, shape):
  """Zero-pad ``array`` up to ``shape`` (no copy when it already has that shape)."""
  if array is None or tuple(array.shape) == tuple(shape):
    return array
  return jnp.pad(array, [(0, target - size) for size, target in zip(array.shape, shape)])


def _forward(plan: Plan, x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation: Activation,
             saves: str | None = None):
  """The kernel path of ``plan``. Pads D, H, D_out to multiples of 64 and M to a multiple of 8
  (zero rows/columns change nothing: padded hidden units meet zero rows of W_down). With
  ``saves`` (a ``Plan.residuals`` kind other than "recompute"; epilogue path) it returns
  ``(out, preactivations)``, each part [M, H] (``kernels.LOOKUP_SEGMENTS``: ((h, j),) or
  ((a, u, j),); ``kernels.LOOKUP_SEGMENT_INPUTS``: ((p, j),) or ((g, u, j),))."""
  rows, d_model = x.shape
  hidden, d_out = w_down.shape
  dp, hp, op, mp = (_round_up(d_model, 64), _round_up(hidden, 64), _round_up(d_out, 64),
                    _round_up(rows, 8))
  if w_gate is not None and (b_up is None) != (b_gate is None):  # kernels take both or neither
    b_up = jnp.zeros((hidden,), x.dtype) if b_up is None else b_up
    b_gate = jnp.zeros((hidden,), x.dtype) if b_gate is None else b_gate
  x_p = _pad(x, (mp, dp))
  w_up_p, w_gate_p = _pad(w_up, (dp, hp)), _pad(w_gate, (dp, hp))
  b_up_p, b_gate_p = _pad(b_up, (hp,)), _pad(b_gate, (hp,))
  # pwl_lookup: epilogue path only; other knots count when the backward reads their segments
  table, kind = _kernel_table(activation, plan.pwl_lookup,
                              counted=saves in kernels.SEGMENT_SAVES)
  num_knots = 0 if activation.knots is None else activation.knots.shape[0]
  kernel_args = dict(kind=kind, num_knots=num_knots)
  def sum_partials(partials):  # [splits, ≥ M, ≥ D_out] f32 -> y [M, D_out] with b_down
    out = jnp.sum(partials[:, :rows, :d_out], axis=0)
    return (out if b_down is None else out + b_down.astype(jnp.float32)).astype(x.dtype)

  if plan.path == "decode" and plan.decode.sum_in_kernel:
    return decode_sm90.decode_ffn(x_p, w_up_p, w_gate_p, b_up_p, b_gate_p, table,
                                  _pad(w_down, (hp, op)), _pad(b_down, (op,)),
                                  config=plan.decode, **kernel_args)[:rows, :d_out]
  if plan.path == "decode":
    return sum_partials(decode_sm90.decode_ffn(x_p, w_up_p, w_gate_p, b_up_p, b_gate_p, table,
                                               _pad(w_down, (hp, op)), config=plan.decode,
                                               **kernel_args))
  if plan.path == "fused":
    out = kernels.fused_ffn(x_p, w_up_p, w_gate_p, b_up_p, b_gate_p, table,
                            _pad(w_down, (hp, op)), _pad(b_down, (op,)), config=plan.fused,
                            **kernel_args)
    if plan.fused.h_splits > 1:
      return sum_partials(out)
    return out[:rows, :d_out].astype(x.dtype)
  hidden_act = kernels.gemm1_activation(x_p, w_up_p, w_gate_p, b_up_p, b_gate_p, table,
                                        config=plan.epilogue, saves=saves, **kernel_args)
  if saves:
    hidden_act, preactivations = hidden_act
  down = plan.biased_down if b_down is not None and plan.biased_down else plan.down
  out = down_projection(hidden_act, w_down, b_down, rows, down)
  if saves == kernels.LOOKUP_SEGMENTS and w_gate is None:  # an MLP's h is the other residual
    preactivations = ((hidden_act, *preactivations[0]),)
  if saves:
    return out, tuple(tuple(part[:rows, :hidden] for part in parts) for parts in preactivations)
  return out


def down_projection(hidden_act, w_down, b_down, rows: int,
                    config: kernels.EpilogueConfig | None):
  """y = h W_down + b_down [rows, D_out] in h's dtype (f32 accumulation) from the padded h
  [M', H'] (H' = W_down's rows padded to 64): XLA's dot, or with ``config`` the epilogue kernel
  with the identity activation (D_out padded to 64 there)."""
  d_out = w_down.shape[1]
  padded_hidden = hidden_act.shape[1]
  if config is None:
    out = jnp.dot(hidden_act[:rows], _pad(w_down, (padded_hidden, d_out)),
                  preferred_element_type=jnp.float32)
    out = out if b_down is None else out + b_down.astype(jnp.float32)
    return out.astype(hidden_act.dtype)
  padded_out = _round_up(d_out, 64)
  out = kernels.gemm1_activation(hidden_act, _pad(w_down, (padded_hidden, padded_out)), None,
                                 _pad(b_down, (padded_out,)), None, None, kind="identity",
                                 num_knots=0, config=config)
  return out[:rows, :d_out]


def _forward_table_kind(plan: Plan, kind: str) -> str:
  """The kind of table the plan's forward kernel reads (``_kernel_table``, without counting)."""
  return "pwl_lookup" if plan.pwl_lookup else kind


def _prepared(plan: Plan, kind: str, knots, slopes, intercepts, table) -> Activation:
  """The activation ``_forward`` evaluates, with ``table`` (None: built there) as the table of
  the plan's forward kernel."""
  tables = None if table is None else {_forward_table_kind(plan, kind): table}
  return Activation(kind, knots, slopes, intercepts, tables=tables)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ffn(plan, kind, precision, x, w_up, w_down, w_gate, b_up, b_gate, b_down, knots, slopes,
         intercepts, table):
  activation = _prepared(plan, kind, knots, slopes, intercepts, table)
  return _forward(plan, x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation)


def training_choice(plan: Plan, kind: str, num_knots: int, glu: bool, dtype,
                    pwl_trained: bool) -> tuple[str, str | None]:
  """(backward, saves) of a training step: backward "epilogue" (the dgrad kernel) or "xla"
  (chunked), saves what the forward kernel writes - the plan's, except that a dgrad backward
  with ``lookup_residuals`` reads ``kernels.LOOKUP_SEGMENTS`` (a PWL's: looked up, or of at most
  ``pwl_lookup.MAX_COUNTED_KNOTS`` other knots counted), and that a PWL whose slopes or
  intercepts are differentiated (``pwl_trained``) needs its segment sums: from the dgrad kernel
  reading ``kernels.LOOKUP_SEGMENT_INPUTS`` where ``Plan.dgrad_sums_fit``, else from the
  chunked backward."""
  segments_fit = (kind == "pwl" and plan.backward == "epilogue" and plan.lookup_residuals and
                  (plan.dgrad_lookup or num_knots <= pwl_lookup.MAX_COUNTED_KNOTS))
  if pwl_trained:
    if segments_fit and plan.dgrad_sums_fit(glu, dtype, num_knots):
      return "epilogue", kernels.LOOKUP_SEGMENT_INPUTS
    return "xla", plan.saves
  return plan.backward, kernels.LOOKUP_SEGMENTS if segments_fit else plan.saves


def _ffn_fwd(plan, kind, precision, *primals):
  """Residuals (inputs, saved parts or None, {(backward, saves): ()}): ``training_choice``'s,
  with the PWL trained where its slopes or intercepts are differentiated (``perturbed``, from
  ``symbolic_zeros``). The choice travels as a dict key: tree structure, not a JAX value."""
  args = tuple(None if primal is None else primal.value for primal in primals)  # None: absent
  backward_kind, saves = training_choice(
      plan, kind, args[-4].shape[0] if kind == "pwl" else 0, args[3] is not None, args[0].dtype,
      kind == "pwl" and (primals[-3].perturbed or primals[-2].perturbed))
  marker = {(backward_kind, saves): ()}
  if saves is None:
    return _ffn(plan, kind, precision, *args), (args, None, marker)
  *arrays, knots, slopes, intercepts, table = args
  if saves == "segments" and kind != "pwl":
    raise ValueError(f"residuals='segments' saves PWL segment indices, the activation is {kind!r}")
  out, preactivations = _forward(plan, *arrays,
                                 _prepared(plan, kind, knots, slopes, intercepts, table),
                                 saves=saves)
  return out, (args, preactivations, marker)


def _dgrad_backward(plan, activation, x, w_up, w_down, w_gate, b_up, b_gate, b_down, dy,
                    preactivations, saves, precision):
  """The cotangents of ``backward.ffn_backward`` with its first GEMM and elementwise work in
  ``dgrad_sm90.dgrad_activation``; XLA runs the weight and input GEMMs on h, d_u (, d_g).
  ``saves``: what the forward kernel wrote (with an MLP's ``kernels.LOOKUP_SEGMENTS`` h is the
  forward's output); the PWL-parameter gradients come from the kernel's bins where it wrote
  ``kernels.LOOKUP_SEGMENT_INPUTS``, else they are None. With ``Plan.joint_glu_gradients`` the
  kernel writes a GLU's [d_g | d_u] as one array and XLA's dx is one GEMM on it
  (``backward.joint_column_gradients``, [W_gate | W_up] concatenated here)."""
  f32 = jnp.float32
  rows, (d_model, hidden) = x.shape[0], w_up.shape
  # TMA's swizzled [M, H] boxes need M a multiple of 8 (the H200 refused 513 rows)
  mp, hp, op = _round_up(rows, 8), _round_up(hidden, 64), _round_up(w_down.shape[1], 64)
  glu = w_gate is not None
  joint = glu and plan.joint_glu_gradients
  forward_hidden, segments = None, saves in kernels.SEGMENT_SAVES
  pwl_gradients = saves == kernels.LOOKUP_SEGMENT_INPUTS
  if saves == kernels.LOOKUP_SEGMENTS and not glu:  # ((h, j),): the kernel reads j
    (forward_hidden, *parts), = preactivations
    preactivations = (tuple(parts),)
  saved = tuple(tuple(_pad(part, (mp, hp)) for part in parts) for parts in preactivations)
  table, kind = _kernel_table(activation, plan.dgrad_lookup, counted=segments)
  config = ((pwl_gradients and plan.pwl_gradients_dgrad) or (segments and plan.segments_dgrad)
            or plan.dgrad or (DGRAD_GLU if glu else DGRAD_MLP))
  h, d_u, d_g, pwl_sums = dgrad_sm90.dgrad_activation(
      _pad(dy, (mp, op)), _pad(w_down, (hp, op)), saved, table, kind=kind,
      num_knots=0 if activation.knots is None else activation.knots.shape[0], config=config,
      segments=segments, joint=joint, pwl_gradients=pwl_gradients)
  h = forward_hidden if h is None else h[:rows, :hidden]
  if joint:  # d_u is [d_g | d_u], [M', 2 H'] (zero in padded columns)
    w_gate_up = jnp.concatenate([_pad(w, (d_model, hp)) for w in (w_gate, w_up)], axis=1)
    dx, d_w_up, d_w_down, d_w_gate, d_b_up, d_b_gate = backward.joint_column_gradients(
        x, dy, w_gate_up, w_down.dtype, h, d_u[:rows], precision, dx_dtype=x.dtype)
    d_w_up, d_w_gate, d_b_up, d_b_gate = (grad[..., :hidden] for grad in (
        d_w_up, d_w_gate, d_b_up, d_b_gate))
  else:
    d_u, d_g = (None if out is None else out[:rows, :hidden] for out in (d_u, d_g))
    dx, d_w_up, d_w_down, d_w_gate, d_b_up, d_b_gate = backward.column_gradients(
        x, dy, w_up, w_gate, w_down.dtype, h, d_u, d_g, precision, dx_dtype=x.dtype)
  cast = lambda grad, like: None if like is None else grad.astype(like.dtype)
  d_b_down = None if b_down is None else jnp.sum(dy.astype(f32), 0).astype(b_down.dtype)
  return (dx, d_w_up, d_w_down, d_w_gate, cast(d_b_up, b_up),
          cast(d_b_gate, b_gate), d_b_down, *(pwl_sums or (None, None)))


def _ffn_bwd(plan, kind, precision, residuals, dy):
  (x, w_up, w_down, w_gate, b_up, b_gate, b_down, knots, slopes, intercepts, _), saved, marker = (
      residuals)
  ((backward_kind, saves),) = marker
  activation = Activation(kind, knots, slopes, intercepts, evenly_spaced=plan.pwl_lookup)
  if isinstance(dy, SymbolicZero):  # the output's cotangent is zero: so is every gradient
    dy = jnp.zeros(dy.shape, dy.dtype)
  if backward_kind == "epilogue":
    grads = _dgrad_backward(plan, activation, x, w_up, w_down, w_gate, b_up, b_gate, b_down,
                            dy.astype(x.dtype), saved, saves, precision)
  else:
    chunk = backward.chunk_columns(x.shape[0], w_up.shape[1], plan.backward_chunk_elements)
    grads = backward.ffn_backward(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation,
                                  dy.astype(x.dtype), chunk=chunk, precision=precision,
                                  preactivations=saved,
                                  segment_sums=(segment_sums_sm90.segment_sums_lookup
                                                if plan.segment_lookup
                                                else SEGMENT_SUMS[plan.segment_sums]),
                                  d_hidden_dtype=None if plan.d_hidden == "float32" else x.dtype)
  *array_grads, d_slopes, d_intercepts = grads
  d_knots = None if knots is None else jnp.zeros_like(knots)
  return (*array_grads, d_knots, d_slopes, d_intercepts, None)  # the table follows the knots


_ffn.defvjp(_ffn_fwd, _ffn_bwd, symbolic_zeros=True)


def resolve_plan(x, w_up, w_down, w_gate, activation: Activation, plan: Plan | None) -> Plan:
  """The plan ``ffn_mosaic_gpu`` runs: ``plan``, or the tuned choice (``choose_plan``; float16
  inputs on a floor-bits plan save ``float16_residuals``), with ``with_pwl_lookup`` applied.
  NotImplementedError where the tuned table says XLA, or a given plan needs bf16 inputs."""
  glu, given = w_gate is not None, plan is not None
  plan = plan or choose_plan(x.shape[0], x.shape[1], w_up.shape[1], w_down.shape[1], glu,
                             activation.kind == "pwl")
  if plan.path == "xla":
    raise NotImplementedError("the tuned table records XLA as fastest at this shape")
  if plan.residuals == "floor-bits" and x.dtype != jnp.bfloat16:
    if given:
      raise NotImplementedError(f"residuals='floor-bits' needs bfloat16 inputs, got {x.dtype}")
    plan = with_residuals(plan, glu, float16_residuals(glu, activation.kind))
  return with_pwl_lookup(plan, activation)


def ffn_mosaic_gpu(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation: Activation,
                   precision=None, plan: Plan | None = None) -> jax.Array:
  """FFN on [M, D] with the Hopper kernels (signature of ``flashffn_jax.ops.reference_ffn``).

  Raises NotImplementedError (at trace time) where it cannot serve the call or where XLA is
  faster. ``plan`` overrides the tuned choice (benchmarks and tests).
  """
  reason = unsupported_reason(x, activation)
  if reason:
    raise NotImplementedError(reason)
  plan = resolve_plan(x, w_up, w_down, w_gate, activation, plan)
  knots = activation.knots
  table = (activation.tables or {}).get(_forward_table_kind(plan, activation.kind))
  if plan.residuals == "floor-bits" and knots is not None:
    knots = backward.snap_knots(knots)  # forward and backward see the 15-bit knots it keeps
    table = None  # built from the snapped knots
  return _ffn(plan, activation.kind, precision, x, w_up, w_down, w_gate, b_up, b_gate, b_down,
              knots, activation.slopes, activation.intercepts, table)
