"""H200 benchmark of the Hopper FFN kernels against XLA (and tokamax's Mosaic GLU): run on the GPU.

    PYTHONPATH=$PWD python3 benchmarks/bench_gpu.py --out $OUT [--budget-s 420] [--shapes a,b]
        [--tokamax] [--forward-only] [--schedules cooperative,pingpong] [--pwl-dtypes float16]
        [--residuals recompute,preactivations,segments] [--d-hidden float32,input]
        [--hinges max,relu]

For every shape (M = 8192 and decode M = 16) it times, steady state on a few input sets (distinct
x; at decode distinct weights too, so they are not served from the 50 MB L2):
  forward:     XLA with the exact activation, XLA with the same 16-segment PWL in jnp, the kernel
               plans in ``candidates`` with the PWL (hinges in f32 and in packed f16, the f16 ones
               as max and as relu hinges; epilogue tiles in both ``EpilogueConfig.schedule``s),
               the fastest
               plan again with the exact activation, tokamax's Mosaic GLU + XLA down-projection
               (GLU shapes, with --tokamax);
  fwd+bwd:     loss and gradients (``training_loss``: the forward runs and the backward needs
               its output, as in training): XLA exact and XLA PWL
               (bf16 GEMMs, autodiff), the kernel's custom VJP with the library's tuned plan
               (``dispatch.choose_plan``) for each ``--residuals`` kind and ``--backward-chunks``
               budget and ``--d-hidden`` dtype of the backward's dy W_down^T (suffix -dh16: bf16;
               a plan whose backward is the dgrad kernel, ``Plan(backward="epilogue")``, uses
               neither: one variant named -dgrad), the floor-bits plan with the other backward,
               with the exact activation, and with the exact activation and the dgrad kernel on
               pairs, and the library's own plan for the exact activation; dy is an input of
               the step;
  decode:      also a Mosaic kernel that only copies x (what one launch costs in this wall-clock
               harness: ~30 us on the H200, 1 us of it on the GPU) and the decode kernel without
               its XLA sum; for GPU time at decode use bench_decode_profile.py;
  memory:      compiled temp bytes of fwd+bwd, and bytes the forward saves for the backward;
  accuracy:    ‖out − ref‖/‖ref‖ against XLA in float32 on the same inputs.
It prints a table and writes ``<device>-<date>.json`` / ``.md`` (plus a JSON-lines log written as it
goes, so a run cut short still leaves its numbers). Timing: a jitted function runs the FFN on
every input set; per sample one warm call, then >= 20 ms of back-to-back dispatches and one block;
median of 5 rounds, each round timing every variant of a table in turn (``interleaved_samples``),
all compiled first. GPU time per kernel, without the host: bench_backward_profile.py.
Each input set is a separate kernel instance for Mosaic to compile (~1.5 s each on the H200).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import reference_ffn, to_kernel_activation
from pallas_kernels.activation import Activation
from pallas_kernels.gpu import (backward, decode_sm90, dispatch, fused_ffn_sm90 as kernels,
                                hinge_table)
from report_files import write_json_and_markdown  # the script's folder is on sys.path

L2_BYTES = 50 * 2**20
HANG_SECONDS = 120  # one measurement longer than this is a hang: write what we have and exit


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  rows: int
  d_model: int
  hidden: int
  glu: bool
  activation: str

  @property
  def flops(self) -> int:
    return 2 * self.rows * self.d_model * self.hidden * (3 if self.glu else 2)

  @property
  def weight_bytes(self) -> int:
    return 2 * self.d_model * self.hidden * (3 if self.glu else 2)


SHAPES = (
    Shape("smollm2", 8192, 576, 1536, True, "silu"),
    Shape("gpt2-small", 8192, 768, 3072, False, "gelu"),
    Shape("smollm2-decode", 16, 576, 1536, True, "silu"),
    Shape("gpt2-small-decode", 16, 768, 3072, False, "gelu"),
    Shape("llama8b-decode", 16, 4096, 14336, True, "silu"),
    Shape("gpt2-xl", 8192, 1600, 6400, False, "gelu"),
    Shape("llama1b", 8192, 2048, 8192, True, "silu"),
    Shape("llama8b", 8192, 4096, 14336, True, "silu"),
)


def candidates(shape: Shape, pwl_dtypes=("float32", "float16"), schedules=kernels.SCHEDULES,
               hinges=kernels.HINGES) -> dict[str, dispatch.Plan]:
  """The kernel plans timed for this shape (the tuned table records the fastest), always with
  the library's own PWL plan (``dispatch.choose_plan``; "library-..." when no other candidate
  has its kernel configs), so the op's forward is timed even where the sweep is narrowed.

  Run 1 (NOTES.md) swept more tiles at SmolLM2; what lost there (fused at M = 8192, 128x64 and
  64x64 GLU tiles) is left out to keep the run inside the device budget.
  """
  decode = shape.rows <= dispatch.DECODE_ROWS
  plans = {}
  if decode and shape.d_model <= 1024:
    for pwl_dtype in pwl_dtypes:  # every K slice that fits in flight, then only 2 (is depth it?)
      for stages in (None, 2):
        config = decode_sm90.DecodeConfig(stages=stages, pwl_dtype=pwl_dtype)
        plans[f"decode-s{stages or 'max'}-{pwl_dtype[5:]}"] = dispatch.Plan("decode", decode=config)
  if shape.d_model <= 640 and decode:
    plans["fused-h64-s3-x12"] = dispatch.Plan(
        "fused", fused=kernels.FusedConfig(block_h=64, stages=3, h_splits=12))
  # MLP: 64 x 256 won at gpt2-small (12-01), 128 x 128 at gpt2-xl; they tie since the race fix
  tiles = {"cooperative": [(64, 128, 3)] if shape.glu else [(128, 128, 3), (64, 256, 3)],
           "pingpong": [(128, 64, 5), (64, 128, 4)] if shape.glu else [(128, 128, 4),
                                                                      (64, 256, 4)]}
  for schedule in schedules:
    for tile_m, tile_n, stages in tiles[schedule]:
      for pwl_dtype in pwl_dtypes:  # the relu hinges are an f16 form (``kernels.HINGES``)
        for form in hinges if pwl_dtype == "float16" else ("max",):
          config = kernels.EpilogueConfig(tile_m=tile_m, tile_n=tile_n, stages=stages,
                                          pwl_dtype=pwl_dtype, schedule=schedule, hinges=form)
          plans[epilogue_name(config)] = dispatch.Plan("epilogue", epilogue=config)
  library = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model,
                                 shape.glu, True)
  timed = {(plan.epilogue, plan.down) for plan in plans.values()}
  if library.path == "epilogue" and (library.epilogue, library.down) not in timed:
    down = library.down
    name = "library-" + epilogue_name(library.epilogue) + (
        f"-down{down.tile_m}x{down.tile_n}x{down.stages}{down.schedule[0]}" if down else "")
    plans[name] = library  # its residuals and backward do not change the forward
  return plans


def epilogue_name(config: kernels.EpilogueConfig) -> str:
  """How the results name an epilogue plan's tiles, e.g. "epilogue-64x128-s3-16" (cooperative)
  or "epilogue-pp-128x64-s5-16-relu" (ping-pong, relu hinges)."""
  schedule = "pp-" if config.schedule == "pingpong" else ""
  hinges = "-relu" if config.hinges == "relu" else ""
  return (f"epilogue-{schedule}{config.tile_m}x{config.tile_n}-s{config.stages}-"
          f"{config.pwl_dtype[5:]}{hinges}")


class Recorder:
  """Collects result records, appends each to a JSON-lines log, guards against hangs."""

  def __init__(self, out_dir: str, stem: str, budget_s: float):
    self.records: list[dict] = []
    self.log_path = os.path.join(out_dir, f"{stem}.jsonl")
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.current: tuple[str, float] | None = None
    threading.Thread(target=self._watchdog, daemon=True).start()

  def _watchdog(self):
    while True:
      time.sleep(5)
      if self.current and time.perf_counter() - self.current[1] > HANG_SECONDS:
        self.add({"section": "hang", "what": self.current[0]})
        print(f"HANG in {self.current[0]}: exiting", flush=True)
        os._exit(3)

  def over_budget(self) -> bool:
    return time.perf_counter() - self.start > self.budget_s

  def add(self, record: dict) -> None:
    record["t_s"] = round(time.perf_counter() - self.start, 1)
    self.records.append(record)
    with open(self.log_path, "a") as log:
      log.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)

  def measure(self, what: str, fn, **fields) -> dict | None:
    """Run ``fn`` -> dict of results; record it (or its error) under ``what``."""
    self.current = (what, time.perf_counter())
    try:
      record = {"what": what, **fields, **fn()}
    except Exception as error:  # noqa: BLE001 -- a failed variant is a result, not a crash
      record = {"what": what, **fields, "error": f"{type(error).__name__}: {error}"[:500]}
      traceback.print_exc(limit=3)
    finally:
      self.current = None
    self.add(record)
    return record


def block(tree):
  for leaf in jax.tree.leaves(tree):
    leaf.block_until_ready()


def prepare(fn, arg_sets) -> tuple:
  """(run, first outputs): ``run()`` dispatches one jit that runs ``fn`` on every input set,
  compiled and run once here; the outputs are that first run's, one per set."""
  batched = jax.jit(lambda sets: [fn(*args) for args in sets])
  outputs = batched(arg_sets)
  block(outputs)
  return (lambda: batched(arg_sets)), outputs


