"""The Mosaic TPU fused FFN kernel, run in TPU interpret mode on CPU, against the XLA reference.

Every kernel run uses ``pltpu.InterpretParams`` with out-of-bounds reads raising and
uninitialised memory filled with NaN (a missed initialisation or a block read past its operand
shows up as NaN / an exception), on fresh random inputs with odd shapes (M, D, H, D_out not
multiples of the blocks). One test runs each kernel on two simulated cores with the race
detector on. The reference is ``ops.reference_ffn`` on the same values in float32 at HIGHEST
precision, differentiated by JAX (its PWL gradients come from ``pwl_apply``'s VJP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax._src.pallas.mosaic.interpret import interpret_pallas_call

import flashffn_jax as ff
from flashffn_jax import ops
from pallas_kernels.activation import EXACT_ACTIVATIONS, Activation
from pallas_kernels.tpu import fused_ffn as tpu_ffn
from pallas_kernels.tpu import tiling
from pallas_kernels.tpu.tiling import Blocks, Tiling
from tests.conftest import assert_pwl_grads_close, relative_error
from tests.preactivations import knots_clear_of

INTERPRET = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
# Small blocks so that every kernel takes several steps along both grid axes; the two backward
# paths: two kernels (dx over (M, H), weight gradients over (H, M)) or one fused kernel.
SMALL = Tiling(Blocks(32, 128), backward_dx=Blocks(32, 128), backward_dweights=Blocks(32, 128))
SMALL_FUSED = Tiling(Blocks(32, 128), backward_fused=Blocks(32, 128))
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
WEIGHT_NAMES = ("w_up", "w_down", "w_gate", "b_up", "b_gate", "b_down")


def odd_shape(rng) -> tuple[int, int, int, int]:
  """(M, D, H, D_out), none a multiple of its block or of 128."""
  pick = lambda lo, hi: int(rng.choice([n for n in range(lo, hi) if n % 8]))
  return pick(40, 100), pick(64, 200), pick(130, 300), pick(40, 200)


def make_problem(rng, shape, glu: bool, bias: bool, dtype) -> dict:
  m, d, h, d_out = shape
  arrays = dict(x=rng.normal(size=(m, d)), w_up=rng.normal(size=(d, h)) / np.sqrt(d),
                w_down=rng.normal(size=(h, d_out)) / np.sqrt(h))
  if glu:
    arrays["w_gate"] = rng.normal(size=(d, h)) / np.sqrt(d)
  if bias:
    arrays.update(b_up=0.3 * rng.normal(size=h), b_down=0.3 * rng.normal(size=d_out))
    if glu:
      arrays["b_gate"] = 0.3 * rng.normal(size=h)
  return {name: jnp.asarray(value, dtype) for name, value in arrays.items()}


def make_activation(name: str) -> Activation:
  """'pwl-gelu' -> a 16-segment minimax PWL of GELU; otherwise the exact activation."""
  if name.startswith("pwl-"):
    return ops.to_kernel_activation(ff.fit(name.removeprefix("pwl-"), 8))
  return Activation(name)


def as_call(fn, problem: dict, activation: Activation, **kwargs):
  """A function of (problem, slopes, intercepts, knots) running `fn` with the implementation
  signature, so that JAX differentiates through the PWL tables too."""
  def call(arrays, slopes, intercepts, knots):
    act = Activation("pwl", knots, slopes, intercepts) if activation.kind == "pwl" else activation
    weights = [arrays.get(name) for name in WEIGHT_NAMES]
    return fn(arrays["x"], *weights, activation=act, **kwargs)
  return call


def vjp_both(problem: dict, activation: Activation, rng, **kernel_kwargs):
  """(kernel output, kernel gradients, reference output, reference gradients) for one random
  cotangent; the reference sees the same values in float32 at HIGHEST precision. A PWL's knots
  are first moved clear of the pre-activations (``knots_clear_of``)."""
  activation = knots_clear_of(activation, problem)
  tables = (activation.slopes, activation.intercepts, activation.knots)
  kernel = as_call(tpu_ffn.fused_ffn, problem, activation, **kernel_kwargs)
  reference = as_call(ops.reference_ffn, problem, activation, precision=jax.lax.Precision.HIGHEST)
  y, kernel_vjp = jax.vjp(kernel, problem, *tables)
  f32_problem = {name: value.astype(jnp.float32) for name, value in problem.items()}
  y_ref, reference_vjp = jax.vjp(reference, f32_problem, *tables)
  cotangent = jnp.asarray(rng.normal(size=y.shape), y.dtype)
  return y, kernel_vjp(cotangent), y_ref, reference_vjp(cotangent.astype(jnp.float32))


def assert_close(name, actual, expected, tolerance):
  error = relative_error(actual, expected)
  assert error < tolerance, f"{name}: relative error {error:.3g} >= {tolerance:g}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation_name", ["pwl", "exact"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_forward_and_all_gradients_match_reference(rng, glu, bias, activation_name, dtype):
  shape = odd_shape(rng)
  problem = make_problem(rng, shape, glu, bias, dtype)
  base = "silu" if glu else "gelu"  # SwiGLU and GELU MLPs, as in the models we target
  activation = make_activation(f"pwl-{base}" if activation_name == "pwl" else base)
  y, grads, y_ref, grads_ref = vjp_both(problem, activation, rng, tiling=SMALL,
                                         interpret=INTERPRET)
  tolerance = TOLERANCE[dtype]
  assert y.shape == (shape[0], shape[3]) and y.dtype == dtype
  assert_close("y", y, y_ref, tolerance)
  for name in problem:
    assert grads[0][name].dtype == dtype, name
    assert_close(f"d{name}", grads[0][name], grads_ref[0][name], tolerance)
  if activation.kind == "pwl":
    assert_close("d_slopes", grads[1], grads_ref[1], tolerance)
    assert_close("d_intercepts", grads[2], grads_ref[2], tolerance)
    np.testing.assert_array_equal(grads[3], 0.0)  # knots: the caller's chain rule handles them


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation_name", ["pwl", "exact"])
@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_fused_backward_matches_reference(rng, glu, activation_name, dtype):
  """The one-kernel backward (all weight gradients resident) on the same checks; GLU with
  biases, MLP without."""
  shape = odd_shape(rng)
  problem = make_problem(rng, shape, glu, bias=glu, dtype=dtype)
  base = "silu" if glu else "gelu"
  activation = make_activation(f"pwl-{base}" if activation_name == "pwl" else base)
  y, grads, y_ref, grads_ref = vjp_both(problem, activation, rng, tiling=SMALL_FUSED,
                                         interpret=INTERPRET)
  tolerance = TOLERANCE[dtype]
  assert_close("y", y, y_ref, tolerance)
  for name in problem:
    assert_close(f"d{name}", grads[0][name], grads_ref[0][name], tolerance)
  if activation.kind == "pwl":
    assert_close("d_slopes", grads[1], grads_ref[1], tolerance)
    assert_close("d_intercepts", grads[2], grads_ref[2], tolerance)


@pytest.mark.parametrize("name", [n for n in EXACT_ACTIVATIONS if n not in ("gelu", "silu")])
def test_other_exact_activations(rng, name):
  shape = odd_shape(rng)
  problem = make_problem(rng, shape, glu=False, bias=True, dtype=jnp.float32)
  y, grads, y_ref, grads_ref = vjp_both(problem, Activation(name), rng, tiling=SMALL,
                                         interpret=INTERPRET)
  assert_close("y", y, y_ref, 1e-5)
  for key in problem:
    assert_close(f"d{key}", grads[0][key], grads_ref[0][key], 1e-5)


def _racy_accumulation(interpret):
  """A deliberately wrong kernel: both steps of a "parallel" axis add into one output block."""
  def kernel(x_ref, o_ref):
    o_ref[...] += x_ref[...]

  return pl.pallas_call(
      kernel, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret)(jnp.ones((16, 128), jnp.float32))


def test_kernels_are_race_free_on_two_cores(rng):
  """Each kernel's "parallel" axis split over two simulated cores: no core touches another's
  accumulators. The control kernel shows the detector does report a race."""
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                 out_of_bounds_reads="raise", uninitialized_memory="nan")
  jax.block_until_ready(_racy_accumulation(params))
  assert interpret_pallas_call.races.races_found, "the race detector missed the control race"

  problem = make_problem(rng, (70, 130, 300, 90), glu=True, bias=True, dtype=jnp.float32)
  activation = make_activation("pwl-silu")
  config, fused_config = (
      tpu_ffn.make_config(problem["x"], problem["w_up"], problem["w_down"], problem["w_gate"],
                          activation, tiling=tiling_choice, interpret=params)
      for tiling_choice in (SMALL, SMALL_FUSED))
  weights, tables = tpu_ffn.pack_operands(*(problem.get(n) for n in WEIGHT_NAMES), activation)
  dy = jnp.asarray(rng.normal(size=(70, 90)), jnp.float32)
  runs = {
      "forward": lambda: tpu_ffn.forward_kernel(config, problem["x"], weights, tables),
      "backward_dx": lambda: tpu_ffn.backward_dx_kernel(config, problem["x"], weights, tables, dy),
      "backward_dweights": lambda: tpu_ffn.backward_dweights_kernel(config, problem["x"], weights,
                                                                    tables, dy),
      "backward_fused": lambda: tpu_ffn.backward_fused_kernel(fused_config, problem["x"], weights,
                                                              tables, dy),
  }
  for kernel, run in runs.items():
    outputs = jax.block_until_ready(run())
    assert not interpret_pallas_call.races.races_found, f"{kernel}: data race"
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(outputs)), kernel


def test_out_of_bounds_reads_raise_in_interpret_mode():
  """Control for the OOB check every kernel test relies on: a block index past the array raises."""
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  call = pl.pallas_call(kernel, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i + 1, 0))],
                        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                        out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32), interpret=INTERPRET)
  try:
    with pytest.raises(Exception, match="(?i)out of bounds|out-of-bounds"):
      jax.block_until_ready(call(jnp.ones((16, 128), jnp.float32)))
  finally:
    pltpu.reset_tpu_interpret_mode_state()


def test_public_op_with_auto_tiling_and_pwl_parameters(rng):
  """ff.ffn(implementation="pallas_tpu_interpret") on batched input with the tiling it chooses
  itself, gradients w.r.t. x, weights and the PiecewiseLinear's own parameters."""
  problem = make_problem(rng, (300, 200, 400, 200), glu=True, bias=True, dtype=jnp.float32)
  pwl = knots_clear_of(ff.fit("silu", 8, "curvature"), problem)
  x = problem.pop("x").reshape(3, 100, 200)

  def loss(x, problem, pwl, implementation):
    y = ff.ffn(x, **problem, activation=pwl, implementation=implementation,
               precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jnp.sin(y))

  grad = jax.grad(loss, argnums=(0, 1, 2))
  got = grad(x, problem, pwl, "pallas_tpu_interpret")
  want = grad(x, problem, pwl, "xla")
  assert_close("dx", got[0], want[0], 1e-5)
  for name in problem:
    assert_close(f"d{name}", got[1][name], want[1][name], 1e-5)
  assert_pwl_grads_close(got[2], want[2], 1e-5)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the fallback off TPU")
