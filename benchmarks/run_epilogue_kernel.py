"""Run one ``gemm1_activation`` plan a few times at a benchmark shape: a target for ``ncu``.

    PYTHONPATH=$PWD ncu --clock-control none -k regex:mosaic --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 benchmarks/run_epilogue_kernel.py --shape smollm2 --schedule pingpong

The forward kernel only (no XLA GEMM2), PWL-16 with f16 hinges, ``--saves`` residuals optional;
tiles from ``dispatch`` (the tuned cooperative ones, or ``PINGPONG_*_TILES``).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.gpu import dispatch, fused_ffn_sm90 as kernels

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import SHAPES, as_args, make_sets  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="smollm2")
  parser.add_argument("--schedule", default="cooperative", choices=kernels.SCHEDULES)
  parser.add_argument("--saves", default=None, choices=[None, "preactivations", "segments"])
  parser.add_argument("--calls", type=int, default=4)
  args = parser.parse_args(argv)
  shape = {s.name: s for s in SHAPES}[args.shape]
  x, w_up, _, w_gate = as_args(make_sets(shape, np.random.default_rng(0))[0])
  activation = to_kernel_activation(ff.fit(shape.activation, 16))
  plan = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model, shape.glu,
                              True)
  config = plan.epilogue
  if args.schedule == "pingpong":
    config = dispatch.pingpong_tiles(config, shape.glu)
  table = kernels.activation_table(activation)
  run = jax.jit(lambda x, wu, wg: kernels.gemm1_activation(
      x, wu, wg, None, None, table, kind="pwl", num_knots=activation.knots.shape[0],
      config=config, saves=args.saves))
  for _ in range(args.calls):
    jax.block_until_ready(run(x, w_up, w_gate))
  print(f"{args.shape} {config} saves={args.saves}: ran {args.calls} calls", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
