"""Run one ``gemm1_activation`` plan a few times at a benchmark shape: a target for ``ncu``, or
with ``--profile`` its GPU time per call from the profiler.

    PYTHONPATH=$PWD ncu --clock-control none -k regex:mosaic --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 benchmarks/run_epilogue_kernel.py --shape smollm2 --schedule pingpong
    PYTHONPATH=$PWD python3 benchmarks/run_epilogue_kernel.py --shape gpt2-small \
        --schedule pingpong --saves segments --segment-count float16 --profile

The forward kernel only (no XLA GEMM2), PWL-16 (``--segments``, ``--fit``) with f16 hinges,
``--saves`` residuals optional; tiles from ``dispatch``: the shape's tuned plan's (``--schedule
plan``, the default), the cooperative ``EPILOGUE_GLU`` / ``EPILOGUE_MLP`` tiles, or
``PINGPONG_*_TILES``.

``--segment-count`` is an experiment on what the saved int8 segment index costs the epilogue
(seg(p) = #{k : p >= t_k}; summed in f32 it was half the epilogue's instructions at SmolLM2
under ncu): "float32" is the library's ``backward.segment_index`` (1.0 / 0.0 summed in f32);
"float16" counts on f16(p) against f16 knots (it differs from seg(p) within half an f16 ulp of
a knot); "int32" and "int32-masks" the same count as the library, summed as int32 0 / 1 or
-1 / 0. All three were slower on the H200 (SmolLM2 87, 96, 96 vs 77 us; benchmarks/results/
segment-count-2026-12-02.md); "low-bits" stores the int8 low part of a (bf16 hi, int8 lo)
encoding of p instead (no count, ``low_bits_int8``: cheap, but p within 2^-15 moves PWL inputs
across knots, which cost the PWL-parameter gradients ~1% in an earlier session; the library's
``--saves floor-bits`` rounds down on p's own grid instead, exact for knots of 15 significant
bits); "none" stores
one compare per element (p != p), the floor without any count. "float16", "low-bits" and
"none" save something other than the segment: timing only.

``--hinges`` sets the PWL hinges' form (``EpilogueConfig.hinges``: max(h, t_k) or relu(h - t_k);
default: the plan's). ``--tiles`` ("64x256x3:cooperative", ``bench_down_projection.parse_config``)
replaces the tiles and schedule. ``--activation`` swaps the epilogue's PWL for one of
``bench_dgrad_kernel.ACTIVATIONS`` ("chain": slope and intercept selected, one fma), for
"lookup" (``pwl_lookup``'s table lookup; with ``--fit uniform``), for "exact": the shape's exact
activation (SiLU / GELU) in the same kernel with the same saves, the PWL's reference point, or
for "identity" (the GLU product or the bare GEMM: what the kernel's mainloop and stores take
without any activation). With ``--profile`` the line also gives the largest difference of h from
an f32 XLA reference of the activation it computes (the PWL, the exact one, or none), relative
to max |h|. (The hinges in inline PTX on f16 pairs timed the same as jnp's, 2026-12-02: jnp
already emits the packed max and fma.) H200 numbers: benchmarks/results/epilogue-cost-*.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.activation import exact_activation
from pallas_kernels.gpu import (backward, dispatch, fused_ffn_sm90 as kernels, hinge_table,
                                pwl_lookup)

sys.path.insert(0, os.path.dirname(__file__))
from bench_dgrad_kernel import ACTIVATIONS  # noqa: E402
from bench_down_projection import parse_config  # noqa: E402
from bench_gpu import SHAPES, as_args, make_sets  # noqa: E402
from gpu_profile import profile  # noqa: E402


def segment_index_float16(p, knots, num_knots: int):
  """#{k : f16(p) >= f16(t_k)} counted in f16 (exact up to 2048 knots)."""
  x, count = p.astype(jnp.float16), jnp.zeros(p.shape, jnp.float16)
  for k in range(num_knots):
    count = count + jnp.where(x >= knots[k].astype(jnp.float16), 1.0, 0.0).astype(jnp.float16)
  return count.astype(jnp.float32).astype(jnp.int8)


def segment_index_int32(p, knots, num_knots: int):
  """#{k : p >= t_k} with the compares converted to int32 0 / 1 and summed."""
  count = jnp.zeros(p.shape, jnp.int32)
  for k in range(num_knots):
    count = count + (p >= knots[k]).astype(jnp.int32)
  return count.astype(jnp.int8)


def segment_index_int32_masks(p, knots, num_knots: int):
  """#{k : p >= t_k} with the compares as int32 masks (-1 / 0) summed, negated at the end."""
  count = jnp.zeros(p.shape, jnp.int32)
  for k in range(num_knots):
    count = count + jnp.where(p >= knots[k], -1, 0)
  return (-count).astype(jnp.int8)


def low_bits_int8(p, knots, num_knots: int):
  """Not a segment: the int8 that would replace it in a (bf16 hi, int8 lo) residual,
  lo = round((p - hi) / ulp(hi) * 256) clipped to +-127, p ~ hi + lo ulp(hi) / 256 (hi's exponent
  floored at 2^-100 so the scale stays finite): the forward's cost of such an encoding."""
  del knots, num_knots
  hi = p.astype(jnp.bfloat16).astype(jnp.float32)
  exponent = jnp.maximum(jax.lax.bitcast_convert_type(hi, jnp.int32) & 0x7F800000, 27 << 23)
  scale = jax.lax.bitcast_convert_type((127 << 23) - (exponent - (142 << 23)),  # 2^(15 - E)
                                       jnp.float32)
  return jnp.clip(jnp.round((p - hi) * scale), -127.0, 127.0).astype(jnp.int8)


