"""Fill an NNX model with loaded arrays without initialising it first."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx


def materialize(factory: Callable[[], nnx.Module], params: dict, dtype) -> nnx.Module:
  """Build ``factory()`` without initialising it, then set every parameter from ``params``.

  ``params`` is a nested dict mirroring ``nnx.to_pure_dict(nnx.state(model))``; it must name
  every variable with the expected shape (arrays are cast to ``dtype``).
  """
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  expected = {tuple(path): variable for path, variable in nnx.to_flat_state(state)}
  given = dict(_flatten(params))
  if set(expected) != set(given):
    missing = sorted(map(str, set(expected) - set(given)))
    extra = sorted(map(str, set(given) - set(expected)))
    raise ValueError(f"weights: do not fit the model (missing {missing[:5]}, unexpected {extra[:5]})")
  for path, array in given.items():
    if tuple(expected[path].shape) != tuple(np.shape(array)):
      raise ValueError(f"weights: {'.'.join(map(str, path))} has shape {np.shape(array)}, the "
                       f"model expects {tuple(expected[path].shape)}")
  nnx.replace_by_pure_dict(state, _unflatten({p: jnp.asarray(a, dtype) for p, a in given.items()}))
  return nnx.merge(graphdef, state)


def _flatten(tree: dict, prefix: tuple = ()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree
