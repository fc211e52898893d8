"""Text generation for a causal LM with a KV cache: a jitted prefill, then jitted calls of a few
chained decode steps each (``decode_steps``: a ``lax.scan`` over one-token steps).

The prompt is right-padded to a multiple of ``PAD_TO`` so prompts of similar length share one
compiled prefill; padded positions are written into the cache but lie beyond the real length,
so the causal mask hides them until real tokens overwrite them. The cache holds the prompt plus
every step's token (the dropped surplus of the last call included), rounded up to ``PAD_TO``, so
the decode call compiles once per cache size and steps per call. New token n is sampled with
the key fold_in(key(seed), n), so the text does not depend on how many steps a call runs.

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

from flashffn_jax.checks import check_positive_int
from flashffn_jax.nnx import activations_prepared

PAD_TO = 64
# Decode steps chained on the device per host call (the host's work per call is paid once per 8
# tokens). CPU, SmolLM2-135M, batch 1, greedy: 33.6-35.2 ms a token at 1, 27.6-30.7 at 8. H200,
# SmolLM2-shaped, batch 16 (bench_generate_step.py): 1034 us a step at 1, 838 at 8, where the
# wall clock meets the GPU's busy time (824 us).
TOKENS_PER_CALL = 8


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
class Sampling:
  """How ``sample_logits`` picks each token (hashable: a static argument of the jitted calls)."""

  temperature: float
  top_k: int | None
  top_p: float | None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["leaves"],
                   meta_fields=["graphdef", "treedef"])
@dataclasses.dataclass(frozen=True)
class FlatModel:
  """A model as ``nnx.split`` gives it, its state flattened to a list of arrays once.

  A jitted function flattens its arguments on every call. An nnx State is a Python-registered
  pytree (~0.5 ms a call for a 30-layer Llama on a CPU host); this dataclass pytree, whose
  graph and tree structure are static, is flattened in C++.
  """

  graphdef: nnx.GraphDef
  treedef: jax.tree_util.PyTreeDef
  leaves: list

  @classmethod
  def of(cls, model: nnx.Module) -> FlatModel:
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return cls(graphdef, treedef, leaves)

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, self.leaves))


@functools.partial(jax.jit, static_argnames=("sampling", "cache_size"))
def _prefill(flat: FlatModel, tokens, length, key, sampling: Sampling, cache_size: int):
  """Run the padded prompt [1, P] into a fresh cache; sample new token 0 from the logits at
  length - 1."""
  model = flat.model()
  logits, cache = model.decode(tokens, model.init_cache(tokens.shape[0], cache_size))
  cache = dataclasses.replace(cache, length=length)
  last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
  return _sample(last, key, 0, sampling), cache


@functools.partial(jax.jit, static_argnames=("sampling", "count"), donate_argnames="cache")
def decode_steps(flat: FlatModel, token, cache, key, first, sampling: Sampling, count: int):
  """``count`` chained decode steps in one call: step j feeds the last tokens [B] through the
  cache and samples new token ``first + j`` with key fold_in(key, first + j). Returns the tokens
  [count, B] and the cache (the cache passed in is donated: updated in place, not copied). The
  fused FFNs' activations are prepared once, before the steps (``activations_prepared``)."""
  model = flat.model()

  def step(carry, index):
    token, cache = carry
    logits, cache = model.decode(token[:, None], cache)
    token = _sample(logits[:, -1], key, index, sampling)
    return (token, cache), token

  with activations_prepared(model):
    (_, cache), tokens = jax.lax.scan(step, (token, cache), first + jnp.arange(count))
  return tokens, cache


def _sample(logits, key, index, sampling: Sampling) -> jax.Array:
  return sample_logits(logits, jax.random.fold_in(key, index), sampling.temperature,
                       sampling.top_k, sampling.top_p)


def generate(model: nnx.Module, tokenizer, prompt: str, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, *, stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None,
             tokens_per_call: int = TOKENS_PER_CALL) -> str:
  """The continuation of ``prompt`` (without the prompt), at most ``max_new_tokens`` tokens.

  ``model`` has ``init_cache``/``decode`` (``models.llama.Llama``); ``tokenizer`` is a
  ``tokenizers.Tokenizer``. ``on_text`` receives the new text as it is produced (streaming).
  ``tokens_per_call`` decode steps run chained on the device per host call (a ``lax.scan``), so
  the host's per-call work is paid once per that many tokens; the text is the same for any value
  (new token n is sampled with fold_in(key(seed), n)), but up to ``tokens_per_call - 1`` steps past
  the last kept token (the budget's end, or EOS) are computed and dropped, and ``on_text`` gets
  the text a call at a time.
  """
  _check_generate_args(prompt, max_new_tokens, temperature, top_k, top_p, tokens_per_call)
  prompt_ids = tokenizer.encode(prompt).ids
  if not prompt_ids:
    raise ValueError("prompt: expected text that tokenizes to at least one token")
  if len(prompt_ids) + max_new_tokens > model.config.max_positions:
    raise ValueError(f"max_new_tokens: prompt ({len(prompt_ids)} tokens) + {max_new_tokens} "
                     f"exceeds the model's context of {model.config.max_positions}")
  per_call = max(1, min(tokens_per_call, max_new_tokens - 1))
  calls = -(-(max_new_tokens - 1) // per_call)
  if len(prompt_ids) + calls * per_call > model.config.max_positions:
    per_call, calls = 1, max_new_tokens - 1  # no room for the dropped steps: one at a time
  # prefill writes positions 0..P-1, each decode step the next one
  cache_size = min(_round_up(len(prompt_ids) + calls * per_call, PAD_TO),
                   model.config.max_positions)
  sampling = Sampling(float(temperature), top_k, top_p)
  flat = FlatModel.of(model)
  padded = np.zeros((1, _round_up(len(prompt_ids), PAD_TO)), np.int32)
  padded[0, :len(prompt_ids)] = prompt_ids
  key = jax.random.key(seed)
  token, cache = _prefill(flat, jnp.asarray(padded), len(prompt_ids), key, sampling, cache_size)
  new_ids, emitted = [], ""
  eos = model.config.eos_token_id if stop_at_eos else None
  sampled = [int(token[0])]
  while True:
    at_eos = eos in sampled
    kept = sampled[:sampled.index(eos)] if at_eos else sampled
    new_ids += kept[:max_new_tokens - len(new_ids)]
    text = tokenizer.decode(new_ids)
    if on_text is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
      on_text(text[len(emitted):])
      emitted = text
    if at_eos or len(new_ids) == max_new_tokens:
      break
    tokens, cache = decode_steps(flat, token, cache, key, len(new_ids), sampling, per_call)
    token, sampled = tokens[-1], np.asarray(tokens[:, 0]).tolist()
  text = tokenizer.decode(new_ids)
  if on_text is not None and len(text) > len(emitted):
    on_text(text[len(emitted):])
  return text


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _check_generate_args(prompt, max_new_tokens, temperature, top_k, top_p,
                         tokens_per_call) -> None:
  if not isinstance(prompt, str):
    raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
  check_positive_int("max_new_tokens", max_new_tokens)
  if not temperature >= 0:
    raise ValueError(f"temperature: expected a value >= 0, got {temperature!r}")
  check_positive_int("top_k", top_k, optional=True)
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p: expected None or a value in (0, 1], got {top_p!r}")
  check_positive_int("tokens_per_call", tokens_per_call)
