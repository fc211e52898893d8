"""Flax NNX fused feed-forward layer: the public op ``flashffn_jax.ffn`` as an ``nnx.Module``.

    MLP:  y = act(x @ w_up + b_up) @ w_down + b_down
    GLU:  y = (act(x @ w_gate + b_gate) * (x @ w_up + b_up)) @ w_down + b_down

The activation is an exact name ("gelu", "silu", ...), a callable, or a ``PiecewiseLinear``.
A PWL lives in the layer's state as five float32 variables (``PWL_PARAM_NAMES``), parametrised
so that no update can unsort the knots:

    knots = pwl_first_knot + [0, cumsum(MIN_KNOT_GAP + exp(pwl_log_gaps))]
    values = pwl_values;  tails = pwl_left_slope, pwl_right_slope

Every gap is at least MIN_KNOT_GAP = 1e-4, so the knots stay strictly increasing in float32 for
any parameter values while |knot| < ~1e3 (beyond that float32 spacing exceeds the gap). An
evenly spaced PWL (``PiecewiseLinear.evenly_spaced``, e.g. a uniform fit) keeps one shared gap,
``pwl_log_gaps`` of shape [1], so its knots t_0 + k δ stay evenly spaced under training and a
Hopper kernel evaluates it by table lookup even inside ``nnx.jit``, where the knots are traced.

With ``learnable_activation=True`` they are ``nnx.Param`` (trained per layer, no re-sorting step
needed); otherwise ``PWLConstant`` variables (saved with the model, never trained).

Inside ``nnx.capture(..., nnx.Intermediate)`` the layer records its output under "ffn_output"
(``self.sow(nnx.Intermediate, "ffn_output", y)``); outside a capture it records nothing, so
plain calls and ``nnx.jit`` never grow the module's state.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from flashffn_jax.checks import check_positive_int
from flashffn_jax.ops import ffn, prepare_activation, to_kernel_activation
from flashffn_jax.pwl import PiecewiseLinear

PWL_PARAM_NAMES = ("pwl_first_knot", "pwl_log_gaps", "pwl_values", "pwl_left_slope", "pwl_right_slope")
WEIGHT_NAMES = ("w_up", "w_down", "w_gate", "b_up", "b_gate", "b_down")
MIN_KNOT_GAP = 1e-4

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class PWLConstant(nnx.Variable):
  """A frozen PWL parameter: part of the layer's state (checkpointed), never an ``nnx.Param``."""


def pwl_to_arrays(pwl: PiecewiseLinear) -> dict[str, jax.Array]:
  """The sort-preserving parametrisation of a PWL (see the module docstring), float32."""
  pwl.validate()
  knots = jnp.asarray(pwl.knots, jnp.float32)
  gaps = jnp.diff(knots)
  if not isinstance(gaps, jax.core.Tracer) and float(jnp.min(gaps)) <= MIN_KNOT_GAP:
    raise ValueError(f"activation: knots closer than {MIN_KNOT_GAP} cannot be a layer's PWL, got "
                     f"gaps down to {float(jnp.min(gaps)):.2e}")
  if pwl.evenly_spaced:
    gaps = (knots[-1:] - knots[:1]) / (knots.shape[0] - 1)
  return {"pwl_first_knot": knots[:1], "pwl_log_gaps": jnp.log(gaps - MIN_KNOT_GAP),
          "pwl_values": jnp.asarray(pwl.values, jnp.float32),
          "pwl_left_slope": jnp.asarray(pwl.left_slope, jnp.float32),
          "pwl_right_slope": jnp.asarray(pwl.right_slope, jnp.float32)}


def pwl_from_arrays(pwl_first_knot, pwl_log_gaps, pwl_values, pwl_left_slope,
                    pwl_right_slope) -> PiecewiseLinear:
  """Inverse of ``pwl_to_arrays``; differentiable, knots sorted for any parameter values (one
  gap for K > 2 knots: evenly spaced)."""
  first = jnp.asarray(pwl_first_knot, jnp.float32)
  gaps = MIN_KNOT_GAP + jnp.exp(jnp.asarray(pwl_log_gaps, jnp.float32))
  values = jnp.asarray(pwl_values, jnp.float32)
  shared_gap = gaps.shape[0] == 1
  if shared_gap:
    gaps = jnp.broadcast_to(gaps, (values.shape[0] - 1,))
  knots = jnp.concatenate([first, first + jnp.cumsum(gaps)])
  return PiecewiseLinear(knots, values, jnp.asarray(pwl_left_slope, jnp.float32),
                         jnp.asarray(pwl_right_slope, jnp.float32), evenly_spaced=shared_gap)


