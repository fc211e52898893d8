"""``FoldedFFN``: the folded FFN as an ``nnx.Module``, and building it from a calibration plan.

Variables: every weight (the fold W_fold, b_fold; the folded neurons' exact rows used by the
correction; the kept neurons' FFN) is an ``nnx.Param``, so a fine-tune loop trains it. The
lines (slope, intercept) are ``nnx.Param`` with ``learnable=True``, else ``FoldConstant``.
The hot ranges, the predictor and its margins are always ``FoldConstant``: they describe the
calibration and are not differentiable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashffn_jax import activations
from flashffn_jax.fold import predictor as predictor_lib
from flashffn_jax.fold.lines import LayerPlan
from flashffn_jax.fold.ops import OUTLIER_MODES, FoldedWeights, folded_ffn

WEIGHT_FIELDS = ("w_fold", "b_fold", "w_in", "b_in", "w_up", "b_up", "w_down", "kept_w_in",
                 "kept_b_in", "kept_w_up", "kept_b_up", "kept_w_down")
LINE_FIELDS = ("slope", "intercept")
CONSTANT_FIELDS = ("hot_lower", "hot_upper", "predictor", "predictor_scale", "predictor_error",
                   "priority")
UNION_TOKENS = (1, 2, 4, 8, 16, 32, 64)  # decode batch sizes whose flag-union size is measured
UNION_QUANTILE = 0.99
# The b-bit predictor is stored in a b-bit dtype (XLA packs sub-byte types on GPU and TPU), so
# it occupies and reads the b/16 of a bf16 matrix that ``fold.report`` accounts for.
PREDICTOR_STORAGE = {2: jnp.int2, 4: jnp.int4, 8: jnp.int8}
REFIT_RIDGE = 1e-6  # × the mean diagonal of [x 1]ᵀ[x 1]: pulls the refit towards the lines' fold


class FoldConstant(nnx.Variable):
  """Calibration state of a folded FFN: saved with the model, never trained."""


class FoldedFFN(nnx.Module):
  """A folded FFN (see ``flashffn_jax.fold``); build it with ``FoldedFFN.from_weights`` or
  ``flashffn_jax.fold.fold_model``.

  Attributes: ``outliers`` (how corrections are chosen, ``flashffn_jax.fold.ops``), ``margin``
  (κ of the predictor), ``implementation`` (None, "dense" or "gather"), ``approximates`` (the
  exact activation), ``stats`` (calibration numbers for reports, a tuple of (name, value)).
  """

  FOLD_PARAM_NAMES = ("w_fold", "b_fold")  # what fine-tuning trains with trainable="pwl"

  def __init__(self, weights: FoldedWeights, *, learnable: bool = False,
               outliers: str = "predicted", implementation: str | None = None,
               stats: tuple = ()):
    if outliers not in OUTLIER_MODES:
      raise ValueError(f"outliers: expected one of {OUTLIER_MODES}, got {outliers!r}")
    line_type = nnx.Param if learnable else FoldConstant
    for name in WEIGHT_FIELDS + LINE_FIELDS + CONSTANT_FIELDS:
      value = getattr(weights, name)
      kind = nnx.Param if name in WEIGHT_FIELDS else line_type if name in LINE_FIELDS else FoldConstant
      setattr(self, name, nnx.data(None if value is None else kind(value)))
    self.approximates = weights.activation
    self.union_fractions = weights.union_fractions
    self.margin = weights.margin
    self.outliers = outliers
    self.implementation = implementation
    self.stats = tuple(stats)

  @classmethod
  def from_weights(cls, plan: LayerPlan, *, w_up, w_down, w_gate=None, b_up=None, b_gate=None,
                   b_down=None, activation: str, calibration_inputs: np.ndarray,
                   predictor_bits: int = 4, margin: float = 1.0, dtype=jnp.float32,
                   learnable: bool = False, outliers: str = "predicted",
                   implementation: str | None = None, refit: bool = True) -> FoldedFFN:
    """Fold an FFN's weights (arrays, [D, H] / [H, D_out] layouts) by ``plan``; the predictor's
    margins, decode capacities and (``refit``) W_fold / b_fold are fitted on
    ``calibration_inputs`` [N, D]."""
    weights, stats = build_weights(plan, w_up=w_up, w_down=w_down, w_gate=w_gate, b_up=b_up,
                                   b_gate=b_gate, b_down=b_down, activation=activation,
                                   calibration_inputs=calibration_inputs,
                                   predictor_bits=predictor_bits, margin=margin, dtype=dtype,
                                   refit=refit)
    return cls(weights, learnable=learnable, outliers=outliers, implementation=implementation,
               stats=stats)

  @property
  def learnable(self) -> bool:
    return isinstance(self.slope, nnx.Param)

  @property
  def glu(self) -> bool:
    return self.w_up is not None

  def weights(self) -> FoldedWeights:
    """The arrays as the op takes them."""
    names = WEIGHT_FIELDS + LINE_FIELDS + CONSTANT_FIELDS
    values = {n: None if getattr(self, n) is None else getattr(self, n)[...] for n in names}
    return FoldedWeights(**values, activation=self.approximates, margin=self.margin,
                         union_fractions=self.union_fractions)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D_out] in the weights' dtype."""
    weights = self.weights()
    y = folded_ffn(x.astype(weights.w_fold.dtype), weights, outliers=self.outliers,
                   implementation=self.implementation)
    if hasattr(self, "__captures__"):  # only inside nnx.capture, like FusedFFN
      self.sow(nnx.Intermediate, "ffn_output", y)
    return y


