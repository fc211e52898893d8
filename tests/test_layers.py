"""Flax NNX / Linen FusedFFN layers: equal to a plain Flax MLP and to float64 formulas, forward
and gradients; learnable PWLs stay sorted; jit / grad / remat / vmap / sharding; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special
from flax import linen as nn
from flax import nnx

import flashffn_jax as ff
from flashffn_jax import linen as ff_linen
from flashffn_jax.nnx import PWL_PARAM_NAMES, FusedFFN, pwl_from_arrays, pwl_to_arrays
from flashffn_jax.ops import to_kernel_activation
from tests.conftest import SESSION_SEED, relative_error

ACTIVATIONS = {"gelu": lambda h: jax.nn.gelu(h, approximate=False), "silu": jax.nn.silu}
# float64 NumPy activation and derivative, written independently of the library.
NUMPY_ACTIVATIONS = {
    "gelu": (lambda h: h * special.ndtr(h), lambda h: special.ndtr(h) + h * np.exp(-h * h / 2) / np.sqrt(2 * np.pi)),
    "silu": (lambda h: h * special.expit(h), lambda h: special.expit(h) * (1 + h * (1 - special.expit(h)))),
}


class FlaxMLP(nnx.Module):
  """The standard Flax MLP / GLU the fused layer must reproduce."""

  def __init__(self, d, h, d_out, glu, bias, act, rngs):
    self.up = nnx.Linear(d, h, use_bias=bias, rngs=rngs)
    self.gate = nnx.Linear(d, h, use_bias=bias, rngs=rngs) if glu else nnx.data(None)
    self.down = nnx.Linear(h, d_out, use_bias=bias, rngs=rngs)
    self.act = act

  def __call__(self, x):
    hidden = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
    return self.down(hidden)


def numpy_ffn_and_grads(params: dict, x, cotangent, act, dact):
  """(y, d<sum(y * cotangent)>/d{x, params}) in float64 NumPy, by hand-written backprop."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64).reshape(-1, p["w_up"].shape[0])
  g = np.asarray(cotangent, np.float64).reshape(-1, p["w_down"].shape[1])
  up = x @ p["w_up"] + p.get("b_up", 0.0)
  if "w_gate" in p:
    pre = x @ p["w_gate"] + p.get("b_gate", 0.0)
    hidden = act(pre) * up
  else:
    hidden = act(up)
  y = hidden @ p["w_down"] + p.get("b_down", 0.0)
  d_hidden = g @ p["w_down"].T
  grads = {"w_down": hidden.T @ g, "b_down": g.sum(0)}
  if "w_gate" in p:
    d_pre, d_up = d_hidden * up * dact(pre), d_hidden * act(pre)
    grads |= {"w_gate": x.T @ d_pre, "b_gate": d_pre.sum(0)}
    dx = d_up @ p["w_up"].T + d_pre @ p["w_gate"].T
  else:
    d_up = d_hidden * dact(up)
    dx = d_up @ p["w_up"].T
  grads |= {"w_up": x.T @ d_up, "b_up": d_up.sum(0)}
  return y, dx, {k: v for k, v in grads.items() if k in p}


def plain_ffn(params: dict, x, act):
  """The FFN as a plain formula on arrays (float64 when given NumPy float64)."""
  linear = lambda a, name: a @ params["w_" + name] + params.get("b_" + name, 0.0)
  up = linear(x, "up")
  hidden = act(up) if "w_gate" not in params else act(linear(x, "gate")) * up
  return linear(hidden, "down")


# Odd sizes (B, D, H, D_out) drawn once per session, so tests share compilations; the values in
# every test are fresh.
ODD_SHAPE = tuple(int(v) for v in np.random.default_rng(SESSION_SEED).integers([3, 5, 17, 3], [9, 23, 70, 19]))


def odd_shape(rng):
  return ODD_SHAPE


