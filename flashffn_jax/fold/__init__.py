"""Partially-linear fold of FFNs for inference (after Hu et al. 2025, "TARDIS", arXiv 2501.10054).

MLP, y = act(x W_up + b) W_down + b_down. On neuron i's hot range [lo_i, hi_i] (where most of
its calibration inputs fall) act(z) ≈ a_i z + c_i, so with the residual r_i(z) = act(z) − a_i z − c_i

    y = x · (W_up diag(a) W_down) + ((b ⊙ a + c) W_down + b_down) + Σ_i r_i(z_i) W_down[i]
      ≈ x · W_fold + b_fold + Σ_{i ∈ S} r_i(z_i) W_down[i]

One D×D_out matrix replaces the two D×H matrices; S is the set of neurons whose z_i leaves its
hot range (the outliers), corrected exactly with z_S = x W_up[:, S] + b_S. Inside the hot range
the residual r_i is what is lost (the least-squares fit keeps it small). By default W_fold and
b_fold are then refitted jointly on the calibration tokens: the least-squares [W_fold; b_fold]
for what the fold must stand for, Σ_F t_i W_down[i] with t_i the line where the predictor flags
neuron i (the correction adds the rest) and act(z_i) elsewhere (``layer._refit_fold``; on
all-MiniLM-L6-v2 it raised the held-out cosine of fold10-int4 from 0.973 to 0.981).

GLU, y = (act(x W_gate) ⊙ (x W_up)) W_down. A line a z + c in the gate leaves a (x W_gate)(x W_up)
term, quadratic in x: it does not fold. Only a CONSTANT gate segment folds: on a hot range where
act(g_i) ≈ c_i,

    y ≈ x · (W_up diag(c) W_down) + Σ_{i ∈ S} (act(g_i) − c_i) u_i W_down[i] + kept FFN

(c ≈ 0 on SiLU's left tail: the neuron is skipped; c ≈ −0.28 around SiLU's minimum). Neurons
whose gate does not sit in a flat region are kept exact (a smaller GLU with H − F neurons). In
general both kinds keep some neurons exact: calibration chooses per neuron (``fold.lines``).

Pieces:
  lines      calibration math: per-neuron hot ranges and least-squares lines, and the plan
             (fold at which coverage, or keep) meeting a target exact fraction at least error.
  predictor  the b-bit (int4/int2) copy of W_up / W_gate that flags outliers, with margins.
  ops        ``folded_ffn`` (dense path; decode "gather" path reading only flagged rows).
  layer      ``FoldedFFN`` (nnx.Module; weights are nnx.Params, so fine-tuning trains them).
  model      ``FoldSpec``, calibration capture, ``fold_model`` (what ``linearize`` runs for a
             fold spec), Shakespeare calibration for the bundled models.
  report     parameter / FLOP / traffic accounting and predictor recall / precision.

Usage:

    spec = fold.calibrated("fold20", "minilm", tokenizer)    # 20% of neurons stay exact per token
    folded = flashffn_jax.linearize(model, spec)             # or fold.fold_model(model, spec)
"""

from flashffn_jax.fold.layer import FoldConstant, FoldedFFN
from flashffn_jax.fold.lines import COVERAGES, LayerPlan, allocate, candidate_lines
from flashffn_jax.fold.model import (CalibrationBatch, FoldSpec, calibrated, capture_inputs,
                                     fold_model, folded_layers, is_fold_spec, parse_spec,
                                     set_outliers, shakespeare_calibration)
from flashffn_jax.fold.ops import DECODE_MAX_TOKENS, OUTLIER_MODES, FoldedWeights, folded_ffn

__all__ = ["COVERAGES", "DECODE_MAX_TOKENS", "OUTLIER_MODES", "CalibrationBatch", "FoldConstant",
           "FoldSpec", "FoldedFFN", "FoldedWeights", "LayerPlan", "allocate", "calibrated",
           "candidate_lines", "capture_inputs", "fold_model", "folded_ffn", "folded_layers",
           "is_fold_spec", "parse_spec", "set_outliers", "shakespeare_calibration"]
