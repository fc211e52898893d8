"""Text generation for a causal LM with a KV cache: jitted prefill and jitted one-token steps.

The prompt is right-padded to a multiple of ``PAD_TO`` so prompts of similar length share one
compiled prefill; padded positions are written into the cache but lie beyond the real length,
so the causal mask hides them until real tokens overwrite them. The cache holds the prompt plus
``max_new_tokens``, rounded up to ``PAD_TO``, so the decode step compiles once per cache size.

Sampling of the next token from logits z (float32):
  temperature == 0   argmax z (greedy)
  otherwise          z / temperature, then keep the top_k largest, then the smallest set of
                     tokens whose probability mass reaches top_p, and sample from the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_TO = 64


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
  """Next tokens [B] from logits [B, V] (see the module docstring)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Sampling:
  temperature: float
  top_k: int | None
  top_p: float | None


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _prefill(graphdef, state, tokens, length, key, sampling: _Sampling, cache_size: int):
  """Run the padded prompt [1, P] into a fresh cache; sample from the logits at length - 1."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(tokens, model.init_cache(tokens.shape[0], cache_size))
  cache = dataclasses.replace(cache, length=length)
  last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
  return sample_logits(last, key, sampling.temperature, sampling.top_k, sampling.top_p), cache


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=3)
def _step(graphdef, state, token, cache, sampling: _Sampling, key):
  """One token [B] through the cache; returns the next sampled token and the cache (the cache
  passed in is donated: its buffers are updated in place instead of copied every step)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(token[:, None], cache)
  return sample_logits(logits[:, -1], key, sampling.temperature, sampling.top_k, sampling.top_p), cache


def generate(model: nnx.Module, tokenizer, prompt: str, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, *, stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None) -> str:
  """The continuation of ``prompt`` (without the prompt), at most ``max_new_tokens`` tokens.

  ``model`` has ``init_cache``/``decode`` (``models.llama.Llama``); ``tokenizer`` is a
  ``tokenizers.Tokenizer``. ``on_text`` receives the new text as it is produced (streaming).
  """
  _check_generate_args(prompt, max_new_tokens, temperature, top_k, top_p)
  prompt_ids = tokenizer.encode(prompt).ids
  if not prompt_ids:
    raise ValueError("prompt: expected text that tokenizes to at least one token")
  total = _round_up(len(prompt_ids) + max_new_tokens, PAD_TO)
  if total > model.config.max_positions:
    raise ValueError(f"max_new_tokens: prompt ({len(prompt_ids)} tokens) + {max_new_tokens} "
                     f"exceeds the model's context of {model.config.max_positions}")
  sampling = _Sampling(float(temperature), top_k, top_p)
  graphdef, state = nnx.split(model)
  padded = np.zeros((1, _round_up(len(prompt_ids), PAD_TO)), np.int32)
  padded[0, :len(prompt_ids)] = prompt_ids
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  token, cache = _prefill(graphdef, state, jnp.asarray(padded), len(prompt_ids), keys[0], sampling,
                          total)
  new_ids, emitted = [], ""
  eos = model.config.eos_token_id if stop_at_eos else None
  for i in range(max_new_tokens):
    next_id = int(token[0])
    if next_id == eos:
      break
    new_ids.append(next_id)
    text = tokenizer.decode(new_ids)
    if on_text is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
      on_text(text[len(emitted):])
      emitted = text
    if i + 1 < max_new_tokens:
      token, cache = _step(graphdef, state, token, cache, sampling, keys[i + 1])
  text = tokenizer.decode(new_ids)
  if on_text is not None and len(text) > len(emitted):
    on_text(text[len(emitted):])
  return text


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _check_generate_args(prompt, max_new_tokens, temperature, top_k, top_p) -> None:
  if not isinstance(prompt, str):
    raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
  if not temperature >= 0:
    raise ValueError(f"temperature: expected a value >= 0, got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k: expected None or a positive integer, got {top_k!r}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p: expected None or a value in (0, 1], got {top_p!r}")
