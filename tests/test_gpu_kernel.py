"""The Hopper (Mosaic GPU) FFN kernels against the XLA reference.

Three kinds of test:
  * CPU: the kernels run in Pallas' GPU interpret mode (TMA copies, wgmma, barriers and the three
    warpgroups simulated on the host) -- forward and every gradient on odd shapes; Mosaic GPU
    lowering for the benchmark shapes via ``jax.export(platforms=["cuda"])`` (no GPU needed); the
    chunked recompute backward; dispatch and fallback.
  * GPU (Hopper only, skipped elsewhere): the same comparisons on the real kernels, including the
    public ``ff.ffn`` dispatch, NaN propagation and the float32 fallback.

GPU interpret mode needs at least 3 XLA:CPU callback threads; tests/conftest.py sets PJRT_NPROC
before the CPU backend starts (see there).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from unittest import mock

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # race detector's result

import flashffn_jax as ff
from flashffn_jax.ops import reference_ffn, to_kernel_activation
from pallas_kernels.activation import (Activation, evenly_spaced, lookup_header, lookup_segment,
                                       pwl_select)
from pallas_kernels.gpu import (backward, decode_sm90, dgrad_sm90, dispatch, hinge_table,
                                packed_pwl, pwl_lookup, fused_ffn_sm90 as kernels,
                                segment_sums_sm90)
from tests.conftest import relative_error
from tests.preactivations import f32_preactivations, knots_clear_of

ON_HOPPER = (jax.default_backend() == "gpu"
             and getattr(jax.devices()[0], "compute_capability", None) == "9.0")
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an NVIDIA Hopper GPU (sm_90)")
needs_interpret_threads = pytest.mark.skipif(
    int(os.environ.get("PJRT_NPROC", os.cpu_count())) < 3,
    reason="the CPU backend started before PJRT_NPROC could be set; GPU interpret mode needs "
           ">= 3 XLA:CPU callback threads")
on_cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU interpret-mode test")
BF16_TOLERANCE = 1e-2  # ‖out − ref‖/‖ref‖ for bf16 operands, f32 accumulation

FUSED_SMALL = dispatch.Plan("fused", fused=kernels.FusedConfig(block_h=64, stages=2, h_splits=1))
FUSED_SPLIT = dispatch.Plan("fused", fused=kernels.FusedConfig(block_h=64, stages=2, h_splits=2))


def make_problem(rng, rows, d_model, hidden, d_out, glu, bias, dtype=jnp.bfloat16):
  """Random FFN inputs, weights scaled by 1/sqrt(fan-in) so activations stay O(1)."""
  draw = lambda *shape: rng.normal(size=shape) / np.sqrt(shape[0] if len(shape) > 1 else 4)
  arrays = dict(x=rng.normal(size=(rows, d_model)), w_up=draw(d_model, hidden),
                w_down=draw(hidden, d_out), w_gate=draw(d_model, hidden) if glu else None,
                b_up=draw(hidden) if bias else None, b_gate=draw(hidden) if bias and glu else None,
                b_down=draw(d_out) if bias else None)
  return {k: None if v is None else jnp.asarray(v, dtype) for k, v in arrays.items()}


def cuda_module(fn, *specs) -> str:
  """The text of ``fn``'s program (jitted) lowered for cuda, Mosaic GPU kernels included: what
  the lowering tests search, no GPU needed."""
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*specs).mlir_module()


def kernel_activation(name: str, glu: bool) -> Activation:
  """An exact activation by name, "pwl": a 16-segment fit of SiLU (GLU) / GELU (MLP), or "pwl15":
  that fit with its knots rounded to 15 significant bits (what residuals="floor-bits" keeps
  exact; the op rounds other knots so, and the f32 reference would not); "pwl-tanh" /
  "pwl15-tanh": the same of tanh, whose tails' intercepts differ (-1, 1), so the hinge table's
  two constants do too (c = 1 for max hinges, c_0 = -1 for relu hinges; both 0 for the SiLU and
  GELU fits, which cannot tell them apart); "pwl64u" / "pwl16u": a 64- / 16-segment fit with
  evenly spaced knots (dyadic: on the floor-bits grid too), which the epilogue may evaluate by
  lookup."""
  base, _, fitted = name.partition("-")
  if base not in ("pwl", "pwl15", "pwl64u", "pwl16u"):
    return to_kernel_activation(name)
  segments, method = {"pwl64u": (64, "uniform"), "pwl16u": (16, "uniform")}.get(
      base, (16, "optimal"))
  pwl = ff.fit(fitted or ("silu" if glu else "gelu"), segments, method)
  if base == "pwl15":
    pwl = ff.PiecewiseLinear.create(backward.snap_knots(pwl.knots), pwl.values, pwl.left_slope,
                                    pwl.right_slope)
  return to_kernel_activation(pwl)


ARG_NAMES = ("x", "w_up", "w_down", "w_gate", "b_up", "b_gate", "b_down")


def record_saves(monkeypatch) -> list:
  """A list that collects the ``saves`` (what the forward kernel writes for the backward) of
  every ``dispatch._forward`` call from here on (None: an inference forward)."""
  saves = []
  real = dispatch._forward
  monkeypatch.setattr(dispatch, "_forward",
                      lambda *a, **k: saves.append(k.get("saves")) or real(*a, **k))
  return saves


def loss_and_grads(fn, problem, activation, dy, pwl_gradients=True):
  """(⟨fn(...), dy⟩, fn(...)) and the gradient of the first w.r.t. every array argument and
  (``pwl_gradients``) the PWL slopes and intercepts; fn(...) is the output of the differentiated
  (training) forward."""
  arrays = [problem[name] for name in ARG_NAMES]
  present = [i for i, a in enumerate(arrays) if a is not None]
  pwl = activation.kind == "pwl" and pwl_gradients
  params = (activation.slopes, activation.intercepts) if pwl else ()

  def loss(*flat):
    args = list(arrays)
    for i, value in zip(present, flat):
      args[i] = value
    act = Activation("pwl", activation.knots, *flat[len(present):]) if pwl else activation
    out = fn(*args, act)
    return jnp.sum(out.astype(jnp.float32) * dy.astype(jnp.float32)), out

  flat = [arrays[i] for i in present] + list(params)
  return jax.value_and_grad(loss, argnums=tuple(range(len(flat))), has_aux=True)(*flat)


def reference_in_float32(*args, segments_in=jnp.float32, residuals_in=jnp.float32):
  """The XLA reference with every array upcast to float32 (the bf16 kernels' target); a PWL's
  segment found by comparing p and the knots rounded to ``segments_in`` (float16: what a forward
  counting knots on f16 pairs sees, so p within ~2^-11 |t_k| of a knot may take the
  neighbouring line, with that line's gradients); with ``residuals_in`` the PWL's input p and a
  GLU's up projection u rounded to that dtype before the lines and the product (what a backward
  reading them saved in that dtype differentiates: the dgrad kernel's bins sum d_a p and d_a
  with d_a = dh u; their sums cancel, so u's bf16 rounding alone moved ‖d intercepts‖ by 1.0%
  in one CI run), the segments still found on the unrounded p."""
  *arrays, activation = args
  up = [None if a is None else a.astype(jnp.float32) for a in arrays]
  f32 = jnp.dtype(jnp.float32)
  if activation.kind != "pwl" or jnp.dtype(segments_in) == jnp.dtype(residuals_in) == f32:
    return reference_ffn(*up, activation, precision=jax.lax.Precision.HIGHEST)
  # the compares on rounded values, the lines (and their gradients' sums) in f32
  rounded_to = lambda dtype: lambda v: v.astype(dtype).astype(jnp.float32)
  segment_values, residual = rounded_to(segments_in), rounded_to(residuals_in)
  pwl = activation

  def lines(p):
    slope, intercept = pwl_select(segment_values(p), segment_values(pwl.knots), pwl.slopes,
                                  pwl.intercepts)
    return slope * residual(p) + intercept

  x, w_up, w_down, w_gate, b_up, b_gate, b_down = up
  if jnp.dtype(residuals_in) == f32:
    return reference_ffn(*up, Activation("callable", fn=lines),
                         precision=jax.lax.Precision.HIGHEST)
  highest = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)
  linear = lambda w, b: highest(x, w) + (0 if b is None else b)
  u = linear(w_up, b_up)
  hidden = lines(u) if w_gate is None else lines(linear(w_gate, b_gate)) * residual(u)
  return highest(hidden, w_down) + (0 if b_down is None else b_down)


def trained_saves(problem, activation, plan):
  """What the forward of the op's training step with ``activation`` trained saves
  (``dispatch.training_choice``) and its plan; ``plan`` None: the public op's
  (``dispatch.resolve_plan``)."""
  x, glu = problem["x"], problem["w_gate"] is not None
  if plan is None:
    plan = dispatch.resolve_plan(x, problem["w_up"], problem["w_down"], problem["w_gate"],
                                 activation, None)
  _, saves = dispatch.training_choice(plan, "pwl", activation.knots.shape[0], glu, x.dtype,
                                      pwl_trained=True)
  return plan, saves


def segments_seen(problem, activation, plan) -> jnp.dtype:
  """Where the op's training step with ``activation`` trained finds the segments whose lines'
  gradients it sums: float16 where the forward counts the knots on f16 pairs for the dgrad
  kernel's bins (``LOOKUP_SEGMENT_INPUTS`` on f16 PWL math), else float32."""
  if activation.kind != "pwl":
    return jnp.dtype(jnp.float32)
  plan, saves = trained_saves(problem, activation, plan)
  counted_f16 = (saves == kernels.LOOKUP_SEGMENT_INPUTS and not plan.dgrad_lookup
                 and jnp.dtype(plan.epilogue.pwl_dtype) == jnp.float16)
  return jnp.dtype(jnp.float16 if counted_f16 else jnp.float32)


def residuals_seen(problem, activation, plan) -> jnp.dtype:
  """The dtype in which the op's training step with ``activation`` trained hands the dgrad
  kernel's bins the PWL's input (and a GLU's u): x's where the forward saves
  ``LOOKUP_SEGMENT_INPUTS``, else float32 (the other backwards read p to >= 15 bits)."""
  if activation.kind != "pwl":
    return jnp.dtype(jnp.float32)
  _, saves = trained_saves(problem, activation, plan)
  return jnp.dtype(problem["x"].dtype if saves == kernels.LOOKUP_SEGMENT_INPUTS else jnp.float32)


def check_against_reference(problem, activation, plan, pwl_gradients=True):
  """Forward output (inference, and the training forward that saves residuals) and all gradients
  of the kernel path vs the float32 XLA reference (a PWL's parameters' only with
  ``pwl_gradients``: without, a dgrad plan runs its kernel), its PWL segments found as the
  kernels find them (``segments_seen``), the gradients from its residuals as the backward reads
  them (``residuals_seen``); ``plan`` None: the public op's own
  choice (``ffn_mosaic_gpu``). A PWL's knots are first moved clear of the pre-activations
  (``knots_clear_of``)."""
  activation = knots_clear_of(activation, problem)
  segments_in, residuals_in = ((segments_seen(problem, activation, plan),
                                residuals_seen(problem, activation, plan))
                               if pwl_gradients else (jnp.float32, jnp.float32))
  rows, d_out = problem["x"].shape[0], problem["w_down"].shape[1]
  dy = jnp.asarray(np.random.default_rng(0).normal(size=(rows, d_out)), jnp.bfloat16)
  if plan is None:
    ours = lambda *args: dispatch.ffn_mosaic_gpu(*args)
  else:
    ours = lambda *args: dispatch._ffn(plan, args[-1].kind, None, *args[:-1], args[-1].knots,
                                       args[-1].slopes, args[-1].intercepts, None)
  out = jax.jit(lambda *a: ours(*a, activation))(*[problem[n] for n in ARG_NAMES])
  reference = functools.partial(reference_in_float32, segments_in=segments_in)
  expected = jax.jit(lambda *a: reference(*a, activation))(
      *[problem[n] for n in ARG_NAMES])
  assert out.dtype == problem["x"].dtype and out.shape == expected.shape
  assert relative_error(out, expected) < BF16_TOLERANCE
  (_, trained_out), grads = jax.jit(lambda d: loss_and_grads(ours, problem, activation, d,
                                                             pwl_gradients))(dy)
  assert relative_error(trained_out, expected) < BF16_TOLERANCE  # the forward a VJP runs
  # the gradients of the forward the backward reads: its residuals as saved
  backward_reference = functools.partial(reference, residuals_in=residuals_in)
  _, expected_grads = jax.jit(lambda d: loss_and_grads(backward_reference, problem, activation,
                                                       d, pwl_gradients))(dy)
  assert len(grads) == len(expected_grads)
  for index, (got, want) in enumerate(zip(grads, expected_grads)):
    assert got.shape == want.shape, index
    assert relative_error(got, want) < BF16_TOLERANCE, f"gradient {index}"


# ------------------------------------------------------------------------------------------------
# CPU: interpret mode, lowering, backward math, dispatch
# ------------------------------------------------------------------------------------------------


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("plan, d_out", [(FUSED_SPLIT, 96), (FUSED_SMALL, 300)],
                         ids=["split-hidden", "b_down-in-two-copies"])
def test_interpret_fused_glu_pwl_with_biases(rng, plan, d_out):
  """Odd M (not a multiple of 8 or 64), H not a multiple of block_h, D_out padded to 64; with
  one hidden split b_down is added in the kernel, copied in TMA boxes of <= 256 elements."""
  problem = make_problem(rng, rows=37, d_model=128, hidden=200, d_out=d_out, glu=True, bias=True)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation("pwl", glu=True), plan)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("rows, d_model, hidden, d_out, glu, bias, name, config", [
    (16, 128, 200, 96, True, True, "pwl", decode_sm90.DecodeConfig(stages=1)),
    (37, 192, 130, 64, False, True, "gelu", decode_sm90.DecodeConfig()),
    (70, 128, 64, 320, True, False, "silu", decode_sm90.DecodeConfig(stages=2)),
    (9, 96, 100, 128, True, True, "pwl", decode_sm90.DecodeConfig(block_h=32)),
    (5, 128, 200, 96, True, True, "pwl", decode_sm90.DecodeConfig(stages=1, swap_ab=True)),
    (64, 192, 130, 320, False, True, "gelu", decode_sm90.DecodeConfig(swap_ab=True)),
], ids=["glu-pwl-one-stage", "mlp-gelu-all-stages", "two-row-blocks-five-chunks",
        "32-column-blocks", "swapped-glu-pwl-one-stage", "swapped-mlp-gelu-64-rows-five-chunks"])
def test_interpret_decode(rng, rows, d_model, hidden, d_out, glu, bias, name, config):
  """decode_ffn: H split into 64-column CTAs (H = 130 / 200: a partial last block), partial sums
  reduced by XLA; x rows past M zero-filled, stores clipped (M = 9, 16, 37, and 70 = two row
  blocks); one stage refilled every K step, or all K steps in flight; D_out padded to 128, or 320
  in five 64-column output chunks; 64- and 32-column hidden blocks (128- / 64-byte swizzle).
  Swapped operands (tokens on wgmma's N axis): M = 5 (padded to 8) and 64, transposed partials."""
  problem = make_problem(rng, rows, d_model, hidden, d_out, glu, bias)
  plan = dispatch.Plan("decode", decode=config)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation(name, glu), plan)


@on_cpu_only
@needs_interpret_threads
def test_interpret_decode_reads_a_prepared_table(rng):
  """A table computed ahead (``with_kernel_tables``, as ``nnx.activations_prepared`` does outside
  a decode loop) is the one the kernel reads: the same output as the table built in the call,
  bit for bit, and another PWL's table changes it; no table is built in the call."""
  problem = make_problem(rng, 16, 128, 200, 96, glu=True, bias=True)
  plan = dispatch.Plan("decode", decode=decode_sm90.DecodeConfig(stages=1, swap_ab=True))
  activation = dispatch.with_kernel_tables(kernel_activation("pwl", glu=True))
  other = dispatch.with_kernel_tables(kernel_activation("pwl-tanh", glu=True))
  run = jax.jit(lambda table, *arrays: dispatch._ffn(
      plan, "pwl", None, *arrays, activation.knots, activation.slopes, activation.intercepts, table))
  arrays = [problem[n] for n in ARG_NAMES]
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    built = run(None, *arrays)
    with mock.patch.object(hinge_table, "activation_table", side_effect=AssertionError("built")):
      prepared = run(activation.tables["pwl"], *arrays)
      elsewhere = run(other.tables["pwl"], *arrays)
  np.testing.assert_array_equal(np.asarray(prepared, np.float32), np.asarray(built, np.float32))
  assert relative_error(elsewhere, built) > 0.1


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("name, pwl_dtype, hinges", [("gelu", "float32", "max"),
                                                     ("pwl", "float16", "max"),
                                                     ("pwl-tanh", "float16", "relu")])
