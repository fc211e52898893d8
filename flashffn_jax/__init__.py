"""flashffn-jax: fused feed-forward blocks with piecewise-linear activations for JAX/Flax.

    import flashffn_jax as ff
    act = ff.fit("gelu", segments=16)                  # minimax PWL, max |err| 2.9e-3
    y = ff.ffn(x, w_up, w_down, activation=act)        # fused kernel where one wins, else XLA
"""

from flashffn_jax.activations import Line
from flashffn_jax.ops import IMPLEMENTATIONS, chosen_implementation, ffn, reference_ffn
from flashffn_jax.pwl import PiecewiseLinear, fit, from_spec

__all__ = ["IMPLEMENTATIONS", "Line", "PiecewiseLinear", "chosen_implementation", "ffn", "fit", "from_spec", "linearize",
           "reference_ffn"]
__version__ = "0.1.0"


def __getattr__(name: str):
  """``linearize`` imports Flax, so it loads on first use (``import flashffn_jax`` stays light)."""
  if name == "linearize":
    from flashffn_jax.surgery import linearize
    return linearize
  raise AttributeError(f"module 'flashffn_jax' has no attribute {name!r}")
