"""Distillation objectives, all computed in float32 from [B, T, V] logits.

    KL(teacher ‖ student) = τ² · mean_tokens Σ_v p_t(v) (log p_t(v) − log p_s(v)),  p = softmax(z/τ)
    CE(student)           = mean_tokens −log p_s(next token)
    FFN match             = mean_layers ‖y_s − y_t‖² / ‖y_t‖²   (per-layer FFN outputs)

The total loss is w_kl · KL + w_ce · CE + w_ffn · FFN match.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """Mean over tokens of KL(softmax(teacher/τ) ‖ softmax(student/τ)), scaled by τ²."""
  log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  per_token = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(per_token)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token negative log-likelihood (nats); exp of it is the perplexity."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1))


def ffn_output_match(student_outputs, teacher_outputs) -> jax.Array:
  """Mean over layers of the relative squared error of each FFN's output."""
  if not student_outputs:
    raise ValueError("ffn_output_match: the model recorded no FFN outputs to match")
  errors = [jnp.sum(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32))) /
            (jnp.sum(jnp.square(t.astype(jnp.float32))) + 1e-12)
            for s, t in zip(student_outputs, teacher_outputs, strict=True)]
  return jnp.mean(jnp.stack(errors))
