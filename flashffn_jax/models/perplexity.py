"""Perplexity of a causal LM on a token stream.

The stream t_0..t_{n-1} is cut into windows of T+1 tokens with stride T (``data.windows``),
so each token after the first is predicted exactly once, from at most T previous tokens of its
window:

    nll = -1/(n-1) Σ_{i≥1} log p(t_i | window context),   ppl = exp(nll)

The tail window is padded and its padding masked; batches are padded with masked rows, so one
compiled function serves the whole text.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashffn_jax import data
from flashffn_jax.checks import check_positive_int


@functools.partial(jax.jit, static_argnums=0)
def _batch_nll(graphdef, state, windows, target_mask):
  """(Σ -log p over unmasked targets, number of unmasked targets) for windows [B, T+1]."""
  model = nnx.merge(graphdef, state)
  log_probs = jax.nn.log_softmax(model(windows[:, :-1]), axis=-1)
  picked = jnp.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(target_mask, picked, 0.0)), jnp.sum(target_mask)


def perplexity(model: nnx.Module, tokens: np.ndarray, *, seq_len: int = 512, batch_size: int = 4,
               on_batch: Callable[[int, int], None] | None = None) -> dict:
  """{"nll", "ppl", "tokens", "seconds"} of ``model`` on the 1-D token stream ``tokens``.

  ``on_batch(done, total)`` is called after each batch (progress bars).
  """
  check_positive_int("batch_size", batch_size)
  if seq_len > model.config.max_positions:
    raise ValueError(f"seq_len: expected at most the model's context {model.config.max_positions}, "
                     f"got {seq_len}")
  seq_len = min(seq_len, max(len(tokens) - 1, 1))  # a short text is one exact window
  windows, lengths = data.windows(tokens, seq_len, pad_id=0)
  batch_size = min(batch_size, len(windows))
  masks = np.arange(seq_len)[None, :] < lengths[:, None]
  rows = -(-len(windows) // batch_size) * batch_size
  windows = np.concatenate([windows, np.zeros((rows - len(windows), seq_len + 1), np.int32)])
  masks = np.concatenate([masks, np.zeros((rows - len(masks), seq_len), bool)])
  graphdef, state = nnx.split(model)
  total_nll, total_count, start = 0.0, 0, time.perf_counter()
  for first in range(0, rows, batch_size):
    nll, count = _batch_nll(graphdef, state, jnp.asarray(windows[first:first + batch_size]),
                            jnp.asarray(masks[first:first + batch_size]))
    total_nll += float(nll)
    total_count += int(count)
    if on_batch is not None:
      on_batch(first // batch_size + 1, rows // batch_size)
  mean = total_nll / total_count
  return {"nll": mean, "ppl": float(np.exp(mean)), "tokens": total_count,
          "seconds": time.perf_counter() - start}