def test_pallas_tpu_declines_off_tpu(rng):
  problem = make_problem(rng, (8, 64, 128, 64), glu=False, bias=False, dtype=jnp.float32)
  with pytest.warns(UserWarning, match=r"'pallas_tpu' cannot run this FFN \(needs a TPU"):
    out = ff.ffn(**problem, implementation="pallas_tpu")
  np.testing.assert_array_equal(out, ff.ffn(**problem, implementation="xla"))


@pytest.mark.parametrize("change,reason", [
    (dict(activation=jnp.tanh), "callable activations run on the XLA path"),
    (dict(dtype=jnp.float16), "float16 inputs"),
])
def test_declines_what_it_cannot_serve(rng, change, reason):
  problem = make_problem(rng, (8, 64, 128, 64), glu=False, bias=False,
                         dtype=change.get("dtype", jnp.float32))
  activation = change.get("activation", "gelu")
  with pytest.raises(NotImplementedError, match=reason):
    tpu_ffn.pallas_tpu_interpret(problem["x"], problem["w_up"], problem["w_down"], None, None,
                                 None, None, ops.to_kernel_activation(activation))
  with pytest.warns(UserWarning, match=reason):
    out = ff.ffn(**problem, activation=activation, implementation="pallas_tpu_interpret")
  np.testing.assert_array_equal(out, ff.ffn(**problem, activation=activation, implementation="xla"))