def test_interpret_epilogue_mlp(rng, name, pwl_dtype, hinges):
  """gemm1_activation + XLA GEMM2: M spans a partial CTA tile, H a partial tile_n, D = 3 * 64;
  the PWL cases evaluate their hinges in packed float16, as max(h, t_k) or relu(h - t_k) (a
  tanh fit, whose constant differs between the two forms)."""
  problem = make_problem(rng, rows=100, d_model=192, hidden=320, d_out=72, glu=False, bias=True)
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2, pwl_dtype=pwl_dtype,
                                                                    hinges=hinges))
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation(name, glu=False), plan)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("schedule", kernels.SCHEDULES)
def test_interpret_down_projection_kernel(rng, schedule):
  """``Plan(down=...)``: GEMM2 by the epilogue kernel with the identity activation (D_out = 72
  padded to 128, M = 100 a partial tile, b_down added in the epilogue), forward and gradients
  against the f32 reference; the backward does not depend on it."""
  problem = make_problem(rng, rows=100, d_model=128, hidden=200, d_out=72, glu=True, bias=True)
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2),
                       down=kernels.EpilogueConfig(64, 64, 2, schedule=schedule))
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation("pwl", glu=True), plan)


@on_cpu_only
@needs_interpret_threads
def test_interpret_relu_hinges_on_the_llama_plan(rng):
  """llama-1B's PWL plan's forward and backward (ping-pong, relu hinges, floor bits, chunked
  backward; without its GEMM2 tiles, which ``test_interpret_down_projection_kernel`` covers) on
  smaller tiles, with a tanh fit (``kernel_activation``: the relu form's constant is not the max
  form's): forward (inference and training) and every gradient, the PWL's parameters included,
  against the f32 reference; odd M, H and D_out."""
  plan = dispatch.PINGPONG_GLU_F16_RELU_CHUNKED
  plan = dataclasses.replace(plan, epilogue=dataclasses.replace(plan.epilogue, tile_m=64,
                                                                 tile_n=64, stages=2))
  problem = make_problem(rng, rows=100, d_model=128, hidden=200, d_out=72, glu=True, bias=True)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation("pwl15-tanh", glu=True), plan)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("glu, plan", [
    (False, dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2),
                          pwl_lookup=True)),
    (True, dataclasses.replace(dispatch.PINGPONG_GLU_F16, pwl_lookup=True, epilogue=(
        dataclasses.replace(dispatch.PINGPONG_GLU_F16.epilogue, tile_m=64, tile_n=64,
                            stages=2)))),
    (True, dataclasses.replace(dispatch.PINGPONG_GLU_F16, pwl_lookup=True, segment_lookup=True,
                               epilogue=dataclasses.replace(dispatch.PINGPONG_GLU_F16.epilogue,
                                                            tile_m=64, tile_n=64, stages=2)))],
    ids=["mlp-recompute", "glu-pingpong-floor-bits", "glu-floor-bits-segment-lookup"])
def test_interpret_epilogue_pwl_lookup(rng, glu, plan):
  """The forward epilogue's table lookup (``Plan.pwl_lookup``) on a 64-segment uniform fit:
  forward (inference and training) and every gradient against the f32 reference, odd M, H and
  D_out; the GLU cases on SmolLM2's plan (ping-pong, floor bits) with smaller tiles, the last
  with the PWL's gradients from the lookup's bins (``Plan.segment_lookup``)."""
  problem = make_problem(rng, rows=100, d_model=128, hidden=200, d_out=72, glu=glu, bias=True)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation("pwl64u", glu), plan)


def test_pwl_lookup_table_gives_the_pwl(rng):
  """``pwl_lookup``'s table and segment rule (what its PTX computes per element) give the PWL's
  value and slope: random points, the knots themselves, both tails, NaN."""
  for name in ("gelu", "silu"):
    activation = to_kernel_activation(ff.fit(name, 64, "uniform"))
    table = pwl_lookup.lookup_table(activation)
    h = jnp.concatenate([jnp.asarray(rng.standard_normal(4000) * 6, jnp.float32),
                         activation.knots, jnp.asarray([1e30, -1e30, np.nan], jnp.float32)])
    value, slope, segment_taken = pwl_lookup.lookup_in_jnp(h, table, activation.knots.shape[0])
    np.testing.assert_allclose(np.asarray(value[:-1]), np.asarray(activation(h)[:-1]), rtol=1e-6,
                               atol=1e-6, err_msg=name)
    assert np.isnan(np.asarray(value[-1]))
    # the slope of h's segment (pwl_select's: a knot takes the segment above it)
    segment = np.searchsorted(np.asarray(activation.knots), np.asarray(h[:-1]), side="right")
    np.testing.assert_array_equal(np.asarray(slope[:-1]),
                                  np.asarray(activation.slopes)[segment], err_msg=name)
    np.testing.assert_array_equal(np.asarray(segment_taken[:-1]), segment, err_msg=name)
    assert int(segment_taken[-1]) == 0  # NaN: segment 0, whose line keeps it NaN


@pytest.mark.parametrize("pwl_dtype", ["float32", "float16"])
def test_counted_segments_give_the_pwl(rng, pwl_dtype):
  """``pwl_lookup.counted_value_and_segment`` (its interpret forms: the count, then the line
  from ``counted_table``) on optimal PWL-16 fits: the segment is the number of knots at or below
  h (in f16 for "float16": of f16(t_k) at or below f16(h)), the value the PWL's (f16: within the
  slope change times f16's rounding of h next to a knot); both tails, the knots, NaN."""
  f16 = lambda v: np.asarray(jnp.asarray(v).astype(jnp.float16).astype(jnp.float32))
  for name in ("gelu", "silu"):
    activation = to_kernel_activation(ff.fit(name, 16, "optimal"))
    knots, num_knots = np.asarray(activation.knots), activation.knots.shape[0]
    table = pwl_lookup.counted_table(activation)
    assert table.shape[0] % hinge_table.TABLE_ALIGN == 0
    np.testing.assert_array_equal(  # slope_of_segment reads the slopes where lookup_table has them
        table[pwl_lookup.HEADER:pwl_lookup.HEADER + num_knots + 1], activation.slopes)
    first = pwl_lookup.first_counted_knot(num_knots)
    np.testing.assert_array_equal(table[first:first + num_knots], knots)
    h = jnp.concatenate([jnp.asarray(rng.standard_normal(4000) * 4, jnp.float32),
                         activation.knots, jnp.asarray([1e30, -1e30, np.nan], jnp.float32)])
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
      value, segment = pwl_lookup.counted_value_and_segment(h, table, num_knots, pwl_dtype)
    seen = f16 if pwl_dtype == "float16" else np.asarray
    want = np.searchsorted(seen(knots), seen(h[:-1]), side="right")
    np.testing.assert_array_equal(np.asarray(segment[:-1]), want, err_msg=name)
    assert int(segment[-1]) == 0 and np.isnan(np.asarray(value[-1]))  # NaN stays NaN
    finite = np.abs(np.asarray(h[:-1])) < 1e29
    error = np.abs(np.asarray(value[:-1]) - np.asarray(activation(h[:-1])))[finite]
    bound = 1e-6 if pwl_dtype == "float32" else float(
        np.max(np.abs(np.diff(activation.slopes))) * 2.0**-10 * np.max(np.abs(knots)))
    assert np.max(error) <= bound * (1 + np.max(np.abs(np.asarray(h[:-1])[finite]))), name
    with pytest.raises(ValueError, match="at most 84 knots"):
      pwl_lookup.counted_table(to_kernel_activation(ff.fit(name, 90, "optimal")))


def test_pwl_lookup_only_for_concrete_evenly_spaced_knots():
  """``with_pwl_lookup``: a uniform fit (evenly spaced by construction, traced or not) and
  concrete evenly spaced knots get the lookup on the epilogue path, and the dgrad kernel and the
  segment sums take it too; an optimal fit, traced knots without the promise, segment residuals
  and other paths keep the hinges."""
  plan = dispatch.PINGPONG_MLP_F16
  uniform, optimal = (to_kernel_activation(ff.fit("gelu", 64, method)) for method in
                      ("uniform", "optimal"))
  assert dispatch.with_pwl_lookup(plan, uniform).pwl_lookup
  assert not dispatch.with_pwl_lookup(plan, optimal).pwl_lookup
  assert not dispatch.with_pwl_lookup(plan, to_kernel_activation("gelu")).pwl_lookup
  segments = dataclasses.replace(plan, residuals="segments", backward="xla")
  assert not dispatch.with_pwl_lookup(segments, uniform).pwl_lookup
  decode = dispatch.Plan("decode", decode=decode_sm90.DecodeConfig())
  assert not dispatch.with_pwl_lookup(decode, uniform).pwl_lookup
  found = dataclasses.replace(uniform, evenly_spaced=False)  # concrete knots checked
  assert dispatch.with_pwl_lookup(plan, found).pwl_lookup
  traced = jax.jit(lambda knots: jnp.float32([dispatch.with_pwl_lookup(
      plan, dataclasses.replace(activation, knots=knots)).pwl_lookup
      for activation in (uniform, found)]))(uniform.knots)
  np.testing.assert_array_equal(traced, [1.0, 0.0])  # only the static promise survives tracing
  assert not evenly_spaced(uniform.knots.at[3].add(1e-3))  # 1% of a gap off
  with pytest.raises(ValueError, match="pwl_lookup=True needs the epilogue path"):
    dataclasses.replace(segments, pwl_lookup=True)
  with pytest.raises(ValueError, match="dgrad_lookup=True needs pwl_lookup=True"):
    dataclasses.replace(plan, dgrad_lookup=True)
  with pytest.raises(ValueError, match="segment_lookup=True needs pwl_lookup=True"):
    dataclasses.replace(plan, segment_lookup=True)
  asked = dataclasses.replace(plan, pwl_lookup=True, dgrad_lookup=True, segment_lookup=True)
  cleared = dispatch.with_pwl_lookup(asked, optimal)  # a caller's plan cannot force them
  assert not (cleared.pwl_lookup or cleared.dgrad_lookup or cleared.segment_lookup)
  assert dispatch.with_pwl_lookup(plan, uniform).segment_lookup
  assert plan.backward == "epilogue" and dispatch.with_pwl_lookup(plan, uniform).dgrad_lookup
  xla_backward = dataclasses.replace(plan, backward="xla")
  assert not dispatch.with_pwl_lookup(xla_backward, uniform).dgrad_lookup


def test_lookup_segments_need_the_lookup():
  """The saved segments (``kernels.LOOKUP_SEGMENTS``) come from the segments' lines (a lookup
  or a count): the forward kernel refuses them for hinges and the counted kind without them, the
  dgrad kernel a hinge table, each naming what it needs."""
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  activation = kernel_activation("pwl64u", glu=False)
  with pytest.raises(ValueError, match="needs a PWL by its segments' lines.*got kind 'pwl'"):
    jax.eval_shape(lambda x, w, t: kernels.gemm1_activation(
        x, w, None, None, None, t, kind="pwl", num_knots=65,
        config=kernels.EpilogueConfig(64, 64, 2), saves=kernels.LOOKUP_SEGMENTS),
        spec(128, 128), spec(128, 128), hinge_table.activation_table(activation))
  with pytest.raises(ValueError, match="kind 'pwl_counted' is the forward that saves"):
    jax.eval_shape(lambda x, w, t: kernels.gemm1_activation(
        x, w, None, None, None, t, kind="pwl_counted", num_knots=65,
        config=kernels.EpilogueConfig(64, 64, 2), saves="floor-bits"),
        spec(128, 128), spec(128, 128), pwl_lookup.counted_table(activation))
  with pytest.raises(ValueError, match="joint=True writes a GLU's d_g and d_u as one array"):
    dgrad_sm90.dgrad_activation(
        spec(128, 128), spec(128, 128), ((jnp.zeros((128, 128), jnp.uint8),),),
        pwl_lookup.lookup_table(activation), kind="pwl_lookup", num_knots=65,
        config=dispatch.DGRAD_PINGPONG, segments=True, joint=True)
  with pytest.raises(ValueError, match="saved segments need a table of the segments' lines"):
    dgrad_sm90.dgrad_activation(
        spec(128, 128), spec(128, 128), ((jnp.zeros((128, 128), jnp.uint8),),),
        hinge_table.activation_table(activation), kind="pwl", num_knots=65,
        config=dispatch.DGRAD_PINGPONG, segments=True)


def test_pwl_lookup_lowers_into_the_forward_kernel():
  """The lookup's PTX (shared loads of slope and intercept) is in the forward kernel for cuda."""
  activation = kernel_activation("pwl64u", glu=False)
  plan = dataclasses.replace(dispatch.PINGPONG_MLP_F16, pwl_lookup=True)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  forward = lambda x, wu, wd: dispatch._forward(plan, x, wu, wd, None, None, None, None,
                                                activation, saves=plan.saves)
  module = cuda_module(forward, spec(8192, 768), spec(768, 3072), spec(3072, 768))
  intercepts = 4 * (activation.knots.shape[0] + 1)  # bytes past s_0: K + 1 slopes
  assert "cvt.rmi.u32.f32" in module and f"ld.shared.f32 c, [j+{intercepts}]" in module


@pytest.mark.parametrize("glu, lookup_residuals, fit", [
    (False, False, "pwl64u"), (False, True, "pwl64u"), (True, True, "pwl64u"),
    (False, True, "pwl15")],
    ids=["gpt2-small", "gpt2-small-segments", "smollm2-segments", "gpt2-small-counted"])
def test_pwl_lookup_lowers_into_the_dgrad_kernel(monkeypatch, glu, lookup_residuals, fit):
  """With ``dgrad_lookup`` the dgrad kernel's PTX takes value and slope from one lookup (the
  slope straight into the asm's second output), at gpt2-small's training step; with
  ``lookup_residuals`` the forward's lookup also writes its segment (the asm's second output)
  and the dgrad kernel loads the slope by it on the plan's ``segments_dgrad`` tiles
  (gpt2-small's plan, and SmolLM2's GLU plan with it); for the optimal PWL-16 the forward
  counts its knots on f16 pairs and converts the count (the asm's operand) to the segment."""
  configs = []
  dgrad_activation = dgrad_sm90.dgrad_activation
  monkeypatch.setattr(dgrad_sm90, "dgrad_activation", lambda *args, config, **kwargs: (
      configs.append(config) or dgrad_activation(*args, config=config, **kwargs)))
  activation = kernel_activation(fit, glu=glu)
  base = dispatch.SMOLLM2_GLU_F16 if glu else dispatch.PINGPONG_MLP_F16
  lookup = fit == "pwl64u"
  plan = dataclasses.replace(base, pwl_lookup=lookup, dgrad_lookup=lookup,
                             lookup_residuals=lookup_residuals)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  d_model, hidden = (576, 1536) if glu else (768, 3072)

  def step(x, w_up, w_down, w_gate, dy):
    out, vjp = jax.vjp(lambda *w: dispatch._ffn(
        plan, "pwl", None, x, w[0], w[1], w[2] if glu else None, None, None, None,
        activation.knots, activation.slopes, activation.intercepts, None), w_up, w_down, w_gate)
    return vjp(dy)

  module = cuda_module(step, spec(8192, d_model), spec(d_model, hidden), spec(hidden, d_model),
                       spec(d_model, hidden), spec(8192, d_model))
  if lookup_residuals:
    assert "mov.u32 $1, j" in module and "ld.shared.f32 $0, [a]" in module
    assert "ld.shared.f32 $1, [j]" not in module
    assert configs == [dispatch.DGRAD_PINGPONG_WIDE] == [plan.segments_dgrad]
    counted = ("set.ge.f16x2.f16x2" in module, "cvt.rzi.u32.f32" in module,
               "cvt.rmi.u32.f32" in module)
    assert counted == ((True, True, False) if fit == "pwl15" else (False, False, True))
  else:
    assert "ld.shared.f32 $1, [j]" in module and "mov.u32 $1, j" not in module
    assert configs == [dispatch.DGRAD_PINGPONG] == [plan.dgrad]


