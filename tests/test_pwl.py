"""PiecewiseLinear: fitting accuracy, float64 agreement, tails, gradients, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashffn_jax import activations, pwl
from flashffn_jax.pwl import PiecewiseLinear

FAST_METHODS = ("uniform", "curvature")
settings.register_profile("flashffn", deadline=None, max_examples=25, derandomize=False)
settings.load_profile("flashffn")


@pytest.mark.parametrize("name,segments,bound", [("gelu", 16, 3.0e-3), ("gelu", 32, 9e-4),
                                                 ("silu", 16, 6.5e-3), ("gelu_tanh", 16, 3.0e-3)])
def test_optimal_fit_meets_targets(name, segments, bound):
  report = pwl.fit(name, segments, "optimal").error_report(name)
  assert report["segments"] == segments
  assert report["max_abs_error"] <= bound, report


@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("segments", [8, 16])
def test_methods_rank_as_expected(name, segments):
  errors = {m: pwl.fit(name, segments, m).error_report(name)["max_abs_error"]
            for m in ("uniform", "curvature", "optimal")}
  assert errors["optimal"] <= errors["curvature"] <= errors["uniform"], errors


def test_optimal_error_equioscillates():
  """A minimax interpolant's segment maxima are (nearly) equal: no segment has slack."""
  fitted = pwl.fit("gelu", 12, "optimal")
  fn = activations.lookup("gelu").fn
  knots, values = np.asarray(fitted.knots, np.float64), np.asarray(fitted.values, np.float64)
  maxima = [np.max(np.abs(fitted.numpy(x) - fn(x)))
            for x in (np.linspace(a, b, 2001) for a, b in zip(knots[:-1], knots[1:]))]
  assert min(maxima) > 0.5 * max(maxima), maxima
  assert np.allclose(values[1:-1], fn(knots[1:-1]))  # interior knots interpolate


@given(name=st.sampled_from(sorted(activations.ACTIVATIONS)), segments=st.integers(1, 40),
       method=st.sampled_from(FAST_METHODS), seed=st.integers(0, 2**31 - 1))