def test_nan_propagates_to_its_row_only(rng):
  problem = make_problem(rng, (40, 64, 200, 64), glu=True, bias=True, dtype=jnp.float32)
  problem["x"] = problem["x"].at[5, 7].set(jnp.nan)
  activation = make_activation("pwl-silu")
  y = as_call(tpu_ffn.fused_ffn, problem, activation, tiling=SMALL, interpret=INTERPRET)(
      problem, activation.slopes, activation.intercepts, activation.knots)
  assert np.all(np.isnan(y[5]))
  assert np.all(np.isfinite(np.delete(np.asarray(y), 5, axis=0)))


@pytest.mark.parametrize("bad,match", [
    (Tiling(Blocks(16, 128), Blocks(8, 128), Blocks(16, 128)),  # bf16 rows come in 16s
     "tiling.backward_dx.block_m: expected a positive multiple of 16"),
    (Tiling(Blocks(16, 100), backward_fused=Blocks(16, 128)),
     "tiling.forward.block_h: expected a positive multiple of 128"),
    (Tiling(Blocks(16, 128), Blocks(16, 128), Blocks(16, 128), Blocks(16, 128)),
     "tiling: expected blocks for exactly one backward path"),
])
def test_bad_tiling_names_the_argument(rng, bad, match):
  problem = make_problem(rng, (8, 64, 128, 64), glu=False, bias=False, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    tpu_ffn.fused_ffn(problem["x"], problem["w_up"], problem["w_down"],
                      activation=Activation("gelu"), tiling=bad, interpret=INTERPRET)


MODEL_SHAPES = {  # (D, H, GLU) of the models the roofline table covers
    "gpt2-small": (768, 3072, False), "smollm2": (576, 1536, True),
    "llama1b": (2048, 8192, True), "llama8b": (4096, 14336, True),
}


@pytest.mark.parametrize("chip", ["v4", "v5e", "v5p", "v6e"])
@pytest.mark.parametrize("model", MODEL_SHAPES)
def test_chosen_tiling_fits_vmem_and_streams_weights_above_the_ridge(chip, model):
  """For M = 8192 bf16 tokens: blocks obey the (8, 128) rule, every kernel fits 3/4 of VMEM,
  and the forward's weight stream (bm flops per byte) is compute bound on the chip."""
  d, h, glu = MODEL_SHAPES[model]
  problem = tiling.Problem(m=8192, d=d, h=h, d_out=d, itemsize=2, glu=glu, pwl_segments=18)
  info = tiling.chip_info(chip)
  if chip == "v4" and model == "llama8b":
    with pytest.raises(NotImplementedError, match="backward_dweights tiling .* 16 MiB"):
      tiling.choose_tiling(problem, info)
    return
  chosen = tiling.choose_tiling(problem, info)
  chosen.validate(problem)
  for kernel in ("forward", *chosen.backward):
    cost = tiling.kernel_cost(kernel, problem, getattr(chosen, kernel))
    assert cost.vmem_bytes <= tiling.VMEM_FRACTION * info.vmem_capacity_bytes, kernel
  ridge = info.bf16_ops_per_second / info.mem_bw_bytes_per_second
  assert chosen.forward.block_m > ridge


LOWERING_TILINGS = {
    "two-kernel": Tiling(Blocks(256, 512), Blocks(256, 512), Blocks(512, 256)),
    "fused": Tiling(Blocks(256, 512), backward_fused=Blocks(256, 512)),
}


@pytest.mark.parametrize("glu,name,dtype,backward", [(False, "pwl-gelu", jnp.bfloat16, "two-kernel"),
                                                     (True, "pwl-silu", jnp.bfloat16, "fused"),
                                                     (True, "silu", jnp.float32, "two-kernel"),
                                                     (True, "gelu", jnp.bfloat16, "fused")])
def test_lowers_to_mosaic_for_tpu(rng, glu, name, dtype, backward):
  """Forward + backward kernels pass Pallas' Mosaic TPU lowering (cross-platform lowering from
  this CPU machine; Mosaic's own compile needs a TPU) at a SmolLM2-sized problem."""
  problem = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in
             make_problem(rng, (1024, 576, 1536, 576), glu, bias=True, dtype=dtype).items()}
  activation = make_activation(name)
  chosen = LOWERING_TILINGS[backward]

  def loss(problem, slopes, intercepts, knots):
    y = as_call(tpu_ffn.fused_ffn, problem, activation, tiling=chosen, chip="v6e")(
        problem, slopes, intercepts, knots)
    return jnp.sum(y.astype(jnp.float32))

  tables = (activation.slopes, activation.intercepts, activation.knots)
  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(problem, *tables).lower(
      lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 1 + len(chosen.backward)