@on_cpu_only
@needs_interpret_threads
def test_interpret_biased_down_serves_ffns_with_b_down(rng, monkeypatch):
  """``Plan.biased_down``: GEMM2 runs on those tiles when the FFN has b_down (forward and
  gradients against the f32 reference), on ``down`` (XLA's dot here) when it has none."""
  used = []
  original = dispatch.down_projection
  monkeypatch.setattr(dispatch, "down_projection",
                      lambda *args: used.append(args[-1]) or original(*args))
  tiles = kernels.EpilogueConfig(64, 64, 2, schedule="pingpong")
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2), biased_down=tiles)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    for bias in (True, False):
      used.clear()
      problem = make_problem(rng, rows=100, d_model=128, hidden=200, d_out=72, glu=False,
                             bias=bias)
      check_against_reference(problem, kernel_activation("gelu", glu=False), plan)
      assert used and all(config == (tiles if bias else None) for config in used), bias


def test_down_projection_needs_the_epilogue_path():
  with pytest.raises(ValueError, match="down="):
    dispatch.Plan("fused", fused=kernels.FusedConfig(), down=kernels.EpilogueConfig())
  with pytest.raises(ValueError, match="biased_down="):
    dispatch.Plan("fused", fused=kernels.FusedConfig(), biased_down=kernels.EpilogueConfig())


@on_cpu_only
@needs_interpret_threads
def test_interpret_epilogue_glu_saves_preactivations(rng):
  """residuals="preactivations": the epilogue kernel also writes g = x W_gate + b_gate and
  u = x W_up + b_up as (hi, lo) bf16 pairs (odd M and H; the five stores share two staging
  slots, tile_n = 64 gives an odd store count per tile), and the backward reads them instead of
  recomputing GEMM1. Exact SiLU: with a PWL, the pair's 2^-17 rounding moves a pre-activation
  across a knot in ~6% of problems this small, and one such element moved the PWL-parameter
  gradients by 1-6% (CPU emulation, 400 seeds; it failed CI once) - the reason a GLU with a PWL
  saves exact segments instead (test_interpret_epilogue_saves_segments)."""
  problem = make_problem(rng, rows=70, d_model=128, hidden=200, d_out=80, glu=True, bias=True)
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2),
                       residuals="preactivations")
  activation = kernel_activation("silu", glu=True)
  arrays = [problem[n] for n in ARG_NAMES]
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    _, (gate, up) = jax.jit(lambda *a: dispatch._forward(plan, *a, activation,
                                                         saves="preactivations"))(*arrays)
    expected = dict(zip(("gate", "up"), f32_preactivations(problem)))
    for name, (high, low) in (("gate", gate), ("up", up)):
      assert high.dtype == low.dtype == jnp.bfloat16
      assert relative_error(high, expected[name]) < BF16_TOLERANCE  # one bf16 rounding
      assert relative_error(backward.join_preactivation(high, low), expected[name]) < 1e-4
    check_against_reference(problem, activation, plan)


@needs_interpret_threads
@pytest.mark.parametrize("glu, tiles, residuals, schedule, staging", [
    (True, (128, 64, 3), "segments", "pingpong", "shared"),
    (True, (128, 64, 3), "floor-bits", "pingpong", "shared"),
    (False, (64, 128, 2), "preactivations", "pingpong", "per_output"),
    (True, (64, 128, 2), "segments", "cooperative", "per_output"),
    (False, (64, 64, 2), "recompute", "cooperative", "per_output")])
def test_interpret_epilogue_schedules_without_races(rng, monkeypatch, glu, tiles, residuals,
                                                    schedule, staging):
  """The epilogue kernel's schedules and store staging on 2 SMs, so each CTA walks 4-10 tiles
  (ping-pong: its two compute warpgroups alternate; K = 3 steps through a 2- or 3-buffer ring
  shared by both, so buffers change owner between tiles; 128-row tiles take two 64-row epilogue
  windows). The forward kernel runs under the interpreter's race detector (SMEM staging and ring
  reuse ordered by the barriers and store waits), then forward, saved residuals and every
  gradient are checked against the f32 reference (odd M and H)."""
  monkeypatch.setattr(kernels, "num_sms", lambda: 2)
  problem = make_problem(rng, rows=300, d_model=192, hidden=260, d_out=80, glu=glu, bias=True)
  config = kernels.EpilogueConfig(*tiles, pwl_dtype="float16", schedule=schedule,
                                  staging=staging)
  plan = dispatch.Plan("epilogue", epilogue=config, residuals=residuals)
  activation = kernel_activation({"segments": "pwl", "floor-bits": "pwl15"}.get(residuals, "gelu"),
                                 glu=glu)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
    jax.block_until_ready(jax.jit(lambda *a: dispatch._forward(plan, *a, activation,
                                                               saves=plan.saves))(
        *[problem[n] for n in ARG_NAMES]))
  assert not interpret_pallas_call.get_races().races_found
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, activation, plan)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("glu", [True, False])
def test_interpret_epilogue_saves_segments(rng, glu):
  """residuals="segments": the epilogue kernel writes the activation's input as (bf16, int8
  segment index) and a GLU's u as bf16 (odd M and H; the int8 store takes its own staging slot);
  with the knots moved clear of f32 accumulation noise (``knots_clear_of``) the segments equal
  ``segment_index`` of the f32 pre-activation; forward and every gradient (PWL parameters
  included) match the f32 reference."""
  problem = make_problem(rng, rows=70, d_model=128, hidden=200, d_out=80, glu=glu, bias=True)
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2),
                       residuals="segments")
  activation = knots_clear_of(kernel_activation("pwl", glu=glu), problem)
  knots = activation.knots
  arrays = [problem[n] for n in ARG_NAMES]
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    _, saved = jax.jit(lambda *a: dispatch._forward(plan, *a, activation,
                                                    saves="segments"))(*arrays)
    expected = f32_preactivations(problem)
    (high, seg), *rest = saved
    assert high.dtype == jnp.bfloat16 and seg.dtype == jnp.int8 and seg.shape == high.shape
    assert [len(parts) for parts in rest] == [1] * glu and all(
        parts[0].dtype == jnp.bfloat16 for parts in rest)
    assert relative_error(high, expected[0]) < BF16_TOLERANCE
    np.testing.assert_array_equal(seg, backward.segment_index(expected[0], knots, knots.shape[0]))
    assert len(np.unique(np.asarray(seg))) > 8  # the test inputs reach most segments
    joined = backward.join_saved((high, seg), knots)
    assert bool(jnp.all(backward.segment_index(joined, knots, knots.shape[0]) == seg))
    check_against_reference(problem, activation, plan)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("glu", [True, False])
def test_interpret_epilogue_saves_floor_bits(rng, glu):
  """residuals="floor-bits": the epilogue kernel writes the activation's input as (bf16, uint8
  floor bits) through the one-byte staging slot and a GLU's u as bf16 (odd M and H); decoded,
  p' sits within 2^-14 below the f32 pre-activation (plus f32 accumulation noise) and, with the
  knots moved clear of that noise (``knots_clear_of``), in its segment; forward and every
  gradient (PWL parameters included) match the f32 reference with 15-bit knots."""
  problem = make_problem(rng, rows=70, d_model=128, hidden=200, d_out=80, glu=glu, bias=True)
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2),
                       residuals="floor-bits")
  activation = knots_clear_of(kernel_activation("pwl15", glu=glu), problem)
  knots = activation.knots
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    _, saved = jax.jit(lambda *a: dispatch._forward(plan, *a, activation, saves="floor-bits"))(
        *[problem[n] for n in ARG_NAMES])
    expected = f32_preactivations(problem)[0]
    (high, low), *rest = saved
    assert high.dtype == jnp.bfloat16 and low.dtype == jnp.uint8 and low.shape == high.shape
    assert [parts[0].dtype for parts in rest] == [jnp.bfloat16] * glu
    joined = backward.join_saved((high, low))
    noise = 1e-5 * float(jnp.max(jnp.abs(expected)))  # f32 accumulation order
    assert bool(jnp.all(jnp.abs(joined - expected) <= 2.0**-14 * jnp.abs(expected) + noise))
    seg = backward.segment_index(joined, knots, knots.shape[0])
    np.testing.assert_array_equal(seg, backward.segment_index(expected, knots, knots.shape[0]))
    assert len(np.unique(np.asarray(seg))) > 8
    check_against_reference(problem, activation, plan)


