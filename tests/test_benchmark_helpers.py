"""Helpers the GPU benchmarks rely on for their numbers (checked here, where no GPU is needed)."""

from __future__ import annotations

import pathlib
import sys

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))
from bench_gpu import SHAPES, candidates  # noqa: E402
from gpu_profile import ns_per_launch, union_ns  # noqa: E402


def test_union_of_kernel_intervals_counts_overlap_once():
  """GPU-busy time: overlapping kernels (two streams) count once, gaps not at all."""
  assert union_ns([(0, 10), (5, 15), (20, 30)]) == 25
  assert union_ns([(20, 30), (0, 100)]) == 100
  assert union_ns([(0, 4), (4, 9)]) == 9
  assert union_ns([]) == 0


def test_kernel_times_split_a_name_launched_twice_per_call():
  """Two kernels of one name per call (the forward and segment-sum Mosaic kernels) are reported
  apart by launch ordinal; a trace whose calls differ falls back to names."""
  call = [("mosaic", 10), ("gemm", 5), ("mosaic", 3)]
  events, t = [], 0
  for name, length in call * 2:
    events.append((t, t + length, name))
    t += length + 1
  assert ns_per_launch(events, calls=2) == {"mosaic#0": 20, "gemm": 10, "mosaic#1": 6}
  assert ns_per_launch(events[:-1], calls=2) == {"mosaic": 23, "gemm": 10}


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