def check_activation(activation, learnable: bool) -> None:
  """ValueError naming ``activation`` / ``learnable_activation`` when they cannot build a layer."""
  to_kernel_activation(activation)  # validates names and PWL parameters
  if learnable and not isinstance(activation, PiecewiseLinear):
    raise ValueError(f"learnable_activation: needs a PiecewiseLinear activation (e.g. "
                     f"flashffn_jax.fit('gelu', 16)), got {activation!r}")


def _as_variable(value, variable_type=nnx.Param) -> nnx.Variable | None:
  """Adopt an existing Variable as it is (same object, metadata, array) or wrap an array."""
  if value is None or isinstance(value, nnx.Variable):
    return value
  return variable_type(value)


def _value(variable: nnx.Variable | None) -> jax.Array | None:
  return None if variable is None else variable[...]


class FusedFFN(nnx.Module):
  """Fused feed-forward block (MLP or GLU) that calls ``flashffn_jax.ffn``.

  Args:
    in_features: D. hidden_features: H. out_features: D_out (default D).
    glu: add a gate projection (SwiGLU/GeGLU form).
    use_bias: biases on every projection.
    activation: exact name, callable, or ``PiecewiseLinear``.
    learnable_activation: make the PWL an ``nnx.Param`` of this layer (needs a PiecewiseLinear).
    dtype: compute dtype (default: promoted from the input and the parameters).
    param_dtype: dtype of the initialised weights.
    kernel_init, bias_init: Flax initialisers (``nnx.with_partitioning`` works for sharding).
    implementation: passed to ``ffn`` (None: the fastest correct one for the platform).
    precision: passed to ``ffn``'s XLA matmuls.
    approximates: the exact activation a PWL stands for (reports; ``linearize`` sets it).
  """

  PWL_PARAM_NAMES = PWL_PARAM_NAMES

  def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, *,
               glu: bool = False, use_bias: bool = True,
               activation: str | PiecewiseLinear | Callable = "gelu",
               learnable_activation: bool = False, dtype=None, param_dtype=jnp.float32,
               kernel_init=default_kernel_init, bias_init=default_bias_init,
               implementation: str | None = None, precision=None, approximates: str | None = None,
               rngs: nnx.Rngs):
    for name, value in (("in_features", in_features), ("hidden_features", hidden_features),
                        ("out_features", in_features if out_features is None else out_features)):
      check_positive_int(name, value)
    out_features = in_features if out_features is None else out_features
    check_activation(activation, learnable_activation)

    def weight(shape, init):
      return nnx.Param(init(rngs.params(), shape, param_dtype))

    self.w_up = weight((in_features, hidden_features), kernel_init)
    self.w_down = weight((hidden_features, out_features), kernel_init)
    self.w_gate = nnx.data(weight((in_features, hidden_features), kernel_init) if glu else None)
    self.b_up = nnx.data(weight((hidden_features,), bias_init) if use_bias else None)
    self.b_gate = nnx.data(weight((hidden_features,), bias_init) if use_bias and glu else None)
    self.b_down = nnx.data(weight((out_features,), bias_init) if use_bias else None)
    self.dtype = dtype
    self.implementation = implementation
    self.precision = precision
    self.set_activation(activation, learnable=learnable_activation, approximates=approximates)

  @classmethod
  def from_weights(cls, w_up, w_down, *, w_gate=None, b_up=None, b_gate=None, b_down=None,
                   activation: str | PiecewiseLinear | Callable = "gelu",
                   learnable_activation: bool = False, dtype=None,
                   implementation: str | None = None, precision=None,
                   approximates: str | None = None) -> FusedFFN:
    """A layer around existing weights, without copying them.

    Each weight is an array (wrapped in a new ``nnx.Param``) or an ``nnx.Variable``, which is
    adopted as it is — same object, metadata (sharding) and array; pass variables of a clone
    when the source module must stay independent. Shapes: w_up/w_gate [D, H], w_down [H, D_out],
    biases [H] / [H] / [D_out]; any bias may be None.
    """
    weights = {name: _as_variable(w) for name, w in
               dict(w_up=w_up, w_down=w_down, w_gate=w_gate, b_up=b_up, b_gate=b_gate, b_down=b_down).items()}
    shapes = {name: tuple(w.shape) for name, w in weights.items() if w is not None}
    for name in ("w_up", "w_down") + (("w_gate",) if w_gate is not None else ()):
      if len(shapes[name]) != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {shapes[name]}")
    d_model, hidden = shapes["w_up"]
    out_features = shapes["w_down"][1]
    expected = {"w_down": (hidden, out_features), "w_gate": (d_model, hidden), "b_up": (hidden,),
                "b_gate": (hidden,), "b_down": (out_features,)}
    for name, shape in shapes.items():
      if name in expected and shape != expected[name]:
        raise ValueError(f"{name}: expected shape {expected[name]} (w_up is {shapes['w_up']}), "
                         f"got {shape}")
    if b_gate is not None and w_gate is None:
      raise ValueError("b_gate: given without w_gate (a gate bias needs a GLU FFN)")
    check_activation(activation, learnable_activation)
    layer = nnx.eval_shape(lambda: cls(d_model, hidden, out_features, glu=w_gate is not None,
                                       use_bias=False, rngs=nnx.Rngs(0)))
    for name, w in weights.items():
      setattr(layer, name, nnx.data(w))
    layer.dtype, layer.implementation, layer.precision = dtype, implementation, precision
    layer.set_activation(activation, learnable=learnable_activation, approximates=approximates)
    return layer

  def set_activation(self, activation: str | PiecewiseLinear | Callable, *, learnable: bool = False,
                     approximates: str | None = None) -> None:
    """Swap the activation in place (a PWL becomes five variables, see the module docstring)."""
    check_activation(activation, learnable)
    is_pwl = isinstance(activation, PiecewiseLinear)
    variable_type = nnx.Param if learnable else PWLConstant
    arrays = pwl_to_arrays(activation) if is_pwl else dict.fromkeys(PWL_PARAM_NAMES)
    for name, array in arrays.items():
      setattr(self, name, nnx.data(None if array is None else variable_type(array)))
    self.exact_activation = None if is_pwl else activation
    if approximates is None and isinstance(activation, str):
      approximates = activation
    self.approximates = approximates

  @property
  def activation(self) -> str | PiecewiseLinear | Callable:
    """The activation as ``ffn`` takes it (the PWL rebuilt from its variables)."""
    if self.exact_activation is not None:
      return self.exact_activation
    return pwl_from_arrays(*(getattr(self, name)[...] for name in PWL_PARAM_NAMES))

  @property
  def learnable_activation(self) -> bool:
    return isinstance(self.pwl_values, nnx.Param)

  @property
  def glu(self) -> bool:
    return self.w_gate is not None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D_out] in the compute dtype."""
    arrays = promote_dtype((x, *(_value(getattr(self, n)) for n in WEIGHT_NAMES)),
                                      dtype=self.dtype)
    x, weights = arrays[0], dict(zip(WEIGHT_NAMES, arrays[1:]))
    activation = _prepared_activations.get().get(id(self)) or self.activation
    y = ffn(x, weights.pop("w_up"), weights.pop("w_down"), **weights, activation=activation,
            implementation=self.implementation, precision=self.precision)
    if hasattr(self, "__captures__"):  # only inside nnx.capture (see the module docstring)
      self.sow(nnx.Intermediate, "ffn_output", y)
    return y


_prepared_activations: contextvars.ContextVar[dict] = contextvars.ContextVar(
    "prepared_activations", default={})


@contextlib.contextmanager
def activations_prepared(module: nnx.Module) -> Iterator[None]:
  """Inside, each ``FusedFFN`` object of ``module`` calls ``ffn`` with its activation as prepared
  on entry (``ops.prepare_activation``: a PWL's knots, slopes, intercepts and GPU kernel tables)
  instead of rebuilding it from its variables at every call. Enter it in a jitted function and
  trace a loop over steps inside (``models.generate.decode_steps``), and that preparation runs
  once per call, not once per step. Only for code that does not change the variables inside;
  other module objects (e.g. ones ``nnx.merge`` builds) are not affected."""
  prepared = {id(layer): prepare_activation(layer.activation)
              for _, layer in nnx.iter_modules(module) if isinstance(layer, FusedFFN)}
  token = _prepared_activations.set(_prepared_activations.get() | prepared)
  try:
    yield
  finally:
    _prepared_activations.reset(token)
