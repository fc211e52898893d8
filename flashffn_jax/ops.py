"""The public FFN op: one signature, several implementations, an XLA reference.

    MLP:  y = act(x @ W_up + b_up) @ W_down + b_down
    GLU:  y = (act(x @ W_gate + b_gate) * (x @ W_up + b_up)) @ W_down + b_down

Matmuls accumulate in float32; the activation runs in float32; the hidden activations are cast
to x's dtype before the second matmul (what the fused kernels do on chip). In the backward the
cotangents are rounded to x's dtype before each GEMM (bf16 GEMMs for a bf16 FFN, as in the kernels). x may have any
leading batch dims; the weights are 2-D.

Implementations are tried in order. Each is a function with the signature of
``reference_ffn`` that raises ``NotImplementedError(reason)`` at trace time when it cannot serve
a problem (wrong platform, shape, dtype, activation, or slower than XLA there). With
``implementation=None`` the platform's list is tried and the first that accepts runs; the XLA
reference accepts everything, so there is always a correct path. A named implementation that
declines falls back to XLA with a one-line warning giving its reason.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from flashffn_jax.pwl import PiecewiseLinear
from pallas_kernels.activation import EXACT_ACTIVATIONS, Activation

logger = logging.getLogger("flashffn_jax")

ActivationLike = str | PiecewiseLinear | Callable[[jax.Array], jax.Array]
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_ALIASES = {"gelu_erf": "gelu", "swish": "silu"}


def to_kernel_activation(activation: ActivationLike | Activation) -> Activation:
  """Normalise a name / PiecewiseLinear / callable into what implementations receive (an
  ``Activation``, e.g. from ``prepare_activation``, passes as it is)."""
  if isinstance(activation, Activation):
    return activation
  if isinstance(activation, PiecewiseLinear):
    activation.validate()
    return Activation("pwl", activation.knot_positions(), activation.slopes(),
                      activation.intercepts(), evenly_spaced=activation.evenly_spaced)
  if isinstance(activation, str):
    name = _ALIASES.get(activation, activation)
    if name not in EXACT_ACTIVATIONS:
      raise ValueError(f"activation: expected one of {EXACT_ACTIVATIONS}, a PiecewiseLinear or a "
                       f"callable, got {activation!r}")
    return Activation(name)
  if callable(activation):
    return Activation("callable", fn=activation)
  raise ValueError(f"activation: expected a name, a PiecewiseLinear or a callable, got "
                   f"{type(activation).__name__}")


def prepare_activation(activation: ActivationLike | Activation) -> Activation:
  """``activation`` as implementations receive it, its arrays computed now: a PWL's knots,
  slopes and intercepts, and on a GPU the kernels' tables (``with_kernel_tables``). ``ffn`` takes
  the result in place of ``activation``; a loop that calls ``ffn`` many times with the same
  activation (a decode loop's ``lax.scan``) prepares it once, outside, and its steps keep no
  parameter preprocessing (XLA does not hoist it out of the loop)."""
  activation = to_kernel_activation(activation)
  if jax.default_backend() == "gpu":
    from pallas_kernels.gpu.dispatch import with_kernel_tables  # noqa: PLC0415 -- GPU only
    activation = with_kernel_tables(activation)
  return activation


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
  """x @ w accumulated and returned in float32. Its VJP rounds the float32 cotangent to x's
  dtype first, so a bfloat16 FFN's backward runs bfloat16 GEMMs (f32 accumulation), like the
  kernels' — plain autodiff would run every backward GEMM in float32 — and has them write dx and
  dw in x's and w's dtypes (one rounding; an f32 product cast after cost XLA a convert pass per
  weight on the H200)."""
  return jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)


def _matmul_fwd(x, w, precision):
  return _matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  dx = jnp.dot(g, w.T, preferred_element_type=x.dtype, precision=precision)
  dw = jnp.dot(x.T, g, preferred_element_type=w.dtype, precision=precision)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def reference_ffn(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation: Activation,
                  precision=None) -> jax.Array:
  """The XLA reference on 2-D x [M, D]; see the module docstring for the math."""

  def linear(inputs, weight, bias):
    out = _matmul(inputs, weight, precision)
    return out if bias is None else out + bias.astype(jnp.float32)

  up = linear(x, w_up, b_up)
  hidden = up if w_gate is None else linear(x, w_gate, b_gate)
  hidden = activation(hidden)
  if w_gate is not None:
    hidden = hidden * up
  return linear(hidden.astype(x.dtype), w_down, b_down).astype(x.dtype)


PADDED_ROWS = 8


def xla_padded_row(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation: Activation,
                   precision=None) -> jax.Array:
  """The XLA reference on one row (M = 1) padded with zero rows to M = 8, then sliced back.

  At M = 1 XLA's GPU compiler lowers each matmul to matrix-vector reduction fusions; at M = 8 it
  runs its GEMMs, which on the H200's clock were 1.4x (SmolLM2) and 1.9x (gpt2-small) faster,
  pad included (benchmarks/results/decode-profile-rows1-h200-2026-12-01.md). The zero rows get
  zero cotangents, so gradients (PWL parameters' included) equal the unpadded reference's.
  Declines any M other than 1.
  """
  if x.shape[0] != 1:
    raise NotImplementedError(f"pads a single row, got M = {x.shape[0]}")
  padded = jnp.pad(x, ((0, PADDED_ROWS - 1), (0, 0)))
  return reference_ffn(padded, w_up, w_down, w_gate, b_up, b_gate, b_down, activation,
                       precision)[:1]


@dataclasses.dataclass(frozen=True)
class Implementation:
  """A registered implementation: ``module:function`` imported on first use."""

  name: str
  target: str

  def load(self) -> Callable[..., jax.Array]:
    module, function = self.target.split(":")
    return getattr(importlib.import_module(module), function)


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl for impl in (
        Implementation("xla", "flashffn_jax.ops:reference_ffn"),
        Implementation("xla_padded_row", "flashffn_jax.ops:xla_padded_row"),
        Implementation("pallas_tpu", "pallas_kernels.tpu.fused_ffn:pallas_tpu"),
        Implementation("pallas_tpu_interpret", "pallas_kernels.tpu.fused_ffn:pallas_tpu_interpret"),
        Implementation("pallas_mosaic_gpu", "pallas_kernels.gpu.dispatch:ffn_mosaic_gpu"),
    )
}
# Tried in this order when implementation=None; "xla" always last.
PLATFORM_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("pallas_mosaic_gpu", "xla_padded_row", "xla"), "tpu": ("pallas_tpu", "xla")}


def _check_array(name: str, array, shape: tuple, dtype) -> None:
  if not hasattr(array, "shape") or not hasattr(array, "dtype"):
    raise TypeError(f"{name}: expected an array, got {type(array).__name__}")
  if tuple(array.shape) != shape:
    raise ValueError(f"{name}: expected shape {shape}, got {tuple(array.shape)}")
  if array.dtype != dtype:
    raise ValueError(f"{name}: expected dtype {jnp.dtype(dtype).name} (the dtype of x), got "
                     f"{array.dtype.name}; cast the weights first")


def _validate(x, w_up, w_down, w_gate, b_up, b_gate, b_down) -> None:
  for name, array in (("x", x), ("w_up", w_up), ("w_down", w_down)):
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
      raise TypeError(f"{name}: expected an array, got {type(array).__name__}")
  if x.ndim < 1 or x.dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"x: expected an array [..., D] of bfloat16, float16 or float32, got "
                     f"{x.dtype.name}{list(x.shape)}")
  if w_up.ndim != 2 or w_up.shape[0] != x.shape[-1]:
    raise ValueError(f"w_up: expected shape [D, H] with D = x.shape[-1] = {x.shape[-1]}, got "
                     f"{list(w_up.shape)}")
  if w_down.ndim != 2 or w_down.shape[0] != w_up.shape[1]:
    raise ValueError(f"w_down: expected shape [H, D_out] with H = w_up.shape[1] = {w_up.shape[1]}, "
                     f"got {list(w_down.shape)}")
  d_model, hidden = w_up.shape
  _check_array("w_up", w_up, (d_model, hidden), x.dtype)
  _check_array("w_down", w_down, tuple(w_down.shape), x.dtype)
  for name, array, shape in (("w_gate", w_gate, (d_model, hidden)), ("b_up", b_up, (hidden,)),
                             ("b_gate", b_gate, (hidden,)), ("b_down", b_down, (w_down.shape[1],))):
    if array is not None:
      _check_array(name, array, shape, x.dtype)
  if b_gate is not None and w_gate is None:
    raise ValueError("b_gate: given without w_gate (a gate bias needs a GLU FFN)")


def _candidates(implementation: str | None) -> tuple[str, ...]:
  if implementation is None:
    return PLATFORM_ORDER.get(jax.default_backend(), ("xla",))
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected None or one of {sorted(IMPLEMENTATIONS)}, got "
                     f"{implementation!r}")
  return (implementation,) if implementation == "xla" else (implementation, "xla")


def ffn(x: jax.Array, w_up: jax.Array, w_down: jax.Array, *, w_gate: jax.Array | None = None,
        b_up: jax.Array | None = None, b_gate: jax.Array | None = None,
        b_down: jax.Array | None = None, activation: ActivationLike | Activation = "gelu",
        implementation: str | None = None, precision=None) -> jax.Array:
  """Feed-forward block ``act(x @ w_up + b_up) @ w_down + b_down``, or GLU when ``w_gate`` is given.

  Args:
    x: [..., D] bfloat16 / float16 / float32.
    w_up: [D, H]; w_down: [H, D_out]; w_gate: [D, H] (GLU); biases [H] / [H] / [D_out]. All
      arrays share x's dtype.
    activation: an exact name (gelu, gelu_tanh, silu, relu, tanh, sigmoid, identity), a
      ``PiecewiseLinear`` or a jnp callable (callables run on the XLA path only); or one of these
      through ``prepare_activation`` (its arrays computed ahead, e.g. outside a loop).
    implementation: None (the fastest correct one for the platform and shape), "xla", or a
      registered kernel name (see ``IMPLEMENTATIONS``).
    precision: passed to the XLA matmuls.

  Returns:
    [..., D_out] in x's dtype. Differentiable w.r.t. x, all weights and biases, and the
    PiecewiseLinear's parameters.
  """
  return _dispatch(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation, implementation,
                   precision)[1]


def _dispatch(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation, implementation,
              precision) -> tuple[str, jax.Array]:
  """(name of the implementation that ran, output) — see ``ffn``."""
  _validate(x, w_up, w_down, w_gate, b_up, b_gate, b_down)
  kernel_activation = to_kernel_activation(activation)
  x2d = x.reshape(-1, x.shape[-1])
  args = (x2d, w_up, w_down, w_gate, b_up, b_gate, b_down, kernel_activation)
  for name in _candidates(implementation):
    try:
      out = IMPLEMENTATIONS[name].load()(*args, precision=precision)
    except NotImplementedError as reason:
      if implementation is not None:
        warnings.warn(f"flashffn: implementation {name!r} cannot run this FFN ({reason}); "
                      "falling back to 'xla'", stacklevel=3)
      else:
        logger.info("flashffn: %s skipped: %s", name, reason)
      continue
    return name, out.reshape(*x.shape[:-1], w_down.shape[1])
  raise AssertionError("unreachable: the xla implementation accepts every problem")


def chosen_implementation(x, w_up, w_down, *, w_gate=None, b_up=None, b_gate=None, b_down=None,
                          activation: ActivationLike = "gelu", implementation: str | None = None) -> str:
  """Which implementation ``ffn`` runs for these arguments on this platform (traced abstractly:
  arrays or ``jax.ShapeDtypeStruct``s; nothing is computed)."""
  chosen = []

  def run(*arrays):
    name, out = _dispatch(*arrays, activation, implementation, None)
    chosen.append(name)
    return out

  jax.eval_shape(run, x, w_up, w_down, w_gate, b_up, b_gate, b_down)
  return chosen[0]