def interleaved_samples(runs: dict, calls_per_run: int, reps: int = 10, rounds: int = 5,
                        min_sample_s: float = 0.02) -> dict[str, list[float]]:
  """Seconds per call of each prepared ``run`` (``calls_per_run`` FFN calls each), one sample per
  round; a round times every run in turn, so a drift of the machine hits all alike. A sample is
  one untimed call (blocked: the GPU is warm and the queue empty), then ``reps`` back-to-back
  dispatches (at least ``min_sample_s`` of work, from the first round's warm call) and one block.
  H200, 2026-12-02: with 10 dispatches and no warm call per sample, a round's sample moved by up
  to 2.5x and the fwd+bwd medians came out 8-11% above a back-to-back profile of the same jit."""
  samples = {name: [] for name in runs}
  counts = {}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      block(run())
      warm = time.perf_counter() - start
      count = counts.setdefault(name, max(reps, math.ceil(min_sample_s / max(warm, 1e-6))))
      start = time.perf_counter()
      outs = [run() for _ in range(count)]
      block(outs)
      samples[name].append((time.perf_counter() - start) / (count * calls_per_run))
  return samples


def interleaved_seconds(runs: dict, calls_per_run: int, **kwargs) -> dict[str, float]:
  """The median of each run's ``interleaved_samples``."""
  samples = interleaved_samples(runs, calls_per_run, **kwargs)
  return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_ms(runs: dict, calls_per_run: int) -> dict:
  """A timing record: each run's median ms per call (``ms``) and every round's (``rounds_ms``)."""
  samples = interleaved_samples(runs, calls_per_run)
  return {"ms": {name: 1e3 * statistics.median(values) for name, values in samples.items()},
          "rounds_ms": {name: [round(1e3 * value, 4) for value in values]
                        for name, values in samples.items()}}