def random_layer(rng, glu, bias, activation, **kwargs):
  """A FusedFFN around random weights of an odd shape, and an input [B, 2, D]."""
  batch, d, h, d_out = odd_shape(rng)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
  weights = dict(w_up=normal(d, h), w_down=normal(h, d_out), w_gate=normal(d, h) if glu else None)
  if bias:
    weights |= dict(b_up=normal(h), b_gate=normal(h) if glu else None, b_down=normal(d_out))
  layer = FusedFFN.from_weights(**weights, activation=activation, **kwargs)
  return layer, jnp.asarray(rng.normal(size=(batch, 2, d)), jnp.float32)


def layer_params(layer: FusedFFN) -> dict:
  return {name: getattr(layer, name)[...] for name in ("w_up", "w_down", "w_gate", "b_up", "b_gate", "b_down")
          if getattr(layer, name) is not None}


@functools.partial(jax.jit, static_argnums=0)
def _output_and_grads(graphdef, state, x, cotangent):
  y, vjp = jax.vjp(lambda st, v: nnx.merge(graphdef, st)(v), state, x)
  return y, *vjp(cotangent)


def output_and_grads(module, x, cotangent):
  """(module(x), d<sum(module(x) * cotangent)>/d(state), .../dx), compiled once per shape."""
  return _output_and_grads(*nnx.split(module), x, cotangent)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_equals_flax_mlp_and_float64_forward_and_gradients(rng, glu, bias, name):
  layer, x = random_layer(rng, glu, bias, name)
  d, h = layer.w_up.shape
  mlp = FlaxMLP(d, h, layer.w_down.shape[1], glu, bias, ACTIVATIONS[name], nnx.Rngs(0))
  for role in ("up", "gate", "down"):
    if getattr(mlp, role) is not None:
      getattr(mlp, role).kernel[...] = getattr(layer, "w_" + role)[...]
      if bias:
        getattr(mlp, role).bias[...] = getattr(layer, "b_" + role)[...]
  cotangent = jnp.asarray(rng.normal(size=(*x.shape[:-1], layer.w_down.shape[1])), jnp.float32)
  y_fused, grads_fused, dx_fused = output_and_grads(layer, x, cotangent)
  y_flax, grads_flax, dx_flax = output_and_grads(mlp, x, cotangent)
  np.testing.assert_allclose(y_fused, y_flax, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx_fused, dx_flax, rtol=1e-5, atol=1e-5)
  for role in ("up", "gate", "down"):
    if getattr(mlp, role) is not None:
      np.testing.assert_allclose(grads_fused["w_" + role][...], grads_flax[role]["kernel"][...],
                                 rtol=1e-4, atol=1e-5)
  y64, dx64, grads64 = numpy_ffn_and_grads(layer_params(layer), x, cotangent, *NUMPY_ACTIVATIONS[name])
  assert relative_error(y_fused.reshape(y64.shape), y64) < 1e-5
  assert relative_error(dx_fused.reshape(dx64.shape), dx64) < 1e-5
  for key, expected in grads64.items():
    assert relative_error(grads_fused[key][...], expected) < 1e-5, key


def test_usual_initialisers_and_constructor(rng):
  layer = FusedFFN(13, 29, 7, glu=True, activation="silu", rngs=nnx.Rngs(int(rng.integers(1 << 30))),
                   bias_init=nnx.initializers.normal(1.0))
  assert layer.w_up.shape == (13, 29) and layer.w_gate.shape == (13, 29) and layer.w_down.shape == (29, 7)
  assert 0.5 < float(jnp.std(layer.w_up[...]) * np.sqrt(13)) < 1.5  # lecun_normal
  assert float(jnp.std(layer.b_up[...])) > 0.5
  x = jnp.asarray(rng.normal(size=(4, 13)), jnp.float32)
  expected = plain_ffn({k: np.asarray(v, np.float64) for k, v in layer_params(layer).items()},
                       np.asarray(x, np.float64), NUMPY_ACTIVATIONS["silu"][0])
  assert relative_error(layer(x), expected) < 1e-5


