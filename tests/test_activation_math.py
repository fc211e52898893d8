"""pallas_kernels.activation: closed-form derivatives and the PWL select chain vs float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashffn_jax import activations
from pallas_kernels.activation import (EXACT_ACTIVATIONS, exact_activation,
                                       exact_activation_and_derivative, pwl_select)


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