def time_per_call(fn, arg_sets, reps: int = 10, rounds: int = 5) -> float:
  """Seconds per FFN: ``reps`` dispatches of a jit running ``fn`` on every set, blocked once."""
  run, _ = prepare(fn, arg_sets)
  return interleaved_seconds({"fn": run}, len(arg_sets), reps=reps, rounds=rounds)["fn"]


def make_sets(shape: Shape, rng: np.random.Generator) -> list[dict]:
  """Input sets (each set is one more kernel instance to compile, so few): distinct x per set;
  at decode also distinct weights per set while they are small enough to sit in the L2."""
  decode = shape.rows <= dispatch.DECODE_ROWS
  rotate_weights = decode and shape.weight_bytes < L2_BYTES
  count = 8 if rotate_weights else 3
  draw = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(s[0]), jnp.bfloat16)

  def weights():
    return dict(w_up=draw(shape.d_model, shape.hidden), w_down=draw(shape.hidden, shape.d_model),
                w_gate=draw(shape.d_model, shape.hidden) if shape.glu else None)

  shared = None if rotate_weights else weights()
  sets = []
  for _ in range(count):
    x = jnp.asarray(rng.standard_normal((shape.rows, shape.d_model), np.float32), jnp.bfloat16)
    sets.append(dict(x=x, **(shared or weights())))
  return sets


def as_args(problem: dict) -> tuple:
  return problem["x"], problem["w_up"], problem["w_down"], problem["w_gate"]


NO_BIASES = (None, None, None)


def xla_forward(activation: Activation, biases=NO_BIASES):
  """XLA's FFN of (x, wu, wd, wg); ``biases`` (b_up, b_gate, b_down), fixed, not differentiated."""
  return lambda x, wu, wd, wg: reference_ffn(x, wu, wd, wg, *biases, activation)


def kernel_forward(activation: Activation, plan: dispatch.Plan, biases=NO_BIASES):
  """The kernel's FFN on ``plan``, ``biases`` as in ``xla_forward``."""
  return lambda x, wu, wd, wg: dispatch.ffn_mosaic_gpu(x, wu, wd, wg, *biases, activation,
                                                       plan=plan)


def tokamax_forward(activation_fn):
  import tokamax  # noqa: PLC0415 -- optional, carried as wheels to the GPU machine

  def forward(x, wu, wd, wg):
    hidden = tokamax.gated_linear_unit(x, (wg, wu), activation=activation_fn,
                                       implementation="mosaic")
    return jnp.dot(hidden, wd, preferred_element_type=jnp.float32).astype(x.dtype)
  return forward


def mosaic_copy(x, wu, wd, wg):
  """A Mosaic GPU kernel that only copies x[:, :64] through SMEM: what any kernel launch costs in
  this harness (the floor under every decode kernel time)."""
  del wu, wd, wg

  def kernel(x_gmem, out_gmem, smem, barrier):
    plgpu.copy_gmem_to_smem(x_gmem.at[:, :64], smem, barrier.at[0])
    plgpu.barrier_wait(barrier.at[0])
    plgpu.copy_smem_to_gmem(smem, out_gmem)
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((x.shape[0], 64), x.dtype),
                      scratch_types=[plgpu.SMEM((x.shape[0], 64), x.dtype),
                                     plgpu.Barrier(num_barriers=1)])(x)


