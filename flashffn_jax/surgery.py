"""Model surgery: ``linearize`` swaps the MLPs of an NNX model for ``FusedFFN`` layers.

An MLP is recognised by what it computes, not by its names. A module whose direct children
include two or three ``nnx.Linear`` layers with chaining shapes is a candidate:

    two:   down(act(up(x)))                      up [D, H], down [H, D_out]
    three: down(act(gate(x)) * up(x))            gate, up [D, H], down [H, D_out]

Every assignment of the children to these roles and every exact activation in
``FITTABLE_ACTIVATIONS`` is checked against the module's own output on a random probe (scaled
so the pre-activations reach the curved part of the activation); the closest match within the
dtype's tolerance wins. A candidate with any other structure (dropout, norms, a residual, an
activation we cannot fit) matches nothing and is left unchanged and reported — never converted
to something that computes a different function. Existing ``FusedFFN`` layers are matches too
(their activation is swapped).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashffn_jax.nnx import WEIGHT_NAMES, FusedFFN, check_activation
from flashffn_jax.ops import ffn
from flashffn_jax.pwl import PiecewiseLinear, from_spec

logger = logging.getLogger("flashffn_jax")

FITTABLE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "tanh", "sigmoid")
PROBE_TOKENS = 8
PROBE_PREACTIVATION_STD = 2.0
# Max relative error between a module's output and its fused form to call it a match.
MATCH_TOLERANCE = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 3e-2,
                   jnp.dtype(jnp.float16): 5e-3}

ActivationChoice = str | PiecewiseLinear | Callable[[jax.Array], jax.Array]


class LinearizeWarning(UserWarning):
  """Some MLP-like modules were left unchanged; the message lists them with the reason."""


@dataclasses.dataclass(frozen=True)
class MLPMatch:
  """A module that computes an FFN: its path, exact activation and weight variables."""

  path: tuple
  base_activation: str | Callable
  weights: dict  # WEIGHT_NAMES -> nnx.Variable or None
  dtype: jnp.dtype | None = None
  precision: object = None

  @property
  def name(self) -> str:
    return path_name(self.path)


@dataclasses.dataclass(frozen=True)
class Rejected:
  """A module that looks like an MLP but does not compute one of the FFN forms."""

  path: tuple
  reason: str


def path_name(path: tuple) -> str:
  return ".".join(str(key) for key in path) or "<root>"


def _linear_weights(linear: nnx.Linear, role: str) -> dict:
  bias_name = "b_" + role.removeprefix("w_")
  return {role: linear.kernel, bias_name: linear.bias}


def _role_assignments(linears: dict[str, nnx.Linear]) -> list[dict[str, str]]:
  """Each way to read the children as (gate,) up, down with chaining shapes."""
  shape = {name: tuple(layer.kernel.shape) for name, layer in linears.items()}
  roles = ("w_up", "w_down") if len(linears) == 2 else ("w_gate", "w_up", "w_down")
  assignments = []
  for names in itertools.permutations(linears):
    assignment = dict(zip(roles, names))
    up, down = shape[assignment["w_up"]], shape[assignment["w_down"]]
    gate_ok = "w_gate" not in assignment or shape[assignment["w_gate"]] == up
    if up[1] == down[0] and gate_ok:
      assignments.append(assignment)
  return assignments


def _probe(d_model: int, dtype, up_kernel: jax.Array) -> jax.Array:
  """Random input [PROBE_TOKENS, D] scaled so that x @ up has std PROBE_PREACTIVATION_STD."""
  x = np.random.default_rng(0).normal(size=(PROBE_TOKENS, d_model))
  scale = PROBE_PREACTIVATION_STD / max(float(np.std(x @ np.asarray(up_kernel, np.float64))), 1e-6)
  return jnp.asarray(x * scale, dtype)


@functools.partial(jax.jit, static_argnums=0)
def _call_split_module(graphdef, state, x: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(x)


def _call_module(module: nnx.Module, x: jax.Array) -> jax.Array:
  """The candidate's own output, compiled (identical layers share one compilation); any state
  it would update (dropout rng counters, ...) is left as it was."""
  return _call_split_module(*nnx.split(module), x)


@functools.partial(jax.jit, static_argnames="precision")
def _candidate_outputs(x: jax.Array, weights: dict, precision) -> jax.Array:
  """[len(FITTABLE_ACTIVATIONS), ...] outputs of the FFN with each activation (one compile)."""
  weights = {k: None if v is None else v.astype(x.dtype) for k, v in weights.items()}
  return jnp.stack([ffn(x, **weights, activation=name, precision=precision)
                    for name in FITTABLE_ACTIVATIONS])


def _relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  if not np.all(np.isfinite(actual)):
    return float("inf")
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def _match_module(path: tuple, module: nnx.Module) -> MLPMatch | Rejected | None:
  """MLPMatch, Rejected (looks like an MLP, is not one) or None (not MLP-shaped)."""
  linears = {name: child for name, child in nnx.iter_children(module) if isinstance(child, nnx.Linear)}
  if len(linears) not in (2, 3):
    return None
  assignments = _role_assignments(linears)
  if not assignments:
    return None
  best, failure = (float("inf"), None, None, None), None
  expected_by_dim = {}
  for assignment in assignments:
    up = linears[assignment["w_up"]]
    dtype = up.dtype or up.kernel.dtype
    d_model = up.kernel.shape[0]
    if d_model not in expected_by_dim:  # the module's own output on a probe of this width
      x = _probe(d_model, dtype, up.kernel[...])
      try:
        expected_by_dim[d_model] = (x, _call_module(module, x))
      except Exception as error:  # the module's own call: any failure means "not this width"
        expected_by_dim[d_model] = (x, None)
        failure = f"calling it on a [{PROBE_TOKENS}, {d_model}] array raised {type(error).__name__}: {error}"
    x, expected = expected_by_dim[d_model]
    if expected is None or jnp.shape(expected) != x.shape[:1] + (linears[assignment["w_down"]].kernel.shape[1],):
      continue
    weights = dict.fromkeys(WEIGHT_NAMES)
    for role, name in assignment.items():
      weights.update(_linear_weights(linears[name], role))
    outputs = _candidate_outputs(x, {k: None if v is None else v[...] for k, v in weights.items()},
                                 up.precision)
    for activation, output in zip(FITTABLE_ACTIVATIONS, outputs):
      error = _relative_error(output, expected)
      if error < best[0]:
        best = (error, activation, weights, up)
  error, activation, weights, up = best
  if activation is None:
    return Rejected(path, failure or "its output shape does not fit any reading of its Linear layers")
  tolerance = MATCH_TOLERANCE.get(jnp.dtype(up.dtype or up.kernel.dtype), 3e-2)
  if error > tolerance:
    forms = " or ".join(sorted({"act(x @ gate) * (x @ up) @ down" if "w_gate" in a else
                                "act(x @ up) @ down" for a in assignments}))
    return Rejected(path, f"its output is not {forms} for any activation in "
                          f"{FITTABLE_ACTIVATIONS} (best relative error {error:.1e} > {tolerance:g})")
  return MLPMatch(path, activation, weights, up.dtype, up.precision)


def find_mlps(model: nnx.Module) -> tuple[list[MLPMatch], list[Rejected]]:
  """The model's MLPs (existing FusedFFN layers included) and the MLP-like modules rejected."""
  matches, rejected = [], []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, FusedFFN):
      weights = {name: getattr(module, name) for name in WEIGHT_NAMES}
      base = module.approximates or module.exact_activation
      matches.append(MLPMatch(tuple(path), base, weights, module.dtype, module.precision))
      continue
    found = _match_module(tuple(path), module)
    if isinstance(found, MLPMatch):
      matches.append(found)
    elif isinstance(found, Rejected):
      rejected.append(found)
  key = lambda item: [str(k) if not isinstance(k, int) else f"{k:09d}" for k in item.path]
  return sorted(matches, key=key), sorted(rejected, key=key)