def test_pwl_layer_matches_float64_and_learns_its_pwl(rng):
  act = ff.fit("silu", 8)
  layer, x = random_layer(rng, True, True, act, learnable_activation=True)
  assert set(PWL_PARAM_NAMES) <= set(nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
  np.testing.assert_allclose(layer.activation.knots, act.knots, rtol=1e-6, atol=1e-6)
  params = {k: np.asarray(v, np.float64) for k, v in layer_params(layer).items()}
  x64 = np.asarray(x, np.float64)
  up = x64 @ params["w_up"] + params["b_up"]
  gate = x64 @ params["w_gate"] + params["b_gate"]
  expected = (act.numpy(gate) * up) @ params["w_down"] + params["b_down"]
  y, grads, _ = output_and_grads(layer, x, jnp.asarray(rng.normal(size=expected.shape), jnp.float32))
  assert relative_error(y, expected) < 1e-5
  assert all(np.all(np.isfinite(grads[name][...])) for name in PWL_PARAM_NAMES)
  for name in ("pwl_log_gaps", "pwl_values"):  # the tails may see no inputs: their gradient can be 0
    assert np.any(grads[name][...] != 0), name


def test_learnable_knots_stay_sorted_under_large_updates(rng):
  layer, x = random_layer(rng, False, True, ff.fit("gelu", 16), learnable_activation=True)
  x = x * 4  # reach every segment
  target = jnp.asarray(rng.normal(size=(*x.shape[:-1], layer.w_down.shape[1])), jnp.float32)
  is_pwl = lambda path, value: isinstance(value, nnx.Param) and str(path[-1]) in PWL_PARAM_NAMES
  optimizer = nnx.Optimizer(layer, optax.adam(1.0), wrt=is_pwl)
  loss = lambda m: jnp.mean((m(x) - target) ** 2)
  step = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss, argnums=nnx.DiffState(0, is_pwl))(m)))
  before = np.asarray(layer.activation.knots)
  for _ in range(20):
    step(layer, optimizer)
  knots = np.asarray(layer.activation.knots)
  assert np.all(np.diff(knots) > 0) and np.all(np.isfinite(knots))
  assert np.max(np.abs(knots - before)) > 1.0
  layer.activation.validate()


def test_pwl_parametrisation_round_trip(rng):
  act = ff.fit("gelu", 16, "curvature")
  back = pwl_from_arrays(**pwl_to_arrays(act))
  for field in ("knots", "values", "left_slope", "right_slope"):
    np.testing.assert_allclose(getattr(back, field), getattr(act, field), rtol=2e-6, atol=2e-6)
  # Sorted for any log-gaps, down to gaps of e^-20 (the minimum gap keeps float32 apart).
  arrays = pwl_to_arrays(act)
  arrays["pwl_log_gaps"] = jnp.asarray(rng.uniform(-20, 3, size=arrays["pwl_log_gaps"].shape), jnp.float32)
  assert np.all(np.diff(np.asarray(pwl_from_arrays(**arrays).knots)) > 0)
  with pytest.raises(ValueError, match="knots closer than"):
    pwl_to_arrays(ff.PiecewiseLinear.create([0.0, 1e-5, 1.0], [0.0, 0.0, 1.0], 0.0, 1.0))


@pytest.mark.parametrize("learnable", [False, True])
def test_evenly_spaced_pwl_keeps_one_gap(rng, learnable):
  """A uniform fit's layer keeps one shared gap (``pwl_log_gaps`` of shape [1]): the same PWL
  back, still evenly spaced after large adam steps (``validate`` checks the grid), and the
  promise visible inside ``nnx.jit`` (where the knots are traced), so a Hopper kernel may take
  the table lookup there."""
  act = ff.fit("gelu", 16, "uniform")
  layer, x = random_layer(rng, False, True, act, learnable_activation=learnable)
  assert layer.pwl_log_gaps[...].shape == (1,) and layer.activation.evenly_spaced
  np.testing.assert_allclose(layer.activation.knots, act.knots, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.activation(x), act(x), rtol=1e-5, atol=1e-5)
  seen = []  # what ``ffn`` hands an implementation inside nnx.jit
  nnx.jit(lambda m: seen.append(to_kernel_activation(m.activation)) or 0.0)(layer)
  assert isinstance(seen[0].knots, jax.core.Tracer) and seen[0].evenly_spaced
  if not learnable:
    return
  target = jnp.asarray(rng.normal(size=(*x.shape[:-1], layer.w_down.shape[1])), jnp.float32)
  is_pwl = lambda path, value: isinstance(value, nnx.Param) and str(path[-1]) in PWL_PARAM_NAMES
  optimizer = nnx.Optimizer(layer, optax.adam(0.3), wrt=is_pwl)
  loss = lambda m: jnp.mean((m(4 * x) - target) ** 2)
  step = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss, argnums=nnx.DiffState(0, is_pwl))(m)))
  for _ in range(10):
    step(layer, optimizer)
  knots = np.asarray(layer.activation.knots)
  assert np.max(np.abs(knots - np.asarray(act.knots))) > 0.1
  layer.activation.validate()  # raises if the knots left the even grid


