"""GPU time of a jitted function from ``jax.profiler`` traces (kernel intervals on the GPU's streams).

At decode sizes a wall clock measures the host's launch path more than the GPU (benchmarks/
NOTES.md, GPU section); ``profile`` reports both.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax


def kernel_events(trace_dir: str) -> tuple[list[tuple[int, int, str]], list[str]]:
  """(start ns, end ns, name) of every kernel the GPU ran during the trace (stream lines of GPU
  planes), in start order, and the names of the lines read."""
  paths = [os.path.join(root, name) for root, _, names in os.walk(trace_dir) for name in names
           if name.endswith(".xplane.pb")]
  events, lines = [], set()
  for path in paths:
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        if "stream" in line.name.lower():  # skip the "XLA Ops" / "XLA Modules" summary lines
          events += [(e.start_ns, e.end_ns, e.name) for e in line.events]
          lines.add(line.name)
  return sorted(events), sorted(lines)


def ns_per_launch(events, calls: int) -> dict[str, int]:
  """Total ns per kernel, keyed by name, or by ``name#k`` (its k-th launch in a call) for a
  name launched more than once per call (e.g. two Mosaic kernels, both ``kernel_mosaic_gpu_
  kernel``). Ordinals assume every call launches the same sequence; otherwise names only."""
  names = [name for _, _, name in events]
  per_call = len(names) // calls if calls and len(names) % calls == 0 else 0
  sequence = names[:per_call]
  same = per_call > 0 and all(name == sequence[i % per_call] for i, name in enumerate(names))
  keys = [f"{name}#{sequence[:i].count(name)}" if sequence.count(name) > 1 else name
          for i, name in enumerate(sequence)] if same else []  # [] : names only
  totals = {}
  for index, (start, end, name) in enumerate(events):
    key = keys[index % len(keys)] if keys else name
    totals[key] = totals.get(key, 0) + end - start
  return totals


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
  unit, wall-clock us per unit, the stream lines read and the ``top`` costliest kernels
  (``ns_per_launch``)."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    host = time.perf_counter() - start
    events, lines = kernel_events(trace_dir)
  ffns = calls * per_call
  top = sorted(ns_per_launch(events, calls).items(), key=lambda item: -item[1])[:top]
  intervals = [(start, end) for start, end, _ in events]
  return dict(device_us=union_ns(intervals) / 1e3 / ffns, kernels=len(intervals) / ffns,
              host_us=host * 1e6 / ffns, lines=lines,
              by_kernel_us={name[:90]: ns / 1e3 / ffns for name, ns in top})