def _layer_index(path: tuple) -> int | None:
  return next((key for key in path if isinstance(key, int)), None)


def _select(matches: list[MLPMatch], layers: Iterable[int | str] | None) -> list[MLPMatch]:
  if layers is None:
    return matches
  if isinstance(layers, (int, str)):
    layers = [layers]
  wanted = list(layers)
  indices = sorted({i for m in matches if (i := _layer_index(m.path)) is not None})
  names = [m.name for m in matches]
  for item in wanted:
    if isinstance(item, bool) or not isinstance(item, (int, str)):
      raise ValueError(f"layers: expected layer indices or MLP paths, got {item!r}")
    if (isinstance(item, int) and item not in indices) or (isinstance(item, str) and item not in names):
      raise ValueError(f"layers: no MLP at {item!r}; MLPs are at layer indices {indices} / paths {names}")
  return [m for m in matches if _layer_index(m.path) in wanted or m.name in wanted]


def _resolve_activation(activation: ActivationChoice, base: str | Callable, fits: dict):
  """The activation one layer gets: a spec ("pwl16") is fitted to the layer's own activation."""
  if isinstance(activation, str) and activation == "exact":
    return base
  if isinstance(activation, str) and activation.startswith("pwl"):
    if not isinstance(base, str):
      raise ValueError(f"activation: cannot fit {activation!r} to a custom activation callable; "
                       "pass a PiecewiseLinear")
    if (activation, base) not in fits:
      fits[activation, base] = from_spec(activation, base)
    return fits[activation, base]
  return activation


