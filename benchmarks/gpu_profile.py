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


def launch_keys(events, calls: int) -> list[str]:
  """Each event's key: its name, or ``name#k`` (its k-th launch in a call) for a name launched
  more than once per call (e.g. two Mosaic kernels, both ``kernel_mosaic_gpu_kernel``).
  Ordinals assume every call launches the same sequence; otherwise names only."""
  names = [name for _, _, name in events]
  per_call = len(names) // calls if calls and len(names) % calls == 0 else 0
  sequence = names[:per_call]
  if not (per_call > 0 and all(name == sequence[i % per_call] for i, name in enumerate(names))):
    return names
  keys = [f"{name}#{sequence[:i].count(name)}" if sequence.count(name) > 1 else name
          for i, name in enumerate(sequence)]
  return [keys[index % per_call] for index in range(len(names))]


def ns_per_launch(events, calls: int) -> dict[str, int]:
  """Total ns per kernel, keyed by ``launch_keys``."""
  totals = {}
  for key, (start, end, _) in zip(launch_keys(events, calls), events):
    totals[key] = totals.get(key, 0) + end - start
  return totals


def idle_ns_before(events, calls: int) -> dict[str, int]:
  """Total ns the GPU sat idle (no kernel running on any traced stream) just before each kernel
  started, keyed by ``launch_keys``: which launches the GPU waited for."""
  totals, busy_until = {}, None
  for key, (start, end, _) in zip(launch_keys(events, calls), events):
    if busy_until is not None and start > busy_until:
      totals[key] = totals.get(key, 0) + start - busy_until
    busy_until = end if busy_until is None else max(busy_until, end)
  return totals


def union_ns(intervals) -> int:
  total, end = 0, -1
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def profile(fn, args, calls: int, per_call: int, top: int = 4) -> dict:
  """Run ``calls`` calls of ``fn(*args)`` (after two warm-up calls), each running ``per_call``
  units of work (FFNs), first untraced (wall-clock and host-enqueue us per unit: with the host
  ahead, the enqueue time is the host's cost and the wall clock the GPU's), then traced: GPU-busy
  us per unit (union of kernel intervals), span (first kernel start to last end), kernel
  launches per unit, traced wall clock, the stream lines read, the ``top`` costliest kernels
  (``ns_per_launch``) and the launches the GPU idled longest before (``idle_ns_before``; the
  tracer slows the host, so idle time in a trace is an upper bound)."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  enqueued = time.perf_counter() - start
  jax.block_until_ready(out)
  untraced = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    host = time.perf_counter() - start
    events, lines = kernel_events(trace_dir)
  ffns = calls * per_call
  per_unit = lambda totals: {name[:90]: ns / 1e3 / ffns for name, ns in
                             sorted(totals.items(), key=lambda item: -item[1])[:top]}
  intervals = [(start, end) for start, end, _ in events]
  span = intervals[-1][1] - intervals[0][0] if intervals else 0
  return dict(device_us=union_ns(intervals) / 1e3 / ffns, span_us=span / 1e3 / ffns,
              kernels=len(intervals) / ffns, host_us=host * 1e6 / ffns,
              untraced_wall_us=untraced * 1e6 / ffns, enqueue_us=enqueued * 1e6 / ffns,
              lines=lines, by_kernel_us=per_unit(ns_per_launch(events, calls)),
              idle_before_us=per_unit(idle_ns_before(events, calls)))