def test_segment_index_and_join():
  """seg(p) follows pwl_select (a knot takes the segment above; NaN -> 0); join_segmented puts a
  bf16 rounding that crossed a knot back on the forward's side, within 2^-8 of p (half a bf16
  ulp), and keeps infinities and NaN."""
  activation = kernel_activation("pwl", glu=True)
  knots = activation.knots.astype(jnp.float32)
  k = knots.shape[0]
  # every knot, its f32 neighbours (which bf16 rounds onto or across the knot), and specials
  below, above = jnp.nextafter(knots, -jnp.inf), jnp.nextafter(knots, jnp.inf)
  p = jnp.concatenate([knots, below, above, knots * (1 + 2.0 ** -10), knots * (1 - 2.0 ** -10),
                       jnp.asarray([0.0, -0.0, 1e30, -1e30], jnp.float32)])
  seg = backward.segment_index(p, knots, k)
  slope, _ = pwl_select(p, activation.knots, activation.slopes, activation.intercepts)
  np.testing.assert_array_equal(np.asarray(activation.slopes)[np.asarray(seg, np.int32)],
                                np.asarray(slope))
  np.testing.assert_array_equal(np.asarray(seg[:k]), np.arange(1, k + 1))  # on a knot: above
  np.testing.assert_array_equal(np.asarray(seg[k:2 * k]), np.arange(k))  # just below: below
  joined = backward.join_saved((p.astype(jnp.bfloat16), seg), knots)
  np.testing.assert_array_equal(np.asarray(backward.segment_index(joined, knots, k)),
                                np.asarray(seg))
  assert float(jnp.max(jnp.abs(joined - p) / jnp.maximum(jnp.abs(p), 1e-30))) <= 2.0 ** -8
  special = jnp.asarray([jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  joined = backward.join_saved((special.astype(jnp.bfloat16),
                                backward.segment_index(special, knots, k)), knots)
  np.testing.assert_array_equal(np.asarray(joined[:2]), np.asarray(special[:2]))
  assert np.isnan(joined[2])


@on_cpu_only
def test_floor_bits_keep_every_knot_compare(rng):
  """split/join_floor_bits: p' <= p within 2^-14 |p| (normal p), on p's side of every knot of
  15 significant bits (``snap_knots``): random p at scales from subnormal to 1e25, p on knots and
  one f32 ulp either side, powers of two and their neighbours, +-0, the largest finite f32s (-max
  floors to -inf); NaN and infinities survive; f16 is refused. Unsnapped knots do flip."""
  def decoded(p):
    return backward.join_saved(backward.split_floor_bits(jnp.asarray(p), jnp.bfloat16))
  big = np.finfo(np.float32).max
  for scale in (1e-40, 1e-20, 1e-2, 1.0, 30.0, 1e25):
    knots = np.unique(np.asarray(backward.snap_knots(
        jnp.asarray(np.append(rng.uniform(-4, 4, 15) * scale, 0.0), jnp.float32))))
    assert np.array_equal(np.asarray(backward.snap_knots(jnp.asarray(knots))), knots)
    powers = np.float32(2.0) ** np.arange(-149, 127, 3, dtype=np.float32)
    powers = np.concatenate([powers, -powers])
    near_knots = knots * (1 + rng.uniform(-2**-13, 2**-13, (500, 1)))
    p = np.concatenate([
        rng.standard_normal(20_000) * 2 * scale, near_knots.ravel(),
        [0.0, -0.0, np.nan, np.inf, -np.inf, big, -big],  # NaNs of either sign, low bits set:
        np.array([0xFFFFFFFF, 0x7FFFFFFF], np.uint32).view(np.float32),
        *[np.nextafter(a.astype(np.float32), np.float32(d)) for a in (knots, powers)
          for d in (np.inf, -np.inf, 0.0)]]).astype(np.float32)
    got = decoded(p)
    np.testing.assert_array_equal(backward.segment_index(got, knots, knots.size),
                                  backward.segment_index(jnp.asarray(p), knots, knots.size))
    finite = np.isfinite(p)
    exact, approx = p[finite].astype(np.float64), np.asarray(got, np.float64)[finite]
    assert np.all(approx <= exact)
    normal = (np.abs(exact) >= np.finfo(np.float32).tiny) & np.isfinite(approx)
    assert np.max((exact - approx)[normal] / np.abs(exact[normal])) < 2.0**-14
    assert np.isneginf(approx[exact == -big]).all()
    assert np.isnan(np.asarray(got)[np.isnan(p)]).all()
    np.testing.assert_array_equal(np.asarray(got)[np.isinf(p)], p[np.isinf(p)])
  unsnapped = np.sort(rng.uniform(-4, 4, 16)).astype(np.float32)
  p = (unsnapped * (1 + rng.uniform(-2**-13, 2**-13, (500, 1)))).astype(np.float32)
  flips = (backward.segment_index(decoded(p), unsnapped, 16)
           != backward.segment_index(jnp.asarray(p), unsnapped, 16))
  assert flips.any()
  with pytest.raises(ValueError, match="residuals='floor-bits': expected bfloat16"):
    backward.split_floor_bits(jnp.asarray(p), jnp.float16)


def saved_forms(p: np.ndarray, knots) -> dict[str, tuple]:
  """p f32 as each input form of the segment-sum kernel: itself, a bf16 (hi, lo) pair,
  (bf16 hi, uint8 floor bits), (bf16 hi, int8 seg(p))."""
  p = jnp.asarray(p)
  return {"f32": (p,),
          "pairs": backward.split_preactivation(p, jnp.bfloat16),
          "floor-bits": backward.split_floor_bits(p, jnp.bfloat16),
          "segments": backward.save_preactivations([p], jnp.bfloat16, "segments", knots,
                                                   knots.shape[0])[0]}


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("form", ["f32", "pairs", "floor-bits", "segments"])
@pytest.mark.parametrize("sub_rows, shape", [(2, (45, 200)), (4, (64, 256)), (1, (32, 128))])
def test_interpret_segment_sums_kernel_matches_float64(rng, sub_rows, shape, form):
  """The one-pass segment-sum kernel vs float64 NumPy on what its input form carries (p; hi + lo;
  for (hi, seg) the bands seg == j and the values hi, which the test also holds to the claimed
  2^-9 |g p| per term against the exact p): sums per segment band, exact zeros for the segments
  no element reaches (x clipped to [-1, 1.2]), NaN only in segment 0; a shape that is not whole
  tiles is padded (45 x 200); other dtypes and mismatched g are refused by name."""
  knots = kernel_activation("pwl", glu=True).knots
  x = np.clip(rng.normal(size=shape) * 2, -1.0, 1.2).astype(np.float32)
  x[0, :4] = np.asarray(knots[3:7])  # on a knot: the segment above
  g = rng.normal(size=shape).astype(np.float32)
  parts = saved_forms(x, knots)[form]
  band_of = lambda p: np.searchsorted(np.asarray(knots, np.float64), p, side="right")
  if form == "segments":
    p, segment = np.asarray(parts[0], np.float64), np.asarray(parts[1])
  else:
    p = np.asarray(backward.join_saved(parts, knots), np.float64)
    segment = band_of(p)
  per_band = lambda v, band: np.array([np.sum(np.where(band == j, v, 0.0))
                                       for j in range(len(knots) + 1)])
  want_s, want_c = (per_band(v, segment) for v in (g.astype(np.float64) * p, g.astype(np.float64)))
  nan_parts = saved_forms(np.where(np.arange(x.size).reshape(shape) == 5, np.nan, x), knots)[form]
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    got_s, got_c = segment_sums_sm90.segment_sums(parts, jnp.asarray(g), knots,
                                                  sub_rows=sub_rows)
    poisoned = segment_sums_sm90.segment_sums(nan_parts, jnp.asarray(g), knots,
                                              sub_rows=sub_rows)
  for got, want in ((got_s, want_s), (got_c, want_c)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    assert np.all(np.asarray(got)[want == 0] == 0) and np.sum(want == 0) >= 4
  assert np.isnan(poisoned[0][0]) and np.all(np.isfinite(poisoned[0][1:]))
  if form == "segments":  # exact bands; pairs may move a p on a knot across it (NOTES.md)
    exact_gp = x.astype(np.float64) * g
    bound = 2.0**-9 * per_band(np.abs(exact_gp), band_of(x))
    assert np.all(np.abs(np.asarray(got_s, np.float64) - per_band(exact_gp, band_of(x))) <= bound)
  with pytest.raises(ValueError, match="x, g: expected float32 g, and p as float32"):
    segment_sums_sm90.segment_sums(jnp.asarray(x, jnp.bfloat16), jnp.asarray(g), knots)
  with pytest.raises(ValueError, match="x, g: expected 2-D arrays of one shape"):
    segment_sums_sm90.segment_sums(parts, jnp.asarray(g[:-1]), knots)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("kind, residuals, tolerance", [
    ("kernel", None, 1e-5), ("kernel-residuals", None, 1e-5),
    ("kernel", "segments", BF16_TOLERANCE), ("kernel-residuals", "segments", BF16_TOLERANCE),
    ("kernel-residuals", "preactivations", 1e-5),
    ("kernel", "floor-bits", BF16_TOLERANCE), ("kernel-residuals", "floor-bits", BF16_TOLERANCE)])
def test_interpret_backward_with_segment_sums_kernel(rng, kind, residuals, tolerance):
  """ffn_backward with the kernel's segment sums (``dispatch.SEGMENT_SUMS[kind]``, two 128-column
  chunks) equals autodiff: exactly (1e-5) when GEMM1 is recomputed, within the bf16 tolerance
  reading bf16 residuals that keep every knot side (segments; floor bits, with 15-bit knots).
  (hi, lo) pairs do not (a p within 2^-17 of a knot may cross it, which moved the PWL-parameter
  gradients of this small problem by 5% in one CI run): read in the kernel, they must give what
  joining them in XLA first ("kernel") gives, 1e-5."""
  problem = make_problem(rng, rows=64, d_model=24, hidden=256, d_out=20, glu=True, bias=True,
                         dtype=jnp.float32)
  activation = kernel_activation("pwl15" if residuals == "floor-bits" else "pwl", glu=True)
  dy = jnp.asarray(rng.normal(size=(64, 20)), jnp.float32)
  saved = None
  if residuals:
    pre = lambda w, b: jnp.dot(problem["x"], problem[w], precision="highest") + problem[b]
    saved = backward.save_preactivations([pre("w_gate", "b_gate"), pre("w_up", "b_up")],
                                         jnp.bfloat16, residuals, activation.knots,
                                         activation.knots.shape[0])
  run = lambda sums: backward.ffn_backward(
      *[problem[n] for n in ARG_NAMES], activation, dy, chunk=128,
      precision=jax.lax.Precision.HIGHEST, preactivations=saved, segment_sums=sums)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    grads = run(dispatch.SEGMENT_SUMS[kind])
    if residuals == "preactivations":
      expected = [g for g in run(dispatch.SEGMENT_SUMS["kernel"]) if g is not None]
    else:
      _, expected = loss_and_grads(reference_in_float32, problem, activation, dy)
  got = [g for g in grads if g is not None]
  assert len(got) == len(expected)
  for index, (g, want) in enumerate(zip(got, expected)):
    assert relative_error(g, want) < tolerance, f"gradient {index}"


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("form", ["f32", "pairs", "floor-bits"])
def test_interpret_segment_sums_lookup_matches_float64(rng, form):
  """The lookup's bins (``segment_sums_lookup``) vs float64 NumPy, a uniform PWL-64 of SiLU,
  45 x 200 (padded to whole tiles): each p in the segment the lookup's rule gives (a p on a knot:
  the segment above, as the bands; within f32 rounding of a knot either side - one CI run had a
  "pairs" p there, 12% off in two segments' sums against the exact segments), sums per segment,
  exact zeros for the segments no element reaches (x clipped to [-1, 1.2]), NaN only in segment
  0; (hi, int8 seg) refused by name."""
  knots = kernel_activation("pwl64u", glu=True).knots
  shape = (45, 200)
  x = np.clip(rng.normal(size=shape) * 2, -1.0, 1.2).astype(np.float32)
  x[0, :4] = np.asarray(knots[29:33])
  g = rng.normal(size=shape).astype(np.float32)
  parts = saved_forms(x, knots)[form]
  p32 = backward.join_saved(parts, knots)
  p = np.asarray(p32, np.float64)
  segment = np.asarray(lookup_segment(p32, *lookup_header(knots), knots.shape[0]))
  exact = np.searchsorted(np.asarray(knots, np.float64), p, side="right")
  gap = float(knots[1] - knots[0])
  near_knot = np.min(np.abs(p[..., None] - np.asarray(knots, np.float64)), axis=-1) < 1e-5 * gap
  assert np.all((segment == exact) | near_knot)
  if form == "f32":
    assert np.all(segment[0, :4] == np.arange(30, 34))  # on a knot: the segment above
  per_segment = lambda v: np.array([np.sum(np.where(segment == j, v, 0.0))
                                    for j in range(len(knots) + 1)])
  want_s, want_c = per_segment(g.astype(np.float64) * p), per_segment(g.astype(np.float64))
  nan_parts = saved_forms(np.where(np.arange(x.size).reshape(shape) == 5, np.nan, x), knots)[form]
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    got_s, got_c = segment_sums_sm90.segment_sums_lookup(parts, jnp.asarray(g), knots)
    poisoned = segment_sums_sm90.segment_sums_lookup(nan_parts, jnp.asarray(g), knots)
  for got, want in ((got_s, want_s), (got_c, want_c)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    assert np.all(np.asarray(got)[want == 0] == 0) and np.sum(want == 0) >= 40
  assert np.isnan(poisoned[0][0]) and np.all(np.isfinite(poisoned[0][1:]))
  with pytest.raises(ValueError, match="x: the lookup's segment sums read p"):
    segment_sums_sm90.segment_sums_lookup(saved_forms(x, knots)["segments"], jnp.asarray(g),
                                          knots)


def test_segment_sums_lookup_lowers_for_cuda():
  """The lookup's bin updates (inline PTX: this thread's column, then per element the segment
  and two read-modify-writes) are in the kernel for cuda, reading floor bits at SmolLM2's
  training width."""
  knots = kernel_activation("pwl64u", glu=True).knots
  specs = [jax.ShapeDtypeStruct((4096, 1536), dtype) for dtype in ("bfloat16", "uint8", "float32")]
  module = cuda_module(lambda hi, bits, g: segment_sums_sm90.segment_sums_lookup(
      (hi, bits), g, knots), *specs)
  assert "cvt.rmi.u32.f32" in module and "mad.lo.u32 a, j, 512, $2" in module
  assert "shr.u32 w, t, 7" in module


def test_segment_sums_slices_shrink_with_the_knot_count():
  """2 (K+1) accumulators of sub_rows f32 per thread: PWL-16 keeps [2, 128] slices, a uniform
  PWL-64 takes [1, 128] (its [2, 128] spilled: 0.51 vs 0.14 ms on the H200)."""
  assert segment_sums_sm90.default_sub_rows(17) == 2
  assert segment_sums_sm90.default_sub_rows(65) == 1


@pytest.mark.parametrize("sub_rows, shape, dtypes", [
    (4, (4096, 1536), ("float32",)), (2, (4096, 1536), ("float32",)),
    (2, (1000, 3000), ("float32",)), (2, (8192, 3072), ("bfloat16", "bfloat16")),
    (2, (1000, 3000), ("bfloat16", "int8")), (4, (8192, 1536), ("bfloat16", "int8")),
    (2, (1000, 3000), ("bfloat16", "uint8"))])
def test_segment_sums_kernel_lowers_for_cuda(sub_rows, shape, dtypes):
  knots = kernel_activation("pwl", glu=True).knots
  specs = [jax.ShapeDtypeStruct(shape, dtype) for dtype in (*dtypes, "float32")]
  assert "mosaic_gpu" in cuda_module(lambda *parts_g: segment_sums_sm90.segment_sums(
      parts_g[:-1], parts_g[-1], knots, sub_rows=sub_rows), *specs)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("glu, name, residuals, schedule", [
    (True, "pwl15", "floor-bits", "pingpong"), (False, "pwl15", "floor-bits", "pingpong"),
    (False, "gelu", "preactivations", "cooperative"), (True, "pwl", "preactivations",
                                                       "cooperative"),
    (True, "pwl64u-lookup", "floor-bits", "pingpong"),
    (False, "pwl64u-lookup", "preactivations", "cooperative")])
def test_interpret_dgrad_activation_matches_xla(rng, monkeypatch, glu, name, residuals, schedule):
  """dgrad_activation vs the same math in XLA (f32) on the saved parts: h, d_u, d_g for 200 rows
  (partial tiles) and 320 hidden columns (H tiles of 128: a partial one) on 2 SMs, so each CTA
  walks several tiles (ping-pong: its warpgroups alternate, each 64 x 128 tile takes two
  64-column windows, so both part buffers turn over). Ping-pong runs under the interpreter's race
  detector (ring, part buffers, staging). A PWL's reference slope takes the segment the kernel's
  ``pwl_dtype`` sees: with float16, p within ~2^-11 |t_k| of a knot may take the neighbouring
  segment (one CI run: d_g 0.56% from the f32 segments, over the 0.5% tolerance). "-lookup":
  a uniform PWL-64 through ``pwl_lookup``'s table (kind "pwl_lookup", f32 segments)."""
  monkeypatch.setattr(kernels, "num_sms", lambda: 2)
  name, lookup = name.removesuffix("-lookup"), name.endswith("-lookup")
  rows, d_out, hidden = 200, 192, 320
  dy = jnp.asarray(rng.normal(size=(rows, d_out)), jnp.bfloat16)
  w_down = jnp.asarray(rng.normal(size=(hidden, d_out)) / np.sqrt(d_out), jnp.bfloat16)
  pres = [jnp.asarray(rng.normal(size=(rows, hidden)) * 2, jnp.float32) for _ in range(1 + glu)]
  saved = backward.save_preactivations(pres, jnp.bfloat16, residuals)
  activation = kernel_activation(name, glu)
  num_knots = 0 if activation.knots is None else activation.knots.shape[0]
  config = (dispatch.DGRAD_PINGPONG if schedule == "pingpong" else
            dispatch.DGRAD_GLU if glu else dispatch.DGRAD_MLP)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(
      detect_races=schedule == "pingpong")):
    table, kind = dispatch._kernel_table(activation, lookup)  # what the dispatcher passes
    got = jax.block_until_ready(jax.jit(lambda *a: dgrad_sm90.dgrad_activation(
        *a, kind=kind, num_knots=num_knots, config=config))(dy, w_down, saved, table))
  if schedule == "pingpong":
    assert not interpret_pallas_call.get_races().races_found
  d_hidden = jnp.dot(dy.astype(jnp.float32), w_down.astype(jnp.float32).T, precision="highest")
  pre = [backward.join_saved(parts) for parts in saved]
  act, slope = backward._activation_and_derivative(activation, pre[0])
  if activation.kind == "pwl" and not lookup:  # the segment the kernel picks: f16(p) against
    seen = lambda v: v.astype(config.pwl_dtype).astype(jnp.float32)  # pwl_dtype float16
    _, slope = backward._activation_and_derivative(
        dataclasses.replace(activation, knots=seen(activation.knots)), seen(pre[0]))
  want = ([act * pre[1], d_hidden * act, d_hidden * pre[1] * slope] if glu
          else [act, d_hidden * slope, None])
  for index, (g, w) in enumerate(zip(got, want)):
    if w is None:
      assert g is None, index
    else:
      assert g.dtype == jnp.bfloat16 and relative_error(g, w) < BF16_TOLERANCE / 2, index


def interpret_dgrad_plan(schedule: str, lookup: bool, **fields) -> dispatch.Plan:
  """An epilogue plan with the dgrad backward on interpret-sized 64 x 64 x 2 tiles (forward tiles
  too unless ``fields`` give ``epilogue``), the PWL by the lookup or not, plus ``fields``."""
  fields.setdefault("epilogue", kernels.EpilogueConfig(64, 64, 2))
  return dispatch.Plan("epilogue", backward="epilogue",
                       dgrad=kernels.EpilogueConfig(64, 64, 2, schedule=schedule),
                       pwl_lookup=lookup, dgrad_lookup=lookup, **fields)


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("glu, name, residuals, schedule", [
    (True, "silu", "preactivations", "cooperative"), (False, "gelu", "preactivations",
                                                      "cooperative"),
    (True, "pwl15", "floor-bits", "pingpong"), (False, "pwl15", "floor-bits", "pingpong"),
    (True, "pwl64u-lookup", "floor-bits", "pingpong"),
    (False, "pwl64u-lookup-segments", "floor-bits", "pingpong"),
    (True, "pwl64u-lookup-segments", "floor-bits", "pingpong"),
    (False, "pwl15-segments", "floor-bits", "pingpong"),
    (True, "pwl15-segments", "floor-bits", "cooperative"),
    (True, "pwl15-joint", "floor-bits", "pingpong"),
    (True, "pwl15-segments-joint", "floor-bits", "pingpong")])
def test_interpret_backward_epilogue_plan(rng, monkeypatch, glu, name, residuals, schedule):
  """Plan(backward="epilogue"): forward and every gradient (weights, biases; not a PWL's
  parameters, which would hand the backward to the chunked form) against the float32 reference,
  odd M, H and D_out (H and D_out padded to 64 for the kernel); "-lookup": a uniform PWL-64 by
  table lookup in the forward and the dgrad kernel (``pwl_lookup`` / ``dgrad_lookup``);
  "-segments": with ``lookup_residuals`` (the forward saves h and the lookup's segments - for
  the optimal PWL-16 "pwl15", the count of knots at or below p; a GLU saves act(g), u and them,
  and its h comes from the dgrad kernel - which reads those on ``segments_dgrad``'s tiles);
  "-joint": a GLU's dgrad kernel writes [d_g | d_u] as one array (``joint_glu_gradients``)."""
  problem = make_problem(rng, rows=70, d_model=128, hidden=200, d_out=80, glu=glu, bias=True)
  joint = name.endswith("-joint")
  name = name.removesuffix("-joint")
  segments = name.endswith("-segments")
  name = name.removesuffix("-segments")
  name, lookup = name.removesuffix("-lookup"), name.endswith("-lookup")
  plan = interpret_dgrad_plan(schedule, lookup, residuals=residuals, lookup_residuals=segments,
                              segments_dgrad=kernels.EpilogueConfig(64, 128, 3, schedule=schedule),
                              joint_glu_gradients=joint)
  saves = record_saves(monkeypatch)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation(name, glu), plan, pwl_gradients=False)
  trained = [s for s in saves if s is not None]
  assert trained and set(trained) == {kernels.LOOKUP_SEGMENTS if segments else residuals}, saves


@on_cpu_only
@needs_interpret_threads
@pytest.mark.parametrize("glu, name, schedule, counting, dtype", [
    (True, "pwl15", "pingpong", "float32", jnp.bfloat16),
    (False, "pwl15", "pingpong", "float32", jnp.bfloat16),
    (True, "pwl16u", "cooperative", "float32", jnp.bfloat16),
    (False, "pwl16u-tanh", "pingpong", "float32", jnp.bfloat16),
    (True, "pwl15", "pingpong", "float16", jnp.bfloat16),
    (False, "pwl15", "pingpong", "float16", jnp.float16)])
def test_interpret_dgrad_kernel_gives_trained_pwl_gradients(rng, monkeypatch, dgrad_calls, glu,
                                                            name, schedule, counting, dtype):
  """``Plan.pwl_gradients_dgrad``: with the PWL's slopes and intercepts differentiated, the
  forward saves the PWL's input and segments (``kernels.LOOKUP_SEGMENT_INPUTS``) and the dgrad
  kernel sums their gradients in its bins; forward and every gradient, the PWL's included,
  against the float32 reference, odd M, H and D_out. The optimal PWL-16 counts its knots, the
  uniform one ("pwl16u") looks its segments up; tanh's tails have nonzero intercepts. Knots
  counted on float16 (the GPU plans' ``pwl_dtype``) put p within ~2^-11 |t_k| of a knot in
  either segment, with that line's gradients: that case's reference finds its segments so
  (``segments_seen``). float16 inputs (gpt2-small's plan given them saves pairs for a frozen
  PWL) save p as float16."""
  problem = make_problem(rng, rows=70, d_model=128, hidden=200, d_out=80, glu=glu, bias=True,
                         dtype=dtype)
  lookup = name.startswith("pwl16u")
  plan = interpret_dgrad_plan(
      schedule, lookup, epilogue=kernels.EpilogueConfig(64, 64, 2, pwl_dtype=counting),
      residuals="floor-bits" if dtype == jnp.bfloat16 else "preactivations",
      lookup_residuals=True,
      pwl_gradients_dgrad=kernels.EpilogueConfig(64, 128, 2, schedule=schedule),
      joint_glu_gradients=glu)
  saves = record_saves(monkeypatch)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    check_against_reference(problem, kernel_activation(name, glu), plan)
  assert {s for s in saves if s is not None} == {kernels.LOOKUP_SEGMENT_INPUTS}, saves
  assert dgrad_calls == [("pwl_lookup" if lookup else "pwl_counted", True)]


@pytest.mark.parametrize("glu, fit, dgrad_sums", [(True, "pwl15", True), (False, "pwl16u", True),
                                                  (False, "pwl64u", False)])
def test_trained_pwl_gradients_lower_into_the_dgrad_kernel(dgrad_calls, glu, fit, dgrad_sums):
  """The training step with a trained PWL on the tuned plans (SmolLM2 / gpt2-small widths, M =
  8191) lowers for CUDA with the dgrad kernel's bins (``segment_sums_sm90.zero_bins``' and
  ``add_to_bins``' PTX) on ``pwl_gradients_dgrad``'s tiles; a uniform PWL-64's bins (130 KiB) do
  not fit beside them, so it keeps the chunked backward (and the lookup's segment sums)."""
  activation = kernel_activation(fit, glu)
  rows, d_model, hidden = (8191, 576, 1536) if glu else (8191, 768, 3072)
  plan = dispatch.with_pwl_lookup(dispatch.choose_plan(rows, d_model, hidden, d_model, glu, True),
                                  activation)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda x, wu, wd, wg, s, c: jnp.sum(dispatch._ffn(
      plan, "pwl", None, x, wu, wd, wg, None, None, None, activation.knots, s,
      c, None).astype(jnp.float32))
  step = jax.grad(loss, argnums=(0, 1, 2, 4, 5) + ((3,) if glu else ()))
  module = cuda_module(step, spec(rows, d_model), spec(d_model, hidden), spec(hidden, d_model),
                       spec(d_model, hidden) if glu else None, activation.slopes,
                       activation.intercepts)
  assert ("mov.u32 j, $3;" in module and "st.shared.f32 [a+" in module) == dgrad_sums
  assert ("st.shared.f32 [$0+0], 0f00000000;" in module) == dgrad_sums
  assert [pwl_gradients for _, pwl_gradients in dgrad_calls] == ([True] if dgrad_sums else [])


@pytest.mark.parametrize("name", ["silu", "pwl"])
def test_float16_inputs_on_a_floor_bits_plan(rng, monkeypatch, name):
  """Floor bits need bf16 inputs (their hi part is a bf16): given float16, SmolLM2's tuned plans
  (floor bits, for the exact SiLU too) save a GLU PWL's segments and the exact SiLU's (hi, lo)
  pairs ("segments" holds PWL segment indices; the pairs do not fit the dgrad kernel's SMEM, so
  the backward is the chunked one). Traced, not run."""
  saves = record_saves(monkeypatch)
  monkeypatch.setattr(dispatch, "unsupported_reason", lambda x, activation: None)
  rows, d_model, hidden = 128, 576, 1536
  assert dispatch.choose_plan(rows, d_model, hidden, d_model, True,
                              name == "pwl").residuals == "floor-bits"
  problem = make_problem(rng, rows, d_model, hidden, d_model, glu=True, bias=False,
                         dtype=jnp.float16)
  jax.make_jaxpr(lambda d: loss_and_grads(lambda *a: dispatch.ffn_mosaic_gpu(*a), problem,
                                          kernel_activation(name, glu=True), d,
                                          pwl_gradients=False))(
      jnp.ones((rows, d_model), jnp.float16))
  assert saves and set(saves) == {"segments" if name == "pwl" else "preactivations"}


@pytest.mark.parametrize("segments, saved, dtype", [
    (16, kernels.LOOKUP_SEGMENTS, jnp.bfloat16), (90, "floor-bits", jnp.bfloat16),
    (16, kernels.LOOKUP_SEGMENTS, jnp.float16), (90, "preactivations", jnp.float16)])
def test_mlp_plan_counts_knots_up_to_the_table_limit(rng, monkeypatch, segments, saved, dtype):
  """gpt2-small's plan trains a frozen optimal PWL on the dgrad kernel from h and each element's
  count of knots (kind "pwl_counted" in the forward), for float16 inputs too; a PWL with more
  knots than ``counted_table`` holds keeps floor bits (float16: (hi, lo) pairs) and the hinges.
  Traced, not run."""
  saves, kinds = record_saves(monkeypatch), []
  real = kernels.gemm1_activation
  monkeypatch.setattr(kernels, "gemm1_activation",
                      lambda *a, **k: kinds.append(k["kind"]) or real(*a, **k))
  monkeypatch.setattr(dispatch, "unsupported_reason", lambda x, activation: None)
  problem = make_problem(rng, 128, 768, 3072, 768, glu=False, bias=True, dtype=dtype)
  activation = to_kernel_activation(ff.fit("gelu", segments, "optimal"))
  jax.make_jaxpr(lambda d: loss_and_grads(lambda *a: dispatch.ffn_mosaic_gpu(*a), problem,
                                          activation, d, pwl_gradients=False))(
      jnp.ones((128, 768), dtype))
  assert saves == [saved]
  # GEMM2 (with b_down) on the kernel too
  assert kinds == ["pwl_counted" if saved == kernels.LOOKUP_SEGMENTS else "pwl", "identity"]


@pytest.mark.parametrize("pwl_gradients", [False, True])
def test_dgrad_plan_leaves_trained_pwls_to_the_chunked_backward(rng, monkeypatch, dgrad_calls,
                                                                pwl_gradients):
  """Plan(backward="epilogue") with a PWL, saving floor bits (no ``lookup_residuals``): the
  dgrad kernel runs when only arrays are differentiated; differentiating the PWL's slopes and
  intercepts too hands the backward to the chunked form, whose segment sums give them (the
  dgrad kernel sums them only from saved segments, ``test_interpret_dgrad_kernel_gives_trained_
  pwl_gradients``). Traced, not run."""
  monkeypatch.setattr(dispatch, "unsupported_reason", lambda x, activation: None)
  problem = make_problem(rng, rows=16, d_model=64, hidden=64, d_out=64, glu=False, bias=False)
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2),
                       residuals="floor-bits", backward="epilogue")
  activation = kernel_activation("pwl15", glu=False)
  jax.make_jaxpr(lambda d: loss_and_grads(
      lambda *a: dispatch.ffn_mosaic_gpu(*a, plan=plan), problem, activation, d, pwl_gradients))(
          jnp.ones((16, 64), jnp.bfloat16))
  assert dgrad_calls == ([] if pwl_gradients else [("pwl", False)])


