"""Calibration math (float64 NumPy): per-neuron hot ranges and lines, and which neurons to fold.

For one FFN and N calibration tokens, neuron i sees activation inputs z_i (the up projection of
an MLP, the gate of a GLU) and, in a GLU, the up projection u_i it multiplies. Its contribution
to the output is act(z_i) · W_down[i] (MLP) or act(z_i) u_i · W_down[i] (GLU).

Candidate lines. For each coverage p in ``COVERAGES`` the hot range of neuron i is a window of
⌈pN⌉ consecutive sorted samples of z_i, [lo, hi], and its line l(z) = a z + c the weighted least
squares fit of act on that window (weights ω = 1 for an MLP, ω = u² for a GLU, where the line
must be a constant, a = 0). Among all windows the one with the smallest squared error wins:

    E_i(p) = ‖W_down[i]‖² · (1/N) Σ_{z in window} ω (act(z) − l(z))²

which is the expected squared output error the neuron adds per token once every sample outside
the window is corrected exactly. Window sums come from prefix sums over the sorted samples, so
all windows cost O(N) per neuron and coverage.

Allocation. Each neuron is either kept (computed exactly: cost 1, error 0) or folded at one
coverage p (cost 1 − p for its corrections plus the predictor's share π, error E_i(p)).
For a price λ every neuron independently minimises error + λ · cost; bisection on λ finds the
plan whose mean exact fraction (kept neurons + expected corrections) meets the target. This
spends the correction budget where it buys the most accuracy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flashffn_jax import activations

COVERAGES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
WINDOW_STARTS = 256  # window starts tried per coverage (evenly spaced over the sorted samples)
NEURON_CHUNK = 256  # neurons per prefix-sum block (bounds memory at N x 256 x 8 bytes x 6)


@dataclasses.dataclass(frozen=True)
class Candidates:
  """Best window per coverage: arrays [len(coverages), H] (``coverage`` is [P], in-window
  fraction of the calibration samples)."""

  coverage: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  slope: np.ndarray
  intercept: np.ndarray
  error: np.ndarray


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Which neurons fold, with their hot range and line; arrays [H] (NaN where kept)."""

  folded: np.ndarray  # bool
  lower: np.ndarray
  upper: np.ndarray
  slope: np.ndarray
  intercept: np.ndarray
  coverage: np.ndarray  # calibration fraction inside the hot range (0 where kept)
  error: np.ndarray  # E_i of the chosen line (0 where kept)

  @property
  def exact_fraction(self) -> float:
    """Mean fraction of neurons computed exactly per calibration token (kept + corrected)."""
    return float(np.mean(np.where(self.folded, 1.0 - self.coverage, 1.0)))


def _prefix(values: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])


