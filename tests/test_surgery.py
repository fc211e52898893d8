"""linearize(): finds MLPs by what they compute, converts them without copying weights, leaves
(and reports) everything else, and the result equals the float64 formula it claims."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flashffn_jax as ff
from flashffn_jax.nnx import PWL_PARAM_NAMES, FusedFFN
from flashffn_jax.surgery import LinearizeWarning, find_mlps
from tests.conftest import SESSION_SEED, relative_error
from tests.test_layers import NUMPY_ACTIVATIONS, plain_ffn

JAX_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda h: jax.nn.gelu(h, approximate=False),
                   "gelu_tanh": jax.nn.gelu, "relu": jax.nn.relu}


class GLU(nnx.Module):
  def __init__(self, d, h, act, rngs):
    self.gate_proj = nnx.Linear(d, h, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(d, h, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(h, d, use_bias=False, rngs=rngs)
    self.act = act

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nnx.Module):
  """Names that say nothing about roles: the surgery must use shapes and behaviour."""

  def __init__(self, d, h, act, rngs):
    self.b = nnx.Linear(h, d, rngs=rngs)
    self.a = nnx.Linear(d, h, rngs=rngs)
    self.act = act

  def __call__(self, x):
    return self.b(self.act(self.a(x)))


class NotAnMLP(nnx.Module):
  """Two chaining Linears without an activation between them."""

  def __init__(self, d, rngs):
    self.first = nnx.Linear(d, d, rngs=rngs)
    self.second = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    return self.second(self.first(x)) + x


class DropoutMLP(nnx.Module):
  def __init__(self, d, h, rngs):
    self.up = nnx.Linear(d, h, rngs=rngs)
    self.down = nnx.Linear(h, d, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.down(self.dropout(jax.nn.relu(self.up(x))))


class Model(nnx.Module):
  def __init__(self, d, h, acts, rngs):
    self.layers = nnx.List([GLU(d, h, JAX_ACTIVATIONS[acts[0]], rngs),
                            MLP(d, h, JAX_ACTIVATIONS[acts[1]], rngs)])
    self.head = NotAnMLP(d, rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = x + layer(x)
    return self.head(x)


# Odd sizes drawn once per session, so the tests share compilations (values are fresh per test).
D, H = (int(v) for v in np.random.default_rng(SESSION_SEED).integers([5, 9], [17, 41]))


forward = nnx.jit(lambda model, x: model(x))


def make_model(rng, acts=("silu", "gelu")):
  d, h = D, H
  model = Model(d, h, acts, nnx.Rngs(int(rng.integers(1 << 30))))
  for _, module in nnx.iter_modules(model):  # non-zero biases
    if isinstance(module, nnx.Linear) and module.bias is not None:
      module.bias[...] = jnp.asarray(rng.normal(size=module.bias.shape) * 0.3, jnp.float32)
  return model, jnp.asarray(rng.normal(size=(3, d)), jnp.float32)


def numpy_model(model, x, glu_act, mlp_act):
  """The model in float64 with the given activations in place of its two MLPs' own."""
  p = lambda linear: {k: np.asarray(getattr(linear, k)[...], np.float64) for k in ("kernel", "bias")
                      if getattr(linear, k) is not None}
  glu, mlp, head = model.layers[0], model.layers[1], model.head
  x = np.asarray(x, np.float64)
  x = x + plain_ffn({"w_gate": p(glu.gate_proj)["kernel"], "w_up": p(glu.up_proj)["kernel"],
                     "w_down": p(glu.down_proj)["kernel"]}, x, glu_act)
  x = x + plain_ffn({"w_up": p(mlp.a)["kernel"], "b_up": p(mlp.a)["bias"], "w_down": p(mlp.b)["kernel"],
                     "b_down": p(mlp.b)["bias"]}, x, mlp_act)
  first, second = p(head.first), p(head.second)
  return (x @ first["kernel"] + first["bias"]) @ second["kernel"] + second["bias"] + x


@pytest.mark.parametrize("acts", [("silu", "gelu"), ("gelu_tanh", "relu")])
def test_finds_mlps_and_their_activations_by_behaviour(rng, acts):
  model, _ = make_model(rng, acts)
  matches, rejected = find_mlps(model)
  assert [(m.name, m.base_activation) for m in matches] == [("layers.0", acts[0]), ("layers.1", acts[1])]
  assert matches[0].weights["w_gate"] is model.layers[0].gate_proj.kernel
  assert matches[1].weights["w_up"] is model.layers[1].a.kernel  # roles from shapes, not names
  assert [r.path for r in rejected] == [("head",)] and "not act(x @ up) @ down" in rejected[0].reason


