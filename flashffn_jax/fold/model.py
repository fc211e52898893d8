"""Folding a whole model: ``FoldSpec``, calibration capture, ``fold_model`` (what
``linearize(model, FoldSpec(...))`` runs), and Shakespeare calibration for the bundled models.

Calibration runs the EXACT model on the calibration batches once (jitted), records every MLP's
input at the real (unmasked) token positions, and plans each layer from its own inputs
(``flashffn_jax.fold.lines``). Everything is deterministic: the same model and calibration give
the same fold, so a fine-tune checkpoint of a folded model restores onto a fresh fold.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashffn_jax.fold.layer import FoldedFFN
from flashffn_jax.fold.lines import COVERAGES, allocate, candidate_lines
from flashffn_jax.fold.ops import IMPLEMENTATIONS, OUTLIER_MODES
from flashffn_jax.fold.predictor import PREDICTOR_BITS

logger = logging.getLogger("flashffn_jax")

_SPEC = re.compile(r"^fold(?P<percent>\d+)?(?:-int(?P<bits>\d+))?$")
DEFAULT_EXACT_FRACTION = 0.2
DEFAULT_CALIBRATION_TOKENS = 8192
CALIBRATION_PLAYS = 6  # training plays the causal-LM calibration windows are drawn from


@dataclasses.dataclass(frozen=True)
class CalibrationBatch:
  """One call ``model(*args)``; ``mask`` [B, T] marks the real tokens (None: all positions)."""

  args: tuple
  mask: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class FoldSpec:
  """How to fold (see ``flashffn_jax.fold``).

  Args:
    exact_fraction: target mean fraction of neurons computed exactly per token (kept neurons +
      corrected outliers), on the calibration tokens. Lower folds more and costs accuracy.
    predictor_bits: bits of the outlier predictor's copy of W_up / W_gate (2, 4 or 8).
    margin: κ, the predictor's safety margin in units of its error's standard deviation.
    calibration: CalibrationBatch items (or token arrays [B, T], each one ``model(tokens)``).
    outliers: "predicted" (deployable), "oracle", "ignored" or "all" (``fold.ops``).
    implementation: None (``folded_ffn``'s measured choice), "dense" or "gather".
    coverages: hot-range coverages each neuron may choose from.
    refit: refit W_fold / b_fold by least squares on the calibration tokens after folding the
      lines (``fold.layer._refit_fold``); False keeps the lines' fold.
  """

  exact_fraction: float = DEFAULT_EXACT_FRACTION
  predictor_bits: int = 4
  margin: float = 1.0
  calibration: tuple = ()
  outliers: str = "predicted"
  implementation: str | None = None
  coverages: tuple = COVERAGES
  refit: bool = True

  def __post_init__(self):
    if not 0.0 <= self.exact_fraction <= 1.0:
      raise ValueError(f"exact_fraction: expected a fraction in [0, 1], got {self.exact_fraction!r}")
    if self.predictor_bits not in PREDICTOR_BITS:
      raise ValueError(f"predictor_bits: expected one of {PREDICTOR_BITS}, got {self.predictor_bits!r}")
    if not (np.isfinite(self.margin) and self.margin >= 0):
      raise ValueError(f"margin: expected a number >= 0, got {self.margin!r}")
    if self.outliers not in OUTLIER_MODES:
      raise ValueError(f"outliers: expected one of {OUTLIER_MODES}, got {self.outliers!r}")
    if self.implementation is not None and self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation: expected None or one of {IMPLEMENTATIONS}, got "
                       f"{self.implementation!r}")
    if not self.coverages or not all(0.0 < p <= 1.0 for p in self.coverages):
      raise ValueError(f"coverages: expected fractions in (0, 1], got {self.coverages!r}")
    object.__setattr__(self, "calibration", tuple(_as_batch(b) for b in self.calibration))

  @property
  def name(self) -> str:
    """The spec string that parses back to these settings (calibration aside)."""
    return f"fold{round(100 * self.exact_fraction)}-int{self.predictor_bits}"


def _as_batch(item) -> CalibrationBatch:
  if isinstance(item, CalibrationBatch):
    return item
  if hasattr(item, "shape") and hasattr(item, "dtype"):
    return CalibrationBatch((item,))
  raise ValueError(f"calibration: expected CalibrationBatch items or token arrays, got "
                   f"{type(item).__name__}")


def is_fold_spec(activation) -> bool:
  """True for a FoldSpec or a string like "fold", "fold15", "fold20-int2"."""
  return isinstance(activation, FoldSpec) or (isinstance(activation, str) and bool(_SPEC.match(activation)))


def parse_spec(spec: str, **overrides) -> FoldSpec:
  """"fold" / "fold<percent>" / "fold<percent>-int<bits>" -> FoldSpec (percent = exact_fraction
  in %, default 20; bits default 4); ``overrides`` set other fields (e.g. calibration)."""
  match = _SPEC.match(spec) if isinstance(spec, str) else None
  if not match:
    raise ValueError(f"activation: expected a fold spec like 'fold', 'fold20' or 'fold20-int2', got {spec!r}")
  fields = {}
  if match["percent"] is not None:
    fields["exact_fraction"] = int(match["percent"]) / 100
  if match["bits"] is not None:
    fields["predictor_bits"] = int(match["bits"])
  return FoldSpec(**{**fields, **overrides})


class _InputRecorder(nnx.Module):
  """Wraps an MLP during calibration and records its input."""

  NAME = "ffn_input"

  def __init__(self, inner: nnx.Module):
    self.inner = inner

  def __call__(self, x):
    self.sow(nnx.Intermediate, self.NAME, x)
    return self.inner(x)


@nnx.jit
def _recorded_inputs(model, args):
  return nnx.capture(model, nnx.Intermediate)(*args)[1]


def capture_inputs(model: nnx.Module, paths: Sequence[tuple],
                   calibration: Iterable[CalibrationBatch]) -> dict[tuple, np.ndarray]:
  """{path: [N, D] float32}: each MLP's inputs at the real tokens of every calibration batch."""
  from flashffn_jax.surgery import _set_child, path_name

  recording = nnx.clone(model)
  modules = dict(nnx.iter_modules(recording))
  for path in paths:
    _set_child(recording, path, _InputRecorder(modules[path]))
  inputs = {path: [] for path in paths}
  for batch in calibration:
    state = _recorded_inputs(recording, tuple(jnp.asarray(a) for a in batch.args))
    for key, variable in nnx.to_flat_state(state):
      path = tuple(key[:-1])
      if key[-1] != _InputRecorder.NAME:
        continue  # what the layers themselves record (FusedFFN / FoldedFFN outputs)
      if path not in inputs:
        raise ValueError(f"calibration: recorded an input at {path_name(path)}, not an MLP being folded")
      x = np.asarray(variable.get_value()[0], np.float32)
      x = x[np.asarray(batch.mask, bool)] if batch.mask is not None else x.reshape(-1, x.shape[-1])
      inputs[path].append(x)
  missing = [path_name(p) for p, xs in inputs.items() if not xs]
  if missing:
    raise ValueError(f"calibration: the model never called the MLPs {missing}; pass batches for "
                     "model(*args)")
  return {path: np.concatenate(xs) for path, xs in inputs.items()}


def plan_layer(inputs: np.ndarray, weights: dict, activation: str, spec: FoldSpec):
  """The LayerPlan of one FFN (weights: WEIGHT_NAMES -> arrays) from its inputs [N, D]."""
  x = np.asarray(inputs, np.float64)
  arr = lambda name: None if weights[name] is None else np.asarray(weights[name], np.float64)
  glu = weights["w_gate"] is not None
  w_in, b_in = (arr("w_gate"), arr("b_gate")) if glu else (arr("w_up"), arr("b_up"))
  z = x @ w_in + (0.0 if b_in is None else b_in)
  up = x @ arr("w_up") + (0.0 if arr("b_up") is None else arr("b_up")) if glu else None
  w_down = arr("w_down")
  candidates = candidate_lines(z, activation, up=up, down_norm_sq=np.sum(w_down ** 2, axis=1),
                               coverages=spec.coverages)
  neuron_cost = 3 if glu else 2  # matmul columns/rows per neuron: a predictor column is bits/16
  return allocate(candidates, spec.exact_fraction, spec.predictor_bits / (16 * neuron_cost))


def fold_model(model: nnx.Module, spec: FoldSpec | str, layers=None, learnable: bool = False, *,
               implementation: str | None = None) -> nnx.Module:
  """A copy of ``model`` whose MLPs (or those in ``layers``) are ``FoldedFFN`` layers.

  ``spec`` needs calibration batches; ``layers`` and ``learnable`` mean what they mean for
  ``linearize`` (learnable: the lines become ``nnx.Param``; the weights always are).
  ``implementation`` overrides the spec's.
  """
  from flashffn_jax.surgery import _select, _set_child, find_mlps, path_name

  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  spec = parse_spec(spec) if isinstance(spec, str) else spec
  if not spec.calibration:
    raise ValueError("activation: a fold needs calibration data; pass FoldSpec(calibration=...) "
                     "or flashffn_jax.fold.calibrated(spec, model_name, tokenizer)")
  new_model = nnx.clone(model)
  matches = _select(find_mlps(new_model)[0], layers)
  if not matches:
    raise ValueError("model: found no MLP to fold (see linearize)")
  for match in matches:
    if not isinstance(match.base_activation, str):
      raise ValueError(f"activation: cannot fold {match.name}: its activation is a custom callable")
  inputs = capture_inputs(new_model, [m.path for m in matches], spec.calibration)
  for match in matches:
    weights = {k: None if v is None else v[...] for k, v in match.weights.items()}
    plan = plan_layer(inputs[match.path], weights, match.base_activation, spec)
    layer = FoldedFFN.from_weights(
        plan, **weights, activation=match.base_activation, calibration_inputs=inputs[match.path],
        predictor_bits=spec.predictor_bits, margin=spec.margin,
        dtype=weights["w_up"].dtype, learnable=learnable, outliers=spec.outliers,
        implementation=implementation or spec.implementation, refit=spec.refit)
    _set_child(new_model, match.path, layer)
    stats = dict(layer.stats)
    logger.info("fold: %s -> FoldedFFN(%d folded, %d kept)", path_name(match.path),
                stats["folded"], stats["kept"])
  return new_model


def folded_layers(model: nnx.Module) -> list[tuple[tuple, FoldedFFN]]:
  """(path, layer) of every FoldedFFN in ``model``."""
  return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, FoldedFFN)]