def test_frozen_pwl_is_state_not_param(rng):
  layer, x = random_layer(rng, False, False, ff.fit("gelu", 8))
  assert not layer.learnable_activation
  assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == {"w_up", "w_down"}
  assert set(nnx.to_pure_dict(nnx.state(layer))) == {"w_up", "w_down", *PWL_PARAM_NAMES}


def test_records_output_only_inside_capture(rng):
  layer, x = random_layer(rng, True, False, "silu")
  y, intermediates = nnx.capture(layer, nnx.Intermediate)(x)
  np.testing.assert_array_equal(intermediates["ffn_output"][0], y)
  nnx.jit(lambda m, v: m(v))(layer, x)
  layer(x)
  assert not nnx.to_pure_dict(nnx.state(layer, nnx.Intermediate))


def test_jit_remat_vmap_match_eager(rng):
  act = ff.fit("silu", 16)
  layer, x = random_layer(rng, True, True, act, learnable_activation=True)
  params = {k: np.asarray(v, np.float64) for k, v in layer_params(layer).items()}
  jitted = nnx.jit(lambda m, v: m(v))(layer, x)
  assert relative_error(jitted, plain_ffn(params, np.asarray(x, np.float64), act.numpy)) < 1e-5
  plain = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
  rematted = nnx.jit(nnx.grad(lambda m: jnp.sum(nnx.remat(lambda mm, v: mm(v))(m, x) ** 2)))(layer)
  for (path, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(rematted)):
    np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-6, err_msg=str(path))
  per_row = nnx.jit(nnx.vmap(lambda m, v: m(v), in_axes=(None, 0)))(layer, x)
  np.testing.assert_allclose(per_row, jitted, rtol=1e-6, atol=1e-6)