def test_exact_linearize_reuses_weights_and_reports_the_rest(rng):
  model, x = make_model(rng)
  with pytest.warns(LinearizeWarning, match="head"):
    fused = ff.linearize(model, "exact")
  assert isinstance(fused.layers[0], FusedFFN) and isinstance(fused.layers[1], FusedFFN)
  assert isinstance(model.layers[0], GLU), "the original model must stay unchanged"
  assert fused.layers[0].w_gate[...] is model.layers[0].gate_proj.kernel[...]  # no copies
  assert fused.layers[1].b_down[...] is model.layers[1].b.bias[...]
  assert fused.head.first.kernel[...] is model.head.first.kernel[...]
  expected = numpy_model(model, x, NUMPY_ACTIVATIONS["silu"][0], NUMPY_ACTIVATIONS["gelu"][0])
  assert relative_error(forward(fused, x), expected) < 1e-5
  assert relative_error(model(x), expected) < 1e-5


def test_pwl_linearize_fits_each_mlp_to_its_own_activation(rng):
  model, x = make_model(rng)
  with pytest.warns(LinearizeWarning):
    fused = ff.linearize(model, "pwl8")
  assert fused.layers[0].approximates == "silu" and fused.layers[1].approximates == "gelu"
  silu8, gelu8 = ff.from_spec("pwl8", "silu"), ff.from_spec("pwl8", "gelu")
  np.testing.assert_allclose(fused.layers[1].activation.knots, gelu8.knots, rtol=1e-6, atol=1e-6)
  expected = numpy_model(model, x, silu8.numpy, gelu8.numpy)
  assert relative_error(forward(fused, x), expected) < 1e-5


def test_layers_learnable_and_relinearize(rng):
  model, x = make_model(rng)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", LinearizeWarning)
    one = ff.linearize(model, "pwl16", layers=[1], learnable=True)
    assert isinstance(one.layers[0], GLU) and isinstance(one.layers[1], FusedFFN)
    params = nnx.to_pure_dict(nnx.state(one, nnx.Param))
    assert set(PWL_PARAM_NAMES) <= set(params["layers"][1])
    by_path = ff.linearize(model, "pwl16", layers=["layers.0"])
    assert isinstance(by_path.layers[0], FusedFFN) and isinstance(by_path.layers[1], MLP)
    again = ff.linearize(one, "pwl4")  # a fused layer keeps what it approximates
  assert again.layers[1].approximates == "gelu" and again.layers[1].activation.num_segments == 4
  assert not again.layers[1].learnable_activation
  silu4, gelu4 = ff.from_spec("pwl4", "silu"), ff.from_spec("pwl4", "gelu")
  assert relative_error(forward(again, x), numpy_model(model, x, silu4.numpy, gelu4.numpy)) < 1e-5


def test_dropout_mlp_is_left_alone_and_explained(rng):
  class WithDropout(nnx.Module):
    def __init__(self, rngs):
      self.mlp = DropoutMLP(8, 24, rngs)
      self.glu = GLU(8, 16, jax.nn.silu, rngs)

    def __call__(self, x):
      return self.glu(self.mlp(x))

  model = WithDropout(nnx.Rngs(int(rng.integers(1 << 30))))
  with pytest.warns(LinearizeWarning, match=r"mlp \(its output is not"):
    fused = ff.linearize(model, "pwl16")
  assert isinstance(fused.mlp, DropoutMLP) and isinstance(fused.glu, FusedFFN)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layers=[7]), ValueError, r"layers: no MLP at 7; MLPs are at layer indices \[0, 1\]"),
    (dict(layers=["nope"]), ValueError, "layers: no MLP at 'nope'"),
    (dict(activation="pwl8", learnable=False, layers=[0.5]), ValueError, "layers: expected layer indices"),
    (dict(activation="gelu", learnable=True), ValueError, "learnable: needs a piecewise-linear"),
    (dict(activation="softmaxish"), ValueError, "activation: expected one of"),
])
def test_bad_arguments_name_themselves(rng, kwargs, error, match):
  model, _ = make_model(rng)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", LinearizeWarning)
    with pytest.raises(error, match=match):
      ff.linearize(model, **kwargs)


def test_model_without_mlp_is_an_error(rng):
  with pytest.raises(ValueError, match="found no MLP.*rejected: <root>"):
    ff.linearize(NotAnMLP(6, nnx.Rngs(0)))
  with pytest.raises(TypeError, match="model: expected a flax.nnx.Module"):
    ff.linearize(lambda x: x)
