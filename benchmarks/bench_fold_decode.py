"""FFN decode time of the partially-linear fold vs the exact FFN, at M = 1, 8, 16, 64 tokens.

    PYTHONPATH=$PWD python3 benchmarks/bench_fold_decode.py --out $OUT          # GPU (H200)
    PYTHONPATH=$PWD python3 benchmarks/bench_fold_decode.py --tiny --out /tmp/x  # CPU smoke run

Shapes: gpt2-small (768/3072) and gpt2-xl (1600/6400) MLPs with tanh-GELU; SmolLM2 (576/1536)
and llama-8B (4096/14336) SwiGLU. Weights are random (W ~ N(0, 1/D), bf16). The fold is
calibrated by the library itself (``fold.model.plan_layer`` + ``fold.layer.build_weights``) on
random tokens whose pre-activation statistics resemble the real models' (MLP: z ~ N(−0.8, 1.1²)
per neuron, like all-MiniLM-L6-v2; GLU gate: z ~ N(−0.3, 0.6²), like SmolLM2), at the exact
fraction measured on the real model (``--mlp-exact-fraction`` / ``--glu-exact-fraction``). The
table reports the fold's resulting shape (folded / kept neurons, predictor flag rate) next to
the times, so the numbers can be read against the real-model results (benchmarks/results/fold-*).

Variants, each timed as N back-to-back calls chained through a residual add inside one jit
(y_{k+1} = x + 1e-3 · ffn(y_k)), median over repeats, per call. By default on the wall clock with
one weight set (L2-resident at the small shapes); with ``--device-time`` on the GPU's clock
(``gpu_profile.profile``: union of kernel intervals) with the chain cycling through copies of the
weights that together exceed twice the 50 MB L2, so they stream from HBM as a model's layers do
(at decode sizes the wall clock measures mostly the host's launch path: benchmarks/NOTES.md).
  xla_exact      flashffn_jax.ffn(..., implementation="xla"): the XLA reference FFN
  auto_exact     flashffn_jax.ffn(...) default dispatch (a Pallas kernel where one serves)
  fold_gather    folded_ffn decode path (predictor as int8 -> union of flags -> top-k -> gather rows)
  fold_gather_i4 the same with the predictor as the library stores it, int4
  fold_gather_nz the same (int8) choosing rows by index (jnp.nonzero) instead of top-k
  fold_dense     folded_ffn dense path (every folded neuron's residual, masked)
  fold_only      x W_fold + b_fold alone: the floor the fold approaches as corrections vanish
Random tokens are independent, so their flag unions grow faster with M than real text's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashffn_jax.fold import FoldSpec
from flashffn_jax.fold.layer import build_weights
from flashffn_jax.fold.model import plan_layer
from flashffn_jax.fold.ops import folded_ffn
from flashffn_jax.ops import ffn

sys.path.insert(0, os.path.dirname(__file__))
from gpu_profile import profile  # noqa: E402

SHAPES = {  # name: (D, H, glu, activation)
    "gpt2-small": (768, 3072, False, "gelu_tanh"),
    "gpt2-xl": (1600, 6400, False, "gelu_tanh"),
    "smollm2": (576, 1536, True, "silu"),
    "llama8b": (4096, 14336, True, "silu"),
}
TINY_SHAPES = {"mlp-tiny": (48, 160, False, "gelu_tanh"), "glu-tiny": (40, 96, True, "silu")}
TOKENS = (1, 8, 16, 64)
# Exact fractions of the real-model runs (benchmarks/results/fold-*.json): MiniLM and SmolLM2.
MLP_EXACT_FRACTION = 0.2
GLU_EXACT_FRACTION = 0.6
PRE_ACTIVATION = {False: (-0.8, 1.1), True: (-0.3, 0.6)}  # (mean, std) of z per kind


@dataclasses.dataclass
class Problem:
  name: str
  glu: bool
  activation: str
  exact: dict  # ffn() keyword arrays (bf16)
  folded: object  # FoldedWeights
  stats: dict


def build_problem(name: str, d: int, hidden: int, glu: bool, activation: str, exact_fraction: float,
                  calibration_tokens: int, predictor_bits: int, seed: int = 0) -> Problem:
  """Random bf16 FFN weights and their fold, calibrated on random tokens (module docstring)."""
  rng = np.random.default_rng(seed)
  mean, std = PRE_ACTIVATION[glu]
  normal = lambda *shape: rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
  w_in = normal(d, hidden) * std  # z = x W_in + b has std `std` for x ~ N(0, 1)
  b_in = rng.normal(mean, 0.3 * std, hidden).astype(np.float32)
  weights = {"w_up": normal(d, hidden), "w_down": normal(hidden, d), "w_gate": None,
             "b_up": None, "b_gate": None, "b_down": None}
  if glu:
    weights |= {"w_gate": w_in, "b_gate": b_in}
  else:
    weights |= {"w_up": w_in, "b_up": b_in}
  weights = {k: None if v is None else np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32)
             for k, v in weights.items()}  # the bf16 values, so fold and exact share them
  x = rng.standard_normal((calibration_tokens, d)).astype(np.float32)
  spec = FoldSpec(exact_fraction=exact_fraction, predictor_bits=predictor_bits)
  plan = plan_layer(x, weights, activation, spec)
  folded, stats = build_weights(plan, **weights, activation=activation, calibration_inputs=x,
                                predictor_bits=predictor_bits, margin=spec.margin, dtype=jnp.bfloat16)
  exact = {k: None if v is None else jnp.asarray(v, jnp.bfloat16) for k, v in weights.items()}
  return Problem(name, glu, activation, exact, folded, dict(stats))


def variants(problem: Problem) -> dict:
  """name -> (fn(x [M, D] bf16, weights) -> [M, D] bf16, weights). The weights are passed to the
  jit as arguments: closed over, they became constants that XLA folded for minutes (llama-8B never
  finished compiling on the H200)."""
  w, exact, act = problem.folded, problem.exact, problem.activation
  w_int4 = dataclasses.replace(w, predictor=w.predictor.astype(jnp.int4))
  w = dataclasses.replace(w, predictor=w.predictor.astype(jnp.int8))  # the earlier runs' storage
  return {
      "xla_exact": (lambda x, p: ffn(x, **p, activation=act, implementation="xla"), exact),
      "auto_exact": (lambda x, p: ffn(x, **p, activation=act), exact),
      "fold_gather": (lambda x, p: folded_ffn(x, p, implementation="gather"), w),
      "fold_gather_i4": (lambda x, p: folded_ffn(x, p, implementation="gather"), w_int4),
      "fold_gather_nz": (lambda x, p: folded_ffn(x, p, implementation="gather",
                                                 selection="index"), w),
      "fold_dense": (lambda x, p: folded_ffn(x, p, implementation="dense"), w),
      "fold_only": (lambda x, p: (jnp.dot(x, p.w_fold, preferred_element_type=jnp.float32)
                                  + p.b_fold.astype(jnp.float32)).astype(x.dtype), w),
  }


L2_BYTES = 50 * 2**20


def chained_calls(fn, chain: int):
  """jit of ``chain`` calls y_{k+1} = x + 1e-3 · fn(y_k, weights[k % len(weights)])."""
  def chained(x0, weight_copies):
    y = x0
    for k in range(chain):
      y = x0 + (1e-3 * fn(y, weight_copies[k % len(weight_copies)]).astype(jnp.float32)
                ).astype(x0.dtype)
    return y
  return jax.jit(chained)


def time_per_call(fn, weights, x: jax.Array, chain: int, repeats: int) -> float:
  """Median wall-clock seconds per call over ``repeats`` runs of ``chain`` chained calls."""
  run = chained_calls(fn, chain)
  run(x, [weights]).block_until_ready()
  run(x, [weights]).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(x, [weights]).block_until_ready()
    times.append((time.perf_counter() - start) / chain)
  return statistics.median(times)


def device_time_per_call(fn, weights, x: jax.Array, chain: int, repeats: int) -> float:
  """GPU-busy seconds per call, the chain cycling through copies of ``weights`` (> 2x the L2)."""
  nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(weights))
  copies = [jax.tree.map(jnp.copy, weights)
            for _ in range(min(chain, max(1, math.ceil(2 * L2_BYTES / nbytes))))]
  return profile(chained_calls(fn, chain), (x, copies), repeats, chain)["device_us"] / 1e6


def measure(problem: Problem, tokens: tuple, chain: int, repeats: int, rng,
            clock=time_per_call) -> list[dict]:
  rows = []
  d = problem.folded.w_fold.shape[0]
  for m in tokens:
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
    row = {"shape": problem.name, "M": m, "capacity": problem.folded.capacity(m),
           "folded": problem.stats["folded"], "kept": problem.stats["kept"]}
    for name, (fn, weights) in variants(problem).items():
      try:
        row[name + "_ms"] = 1e3 * clock(fn, weights, x, chain, repeats)
      except Exception as error:  # a variant that cannot run here is reported, not fatal
        row[name + "_ms"] = None
        row[name + "_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    base = row["xla_exact_ms"]
    for name in VARIANT_COLUMNS:
      if row.get(name + "_ms") and base:
        row[name + "_speedup"] = base / row[name + "_ms"]
    rows.append(row)
    print(format_row(row), flush=True)
  return rows


VARIANT_COLUMNS = ("auto_exact", "fold_gather", "fold_gather_i4", "fold_gather_nz", "fold_dense",
                   "fold_only")
HEADER = (f"{'shape':<11} {'M':>3} {'F/K':>11} {'cap':>5} {'xla ms':>8} {'auto':>6} {'gather':>6} "
          f"{'g-int4':>6} {'g-nz':>6} {'dense':>6} {'fold':>6}   (speed-up vs xla_exact)")


def format_row(row: dict) -> str:
  ratio = lambda name: f"{row[name + '_speedup']:6.2f}" if row.get(name + "_speedup") else "   n/a"
  xla = f"{row['xla_exact_ms']:8.4f}" if row.get("xla_exact_ms") else "     n/a"
  return (f"{row['shape']:<11} {row['M']:>3} {row['folded']:>5}/{row['kept']:<5} {row['capacity']:>5} "
          f"{xla} " + " ".join(ratio(name) for name in VARIANT_COLUMNS))


def markdown(result: dict) -> str:
  lines = [f"# Fold decode timing ({result['device']}, {result['date']})", "",
           "Speed-up = XLA exact FFN time / variant time (bf16, random weights, see "
           "benchmarks/bench_fold_decode.py). Clock: " + (
               "the GPU's (profiler: kernel time; weights cycled through copies > 2x the L2)."
               if result["args"]["device_time"] else
               "wall clock (host launch cost included; one weight set)."), "",
           "| shape | M | folded/kept | flag rate | capacity | XLA exact ms | auto | gather int8 | "
           "gather int4 | gather by index | dense | fold only |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  flag_rates = {p["name"]: p["stats"]["predicted_flag_rate"] for p in result["problems"]}
  cell = lambda row, name: f"{row[name + '_speedup']:.2f}×" if row.get(name + "_speedup") else "n/a"
  for row in result["rows"]:
    xla = f"{row['xla_exact_ms']:.4f}" if row.get("xla_exact_ms") else "n/a"
    lines.append(f"| {row['shape']} | {row['M']} | {row['folded']}/{row['kept']} | "
                 f"{flag_rates[row['shape']]:.2f} | {row['capacity']} | {xla} | "
                 + " | ".join(cell(row, n) for n in VARIANT_COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown")
  parser.add_argument("--tiny", action="store_true", help="small shapes, few repeats (CPU smoke run)")
  parser.add_argument("--shapes", nargs="+", help=f"subset of {sorted(SHAPES)}")
  parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
  parser.add_argument("--mlp-exact-fraction", type=float, default=MLP_EXACT_FRACTION)
  parser.add_argument("--glu-exact-fraction", type=float, default=GLU_EXACT_FRACTION)
  parser.add_argument("--predictor-bits", type=int, default=4)
  parser.add_argument("--calibration-tokens", type=int, default=2048)
  parser.add_argument("--chain", type=int, default=16, help="FFN calls per timed jit")
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--device-time", action="store_true",
                      help="time on the GPU's clock (profiler), weights streaming from HBM")
  args = parser.parse_args(argv)
  shapes = TINY_SHAPES if args.tiny else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
  if args.tiny:
    args.calibration_tokens, args.chain, args.repeats = 256, 2, 2
    args.tokens = [m for m in args.tokens if m <= 8] or [1]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0]
  date = datetime.date.today().isoformat()
  result = {"device": getattr(device, "device_kind", device.platform), "platform": device.platform,
            "date": date, "jax": jax.__version__, "args": vars(args), "problems": [], "rows": []}
  clock = "-device-time" if args.device_time else ""
  stem = f"fold-decode-{'tiny' if args.tiny else device.platform}{clock}-{date}"
  rng = np.random.default_rng(1)
  print(HEADER, flush=True)
  for name, (d, hidden, glu, activation) in shapes.items():
    fraction = args.glu_exact_fraction if glu else args.mlp_exact_fraction
    problem = build_problem(name, d, hidden, glu, activation, fraction, args.calibration_tokens,
                            args.predictor_bits)
    result["problems"].append({"name": name, "D": d, "H": hidden, "glu": glu, "activation": activation,
                               "exact_fraction": fraction, "stats": problem.stats})
    result["rows"] += measure(problem, tuple(args.tokens), args.chain, args.repeats, rng,
                              device_time_per_call if args.device_time else time_per_call)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    (out / f"{stem}.md").write_text(markdown(result))
  print(f"wrote {out / stem}.json and .md", flush=True)
  return result


if __name__ == "__main__":
  main()
