"""Where the decode kernel's time goes inside one launch (Mosaic GPU's on-device profiler): run on
the GPU.

    PYTHONPATH=$PWD python3 benchmarks/profile_decode_kernel.py --out $OUT [--rows 16]

Runs ``decode_sm90.decode_ffn`` (through ``dispatch``) with ``DecodeConfig(profile_dir=...)``:
each CTA's warpgroup records its SM clock at the entry and exit of the kernel's named regions
(issue_loads, zero_accumulator, gemm1 with one wait_k_slice a K step, exchange (2-CTA
clusters), activation, wait_w_down, meet_zeroed, gemm2_chunk with one wait_store_slot a store,
meet_summed, convert, final_store_wait). The L2 is flushed (a 256 MB pass) before the profiled
launch, so the weights stream from HBM as in a model's decode step. Per region: the median over
CTAs of where it starts and how long it takes in total, in SM cycles and as a share of the CTA's
span (its first entry to its last exit), and how far apart the CTAs started (global timer). GPU
time of the same variants, unprofiled: ``bench_decode_profile.py``. Writes
``decode-kernel-profile-<date>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.gpu import decode_sm90, dispatch

sys.path.insert(0, os.path.dirname(__file__))
from bench_decode_profile import SHAPES, weight_set  # noqa: E402
from report_files import write_json_and_markdown  # noqa: E402

VARIANTS = {  # name: DecodeConfig fields (PWL-16 hinges in f16 throughout)
    "b64": dict(block_h=64), "b32": dict(block_h=32),
    "b64-summed": dict(block_h=64, sum_in_kernel=True),
    "b32-summed": dict(block_h=32, sum_in_kernel=True),
    "b64-swapped": dict(block_h=64, swap_ab=True),
    "b64-swapped-summed": dict(block_h=64, swap_ab=True, sum_in_kernel=True),
    "b64-swapped-pairs": dict(block_h=64, swap_ab=True, cluster_pairs=True),
}


def intervals(trace: dict) -> tuple[dict, dict]:
  """({cta: [(region, start, end), ...]}, {cta: start}) from a Mosaic GPU trace (nested B/E pairs
  per CTA). Times as the dump writes them: (the CTA's start on the global timer in ns + SM cycles
  since its first event) / 1e3, so kcycles within a CTA and us between CTAs' starts."""
  open_events, spans, first = collections.defaultdict(list), collections.defaultdict(list), {}
  for event in trace["traceEvents"]:
    cta = event["tid"]
    first.setdefault(cta, event["ts"])
    if event["ph"] == "B":
      open_events[cta].append(event)
    else:
      began = open_events[cta].pop()
      spans[cta].append((began["name"], began["ts"], event["ts"]))
  return spans, first


def summarize(trace: dict) -> dict:
  """Per region: medians over CTAs of its first start and total time (kcycles and % of the
  CTA's span), times entered per CTA; the CTAs' start spread (us, global timer)."""
  spans, first = intervals(trace)
  per_region = collections.defaultdict(lambda: collections.defaultdict(list))
  span_kcycles = []
  for cta, regions in spans.items():
    begin, end = min(r[1] for r in regions), max(r[2] for r in regions)
    span_kcycles.append(end - begin)
    totals = collections.defaultdict(lambda: [0.0, 0, None])
    for name, start, stop in regions:
      total = totals[name]
      total[0] += stop - start
      total[1] += 1
      total[2] = start - begin if total[2] is None else total[2]
    for name, (time, count, offset) in totals.items():
      per_region[name]["total"].append(time)
      per_region[name]["count"].append(count)
      per_region[name]["start"].append(offset)
      per_region[name]["share"].append(time / (end - begin))
  starts = np.array(list(first.values()))
  return {
      "ctas": len(spans),
      "span_kcycles_median": float(np.median(span_kcycles)),
      "span_kcycles_max": float(np.max(span_kcycles)),
      "cta_start_spread_us": float(starts.max() - starts.min()) if len(starts) else 0.0,
      "regions": {name: {"start_kcycles": float(np.median(v["start"])),
                         "total_kcycles": float(np.median(v["total"])),
                         "share": float(np.median(v["share"])),
                         "entries": float(np.median(v["count"]))}
                  for name, v in per_region.items()},
  }


