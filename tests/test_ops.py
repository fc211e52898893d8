"""The public op's XLA reference against a plain float64 NumPy formula; dispatch; errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashffn_jax as ff
from flashffn_jax import activations, ops
from tests.conftest import assert_pwl_grads_close, relative_error

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def numpy_ffn(x, w_up, w_down, w_gate=None, b_up=None, b_gate=None, b_down=None, act=None):
  """The FFN in float64 NumPy, written independently of the library."""
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)
  x, w_up, w_down, w_gate, b_up, b_gate, b_down = map(f64, (x, w_up, w_down, w_gate, b_up, b_gate, b_down))
  up = x @ w_up + (0 if b_up is None else b_up)
  if w_gate is None:
    hidden = act(up)
  else:
    hidden = act(x @ w_gate + (0 if b_gate is None else b_gate)) * up
  return hidden @ w_down + (0 if b_down is None else b_down)


def make_problem(rng, batch=(3, 5), d=24, h=40, d_out=None, glu=False, bias=False, dtype=jnp.float32):
  d_out = d_out or d
  arrays = dict(x=rng.normal(size=(*batch, d)), w_up=rng.normal(size=(d, h)) / np.sqrt(d),
                w_down=rng.normal(size=(h, d_out)) / np.sqrt(h))
  if glu:
    arrays["w_gate"] = rng.normal(size=(d, h)) / np.sqrt(d)
  if bias:
    arrays["b_up"] = rng.normal(size=h) * 0.1
    arrays["b_down"] = rng.normal(size=d_out) * 0.1
    if glu:
      arrays["b_gate"] = rng.normal(size=h) * 0.1
  return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["gelu", "silu", "relu", "gelu_tanh"])
def test_reference_matches_float64_numpy(rng, glu, bias, dtype, name):
  problem = make_problem(rng, glu=glu, bias=bias, dtype=dtype)
  out = ff.ffn(**problem, activation=name, implementation="xla",
               precision=jax.lax.Precision.HIGHEST)
  assert out.shape == (3, 5, 24) and out.dtype == dtype
  expected = numpy_ffn(**problem, act=activations.lookup(name).fn)
  assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("glu", [False, True])
def test_reference_with_pwl_matches_float64_numpy(rng, glu):
  act = ff.fit("silu" if glu else "gelu", 16)
  problem = make_problem(rng, batch=(7,), d=16, h=33, d_out=9, glu=glu, bias=True)
  out = ff.ffn(**problem, activation=act, precision=jax.lax.Precision.HIGHEST)
  assert out.shape == (7, 9)
  assert relative_error(out, numpy_ffn(**problem, act=act.numpy)) < 1e-5


def plain_jnp_ffn(p, act):
  """The same FFN as a plain jnp formula (autodiff everywhere, no custom VJP)."""
  dot = lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)
  up = dot(p["x"], p["w_up"]) + p["b_up"]
  gate = dot(p["x"], p["w_gate"]) + p["b_gate"]
  slopes, intercepts = act.slopes(), act.intercepts()
  segment = jnp.sum(gate[..., None] >= act.knots, axis=-1)
  hidden = (slopes[segment] * gate + intercepts[segment]) * up
  return dot(hidden, p["w_down"]) + p["b_down"]


def test_gradients_match_plain_autodiff(rng):
  """Gradients of the op (custom PWL VJP) equal autodiff of a plain jnp formula, weights and PWL."""
  act = ff.fit("silu", 8, "curvature")
  problem = make_problem(rng, batch=(4, 6), d=12, h=20, glu=True, bias=True)
  cotangent = jnp.asarray(rng.normal(size=(4, 6, 12)), jnp.float32)

  def loss_op(p, a):
    return jnp.sum(cotangent * ff.ffn(**p, activation=a, precision=jax.lax.Precision.HIGHEST))

  def loss_plain(p, a):
    return jnp.sum(cotangent * plain_jnp_ffn(p, a))

  got = jax.grad(loss_op, argnums=(0, 1))(problem, act)
  want = jax.grad(loss_plain, argnums=(0, 1))(problem, act)
  for name in problem:
    assert relative_error(got[0][name], want[0][name]) < 1e-5, name
  assert_pwl_grads_close(got[1], want[1], 1e-5)


def _equations(jaxpr, primitive: str):
  """Equations of ``primitive`` in a jaxpr and all its sub-jaxprs (jit, custom_vjp, ...)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner, primitive)


@pytest.mark.parametrize("glu", [False, True])
def test_bfloat16_backward_runs_bfloat16_gemms_and_stays_accurate(rng, glu):
  """Every backward dot of a bf16 FFN takes bf16 operands; gradients match float32 to bf16 accuracy."""
  act = ff.fit("silu", 16)
  problem = make_problem(rng, batch=(32,), d=64, h=96, glu=glu, bias=True, dtype=jnp.bfloat16)
  cotangent = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
  loss = lambda p: jnp.sum(cotangent * ff.ffn(**p, activation=act, implementation="xla").astype(jnp.float32))
  dots = list(_equations(jax.make_jaxpr(jax.grad(loss))(problem).jaxpr, "dot_general"))
  assert len(dots) == (9 if glu else 6)
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), [
      [v.aval.dtype for v in e.invars] for e in dots]
  grads = jax.grad(loss)(problem)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), problem)
  want = jax.grad(lambda p: jnp.sum(cotangent * ff.ffn(**p, activation=act, precision=jax.lax.Precision.HIGHEST)))(f32)
  for name in problem:
    assert relative_error(grads[name], want[name]) < 3e-2, name