def test_jax_evaluation_matches_float64(name, segments, method, seed):
  fitted = pwl.fit(name, segments, method)
  x = np.random.default_rng(seed).normal(0.0, 4.0, 512).astype(np.float32)
  expected = fitted.numpy(x.astype(np.float64))
  np.testing.assert_allclose(jax.jit(lambda p, v: p(v))(fitted, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@given(name=st.sampled_from(["gelu", "silu", "gelu_tanh", "tanh", "sigmoid"]),
       segments=st.integers(1, 40), method=st.sampled_from(FAST_METHODS))
def test_continuous_at_knots_and_exact_tails(name, segments, method):
  fitted = pwl.fit(name, segments, method)
  knots = np.asarray(fitted.knots)
  left, right = fitted(jnp.asarray(knots - 1e-4)), fitted(jnp.asarray(knots + 1e-4))
  slopes = np.abs(np.asarray(fitted.slopes())).max()
  np.testing.assert_allclose(left, right, atol=2e-4 * slopes + 1e-6)
  named = activations.lookup(name)
  far = np.array([-1e4, -200.0, 200.0, 1e4], np.float32)
  np.testing.assert_allclose(fitted(jnp.asarray(far)),
                             [named.left(far[0]), named.left(far[1]), named.right(far[2]), named.right(far[3])],
                             rtol=1e-6, atol=1e-4)


@given(name=st.sampled_from(["gelu", "silu", "tanh"]), segments=st.integers(2, 24),
       seed=st.integers(0, 2**31 - 1))
def test_input_gradient_is_segment_slope_and_matches_finite_differences(name, segments, seed):
  fitted = pwl.fit(name, segments, "curvature")
  knots = np.asarray(fitted.knots, np.float64)
  x = np.random.default_rng(seed).normal(0.0, 3.0, 256)
  smooth = np.min(np.abs(x[:, None] - knots[None]), axis=1) > 1e-2  # away from the kinks
  # every point is differentiated (one shape for every example: no recompiles), kinks masked
  grad = np.asarray(jax.vmap(jax.grad(fitted))(jnp.asarray(x, jnp.float32)))
  h = 1e-5
  finite_difference = (fitted.numpy(x + h) - fitted.numpy(x - h)) / (2 * h)
  assert smooth.sum() > 128
  np.testing.assert_allclose(grad[smooth], finite_difference[smooth], rtol=1e-4, atol=1e-5)


def _numpy_loss(params: dict, x: np.ndarray, weights: np.ndarray) -> float:
  candidate = PiecewiseLinear(**{k: np.asarray(v) for k, v in params.items()})
  return float(np.sum(weights * candidate.numpy(x)))


def test_parameter_gradients_match_float64_finite_differences(rng):
  fitted = pwl.fit("silu", 10, "optimal")
  x = rng.normal(0.0, 4.0, 3000)
  knots = np.asarray(fitted.knots, np.float64)
  x = x[np.min(np.abs(x[:, None] - knots[None]), axis=1) > 1e-2]
  weights = rng.normal(size=x.shape)
  loss = lambda p: jnp.sum(jnp.asarray(weights, jnp.float32) * p(jnp.asarray(x, jnp.float32)))
  grads = jax.grad(loss)(fitted)
  params = {k: np.asarray(getattr(fitted, k), np.float64)
            for k in ("knots", "values", "left_slope", "right_slope")}
  for name, analytic in (("knots", grads.knots), ("values", grads.values),
                         ("left_slope", grads.left_slope), ("right_slope", grads.right_slope)):
    numeric = np.zeros_like(params[name])
    for index in np.ndindex(params[name].shape):
      step = 1e-5
      plus = {**params, name: params[name].copy()}
      minus = {**params, name: params[name].copy()}
      plus[name][index] += step
      minus[name][index] -= step
      numeric[index] = (_numpy_loss(plus, x, weights) - _numpy_loss(minus, x, weights)) / (2 * step)
    scale = np.abs(numeric).max() + 1.0
    np.testing.assert_allclose(np.asarray(analytic), numeric, atol=2e-3 * scale, err_msg=name)


def test_vmap_over_batched_parameters(rng):
  # the evenly-spaced promise is static: PWLs stacked into one pytree must agree on it
  fits = [dataclasses.replace(pwl.fit("gelu", 8, m), evenly_spaced=False)
          for m in ("uniform", "curvature", "optimal")]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *fits)
  x = jnp.asarray(rng.normal(size=(3, 100)), jnp.float32)
  out = jax.vmap(lambda p, v: p(v))(stacked, x)
  for i, fitted in enumerate(fits):
    np.testing.assert_allclose(out[i], fitted(x[i]), rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(jax.vmap(lambda q, v: q(v))(p, x) ** 2))(stacked)
  for i, fitted in enumerate(fits):
    single = jax.grad(lambda p: jnp.sum(p(x[i]) ** 2))(fitted)
    np.testing.assert_allclose(grads.values[i], single.values, rtol=1e-5, atol=1e-5)


def test_evenly_spaced_pwl_evaluates_on_the_grid_of_its_end_knots(rng):
  """A uniform fit promises t_k = t_0 + k δ (static, so it survives tracing): it evaluates on the
  grid its end knots place, its interior knot entries get no gradient and are not read, its end
  knots' gradients match float64 finite differences of the grid moving with them, and
  ``create`` refuses the promise for knots off the grid."""
  fitted = pwl.fit("gelu", 8, "uniform")
  assert fitted.evenly_spaced and not pwl.fit("gelu", 8).evenly_spaced
  x = rng.normal(0.0, 3.0, 2000)
  knots = np.asarray(fitted.knots, np.float64)
  x = x[np.min(np.abs(x[:, None] - knots[None]), axis=1) > 1e-2]
  x32 = jnp.asarray(x, jnp.float32)
  free = dataclasses.replace(fitted, evenly_spaced=False)  # K compares, not the O(1) lookup
  np.testing.assert_allclose(fitted(x32), free(x32), rtol=1e-6, atol=1e-6)
  for pwl_fn in (fitted, free):  # away from the knots both take the same segment, so slope
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(pwl_fn(v)))(x32),
                                  jax.grad(lambda v: jnp.sum(free(v)))(x32))
  odd = pwl.fit("gelu", 40, "uniform", knot_range=(-5.3, 3.7))  # not dyadic: δ = 0.225
  y = jnp.asarray(rng.normal(0.0, 4.0, 4000), jnp.float32)
  np.testing.assert_allclose(odd(y), dataclasses.replace(odd, evenly_spaced=False)(y), rtol=1e-6,
                             atol=1e-6)
  moved_inside = dataclasses.replace(fitted, knots=fitted.knots.at[3].add(0.3))  # not validated
  np.testing.assert_array_equal(moved_inside(x32), fitted(x32))
  weights = rng.normal(size=x.shape)
  loss = lambda p: jnp.sum(jnp.asarray(weights, jnp.float32) * p(x32))
  grads = np.asarray(jax.grad(loss)(fitted).knots)
  assert np.all(grads[1:-1] == 0) and np.all(grads[[0, -1]] != 0)
  params = {k: np.asarray(getattr(fitted, k), np.float64)
            for k in ("knots", "values", "left_slope", "right_slope")}
  step = 1e-5
  for end, grad in ((0, grads[0]), (-1, grads[-1])):
    ends = [[knots[0], knots[-1]], [knots[0], knots[-1]]]
    ends[0][end] += step
    ends[1][end] -= step
    plus, minus = ({**params, "knots": np.linspace(*e, knots.shape[0])} for e in ends)
    numeric = (_numpy_loss(plus, x, weights) - _numpy_loss(minus, x, weights)) / (2 * step)
    np.testing.assert_allclose(float(grad), numeric, rtol=2e-3, atol=2e-3, err_msg=str(end))
  with pytest.raises(ValueError, match="evenly_spaced=True needs"):
    PiecewiseLinear.create([0.0, 1.0, 3.0], [0.0, 1.0, 3.0], 0.0, 1.0, evenly_spaced=True)