def profile_variant(shape: str, variant: str, rows: int, rng) -> dict:
  """One profiled launch after an L2 flush; the launches before it compile and warm up."""
  d_model, hidden, glu, exact = SHAPES[shape]
  x = jnp.asarray(rng.standard_normal((rows, d_model), np.float32) / np.sqrt(rows), jnp.bfloat16)
  w_up, w_down, w_gate = weight_set(rng, d_model, hidden, glu)
  pwl = to_kernel_activation(ff.fit(exact, 16))
  flush = jnp.ones((64 * 2**20,), jnp.float32)
  with tempfile.TemporaryDirectory() as directory:
    config = decode_sm90.DecodeConfig(pwl_dtype="float16", profile_dir=directory,
                                      **VARIANTS[variant])
    ffn = jax.jit(lambda x, wu, wd, wg: dispatch.ffn_mosaic_gpu(
        x, wu, wd, wg, None, None, None, pwl, plan=dispatch.Plan("decode", decode=config)))
    for _ in range(3):
      ffn(x, w_up, w_down, w_gate).block_until_ready()
    (flush + 1).block_until_ready()
    for path in glob.glob(os.path.join(directory, "*-trace.json")):
      os.remove(path)
    ffn(x, w_up, w_down, w_gate).block_until_ready()
    jax.effects_barrier()  # the dump is a host callback
    (path,) = glob.glob(os.path.join(directory, "*-trace.json"))
    with open(path) as f:
      return summarize(json.load(f))


def write_report(results: list, out: str, command: str) -> str:
  date = datetime.date.today().isoformat()
  lines = [f"# Decode kernel, in-kernel profile ({jax.devices()[0].device_kind}, {date})", "",
           f"`python3 benchmarks/profile_decode_kernel.py {command}`. Medians over CTAs; kcycles "
           "are SM cycles / 1000 (at ~1.98 GHz, 1 kcycle ~ 0.5 us); share: of the CTA's span. "
           "One launch after an L2 flush.", ""]
  for r in results:
    if "error" in r:
      lines += [f"## {r['shape']} {r['variant']}: error {r['error'][:200]}", ""]
      continue
    lines += [f"## {r['shape']} M = {r['rows']}, {r['variant']}: {r['ctas']} CTAs, span "
              f"{r['span_kcycles_median']:.2f} kcycles (max {r['span_kcycles_max']:.2f}), CTA "
              f"starts {r['cta_start_spread_us']:.2f} us apart", "",
              "| region | starts at (kcycles) | total (kcycles) | share | entries |",
              "|---|---:|---:|---:|---:|"]
    for name, v in sorted(r["regions"].items(), key=lambda item: item[1]["start_kcycles"]):
      lines.append(f"| {name} | {v['start_kcycles']:.2f} | {v['total_kcycles']:.2f} | "
                   f"{100 * v['share']:.0f}% | {v['entries']:.0f} |")
    lines.append("")
  return write_json_and_markdown(out, f"decode-kernel-profile-{date}",
                                 {"command": command, "results": results}, lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  results = []
  for shape in args.shapes.split(","):
    for variant in args.variants.split(","):
      try:
        record = profile_variant(shape, variant, args.rows, rng)
      except Exception as error:  # noqa: BLE001 -- a failed variant is a result
        record = {"error": f"{type(error).__name__}: {error}"[:300]}
      record.update(shape=shape, variant=variant, rows=args.rows)
      results.append(record)
      print(json.dumps(record)[:300], flush=True)
      table = write_report(results, args.out, " ".join(argv or sys.argv[1:]))
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
