"""A GLU backward's GEMMs after the dgrad kernel, as XLA runs them: d_g and d_u as two arrays or as
one [M, 2H] array [d_g | d_u].

    PYTHONPATH=$PWD python3 benchmarks/bench_glu_input_grads.py --out $OUT [--shapes smollm2,llama1b]

Given d_g, d_u (what ``dgrad_sm90.dgrad_activation`` writes), h and dy, the backward computes

    dx = d_u W_up^T + d_g W_gate^T,  dW_up = x^T d_u,  dW_gate = x^T d_g,  dW_down = h^T dy

(plus the bias sums). "separate" is the library's ``backward.column_gradients`` (two f32 dx
GEMMs added and rounded in a pass of their own: 21.6 + 21.6 + 10.1 us at SmolLM2 on the H200,
twenty-fourth session). "joint" takes d_gu = [d_g | d_u] as one array, as the dgrad kernel would
write it: dx = d_gu [W_gate | W_up]^T is one GEMM with K = 2H and a bf16 result, dW = x^T d_gu
one GEMM with N = 2H, split after; the weights are concatenated per call. "joint-stacked" is
the same with [W_gate | W_up] stored as one array (no concatenation). Each variant's GPU-busy
time per call (``gpu_profile.profile``) and its largest difference from "separate", relative to
each output's largest magnitude. Decides whether the dgrad kernel should write one array
(benchmarks/NOTES.md, twenty-fourth session). Writes ``glu-input-grads-<date><tag>.json``.
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

from pallas_kernels.gpu import backward

sys.path.insert(0, os.path.dirname(__file__))
from report_files import write_json_and_markdown  # noqa: E402
from bench_gpu import SHAPES  # noqa: E402
from gpu_profile import profile  # noqa: E402


def separate(x, dy, w_up, w_gate, h, d_up, d_gate):
  """The library's backward GEMMs: (dx, dW_up, dW_down, dW_gate, Σ d_u, Σ d_g)."""
  return backward.column_gradients(x, dy, w_up, w_gate, w_gate.dtype, h, d_up, d_gate,
                                    dx_dtype=x.dtype)


def joint_stacked(x, dy, w_gate_up, h, d_gate_up):
  """The same from d_gu = [d_g | d_u] and [W_gate | W_up], each one array."""
  return backward.joint_column_gradients(x, dy, w_gate_up, w_gate_up.dtype, h, d_gate_up,
                                         dx_dtype=x.dtype)


def joint(x, dy, w_up, w_gate, h, d_gate_up):
  return joint_stacked(x, dy, jnp.concatenate([w_gate, w_up], axis=1), h, d_gate_up)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--shapes", default="smollm2,llama1b")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--tag", default="")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  shapes = {shape.name: shape for shape in SHAPES}
  rng = np.random.default_rng(0)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
  results = []
  for name in args.shapes.split(","):
    shape = shapes[name]
    if not shape.glu:
      raise ValueError(f"--shapes: {name} is not a GLU")
    m, d, hidden = shape.rows, shape.d_model, shape.hidden
    x, dy = draw(m, d), draw(m, d)
    h, d_up, d_gate = draw(m, hidden), draw(m, hidden), draw(m, hidden)
    w_up, w_gate = draw(d, hidden), draw(d, hidden)
    d_gate_up = jnp.concatenate([d_gate, d_up], axis=1)
    variants = {
        "separate": (jax.jit(separate), (x, dy, w_up, w_gate, h, d_up, d_gate)),
        "joint": (jax.jit(joint), (x, dy, w_up, w_gate, h, d_gate_up)),
        "joint-stacked": (jax.jit(joint_stacked),
                          (x, dy, jnp.concatenate([w_gate, w_up], axis=1), h, d_gate_up))}
    want = [out.astype(jnp.float32) for out in variants["separate"][0](*variants["separate"][1])]
    for variant, (fn, fn_args) in variants.items():
      record = dict(shape=name, variant=variant, **profile(fn, fn_args, args.calls, 1, top=8))
      got = [out.astype(jnp.float32) for out in fn(*fn_args)]
      record["max_rel_diff"] = max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
                                   for g, w in zip(got, want))
      results.append(record)
      print(json.dumps({k: record[k] for k in ("shape", "variant", "device_us", "max_rel_diff",
                                               "by_kernel_us")}), flush=True)
  lines = [f"# A GLU's input gradients, joint vs separate ({jax.devices()[0].device_kind})", "",
           "| shape | variant | GPU-busy us | max rel. diff vs separate |", "|---|---|---:|---:|"]
  lines += [f"| {r['shape']} | {r['variant']} | {r['device_us']:.1f} | {r['max_rel_diff']:.1e} |"
            for r in results]
  print(write_json_and_markdown(
      args.out, f"glu-input-grads-{datetime.date.today().isoformat()}{args.tag}",
      {"device": jax.devices()[0].device_kind, "results": results}, lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
