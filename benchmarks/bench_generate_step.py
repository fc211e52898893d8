"""Time of one batched decode step of a SmolLM2-shaped Llama with exact and PWL (pwl16) MLPs.

    PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false python3 \
        benchmarks/bench_generate_step.py --out $OUT                      # GPU (H200)
    PYTHONPATH=$PWD python3 benchmarks/bench_generate_step.py --tiny --out /tmp/x  # CPU smoke run

At decode an FFN is a few microseconds of GPU work (bench_decode_profile.py); what a user waits
for is the whole step, whose wall clock also holds attention over the KV cache, the LM head and
the host's launches. This script measures that step: one new token per sequence through
``Llama.decode``, as ``models.generate`` runs it (``decode_steps``: k chained greedy steps a
jitted call, k from ``--tokens-per-call``, the cache donated), for a SmolLM2-135M-shaped model
with random bf16 weights, in three variants:
  exact-xla   the model as built (exact SiLU MLPs, nnx.Linear under XLA)
  pwl16-xla   ``surgery.linearize(model, "pwl16", implementation="xla")``
  pwl16-auto  the same with the library's dispatch (implementation=None): on an H200 a Pallas
              Mosaic GPU decode kernel where it serves, on a CPU XLA
Per batch size the cache (``--cache-len`` positions) is first filled to half by a prefill of
random tokens; then ``--steps`` steps run chained (each step's token and cache feed the next),
k a call, and the wall clock per step is the median over ``--repeats``. On a GPU the profiler
(gpu_profile.py) adds the GPU-busy time per step. XLA_FLAGS (command buffers) change the wall
clock, not the GPU time: run once per setting with a ``--tag``. Writes
``generate-step-<date><tag>.json`` / ``.md``; ``--dump-hlo`` also each variant's compiled step
(HLO text: which kernels surround the FFN; use a few ``--layers``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashffn_jax.models.generate import FlatModel, Sampling, decode_steps
from flashffn_jax.models.llama import KVCache, Llama, LlamaConfig
from flashffn_jax.nnx import FusedFFN
from flashffn_jax.ops import chosen_implementation
from flashffn_jax.surgery import linearize

sys.path.insert(0, os.path.dirname(__file__))
from gpu_profile import profile  # noqa: E402
from report_files import write_json_and_markdown  # noqa: E402

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                           rms_norm_eps=1e-5)
VARIANTS = ("exact-xla", "pwl16-xla", "pwl16-auto")
TINY = dict(layers=2, batches="1,8", tokens_per_call="1,2", steps=4, repeats=1, cache_len=64,
            tag="-tiny")
GREEDY, KEY = Sampling(0.0, None, None), jax.random.key(0)


def build(variant: str, model: Llama) -> Llama:
  """The model of one variant (the linearized ones share the exact model's weights)."""
  if variant == "exact-xla":
    return model
  return linearize(model, "pwl16", implementation="xla" if variant == "pwl16-xla" else None)


def ffn_implementation(model: Llama, batch: int) -> str:
  """What runs the MLPs at ``batch`` tokens: nnx.Linear, or the implementation ffn picks."""
  mlp = model.layers[0].mlp
  if not isinstance(mlp, FusedFFN):
    return "nnx.Linear"
  x = jax.ShapeDtypeStruct((batch, model.config.hidden_size), model.dtype)
  return chosen_implementation(x, mlp.w_up[...], mlp.w_down[...], w_gate=mlp.w_gate[...],
                               activation=mlp.activation, implementation=mlp.implementation)


@functools.partial(jax.jit, static_argnums=0)
def prefill(graphdef, state, tokens, cache):
  """The cache after ``tokens`` [B, T] (the logits are unused, so XLA drops the LM head)."""
  return nnx.merge(graphdef, state).decode(tokens, cache)[1]


class Decoder:
  """Chained greedy decode calls of one model (``models.generate.decode_steps``, ``per_call``
  steps a call): each ``call()`` feeds the last tokens and the cache on."""

  def __init__(self, model: Llama, tokens: jax.Array, cache: KVCache, per_call: int):
    self.flat, self.per_call = FlatModel.of(model), per_call
    self.tokens, self.cache = tokens, cache
    self.start = self.filled = int(cache.length)

  def restart(self) -> None:
    """Back to the prefilled length (the positions written since get overwritten)."""
    self.cache = dataclasses.replace(self.cache, length=jnp.asarray(self.start, jnp.int32))
    self.filled = self.start

  def call(self) -> jax.Array:
    if self.filled + self.per_call > self.cache.max_length:  # full: start over, don't overflow
      self.restart()
    tokens, self.cache = decode_steps(self.flat, self.tokens, self.cache, KEY, 0, GREEDY,
                                      self.per_call)
    self.tokens = tokens[-1]
    self.filled += self.per_call
    return self.tokens


def wall_us_per_step(decoder: Decoder, calls: int, repeats: int) -> float:
  """Median over ``repeats`` of the wall-clock us per decode step of ``calls`` chained calls."""
  times = []
  for _ in range(repeats):
    decoder.restart()
    jax.block_until_ready(decoder.cache)
    start = time.perf_counter()
    for _ in range(calls):
      tokens = decoder.call()
    jax.block_until_ready(tokens)
    times.append((time.perf_counter() - start) / (calls * decoder.per_call) * 1e6)
  return statistics.median(times)


def measure(model: Llama, variant: str, batch: int, per_call: int, tokens: jax.Array,
            cache: KVCache, args) -> dict:
  """Wall-clock (and, on a GPU, profiled) time per step from a copy of the prefilled cache."""
  decoder = Decoder(model, tokens, jax.tree.map(jnp.copy, cache), per_call)
  if args.dump_hlo:  # what XLA made of the step: which kernels surround the FFN
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"generate-step-hlo{args.tag}-{variant}-b{batch}-k{per_call}.txt")
    with open(path, "w") as f:
      f.write(decode_steps.lower(decoder.flat, decoder.tokens, decoder.cache, KEY, 0, GREEDY,
                                 per_call).compile().as_text())
  jax.block_until_ready([decoder.call() for _ in range(2)])  # compile, warm up
  calls = max(1, args.steps // per_call)
  row = {"ffn": ffn_implementation(model, batch),
         "wall_us_per_step": wall_us_per_step(decoder, calls, args.repeats)}
  if jax.default_backend() == "gpu" and not args.wall_only:
    decoder.restart()
    try:
      record = profile(decoder.call, (), calls, per_call, top=args.profile_top)
      row.update(device_us_per_step=record["device_us"], kernels_per_step=record["kernels"],
                 profile=record)
    except Exception as error:  # noqa: BLE001 -- the wall clock stands without it
      row["device_error"] = f"{type(error).__name__}: {error}"[:300]
  return row


def add_ratios(row: dict, results: list) -> None:
  """Time / exact-xla's at the same batch and steps a call, for the wall clock and GPU time."""
  base = next((r for r in reversed(results) if r["variant"] == "exact-xla"
               and r["batch"] == row["batch"] and r["tokens_per_call"] == row["tokens_per_call"]
               and "wall_us_per_step" in r), None)
  for clock in ("wall", "device") if base and row["variant"] != "exact-xla" else ():
    if f"{clock}_us_per_step" in row and f"{clock}_us_per_step" in base:
      row[f"{clock}_vs_exact"] = row[f"{clock}_us_per_step"] / base[f"{clock}_us_per_step"]


def write_report(results: list, args, command: str) -> str:
  """``generate-step-<date><tag>.json`` / ``.md`` in ``args.out`` (rewritten after every row,
  so a run cut short keeps what it measured)."""
  date = datetime.date.today().isoformat()
  flags = os.environ.get("XLA_FLAGS", "")
  device = jax.devices()[0].device_kind
  lines = [f"# One decode step of a SmolLM2-shaped Llama ({device}, {date})", "",
           f"`python3 benchmarks/bench_generate_step.py {command}`: {args.layers} layers, random "
           f"bf16 weights, KV cache of {args.cache_len} positions prefilled to "
           f"{args.cache_len // 2}, {args.steps} chained steps (k a call), median of "
           f"{args.repeats} repeats; XLA_FLAGS=`{flags}`. wall: wall clock per step (the host's "
           "launches included); device: GPU-busy us per step (profiler, which runs without "
           "command buffers); vs exact: time / exact-xla's at the same batch and k (< 1 is "
           "faster).", "",
           "| batch | k | variant | MLPs run as | wall us | vs exact | device us | vs exact "
           "| kernels |", "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
  cell = lambda row, key, spec: format(row[key], spec) if key in row else "—"
  for r in results:
    if "error" in r:
      lines.append(f"| {r['batch']} | {r['tokens_per_call']} | {r['variant']} "
                   f"| error: {r['error'][:100]} | | | | | |")
      continue
    device_us = cell(r, "device_us_per_step", ".1f") if "device_error" not in r else (
        "error: " + r["device_error"][:60])
    lines.append(f"| {r['batch']} | {r['tokens_per_call']} | {r['variant']} | {r['ffn']} "
                 f"| {r['wall_us_per_step']:.1f} | {cell(r, 'wall_vs_exact', '.3f')} "
                 f"| {device_us} | {cell(r, 'device_vs_exact', '.3f')} "
                 f"| {cell(r, 'kernels_per_step', '.0f')} |")
  record = {"command": "python3 benchmarks/bench_generate_step.py " + command, "device": device,
            "xla_flags": flags, "config": dataclasses.asdict(SMOLLM2_135M) | {
                "num_layers": args.layers}, "args": vars(args), "results": results}
  return write_json_and_markdown(args.out, f"generate-step-{date}{args.tag}", record, lines)


def main(argv=None) -> list:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--batches", default="1,4,8,16,32")
  parser.add_argument("--tokens-per-call", default="1,8",
                      help="decode steps a jitted call runs (comma-separated list)")
  parser.add_argument("--steps", type=int, default=48, help="chained steps per repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cache-len", type=int, default=256)
  parser.add_argument("--layers", type=int, default=SMOLLM2_135M.num_layers)
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
  parser.add_argument("--tag", default="", help="suffix of the report's file names")
  parser.add_argument("--dump-hlo", action="store_true",
                      help="write each variant's compiled step (HLO text) to --out")
  parser.add_argument("--wall-only", action="store_true",
                      help="skip the profiler (it runs without command buffers, so XLA_FLAGS that "
                      "change them change the wall clock only)")
  parser.add_argument("--profile-top", type=int, default=4,
                      help="kernels listed per row (by_kernel_us: GPU us a step per launch)")
  parser.add_argument("--tiny", action="store_true",
                      help=f"CPU smoke run: {TINY} unless given")
  args = parser.parse_args(argv)
  if args.tiny:  # the namespace's values stand where no flag is given
    args = parser.parse_args(argv, namespace=argparse.Namespace(**TINY))
  command = " ".join(sys.argv[1:] if argv is None else argv)
  config = dataclasses.replace(SMOLLM2_135M, num_layers=args.layers)
  exact = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  models = {v: build(v, exact) for v in VARIANTS if v in args.variants.split(",")}
  rng = np.random.default_rng(0)
  results = []
  for batch in map(int, args.batches.split(",")):
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (batch, args.cache_len // 2)),
                         jnp.int32)
    cache = prefill(*nnx.split(exact), prompt, exact.init_cache(batch, args.cache_len))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, batch), jnp.int32)
    for per_call in map(int, args.tokens_per_call.split(",")):
      for variant, model in models.items():
        row = {"variant": variant, "batch": batch, "tokens_per_call": per_call,
               "layers": args.layers}
        try:
          row |= measure(model, variant, batch, per_call, tokens, cache, args)
        except Exception as error:  # noqa: BLE001 -- a variant that fails is a result
          row["error"] = f"{type(error).__name__}: {error}"[:300]
        add_ratios(row, results)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        table = write_report(results, args, command)
  print(table)
  return results


if __name__ == "__main__":
  main()