SEGMENT_COUNTS = {"float32": backward.segment_index,
                  "float16": segment_index_float16,
                  "int32": segment_index_int32,
                  "int32-masks": segment_index_int32_masks,
                  "low-bits": low_bits_int8,
                  "none": lambda p, knots, num_knots: (p != p).astype(jnp.int8)}


def reference_hidden(x, w_up, w_gate, act):
  """act(x W_gate) * (x W_up) (GLU, ``w_gate`` not None) or act(x W_up), all in float32."""
  up = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
  if w_gate is None:
    return act(up)
  return act(jnp.dot(x, w_gate, preferred_element_type=jnp.float32)) * up


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="smollm2")
  parser.add_argument("--schedule", default="plan", choices=("plan", *kernels.SCHEDULES),
                      help="the tuned plan's tiles (default) or one schedule's tiles")
  parser.add_argument("--saves", choices=dispatch.RESIDUALS[1:],
                      help="residuals the kernel also stores (default: none)")
  parser.add_argument("--segment-count", default="float32", choices=tuple(SEGMENT_COUNTS))
  parser.add_argument("--tiles", help='e.g. "64x256x3:cooperative" (default: --schedule\'s)')
  parser.add_argument("--activation", default="hinges",
                      choices=(*ACTIVATIONS, "lookup", "exact", "identity"),
                      help="the PWL as the plan's hinges (default), a chain, a table lookup "
                           "(needs --fit uniform), exact, or none")
  parser.add_argument("--hinges", choices=kernels.HINGES, help="default: the plan's")
  parser.add_argument("--segments", type=int, default=16, help="segments of the PWL fit")
  parser.add_argument("--fit", default="optimal", choices=("optimal", "uniform"),
                      help="knot placement of the PWL fit")
  parser.add_argument("--calls", type=int, default=4)
  parser.add_argument("--profile", action="store_true",
                      help="print the kernel's GPU time per call (jax.profiler) instead")
  args = parser.parse_args(argv)
  shape = {s.name: s for s in SHAPES}[args.shape]
  x, w_up, _, w_gate = as_args(make_sets(shape, np.random.default_rng(0))[0])
  activation = to_kernel_activation(ff.fit(shape.activation, args.segments, args.fit))
  if args.activation == "lookup" and args.saves == "segments":
    parser.error("--activation lookup: its table has no knots to count for --saves segments")
  plan = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model, shape.glu,
                              True)
  config = plan.epilogue
  if args.schedule == "pingpong":
    config = dispatch.pingpong_tiles(config, shape.glu)
  elif args.schedule == "cooperative":
    tiles = (dispatch.EPILOGUE_GLU if shape.glu else dispatch.EPILOGUE_MLP).epilogue
    config = dataclasses.replace(config, schedule="cooperative", tile_m=tiles.tile_m,
                                 tile_n=tiles.tile_n, stages=tiles.stages)
  if args.tiles:
    tiles = parse_config(args.tiles)
    config = dataclasses.replace(config, schedule=tiles.schedule, tile_m=tiles.tile_m,
                                 tile_n=tiles.tile_n, stages=tiles.stages)
  if args.hinges:
    config = dataclasses.replace(config, hinges=args.hinges)
  lookup = args.activation == "lookup"
  table = (pwl_lookup.lookup_table(activation) if lookup else
           hinge_table.activation_table(activation))
  reference_activation = {"exact": lambda h: exact_activation(shape.activation, h),
                          "identity": lambda h: h}.get(args.activation, activation)
  # the library's apply_activation evaluates kind "pwl_lookup" itself
  epilogue_activation = ACTIVATIONS.get("hinges" if lookup else args.activation,
                                        lambda kind, h, *_: reference_activation(h))
  kernel = jax.jit(lambda x, wu, wg: kernels.gemm1_activation(
      x, wu, wg, None, None, table, kind="pwl_lookup" if lookup else "pwl",
      num_knots=activation.knots.shape[0], config=config, saves=args.saves))
  # the epilogue looks segment_index and apply_activation up when traced
  with (mock.patch.object(backward, "segment_index", SEGMENT_COUNTS[args.segment_count]),
        mock.patch.object(kernels, "apply_activation", epilogue_activation)):
    run = kernel.lower(x, w_up, w_gate).compile()
  label = (f"{args.shape} {config} saves={args.saves} segment count {args.segment_count} "
           f"PWL-{args.segments} {args.fit} activation {args.activation}")
  if args.profile:
    record = profile(run, (x, w_up, w_gate), args.calls, 1)
    h, want = (jax.tree.leaves(run(x, w_up, w_gate))[0].astype(jnp.float32),
               reference_hidden(x, w_up, w_gate, reference_activation))
    print(f"{label}: {record['device_us']:.1f} us GPU time per call, max |h - f32 reference| = "
          f"{float(jnp.max(jnp.abs(h - want)) / jnp.max(jnp.abs(want))):.2e} of max |h|",
          flush=True)
    return 0
  for call in range(args.calls):  # queued back to back (a load for gpu_clocks.py), 64 at a time
    out = run(x, w_up, w_gate)
    if call % 64 == 63:
      jax.block_until_ready(out)
  jax.block_until_ready(out)
  print(f"{label}: ran {args.calls} calls", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
