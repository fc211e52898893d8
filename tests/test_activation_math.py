"""pallas_kernels.activation: closed-form derivatives and the PWL select chain vs float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashffn_jax import activations
from pallas_kernels.activation import (EXACT_ACTIVATIONS, exact_activation,
                                       exact_activation_and_derivative, pwl_segment_sums,
                                       pwl_select, segment_sums_by_bands, segment_sums_by_index)


@pytest.mark.parametrize("name", EXACT_ACTIVATIONS)
def test_exact_activation_and_derivative(name, rng):
  x = rng.normal(0.0, 3.0, 4096).astype(np.float32)
  value, derivative = exact_activation_and_derivative(name, jnp.asarray(x))
  np.testing.assert_allclose(value, exact_activation(name, jnp.asarray(x)), rtol=1e-6, atol=1e-6)
  autodiff = jax.vmap(jax.grad(lambda v: exact_activation(name, v)))(jnp.asarray(x))
  np.testing.assert_allclose(derivative, autodiff, rtol=2e-5, atol=2e-6)
  if name in activations.ACTIVATIONS:
    np.testing.assert_allclose(value, activations.lookup(name).fn(x.astype(np.float64)), rtol=2e-6, atol=2e-6)


def test_pwl_select_picks_segment(rng):
  knots = np.sort(rng.uniform(-3, 3, 7)).astype(np.float32)
  slopes = rng.normal(size=8).astype(np.float32)
  intercepts = rng.normal(size=8).astype(np.float32)
  x = rng.uniform(-5, 5, 2000).astype(np.float32)
  slope, intercept = pwl_select(jnp.asarray(x), knots, slopes, intercepts)
  segment = np.searchsorted(knots, x, side="right")
  np.testing.assert_array_equal(slope, slopes[segment])
  np.testing.assert_array_equal(intercept, intercepts[segment])


SEGMENT_SUMS_FORMS = {
    "library": pwl_segment_sums,  # on CPU: by index
    "bands": lambda x, g, knots, evenly_spaced: segment_sums_by_bands(x, g, jnp.asarray(knots)),
    "index": lambda x, g, knots, evenly_spaced: segment_sums_by_index(x, g, jnp.asarray(knots),
                                                                      evenly_spaced),
}
KNOT_SETS = {  # (knots, evenly spaced): K fused compares, a binary search, the lookup
    "6-knots": (np.array([-3.0, -2.0, -1.0, 0.5, 1.0, 2.5], np.float32), False),
    "40-knots": (np.concatenate([[-3.0, -2.0, -1.0, 0.5], np.linspace(1.0, 2.5, 36)]), False),
    "evenly-spaced": (np.linspace(-3.0, 2.5, 12), True),
}


@pytest.mark.parametrize("form", SEGMENT_SUMS_FORMS)
@pytest.mark.parametrize("knot_set", KNOT_SETS)
def test_pwl_segment_sums_match_float64_with_empty_segments_and_nan(rng, form, knot_set):
  """Σ g·x and Σ g per segment vs float64 bincount, each form of the sums; no input in [-1, 0.5)
  and outside [-2.9, 2.4], so those segments (0, K and the ones in between) must come out exactly
  0; a NaN input counts in segment 0: Σ g·x there is NaN, every other sum stays finite."""
  knots, evenly_spaced = KNOT_SETS[knot_set]
  knots = knots.astype(np.float32)
  segments_of = SEGMENT_SUMS_FORMS[form]
  x = rng.uniform(-2.9, 2.4, (37, 53)).astype(np.float32)
  x = np.where((x >= -1.0) & (x < 0.5), 0.7, x).astype(np.float32)
  x[0, :2] = knots[[1, -2]]  # on a knot: the segment above it
  g = rng.normal(size=x.shape).astype(np.float32)
  d_slopes, d_intercepts = segments_of(jnp.asarray(x), jnp.asarray(g), knots, evenly_spaced)
  segment = np.searchsorted(knots, x, side="right").ravel()
  x64, g64 = x.astype(np.float64).ravel(), g.astype(np.float64).ravel()
  want_slopes = np.bincount(segment, g64 * x64, minlength=len(knots) + 1)
  want_intercepts = np.bincount(segment, g64, minlength=len(knots) + 1)
  np.testing.assert_allclose(d_slopes, want_slopes, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(d_intercepts, want_intercepts, rtol=1e-4, atol=1e-3)
  empty = np.flatnonzero(want_intercepts == 0)
  assert {0, len(knots)} <= set(empty) and len(empty) >= 3
  assert np.all(np.asarray(d_slopes)[empty] == 0) and np.all(np.asarray(d_intercepts)[empty] == 0)
  poisoned_slopes, poisoned_intercepts = segments_of(jnp.asarray(x).at[4, 4].set(jnp.nan),
                                                     jnp.asarray(g), knots, evenly_spaced)
  assert np.isnan(poisoned_slopes[0]) and np.all(np.isfinite(np.asarray(poisoned_slopes[1:])))
  assert np.all(np.isfinite(np.asarray(poisoned_intercepts)))


@pytest.mark.parametrize("form", SEGMENT_SUMS_FORMS)
def test_pwl_segment_sums_stay_accurate_over_many_elements(rng, form):
  """512 x 1024 elements into 9 segments: each form within 1e-6 (norm) of the float64 sums - a
  single f32 scatter-add chain over all of them was 5x that (CPU, 2048 x 1536: 1.6e-5)."""
  knots = np.array([-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], np.float32)
  x = (rng.normal(size=(512, 1024)) * 2).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  d_slopes, d_intercepts = SEGMENT_SUMS_FORMS[form](jnp.asarray(x), jnp.asarray(g), knots, False)
  segment = np.searchsorted(knots, x, side="right").ravel()
  x64, g64 = x.astype(np.float64).ravel(), g.astype(np.float64).ravel()
  for got, want in ((d_slopes, np.bincount(segment, g64 * x64, minlength=9)),
                    (d_intercepts, np.bincount(segment, g64, minlength=9))):
    assert np.linalg.norm(np.asarray(got, np.float64) - want) < 1e-6 * np.linalg.norm(want)


def test_pwl_segment_sums_of_a_scalar_and_under_vmap(rng):
  """A 0-d x (what ``vmap(grad(pwl))`` hands the VJP per element) and a batch under ``vmap``
  give the per-element sums: g x and g in that element's segment, zeros elsewhere; an empty x
  gives zeros."""
  knots = np.array([-1.0, 0.0, 1.0], np.float32)
  x = rng.normal(size=16).astype(np.float32)
  g = rng.normal(size=16).astype(np.float32)
  d_slopes, d_intercepts = jax.vmap(lambda a, b: pwl_segment_sums(a, b, knots))(x, g)
  segment = np.searchsorted(knots, x, side="right")
  one_hot = np.eye(4, dtype=np.float32)[segment]
  np.testing.assert_allclose(d_slopes, one_hot * (g * x)[:, None], rtol=1e-6)
  np.testing.assert_allclose(d_intercepts, one_hot * g[:, None], rtol=1e-6)
  scalar = pwl_segment_sums(jnp.float32(x[0]), jnp.float32(g[0]), knots)
  np.testing.assert_allclose(scalar[1], one_hot[0] * g[0], rtol=1e-6)
  for empty in (np.zeros((0,), np.float32), np.zeros((3, 0), np.float32)):
    sums = pwl_segment_sums(jnp.asarray(empty), jnp.asarray(empty), knots)
    assert all(np.array_equal(s, np.zeros(4)) for s in sums)