def set_outliers(model: nnx.Module, outliers: str) -> None:
  """Switch every FoldedFFN's correction mode in place (for measurements)."""
  if outliers not in OUTLIER_MODES:
    raise ValueError(f"outliers: expected one of {OUTLIER_MODES}, got {outliers!r}")
  for _, layer in folded_layers(model):
    layer.outliers = outliers


# --------------------------------------------------------------------------------------------
# Shakespeare calibration for the bundled models (training split only)
# --------------------------------------------------------------------------------------------


def sentences(split: str, count: int, *, seed: int = 0, min_words: int = 5) -> list[str]:
  """``count`` distinct lines of at least ``min_words`` words from a Shakespeare split, drawn
  reproducibly (sentence-encoder calibration and evaluation)."""
  from flashffn_jax import data

  lines = sorted({line.strip() for name in data.split_plays(split)
                  for line in data.play_text(name).splitlines() if len(line.split()) >= min_words})
  if count > len(lines):
    raise ValueError(f"count: the {split} split has {len(lines)} such lines, asked for {count}")
  picks = np.random.default_rng(seed).choice(len(lines), count, replace=False)
  return [lines[i] for i in sorted(picks)]


def shakespeare_calibration(model_name: str, tokenizer, *, tokens: int | None = None,
                            seq_len: int = 256, batch_size: int = 8) -> tuple[CalibrationBatch, ...]:
  """About ``tokens`` (default ``DEFAULT_CALIBRATION_TOKENS``) calibration tokens from the
  Shakespeare training split, as batches for the bundled model ``model_name`` (causal LMs:
  token windows; MiniLM: lines with masks)."""
  from flashffn_jax import data, models
  from flashffn_jax.models import bert

  tokens = DEFAULT_CALIBRATION_TOKENS if tokens is None else tokens
  seq_len = min(seq_len, tokens)
  kind = models.MODELS[model_name].kind if model_name in models.MODELS else None
  if kind == "causal-lm":
    windows = np.concatenate([data.windows(t, seq_len)[0][:, :seq_len] for t in _play_tokens(tokenizer)])
    picks = np.random.default_rng(0).choice(len(windows), max(1, -(-tokens // seq_len)), replace=False)
    chosen = windows[np.sort(picks)]
    return tuple(CalibrationBatch((chosen[i:i + batch_size],))
                 for i in range(0, len(chosen), batch_size))
  if kind == "sentence-encoder":
    lines = sentences("train", max(batch_size, tokens // 16))
    batches = []
    for i in range(0, len(lines), 8 * batch_size):
      ids, mask = bert.tokenize(tokenizer, lines[i:i + 8 * batch_size])
      batches.append(CalibrationBatch((ids, mask), mask))
    return tuple(batches)
  raise ValueError(f"model_name: expected one of the bundled models {sorted(models.MODELS)}, got "
                   f"{model_name!r}")


def _play_tokens(tokenizer, plays: int = CALIBRATION_PLAYS) -> list[np.ndarray]:
  """Token streams of ``plays`` training plays spread over the sorted list (one per genre or so;
  tokenising a few plays is much faster than the whole split)."""
  from tokenizers import Tokenizer

  from flashffn_jax import data

  names = data.split_plays("train")
  whole_texts = Tokenizer.from_str(tokenizer.to_str())  # a copy without truncation or padding
  whole_texts.no_truncation()
  whole_texts.no_padding()
  chosen = [names[i] for i in np.linspace(0, len(names) - 1, plays).round().astype(int)]
  encoded = whole_texts.encode_batch([data.play_text(n) for n in chosen], add_special_tokens=False)
  return [np.asarray(e.ids, np.int32) for e in encoded]


def calibrated(activation, model_name: str, tokenizer, **spec_fields):
  """``activation`` unchanged unless it is a fold spec: then a FoldSpec with Shakespeare
  calibration for ``model_name`` (what the CLIs and the fine-tune loop pass to linearize)."""
  if not is_fold_spec(activation):
    return activation
  spec = parse_spec(activation) if isinstance(activation, str) else activation
  if spec.calibration:
    return spec
  return dataclasses.replace(spec, calibration=shakespeare_calibration(model_name, tokenizer),
                             **spec_fields)