class _SortedSums:
  """Prefix sums of ω, ωz, ωz², ωf, ωf², ωzf over each neuron's sorted samples [N+1, H], with z
  and f centred per neuron (so window sums do not cancel catastrophically)."""

  def __init__(self, z: np.ndarray, f: np.ndarray, weight: np.ndarray | None):
    order = np.argsort(z, axis=0)
    self.sorted_z = np.take_along_axis(z, order, axis=0)
    fs = np.take_along_axis(f, order, axis=0)
    ws = np.ones_like(fs) if weight is None else np.take_along_axis(weight, order, axis=0)
    self.z_mid, self.f_mid = self.sorted_z[len(z) // 2], fs[len(z) // 2]
    zc, fc = self.sorted_z - self.z_mid, fs - self.f_mid
    self.sums = {k: _prefix(v) for k, v in (("w", ws), ("wz", ws * zc), ("wzz", ws * zc * zc),
                                            ("wf", ws * fc), ("wff", ws * fc * fc),
                                            ("wzf", ws * zc * fc))}

  def best_window(self, count: int, free_slope: bool, starts: int = WINDOW_STARTS):
    """(lower, upper, slope, intercept, sse) [H] of the window of ``count`` consecutive sorted
    samples whose least-squares line (a constant unless ``free_slope``) has the least
    sse = Σ_window ω (f − a z − c)²."""
    n = self.sorted_z.shape[0]
    first = np.unique(np.linspace(0, n - count, min(starts, n - count + 1)).round().astype(int))
    window = {k: v[first + count] - v[first] for k, v in self.sums.items()}  # [starts, H]
    w = np.maximum(window["w"], 1e-300)
    sse_const = window["wff"] - window["wf"] ** 2 / w
    if free_slope:
      var_z = window["wzz"] - window["wz"] ** 2 / w
      cov = window["wzf"] - window["wz"] * window["wf"] / w
      flat = var_z <= 1e-12 * np.maximum(window["wzz"], 1e-300)
      slope = np.where(flat, 0.0, cov / np.where(flat, 1.0, var_z))
      sse = np.where(flat, sse_const, sse_const - slope * cov)
    else:
      slope, sse = np.zeros_like(w), sse_const
    best = np.argmin(np.maximum(sse, 0.0), axis=0)
    pick = lambda a: np.take_along_axis(a, best[None], axis=0)[0]
    start, columns = first[best], np.arange(w.shape[1])
    a = pick(slope)
    intercept = self.f_mid + pick(window["wf"] / w) - a * (self.z_mid + pick(window["wz"] / w))
    return (self.sorted_z[start, columns], self.sorted_z[start + count - 1, columns], a, intercept,
            np.maximum(pick(sse), 0.0))


def candidate_lines(z: np.ndarray, activation: str, *, up: np.ndarray | None = None,
                    down_norm_sq: np.ndarray, coverages=COVERAGES) -> Candidates:
  """Candidates for every neuron: z [N, H] activation inputs, ``up`` [N, H] for a GLU (the line
  is then a constant), ``down_norm_sq`` [H] = ‖W_down[i]‖²."""
  z = np.asarray(z, np.float64)
  fn = activations.lookup(activation).fn
  n, hidden = z.shape
  counts = [max(2, min(n, int(np.ceil(p * n)))) for p in coverages]
  fields = {k: np.zeros((len(coverages), hidden)) for k in ("lower", "upper", "slope", "intercept", "error")}
  for lo in range(0, hidden, NEURON_CHUNK):
    block = slice(lo, min(hidden, lo + NEURON_CHUNK))
    weight = None if up is None else np.asarray(up[:, block], np.float64) ** 2
    sums = _SortedSums(z[:, block], fn(z[:, block]), weight)
    for j, count in enumerate(counts):
      lower, upper, slope, intercept, sse = sums.best_window(count, free_slope=up is None)
      for name, value in (("lower", lower), ("upper", upper), ("slope", slope),
                          ("intercept", intercept), ("error", sse / n * down_norm_sq[block])):
        fields[name][j, block] = value
  return Candidates(np.array(counts) / n, **fields)


def allocate(candidates: Candidates, exact_fraction: float, predictor_cost: float) -> LayerPlan:
  """The plan with the least total error whose mean exact fraction is <= ``exact_fraction``
  (see the module docstring); ``predictor_cost`` = π, a folded neuron's predictor share."""
  if not 0.0 <= exact_fraction <= 1.0:
    raise ValueError(f"exact_fraction: expected a fraction in [0, 1], got {exact_fraction!r}")
  cost = (1.0 - candidates.coverage)[:, None] + predictor_cost  # [P, 1]
  error = candidates.error

  def choose(price: float):
    score = error + price * cost  # [P, H]
    best = np.argmin(score, axis=0)
    folded = score[best, np.arange(error.shape[1])] < price  # kept neuron: error 0, cost 1
    exact = np.where(folded, 1.0 - candidates.coverage[best], 1.0)
    return best, folded, float(np.mean(exact))

  scale = max(float(np.median(error[error > 0])) if np.any(error > 0) else 1.0, 1e-300)
  low, high = np.log(scale) - 60.0, np.log(scale) + 60.0  # price range (log space)
  if choose(np.exp(high))[2] > exact_fraction:
    best, folded, _ = choose(np.exp(high))  # the target is below what folding can reach
  else:
    for _ in range(80):
      mid = 0.5 * (low + high)
      if choose(np.exp(mid))[2] > exact_fraction:
        low = mid
      else:
        high = mid
    best, folded, _ = choose(np.exp(high))
  columns = np.arange(error.shape[1])
  take = lambda a: np.where(folded, a[best, columns], np.nan)
  coverage = np.where(folded, candidates.coverage[best], 0.0)
  return LayerPlan(folded, take(candidates.lower), take(candidates.upper), take(candidates.slope),
                   take(candidates.intercept), coverage, np.where(folded, error[best, columns], 0.0))