def test_callable_activation_and_nan_propagation(rng):
  problem = make_problem(rng, batch=(2,), d=8, h=16)
  out = ff.ffn(**problem, activation=jnp.tanh, precision=jax.lax.Precision.HIGHEST)
  assert relative_error(out, numpy_ffn(**problem, act=np.tanh)) < 1e-5
  x = problem["x"].at[0, 3].set(jnp.nan)
  out = ff.ffn(**{**problem, "x": x}, activation=ff.fit("gelu", 8))
  assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))


def test_jit_and_vmap(rng):
  problem = make_problem(rng, batch=(4, 3), d=8, h=16)
  act = ff.fit("gelu", 8)
  jitted = jax.jit(lambda p, a: ff.ffn(**p, activation=a))(problem, act)
  mapped = jax.vmap(lambda x: ff.ffn(x, problem["w_up"], problem["w_down"], activation=act))(problem["x"])
  np.testing.assert_allclose(jitted, mapped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(w_up=np.zeros((9, 16), np.float32)), r"w_up: expected shape \[D, H\] with D = x.shape\[-1\] = 8"),
    (dict(w_down=np.zeros((15, 8), np.float32)), r"w_down: expected shape \[H, D_out\] with H = w_up.shape\[1\] = 16"),
    (dict(w_gate=np.zeros((8, 15), np.float32)), r"w_gate: expected shape \(8, 16\)"),
    (dict(b_up=np.zeros(15, np.float32)), r"b_up: expected shape \(16,\)"),
    (dict(b_down=np.zeros(7, np.float32)), r"b_down: expected shape \(8,\)"),
    (dict(w_down=np.zeros((16, 8), np.float16)), "w_down: expected dtype float32 .* got float16"),
    (dict(x=np.zeros((2, 8), np.int32)), "x: expected an array .* of bfloat16, float16 or float32"),
    (dict(b_gate=np.zeros(16, np.float32)), "b_gate: given without w_gate"),
    (dict(activation="mish"), "activation: expected one of"),
    (dict(implementation="cuda_magic"), "implementation: expected None or one of"),
])
def test_bad_input_names_the_argument(rng, change, match):
  problem = make_problem(rng, batch=(2,), d=8, h=16)
  kwargs = {**problem, **{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in change.items()}}
  with pytest.raises(ValueError, match=match):
    ff.ffn(**kwargs)


def test_declining_implementation_falls_back_with_reason(rng, monkeypatch):
  def declines(*args, **kwargs):
    raise NotImplementedError("needs D % 128 == 0")

  monkeypatch.setitem(ops.IMPLEMENTATIONS, "picky", ops.Implementation("picky", "tests.test_ops:_unused"))
  monkeypatch.setattr(ops.Implementation, "load", lambda self: declines if self.name == "picky"
                      else ops.reference_ffn)
  problem = make_problem(rng, batch=(2,), d=8, h=16)
  with pytest.warns(UserWarning, match=r"'picky' cannot run this FFN \(needs D % 128 == 0\); falling back to 'xla'"):
    out = ff.ffn(**problem, implementation="picky")
  np.testing.assert_allclose(out, ff.ffn(**problem, implementation="xla"))
  monkeypatch.setitem(ops.PLATFORM_ORDER, jax.default_backend(), ("picky", "xla"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # implicit selection skips silently (logged at INFO)
    ff.ffn(**problem)
    assert ff.chosen_implementation(**problem) == "xla"
  monkeypatch.setattr(ops.Implementation, "load", lambda self: ops.reference_ffn)  # now it accepts
  assert ff.chosen_implementation(**problem) == "picky"


@pytest.mark.parametrize("glu", [False, True])
def test_padded_row_matches_reference_forward_and_gradients(rng, glu):
  """One token (leading dims (1, 1)) through the zero-padded XLA path: same output and gradients
  (weights, biases, PWL parameters) as the unpadded reference; other M decline to the reference."""
  act = ff.fit("silu" if glu else "gelu", 8)
  problem = make_problem(rng, batch=(1, 1), d=16, h=24, glu=glu, bias=True)
  cotangent = jnp.asarray(rng.normal(size=(1, 1, 16)), jnp.float32)

  def grads(implementation):
    loss = lambda p, a: jnp.sum(cotangent * ff.ffn(**p, activation=a, implementation=implementation,
                                                    precision=jax.lax.Precision.HIGHEST))
    return jax.value_and_grad(loss, argnums=(0, 1))(problem, act)

  (value, (got, got_pwl)), (want_value, (want, want_pwl)) = grads("xla_padded_row"), grads("xla")
  # the loss sums 16 terms of either sign: its f32 rounding scales with sum |term|, not |loss|
  # (rtol 1e-6 on the loss alone failed once in CI: 16 ulp of a partly cancelling sum)
  terms = jnp.abs(cotangent * ff.ffn(**problem, activation=act, implementation="xla",
                                     precision=jax.lax.Precision.HIGHEST))
  np.testing.assert_allclose(value, want_value, rtol=0, atol=1e-6 * float(jnp.sum(terms)))
  for name in problem:
    assert relative_error(got[name], want[name]) < 1e-6, name
  assert_pwl_grads_close(got_pwl, want_pwl, 1e-6)
  assert ff.chosen_implementation(**problem, implementation="xla_padded_row") == "xla_padded_row"
  two_rows = {**problem, "x": jnp.concatenate([problem["x"]] * 2)}
  with pytest.warns(UserWarning, match=r"'xla_padded_row' cannot run this FFN \(pads a single row, got M = 2\)"):
    ff.ffn(**two_rows, activation=act, implementation="xla_padded_row")