def _set_child(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = root
  for key in path[:-1]:
    parent = parent[key] if isinstance(parent, (nnx.List, nnx.Dict, list, dict)) else getattr(parent, key)
  if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def linearize(model: nnx.Module, activation: ActivationChoice = "pwl16",
              layers: Iterable[int | str] | None = None, learnable: bool = False, *,
              implementation: str | None = None) -> nnx.Module:
  """A copy of ``model`` whose MLPs (or those in ``layers``) are ``FusedFFN`` layers.

  Args:
    model: an NNX module tree (the model is not modified).
    activation: a PWL spec ("pwl16", "pwl8-uniform", ...) fitted to each MLP's own activation;
      "exact" (fused, same activation); a ``PiecewiseLinear``; an exact name or a callable; or a
      calibrated ``flashffn_jax.fold.FoldSpec``: the MLPs become ``FoldedFFN`` layers instead.
    layers: None (every MLP), layer indices (the first integer in an MLP's path, e.g. the block
      number) and/or dotted MLP paths ("layers.3.mlp").
    learnable: the PWL becomes ``nnx.Param``s of each layer (knots stay sorted, see nnx.py).
    implementation: passed to every layer's ``ffn`` call.

  Returns:
    The new model. Its weights are the original arrays (no copies). Modules that look like an
    MLP but do not compute one are left unchanged and listed in a ``LinearizeWarning``.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  from flashffn_jax import fold  # imports this module: load it on first use

  if fold.is_fold_spec(activation):
    return fold.fold_model(model, activation, layers, learnable, implementation=implementation)
  new_model = nnx.clone(model)
  matches, rejected = find_mlps(new_model)
  if not matches:
    details = "; ".join(f"{path_name(r.path)}: {r.reason}" for r in rejected)
    raise ValueError("model: found no MLP to linearize (a module whose nnx.Linear children compute "
                     "act(x @ up) @ down or act(x @ gate) * (x @ up) @ down)"
                     + (f"; rejected: {details}" if details else ""))
  if rejected:
    warnings.warn("linearize: left unchanged (not a recognisable MLP): " + "; ".join(
        f"{path_name(r.path)} ({r.reason})" for r in rejected), LinearizeWarning, stacklevel=2)
  fits = {}
  for match in _select(matches, layers):
    chosen = _resolve_activation(activation, match.base_activation, fits)
    if learnable and not isinstance(chosen, PiecewiseLinear):
      raise ValueError(f"learnable: needs a piecewise-linear activation, got {activation!r}")
    check_activation(chosen, learnable)
    layer = FusedFFN.from_weights(
        **match.weights, activation=chosen, learnable_activation=learnable, dtype=match.dtype,
        implementation=implementation, precision=match.precision,
        approximates=match.base_activation if isinstance(match.base_activation, str) else None)
    _set_child(new_model, match.path, layer)
    logger.info("linearize: %s (%s) -> FusedFFN(%s)", match.name, match.base_activation,
                activation if isinstance(activation, str) else type(activation).__name__)
  return new_model