@pytest.mark.parametrize("glu, name, schedule, joint", [(True, "pwl", "pingpong", False),
                                                        (True, "pwl", "pingpong", True),
                                                        (False, "pwl", "pingpong", False),
                                                        (False, "gelu", "cooperative", False)])
def test_backward_epilogue_lowers_for_cuda(glu, name, schedule, joint):
  """The training step with Plan(backward="epilogue") lowers for CUDA at SmolLM2 / gpt2-small
  widths, with an M that is not a multiple of 8 (TMA's swizzled boxes refuse such gmem rows);
  ``joint``: the GLU's d_g and d_u stored into the two halves of one array."""
  rows, d_model, hidden = (8191, 576, 1536) if glu else (8191, 768, 3072)
  activation = kernel_activation(name, glu)
  plan = dataclasses.replace(dispatch.choose_plan(rows, d_model, hidden, d_model, glu, True),
                             backward="epilogue", dgrad=(
                                 dispatch.DGRAD_PINGPONG if schedule == "pingpong"
                                 else dispatch.DGRAD_MLP), joint_glu_gradients=joint)
  if name != "pwl":
    plan = dataclasses.replace(plan, residuals="preactivations")
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda x, wu, wd, wg: jnp.sum(dispatch._ffn(
      plan, activation.kind, None, x, wu, wd, wg, None, None, None, activation.knots,
      activation.slopes, activation.intercepts, None).astype(jnp.float32))
  step = jax.grad(loss, argnums=(0, 1, 2) + ((3,) if glu else ()))
  module = cuda_module(step, spec(rows, d_model), spec(d_model, hidden), spec(hidden, d_model),
                       spec(d_model, hidden) if glu else None)
  assert module.count("mosaic_gpu") >= 2  # forward epilogue + dgrad kernels


def test_segment_residuals_need_a_pwl_and_fitting_tiles(rng):
  """residuals="segments" refuses an exact activation by name, and tiles whose SMEM cannot also
  hold the int8 staging slot (gpt2-small's 128 x 128 x 3 forward tiles)."""
  problem = make_problem(rng, rows=16, d_model=64, hidden=64, d_out=64, glu=False, bias=False)
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(64, 64, 2),
                       residuals="segments")
  gelu = kernel_activation("gelu", glu=False)
  with pytest.raises(ValueError, match="residuals='segments' saves PWL segment indices"):
    jax.grad(lambda x: jnp.sum(dispatch._ffn(plan, "gelu", None, x, problem["w_up"],
                                             problem["w_down"], None, None, None, None,
                                             gelu.knots, gelu.slopes, gelu.intercepts,
                                             None)))(
        problem["x"])
  segments = tuple(t for parts in kernels.saved_part_dtypes("segments", 1, jnp.bfloat16)
                   for t in parts)
  assert segments == (jnp.bfloat16, jnp.int8)
  with pytest.raises(NotImplementedError, match="staging of saved parts"):
    kernels.EpilogueConfig(128, 128, 3).check(1, jnp.bfloat16, segments)
  kernels.EpilogueConfig(128, 128, 3).check(1, jnp.bfloat16)
  kernels.EpilogueConfig(64, 256, 3).check(1, jnp.bfloat16, segments)
  # with_residuals keeps tiles that fit (GLU 64 x 128) and moves the MLP's to 64 x 256
  glu = dispatch.with_residuals(dispatch.EPILOGUE_GLU, glu=True, residuals="segments")
  mlp = dispatch.with_residuals(dispatch.EPILOGUE_MLP_F16, glu=False, residuals="segments")
  assert glu.residuals == mlp.residuals == "segments"
  assert glu.epilogue == dispatch.EPILOGUE_GLU.epilogue
  assert (mlp.epilogue.tile_m, mlp.epilogue.tile_n, mlp.epilogue.pwl_dtype) == (64, 256, "float16")
  # ping-pong stages its stores in 64-row windows: the int8 slot fits beside 128 x 128 x 4 tiles
  pingpong = dispatch.PINGPONG_MLP_F16.epilogue
  assert dispatch.with_residuals(dispatch.PINGPONG_MLP_F16, glu=False,
                                 residuals="segments").epilogue == pingpong


def test_preactivation_residuals_need_the_epilogue_path():
  with pytest.raises(ValueError, match="backward='epilogue' reads the saved pre-activations"):
    dispatch.Plan("epilogue", backward="epilogue")
  with pytest.raises(ValueError, match="backward"):
    dispatch.Plan("epilogue", residuals="preactivations", backward="triton")
  with pytest.raises(ValueError, match="segment_sums"):
    dispatch.Plan("epilogue", segment_sums="triton")
  with pytest.raises(ValueError, match="residuals"):
    dispatch.Plan("epilogue", residuals="hidden")
  with pytest.raises(ValueError, match="epilogue"):
    dispatch.Plan("fused", fused=kernels.FusedConfig(), residuals="preactivations")
  with pytest.raises(ValueError, match="needs the epilogue path"):
    dispatch.Plan("decode", decode=decode_sm90.DecodeConfig(), residuals="segments")
  with pytest.raises(ValueError, match="reads the saved pre-activations"):  # pairs only
    dispatch.Plan("epilogue", residuals="segments", backward="epilogue")
  with pytest.raises(ValueError, match="d_hidden='bfloat16'"):
    dispatch.Plan("epilogue", d_hidden="bfloat16")


LOWERING_CASES = {
    # name: (rows, D, H, D_out, glu, activation, plan)
    "smollm2-fused": (8192, 576, 1536, 576, True, "pwl", dispatch.Plan(
        "fused", fused=kernels.FusedConfig(64, 3, 1))),
    "smollm2-decode": (16, 576, 1536, 576, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig())),
    "gpt2-decode": (1, 768, 3072, 768, False, "gelu", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16"))),
    "smollm2-decode-summed": (16, 576, 1536, 576, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(sum_in_kernel=True))),
    "gpt2-decode-b32-summed": (1, 768, 3072, 768, False, "gelu", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(32, pwl_dtype="float16", sum_in_kernel=True))),
    "smollm2-decode-swapped": (16, 576, 1536, 576, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16", swap_ab=True))),
    "gpt2-decode-swapped-summed": (64, 768, 3072, 768, False, "gelu", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(swap_ab=True, sum_in_kernel=True))),
    "gpt2-epilogue": (8192, 768, 3072, 768, False, "gelu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 3))),
    "llama-glu-epilogue": (4096, 2048, 8192, 2048, True, "silu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3))),
    "llama-glu-epilogue-saved": (4096, 4096, 14336, 4096, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3), residuals="preactivations")),
    "smollm2-glu-segments": (8191, 576, 1536, 576, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3, pwl_dtype="float16"),
        residuals="segments")),
    "gpt2-mlp-segments": (8192, 768, 3072, 768, False, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 256, 3, pwl_dtype="float16"),
        residuals="segments")),
    "smollm2-glu-pingpong-segments": (8191, 576, 1536, 576, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(
            **dispatch.PINGPONG_GLU_TILES, pwl_dtype="float16", schedule="pingpong"),
        residuals="segments")),
    "gpt2-mlp-pingpong-segments": (8192, 768, 3072, 768, False, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(
            **dispatch.PINGPONG_MLP_TILES, pwl_dtype="float16", schedule="pingpong"),
        residuals="segments")),
    "smollm2-glu-floor-bits": (8191, 576, 1536, 576, True, "pwl15", dataclasses.replace(
        dispatch.EPILOGUE_GLU_F16, residuals="floor-bits")),
    "gpt2-mlp-pingpong-floor-bits": (8192, 768, 3072, 768, False, "pwl15",
                                     dispatch.PINGPONG_MLP_F16),
    "smollm2-glu-pingpong-floor-bits": (8191, 576, 1536, 576, True, "pwl15",
                                        dispatch.PINGPONG_GLU_F16),
    "llama1b-glu-pingpong-relu": (1000, 2048, 8192, 2048, True, "pwl15",
                                  dispatch.LLAMA_1B_GLU_F16),
    "smollm2-down-projection-kernel": (8192, 576, 1536, 576, True, "pwl15",
                                       dispatch.SMOLLM2_GLU_F16),
    "smollm2-glu-segments-per-output": (8192, 576, 1536, 576, True, "pwl", dataclasses.replace(
        dispatch.EPILOGUE_GLU_F16, residuals="segments", epilogue=dataclasses.replace(
            dispatch.EPILOGUE_GLU_F16.epilogue, staging="per_output"))),
    "gpt2-mlp-pingpong-pairs-per-output": (8192, 768, 3072, 768, False, "pwl", dataclasses.replace(
        dispatch.PINGPONG_MLP_F16, residuals="preactivations", epilogue=dataclasses.replace(
            dispatch.PINGPONG_MLP_F16.epilogue, staging="per_output"))),
}


