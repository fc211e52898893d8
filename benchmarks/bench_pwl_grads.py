"""What the PWL-parameter gradients cost in a training step (run on the GPU).

    PYTHONPATH=$PWD python3 benchmarks/bench_pwl_grads.py --out $OUT [--rows 4096] [--fit pwl16]
        [--only REGEX]

Times, at SmolLM2's FFN (576/1536 GLU, M = --rows, bf16, SiLU's PWL --fit) on the default path:
  * ``pwl_segment_sums`` alone on [M, H] f32 inputs, as the library writes it, in the other XLA
    forms and as the Mosaic GPU kernel (``SEGMENT_SUMS``; each checked to give the same sums),
    for evenly spaced knots also ``segment_sums_lookup`` (and a training step with it);
  * loss + gradients of the FFN w.r.t. x and the weights, and additionally w.r.t. the PWL values and
    tail slopes (what ``trainable="ffn"`` fine-tuning asks for), with the XLA segment sums and with
    the kernel on the joined f32 pre-activation (``Plan(segment_sums="kernel")``), and with the
    kernel reading the saved residuals (``"kernel-residuals"``, the default plan's since
    2026-12-02), against XLA's exact FFN.
Each section's variants are compiled first, then timed round-robin (``bench_gpu.
interleaved_seconds``). Writes ``pwl-grads-<date>-<fit>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.activation import pwl_segment_sums, segment_bands
from pallas_kernels.gpu import dispatch, segment_sums_sm90

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import interleaved_seconds, prepare, training_loss  # noqa: E402


def _one_hot_segments(x, knots, axis: int):
  """[.., K+1, ..] indicator of seg(x) = j along ``axis`` (0: leading, -1: trailing)."""
  shape = [1] * (x.ndim + 1)
  shape[axis] = -1
  at_or_above = jnp.expand_dims(x, axis) >= jnp.asarray(knots, x.dtype).reshape(shape)  # K
  always = jnp.ones_like(jnp.take(at_or_above, jnp.array([0]), axis=axis))
  return (jnp.concatenate([always, at_or_above], axis)
          & ~jnp.concatenate([at_or_above, ~always], axis))


def segment_sums_one_hot(x, g, knots, axis: int = -1):
  """The library's form until 2026-12-01: reduce a [..., K+1] segment indicator (``axis=-1``,
  one column reduction) or a [K+1, ...] one (``axis=0``, K+1 row reductions)."""
  in_segment = _one_hot_segments(x, knots, axis)
  reduced = tuple(i for i in range(x.ndim + 1) if i != (axis % (x.ndim + 1)))
  return (jnp.sum(jnp.where(in_segment, jnp.expand_dims(g * x, axis), 0.0), axis=reduced),
          jnp.sum(jnp.where(in_segment, jnp.expand_dims(g, axis), 0.0), axis=reduced))


def segment_sums_separate(x, g, knots):
  """The cumulative form without integer counts (empty segments may get a rounding residue
  instead of 0)."""
  def segments(v):
    above = jnp.stack([jnp.sum(jnp.where(x >= t, v, 0.0)) for t in jnp.asarray(knots, x.dtype)])
    cumulative = jnp.concatenate([jnp.sum(v)[None], above, jnp.zeros((1,), v.dtype)])
    return cumulative[:-1] - cumulative[1:]
  return segments(g * x), segments(g)


def segment_sums_broadcast(x, g, knots):
  """Cumulative sums in one reduction over a broadcast [..., K+1] (the library's form during the
  first 2026-12-01 session; exact for empty segments because every S_k comes out of the same
  reduction)."""
  knots = jnp.asarray(knots, x.dtype)
  counted = jnp.concatenate([jnp.ones(x.shape + (1,), bool), x[..., None] >= knots], -1)

  def per_segment(v):
    cumulative = jnp.sum(jnp.where(counted, v[..., None], 0.0), axis=tuple(range(x.ndim)))
    return cumulative - jnp.concatenate([cumulative[1:], jnp.zeros((1,), cumulative.dtype)])
  return per_segment(g * x), per_segment(g)


def segment_sums_counted(x, g, knots):
  """The library's form in the third and fourth 2026-12-01 sessions: cumulative sums
  S_k = Σ_{x >= t_k} v as K separate reductions, segment j = S_{j-1} - S_j, and integer counts to
  zero the empty segments exactly."""
  at_or_above = [x >= t for t in jnp.asarray(knots, x.dtype)]

  def per_segment(v, total):
    cumulative = jnp.stack([total] + [jnp.sum(jnp.where(above, v, 0)) for above in at_or_above]
                           + [jnp.zeros((), total.dtype)])
    return cumulative[:-1] - cumulative[1:]

  counts = per_segment(jnp.ones(x.shape, jnp.int32), jnp.asarray(x.size, jnp.int32))
  exact = lambda v: jnp.where(counts == 0, 0.0, per_segment(v, jnp.sum(v)))
  return exact(g * x), exact(g)


def segment_sums_bands(x, g, knots, rows_first: bool = False):
  """The library's band reductions without its optimization barrier. ``rows_first``: each band
  reduced over rows into [H] partials, then over H. On the H200 as fast alone as the library's
  (0.228 ms), inside the FFN's training step much slower (0.690 vs 0.448 ms; likely XLA
  recomputing the producers of x and g inside the reduction fusion, HLO not inspected)."""
  bands = segment_bands(x, jnp.asarray(knots, x.dtype))
  total = (lambda v: jnp.sum(jnp.sum(v, axis=0))) if rows_first else jnp.sum
  per_segment = lambda v: jnp.stack([total(jnp.where(band, v, 0.0)) for band in bands])
  return per_segment(g * x), per_segment(g)


SEGMENT_SUMS = {
    "segment-sums (library: K+1 band reductions behind an optimization barrier)": pwl_segment_sums,
    "segment-sums (K cumulative reductions, empty segments zeroed by counts)": segment_sums_counted,
    "segment-sums (K+1 band reductions, exact zeros without counts)": segment_sums_bands,
    "segment-sums (K+1 band reductions, rows first)":
        lambda x, g, knots: segment_sums_bands(x, g, knots, rows_first=True),
    "segment-sums (cumulative, one reduction over [M, H, K+1])": segment_sums_broadcast,
    "segment-sums (one-hot [M, H, K+1], the library until 2026-12-01)": segment_sums_one_hot,
    "segment-sums (one-hot [K+1, M, H])": lambda x, g, knots: segment_sums_one_hot(x, g, knots, 0),
    "segment-sums (K separate reductions, no counts: not exact for empty segments)":
        segment_sums_separate,
    **{f"segment-sums (Mosaic GPU kernel, one pass, [{rows}, 128] register slices)":
       functools.partial(segment_sums_sm90.segment_sums, sub_rows=rows) for rows in (2, 1, 4)},
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--rows", type=int, default=4096)
  parser.add_argument("--fit", default="pwl16",
                      help="the PWL of SiLU as a spec: pwl16, pwl64-uniform (evenly spaced: the "
                           "forward kernel's table lookup, knots moving together), ...")
  parser.add_argument("--only", default="",
                      help="a regular expression: time only the variants whose names match")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  rows, d_model, hidden = args.rows, 576, 1536
  pwl = ff.from_spec(args.fit, "silu")
  act = to_kernel_activation(pwl)
  results, errors = {}, {}

  draw = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))
  pre_sets = [(draw(rows, hidden) * 3, draw(rows, hidden)) for _ in range(3)]
  expected = pwl_segment_sums(*pre_sets[0], act.knots)
  _, lines_vjp = jax.vjp(lambda *leaves: (lambda p: (p.slopes(), p.intercepts()))(
      ff.PiecewiseLinear(pwl.knots, *leaves, evenly_spaced=pwl.evenly_spaced)),
      pwl.values, pwl.left_slope, pwl.right_slope)
  # d(values, left slope, right slope) from the per-segment sums d/ds_j, d/dc_j
  parameter_gradients = lambda sums: lines_vjp(tuple(jnp.asarray(v, jnp.float32) for v in sums))
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu:
    print("not a GPU: the Mosaic GPU segment-sum kernel variants are skipped", flush=True)
  record = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(),
            "rows": rows, "d_model": d_model, "hidden": hidden, "fit": args.fit, "ms": results,
            "errors": errors,
            "command": "python3 benchmarks/bench_pwl_grads.py " + " ".join(argv or sys.argv[1:])}
  os.makedirs(args.out, exist_ok=True)
  out_path = os.path.join(args.out, f"pwl-grads-{record['date']}-{args.fit}.json")

  runs = {}

  def save():
    with open(out_path, "w") as f:
      json.dump(record, f, indent=1)

  def compile_variant(name, fn, sets, check=None):
    """Compile ``fn`` over ``sets`` (and ``check`` its first output); a variant that fails (e.g.
    a kernel that does not compile) is recorded with its error instead of stopping the others."""
    try:
      runs[name], outputs = prepare(fn, sets)
      if check:
        check(outputs[0])
    except Exception as error:  # noqa: BLE001 -- recorded, printed and reported in the table
      runs.pop(name, None)
      errors[name] = f"{type(error).__name__}: {str(error)[:400]}"
      print(f"{name}: FAILED {errors[name]}", flush=True)
      save()

  def time_together(names, sets):
    """The compiled ``names`` timed round-robin (``interleaved_seconds``), then the JSON."""
    timed = interleaved_seconds({name: runs[name] for name in names if name in runs}, len(sets))
    for name, seconds in timed.items():
      results[name] = 1e3 * seconds
      print(f"{name}: {results[name]:.4f} ms", flush=True)
    save()

  def same_gradients(got):
    """Every variant gives the PWL values and tail slopes the same gradients. Not the raw sums:
    a p within rounding of a knot may land on either side of it (the lookup's fma and floor vs
    the bands' compares, 9 of 66 sums off by up to 0.5% on the H200), which moves (g p, g)
    between two segments but not the gradients - the PWL is continuous there."""
    for a, b in zip(parameter_gradients(got), parameter_gradients(expected)):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-3, atol=1e-4 * np.abs(np.asarray(b)).max())

  sums_variants = dict(SEGMENT_SUMS)
  if pwl.evenly_spaced:  # O(1) per element: each element's segment by the lookup, SMEM bins
    sums_variants["segment-sums (Mosaic GPU kernel, lookup into per-thread bins)"] = (
        segment_sums_sm90.segment_sums_lookup)
  wanted = lambda name: re.search(args.only, name) is not None
  sums_variants = {name: fn for name, fn in sums_variants.items() if wanted(name)}
  for name, fn in sums_variants.items():
    if "Mosaic GPU kernel" in name and not on_gpu:
      continue
    compile_variant(name, lambda x, g, fn=fn: fn(x, g, act.knots), pre_sets, same_gradients)
  time_together(sums_variants, pre_sets)

  bf16 = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(s[0]), jnp.bfloat16)
  weights = dict(w_up=bf16(d_model, hidden), w_gate=bf16(d_model, hidden),
                 w_down=bf16(hidden, d_model))
  # Weights are jit arguments: closed over, XLA constant-folds the backward's GEMMs at compile time.
  sets = [(jnp.asarray(rng.standard_normal((rows, d_model)), jnp.bfloat16), weights["w_up"],
           weights["w_gate"], weights["w_down"], pwl.values, pwl.left_slope, pwl.right_slope)
          for _ in range(3)]
  dy = jnp.cos(jnp.arange(rows * d_model, dtype=jnp.float32)).reshape(rows, d_model)

  def step(activation_of, argnums, implementation=None, plan=None):
    def loss(x, w_up, w_gate, w_down, *pwl_leaves):
      activation = activation_of(*pwl_leaves)
      out = (ff.ffn(x, w_up, w_down, w_gate=w_gate, activation=activation,
                    implementation=implementation) if plan is None else
             dispatch.ffn_mosaic_gpu(x, w_up, w_down, w_gate, None, None, None,
                                     to_kernel_activation(activation), plan=plan))
      return training_loss(out, dy)  # the backward needs the forward's output, as in training
    return jax.value_and_grad(loss, argnums=argnums)

  learnable = lambda *leaves: ff.PiecewiseLinear(pwl.knots, *leaves,
                                                 evenly_spaced=pwl.evenly_spaced)
  variants = {
      "xla exact SiLU, d(x, W)": step(lambda *_: "silu", (0, 1, 2, 3), "xla"),
      f"default path {args.fit}, d(x, W)": step(learnable, (0, 1, 2, 3)),
      f"default path {args.fit}, d(x, W, PWL values and tail slopes)": step(
          learnable, (0, 1, 2, 3, 4, 5, 6)),
  }
  if on_gpu:
    default = dispatch.choose_plan(rows, d_model, hidden, d_model, True, True)
    for kind, what in (("xla", "XLA segment sums"),
                       ("kernel", "the kernel on the joined f32 pre-activation"),
                       ("kernel-residuals", "the kernel reading the saved residuals")):
      variants[f"default plan with {what}, d(x, W, PWL values and tail slopes)"] = step(
          learnable, (0, 1, 2, 3, 4, 5, 6),
          plan=dataclasses.replace(default, segment_sums=kind))
    if pwl.evenly_spaced:
      variants["default plan with the lookup's segment sums, d(x, W, PWL values and tail "
               "slopes)"] = step(learnable, (0, 1, 2, 3, 4, 5, 6), plan=dataclasses.replace(
                   default, pwl_lookup=True, segment_lookup=True))
    # the plans before SmolLM2's moved to ping-pong tiles (2026-12-02) and to floor bits
    variants["cooperative 64x128 tiles saving floor bits, d(x, W, PWL values and tail slopes)"] = (
        step(learnable, (0, 1, 2, 3, 4, 5, 6), plan=dispatch.EPILOGUE_GLU_F16))
    variants["cooperative 64x128 tiles saving pairs, kernel sums, d(x, W, PWL values and tail "
             "slopes)"] = step(learnable, (0, 1, 2, 3, 4, 5, 6), plan=dataclasses.replace(
                 dispatch.EPILOGUE_GLU_F16, residuals="preactivations", segment_sums="kernel"))
  variants = {name: fn for name, fn in variants.items() if wanted(name)}
  for name, fn in variants.items():
    compile_variant(name, fn, sets)
  time_together(variants, sets)

  print("\n| variant | ms |\n|---|---:|")
  for name, ms in results.items():
    print(f"| {name} | {ms:.4f} |")
  for name, error in errors.items():
    print(f"| {name} | failed: {error[:120]} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
