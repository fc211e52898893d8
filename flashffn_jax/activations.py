"""Named activations in float64 NumPy, with the straight lines they approach at ±∞.

Used for fitting and for error reports (references must be more precise than what they check).
A PWL fit reproduces these asymptotes exactly in its two tail segments, so its error is bounded
on the whole real line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from scipy import special


@dataclasses.dataclass(frozen=True)
class Line:
  """y = slope * x + intercept."""

  slope: float
  intercept: float

  def __call__(self, x):
    return self.slope * x + self.intercept


@dataclasses.dataclass(frozen=True)
class NamedActivation:
  name: str
  fn: Callable[[np.ndarray], np.ndarray]
  left: Line
  right: Line
  default_range: tuple[float, float]  # knot span for the uniform/curvature fits


_ZERO, _IDENTITY = Line(0.0, 0.0), Line(1.0, 0.0)
_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)

ACTIVATIONS: dict[str, NamedActivation] = {
    a.name: a
    for a in (
        NamedActivation("gelu", lambda x: 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0))),
                        _ZERO, _IDENTITY, (-4.0, 4.0)),
        NamedActivation(
            "gelu_tanh",
            lambda x: 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))),
            _ZERO, _IDENTITY, (-4.0, 4.0)),
        NamedActivation("silu", lambda x: x * special.expit(x), _ZERO, _IDENTITY, (-8.0, 8.0)),
        NamedActivation("relu", lambda x: np.maximum(x, 0.0), _ZERO, _IDENTITY, (-1.0, 1.0)),
        NamedActivation("tanh", np.tanh, Line(0.0, -1.0), Line(0.0, 1.0), (-4.0, 4.0)),
        NamedActivation("sigmoid", special.expit, _ZERO, Line(0.0, 1.0), (-8.0, 8.0)),
    )
}
ALIASES = {"gelu_erf": "gelu", "swish": "silu"}


def lookup(name: str) -> NamedActivation:
  """The named activation; ValueError listing the valid names otherwise."""
  key = ALIASES.get(name, name)
  if key not in ACTIVATIONS:
    valid = sorted(ACTIVATIONS) + sorted(ALIASES)
    raise ValueError(f"activation: unknown name {name!r}; expected one of {valid}")
  return ACTIVATIONS[key]


def estimate_asymptotes(fn: Callable[[np.ndarray], np.ndarray], far: float = 60.0) -> tuple[Line, Line]:
  """Asymptotic lines of a callable, read off at ±far and ±(far - 10)."""
  x = np.array([-far, -far + 10.0, far - 10.0, far])
  y = np.asarray(fn(x), dtype=np.float64)
  if not np.all(np.isfinite(y)):
    raise ValueError(
        "activation: the callable is not finite at ±60, so its asymptotes cannot be estimated; "
        "pass tails=(Line(...), Line(...)) explicitly")
  left_slope = (y[1] - y[0]) / 10.0
  right_slope = (y[3] - y[2]) / 10.0
  return (Line(float(left_slope), float(y[0] - left_slope * x[0])),
          Line(float(right_slope), float(y[3] - right_slope * x[3])))
