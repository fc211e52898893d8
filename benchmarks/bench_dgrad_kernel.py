"""GPU time of ``dgrad_sm90.dgrad_activation`` alone, per tile config, at benchmark shapes.

    PYTHONPATH=$PWD python3 benchmarks/bench_dgrad_kernel.py --shapes gpt2-small,smollm2 \
        --configs 128x128x4:pingpong:float16:pwl,64x128x3:cooperative:float32:pwl --out $OUT

Each config is ``TILE_MxTILE_NxSTAGES:SCHEDULE:PWL_DTYPE:ACTIVATION`` (ACTIVATION "pwl": a
16-segment fit, saved as floor bits; an exact name: saved as (hi, lo) pairs). The kernel's
floors at M = 8192: its GEMM dy W_down^T (gpt2-small 38.7 GFLOP, ~55 us at XLA's measured matmul
rate) and its bytes (MLP floor bits: 3 read + 4 written per [M, H] element, 176 MB, ~50 us).
Prints one line per (shape, config) and writes ``dgrad-kernel-<date><tag>.json``.

The epilogue's PWL value and derivative are the library's (``dgrad_sm90._pwl_value_and_slope``:
with f16 PWL math one select chain in PTX on f16 pairs, ``packed_pwl``) unless ``--epilogue
separate`` computes them in jnp, one pass each: the value by ``--activation`` ("hinges", the
library's before 2026-12-02 and still the forward's, or "chain": slope and intercept selected,
then one fma), the derivative by ``--derivative`` ("chain": slope = where(p >= t_k, s_{k+1},
slope) for ascending knots; "where": s_0 + sum_k where(p >= t_k, ds_k, 0); "mul": sum_k ds_k
f(p >= t_k)). Then each line also gives the largest difference of the outputs from the
library's kernel, relative to the output's largest magnitude (bf16 outputs: up to ~2^-7 where
the two round a value near the maximum differently).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.activation import Activation
from pallas_kernels.gpu import backward, dgrad_sm90, fused_ffn_sm90 as kernels
from pallas_kernels.gpu.fused_ffn_sm90 import apply_activation
from pallas_kernels.gpu.hinge_table import HingeTable, activation_table

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import SHAPES  # noqa: E402
from gpu_profile import profile  # noqa: E402
from report_files import write_json_and_markdown  # noqa: E402


def derivative_where(p, table_ref, num_knots: int, pwl_dtype: str):
  """s_0 + sum_k where(p >= t_k, ds_k, 0): a compare, a select and an add per knot."""
  dtype = jnp.dtype(pwl_dtype)
  x, entry, at = p.astype(dtype), lambda i: table_ref[i].astype(dtype), HingeTable(num_knots)
  slope = entry(at.first_slope) + jnp.zeros_like(x)
  for k in range(num_knots):
    slope = slope + jnp.where(x >= entry(at.knot(k)), entry(at.step(k)), jnp.zeros_like(x))
  return slope.astype(jnp.float32)


def derivative_mul(p, table_ref, num_knots: int, pwl_dtype: str):
  """s_0 + sum_k ds_k f(p >= t_k): the compare converted to 1.0 / 0.0 and multiplied."""
  dtype = jnp.dtype(pwl_dtype)
  x, entry, at = p.astype(dtype), lambda i: table_ref[i].astype(dtype), HingeTable(num_knots)
  slope = entry(at.first_slope) + jnp.zeros_like(x)
  for k in range(num_knots):
    slope = slope + (x >= entry(at.knot(k))).astype(dtype) * entry(at.step(k))
  return slope.astype(jnp.float32)


def activation_chain(kind: str, h, table_ref, num_knots: int, pwl_dtype: str = "float32"):
  """A PWL as slope(p) p + intercept(p), both picked by ``_pwl_derivative``'s select chain
  (intercept_j = c_0 - sum_{k < j} ds_k t_k) instead of the hinges; exact kinds unchanged."""
  if kind != "pwl":
    return apply_activation(kind, h, table_ref, num_knots, pwl_dtype)
  dtype = jnp.dtype(pwl_dtype)
  x, entry, at = h.astype(dtype), lambda i: table_ref[i].astype(jnp.float32), HingeTable(num_knots)
  segment_slope, segment_intercept = entry(at.first_slope), entry(at.first_intercept)
  slope = segment_slope.astype(dtype) + jnp.zeros_like(x)
  intercept = segment_intercept.astype(dtype) + jnp.zeros_like(x)
  for k in range(num_knots):
    segment_slope = segment_slope + entry(at.step(k))
    segment_intercept = segment_intercept - entry(at.step(k)) * entry(at.knot(k))
    above = x >= entry(at.knot(k)).astype(dtype)
    slope = jnp.where(above, segment_slope.astype(dtype), slope)
    intercept = jnp.where(above, segment_intercept.astype(dtype), intercept)
  return (slope * x + intercept).astype(jnp.float32)


def value_and_slope_separately(p, table_ref, num_knots: int, pwl_dtype: str):
  """The PWL's value (``dgrad_sm90.apply_activation``) and slope (``_pwl_derivative``) in jnp,
  each its own pass (the library's form before the packed chain); looked up when traced, so
  ``--activation`` and ``--derivative`` swap them."""
  return (dgrad_sm90.apply_activation("pwl", p, table_ref, num_knots, pwl_dtype),
          dgrad_sm90._pwl_derivative(p, table_ref, num_knots, pwl_dtype))


DERIVATIVES = {"chain": dgrad_sm90._pwl_derivative, "where": derivative_where,
               "mul": derivative_mul}
ACTIVATIONS = {"hinges": apply_activation, "chain": activation_chain}
EPILOGUES = {"library": dgrad_sm90._pwl_value_and_slope, "separate": value_and_slope_separately}


def parse_config(text: str) -> tuple[kernels.EpilogueConfig, str]:
  tiles, schedule, pwl_dtype, activation = text.split(":")
  tile_m, tile_n, stages = (int(v) for v in tiles.split("x"))
  return kernels.EpilogueConfig(tile_m, tile_n, stages, pwl_dtype=pwl_dtype,
                                schedule=schedule), activation


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--shapes", default="gpt2-small,smollm2")
  parser.add_argument("--configs", default="128x128x4:pingpong:float16:pwl")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--tag", default="")
  parser.add_argument("--epilogue", default="library", choices=tuple(EPILOGUES))
  parser.add_argument("--derivative", default="chain", choices=tuple(DERIVATIVES))
  parser.add_argument("--activation", default="hinges", choices=tuple(ACTIVATIONS))
  args = parser.parse_args(argv)
  experiment = args.epilogue != "library"
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng(0)
  shapes = {shape.name: shape for shape in SHAPES}
  results = []
  for name in args.shapes.split(","):
    shape = shapes[name]
    rows, hidden, d_out = shape.rows, shape.hidden, shape.d_model
    dy = jnp.asarray(rng.normal(size=(rows, d_out)), jnp.bfloat16)
    w_down = jnp.asarray(rng.normal(size=(hidden, d_out)) / np.sqrt(d_out), jnp.bfloat16)
    pres = [jnp.asarray(rng.normal(size=(rows, hidden)), jnp.float32) for _ in range(1 + shape.glu)]
    for text in args.configs.split(","):
      config, act_name = parse_config(text)
      pwl = act_name == "pwl"
      activation = (to_kernel_activation(ff.fit(shape.activation, 16)) if pwl
                    else Activation(act_name))
      knots = None if activation.knots is None else backward.snap_knots(activation.knots)
      activation = Activation(activation.kind, knots, activation.slopes, activation.intercepts)
      saved = backward.save_preactivations(pres, jnp.bfloat16,
                                           "floor-bits" if pwl else "preactivations")
      table = activation_table(activation)
      inputs = (dy, w_down, saved, table)
      num_knots = 0 if knots is None else knots.shape[0]
      # a new function per jit: each traces with the patches in force at its first call
      make_step = lambda: jax.jit(lambda dy, w, saved, table: dgrad_sm90.dgrad_activation(
          dy, w, saved, table, kind=activation.kind, num_knots=num_knots, config=config))
      try:
        with (mock.patch.object(dgrad_sm90, "_pwl_derivative", DERIVATIVES[args.derivative]),
              mock.patch.object(dgrad_sm90, "apply_activation", ACTIVATIONS[args.activation]),
              mock.patch.object(dgrad_sm90, "_pwl_value_and_slope", EPILOGUES[args.epilogue])):
          step = make_step()
          record = profile(step, inputs, args.calls, 1)
          outputs = step(*inputs)
        if experiment:  # its outputs vs the library's kernel (compiled again, unpatched)
          record["max_rel_diff_vs_library"] = max(
              float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
                            / jnp.max(jnp.abs(want.astype(jnp.float32)))))
              for got, want in zip(outputs, make_step()(*inputs)) if want is not None)
      except Exception as error:  # noqa: BLE001 -- a config that fails is a result
        record = {"error": f"{type(error).__name__}: {error}"[:300]}
      record.update(shape=name, config=text, epilogue=args.epilogue,
                    derivative=args.derivative, activation=args.activation)
      results.append(record)
      print(f"{name:12s} {text:40s} {record.get('device_us', float('nan')):9.1f} us "
            f"{record.get('max_rel_diff_vs_library', float('nan')):9.2e} "
            f"{record.get('error', '')}", flush=True)
  command = "python3 benchmarks/bench_dgrad_kernel.py " + " ".join(argv or sys.argv[1:])
  lines = [f"# dgrad kernel configs ({jax.devices()[0].device_kind})", "", f"`{command}`", "",
           "| shape | config | GPU us | max rel. diff vs library | error |", "|---|---|---:|---:|---|"]
  lines += [f"| {r['shape']} | {r['config']} | {r.get('device_us', float('nan')):.1f} | "
            f"{r.get('max_rel_diff_vs_library', float('nan')):.2e} | {r.get('error', '')[:80]} |"
            for r in results]
  write_json_and_markdown(args.out, f"dgrad-kernel-{datetime.date.today().isoformat()}{args.tag}",
                          dict(command=command, results=results), lines)
  return 0


if __name__ == "__main__":
  sys.exit(main())
