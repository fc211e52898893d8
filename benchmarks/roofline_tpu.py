"""Roofline MODEL of the fused FFN on TPU v5e / v6e against unfused XLA. Not a measurement: no
TPU was available; every number here comes from the formulas below and JAX's chip table.

For each model shape at M tokens (bf16, no biases) and each chip:
* fused: the tiling ``pallas_kernels.tpu.tiling.choose_tiling`` picks, and per kernel the MXU
  flops it executes (padding and the backward's recompute included), the HBM bytes its pipeline
  moves (plus the wrapper's pad/slice copies), and its modelled time
  max(flops / peak, bytes / bandwidth) + 0.35 µs per grid step + pipeline fill/drain.
* XLA: every matmul a separate kernel that reads each operand once and writes its output once in
  bf16, with every elementwise op (bias, activation, GLU product, their derivatives) fused into a
  neighbouring matmul -- XLA's best case. Training saves the pre-activations as residuals (MLP:
  z; GLU: z_gate, z_up) and reads them back in the backward. Time = Σ per matmul of
  max(flops / peak, bytes / bandwidth), with no launch overhead.
"% of peak" = useful flops (2 M H (n D + D_out) forward, 3x that for a training step) / (time x
peak). The activation's VPU work is not modelled (see benchmarks/NOTES.md).

  .venv/bin/python benchmarks/roofline_tpu.py [--tokens 8192] [--chips v5e v6e]
writes benchmarks/results/tpu-roofline.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from pallas_kernels.tpu import tiling

MODELS = {  # name: (D, H, GLU)
    "gpt2-small": (768, 3072, False),
    "SmolLM2-135M": (576, 1536, True),
    "llama-1B": (2048, 8192, True),
    "llama-8B": (4096, 14336, True),
}
PWL_SEGMENTS = 18  # a 16-segment PWL: 17 knots, 18 per-segment (slope, intercept) pairs
RESULTS = pathlib.Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Estimate:
  flops: float  # executed
  hbm_bytes: float
  seconds: float
  compute_bound: bool


def xla_estimate(p: tiling.Problem, training: bool, info) -> Estimate:
  """Σ over XLA's matmuls of max(flops / peak, bytes / bandwidth); n = weights before act.

  forward: n x [x W_in -> z] (MLP: act(z) fused; GLU: z_gate, z_up, or act(z_gate) * z_up fused
           into the second, the same bytes), then [hidden W_down -> y] reading n [M, H] tensors.
  backward: d = dy W_down^T reading the n residuals, writing the n dz's; dW_down = hidden^T dy;
            dx = Σ_i dz_i W_i^T; dW_i = x^T dz_i.
  """
  m, d, h, o, n = p.m, p.d, p.h, p.d_out, p.weights_in
  size = lambda rows, cols: float(rows * cols * p.itemsize)
  x, y, w_in, w_down, hidden = size(m, d), size(m, o), size(d, h), size(h, o), size(m, h)
  ops = [(2.0 * m * d * h, x + w_in + hidden)] * n + [(2.0 * m * h * o, n * hidden + w_down + y)]
  if training:
    ops += [(2.0 * m * o * h, y + w_down + 2 * n * hidden),  # d, and dz in its epilogue
            (2.0 * m * h * o, n * hidden + y + w_down),  # dW_down
            (2.0 * n * m * h * d, n * (hidden + w_in) + x),  # dx
            (2.0 * n * m * d * h, n * (x + hidden + w_in))]  # dW_in
  peak, bandwidth = info.bf16_ops_per_second, info.mem_bw_bytes_per_second
  flops, hbm = sum(f for f, _ in ops), sum(b for _, b in ops)
  return Estimate(flops, hbm, sum(max(f / peak, b / bandwidth) for f, b in ops),
                  flops / peak >= hbm / bandwidth)


def fused_estimate(p: tiling.Problem, chosen: tiling.Tiling, training: bool, info) -> Estimate:
  kernels = ("forward", *chosen.backward) if training else ("forward",)
  costs = [tiling.kernel_cost(kernel, p, getattr(chosen, kernel)) for kernel in kernels]
  peak, bandwidth = info.bf16_ops_per_second, info.mem_bw_bytes_per_second
  return Estimate(sum(c.flops for c in costs), sum(c.hbm_bytes for c in costs),
                  sum(c.seconds(info, p.itemsize) for c in costs),
                  all(c.flops / peak >= c.hbm_bytes / bandwidth for c in costs))


def rows(tokens: int, chips: list[str]) -> list[dict]:
  out = []
  for chip in chips:
    info = tiling.chip_info(chip)
    for model, (d, h, glu) in MODELS.items():
      problem = tiling.Problem(m=tokens, d=d, h=h, d_out=d, itemsize=2, glu=glu,
                               pwl_segments=PWL_SEGMENTS)
      chosen = tiling.choose_tiling(problem, info)
      for training in (False, True):
        useful = 2.0 * tokens * h * (problem.weights_in * d + d) * (3 if training else 1)
        fused, xla = fused_estimate(problem, chosen, training, info), xla_estimate(problem, training, info)
        percent = lambda e: 100.0 * useful / (e.seconds * info.bf16_ops_per_second)
        out.append(dict(
            chip=chip, model=model, D=d, H=h, glu=glu, tokens=tokens,
            step="fwd+bwd" if training else "forward", useful_gflop=useful / 1e9,
            blocks={k: [getattr(chosen, k).block_m, getattr(chosen, k).block_h]
                    for k in (("forward", *chosen.backward) if training else ("forward",))},
            fused_gflop=fused.flops / 1e9, fused_mb=fused.hbm_bytes / 1e6,
            fused_us=fused.seconds * 1e6, fused_peak_pct=percent(fused),
            fused_bound="compute" if fused.compute_bound else "memory",
            xla_gflop=xla.flops / 1e9, xla_mb=xla.hbm_bytes / 1e6, xla_us=xla.seconds * 1e6,
            xla_peak_pct=percent(xla), xla_bound="compute" if xla.compute_bound else "memory",
            speedup=xla.seconds / fused.seconds))
  return out


def markdown(table: list[dict], tokens: int, chips: list[str]) -> str:
  lines = [
      f"# TPU roofline MODEL: fused FFN vs unfused XLA, M = {tokens} tokens, bf16",
      "",
      "**This is a model, not a measurement: no TPU was available.** Generated by "
      "`benchmarks/roofline_tpu.py` from the tiling model in `pallas_kernels/tpu/tiling.py` and "
      "JAX's chip table (`jax._src.tpu_info`); assumptions in the script's docstring and in "
      "`benchmarks/NOTES.md` (TPU section).",
      "",
  ]
  for chip in chips:
    info = tiling.chip_info(chip)
    lines += [
        f"## {chip}: {info.bf16_ops_per_second / 1e12:.0f} TF/s bf16, "
        f"{info.mem_bw_bytes_per_second / 1e9:.0f} GB/s HBM, "
        f"{info.vmem_capacity_bytes >> 20} MiB VMEM "
        f"(ridge {info.bf16_ops_per_second / info.mem_bw_bytes_per_second:.0f} flops/byte)",
        "",
        "| model (D/H) | step | useful GFLOP | fused kernels: bm×bh | fused MXU GFLOP "
        "| fused HBM MB | fused µs | fused % peak | XLA HBM MB | XLA µs | XLA % peak | XLA µs / fused µs |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
      if r["chip"] != chip:
        continue
      blocks = ", ".join(f"{kernel} {bm}×{bh}" for kernel, (bm, bh) in r["blocks"].items())
      kind = "GLU" if r["glu"] else "MLP"
      lines.append(
          f"| {r['model']} ({r['D']}/{r['H']} {kind}) | {r['step']} | {r['useful_gflop']:.0f} "
          f"| {blocks} | {r['fused_gflop']:.0f} | {r['fused_mb']:.0f} | {r['fused_us']:.0f} "
          f"| {r['fused_peak_pct']:.0f}% ({r['fused_bound']}) | {r['xla_mb']:.0f} | {r['xla_us']:.0f} "
          f"| {r['xla_peak_pct']:.0f}% ({r['xla_bound']}) | {r['speedup']:.2f} |")
    lines.append("")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--chips", nargs="+", default=["v5e", "v6e"])
  args = parser.parse_args()
  table = rows(args.tokens, args.chips)
  text = markdown(table, args.tokens, args.chips)
  print(text)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "tpu-roofline.md").write_text(text)
  (RESULTS / "tpu-roofline.json").write_text(json.dumps(
      {"kind": "model, not a measurement", "tokens": args.tokens, "rows": table}, indent=1))


if __name__ == "__main__":
  main()
