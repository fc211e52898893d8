"""Shared test helpers: fresh random inputs (never zeros) and float64 references."""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np
import pytest

# Two host devices so the sharded tests can run on a CPU-only machine. On a GPU, no GEMM
# autotuning: the tests check numbers, not speed, and each H200 kernel test spent ~60 s in XLA's
# compile (likely autotuning its odd-shaped backward GEMMs; to be confirmed on the next run).
os.environ.setdefault("XLA_FLAGS",
                      "--xla_force_host_platform_device_count=2 --xla_gpu_autotune_level=0")
# Pallas' GPU interpret mode runs each warpgroup as a host thread blocking inside an XLA:CPU host
# callback; XLA:CPU runs callbacks on one thread per core, so on a 2-core machine the three
# warpgroups of a kernel deadlock. PJRT_NPROC enlarges that pool; it must be set before the CPU
# backend starts, i.e. here (conftest is imported before any test module).
os.environ.setdefault("PJRT_NPROC", "4")


# Fresh inputs every run; FLASHFFN_TEST_SEED=<n> replays a run (the seed is in pytest's header
# and, after a failure, in its summary). The controller imports this file before it starts the
# xdist workers, which inherit its environment: exporting the seed gives every worker the same one
# (each drew its own before, and the header's seed replayed none of them).
os.environ.setdefault("FLASHFFN_TEST_SEED", str(np.random.SeedSequence().entropy % 2**31))
SESSION_SEED = int(os.environ["FLASHFFN_TEST_SEED"])


def pytest_report_header(config):
  return f"FLASHFFN_TEST_SEED={SESSION_SEED}"


def pytest_terminal_summary(terminalreporter):
  if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
    terminalreporter.write_line(f"replay with FLASHFFN_TEST_SEED={SESSION_SEED}")


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A generator for this test: the session seed mixed with the test's id."""
  return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture
def dgrad_calls(monkeypatch) -> list:
  """(kind, pwl_gradients) of every Hopper ``dgrad_sm90.dgrad_activation`` call this test makes
  (traced or run)."""
  from pallas_kernels.gpu import dgrad_sm90  # noqa: PLC0415 -- the GPU kernel tests only
  calls = []
  real = dgrad_sm90.dgrad_activation
  monkeypatch.setattr(dgrad_sm90, "dgrad_activation", lambda *a, **k: calls.append(
      (k["kind"], k.get("pwl_gradients", False))) or real(*a, **k))
  return calls


def relative_error(actual, expected) -> float:
  """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere in `actual` gives inf."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  if not np.all(np.isfinite(actual)):
    return float("inf")
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_pwl_grads_close(actual, expected, tolerance: float) -> None:
  """Each PiecewiseLinear field's gradient within `tolerance` of the reference, in the norm.

  A PWL parameter's gradient sums M·H float32 terms of both signs, so its rounding error scales
  with the field's overall size, not with one (possibly cancelled-down) element: an element-wise
  atol is flaky on fresh inputs, the field-wise norm (as for the weights) is not. A field whose
  reference gradient is exactly zero (no input reached that tail) must be exactly zero too."""
  for field in (f.name for f in dataclasses.fields(expected)):
    got, want = np.asarray(getattr(actual, field)), np.asarray(getattr(expected, field))
    if not np.any(want):
      np.testing.assert_array_equal(got, want, err_msg=f"d{field}: reference is exactly zero")
      continue
    error = relative_error(got, want)
    assert error < tolerance, f"d{field}: relative error {error:.3g} >= {tolerance:g}"