def decode_partials_only(activation: Activation, config: decode_sm90.DecodeConfig):
  """The decode kernel without the XLA sum of its partials (timing decomposition only)."""
  table = hinge_table.activation_table(activation)
  knots = 0 if activation.knots is None else activation.knots.shape[0]
  return lambda x, wu, wd, wg: decode_sm90.decode_ffn(
      x, wu, wg, None, None, table, wd, kind=activation.kind, num_knots=knots, config=config)


def training_loss(y, dy, dependent: bool = True):
  """⟨y, dy⟩ + ½‖y‖² (``dependent``) or ⟨y, dy⟩, y in f32. The first's cotangent dy + y needs the
  forward's output before the backward starts, as in a network whose later layers feed the loss;
  with ⟨y, dy⟩ alone XLA may run the forward's GEMM2 after the backward and take its h from the
  backward's elementwise pass (seen in the H200's compiled gpt2-small step of a plan that computed
  GEMM2's h in XLA from the saved residuals: its gains of the twelfth session, 2026-12-02, were
  that reuse; benchmarks/NOTES.md)."""
  y = y.astype(jnp.float32)
  return jnp.sum(y * dy) + (0.5 * jnp.sum(y * y) if dependent else 0.0)


def with_gradients(forward, dependent: bool = True):
  """fwd+bwd: ``training_loss(forward(...), dy)`` and its gradient w.r.t. x and every weight, for
  ``step(x, wu, wd, wg, dy)`` (sets from ``with_cotangents``). The value is returned so the
  forward runs as in training (``jax.grad`` alone lets XLA drop the forward's second GEMM, and the
  recompute path's whole forward kernel). dy is an input, not computed in the step: until
  2026-12-01 it was cos(arange) inside the step, a fusion of 38-51 us per step on the H200 at
  M = 8192 that both sides paid (results/backward-profile-2026-12-01.md)."""
  def step(x, wu, wd, wg, dy):
    loss = lambda *a: training_loss(forward(*a), dy, dependent)
    return jax.value_and_grad(loss, argnums=(0, 1, 2) if wg is None else (0, 1, 2, 3))(
        x, wu, wd, wg)
  return step


def with_pwl_gradients(forward_of, activation: Activation, dependent: bool = True):
  """``with_gradients``' step that also differentiates w.r.t. the PWL's slopes and intercepts
  (what fine-tuning with trainable PWLs pays): ``forward_of(activation)`` builds the forward."""
  def step(x, wu, wd, wg, dy):
    def loss(x, wu, wd, wg, slopes, intercepts):
      forward = forward_of(Activation("pwl", activation.knots, slopes, intercepts))
      return training_loss(forward(x, wu, wd, wg), dy, dependent)
    argnums = (0, 1, 2, 4, 5) if wg is None else (0, 1, 2, 3, 4, 5)
    return jax.value_and_grad(loss, argnums=argnums)(x, wu, wd, wg, activation.slopes,
                                                     activation.intercepts)
  return step


def with_cotangents(arg_sets: list[tuple]) -> list[tuple]:
  """Each (x, wu, wd, wg) set with a random f32 cotangent dy [M, D_out] appended."""
  return [(*args, jax.random.normal(jax.random.key(i), (args[0].shape[0], args[2].shape[1])))
          for i, args in enumerate(arg_sets)]


def relative_error(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(out)) else \
      float("inf")


def saved_residual_bytes(forward, args) -> int:
  """Bytes the forward keeps for the backward beyond arrays shaped like its inputs ([M, H] etc.)."""
  _, vjp = jax.vjp(lambda *a: forward(*a, args[3]), *args[:3])
  input_shapes = {tuple(a.shape) for a in args if a is not None}
  return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp)
             if hasattr(leaf, "nbytes") and tuple(leaf.shape) not in input_shapes)


