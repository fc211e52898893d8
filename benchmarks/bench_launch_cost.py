"""What one kernel launch costs the host: chains of tiny XLA and Mosaic GPU kernels: run on the GPU.

    PYTHONPATH=$PWD python3 benchmarks/bench_launch_cost.py --out $OUT [--chain 64] [--tag=-x]

Each variant is one jit of ``--chain`` dependent launches whose GPU work is ~1-2 us, so the
untraced wall clock per launch is what the host's launch path costs (when it exceeds the GPU's
time per launch, a loop of such launches leaves the GPU idle). Variants:
  xla-gemm        -- y <- y @ W_i (bf16 [16, 576] x [576, 576]): one cuBLAS / XLA GEMM kernel each;
  mosaic-copy-N   -- a Mosaic GPU kernel that copies y through SMEM by N TMA loads of N inputs
                     (N TMA descriptors, which Mosaic encodes on the host at every launch).
Run the script once per ``XLA_FLAGS`` setting (e.g. ``--xla_gpu_enable_command_buffer=`` turns
XLA's CUDA graphs off) with a ``--tag`` naming it: with command buffers on, launches that XLA
captures into a graph cost the host little, so the flag tells which launches a graph holds.
Writes ``launch-cost-<date><tag>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from report_files import write_json_and_markdown  # noqa: E402
from gpu_profile import profile  # noqa: E402

ROWS, COLUMNS = 16, 64  # the chained activation: one [16, 64] bf16 TMA box


def mosaic_copy(num_inputs: int):
  """y' = y through SMEM, with ``num_inputs - 1`` more inputs TMA-loaded beside it (unused):
  ``num_inputs`` load descriptors a launch."""

  def kernel(*refs):
    in_gmems, (out_gmem, smem, barrier) = refs[:num_inputs], refs[num_inputs:]
    for i, ref in enumerate(in_gmems):
      plgpu.copy_gmem_to_smem(ref.at[:, :COLUMNS], smem.at[i], barrier.at[0])
    plgpu.barrier_wait(barrier.at[0])
    plgpu.copy_smem_to_gmem(smem.at[0], out_gmem)
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((ROWS, COLUMNS), jnp.bfloat16),
      scratch_types=[plgpu.SMEM((num_inputs, ROWS, COLUMNS), jnp.bfloat16),
                     plgpu.Barrier(num_arrivals=num_inputs, num_barriers=1)])


def chains(chain: int, rng) -> dict:
  """name -> (jitted fn, args): ``chain`` dependent launches per call."""
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(shape[0]),
                                    jnp.bfloat16)
  y0 = draw(ROWS, COLUMNS)
  weights = draw(chain, COLUMNS, COLUMNS)

  def gemm_chain(y, weights):
    for i in range(chain):  # unrolled: one GEMM launch each
      y = y @ weights[i]
    return y

  out = {"xla-gemm": (jax.jit(gemm_chain), (y0, weights))}
  for num_inputs in (1, 8):
    copy = mosaic_copy(num_inputs)
    zeros = [jnp.zeros((ROWS, 128), jnp.bfloat16)] * (num_inputs - 1)

    def copy_chain(y, zeros, copy=copy):
      for _ in range(chain):
        y = copy(y, *zeros)
      return y

    out[f"mosaic-copy-{num_inputs}"] = (jax.jit(copy_chain), (y0, zeros))
  return out


def write_report(results: list, args, command: str) -> str:
  lines = [f"# Launch cost on {jax.devices()[0].device_kind}", "",
           f"Command: `{command}`; XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`", "",
           f"{args.chain} dependent launches per jit call, {args.calls} calls; per launch:", "",
           "| variant | wall us (untraced) | host enqueue us | GPU busy us | kernels |",
           "|---|---:|---:|---:|---:|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['variant']} | error: {r['error'][:120]} | | | |")
      continue
    lines.append(f"| {r['variant']} | {r['untraced_wall_us']:.2f} | {r['enqueue_us']:.2f} | "
                 f"{r['device_us']:.2f} | {r['kernels']:.2f} |")
  return write_json_and_markdown(
      args.out, f"launch-cost-{datetime.date.today().isoformat()}{args.tag}",
      {"device": jax.devices()[0].device_kind, "command": command,
       "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}, lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--chain", type=int, default=64)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--tag", default="", help="suffix of the report's file names")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  command = "python3 benchmarks/bench_launch_cost.py " + " ".join(argv or sys.argv[1:])
  results = []
  for name, (fn, fn_args) in chains(args.chain, np.random.default_rng(0)).items():
    try:
      record = profile(fn, fn_args, args.calls, args.chain)
    except Exception as error:  # noqa: BLE001 -- a failed variant is a result
      record = {"error": f"{type(error).__name__}: {error}"[:300]}
    record["variant"] = name
    results.append(record)
    text = write_report(results, args, command)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
