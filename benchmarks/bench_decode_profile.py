"""Decode FFN time on the GPU itself (profiler), apart from the host's launch cost: run on the GPU.

    PYTHONPATH=$PWD python3 benchmarks/bench_decode_profile.py --out $OUT [--rows 16] [--sets 12]

At decode the FFN's GPU work is a few microseconds, so a wall-clock harness (bench_gpu.py) mostly
measures how fast the host issues launches: there a Mosaic GPU kernel that only copies x costs
~30 us, more than XLA's whole FFN (a jit dispatch per call; inside one jit a Mosaic launch costs
the host 3-8 us: bench_launch_cost.py). This script separates the two. For every variant one jit runs a
chain of ``--sets`` FFNs, each with its own weights (like layers; sets x weights > the 50 MB L2,
so weights stream from HBM), traces ``--calls`` calls with ``jax.profiler`` and reads the GPU's kernel events:
  device_us  -- union of kernel execution intervals per FFN (what the GPU is busy for);
  kernels    -- kernel launches per FFN;
  untraced_wall_us / host_us -- wall clock per FFN of the same calls run untraced / traced
                (launch cost included).
XLA's command buffers (CUDA graphs, on by default) change the wall clock, not the GPU time: run
once per ``XLA_FLAGS`` setting with a ``--tag``. Writes ``decode-profile-<date><tag>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import reference_ffn, to_kernel_activation, xla_padded_row
from pallas_kernels.activation import Activation
from pallas_kernels.gpu import decode_sm90, dispatch

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import decode_partials_only, mosaic_copy  # noqa: E402
from gpu_profile import profile  # noqa: E402
from report_files import write_json_and_markdown  # noqa: E402

SHAPES = {  # name: (D, H, GLU, exact activation)
    "smollm2": (576, 1536, True, "silu"),
    "gpt2-small": (768, 3072, False, "gelu"),
}


def weight_set(rng, d_model: int, hidden: int, glu: bool) -> tuple:
  """(w_up, w_down, w_gate or None) in bf16, each scaled by 1/sqrt(fan-in)."""
  draw = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(s[0]), jnp.bfloat16)
  return draw(d_model, hidden), draw(hidden, d_model), draw(d_model, hidden) if glu else None


def weights_stream(ctas: int):
  """A Mosaic GPU kernel that only reads one FFN's weights into SMEM, spread over ``ctas`` CTAs
  (CTA c: hidden columns [c w, (c + 1) w) of W_up and W_gate in 64-row K slices, the same rows
  of W_down in <= 256-column pieces; one barrier that every copy arrives at; then one small store
  so the launch has an output): the GPU time of a launch that streams the weights and does
  nothing else, a floor under any one-launch decode FFN with this split (H200: 3.31 us at
  SmolLM2, 48 CTAs; benchmarks/NOTES.md, thirty-second session)."""

  def stream(x, wu, wd, wg):
    del x
    (d_model, hidden), d_out = wu.shape, wd.shape[1]
    width, k_slices = hidden // ctas, d_model // 64
    piece = max(p for p in range(64, 257, 64) if d_out % p == 0)
    ups = [wu] if wg is None else [wu, wg]

    def kernel(*refs):
      up_gmems, (down_gmem, out_gmem) = refs[:len(ups)], refs[len(ups):len(ups) + 2]
      up_smems, (down_smem, barrier) = refs[len(ups) + 2:-2], refs[-2:]
      cols = pl.ds(lax.axis_index("c") * width, width)
      for k in range(k_slices):
        for gmem, smem in zip(up_gmems, up_smems):
          plgpu.copy_gmem_to_smem(gmem.at[pl.ds(k * 64, 64), cols], smem.at[k], barrier.at[0])
      for p in range(d_out // piece):
        plgpu.copy_gmem_to_smem(down_gmem.at[cols, pl.ds(p * piece, piece)], down_smem.at[p],
                                barrier.at[0])
      plgpu.barrier_wait(barrier.at[0])
      plgpu.copy_smem_to_gmem(up_smems[0].at[0], out_gmem.at[lax.axis_index("c")])
      plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((ctas, 64, width), wu.dtype), grid=(ctas,),
        grid_names=("c",),
        scratch_types=[*(plgpu.SMEM((k_slices, 64, width), wu.dtype) for _ in ups),
                       plgpu.SMEM((d_out // piece, width, piece), wu.dtype),
                       plgpu.Barrier(num_arrivals=k_slices * len(ups) + d_out // piece,
                                     num_barriers=1)])(*ups, wd)
  return stream


def variants(glu: bool, exact: str) -> dict:
  """name -> FFN(x, w_up, w_down, w_gate) on one weight set."""
  pwl = to_kernel_activation(ff.fit(exact, 16))
  xla = lambda act: lambda x, wu, wd, wg: reference_ffn(x, wu, wd, wg, None, None, None, act)
  kernel = lambda plan: lambda x, wu, wd, wg: dispatch.ffn_mosaic_gpu(
      x, wu, wd, wg, None, None, None, pwl, plan=plan)
  epilogue = dispatch.EPILOGUE_GLU_F16 if glu else dispatch.EPILOGUE_MLP_F16
  f16 = decode_sm90.DecodeConfig(64, pwl_dtype="float16")
  paired = kernel(dispatch.Plan("decode", decode=dataclasses.replace(f16, swap_ab=True,
                                                                     cluster_pairs=True)))
  decode = {f"b{block_h}-{pwl_dtype[5:]}": decode_sm90.DecodeConfig(block_h, pwl_dtype=pwl_dtype)
            for block_h in decode_sm90.BLOCK_WIDTHS for pwl_dtype in ("float32", "float16")}
  return {
      "xla-exact": xla(Activation(exact)),
      # the library's M = 1 default on GPUs (declines other M: recorded as an error)
      "xla-exact-rows-padded-to-8": lambda x, wu, wd, wg: xla_padded_row(
          x, wu, wd, wg, None, None, None, Activation(exact)),
      "xla-pwl16": xla(pwl),
      **{f"decode-pwl16-{name}": kernel(dispatch.Plan("decode", decode=config))
         for name, config in decode.items()},
      # one launch a FFN: the CTAs sum their partials (semaphores + TMA reduce-add)
      **{f"decode-pwl16-{name}-summed": kernel(dispatch.Plan(
          "decode", decode=dataclasses.replace(config, sum_in_kernel=True)))
         for name, config in decode.items()},
      # tokens on wgmma's N axis (64-column CTAs only), with the XLA sum and summed in the kernel
      **{f"decode-pwl16-{name}-swapped{tail}": kernel(dispatch.Plan("decode", decode=(
          dataclasses.replace(config, swap_ab=True, sum_in_kernel=bool(tail)))))
         for name, config in decode.items() if config.block_h == 64
         for tail in ("", "-summed")},
      # 2-CTA clusters share each hidden block: half of D and of D_out each, DSMEM exchange
      **{f"decode-pwl16-{name}-swapped-pairs": kernel(dispatch.Plan("decode", decode=(
          dataclasses.replace(config, swap_ab=True, cluster_pairs=True))))
         for name, config in decode.items() if config.block_h == 64},
      # the same at M rows padded to 16 (XLA sums [blocks, D_out, M] partials into [M, D_out]
      # in one fusion at M = 16 and 48, in two at M = 8 and 32: 12-04, thirtieth session)
      "decode-pwl16-b64-16-swapped-pairs-padded16": lambda x, wu, wd, wg: paired(
          jnp.pad(x, ((0, -x.shape[0] % 16), (0, 0))), wu, wd, wg)[:x.shape[0]],
      **{f"probe:decode-kernel-only-{name}": decode_partials_only(pwl, config)
         for name, config in decode.items()},
      "probe:decode-kernel-only-b64-16-2stages": decode_partials_only(
          pwl, decode_sm90.DecodeConfig(64, stages=2, pwl_dtype="float16")),
      # where the kernel's time goes: the same kernel with D_out = 64 (GEMM1 and the loads of
      # W_gate/W_up, little GEMM2 / store work) and with D = 64 (one K step, all of GEMM2)
      "probe:decode-kernel-only-b64-16-dout64": lambda x, wu, wd, wg: decode_partials_only(
          pwl, f16)(x, wu, wd[:, :64], wg),
      "probe:decode-kernel-only-b64-16-d64": lambda x, wu, wd, wg: decode_partials_only(
          pwl, f16)(x[:, :64], wu[:64], wd, None if wg is None else wg[:64]),
      "epilogue+xla-pwl16": kernel(dispatch.Plan("epilogue", epilogue=epilogue.epilogue)),
      "probe:mosaic-copy": mosaic_copy,
      **{f"probe:weights-stream-{ctas}-ctas": weights_stream(ctas) for ctas in (24, 48, 96, 192)},
  }


def write_report(results: list, args, command: str) -> str:
  """``decode-profile-<date><tag>.json`` / ``.md`` in ``args.out`` (rewritten after every variant,
  so a run cut short by a time limit keeps what it measured)."""
  date = datetime.date.today().isoformat()
  flags = os.environ.get("XLA_FLAGS", "")
  lines = [f"# Decode FFN, GPU time from the profiler ({jax.devices()[0].device_kind}, {date})",
           "", f"M = {args.rows}, {args.sets} chained FFNs per call, {args.calls} calls; "
           f"XLA_FLAGS=`{flags}`. device us: union of kernel intervals per FFN; wall us: wall "
           "clock per FFN, untraced (what a caller waits: the host's launches included) and "
           "traced.", "",
           "| shape | variant | device us | kernels | wall us untraced | wall us traced "
           "| device vs XLA exact | largest kernels (us per FFN) |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
  for r in results:
    base = next((b for b in results if b["shape"] == r["shape"] and b["variant"] == "xla-exact"
                 and b.get("device_us")), None)
    if "device_us" not in r:
      lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error'][:80]} | | | | | |")
      continue
    speedup = f"{base['device_us'] / r['device_us']:.2f}x" if base else "—"
    largest = ", ".join(f"{name} {us:.2f}" for name, us in r["by_kernel_us"].items())
    lines.append(f"| {r['shape']} | {r['variant']} | {r['device_us']:.2f} | {r['kernels']:.1f} "
                 f"| {r['untraced_wall_us']:.1f} | {r['host_us']:.1f} | {speedup} | {largest} |")
  return write_json_and_markdown(
      args.out, f"decode-profile-{date}{args.tag}",
      {"command": "python3 benchmarks/bench_decode_profile.py " + command, "xla_flags": flags,
       "results": results}, lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--sets", type=int, default=12)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--variants", help="comma-separated subset of the variant names")
  parser.add_argument("--tag", default="", help="suffix of the report's file names")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  results = []
  for name in args.shapes.split(","):
    d_model, hidden, glu, exact = SHAPES[name]
    weight_sets = [weight_set(rng, d_model, hidden, glu) for _ in range(args.sets)]
    x = jnp.asarray(rng.standard_normal((args.rows, d_model)), jnp.bfloat16)
    for variant, ffn in variants(glu, exact).items():
      if args.variants and variant not in args.variants.split(","):
        continue
      # a chain, as layers run: each FFN's output is the next one's input and each set's weights
      # are separate arguments. (A lax.map over stacked weights made XLA copy each slice, 7 us
      # per FFN; independent FFNs on one x let XLA concatenate their weights into one GEMM.)
      def over_sets(x, sets, ffn=ffn):
        probes = []  # outputs not shaped like x (probes) are kept alive but not chained
        for w in sets:
          y = ffn(x, *w)
          x, probes = (y, probes) if y.shape == x.shape else (x, probes + [y])
        return x, probes
      over_sets = jax.jit(over_sets)
      try:
        record = profile(over_sets, (x, weight_sets), args.calls, args.sets)
      except Exception as error:  # noqa: BLE001 -- a failed variant is a result
        record = {"error": f"{type(error).__name__}: {error}"[:300]}
      record.update(shape=name, variant=variant, rows=args.rows)
      results.append(record)
      print(json.dumps(record), flush=True)
      table = write_report(results, args, " ".join(argv or sys.argv[1:]))
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