def temp_bytes(fn, args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def matmul_peak(rec: Recorder, rng) -> float:
  n = 8192
  sets = [tuple(jnp.asarray(rng.standard_normal((n, n), np.float32), jnp.bfloat16)
                for _ in range(2)) for _ in range(2)]
  seconds = time_per_call(lambda a, b: a @ b, sets)
  tflops = 2 * n**3 / seconds / 1e12
  rec.add({"section": "ceiling", "what": "xla bf16 matmul 8192^3", "ms": seconds * 1e3,
           "tflops": tflops})
  return tflops


def bench_shape(rec: Recorder, shape: Shape, rng, peak_tflops: float, with_tokamax: bool,
                pwl_dtypes: tuple[str, ...], backward_chunks_mi: tuple[int, ...],
                residuals: tuple[str, ...], with_backward: bool = True,
                schedules: tuple[str, ...] = kernels.SCHEDULES,
                d_hiddens: tuple[str, ...] = ("float32",),
                hinges: tuple[str, ...] = kernels.HINGES, with_uniform_pwl: bool = False) -> dict:
  """Forward (and fwd+bwd) of one shape: XLA exact / PWL-16, the kernel plans, the library's plan
  with the exact activation; ``with_uniform_pwl``: also the library's plan and XLA with a
  64-segment uniform PWL (more accurate than PWL-16; the kernel evaluates it by table lookup,
  ``pwl_lookup``), summary keys "kernel_pwl64u" / "xla_pwl64u", and both in fwd+bwd (the dgrad
  kernel, where the plan has it, on the lookup table too: ``Plan.dgrad_lookup``)."""
  sets = make_sets(shape, rng)
  arg_sets = [as_args(s) for s in sets]
  pwl = ff.fit(shape.activation, 16)
  act_pwl, act_exact = to_kernel_activation(pwl), Activation(shape.activation)
  act_uniform = to_kernel_activation(ff.fit(shape.activation, 64, "uniform"))
  base = dict(section="forward", shape=shape.name, rows=shape.rows, d_model=shape.d_model,
              hidden=shape.hidden, glu=shape.glu, sets=len(sets))
  up = lambda a: None if a is None else a.astype(jnp.float32)
  checked = [("pwl", act_pwl), ("exact", act_exact)] + [("pwl64u", act_uniform)] * with_uniform_pwl
  reference = {name: jax.jit(xla_forward(act))(*map(up, arg_sets[0])) for name, act in checked}

  summary = {"shape": shape.name, "rows": shape.rows, "d_model": shape.d_model,
             "hidden": shape.hidden, "glu": shape.glu, "flops": shape.flops}
  runs = {}  # the forwards that compiled, timed together below

  def prepared(name, fn, act_name, **fields):
    """Compile ``fn`` and check it against the f32 reference; record it (or its error)."""
    def check():
      run, outputs = prepare(fn, arg_sets)
      runs[name] = run
      return dict(rel_err=relative_error(outputs[0], reference[act_name]))
    return rec.measure(name, check, **fields, **base)

  def time_together(names, written):
    """``interleaved_seconds`` of the prepared ``names``; the times of ``written`` go into their
    records (the others stay in this timing's own record)."""
    names = [name for name in names if name in runs]
    timing = rec.measure("forward timing, interleaved", lambda: interleaved_ms(
        {name: runs[name] for name in names}, len(arg_sets)), **base)
    for name, ms in timing.get("ms", {}).items():
      if name in written:
        tflops = shape.flops / ms / 1e9
        summary_records[name].update(ms=ms, tflops=tflops, pct_peak=100 * tflops / peak_tflops)

  summary_records = {
      "xla-exact": prepared("xla-exact", xla_forward(act_exact), "exact"),
      "xla-pwl16": prepared("xla-pwl16", xla_forward(act_pwl), "pwl")}
  plans = candidates(shape, pwl_dtypes, schedules, hinges)
  for name, plan in plans.items():
    if rec.over_budget():
      break
    summary_records[name] = prepared(name, kernel_forward(act_pwl, plan), "pwl",
                                     activation="pwl16")
  library = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model,
                                 shape.glu, True)
  if with_uniform_pwl and library.path != "xla" and not rec.over_budget():
    summary_records["xla-pwl64u"] = prepared("xla-pwl64u", xla_forward(act_uniform), "pwl64u")
    summary_records["library-pwl64u"] = prepared(
        "library-pwl64u", kernel_forward(act_uniform, library), "pwl64u",
        activation="pwl64-uniform",
        lookup=dispatch.with_pwl_lookup(library, act_uniform).pwl_lookup)
  if shape.glu and with_tokamax and not rec.over_budget():
    summary_records["tokamax-mosaic"] = prepared("tokamax-mosaic",
                                                 tokamax_forward(jax.nn.silu), "exact")
  time_together(list(summary_records), written=list(summary_records))
  accurate = [name for name in plans if "ms" in summary_records.get(name, {})
              and summary_records[name]["rel_err"] < 2e-2]
  best_name = min(accurate, key=lambda name: summary_records[name]["ms"], default=None)
  summary.update(xla_exact=summary_records["xla-exact"], xla_pwl=summary_records["xla-pwl16"],
                 best_plan=best_name, kernel_pwl=summary_records.get(best_name),
                 xla_pwl64u=summary_records.get("xla-pwl64u"),
                 kernel_pwl64u=summary_records.get("library-pwl64u"))
  if "tokamax-mosaic" in summary_records:
    summary["tokamax"] = summary_records["tokamax-mosaic"]
  if best_name and not rec.over_budget():  # with XLA exact again, in a round of their own
    exact_name = best_name + "+exact"
    summary_records[exact_name] = summary["kernel_exact"] = prepared(
        exact_name, kernel_forward(act_exact, plans[best_name]), "exact",
        activation=shape.activation)
    time_together([exact_name, "xla-exact"], written=[exact_name])
  if shape.rows <= dispatch.DECODE_ROWS and not rec.over_budget():
    probe = lambda fn: lambda: dict(ms=1e3 * time_per_call(fn, arg_sets))
    summary["probe:mosaic-copy"] = rec.measure("probe:mosaic-copy", probe(mosaic_copy), **base)
    if best_name and best_name.startswith("decode"):
      summary["probe:decode-partials"] = rec.measure(
          "probe:decode-partials-only",
          probe(decode_partials_only(act_pwl, plans[best_name].decode)), **base)

  if not with_backward:
    return summary
  backward_base = {**base, "section": "fwd+bwd"}
  variants = [("xla-exact", xla_forward(act_exact)), ("xla-pwl16", xla_forward(act_pwl))]
  train_plan = library
  if best_name and train_plan.path == "epilogue":  # the library's tuned plan, each residual kind
    train_name = epilogue_name(train_plan.epilogue)
    for kept in residuals:
      seen = set()
      kept_plan = dispatch.with_residuals(train_plan, shape.glu, kept)
      kept_name = epilogue_name(kept_plan.epilogue)
      for chunk_mi in backward_chunks_mi:
        for d_hidden in d_hiddens:
          plan = dataclasses.replace(kept_plan, backward_chunk_elements=chunk_mi * 2**20,
                                     d_hidden=d_hidden)
          # one variant per distinct program: budgets that give the same chunk width are one,
          # and the dgrad kernel's backward uses neither the chunk budget nor d_hidden
          program = "dgrad" if plan.backward == "epilogue" else (
              backward.chunk_columns(shape.rows, shape.hidden, chunk_mi * 2**20), d_hidden)
          if program not in seen:
            seen.add(program)
            # "-segments": the forward saves h and each element's segment (lookup_residuals)
            segments = "-segments" * (plan.backward == "epilogue" and plan.lookup_residuals)
            variants.append((f"{kept_name}-{kept[:5]}-{backward_name(plan)}{segments}",
                             kernel_forward(act_pwl, plan)))
    if "preactivations" in residuals:  # the backward's first GEMM with its epilogue kernel
      dgrad_plan = dataclasses.replace(train_plan, residuals="preactivations", backward="epilogue")
      variants.append((f"{train_name}+exact-preac-dgrad-kernel",
                       kernel_forward(act_exact, dgrad_plan)))
    if "floor-bits" in residuals:  # the floor-bits plan with the other backward than the plan's
      floor = dispatch.with_residuals(train_plan, shape.glu, "floor-bits")
      other = (dataclasses.replace(floor, backward="xla") if floor.backward == "epilogue" else
               dataclasses.replace(floor, backward="epilogue", dgrad=dispatch.DGRAD_PINGPONG))
      label = "chunked" if other.backward == "xla" else "dgrad-pp"
      variants.append((f"{epilogue_name(other.epilogue)}-floor-{label}",
                       kernel_forward(act_pwl, other)))
      if floor.backward == "epilogue" and floor.lookup_residuals:  # the dgrad kernel on floor bits
        variants.append((f"{epilogue_name(floor.epilogue)}-floor-dgrad",
                         kernel_forward(act_pwl, dataclasses.replace(floor,
                                                                     lookup_residuals=False))))
    exact_kept = "preactivations" if residuals[0] == "segments" else residuals[0]  # PWL only
    exact_plan = dataclasses.replace(train_plan, residuals=exact_kept,
                                     backward_chunk_elements=backward_chunks_mi[0] * 2**20)
    variants.append((f"{train_name}+exact-{exact_kept[:5]}-{backward_name(exact_plan)}",
                     kernel_forward(act_exact, exact_plan)))
    library_exact = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model,
                                         shape.glu, False)  # what ff.ffn runs for the exact one
    if library_exact.path == "epilogue":
      variants.append((f"{epilogue_name(library_exact.epilogue)}+exact-library-"
                       f"{library_exact.residuals[:5]}-{backward_name(library_exact)}",
                       kernel_forward(act_exact, library_exact)))
  if with_uniform_pwl and train_plan.path == "epilogue":  # lookup forward and dgrad
    variants += [("xla-pwl64u", xla_forward(act_uniform)),
                 ("pwl64u-library-lookup", kernel_forward(act_uniform, train_plan))]

  train_sets = with_cotangents(arg_sets)
  train_runs = {}
  for name, forward in variants:
    if rec.over_budget():
      break

    def train_prepared(step=with_gradients(forward), forward=forward, name=name):
      train_runs[name], _ = prepare(step, train_sets)
      return dict(temp_mb=temp_bytes(step, train_sets[0]) / 2**20,
                  saved_mb=saved_residual_bytes(forward, arg_sets[0]) / 2**20)
    summary[f"train:{name}"] = rec.measure(name, train_prepared, **backward_base)
  timing = rec.measure("fwd+bwd timing, interleaved",
                       lambda: interleaved_ms(train_runs, len(train_sets)), **backward_base)
  for name, ms in timing.get("ms", {}).items():
    summary[f"train:{name}"].update(ms=ms, tflops=3 * shape.flops / ms / 1e9)
  kernel_trains = [r for key, r in summary.items()
                   if key.startswith("train:epilogue") and "+exact" not in key and r and "ms" in r]
  if kernel_trains:
    summary["train:kernel-best"] = min(kernel_trains, key=lambda r: r["ms"])
  return summary


