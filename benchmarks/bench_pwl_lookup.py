"""The MLP backward's elementwise pass with other PWL lookups, alone on the GPU (run on the GPU).

    PYTHONPATH=$PWD python3 benchmarks/bench_pwl_lookup.py --out $OUT [--rows 8192 --hidden 3072]

gpt2-small's training step spends 103 us (H200, 2026-12-02) in one XLA fusion: from d_hidden
(f32 [M, H]) and the saved floor bits (bf16 hi + uint8 lo) it writes d_pre = d_hidden s(p) and
h = s(p) p + c(p), bf16 each: 275 MB at M = 8192, H = 3072, 69 us at 4 TB/s. Its lookup
(``pwl_select``) takes K compares and 2K selects per element. Variants, each checked against
"selects":
  copy:          d_pre = d_hidden, h = p (the bytes alone: the floor);
  selects:       the library's ``pwl_select``;
  count-gather:  seg = sum_k [p >= t_k] (``backward.segment_index``: K compares and adds), s and
                 c gathered from the tables;
  steps:         s = s_0 + sum_k (s_{k+1} - s_k) [p >= t_k], c likewise (K compares, 2K FMAs).
GPU time per pass from the profiler (``gpu_profile.profile``); writes ``pwl-lookup-<date>.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.activation import pwl_select
from pallas_kernels.gpu import backward

sys.path.insert(0, os.path.dirname(__file__))
from report_files import write_json_and_markdown  # noqa: E402
from gpu_profile import profile  # noqa: E402


def lookup_copy(p, knots, slopes, intercepts):
  return jnp.ones_like(p), p


def lookup_selects(p, knots, slopes, intercepts):
  slope, intercept = pwl_select(p, knots, slopes, intercepts)
  return slope, slope * p + intercept


def lookup_count_gather(p, knots, slopes, intercepts):
  segment = backward.segment_index(p, knots, knots.shape[0])
  slope = jnp.take(slopes, segment)
  return slope, slope * p + jnp.take(intercepts, segment)


def lookup_steps(p, knots, slopes, intercepts):
  slope, intercept = jnp.full_like(p, slopes[0]), jnp.full_like(p, intercepts[0])
  for k in range(knots.shape[0]):
    above = (p >= knots[k]).astype(p.dtype)
    slope = slope + (slopes[k + 1] - slopes[k]) * above
    intercept = intercept + (intercepts[k + 1] - intercepts[k]) * above
  return slope, slope * p + intercept


LOOKUPS = {"copy": lookup_copy, "selects": lookup_selects, "count-gather": lookup_count_gather,
           "steps": lookup_steps}


def elementwise_pass(lookup):
  """(d_pre, h) in bf16 from d_hidden and the floor-bit parts, with ``lookup``'s (s(p), h)."""
  def run(d_hidden, hi, lo, knots, slopes, intercepts):
    p = backward.join_floor_bits(hi, lo)
    slope, hidden = lookup(p, knots, slopes, intercepts)
    return (d_hidden * slope).astype(jnp.bfloat16), hidden.astype(jnp.bfloat16)
  return jax.jit(run)


def problem(rows: int, hidden: int, seed: int = 0) -> tuple:
  """(d_hidden, hi, lo, knots, slopes, intercepts): GELU's PWL-16 with knots on the floor-bits
  grid, p ~ 2 N(0, 1) so every segment is hit."""
  rng = np.random.default_rng(seed)
  activation = to_kernel_activation(ff.fit("gelu", 16))
  p = jnp.asarray(2 * rng.standard_normal((rows, hidden)), jnp.float32)
  hi, lo = backward.split_floor_bits(p, jnp.bfloat16)
  d_hidden = jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32)
  return (d_hidden, hi, lo, backward.snap_knots(activation.knots), activation.slopes,
          activation.intercepts)


def max_relative_difference(got, want) -> float:
  got, want = (np.asarray(a, np.float32) for a in (got, want))
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--rows", type=int, default=8192)
  parser.add_argument("--hidden", type=int, default=3072)
  parser.add_argument("--calls", type=int, default=20)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  inputs = problem(args.rows, args.hidden)
  reference = elementwise_pass(lookup_selects)(*inputs)
  moved_mb = args.rows * args.hidden * (4 + 2 + 1 + 2 + 2) / 1e6
  results = {}
  for name, lookup in LOOKUPS.items():
    fn = elementwise_pass(lookup)
    record = profile(fn, inputs, args.calls, 1)
    if name != "copy":
      record["max_rel_diff_vs_selects"] = max(
          max_relative_difference(got, want) for got, want in zip(fn(*inputs), reference))
    results[name] = record
    print(json.dumps({name: record})[:400], flush=True)
  lines = [f"# PWL by lookup ({jax.devices()[0].device_kind})", "",
           f"{args.rows} x {args.hidden}, {moved_mb:.0f} MB moved per pass", "",
           "| lookup | GPU us | TB/s | max rel. diff vs selects |", "|---|---:|---:|---:|"]
  for name, r in results.items():
    rate = moved_mb / r["device_us"] if r["device_us"] else float("nan")  # MB/us = TB/s
    lines.append(f"| {name} | {r['device_us']:.1f} | {rate:.2f} | "
                 f"{r.get('max_rel_diff_vs_selects', float('nan')):.1e} |")
  print(write_json_and_markdown(
      args.out, f"pwl-lookup-{datetime.date.today().isoformat()}",
      {"device": jax.devices()[0].device_kind, "rows": args.rows, "hidden": args.hidden,
       "moved_mb": moved_mb, "results": results}, lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