@pytest.mark.parametrize("case", sorted(LOWERING_CASES))
def test_kernels_lower_for_cuda(case):
  """The whole Mosaic GPU lowering of the benchmark shapes runs without a GPU."""
  rows, d_model, hidden, d_out, glu, name, plan = LOWERING_CASES[case]
  activation = kernel_activation(name, glu)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  args = (spec(rows, d_model), spec(d_model, hidden), spec(hidden, d_out),
          spec(d_model, hidden) if glu else None)
  forward = lambda x, wu, wd, wg: dispatch._forward(
      plan, x, wu, wd, wg, None, None, None, activation, saves=plan.saves)
  assert "mosaic_gpu" in cuda_module(forward, *args)


@pytest.mark.parametrize("sum_in_kernel", [False, True], ids=["xla-sum", "summed"])
@pytest.mark.parametrize("block_h, swap_ab, pairs, pdl", [
    (64, False, False, False), (32, False, False, False), (64, True, False, False),
    (64, True, True, False), (64, True, True, True)],
    ids=["64", "32", "64-swapped", "64-swapped-pairs", "64-swapped-pairs-pdl"])
def test_biased_decode_lowers_for_cuda(block_h, swap_ab, pairs, pdl, sum_in_kernel):
  """The decode kernel with all three biases lowers for cuda at both CTA widths, with swapped
  operands (biases per row) and with 2-CTA clusters (odd K slices and D_out pieces: guarded
  loads and stores): bias copies of 128 bytes (Pallas' least; a 32-column CTA's own slice is 64
  bytes), b_down in 64-element pieces when the kernel sums; odd M, H and D_out (padded by
  ``dispatch``); with ``pdl`` the launch is marked for programmatic dependent launch and the
  kernel waits (griddepcontrol.wait) before its first load."""
  if pairs and sum_in_kernel:
    pytest.skip("cluster_pairs sums with XLA only (DecodeConfig refuses sum_in_kernel)")
  plan = dispatch.Plan("decode", decode=decode_sm90.DecodeConfig(
      block_h, sum_in_kernel=sum_in_kernel, swap_ab=swap_ab, cluster_pairs=pairs, pdl=pdl))
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  rows, d_model, hidden, d_out = 5, 576, 1000, 700
  forward = lambda *args: dispatch._forward(plan, *args, kernel_activation("pwl", True))
  module = cuda_module(forward, spec(rows, d_model), spec(d_model, hidden), spec(hidden, d_out),
                       spec(d_model, hidden), spec(hidden), spec(hidden), spec(d_out))
  assert "mosaic_gpu" in module
  assert ("griddepcontrol.wait" in module) == pdl


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("saved", [False, True], ids=["recompute", "preactivations"])
def test_chunked_backward_matches_autodiff(rng, glu, saved):
  """ffn_backward (4 chunks, H padded to the chunk), recomputing GEMM1 or reading the saved
  pre-activations, equals jax.grad of the reference in f32."""
  problem = make_problem(rng, rows=33, d_model=24, hidden=470, d_out=20, glu=glu, bias=True,
                         dtype=jnp.float32)
  activation = kernel_activation("pwl", glu=glu)
  dy = jnp.asarray(rng.normal(size=(33, 20)), jnp.float32)
  _, expected = loss_and_grads(reference_in_float32, problem, activation, dy)
  pre = lambda w, b: jnp.dot(problem["x"], problem[w], precision="highest") + problem[b]
  # exact parts (bf16 hi, f32 lo = p - hi): this test is about the chunking, at 1e-5; the bf16
  # pair's own rounding (2^-17) is tested in test_split_preactivation_round_trip_and_specials
  exact_parts = lambda p: (p.astype(jnp.bfloat16), p - p.astype(jnp.bfloat16).astype(jnp.float32))
  preactivations = (tuple(exact_parts(pre(w, b))
                          for w, b in (("w_gate", "b_gate"),) * glu + (("w_up", "b_up"),))
                    if saved else None)
  grads = backward.ffn_backward(*[problem[n] for n in ARG_NAMES], activation, dy, chunk=128,
                                precision=jax.lax.Precision.HIGHEST,
                                preactivations=preactivations)
  got = [g for g in grads if g is not None]
  assert len(got) == len(expected)
  for index, (g, want) in enumerate(zip(got, expected)):
    assert relative_error(g, want) < 1e-5, f"gradient {index}"


@pytest.mark.parametrize("glu", [True, False])
def test_chunked_backward_with_d_hidden_in_bf16(rng, glu):
  """d_hidden_dtype=bf16 rounds dy W_down^T (f32 accumulation) once: every gradient stays within
  the bf16 tolerance of f32 autodiff, and the weight gradients do move by the rounding (so the
  option is not a no-op)."""
  problem = make_problem(rng, rows=200, d_model=24, hidden=470, d_out=20, glu=glu, bias=True,
                         dtype=jnp.float32)
  activation = kernel_activation("pwl", glu=glu)
  dy = jnp.asarray(rng.normal(size=(200, 20)), jnp.float32)
  _, expected = loss_and_grads(reference_in_float32, problem, activation, dy)
  grads = [g for g in backward.ffn_backward(
      *[problem[n] for n in ARG_NAMES], activation, dy, chunk=128,
      precision=jax.lax.Precision.HIGHEST, d_hidden_dtype=jnp.bfloat16) if g is not None]
  errors = [relative_error(g, want) for g, want in zip(grads, expected)]
  assert len(grads) == len(expected) and max(errors) < BF16_TOLERANCE, errors
  assert errors[1] > 1e-5, "dW_up did not see the rounding of d_hidden"