def test_non_finite_inputs_propagate():
  fitted = pwl.fit("gelu", 16)
  out = fitted(jnp.array([jnp.nan, jnp.inf, 1.0], jnp.float32))
  assert np.isnan(out[0]) and out[1] == np.inf and np.isfinite(out[2])
  assert np.isnan(jax.grad(lambda p: p(jnp.array([jnp.nan, 1.0])).sum())(fitted).left_slope)


def test_bfloat16_input_keeps_dtype(rng):
  fitted = pwl.fit("silu", 16)
  x = jnp.asarray(rng.normal(size=256), jnp.bfloat16)
  out = fitted(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), fitted.numpy(np.asarray(x, np.float64)),
                             rtol=1e-2, atol=1e-2)


def test_data_weighted_fit_beats_minimax_on_its_sample(rng):
  samples = rng.standard_t(df=5, size=50_000) * 1.2 - 0.5
  optimal = pwl.fit("gelu", 8, "optimal").error_report("gelu", samples=samples)
  weighted = pwl.fit("gelu", 8, "data", samples=samples).error_report("gelu", samples=samples)
  assert weighted["sample_rms_error"] < optimal["sample_rms_error"], (weighted, optimal)
  assert weighted["max_abs_error"] < 0.1  # still bounded on the whole line


def test_callable_activation_estimates_asymptotes():
  softplus = lambda x: np.logaddexp(0.0, x)
  fitted = pwl.fit(softplus, 16, "optimal")
  assert float(fitted.left_slope) == pytest.approx(0.0, abs=1e-9)
  assert float(fitted.right_slope) == pytest.approx(1.0, abs=1e-9)
  assert fitted.error_report(softplus)["max_abs_error"] < 5e-3


def test_from_spec():
  assert pwl.from_spec("pwl8", "gelu").num_segments == 8
  uniform = pwl.from_spec("pwl4-uniform", "silu")
  np.testing.assert_allclose(np.diff(np.asarray(uniform.knots)), 4.0, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="gelu", segments=0), "segments: expected an integer >= 1"),
    (dict(activation="gelu", segments=2.5), "segments: expected an integer >= 1"),
    (dict(activation="gelu", segments=True), "segments: expected an integer >= 1"),
    (dict(activation="mish", segments=8), "activation: unknown name 'mish'"),
    (dict(activation="gelu", segments=8, method="best"), "method: expected one of"),
    (dict(activation="gelu", segments=8, method="data"), "samples: method='data' needs"),
    (dict(activation="gelu", segments=8, method="uniform", knot_range=(2.0, -2.0)), "knot_range"),
    (dict(activation=lambda x: np.exp(x * x), segments=8), "not finite at ±60"),
    (dict(activation=lambda x: x**3, segments=8), "does not approach its tail lines"),
])
def test_fit_rejects_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pwl.fit(**kwargs)


@pytest.mark.parametrize("knots,values,match", [
    ([0.0, 1.0, 0.5], [0.0, 1.0, 2.0], "strictly increasing"),
    ([0.0, np.inf], [0.0, 1.0], "knots: expected finite"),
    ([0.0, 1.0], [0.0, np.nan], "values: expected finite"),
    ([0.0], [0.0], "at least 2 knots"),
    ([0.0, 1.0], [0.0, 1.0, 2.0], "values: expected shape"),
])
def test_create_rejects_bad_parameters(knots, values, match):
  with pytest.raises(ValueError, match=match):
    PiecewiseLinear.create(knots, values, 0.0, 1.0)
