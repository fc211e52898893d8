"""pallas_kernels.activation: closed-form derivatives and the PWL select chain vs float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashffn_jax import activations
from pallas_kernels.activation import (EXACT_ACTIVATIONS, exact_activation,
                                       exact_activation_and_derivative, pwl_segment_sums,
                                       pwl_select)


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


def test_pwl_segment_sums_match_float64_with_empty_segments_and_nan(rng):
  """Σ g·x and Σ g per segment (cumulative-sum form) vs float64 bincount; segments 0, 3 and K hold
  no inputs and must come out exactly 0; a NaN input counts in segment 0: Σ g·x there is NaN,
  every other sum stays finite."""
  knots = np.array([-3.0, -2.0, -1.0, 0.5, 1.0, 2.5], np.float32)
  x = rng.uniform(-2.9, 2.4, (37, 53)).astype(np.float32)
  x = np.where((x >= -1.0) & (x < 0.5), 0.7, x).astype(np.float32)  # empty segment 3
  g = rng.normal(size=x.shape).astype(np.float32)
  d_slopes, d_intercepts = pwl_segment_sums(jnp.asarray(x), jnp.asarray(g), knots)
  segment = np.searchsorted(knots, x, side="right").ravel()
  x64, g64 = x.astype(np.float64).ravel(), g.astype(np.float64).ravel()
  want_slopes = np.bincount(segment, g64 * x64, minlength=7)
  want_intercepts = np.bincount(segment, g64, minlength=7)
  np.testing.assert_allclose(d_slopes, want_slopes, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(d_intercepts, want_intercepts, rtol=1e-4, atol=1e-3)
  for empty in (0, 3, 6):
    assert d_slopes[empty] == 0 and d_intercepts[empty] == 0, empty
  poisoned_slopes, poisoned_intercepts = pwl_segment_sums(jnp.asarray(x).at[4, 4].set(jnp.nan),
                                                          jnp.asarray(g), knots)
  assert np.isnan(poisoned_slopes[0]) and np.all(np.isfinite(np.asarray(poisoned_slopes[1:])))
  assert np.all(np.isfinite(np.asarray(poisoned_intercepts)))
