"""A Llama-architecture causal LM in Flax NNX, with a functional KV cache.

Per block (pre-norm):

    h = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rms_norm(x)
    y = h + mlp(rms_norm(h)),   mlp(z) = down_proj(silu(gate_proj(z)) * up_proj(z))

RMSNorm: x / sqrt(mean(x²) + eps) * w, in float32. Grouped-query attention (num_kv_heads
divides num_heads), causal softmax in float32. RoPE in the Hugging Face "rotate half" layout:
for head dim d and i < d/2, the pair (x_i, x_{i+d/2}) at position p is rotated by angle
p · θ^(-2i/d). The MLP is the plain ``nnx.Linear`` pattern, so ``linearize`` finds it.

Calling the model on tokens [B, T] gives float32 logits [B, T, V]. ``decode`` runs T new tokens
against a ``KVCache`` (prefill when T > 1, one step when T = 1) and returns the updated cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_positions: int = 8192
  tie_embeddings: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def __post_init__(self):
    if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads: expected hidden_size ({self.hidden_size}) divisible by "
                       f"num_heads ({self.num_heads}) and num_heads by num_kv_heads "
                       f"({self.num_kv_heads})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values per layer [B, num_kv_heads, S, head_dim] and the number of filled positions.

  Heads lead the positions, as attention's two batched matmuls read them (batch dims b, k), so a
  decode step writes one position in place instead of transposing the whole cache in and out."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  length: jax.Array  # int32 scalar

  @property
  def max_length(self) -> int:
    """Positions the cache holds (S)."""
    return self.keys[0].shape[2]


class RMSNorm(nnx.Module):
  def __init__(self, size: int, eps: float, *, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((size,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE of x [B, T, heads, d] at integer positions [T] (see the module docstring)."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, d/2]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.head_dim
    self.q_proj = _linear(d, config.num_heads * hd, dtype, rngs)
    self.k_proj = _linear(d, config.num_kv_heads * hd, dtype, rngs)
    self.v_proj = _linear(d, config.num_kv_heads * hd, dtype, rngs)
    self.o_proj = _linear(config.num_heads * hd, d, dtype, rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
    self.rope_theta = config.rope_theta

  def __call__(self, x, positions, cache_kv=None):
    """x [B, T, D] at positions [T]; cache_kv = (keys, values) [B, Hkv, S, hd] to write into."""
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd], the cache's layout
    if cache_kv is None:
      key_positions = positions
    else:
      start = (0, 0, positions[0], 0)
      k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start)
      key_positions = jnp.arange(k.shape[2])
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, length, self.num_kv_heads, groups, self.head_dim).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k.astype(q.dtype),  # [T, hd] x [hd, S]
                        preferred_element_type=jnp.float32) / jnp.sqrt(self.head_dim)
    causal = key_positions[None, :] <= positions[:, None]  # [T, S]; unwritten slots lie ahead
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)  # [T, S] x [S, hd] per (b, k, g)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, length, -1)
    return self.o_proj(out.astype(x.dtype)), (k, v)


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
    d, h = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(d, h, dtype, rngs)
    self.up_proj = _linear(d, h, dtype, rngs)
    self.down_proj = _linear(h, d, dtype, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=dtype)
    self.attn = Attention(config, dtype, rngs)
    self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=dtype)
    self.mlp = MLP(config, dtype, rngs)

  def __call__(self, x, positions, cache_kv=None):
    attended, cache_kv = self.attn(self.input_norm(x), positions, cache_kv)
    x = x + attended
    return x + self.mlp(self.post_attention_norm(x)), cache_kv


class Llama(nnx.Module):
  """Llama causal LM: ``model(tokens [B, T] int32) -> logits [B, T, V] float32``."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                           rngs=rngs)
    self.layers = nnx.List([Block(config, dtype, rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=dtype)
    self.lm_head = nnx.data(None if config.tie_embeddings else
                            _linear(config.hidden_size, config.vocab_size, dtype, rngs))

  def _check_tokens(self, tokens) -> None:
    if not hasattr(tokens, "ndim") or tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected an integer array [batch, length], got "
                       f"{getattr(tokens, 'dtype', type(tokens).__name__)}"
                       f"{list(getattr(tokens, 'shape', []))}")

  def _forward(self, tokens, positions, cache: KVCache | None):
    x = self.embed(tokens)
    new_keys, new_values = [], []
    for i, block in enumerate(self.layers):
      x, (k, v) = block(x, positions, None if cache is None else (cache.keys[i], cache.values[i]))
      new_keys.append(k)
      new_values.append(v)
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = jnp.einsum("btd,vd->btv", x, self.embed.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32), (tuple(new_keys), tuple(new_values))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, V] float32 for tokens [B, T] at positions 0..T-1."""
    self._check_tokens(tokens)
    return self._forward(tokens, jnp.arange(tokens.shape[1]), None)[0]

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache for up to ``max_length`` positions."""
    if max_length > self.config.max_positions:
      raise ValueError(f"max_length: expected at most {self.config.max_positions} (the model's "
                       f"context), got {max_length}")
    shape = (batch_size, self.config.num_kv_heads, max_length, self.config.head_dim)
    def zeros():  # one buffer per layer and per keys/values: a donated step updates each in place
      return tuple(jnp.zeros(shape, dtype or self.dtype) for _ in range(self.config.num_layers))
    return KVCache(zeros(), zeros(), jnp.zeros((), jnp.int32))

  def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] for ``tokens`` at positions cache.length.. and the cache advanced by T."""
    self._check_tokens(tokens)
    positions = cache.length + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, (keys, values) = self._forward(tokens, positions, cache)
    return logits, KVCache(keys, values, cache.length + tokens.shape[1])