def test_split_preactivation_round_trip_and_specials(rng):
  """hi + lo within 2^-17 (bf16) / 2^-22 (f16) of p while lo is a normal number; infinities and
  NaN survive (lo = p - hi is NaN there and is ignored)."""
  sign = np.where(rng.random((64, 96)) < 0.5, -1.0, 1.0)
  for dtype, bound, exponents in ((jnp.bfloat16, 2.0 ** -17, (-30, 30)),
                                  (jnp.float16, 2.0 ** -22, (-0.5, 4))):
    p = jnp.asarray(sign * 10.0 ** rng.uniform(*exponents, (64, 96)), jnp.float32)
    joined = backward.join_preactivation(*backward.split_preactivation(p, dtype))
    assert float(jnp.max(jnp.abs(joined - p) / jnp.abs(p))) <= bound * 1.1  # + f32 rounding
  special = jnp.asarray([0.0, -0.0, jnp.inf, -jnp.inf, jnp.nan, 3.4e38], jnp.float32)
  joined = backward.join_preactivation(*backward.split_preactivation(special, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(joined[:4]), np.asarray(special[:4]))
  assert np.isnan(joined[4]) and np.isinf(joined[5])  # 3.4e38 rounds to bf16 infinity


@pytest.mark.parametrize("hinges", kernels.HINGES)
@pytest.mark.parametrize("pwl_dtype, tolerance", [("float32", 1e-5), ("float16", 3e-3)])
def test_pwl_hinge_table_matches_segment_form(rng, pwl_dtype, tolerance, hinges, monkeypatch):
  """s_0 h + c + Σ Δs_k max(h, t_k) and s_0 h + c_0 + Σ Δs_k relu(h - t_k) (what the kernels
  evaluate; the relu form here in jnp, as interpret mode runs it) equal s[seg] h + c[seg]."""
  monkeypatch.setattr(packed_pwl, "interpreting", lambda: True)  # outside a kernel: jnp forms
  h = jnp.asarray(rng.normal(size=(64, 96)) * 4, jnp.float32)
  for name in ("pwl", "pwl-tanh"):
    activation = kernel_activation(name, glu=True)
    table = hinge_table.activation_table(activation)
    num_knots = activation.knots.shape[0]
    got = kernels.apply_activation("pwl", h, table, num_knots, pwl_dtype, hinges)
    assert relative_error(got, activation(h)) < tolerance, name
    nan = kernels.apply_activation("pwl", jnp.full((2, 2), jnp.nan), table, num_knots,
                                   pwl_dtype, hinges)
    assert np.all(np.isnan(np.asarray(nan))), name


@pytest.mark.parametrize("hinges", kernels.HINGES)
def test_relu_hinges_lower_into_the_forward_kernel(hinges):
  """``hinges="relu"`` with f16 PWL math puts ``packed_pwl.relu_hinges``' fma.relu in the
  forward kernel (jax.export for cuda, no GPU needed) and no max; "max" the other way round."""
  activation = kernel_activation("pwl", glu=True)
  table = hinge_table.activation_table(activation)
  config = kernels.EpilogueConfig(128, 64, 3, pwl_dtype="float16", schedule="pingpong",
                                  hinges=hinges)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  forward = lambda x, w_up, w_gate, table: kernels.gemm1_activation(
      x, w_up, w_gate, None, None, table, kind="pwl", num_knots=activation.knots.shape[0],
      config=config, saves="floor-bits")
  module = cuda_module(forward, spec(512, 576), spec(576, 1536), spec(576, 1536),
                       jax.ShapeDtypeStruct(table.shape, table.dtype))
  assert ("fma.rn.relu.f16x2" in module) == (hinges == "relu")
  assert ("max.NaN.f16x2" in module) == (hinges == "max")  # Mosaic's lowering of jnp.maximum


def test_epilogue_config_rejects_unknown_hinges():
  with pytest.raises(ValueError, match="hinges='abs'"):
    kernels.EpilogueConfig(hinges="abs")


def test_plan_table():
  """Measured shapes get their tuned plan; unmeasured decode / large-D shapes go to XLA."""
  assert dispatch.choose_plan(8192, 576, 1536, 576, True, True) == dispatch.SMOLLM2_GLU_F16
  assert dispatch.SMOLLM2_GLU_F16.down == dispatch.DOWN_NARROW  # GEMM2 on our kernel
  assert dispatch.PINGPONG_GLU_F16.epilogue.hinges == "max"
  assert dispatch.choose_plan(8192, 1600, 6400, 1600, False, True).epilogue.hinges == "relu"
  assert dispatch.choose_plan(8192, 768, 3072, 768, False, True).epilogue.hinges == "max"
  assert dispatch.choose_plan(4096, 768, 3072, 768, False, False) == dispatch.GPT2_SMALL_MLP_F16
  assert dispatch.choose_plan(8192, 1600, 6400, 1600, False, True).down is None
  assert dispatch.choose_plan(8192, 1600, 6400, 1600, False, True).dgrad == (
      dispatch.DGRAD_PINGPONG_WIDE)
  assert dispatch.choose_plan(4096, 1600, 6400, 1600, False, False) == dispatch.EPILOGUE_MLP
  assert dispatch.choose_plan(16, 4096, 14336, 4096, True, True) == dispatch.XLA
  assert dispatch.choose_plan(16, 576, 1536, 576, True, False) == dispatch.XLA
  assert dispatch.choose_plan(64, 576, 1536, 576, True, True) == dispatch.XLA  # measured 12-04
  smollm2_decode = dispatch.choose_plan(16, 576, 1536, 576, True, True)  # paired, 12-04
  assert smollm2_decode.path == "decode" and smollm2_decode.decode.cluster_pairs
  assert dispatch.choose_plan(17, 576, 1536, 576, True, True) == dispatch.XLA
  assert dispatch.choose_plan(1, 576, 1536, 576, True, True) == dispatch.XLA  # padded row
  assert dispatch.choose_plan(16, 768, 3072, 768, False, True) == dispatch.XLA  # wall clock
  llama_1b = dispatch.choose_plan(8192, 2048, 8192, 2048, True, True)  # ping-pong relu, chunked
  assert (llama_1b.epilogue.hinges, llama_1b.backward, llama_1b.down) == (
      "relu", "xla", dispatch.DOWN_WIDE)
  smollm2 = dispatch.SMOLLM2_GLU_F16  # 5-byte segments, [d_g | d_u]
  assert smollm2.lookup_residuals and smollm2.joint_glu_gradients
  assert dispatch.choose_plan(8192, 4096, 14336, 4096, True, True) == dispatch.LLAMA_8B_GLU_F16
  assert dispatch.LLAMA_8B_GLU_F16.down == dispatch.DOWN_WIDE
  assert dispatch.choose_plan(300, 512, 2048, 512, False, True) == dispatch.PINGPONG_MLP_F16
  assert dispatch.choose_plan(300, 5120, 13824, 5120, True, False) == dispatch.EPILOGUE_GLU
  assert dispatch.choose_plan(300, 576, 1536, 576, True, True).residuals == "floor-bits"
  assert dispatch.choose_plan(300, 512, 2048, 512, True, False).residuals == "preactivations"
  assert dispatch.choose_plan(8192, 768, 3072, 768, False, True).residuals == "floor-bits"
  assert dispatch.choose_plan(8192, 768, 3072, 768, False, True) == dispatch.GPT2_SMALL_MLP_F16
  for pingpong_pwl in (dispatch.PINGPONG_MLP_F16, dispatch.PINGPONG_GLU_F16):  # dgrad kernel
    assert (pingpong_pwl.backward, pingpong_pwl.dgrad) == ("epilogue", dispatch.DGRAD_PINGPONG)
  mlp_pwl = dispatch.PINGPONG_MLP_F16  # the backward follows the residuals
  assert dispatch.with_residuals(mlp_pwl, False, "preactivations").backward == "epilogue"
  assert dispatch.with_residuals(mlp_pwl, False, "segments").backward == "xla"
  # a GLU's pairs overflow DGRAD_PINGPONG's SMEM: the chunked backward
  assert dispatch.with_residuals(dispatch.PINGPONG_GLU_F16, True,
                                 "preactivations").backward == "xla"
  assert dispatch.with_residuals(dispatch.PINGPONG_GLU_F16, True, "floor-bits").backward == (
      "epilogue")


def test_chunk_columns():
  """Near-equal chunks: gpt2-small's H = 3072 in two 1536-column chunks (not 2048 + 1024 padded
  to 2 x 2048), llama-8B's 14336 in two of 7168."""
  assert backward.chunk_columns(8192, 3072, 16 * 2**20) == 1536
  assert backward.chunk_columns(8192, 14336, 64 * 2**20) == 7168
  assert backward.chunk_columns(8192, 6400, 16 * 2**20) == 1664
  assert backward.chunk_columns(8192, 14336, 4 * 2**20) == 512
  assert backward.chunk_columns(16, 1536, 4 * 2**20) == 1536
  assert backward.chunk_columns(10**9, 1536, 4 * 2**20) == 128


@pytest.mark.skipif(ON_HOPPER, reason="checks the fallback on machines without a Hopper GPU")
def test_declines_without_hopper_and_ffn_falls_back(rng):
  problem = make_problem(rng, rows=6, d_model=16, hidden=24, d_out=16, glu=False, bias=False)
  with pytest.raises(NotImplementedError, match="GPU"):
    dispatch.ffn_mosaic_gpu(*[problem[n] for n in ARG_NAMES], Activation("gelu"))
  with pytest.warns(UserWarning, match="pallas_mosaic_gpu"):
    out = ff.ffn(**problem, activation="gelu", implementation="pallas_mosaic_gpu")
  expected = ff.ffn(**problem, activation="gelu", implementation="xla")
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


def test_pwls_with_more_knots_than_a_tma_box_holds_go_to_xla():
  """A PWL table longer than one TMA box (> 126 knots) is declined with its reason (the op then
  runs XLA's path); 126 knots are not (on this machine the device is the reason)."""
  x = jnp.zeros((8, 64), jnp.bfloat16)
  many = to_kernel_activation(ff.fit("gelu", 126, "uniform"))  # 127 knots
  assert "at most 126 knots, got 127" in dispatch.unsupported_reason(x, many)
  fits = to_kernel_activation(ff.fit("gelu", 125, "uniform"))
  assert "knots" not in (dispatch.unsupported_reason(x, fits) or "")


def test_configs_refuse_what_does_not_fit():
  with pytest.raises(NotImplementedError, match="registers"):
    kernels.FusedConfig().check(d_model=768, d_out=1024, num_weights=1, itemsize=2)
  with pytest.raises(NotImplementedError, match="SMEM"):
    kernels.FusedConfig(block_h=128, stages=4).check(640, 640, 2, 2)
  with pytest.raises(NotImplementedError, match="registers"):
    kernels.EpilogueConfig(tile_m=128, tile_n=128).check(num_weights=2, dtype=jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="SMEM"):
    decode_sm90.DecodeConfig().resolve_stages(d_model=4096, d_out=4096, num_weights=2, itemsize=2)
  with pytest.raises(NotImplementedError, match="SMEM"):
    decode_sm90.DecodeConfig(stages=8).resolve_stages(576, 576, 2, 2)
  assert decode_sm90.DecodeConfig().resolve_stages(576, 576, 2, 2) == 5
  assert decode_sm90.DecodeConfig().resolve_stages(128, 576, 2, 2) == 2  # K steps cap it
  assert decode_sm90.DecodeConfig(block_h=32).resolve_stages(576, 576, 2, 2) == 18
  with pytest.raises(NotImplementedError, match="block_h"):
    decode_sm90.DecodeConfig(block_h=48).resolve_stages(576, 576, 2, 2)
  pairs = decode_sm90.DecodeConfig(swap_ab=True, cluster_pairs=True)
  assert pairs.resolve_stages(576, 576, 2, 2) == 5  # 9 K slices: 5 and 4 (+ one past D)
  assert (pairs.own_d_out(576), pairs.own_d_out(704)) == (320, 384)
  for unpaired_only in (dict(swap_ab=False), dict(sum_in_kernel=True)):
    with pytest.raises(NotImplementedError, match="cluster_pairs"):
      dataclasses.replace(pairs, **unpaired_only).resolve_stages(576, 576, 2, 2)
  with pytest.raises(NotImplementedError, match="cluster_pairs"):
    pairs.resolve_stages(64, 576, 2, 2)  # one K slice: nothing to share
  kernels.FusedConfig().check(576, 576, 2, 2)
  kernels.EpilogueConfig(tile_m=64, tile_n=128).check(num_weights=2, dtype=jnp.bfloat16)


@pytest.mark.parametrize("rows, hidden, match", [(65, 1536, "M=65"), (16, 14336, "224 CTAs")])
def test_decode_sum_in_kernel_refuses_what_cannot_meet(rows, hidden, match):
  """The CTAs of a decode kernel that sums its partials wait for each other, so all must be
  resident: more than one row block (M > 64) or more CTAs than SMs (llama-8B's H / 64 = 224 >
  132) is refused at trace time, before any kernel is built; b_down without the in-kernel sum is a
  caller error (the caller adds it to the XLA sum)."""
  summed = decode_sm90.DecodeConfig(sum_in_kernel=True)
  x = jnp.ones((rows, 64), jnp.bfloat16)
  w_up, w_down = jnp.ones((64, hidden), jnp.bfloat16), jnp.ones((hidden, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=match):
    decode_sm90.decode_ffn(x, w_up, None, None, None, None, w_down, kind="gelu", num_knots=0,
                           config=summed)
  with pytest.raises(ValueError, match="b_down"):
    decode_sm90.decode_ffn(x, w_up, None, None, None, None, w_down, jnp.ones((64,), x.dtype),
                           kind="gelu", num_knots=0, config=decode_sm90.DecodeConfig())


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels
# ------------------------------------------------------------------------------------------------

GPU_CASES = {
    # name: (rows, D, H, D_out, glu, bias, activation, plan)
    "fused-glu-pwl-odd": (300, 576, 1000, 576, True, True, "pwl", FUSED_SMALL),
    "fused-mlp-gelu": (513, 640, 1536, 640, False, False, "gelu", dispatch.Plan(
        "fused", fused=kernels.FusedConfig(64, 2, 1))),
    "decode-split-glu-silu": (16, 576, 1536, 576, True, False, "silu", dispatch.Plan(
        "fused", fused=kernels.FusedConfig(64, 3, 12))),
    "decode-glu-pwl-odd": (5, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig())),
    "decode-mlp-gelu": (64, 768, 3072, 768, False, True, "gelu", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(stages=2))),
    "decode-b32-glu-pwl": (16, 576, 1536, 576, True, False, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(block_h=32, pwl_dtype="float16"))),
    # the CTAs sum their partials (semaphores + TMA reduce-add): odd M and H, biases, 48 CTAs
    "decode-summed-glu-pwl-odd": (5, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(sum_in_kernel=True))),
    "decode-summed-b32-mlp-gelu": (64, 768, 1536, 704, False, True, "gelu", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(32, sum_in_kernel=True))),
    # tokens on wgmma's N axis (no padding rows), with the XLA sum and summed in the kernel
    "decode-swapped-glu-pwl-odd": (5, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16", swap_ab=True))),
    "decode-swapped-summed-mlp-gelu": (64, 768, 1536, 704, False, True, "gelu", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(swap_ab=True, sum_in_kernel=True))),
    "decode-swapped-summed-glu-pwl": (16, 576, 1536, 576, True, False, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16", swap_ab=True,
                                                  sum_in_kernel=True))),
    # 2-CTA clusters share a hidden block (DSMEM exchange): odd K slices (9) and D_out pieces
    # (11), biases; an even MLP at M = 64 (GEMM2 in 64-row accumulators); SmolLM2 at M = 16
    "decode-paired-glu-pwl-odd": (5, 576, 1000, 700, True, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16", swap_ab=True,
                                                  cluster_pairs=True))),
    "decode-paired-mlp-gelu": (64, 768, 3072, 768, False, True, "gelu", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(swap_ab=True, cluster_pairs=True))),
    "decode-paired-glu-pwl": (16, 576, 1536, 576, True, False, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16", swap_ab=True,
                                                  cluster_pairs=True))),
    # launched with programmatic dependent launch (griddepcontrol.wait before the first load)
    "decode-paired-glu-pwl-pdl": (16, 576, 1536, 576, True, True, "pwl", dispatch.Plan(
        "decode", decode=decode_sm90.DecodeConfig(pwl_dtype="float16", swap_ab=True,
                                                  cluster_pairs=True, pdl=True))),
    "epilogue-mlp-pwl-odd": (1000, 768, 3000, 700, False, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 3))),
    "epilogue-glu-gelu_tanh": (777, 1024, 2816, 1024, True, True, "gelu_tanh", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3))),
    "epilogue-glu-pwl-saved": (1000, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3), residuals="preactivations")),
    "epilogue-glu-pwl-segment-xla": (1024, 576, 1536, 576, True, False, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3), residuals="preactivations",
        segment_sums="xla")),
    "epilogue-glu-silu-dgrad": (1000, 576, 1000, 576, True, True, "silu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3), residuals="preactivations",
        backward="epilogue")),
    "epilogue-mlp-gelu-dgrad": (513, 768, 3000, 700, False, True, "gelu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 3), residuals="preactivations",
        backward="epilogue")),
    "epilogue-mlp-gelu-saved": (513, 768, 3000, 768, False, False, "gelu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 256, 3), residuals="preactivations")),
    "epilogue-glu-pwl-segments": (1000, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3, pwl_dtype="float16"),
        residuals="segments")),
    "epilogue-mlp-pwl-segments": (513, 768, 3000, 700, False, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 256, 3), residuals="segments")),
    "epilogue-pp-glu-pwl-segments": (8192, 576, 1536, 576, True, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 64, 5, pwl_dtype="float16",
                                                    schedule="pingpong"), residuals="segments")),
    "epilogue-pp-glu-silu-odd": (1000, 576, 1000, 576, True, True, "silu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 4, schedule="pingpong"))),
    "epilogue-pp-mlp-gelu-saved": (1000, 768, 3000, 700, False, True, "gelu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 4, schedule="pingpong"),
        residuals="preactivations")),
    "epilogue-pp-mlp-pwl-segments": (513, 768, 3000, 700, False, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 4, schedule="pingpong"),
        residuals="segments")),
    "epilogue-glu-pwl-segments-per-output": (1000, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3, pwl_dtype="float16",
                                                    staging="per_output"), residuals="segments")),
    "epilogue-glu-pwl-segments-dh16": (1000, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3, pwl_dtype="float16"),
        residuals="segments", d_hidden="input")),
    "epilogue-pp-mlp-pwl-dh16": (513, 768, 3000, 700, False, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 4, pwl_dtype="float16",
                                                    schedule="pingpong"),
        residuals="preactivations", d_hidden="input")),
    "epilogue-glu-pwl-segments-kres": (1000, 576, 1000, 576, True, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3, pwl_dtype="float16"),
        residuals="segments", segment_sums="kernel-residuals")),
    "epilogue-mlp-pwl-saved-kres": (513, 768, 3000, 700, False, True, "pwl", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 3), residuals="preactivations",
        segment_sums="kernel-residuals")),
    "epilogue-glu-pwl-floor-bits": (1000, 576, 1000, 576, True, True, "pwl15", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3, pwl_dtype="float16"),
        residuals="floor-bits")),
    "epilogue-glu-pwl-floor-bits-kres": (1000, 576, 1000, 576, True, True, "pwl15", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 128, 3, pwl_dtype="float16"),
        residuals="floor-bits", segment_sums="kernel-residuals")),
    "epilogue-pp-mlp-pwl-floor-bits": (513, 768, 3000, 700, False, True, "pwl15", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(128, 128, 4, pwl_dtype="float16",
                                                    schedule="pingpong"),
        residuals="floor-bits")),
    "epilogue-pp-glu-pwl-floor-bits": (1000, 576, 1000, 576, True, True, "pwl15",
                                       dataclasses.replace(dispatch.PINGPONG_GLU_F16,
                                                           pwl_gradients_dgrad=None)),
    # a trained PWL's gradients from the dgrad kernel's bins (Plan.pwl_gradients_dgrad): the
    # lookup's segments, and the counted ones (on f16 pairs: p within ~2^-11 |t_k| of a knot
    # may take the neighbouring line, 4.4% of ||d slopes|| at 1000 x 1000 against f32 segments
    # on the H200, so the reference finds them on f16 too, ``segments_seen``; gpt2-small's MLP
    # plan: epilogue-pp-mlp-pwl-biased-down-gpt2-plan below, the case that passed on the H200
    # as dgrad-sums-mlp-pwl-odd)
    "dgrad-sums-mlp-pwl16u-odd": (513, 768, 3000, 700, False, True, "pwl16u", dataclasses.replace(
        dispatch.PINGPONG_MLP_F16, pwl_lookup=True, dgrad_lookup=True)),
    "dgrad-sums-glu-pwl-smollm2-plan": (8192, 576, 1536, 576, True, False, "pwl15",
                                        dispatch.SMOLLM2_GLU_F16),
    "dgrad-sums-glu-pwl-tanh-odd": (1000, 576, 1000, 700, True, True, "pwl15-tanh",
                                    dispatch.PINGPONG_GLU_F16),
    "epilogue-mlp-gelu-floor-bits": (513, 768, 3000, 700, False, True, "gelu", dispatch.Plan(
        "epilogue", epilogue=kernels.EpilogueConfig(64, 256, 3), residuals="floor-bits")),
    "epilogue-pp-mlp-gelu-saved-per-output": (1000, 768, 3000, 700, False, True, "gelu",
                                              dispatch.Plan("epilogue", residuals="preactivations",
                                                            epilogue=kernels.EpilogueConfig(
        128, 128, 4, schedule="pingpong", staging="per_output"))),
    "epilogue-pp-glu-pwl-tanh-relu-llama-plan": (1000, 576, 1000, 576, True, True, "pwl15-tanh",
                                                 dispatch.LLAMA_1B_GLU_F16),
    "epilogue-pp-glu-pwl-down-odd": (1000, 576, 1000, 700, True, True, "pwl15",
                                     dispatch.SMOLLM2_GLU_F16),
    "epilogue-pp-mlp-pwl-biased-down-gpt2-plan": (513, 768, 3000, 700, False, True, "pwl15",
                                                  dispatch.GPT2_SMALL_MLP_F16),
    "epilogue-pp-glu-pwl-lookup-odd": (1000, 576, 1000, 700, True, True, "pwl64u",
                                       dataclasses.replace(dispatch.SMOLLM2_GLU_F16,
                                                           pwl_lookup=True)),
    "epilogue-pp-glu-pwl-segment-lookup-odd": (1000, 576, 1000, 700, True, True, "pwl64u",
                                               dataclasses.replace(dispatch.SMOLLM2_GLU_F16,
                                                                   pwl_lookup=True,
                                                                   segment_lookup=True)),
    "epilogue-mlp-pwl-lookup-recompute-odd": (513, 768, 3000, 700, False, True, "pwl64u",
                                              dispatch.Plan(
        "epilogue", epilogue=dispatch.EPILOGUE_MLP.epilogue, pwl_lookup=True)),
}


DGRAD_GPU_CASES = {  # name: as GPU_CASES; gradients w.r.t. the arrays only (the dgrad kernel runs)
    "dgrad-pp-mlp-pwl-floor-bits-odd": (513, 768, 3000, 700, False, True, "pwl15", dispatch.Plan(
        "epilogue", epilogue=dispatch.PINGPONG_MLP_F16.epilogue, residuals="floor-bits",
        backward="epilogue", dgrad=dispatch.DGRAD_PINGPONG)),
    "dgrad-pp-glu-pwl-floor-bits-odd": (1000, 576, 1000, 576, True, True, "pwl15", dispatch.Plan(
        "epilogue", epilogue=dispatch.PINGPONG_GLU_F16.epilogue, residuals="floor-bits",
        backward="epilogue", dgrad=dispatch.DGRAD_PINGPONG)),
    "dgrad-pp-mlp-gpt2-small": (8192, 768, 3072, 768, False, False, "pwl15",
                                dispatch.PINGPONG_MLP_F16),
    "dgrad-pp-glu-smollm2": (8192, 576, 1536, 576, True, False, "pwl15",
                             dispatch.SMOLLM2_GLU_F16),
    "dgrad-pp-mlp-gelu-gpt2-small": (8192, 768, 3072, 768, False, False, "gelu",
                                     dispatch.choose_plan(8192, 768, 3072, 768, False, False)),
    "dgrad-pp-glu-silu-floor-bits-odd": (1000, 576, 1000, 576, True, True, "silu",
                                         dispatch.PINGPONG_GLU_F16),
    # gpt2-xl's plan: relu hinges (inference), the counted segments read on the wide dgrad tiles
    "dgrad-pp-mlp-pwl-gpt2-xl-plan-odd": (513, 768, 3000, 700, False, True, "pwl15",
                                          dispatch.GPT2_XL_MLP_F16),
    # the ping-pong plans' optimal PWL-16 saves its knots' count (lookup_residuals) and h (MLP)
    # or act(g) and u (GLU; here with d_g and d_u as two arrays)
    "dgrad-pp-mlp-pwl-counted-segments-odd": (513, 768, 3000, 700, False, True, "pwl15",
                                              dispatch.PINGPONG_MLP_F16),
    "dgrad-pp-glu-pwl-counted-segments-odd": (1000, 576, 1000, 700, True, True, "pwl15",
                                              dataclasses.replace(dispatch.PINGPONG_GLU_F16,
                                                                  joint_glu_gradients=False)),
    # llama-1B's forward (relu hinges in inference) with the dgrad backward it may take
    # (segments and [d_g | d_u]; a tie with its chunked one on the H200, see
    # dispatch.PINGPONG_GLU_F16_RELU_CHUNKED)
    "dgrad-pp-glu-pwl-llama-plan-odd": (1000, 576, 1000, 700, True, True, "pwl15",
                                        dataclasses.replace(dispatch.SMOLLM2_GLU_F16, epilogue=(
                                            dispatch.LLAMA_1B_GLU_F16.epilogue),
                                                            down=dispatch.DOWN_WIDE)),
    # a GLU's dgrad kernel writing [d_g | d_u] as one array (joint_glu_gradients) from floor bits,
    # and from the segments (SmolLM2's plan; the uniform PWL's counted, as no pwl_lookup here)
    "dgrad-pp-glu-pwl-joint-odd": (1000, 576, 1000, 700, True, True, "pwl15", dataclasses.replace(
        dispatch.SMOLLM2_GLU_F16, lookup_residuals=False)),
    "dgrad-pp-glu-pwl-segments-joint-odd": (1000, 576, 1000, 700, True, True, "pwl64u",
                                            dispatch.SMOLLM2_GLU_F16),
    "dgrad-pp-mlp-pwl-tanh-relu-hinges-odd": (513, 768, 3000, 700, False, True, "pwl15-tanh",
                                              dispatch.PINGPONG_MLP_F16_RELU),
    "dgrad-pp-mlp-pwl-down-odd": (513, 768, 3000, 700, False, True, "pwl15", dataclasses.replace(
        dispatch.PINGPONG_MLP_F16, down=kernels.EpilogueConfig(128, 128, 4, schedule="pingpong"))),
    # an MLP's uniform PWL saves h and the lookup's segments (lookup_residuals, the plan's)
    "dgrad-pp-mlp-pwl-lookup-segments-odd": (513, 768, 3000, 700, False, True, "pwl64u",
                                             dataclasses.replace(dispatch.PINGPONG_MLP_F16,
                                                                 pwl_lookup=True,
                                                                 dgrad_lookup=True)),
    "dgrad-pp-mlp-pwl-dgrad-lookup-gpt2-small": (8192, 768, 3072, 768, False, False, "pwl64u",
                                                 dataclasses.replace(dispatch.PINGPONG_MLP_F16,
                                                                     pwl_lookup=True,
                                                                     dgrad_lookup=True)),
    # a GLU's uniform PWL by lookup in the dgrad kernel, from floor bits
    "dgrad-pp-glu-pwl-dgrad-lookup-odd": (1000, 576, 1000, 700, True, True, "pwl64u",
                                          dataclasses.replace(dispatch.PINGPONG_GLU_F16,
                                                              pwl_lookup=True, dgrad_lookup=True,
                                                              lookup_residuals=False,
                                                              joint_glu_gradients=False)),
    # a GLU's lookup residuals: act(g), u and the lookup's segments saved
    "dgrad-pp-glu-pwl-lookup-segments-odd": (1000, 576, 1000, 700, True, True, "pwl64u",
                                             dataclasses.replace(dispatch.PINGPONG_GLU_F16,
                                                                 pwl_lookup=True,
                                                                 dgrad_lookup=True,
                                                                 joint_glu_gradients=False)),
    "dgrad-pp-mlp-gelu-pairs": (1000, 768, 3000, 700, False, True, "gelu", dispatch.Plan(
        "epilogue", epilogue=dispatch.EPILOGUE_MLP.epilogue, residuals="preactivations",
        backward="epilogue", dgrad=dispatch.DGRAD_PINGPONG)),
}


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES) + sorted(DGRAD_GPU_CASES))
def test_gpu_forward_and_gradients(rng, case):
  pwl_gradients = case in GPU_CASES
  rows, d_model, hidden, d_out, glu, bias, name, plan = (GPU_CASES if pwl_gradients
                                                         else DGRAD_GPU_CASES)[case]
  problem = make_problem(rng, rows, d_model, hidden, d_out, glu, bias)
  check_against_reference(problem, kernel_activation(name, glu), plan, pwl_gradients)