def _np(array) -> np.ndarray | None:
  return None if array is None else np.asarray(array, np.float64)


def build_weights(plan: LayerPlan, *, w_up, w_down, w_gate=None, b_up=None, b_gate=None,
                  b_down=None, activation: str, calibration_inputs: np.ndarray,
                  predictor_bits: int, margin: float, dtype,
                  refit: bool = True) -> tuple[FoldedWeights, dict]:
  """(FoldedWeights, stats): the fold computed in float64, stored in ``dtype`` (the lines,
  ranges and scales in float32). See ``flashffn_jax.fold`` for the math; with ``refit``,
  W_fold and b_fold are then refitted on the calibration tokens (``_refit_fold``)."""
  w_up, w_down, w_gate = _np(w_up), _np(w_down), _np(w_gate)
  b_up, b_gate, b_down = _np(b_up), _np(b_gate), _np(b_down)
  glu = w_gate is not None
  w_in, b_in = (w_gate, b_gate) if glu else (w_up, b_up)
  hidden = w_in.shape[1]
  if plan.folded.shape != (hidden,):
    raise ValueError(f"plan: expected {hidden} neurons (w_up's columns), got {plan.folded.shape}")
  if not np.isfinite(margin) or margin < 0:
    raise ValueError(f"margin: expected a number >= 0, got {margin!r}")
  fold, keep = np.flatnonzero(plan.folded), np.flatnonzero(~plan.folded)
  slope, intercept = plan.slope[fold], plan.intercept[fold]
  cols = lambda a, idx: None if a is None else a[..., idx]
  # Σ_{i∈F} line_i(z_i) W_down[i]: MLP z_i = x W_in[:, i] + b_in,i; GLU c_i (x W_up[:, i] + b_up,i).
  down_f = w_down[fold]
  if glu:
    w_fold = w_up[:, fold] @ (intercept[:, None] * down_f)
    bias_coef = (0.0 if b_up is None else b_up[fold]) * intercept
  else:
    w_fold = w_in[:, fold] @ (slope[:, None] * down_f)
    bias_coef = (0.0 if b_in is None else b_in[fold]) * slope + intercept
  b_fold = (0.0 if b_down is None else b_down) + bias_coef @ down_f

  x = np.asarray(calibration_inputs, np.float64)
  q, scale = predictor_lib.quantize_columns(w_in[:, fold], predictor_bits)
  z = x @ w_in[:, fold] + (0.0 if b_in is None else b_in[fold])
  z_hat = predictor_lib.predict(x, q, scale, cols(b_in, fold))
  spread = np.std(z_hat - z, axis=0)
  flags = (z_hat < plan.lower[fold] + margin * spread) | (z_hat > plan.upper[fold] - margin * spread)
  union = _union_fractions(flags)
  fit_errors = {}
  if refit and len(fold):
    # what x W_fold + b_fold stands for at inference: Σ_F t_i W_down[i] + b_down, with t_i the
    # line where the predictor flags neuron i (its correction adds exact − line) and the exact
    # term elsewhere; MLP exact = act(z), GLU exact = act(g) u
    act = activations.lookup(activation).fn
    if glu:
      u = x @ w_up[:, fold] + (0.0 if b_up is None else b_up[fold])
      exact, line = act(z) * u, intercept * u
    else:
      exact, line = act(z), slope * z + intercept
    target = np.where(flags, line, exact) @ down_f + (0.0 if b_down is None else b_down)
    w_fold, b_fold, fit_errors = _refit_fold(x, target, w_fold, b_fold)

  as_dtype = lambda a: None if a is None else jnp.asarray(a, dtype)
  as_f32 = lambda a: jnp.asarray(a, jnp.float32)
  rows = lambda a: None if a is None else as_dtype(a[:, fold].T)
  kept = lambda a: None if a is None or not len(keep) else as_dtype(a[..., keep])
  weights = FoldedWeights(
      w_fold=as_dtype(w_fold), b_fold=as_dtype(np.broadcast_to(b_fold, (w_down.shape[1],))),
      w_in=rows(w_in), w_down=as_dtype(down_f), slope=as_f32(slope), intercept=as_f32(intercept),
      hot_lower=as_f32(plan.lower[fold]), hot_upper=as_f32(plan.upper[fold]),
      predictor=jnp.asarray(q, PREDICTOR_STORAGE[predictor_bits]), predictor_scale=as_f32(scale),
      predictor_error=as_f32(spread),
      priority=as_f32(np.linalg.norm(down_f, axis=1)),
      b_in=as_dtype(cols(b_in, fold)), w_up=rows(w_up) if glu else None,
      b_up=as_dtype(cols(b_up, fold)) if glu else None,
      kept_w_in=kept(w_in), kept_b_in=kept(b_in), kept_w_up=kept(w_up) if glu else None,
      kept_b_up=kept(b_up) if glu else None,
      kept_w_down=None if not len(keep) else as_dtype(w_down[keep]),
      activation=activation, margin=float(margin), union_fractions=union)
  in_range = (z >= plan.lower[fold]) & (z <= plan.upper[fold])
  stats = {"neurons": hidden, "folded": len(fold), "kept": len(keep),
           "calibration_tokens": len(x), "predictor_bits": predictor_bits, "margin": margin,
           "plan_exact_fraction": plan.exact_fraction,
           "predicted_flag_rate": float(flags.mean()) if len(fold) else 0.0,
           "outlier_rate": float(1 - in_range.mean()) if len(fold) else 0.0,
           "union_fractions": union, **fit_errors}
  return weights, tuple(stats.items())