def backward_name(plan: dispatch.Plan) -> str:
  """How a training variant's backward runs: "dgrad" (the dgrad kernel) or "bwd<budget>Mi"
  (chunked, with "-dh16" when its d_hidden is in x's dtype)."""
  if plan.backward == "epilogue":
    return "dgrad"
  return f"bwd{plan.backward_chunk_elements // 2**20}Mi" + (
      "" if plan.d_hidden == "float32" else "-dh16")


def ratio(numerator: dict | None, denominator: dict | None) -> str:
  if not numerator or not denominator or "ms" not in numerator or "ms" not in denominator:
    return "—"
  return f"{numerator['ms'] / denominator['ms']:.2f}x"


def markdown(summaries: list[dict], device: str, peak: float) -> str:
  lines = [f"# Hopper FFN kernels vs XLA on {device}", "",
           f"Command: `python3 {' '.join(sys.argv)}`", "",
           f"Measured bf16 matmul peak (XLA, 8192^3): {peak:.0f} TF/s. Kernel activation: "
           "16-segment PWL; ratios are XLA time / kernel time (> 1: the kernel wins).", "",
           "| shape | M | plan | fwd ms | TF/s | % peak | vs XLA exact | vs XLA PWL | vs tokamax "
           "| kernel exact-act ms | rel err | fwd+bwd ms | vs XLA exact | temp MB (XLA) "
           "| saved MB (XLA) |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for s in summaries:
    k = s.get("kernel_pwl") or {}
    plan = s.get("best_plan")
    train_k = s.get("train:kernel-best") or {}
    train_x = s.get("train:xla-exact") or {}
    tokamax = s.get("tokamax")
    fmt = lambda d, key, spec: format(d[key], spec) if d and key in d else "—"
    lines.append(
        f"| {s['shape']} | {s['rows']} | {plan or 'none'} | {fmt(k, 'ms', '.4f')} "
        f"| {fmt(k, 'tflops', '.0f')} | {fmt(k, 'pct_peak', '.0f')} "
        f"| {ratio(s.get('xla_exact'), k)} | {ratio(s.get('xla_pwl'), k)} "
        f"| {ratio(tokamax, k) if tokamax else '—'} | {fmt(s.get('kernel_exact'), 'ms', '.4f')} "
        f"| {fmt(k, 'rel_err', '.1e')} | {fmt(train_k, 'ms', '.3f')} | {ratio(train_x, train_k)} "
        f"| {fmt(train_k, 'temp_mb', '.0f')} ({fmt(train_x, 'temp_mb', '.0f')}) "
        f"| {fmt(train_k, 'saved_mb', '.0f')} ({fmt(train_x, 'saved_mb', '.0f')}) |")
  uniform = [s for s in summaries if s.get("kernel_pwl64u")]
  if uniform:
    lines += ["", "## Forward with a 64-segment uniform PWL (the library's plan; table lookup)", "",
              "| shape | lookup | fwd ms | vs XLA exact | vs XLA same PWL | rel err |",
              "|---|---|---:|---:|---:|---:|"]
    for s in uniform:
      k = s["kernel_pwl64u"]
      lines.append(f"| {s['shape']} | {k.get('lookup')} | {fmt_ms(k)} "
                   f"| {ratio(s.get('xla_exact'), k)} | {ratio(s.get('xla_pwl64u'), k)} "
                   f"| {format(k['rel_err'], '.1e') if 'rel_err' in k else '—'} |")
  lines += ["", "## Forward + backward variants", "",
            "| shape | variant | fwd+bwd ms | vs XLA exact | temp MB | saved for bwd MB |",
            "|---|---|---:|---:|---:|---:|"]
  for s in summaries:
    for key, record in s.items():
      if key.startswith("train:") and key != "train:kernel-best" and record and "ms" in record:
        lines.append(f"| {s['shape']} | {key[6:]} | {record['ms']:.3f} "
                     f"| {ratio(s.get('train:xla-exact'), record)} | {record['temp_mb']:.0f} "
                     f"| {record['saved_mb']:.0f} |")
  probes = [f"{s['shape']} {key[6:]} {fmt_ms(record)}" for s in summaries
            for key, record in s.items() if key.startswith("probe:")]
  if probes:
    lines += ["", "Decode probes (ms; mosaic-copy: a kernel that only copies x, i.e. the launch "
              "cost in this harness; decode-partials-only: the decode kernel without the XLA sum "
              "of its partials): " + "; ".join(probes)]
  lines += ["", "XLA reference times (ms): " + "; ".join(
      f"{s['shape']} exact {fmt_ms(s.get('xla_exact'))} / PWL {fmt_ms(s.get('xla_pwl'))}"
      for s in summaries), ""]
  return "\n".join(lines)


def fmt_ms(record: dict | None) -> str:
  return f"{record['ms']:.4f}" if record and "ms" in record else "—"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--budget-s", type=float, default=420.0)
  parser.add_argument("--shapes", default=",".join(s.name for s in SHAPES))
  parser.add_argument("--tokamax", action="store_true",
                      help="also time tokamax's Mosaic GLU (its autotuner adds ~50 s a shape)")
  parser.add_argument("--backward-chunks", default="16,64",
                      help="fwd+bwd is timed with each backward chunk budget (Mi elements)")
  parser.add_argument("--forward-only", action="store_true", help="skip the fwd+bwd timings")
  parser.add_argument("--uniform-pwl", action="store_true",
                      help="also time a 64-segment uniform PWL (table lookup) on the library plan")
  parser.add_argument("--residuals", default="recompute,preactivations",
                      help=f"fwd+bwd is timed with each of {dispatch.RESIDUALS}")
  parser.add_argument("--schedules", default=",".join(kernels.SCHEDULES),
                      help="epilogue-kernel schedules among the forward candidates")
  parser.add_argument("--pwl-dtypes", default="float32,float16",
                      help="PWL hinge arithmetic among the forward candidates")
  parser.add_argument("--hinges", default=",".join(kernels.HINGES),
                      help="forms of the f16 PWL hinges among the forward candidates")
  parser.add_argument("--d-hidden", default="float32",
                      help=f"fwd+bwd is timed with each backward d_hidden dtype of "
                           f"{dispatch.D_HIDDEN} (suffix -dh16: x's dtype)")
  args = parser.parse_args(argv)
  wanted = args.shapes.split(",")
  by_name = {shape.name: shape for shape in SHAPES}
  unknown = [name for name in wanted if name not in by_name]
  if unknown:
    parser.error(f"--shapes: unknown {unknown}; expected some of {sorted(by_name)}")
  for flag, given, allowed in (("--residuals", args.residuals, dispatch.RESIDUALS),
                               ("--d-hidden", args.d_hidden, dispatch.D_HIDDEN)):
    bad = [value for value in given.split(",") if value not in allowed]
    if bad:
      parser.error(f"{flag}: unknown {bad}; expected some of {allowed}")
  device = jax.devices()[0]
  device_name = getattr(device, "device_kind", device.platform).replace("NVIDIA ", "").lower()
  stem = f"{device_name.replace(' ', '-')}-{datetime.date.today().isoformat()}"
  os.makedirs(args.out, exist_ok=True)
  rec = Recorder(args.out, stem, args.budget_s)
  rec.add({"section": "env", "device": str(device.device_kind), "jax": jax.__version__,
           "capability": getattr(device, "compute_capability", None)})
  rng = np.random.default_rng(int(time.time()))
  peak = matmul_peak(rec, rng)
  summaries = []
  pwl_dtypes = tuple(args.pwl_dtypes.split(","))  # narrowed to the winner once both compared
  for shape in (by_name[name] for name in wanted):  # in the order asked for
    if not rec.over_budget():
      summary = bench_shape(rec, shape, rng, peak, args.tokamax, pwl_dtypes,
                            tuple(int(c) for c in args.backward_chunks.split(",")),
                            tuple(args.residuals.split(",")), not args.forward_only,
                            tuple(args.schedules.split(",")), tuple(args.d_hidden.split(",")),
                            tuple(args.hinges.split(",")), args.uniform_pwl)
      summaries.append(summary)
      if len(pwl_dtypes) == 2 and (summary.get("best_plan") or "").startswith("epilogue"):
        pwl_dtypes = ("float16",) if "-16" in summary["best_plan"] else ("float32",)
  print(write_json_and_markdown(
      args.out, stem, {"peak_tflops": peak, "summaries": summaries, "records": rec.records},
      [markdown(summaries, str(device.device_kind), peak).rstrip("\n")]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