@needs_hopper
@pytest.mark.gpu
def test_gpu_uniform_pwl_layer_takes_the_lookup_inside_jit(rng, monkeypatch):
  """A frozen uniform PWL-64 in an ``nnx`` layer inside ``nnx.jit`` (its knots traced) runs the
  lookup forward and dgrad kernels - the plan the dispatcher returns says so - and matches the f32
  XLA layer: output and the gradients of x and every weight, SmolLM2's GLU widths at M = 1000."""
  from flax import nnx  # noqa: PLC0415 -- the layer API, only this test
  from flashffn_jax.nnx import FusedFFN  # noqa: PLC0415
  plans = []
  choose = dispatch.with_pwl_lookup
  monkeypatch.setattr(dispatch, "with_pwl_lookup",
                      lambda *args: plans.append(choose(*args)) or plans[-1])
  rows, d_model, hidden = 1000, 576, 1536
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
  weights = dict(w_up=normal(d_model, hidden), w_down=normal(hidden, d_model),
                 w_gate=normal(d_model, hidden))
  x = jnp.asarray(rng.normal(size=(rows, d_model)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(rows, d_model)), jnp.float32)
  activation = ff.fit("silu", 64, "uniform")

  @nnx.jit
  def output_and_grads(layer, x):
    loss = lambda layer, x: (jnp.sum(layer(x).astype(jnp.float32) * dy), layer(x))
    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return y, grads

  bf16 = lambda a: a.astype(jnp.bfloat16)
  ours = FusedFFN.from_weights(**{k: bf16(v) for k, v in weights.items()},
                               activation=activation, implementation="pallas_mosaic_gpu")
  # the reference reads the same bf16-rounded numbers, in f32
  reference = FusedFFN.from_weights(**{k: bf16(v).astype(jnp.float32) for k, v in weights.items()},
                                    activation=activation, implementation="xla")
  (y, (d_layer, dx)), (y_ref, (d_layer_ref, dx_ref)) = (
      output_and_grads(layer, bf16(x).astype(layer.w_up.dtype)) for layer in (ours, reference))
  assert plans and all(plan.pwl_lookup and plan.dgrad_lookup for plan in plans), plans
  assert relative_error(y, y_ref) < BF16_TOLERANCE
  assert relative_error(dx, dx_ref) < BF16_TOLERANCE
  for name in weights:
    assert relative_error(d_layer[name][...], d_layer_ref[name][...]) < BF16_TOLERANCE, name


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("fit", ["pwl15", "pwl15-tanh"])
@pytest.mark.parametrize("glu", [False, True])
def test_packed_pwl_epilogue_against_jnp_forms(rng, glu, fit, monkeypatch):
  """The dgrad kernel's PWL value and slope from one select chain in PTX on f16 pairs
  (``packed_pwl``, what f16 PWL math runs on a GPU; no interpret mode) against the jnp forms it
  replaced (hinges + select chain), gpt2-small / SmolLM2 widths, M = 1000 (partial tiles; the
  kernel needs M % 8 == 0, which ``dispatch`` pads to): the same slope selection
  (MLP d_u, GLU d_g bitwise equal), and h = pwl(p) (u) no further from the f32 PWL of f16(p)
  (two roundings instead of sixteen)."""
  rows, d_out, hidden = (1000, 576, 1536) if glu else (1000, 768, 3072)
  dy = jnp.asarray(rng.normal(size=(rows, d_out)), jnp.bfloat16)
  w_down = jnp.asarray(rng.normal(size=(hidden, d_out)) / np.sqrt(d_out), jnp.bfloat16)
  pres = [jnp.asarray(rng.normal(size=(rows, hidden)) * 2, jnp.float32) for _ in range(1 + glu)]
  saved = backward.save_preactivations(pres, jnp.bfloat16, "floor-bits")
  activation = kernel_activation(fit, glu)
  run = lambda: jax.block_until_ready(jax.jit(lambda *a: dgrad_sm90.dgrad_activation(
      *a, kind="pwl", num_knots=activation.knots.shape[0], config=dispatch.DGRAD_PINGPONG))(
          dy, w_down, saved, hinge_table.activation_table(activation)))
  packed = run()
  monkeypatch.setattr(dgrad_sm90, "_pwl_value_and_slope", lambda p, table, n, dtype: (
      dgrad_sm90.apply_activation("pwl", p, table, n, dtype),
      dgrad_sm90._pwl_derivative(p, table, n, dtype)))
  jnp_forms = run()
  pre = [backward.join_saved(parts) for parts in saved]
  act, _ = backward._activation_and_derivative(
      activation, pre[0].astype(jnp.float16).astype(jnp.float32))
  slope_output = 2 if glu else 1  # d_g = d_hidden u pwl'(g), d_u = d_hidden pwl'(u)
  np.testing.assert_array_equal(np.asarray(packed[slope_output]),
                                np.asarray(jnp_forms[slope_output]))
  errors = [relative_error(outputs[0], act * pre[1] if glu else act)
            for outputs in (packed, jnp_forms)]
  assert errors[0] <= errors[1] < BF16_TOLERANCE / 2, errors


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("fit", ["pwl15", "pwl15-tanh"])
@pytest.mark.parametrize("glu", [False, True])
def test_gpu_relu_hinges_in_ptx_against_jnp(rng, glu, fit, monkeypatch):
  """The forward kernel's ``hinges="relu"`` (``packed_pwl.relu_hinges``, PTX on f16 pairs; no
  interpret mode) against the same relu form in jnp (what interpret mode runs) and the max form,
  gpt2-small / SmolLM2 widths, M = 1000 (partial tiles): each within f16 rounding of the f32
  PWL, the PTX form no further from it than 1.5x the jnp forms; NaN in x stays NaN in its row."""
  rows, d_model, hidden = (1000, 576, 1536) if glu else (1000, 768, 3072)
  problem = make_problem(rng, rows, d_model, hidden, d_model, glu, bias=False)
  x = problem["x"].at[7, 3].set(jnp.nan)
  activation = kernel_activation(fit, glu)
  table = hinge_table.activation_table(activation)
  tiles = dispatch.PINGPONG_GLU_TILES if glu else dispatch.PINGPONG_MLP_TILES
  run = lambda hinges: jax.jit(lambda *a: kernels.gemm1_activation(
      *a, None, None, table, kind="pwl", num_knots=activation.knots.shape[0],
      config=kernels.EpilogueConfig(**tiles, pwl_dtype="float16", schedule="pingpong",
                                    hinges=hinges)))(x, problem["w_up"], problem.get("w_gate"))
  ptx = run("relu")
  monkeypatch.setattr(packed_pwl, "interpreting", lambda: True)  # the jnp forms
  jnp_relu, jnp_max = run("relu"), run("max")
  up = jnp.dot(x, problem["w_up"], preferred_element_type=jnp.float32)
  want = (activation(jnp.dot(x, problem["w_gate"], preferred_element_type=jnp.float32)) * up
          if glu else activation(up))
  rows_ok = np.arange(rows) != 7
  errors = [relative_error(h[rows_ok], want[rows_ok]) for h in (ptx, jnp_relu, jnp_max)]
  assert errors[0] < BF16_TOLERANCE and errors[0] <= 1.5 * min(errors[1:]), errors
  assert np.all(np.isnan(np.asarray(ptx[7], np.float32)))


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["silu", "pwl"])
def test_gpu_float16_inputs_on_smollm2_plans(rng, monkeypatch, name):
  """float16 inputs at SmolLM2's widths, the public op's own plan: floor bits need bf16, so a
  GLU PWL saves segments and the exact SiLU (hi, lo) pairs (which
  ``test_float16_inputs_on_a_floor_bits_plan`` traces on CPU); here they run, forward and
  gradients against the f32 reference, M = 1000 (partial tiles)."""
  saves = record_saves(monkeypatch)
  problem = make_problem(rng, 1000, 576, 1536, 576, glu=True, bias=False, dtype=jnp.float16)
  check_against_reference(problem, kernel_activation(name, glu=True), None, pwl_gradients=False)
  assert ("segments" if name == "pwl" else "preactivations") in saves, saves


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(64, 256, 3, "cooperative"), (128, 128, 3, "cooperative"),
                                   (128, 128, 4, "pingpong")])
def test_gpu_epilogue_forward_at_gpt2_xl(rng, tiles):
  """Regression: at gpt2-xl (M = 8192, 1600/6400, 25 K steps, ~12 tiles per SM) 64 x 256 tiles
  gave rel. err 1.7e-2 when one wgmma stayed in flight across the persistent loop's tiles (see
  gemm1_activation); the forward must match the f32 reference like XLA's bf16 path (2.4e-3)."""
  problem = make_problem(rng, 8192, 1600, 6400, 1600, glu=False, bias=False)
  activation = kernel_activation("gelu", glu=False)
  tile_m, tile_n, stages, schedule = tiles
  plan = dispatch.Plan("epilogue", epilogue=kernels.EpilogueConfig(tile_m, tile_n, stages,
                                                                    schedule=schedule))
  arrays = [problem[n] for n in ARG_NAMES]
  out = jax.jit(lambda *a: dispatch._forward(plan, *a, activation))(*arrays)
  expected = jax.jit(lambda *a: reference_in_float32(*a, activation))(*arrays)
  assert relative_error(out, expected) < 4e-3


@needs_hopper
@pytest.mark.gpu
def test_gpu_public_op_with_batch_dims_and_nan(rng):
  """ff.ffn picks the kernel by default on Hopper; NaN in x comes out as NaN in its row."""
  problem = make_problem(rng, rows=2 * 96, d_model=576, hidden=1536, d_out=576, glu=True,
                         bias=False)
  x = problem.pop("x").reshape(2, 96, 576)
  act = ff.fit("silu", 16)
  out = ff.ffn(x, **problem, activation=act)
  expected = ff.ffn(x.astype(jnp.float32), **{k: None if v is None else v.astype(jnp.float32)
                                              for k, v in problem.items()},
                    activation=act, implementation="xla")
  assert out.shape == (2, 96, 576)
  assert relative_error(out, expected) < BF16_TOLERANCE
  poisoned = ff.ffn(x.at[1, 5, 7].set(jnp.nan), **problem, activation=act)
  assert np.all(np.isnan(np.asarray(poisoned[1, 5], np.float32)))
  assert np.all(np.isfinite(np.asarray(poisoned[0], np.float32)))
  one_token = x[:1, :1]  # batch-1 decode: the kernel declines, XLA runs on 8 zero-padded rows
  assert ff.chosen_implementation(one_token, **problem, activation=act) == "xla_padded_row"
  assert relative_error(ff.ffn(one_token, **problem, activation=act), expected[:1, :1]) < BF16_TOLERANCE


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("glu, d_model, hidden", [(True, 576, 1536), (False, 768, 3072)])
def test_gpu_float16_saves_the_floor_bits_fallback(rng, glu, d_model, hidden):
  """The tuned bf16 PWL plans save floor bits (bf16 only); the op given float16 inputs saves
  ``float16_residuals`` instead: forward and gradients vs the f32 reference."""
  assert dispatch.choose_plan(1000, d_model, hidden, d_model, glu, True).residuals == "floor-bits"
  problem = make_problem(rng, 1000, d_model, hidden, d_model, glu, bias=True, dtype=jnp.float16)
  check_against_reference(problem, kernel_activation("pwl", glu), plan=None)


@needs_hopper
@pytest.mark.gpu
def test_gpu_decode_summed_in_kernel_over_chained_calls(rng):
  """sum_in_kernel's semaphores are fresh per launch: 12 chained one-launch decode FFNs in one jit
  (SmolLM2's GLU widths, M = 16, biases), called three times on new inputs. Every layer's output
  matches the f32 reference on that layer's own input (a stale count would let CTAs convert A
  before every partial landed, or zero it after some had), and a repeat call gives the same
  numbers (the f32 sum's order may differ: within a few bf16 units in the last place)."""
  layers, rows, d_model, hidden = 12, 16, 576, 1536
  activation = kernel_activation("pwl", True)
  plan = dispatch.Plan("decode", decode=decode_sm90.DecodeConfig(sum_in_kernel=True))
  problems = [make_problem(rng, rows, d_model, hidden, d_model, True, bias=True)
              for _ in range(layers)]
  weights = [tuple(p[name] for name in ARG_NAMES[1:]) for p in problems]

  @jax.jit
  def chain(x, weights):
    outputs = []
    for w in weights:
      x = dispatch.ffn_mosaic_gpu(x, *w, activation, plan=plan)
      outputs.append(x)
    return outputs

  f32 = lambda a: None if a is None else a.astype(jnp.float32)
  for call in range(3):
    x = jnp.asarray(rng.normal(size=(rows, d_model)), jnp.bfloat16)
    outputs, layer_input = chain(x, weights), x
    for layer, (w, y) in enumerate(zip(weights, outputs)):
      expected = reference_ffn(f32(layer_input), *map(f32, w), activation,
                               precision=jax.lax.Precision.HIGHEST)
      assert relative_error(y, expected) < BF16_TOLERANCE, (call, layer)
      layer_input = y
  assert relative_error(chain(x, weights)[0], outputs[0]) < 1e-3


@needs_hopper
@pytest.mark.gpu
def test_gpu_declines_float32(rng):
  problem = make_problem(rng, rows=64, d_model=64, hidden=128, d_out=64, glu=False, bias=False,
                         dtype=jnp.float32)
  with pytest.raises(NotImplementedError, match="bfloat16"):
    dispatch.ffn_mosaic_gpu(*[problem[n] for n in ARG_NAMES], Activation("gelu"))
