"""The hinge table: a PWL as the f32 vector the GPU kernels copy into SMEM and read per knot.

For K ascending knots t_k, segment slopes s_0..s_K and leftmost intercept c_0, a continuous PWL is

    pwl(h) = s_0 h + c   + Σ_k Δs_k max(h, t_k)        Δs_k = s_{k+1} - s_k,
           = s_0 h + c_0 + Σ_k Δs_k relu(h - t_k)      c = c_0 - Σ_k Δs_k t_k,

(max(h, t) = relu(h - t) + t), 2 instructions per knot either way. ``activation_table`` lays it
out as [t_0..t_{K-1}, Δs_0..Δs_{K-1}, s_0, c, c_0], padded to ``TABLE_ALIGN`` entries;
``HingeTable`` names where each entry sits, so the kernels' jnp and PTX forms read one layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.activation import Activation

TABLE_ALIGN = 32  # f32 entries: TMA copies move multiples of 128 bytes
MAX_TMA_BOX = 256  # elements per dimension of one TMA copy
# The kernels copy a table in one TMA box: 2K + 3 hinge entries, or 2K + 4 of ``pwl_lookup``'s
# table, fit for K <= 126 knots; the dispatcher sends larger PWLs to XLA.
MAX_KNOTS = (MAX_TMA_BOX - 4) // 2


@dataclasses.dataclass(frozen=True)
class HingeTable:
  """Indices of ``activation_table``'s entries for ``num_knots`` knots."""

  num_knots: int

  def knot(self, k: int) -> int:
    """t_k."""
    return k

  def step(self, k: int) -> int:
    """Δs_k = s_{k+1} - s_k, the slope change at t_k."""
    return self.num_knots + k

  @property
  def first_slope(self) -> int:
    """s_0, the slope left of every knot."""
    return 2 * self.num_knots

  @property
  def max_constant(self) -> int:
    """c = c_0 - Σ_k Δs_k t_k, the constant of the max(h, t_k) form."""
    return 2 * self.num_knots + 1

  @property
  def first_intercept(self) -> int:
    """c_0, the intercept left of every knot and the constant of the relu(h - t_k) form."""
    return 2 * self.num_knots + 2


def activation_table(activation: Activation) -> jax.Array | None:
  """The hinge table of a PWL ``activation`` (None for an exact one), laid out as ``HingeTable``."""
  if activation.kind != "pwl":
    return None
  knots = jnp.asarray(activation.knots, jnp.float32)
  slopes = jnp.asarray(activation.slopes, jnp.float32)
  steps = slopes[1:] - slopes[:-1]
  first_intercept = activation.intercepts[0].astype(jnp.float32)
  max_constant = first_intercept - jnp.sum(steps * knots)
  table = jnp.concatenate([knots, steps, slopes[:1], max_constant[None], first_intercept[None]])
  return jnp.pad(table, (0, -table.shape[0] % TABLE_ALIGN))
