"""Helpers the GPU benchmarks rely on for their numbers (checked here, where no GPU is needed)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))
from gpu_profile import union_ns  # noqa: E402


def test_union_of_kernel_intervals_counts_overlap_once():
  """GPU-busy time: overlapping kernels (two streams) count once, gaps not at all."""
  assert union_ns([(0, 10), (5, 15), (20, 30)]) == 25
  assert union_ns([(20, 30), (0, 100)]) == 100
  assert union_ns([(0, 4), (4, 9)]) == 9
  assert union_ns([]) == 0
