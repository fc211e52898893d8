"""GEMM2 of the epilogue path (y = h W_down + b_down) alone on the GPU: XLA's dot against the
epilogue kernel with the identity activation (``dispatch.down_projection``, ``Plan(down=...)``).

    PYTHONPATH=$PWD python3 benchmarks/bench_down_projection.py --out $OUT \
        --shapes smollm2,gpt2-small --configs 64x192x4:pingpong,128x64x5:pingpong

Why: at SmolLM2 (M = 8192, H = 1536, D_out = 576) XLA's GEMM2 takes ~29 us where 14.5 GFLOP at
the measured ~700 TF/s is 20.7 us (benchmarks/NOTES.md, tenth session): 576 columns are 4.5
tiles of 128, so its tiles quantize badly; 64 x 192 ping-pong tiles make 384 tiles, 2.9 per SM
on 132 SMs. Each config is ``TILE_MxTILE_NxSTAGES:SCHEDULE``. GPU time from the profiler
(``gpu_profile.profile``), the compute floor at --peak-tflops, and the largest difference of y
from XLA's and from an f32 reference, relative to max |y|. ``--without-bias``: b_down = None, as in
bench_gpu's FFNs; XLA then picks another GEMM (gpt2-small 52.2 vs 60.9 us with the bias, H200).
Writes ``down-projection-<date><tag>.json`` and prints a table.
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

from pallas_kernels.gpu import dispatch, fused_ffn_sm90 as kernels

sys.path.insert(0, os.path.dirname(__file__))
from report_files import write_json_and_markdown  # noqa: E402
from bench_gpu import SHAPES  # noqa: E402
from gpu_profile import profile  # noqa: E402


def parse_config(text: str) -> kernels.EpilogueConfig:
  """"64x192x4:pingpong" -> EpilogueConfig(tile_m=64, tile_n=192, stages=4, schedule=...)."""
  tiles, schedule = text.split(":")
  tile_m, tile_n, stages = (int(v) for v in tiles.split("x"))
  return kernels.EpilogueConfig(tile_m, tile_n, stages, schedule=schedule)


def problem(rows: int, hidden: int, d_out: int, rng) -> tuple[jax.Array, ...]:
  """h [rows, hidden], W_down [hidden, d_out], b_down [d_out] in bf16, O(1) outputs."""
  h = jnp.asarray(rng.normal(size=(rows, hidden)), jnp.bfloat16)
  w_down = jnp.asarray(rng.normal(size=(hidden, d_out)) / np.sqrt(hidden), jnp.bfloat16)
  return h, w_down, jnp.asarray(rng.normal(size=(d_out,)), jnp.bfloat16)


def projection(config: kernels.EpilogueConfig | None):
  """jit of ``dispatch.down_projection`` with ``config`` (None: XLA's dot)."""
  return jax.jit(lambda h, w, b: dispatch.down_projection(h, w, b, h.shape[0], config))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--shapes", default="smollm2,gpt2-small,gpt2-xl,llama1b")
  parser.add_argument("--configs", default="64x192x4:pingpong,128x64x5:pingpong,"
                                           "128x128x4:pingpong,64x256x3:cooperative")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--peak-tflops", type=float, default=700.0)
  parser.add_argument("--without-bias", action="store_true",
                      help="b_down = None, as bench_gpu's FFNs (XLA picks another GEMM kernel)")
  parser.add_argument("--tag", default="")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  shapes = {shape.name: shape for shape in SHAPES}
  rng = np.random.default_rng(0)
  results = []
  for name in args.shapes.split(","):
    shape = shapes[name]
    args_ = problem(shape.rows, shape.hidden, shape.d_model, rng)
    if args.without_bias:
      args_ = (*args_[:2], None)
    floor_us = 2 * shape.rows * shape.hidden * shape.d_model / args.peak_tflops / 1e6
    want = projection(None)(*args_).astype(jnp.float32)
    h, w_down = (a.astype(jnp.float32) for a in args_[:2])
    exact = jnp.dot(h, w_down, precision="highest")
    exact = exact if args_[2] is None else exact + args_[2].astype(jnp.float32)
    for text in ["xla", *args.configs.split(",")]:
      record = dict(shape=name, config=text, floor_us=floor_us)
      try:
        fn = projection(None if text == "xla" else parse_config(text))
        record.update(profile(fn, args_, args.calls, 1))
        got = fn(*args_).astype(jnp.float32)
        for key, ref in (("max_rel_diff_vs_xla", want), ("max_rel_err_vs_f32", exact)):
          record[key] = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
      except Exception as error:  # noqa: BLE001 -- a config that fails is a result
        record["error"] = f"{type(error).__name__}: {error}"[:300]
      results.append(record)
      print(json.dumps({k: record.get(k) for k in ("shape", "config", "device_us",
                                                      "max_rel_diff_vs_xla",
                                                      "max_rel_err_vs_f32", "error")}),
            flush=True)
  lines = [f"# GEMM2 on the down-projection kernel vs XLA ({jax.devices()[0].device_kind})", "",
           "| shape | GEMM2 | GPU us | floor us | vs XLA | max rel. diff vs XLA | vs f32 |",
           "|---|---|---:|---:|---:|---:|---:|"]
  xla_us = {r["shape"]: r.get("device_us") for r in results if r["config"] == "xla"}
  for r in results:
    us = r.get("device_us")
    ratio = xla_us[r["shape"]] / us if us and xla_us[r["shape"]] else float("nan")
    lines.append(f"| {r['shape']} | {r['config']} | {us or float('nan'):.1f} | "
                 f"{r['floor_us']:.1f} | {ratio:.2f}x | "
                 f"{r.get('max_rel_diff_vs_xla', float('nan')):.1e} | "
                 f"{r.get('max_rel_err_vs_f32', float('nan')):.1e} |"
                 + (f" {r['error'][:60]}" if "error" in r else ""))
  print(write_json_and_markdown(
      args.out, f"down-projection-{datetime.date.today().isoformat()}{args.tag}",
      {"device": jax.devices()[0].device_kind, "results": results}, lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
