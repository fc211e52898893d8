"""Accounting for folded FFNs: what a token reads and computes, and how good the predictor is.

Per token (decode, one token at a time), in weight elements (a b-bit predictor entry counts
b/16 of a bf16 element), for D inputs, D_out outputs, H neurons of which F fold and K stay,
n = 2 matrices per neuron for an MLP and 3 for a GLU, and a measured flag rate ρ:

    exact FFN   n D H                                   FLOPs 2 n D H
    folded      D D_out + n D K + (b/16) D F + ρ n D F  FLOPs 2 (D D_out + n D K + D F + ρ n D F)

("parameters read per token"). The folded model STORES more than the exact one: the fold,
the predictor and every original row (corrections may need any of them).

A decode step of M sequences reads each weight once, so its corrections read the UNION of the M
tokens' flags: with ρ_M = E|∪ flags| / F in place of ρ, exact / folded reads is a bytes-only
ceiling on the step's speed-up (``union_mean`` in the predictor quality).

Predictor quality on held-out inputs, against the oracle (z outside the hot range):
recall = caught outliers / outliers, precision = true outliers among flags. The cost of the
misses is measured on the FFN output y: ‖Σ_{missed} r_i W_down[i]‖ / ‖y‖, next to the error
the fold leaves inside the hot ranges, ‖Σ_{unflagged, in range} r_i W_down[i]‖ / ‖y‖.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flashffn_jax.fold.layer import FoldedFFN, union_counts
from flashffn_jax.fold.ops import FoldedWeights, _residual, outlier_flags


def layer_cost(layer: FoldedFFN, flag_rate: float) -> dict:
  """Per-token weight reads and FLOPs of the exact and the folded FFN (module docstring)."""
  w = layer.weights()
  d_in, d_out = w.w_fold.shape
  folded = w.num_folded
  kept = 0 if w.kept_w_down is None else w.kept_w_down.shape[0]
  n = 3 if w.glu else 2
  bits = dict(layer.stats)["predictor_bits"]
  hidden = folded + kept
  exact = n * d_in * hidden
  reads = {"fold": d_in * d_out, "kept": n * d_in * kept, "predictor": bits / 16 * d_in * folded,
           "corrections": flag_rate * n * d_in * folded}
  flops = 2 * (d_in * d_out + n * d_in * kept + d_in * folded + flag_rate * n * d_in * folded)
  stored = exact + d_in * d_out + bits / 16 * d_in * folded
  return {"exact_params": exact, "params_read": sum(reads.values()), "reads": reads,
          "params_removed": 1.0 - sum(reads.values()) / exact, "exact_flops": 2 * exact,
          "flops": flops, "flops_removed": 1.0 - flops / (2 * exact), "stored_params": stored,
          "folded": folded, "kept": kept, "flag_rate": flag_rate}


@jax.jit
def _decomposition(x, weights: FoldedWeights):
  r, z = _residual(x, weights.w_in, weights.b_in, weights.w_up, weights.b_up, weights.slope,
                   weights.intercept, weights.activation)
  predicted, _ = outlier_flags(x, weights, "predicted")
  oracle = (z < weights.hot_lower) | (z > weights.hot_upper)
  contribution = lambda mask: jnp.where(mask, r, 0.0) @ weights.w_down.astype(jnp.float32)
  per_neuron = jnp.abs(r) * weights.priority  # ‖r_i W_down[i]‖ of each (token, neuron)
  return predicted, oracle, contribution(oracle & ~predicted), contribution(~oracle & ~predicted), per_neuron


def predictor_quality(layer: FoldedFFN, inputs: np.ndarray, exact_output: np.ndarray) -> dict:
  """Recall, precision, rates and the cost of missed outliers on held-out ``inputs`` [N, D]
  with the exact FFN's outputs [N, D_out] (module docstring)."""
  weights = layer.weights()
  x = jnp.asarray(inputs, weights.w_fold.dtype)
  predicted, oracle, missed, in_range, per_neuron = (np.asarray(a) for a in _decomposition(x, weights))
  y_norm = np.linalg.norm(np.asarray(exact_output, np.float64))
  caught, misses = oracle & predicted, oracle & ~predicted
  mean_of = lambda mask: float(per_neuron[mask].mean()) if mask.any() else 0.0
  return {
      "recall": float(caught.sum() / max(oracle.sum(), 1)),
      "precision": float(caught.sum() / max(predicted.sum(), 1)),
      "flag_rate": float(predicted.mean()), "outlier_rate": float(oracle.mean()),
      "missed_rate": float(misses.mean()),
      "missed_error": float(np.linalg.norm(missed) / y_norm),
      "in_range_error": float(np.linalg.norm(in_range) / y_norm),
      "mean_missed_contribution": mean_of(misses), "mean_caught_contribution": mean_of(caught),
      "union_mean": tuple((m, float(counts.mean() / max(predicted.shape[1], 1)))
                          for m, counts in union_counts(predicted).items()),
  }
