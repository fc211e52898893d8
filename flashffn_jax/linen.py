"""Flax Linen fused feed-forward layer: the public op ``flashffn_jax.ffn`` as an ``nn.Module``.

Same math, parameter names and PWL parametrisation as ``flashffn_jax.nnx.FusedFFN``:

    MLP:  y = act(x @ w_up + b_up) @ w_down + b_down
    GLU:  y = (act(x @ w_gate + b_gate) * (x @ w_up + b_up)) @ w_down + b_down

With ``learnable_activation=True`` the PWL becomes five params per layer
(``pwl_first_knot``, ``pwl_log_gaps``, ``pwl_values``, ``pwl_left_slope``, ``pwl_right_slope``;
knots = first + [0, cumsum(1e-4 + exp(log_gaps))], so they stay sorted under any update; one shared
gap for an evenly spaced PWL, which stays evenly spaced). The output is sown into the
"intermediates" collection as "ffn_output".
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from flashffn_jax.nnx import PWL_PARAM_NAMES, check_activation, pwl_from_arrays, pwl_to_arrays
from flashffn_jax.ops import ffn
from flashffn_jax.pwl import PiecewiseLinear


class FusedFFN(nn.Module):
  """Fused FFN over the last axis; ``features`` = D_out (default: the input's D).

  Attributes:
    hidden_features: H.
    features: D_out, or None for the input's last dimension.
    glu: add a gate projection. use_bias: biases on every projection.
    activation: exact name, callable or ``PiecewiseLinear``.
    learnable_activation: the PWL becomes params of this layer.
    dtype / param_dtype / kernel_init / bias_init / precision: as in ``nn.Dense``.
    implementation: passed to ``ffn``.
  """

  hidden_features: int
  features: int | None = None
  glu: bool = False
  use_bias: bool = True
  activation: str | PiecewiseLinear | Callable = "gelu"
  learnable_activation: bool = False
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  precision: jax.lax.PrecisionLike = None
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_activation(self.activation, self.learnable_activation)
    d_model, hidden = x.shape[-1], self.hidden_features
    d_out = d_model if self.features is None else self.features
    weights = {"w_up": self.param("w_up", self.kernel_init, (d_model, hidden), self.param_dtype),
               "w_down": self.param("w_down", self.kernel_init, (hidden, d_out), self.param_dtype)}
    if self.glu:
      weights["w_gate"] = self.param("w_gate", self.kernel_init, (d_model, hidden), self.param_dtype)
    if self.use_bias:
      for name, size in (("b_up", hidden), ("b_gate", hidden), ("b_down", d_out)):
        if name != "b_gate" or self.glu:
          weights[name] = self.param(name, self.bias_init, (size,), self.param_dtype)
    x, *values = nn.dtypes.promote_dtype(x, *weights.values(), dtype=self.dtype)
    weights = dict(zip(weights, values))
    activation = self.activation
    if self.learnable_activation:
      arrays = pwl_to_arrays(activation)
      activation = pwl_from_arrays(*(self.param(name, lambda _, a=arrays[name]: a)
                                     for name in PWL_PARAM_NAMES))
    y = ffn(x, weights.pop("w_up"), weights.pop("w_down"), **weights, activation=activation,
            implementation=self.implementation, precision=self.precision)
    self.sow("intermediates", "ffn_output", y)
    return y
