"""Helpers the GPU benchmarks rely on for their numbers (checked here, where no GPU is needed)."""

from __future__ import annotations

import pathlib
import sys

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))
from bench_gpu import SHAPES, candidates  # noqa: E402
from gpu_profile import union_ns  # noqa: E402


def test_union_of_kernel_intervals_counts_overlap_once():
  """GPU-busy time: overlapping kernels (two streams) count once, gaps not at all."""
  assert union_ns([(0, 10), (5, 15), (20, 30)]) == 25
  assert union_ns([(20, 30), (0, 100)]) == 100
  assert union_ns([(0, 4), (4, 9)]) == 9
  assert union_ns([]) == 0


def test_forward_candidates_fit_their_shapes():
  """Every epilogue plan bench_gpu times compiles within the kernel's limits for its shape (a
  refused plan would only show up as an error row after a machine start), and both schedules
  are among them."""
  for shape in SHAPES:
    plans = candidates(shape)
    epilogues = [plan.epilogue for plan in plans.values() if plan.path == "epilogue"]
    assert {config.schedule for config in epilogues} == {"cooperative", "pingpong"}
    for config in epilogues:
      config.check(2 if shape.glu else 1, jnp.bfloat16)