def _refit_fold(x, target, w_fold, b_fold):
  """W_fold, b_fold by ridge least squares on the calibration tokens x [N, D], target T [N, D_out].

  The lines' fold matches T only inside each neuron's hot range, one neuron at a time; here
  [W_fold; b_fold] = argmin ‖[x 1] β − T‖² + λ ‖β − β_lines‖² over all tokens at once (λ =
  ``REFIT_RIDGE`` × the normal matrix's mean diagonal). Returns (w_fold, b_fold, relative
  calibration errors ‖[x 1] β − T‖ / ‖T‖ of the lines' fold and of the refit).
  """
  a = np.hstack([x, np.ones((len(x), 1))])
  gram, cross, target_sq = a.T @ a, a.T @ target, float(np.sum(target ** 2))
  start_point = np.vstack([w_fold, np.broadcast_to(b_fold, (1, target.shape[1]))])
  ridge = REFIT_RIDGE * np.trace(gram) / len(gram)
  beta = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross + ridge * start_point)
  error = lambda b: float(np.sqrt(max(np.sum(b * (gram @ b)) - 2 * np.sum(b * cross) + target_sq,
                                      0.0) / max(target_sq, 1e-300)))
  return beta[:-1], beta[-1], {"fold_fit_error_lines": error(start_point),
                               "fold_fit_error_refit": error(beta)}


def union_counts(flags: np.ndarray, groups: int = 256) -> dict[int, np.ndarray]:
  """{M: |∪ flags| of each of ``groups`` random groups of M tokens} for M in UNION_TOKENS: the
  neurons a decode step of M independent sequences must correct (fixed seed: reproducible)."""
  rng = np.random.default_rng(0)
  picks = {m: rng.integers(0, flags.shape[0], size=(groups, m)) for m in UNION_TOKENS}
  return {m: np.any(flags[p], axis=1).sum(axis=1) for m, p in picks.items()}


def _union_fractions(flags: np.ndarray) -> tuple:
  """((M, fraction), ...): the UNION_QUANTILE of |∪ flags| / F over random groups of M tokens."""
  if flags.shape[1] == 0:
    return tuple((m, 0.0) for m in UNION_TOKENS)
  return tuple((m, float(np.quantile(counts, UNION_QUANTILE) / flags.shape[1]))
               for m, counts in union_counts(flags).items())