def test_vmap_over_a_stack_of_layers(rng):
  d, h, count = 7, 19, 3
  make = nnx.jit(nnx.vmap(lambda r: FusedFFN(d, h, glu=True, activation="silu", rngs=r), in_axes=0))
  stack = make(nnx.Rngs(params=jax.random.split(jax.random.key(int(rng.integers(1 << 30))), count)))
  x = jnp.asarray(rng.normal(size=(5, d)), jnp.float32)
  out = nnx.jit(nnx.vmap(lambda m, v: m(v), in_axes=(0, None)))(stack, x)
  assert out.shape == (count, 5, d)
  for i in range(count):
    params = {k: np.asarray(v[i], np.float64) for k, v in layer_params(stack).items()}
    expected = plain_ffn(params, np.asarray(x, np.float64), NUMPY_ACTIVATIONS["silu"][0])
    assert relative_error(out[i], expected) < 1e-5


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (conftest sets the CPU host device count)")
def test_sharded_matches_float64(rng):
  mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  d, h, batch = 12, 32, 8
  act = ff.fit("silu", 8)
  with jax.set_mesh(mesh):
    layer = FusedFFN(d, h, glu=True, activation=act, rngs=nnx.Rngs(int(rng.integers(1 << 30))),
                     kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")))
    x = jax.device_put(jnp.asarray(rng.normal(size=(batch, d)), jnp.float32), jax.P("model", None))
    out = nnx.jit(lambda m, v: m(v))(layer, x)
  assert layer.w_up[...].sharding.spec == jax.P(None, "model")
  assert len(out.sharding.device_set) == 2
  params = {k: np.asarray(v, np.float64) for k, v in layer_params(layer).items()}
  assert relative_error(np.asarray(out), plain_ffn(params, np.asarray(x, np.float64), act.numpy)) < 1e-5


def test_from_weights_shares_arrays_and_checks_shapes(rng):
  layer, x = random_layer(rng, True, True, "gelu")
  rebuilt = FusedFFN.from_weights(**{k: v for k, v in layer_params(layer).items()}, activation="gelu")
  assert rebuilt.w_up[...] is layer.w_up[...]
  np.testing.assert_array_equal(rebuilt(x), layer(x))
  with pytest.raises(ValueError, match="w_down: expected shape"):
    FusedFFN.from_weights(layer.w_up[...], layer.w_up[...].T[:, :3].T)
  with pytest.raises(ValueError, match="b_gate: given without w_gate"):
    FusedFFN.from_weights(layer.w_up[...], layer.w_down[...], b_gate=layer.b_gate[...])


def test_bfloat16_compute_dtype(rng):
  layer, x = random_layer(rng, True, False, "silu", dtype=jnp.bfloat16)
  out = layer(x)
  assert out.dtype == jnp.bfloat16
  expected = plain_ffn({k: np.asarray(v, np.float64) for k, v in layer_params(layer).items()},
                       np.asarray(x, np.float64), ff.activations.lookup("silu").fn)
  assert relative_error(out, expected) < 3e-2


def test_nan_propagates(rng):
  layer, x = random_layer(rng, False, True, ff.fit("gelu", 8))
  out = np.asarray(layer(x.at[0, 0, 0].set(jnp.nan)))
  assert np.all(np.isnan(out[0, 0])) and np.all(np.isfinite(out[1:]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation="swishy"), "activation: expected one of"),
    (dict(activation="gelu", learnable_activation=True), "learnable_activation: needs a PiecewiseLinear"),
    (dict(hidden_features=0), "hidden_features: expected a positive integer"),
])
def test_bad_arguments_name_themselves(kwargs, match):
  args = dict(in_features=4, hidden_features=8) | kwargs
  with pytest.raises(ValueError, match=match):
    FusedFFN(args.pop("in_features"), args.pop("hidden_features"), rngs=nnx.Rngs(0), **args)


@pytest.mark.parametrize("glu", [False, True])
def test_linen_equals_dense_mlp_and_learns_pwl(rng, glu):
  batch, d, h, d_out = odd_shape(rng)
  x = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
  fused = ff_linen.FusedFFN(h, d_out, glu=glu, activation="gelu")
  variables = jax.jit(fused.init)(jax.random.key(int(rng.integers(1 << 30))), x)
  params = {k: v + 0.1 if k.startswith("b_") else v for k, v in variables["params"].items()}

  class DenseMLP(nn.Module):
    @nn.compact
    def __call__(self, v):
      up = nn.Dense(h, name="up")(v)
      hidden = nn.gelu(up, approximate=False) if not glu else nn.gelu(nn.Dense(h, name="gate")(v), approximate=False) * up
      return nn.Dense(d_out, name="down")(hidden)

  dense_params = {role: {"kernel": params["w_" + role], "bias": params["b_" + role]}
                  for role in ("up", "down") + (("gate",) if glu else ())}
  out, state = jax.jit(functools.partial(fused.apply, mutable=["intermediates"]))({"params": params}, x)
  np.testing.assert_allclose(out, jax.jit(DenseMLP().apply)({"params": dense_params}, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(state["intermediates"]["ffn_output"][0], out)
  learnable = ff_linen.FusedFFN(h, d_out, glu=glu, activation=ff.fit("gelu", 8), learnable_activation=True)
  lp = jax.jit(learnable.init)(jax.random.key(1), x)
  assert set(PWL_PARAM_NAMES) <= set(lp["params"])
  grads = jax.jit(jax.grad(lambda v: jnp.sum(learnable.apply(v, x) ** 2)))(lp)
  assert np.any(np.asarray(grads["params"]["pwl_values"]) != 0)
