"""GPU time of a jitted function from ``jax.profiler`` traces (kernel intervals on the GPU's streams).

At decode sizes a wall clock measures the host's launch path more than the GPU (benchmarks/
NOTES.md, GPU section); ``profile`` reports both.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax


def kernel_intervals(trace_dir: str) -> tuple[list[tuple[int, int]], list[str], dict[str, int]]:
  """(start, end) ns of every kernel the GPU ran during the trace (stream lines of GPU planes),
  the names of the lines read, and the total ns per kernel name."""
  paths = [os.path.join(root, name) for root, _, names in os.walk(trace_dir) for name in names
           if name.endswith(".xplane.pb")]
  intervals, names, by_kernel = [], set(), {}
  for path in paths:
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        if "stream" in line.name.lower():  # skip the "XLA Ops" / "XLA Modules" summary lines
          intervals += [(e.start_ns, e.end_ns) for e in line.events]
          names.add(line.name)
          for e in line.events:
            by_kernel[e.name] = by_kernel.get(e.name, 0) + e.duration_ns
  return intervals, sorted(names), by_kernel


def union_ns(intervals) -> int:
  total, end = 0, -1
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def profile(fn, args, calls: int, per_call: int, top: int = 4) -> dict:
  """Trace ``calls`` calls of ``fn(*args)`` (after two warm-up calls), each running ``per_call``
  units of work (FFNs): GPU-busy us per unit (union of kernel intervals), kernel launches per
  unit, wall-clock us per unit, the stream lines read and the ``top`` costliest kernels."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    host = time.perf_counter() - start
    intervals, lines, by_kernel = kernel_intervals(trace_dir)
  ffns = calls * per_call
  top = sorted(by_kernel.items(), key=lambda item: -item[1])[:top]
  return dict(device_us=union_ns(intervals) / 1e3 / ffns, kernels=len(intervals) / ffns,
              host_us=host * 1e6 / ffns, lines=lines,
              by_kernel_us={name[:90]: ns / 1e3 / ffns for name, ns in top})
