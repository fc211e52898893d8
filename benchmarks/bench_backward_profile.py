"""Where a training step's FFN time goes on the GPU: every kernel of fwd+bwd, from the profiler.

    PYTHONPATH=$PWD python3 benchmarks/bench_backward_profile.py --out $OUT [--shapes smollm2,gpt2-small]

For each shape (``bench_gpu.SHAPES``, M = 8192, bf16) and each ``--variants`` entry -- XLA
autodiff of the exact FFN, the library's default GPU plan with the PWL-16 activation, that plan
saving residuals="segments" or "floor-bits", with the ping-pong forward schedule (pairs,
segments or floor bits), the default plan with the exact activation (``exact``), the plan and
XLA without any activation (``identity``, ``xla-identity``: the GEMMs' floor, which bounds what
fusing an activation can gain over XLA), with one
staging slot per stored output, with d_hidden in bf16, with the dgrad epilogue kernel, with the
other hinge form (``EpilogueConfig.hinges``), with XLA's dot as GEMM2 (``Plan.down=None``) and
with GEMM2 on the epilogue kernel (``--down`` tiles) --
traces a jit of loss + gradients w.r.t. x and the weights (``bench_gpu.with_gradients``, whose
loss needs the forward's output before the backward, ``--independent-cotangent``: not; the
``pwl-grads*`` variants also w.r.t. the PWL's parameters, ``bench_gpu.with_pwl_gradients``) and
lists each kernel's GPU time per step, costliest first, with the GPU-busy total, the wall clock
of the same steps run back to back untraced, and the GPU's idle time before each launch
(``gpu_profile.profile``). ``--rounds N`` profiles every variant N times in turn and ends the
report with their GPU-busy times per round and median. ``--sets 3`` runs three input sets per
jit, as bench_gpu's timing does; ``--forward-only`` profiles the forward alone (the pwl-grads
variants still train); ``--biases`` adds fixed b_up (b_gate) and b_down to every FFN; ``--fit
pwl64-uniform`` profiles another PWL than PWL-16 (evenly spaced knots take the table lookup).
The floors to compare against: ``flops`` (9 GEMM units GLU, 6 MLP) at the measured matmul
peak. Writes ``backward-profile-<date><--tag>.json`` / ``.md`` after every variant
(``--dump-hlo``: and ``<shape>-<variant><--tag>.hlo.txt``, the compiled step).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import to_kernel_activation
from pallas_kernels.activation import Activation
from pallas_kernels.gpu import dispatch

sys.path.insert(0, os.path.dirname(__file__))
from report_files import write_json_and_markdown  # noqa: E402
from bench_gpu import (NO_BIASES, SHAPES, as_args, kernel_forward, make_sets,  # noqa: E402
                       with_cotangents, with_gradients, with_pwl_gradients, xla_forward)
from bench_down_projection import parse_config  # noqa: E402
from gpu_clocks import busy_clocks, sample  # noqa: E402
from gpu_profile import profile  # noqa: E402


def fusion_signatures(hlo_text: str, names) -> dict[str, str]:
  """``result type = operand types`` of each named instruction in a compiled HLO module (which
  GEMM, e.g., ``gemm_fusion_dot_general_14`` is)."""
  types = {m.group(1): m.group(2) for m in re.finditer(
      r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+?)(?:\{[0-9,]*\})? ", hlo_text, re.MULTILINE)}
  signatures = {}
  for name in names:
    for hlo_name in (name, re.sub(r"_(\d+)$", r".\1", name)):  # kernel names replace the "."
      match = re.search(rf"^\s*(?:ROOT )?%?{re.escape(hlo_name)} = \S+? [\w-]+\(([^)]*)\)",
                        hlo_text, re.MULTILINE)
      if match:
        operands = [types.get(op.strip().lstrip("%"), "?") for op in match.group(1).split(",")]
        signatures[name] = f"{types[hlo_name]} = " + ", ".join(operands)
        break
  return signatures


def gemm_signatures(hlo_text: str) -> dict[str, str]:
  """Every GEMM of the entry computation (cuBLAS custom calls and GEMM fusions) with its types:
  the cuBLAS kernels of a trace carry no HLO name, so they are matched to these by shape."""
  names = re.findall(r"^\s*(?:ROOT )?%?([\w.-]*(?:gemm|dot|custom-call)[\w.-]*) = ", hlo_text,
                     re.MULTILINE)
  return fusion_signatures(hlo_text, dict.fromkeys(names))


def rounds_table(results: list[dict]) -> list[str]:
  """Markdown lines: each (shape, variant)'s GPU-busy us per round and their median, where some
  variant ran in more than one round (``--rounds``); none otherwise."""
  by_variant = {}
  for r in results:
    by_variant.setdefault((r["shape"], r["variant"]), []).append(r)
  if all(len(rounds) < 2 for rounds in by_variant.values()):
    return []
  clocks = any("sm_clock_mhz" in r for r in results)
  lines = ["## GPU busy per step, us, by round" + (" (@ median SM clock, MHz)" if clocks else ""),
           "", "| shape | variant | rounds | median |", "|---|---|---|---:|"]
  at_clock = lambda r: f" @{r['sm_clock_mhz']:.0f}" if r.get("sm_clock_mhz") else ""
  for (shape, variant), rounds in by_variant.items():
    measured = [r["device_us"] for r in rounds if r.get("device_us") is not None]
    cells = " / ".join("failed" if r.get("device_us") is None else
                       f"{r['device_us']:.1f}{at_clock(r)}" for r in rounds)
    median = f"{float(np.median(measured)):.1f}" if measured else "—"
    lines.append(f"| {shape} | {variant} | {cells} | {median} |")
  return lines + [""]


def write_report(results: list[dict], out: str, command: str, tag: str = "",
                 what: str = "fwd+bwd") -> str:
  lines = [f"# {what} kernels on {jax.devices()[0].device_kind}", "", f"Command: `{command}`", ""]
  for r in results:
    sets = f" ({r['sets']} input sets per jit, times per set)" if r.get("sets", 1) > 1 else ""
    round_ = f" (round {r['round']})" if r.get("round", 1) > 1 else ""
    lines += [f"## {r['shape']} — {r['variant']}{sets}{round_}", ""]
    if "error" in r:
      lines += [f"failed: {r['error']}", ""]
      continue
    lines += [f"GPU busy {r['device_us']:.1f} us per step, {r['kernels']:.0f} kernels; untraced: "
              f"wall {r['untraced_wall_us']:.1f} us, host enqueue {r['enqueue_us']:.1f} us; "
              f"traced: span {r['span_us']:.1f} us, wall {r['host_us']:.1f} us", "",
              "| kernel | us per step | HLO (result = operands) |", "|---|---:|---|"]
    lines += [f"| `{name}` | {us:.1f} | `{r['hlo'].get(name, '')}` |"
              for name, us in r["by_kernel_us"].items()]
    lines += ["", "GPU idle (traced) before: " + ", ".join(
        f"`{name}` {us:.1f} us" for name, us in r["idle_before_us"].items() if us >= 0.5)]
    lines += ["", "GEMMs in the compiled step:", ""]
    lines += [f"- `{name}`: `{signature}`" for name, signature in r["gemms"].items()]
    lines.append("")
  lines += rounds_table(results)
  return write_json_and_markdown(
      out, f"backward-profile-{datetime.date.today().isoformat()}{tag}",
      {"device": jax.devices()[0].device_kind, "command": command, "results": results}, lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--shapes", default="smollm2,gpt2-small")
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--sets", type=int, default=1,
                      help="input sets (distinct x and dy) one jitted step runs, as bench_gpu's "
                           "timing does (3 at M = 8192); times are per set")
  parser.add_argument("--rounds", type=int, default=1,
                      help="profile every variant this many times, in turn (llama-1B's step "
                           "moved ~8%% between rounds on the H200); the report ends with each "
                           "variant's GPU-busy time per round and their median")
  parser.add_argument("--tag", default="", help="suffix of the report's file names")
  parser.add_argument("--log-clocks", action="store_true",
                      help="sample nvidia-smi's SM clock while each variant runs and report its "
                           "median (busy samples): rounds at different clocks are not comparable")
  parser.add_argument("--independent-cotangent", action="store_true",
                      help="loss <y, dy> alone (``bench_gpu.training_loss``): XLA may then run the "
                           "forward's GEMM2 after the backward; the default adds 1/2 |y|^2")
  parser.add_argument("--biases", action="store_true",
                      help="FFNs with b_up (b_gate) and b_down, as GPT-2's layers (fixed inputs, "
                           "not differentiated); XLA picks other GEMMs with a bias")
  parser.add_argument("--forward-only", action="store_true",
                      help="profile the forward alone (inference) instead of loss + gradients")
  parser.add_argument("--down", default="128x128x4:pingpong",
                      help="GEMM2 tiles of the kernel-down variant (bench_down_projection's form)")
  parser.add_argument("--dgrad", default=None,
                      help="the dgrad-lookup-residuals variant's dgrad kernel tiles, e.g. "
                           "128x128x3:pingpong (default: the plan's, or the ping-pong plans')")
  parser.add_argument("--dump-hlo", action="store_true",
                      help="also write each variant's compiled HLO module (which fusion computes "
                           "what, e.g. whether a GEMM fusion applies an activation to its operand)")
  parser.add_argument("--variants", default="xla,default,segments,dgrad",
                      help="which steps to profile: xla, default, pairs, segments, pingpong, "
                           "pingpong-segments, floor-bits, pingpong-floor-bits, pingpong-n64, "
                           "pingpong-segments-n64, exact, identity, xla-identity (no "
                           "activation: the GEMMs' floor under any fused activation), "
                           "per-output, dh16, dgrad, dgrad-floor-bits, "
                           "dgrad-pingpong, other-hinges (max <-> relu), xla-down (GEMM2 by "
                           "XLA's dot where the plan has down=), kernel-down (GEMM2 on --down), "
                           "no-lookup-residuals (an MLP's PWL saves floor bits, not h "
                           "and its segments), lookup-residuals (the opt-in GLU form), "
                           "dgrad-lookup-residuals (the same on the dgrad kernel), joint, "
                           "lookup-residuals-joint, dgrad-lookup-residuals-joint (a GLU's dgrad "
                           "kernel writes [d_g | d_u] as one array), chunked (the plan's "
                           "residuals, chunked backward), "
                           "pwl-grads (the dgrad kernel's bins where the plan has them), "
                           "pwl-grads-chunked, pwl-grads-wide (bins on 128 x 128 x 2 tiles), "
                           "pwl-grads-kres, pwl-grads-floor-bits, pwl-grads-floor-bits-kres")
  parser.add_argument("--fit", default="pwl16",
                      help="the PWL as a spec: pwl16, pwl64-uniform (evenly spaced: the plans "
                           "take the table lookup)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  command = "python3 benchmarks/bench_backward_profile.py " + " ".join(argv or sys.argv[1:])
  rng = np.random.default_rng(0)
  shapes = {shape.name: shape for shape in SHAPES}
  results = []
  for name in args.shapes.split(","):
    shape = shapes[name]
    arg_sets = with_cotangents([as_args(problem) for problem in make_sets(shape, rng)])
    arg_sets = arg_sets[:args.sets]
    pwl = to_kernel_activation(ff.from_spec(args.fit, shape.activation))
    biases = NO_BIASES
    if args.biases:  # b_up, b_gate (GLU), b_down in bf16, O(1)
      draw = lambda n: jnp.asarray(rng.standard_normal(n, np.float32), jnp.bfloat16)
      biases = (draw(shape.hidden), draw(shape.hidden) if shape.glu else None,
                draw(shape.d_model))
    forward_on = lambda act, plan: kernel_forward(act, plan, biases)
    xla_on = lambda act: xla_forward(act, biases)
    plan = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model, shape.glu,
                                True)
    exact_plan = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model,
                                      shape.glu, False)
    segments = dispatch.with_residuals(plan, shape.glu, "segments").epilogue
    pingpong = dispatch.pingpong_tiles(plan.epilogue, shape.glu)
    # half-width ping-pong tiles: half the unrolled epilogue code per warpgroup (gpt2-small's
    # 128 x 128 forward with segments stalls on instruction fetch, benchmarks/NOTES.md)
    narrow = dataclasses.replace(pingpong, tile_n=64)
    other_hinges = {"max": "relu", "relu": "max"}[plan.epilogue.hinges]
    dgrad_plan = dataclasses.replace(dispatch.with_residuals(plan, shape.glu, "floor-bits"),
                                     backward="epilogue", lookup_residuals=True)
    if args.dgrad is not None:  # these tiles whatever the residuals
      dgrad = dataclasses.replace(dispatch.DGRAD_PINGPONG, **{
          field: getattr(parse_config(args.dgrad), field)
          for field in ("tile_m", "tile_n", "stages", "schedule")})
      dgrad_plan = dataclasses.replace(dgrad_plan, dgrad=dgrad, segments_dgrad=dgrad)
    elif dgrad_plan.dgrad is None:  # the plan's chunked backward: the ping-pong plans' tiles
      dgrad_plan = dataclasses.replace(dgrad_plan, dgrad=dispatch.DGRAD_PINGPONG,
                                       segments_dgrad=dispatch.DGRAD_PINGPONG_WIDE)
    dgrad_tiles = lambda c: f"{c.tile_m}x{c.tile_n}x{c.stages} {c.schedule}"
    dependent = not args.independent_cotangent
    trainable = lambda segment_sums, residuals=plan.residuals, **changes: with_pwl_gradients(
        lambda act: forward_on(act, dataclasses.replace(
            dispatch.with_residuals(plan, shape.glu, residuals), segment_sums=segment_sums,
            **changes)), pwl, dependent)
    steps = {"pwl-grads": ("library default plan, also differentiated w.r.t. the PWL's slopes "
                           "and intercepts (trainable PWLs; the dgrad kernel's bins where "
                           "pwl_gradients_dgrad allows, else segment_sums='kernel')",
                           trainable("kernel")),
             "pwl-grads-chunked": ("same with the chunked backward's segment sums "
                                   "(pwl_gradients_dgrad=None)",
                                   trainable("kernel", pwl_gradients_dgrad=None)),
             "pwl-grads-wide": ("same with the dgrad kernel's bins on 128 x 128 x 2 ping-pong "
                                "tiles", trainable("kernel", pwl_gradients_dgrad=(
                                    dataclasses.replace(dispatch.DGRAD_PINGPONG_WIDE,
                                                        stages=2)))),
             "pwl-grads-kres": ("same with the segment sums reading the saved residuals "
                                "(segment_sums='kernel-residuals')", trainable("kernel-residuals")),
             "pwl-grads-floor-bits": ("same saving residuals='floor-bits' (segment sums on the "
                                      "joined p')", trainable("kernel", "floor-bits")),
             "pwl-grads-floor-bits-kres": ("same decoding the floor bits in the segment-sum "
                                           "kernel (segment_sums='kernel-residuals')",
                                           trainable("kernel-residuals", "floor-bits"))}
    variants = {"xla": ("xla exact (autodiff)", xla_on(Activation(shape.activation))),
                "default": (f"library default plan ({plan.path}, residuals={plan.residuals}), "
                            "PWL-16", forward_on(pwl, plan)),
                "pairs": ("same saving residuals='preactivations' ((hi, lo) pairs), PWL-16",
                          forward_on(pwl, dispatch.with_residuals(plan, shape.glu,
                                                                  "preactivations"))),
                "segments": (f"same saving residuals='segments' ({segments.tile_m}x"
                             f"{segments.tile_n} tiles), PWL-16",
                             forward_on(pwl, dispatch.with_residuals(plan, shape.glu,
                                                                     "segments"))),
                "pingpong": (f"same with the ping-pong forward ({pingpong.tile_m}x"
                             f"{pingpong.tile_n} tiles per warpgroup), PWL-16",
                             forward_on(pwl, dataclasses.replace(plan, epilogue=pingpong))),
                "pingpong-segments": ("same ping-pong forward saving residuals='segments', "
                                      "PWL-16", forward_on(pwl, dispatch.with_residuals(
                                          dataclasses.replace(plan, epilogue=pingpong),
                                          shape.glu, "segments"))),
                "floor-bits": ("same saving residuals='floor-bits', PWL-16 (knots rounded "
                               "to 15 bits)", forward_on(pwl, dispatch.with_residuals(
                                   plan, shape.glu, "floor-bits"))),
                "pingpong-floor-bits": ("same ping-pong forward saving residuals='floor-bits', "
                                        "PWL-16", forward_on(pwl, dataclasses.replace(
                                            plan, epilogue=pingpong, residuals="floor-bits"))),
                "pingpong-n64": (f"same ping-pong forward with {pingpong.tile_m}x64 tiles, "
                                 "PWL-16", forward_on(pwl, dataclasses.replace(
                                     plan, epilogue=narrow))),
                "pingpong-segments-n64": (f"same ping-pong forward with {pingpong.tile_m}x64 "
                                          "tiles saving residuals='segments', PWL-16",
                                          forward_on(pwl, dispatch.with_residuals(
                                              dataclasses.replace(plan, epilogue=narrow),
                                              shape.glu, "segments"))),
                "identity": ("library default plan (the PWL's tiles) without an activation "
                             "(identity; a GLU keeps its product): the kernels' GEMM floor",
                             forward_on(Activation("identity"), plan)),
                "xla-identity": ("xla without an activation (identity; a GLU keeps its "
                                 "product): XLA's GEMM floor", xla_on(Activation("identity"))),
                "exact": (f"library default plan ({exact_plan.path}, residuals="
                          f"{exact_plan.residuals}), exact activation",
                          forward_on(Activation(shape.activation), exact_plan)),
                "per-output": ("same with one SMEM staging slot per stored output "
                               "(staging='per_output'), PWL-16", forward_on(
                                   pwl, dataclasses.replace(plan, epilogue=dataclasses.replace(
                                       plan.epilogue, staging="per_output")))),
                "dh16": ("same with the chunked backward's d_hidden = dy W_down^T in x's dtype "
                         "(backward='xla', d_hidden='input'), PWL-16", forward_on(
                             pwl, dataclasses.replace(plan, backward="xla", d_hidden="input"))),
                "dgrad": ("same with the cooperative dgrad epilogue kernel "
                          "(backward='epilogue'), exact activation, pairs",
                          forward_on(Activation(shape.activation), dataclasses.replace(
                              plan, residuals="preactivations", backward="epilogue",
                              dgrad=None))),
                "dgrad-floor-bits": ("library plan with the cooperative dgrad kernel "
                                     "(backward='epilogue'), floor bits, PWL-16",
                                     forward_on(pwl, dataclasses.replace(
                                         dispatch.with_residuals(plan, shape.glu, "floor-bits"),
                                         backward="epilogue", dgrad=None))),
                "other-hinges": (f"library plan with {other_hinges} hinges, PWL-16",
                                 forward_on(pwl, dataclasses.replace(
                                     plan, epilogue=dataclasses.replace(
                                         plan.epilogue, hinges=other_hinges)))),
                "xla-down": ("library plan with XLA's dot as GEMM2 (down=None), PWL-16",
                             forward_on(pwl, dataclasses.replace(plan, down=None))),
                "kernel-down": (f"library plan with GEMM2 on the epilogue kernel ({args.down})",
                                forward_on(pwl, dataclasses.replace(
                                    plan, down=parse_config(args.down)))),
                "dgrad-pingpong": ("library plan with the ping-pong dgrad kernel "
                                   "(backward='epilogue'), floor bits, PWL-16",
                                   forward_on(pwl, dataclasses.replace(
                                       dispatch.with_residuals(plan, shape.glu, "floor-bits"),
                                       backward="epilogue", dgrad=dispatch.DGRAD_PINGPONG))),
                "no-lookup-residuals": ("library plan saving its residuals' kind where it would "
                                        "save h and the segments (lookup_residuals="
                                        "False), PWL-16",
                                        forward_on(pwl, dataclasses.replace(
                                            plan, lookup_residuals=False))),
                "lookup-residuals": ("library plan saving h and the segments (a GLU also "
                                     "act(g) and u; lookup_residuals=True), PWL-16",
                                     forward_on(pwl, dataclasses.replace(
                                         plan, lookup_residuals=True))),
                "dgrad-lookup-residuals": (
                    f"library plan with the dgrad kernel (backward='epilogue', "
                    f"{dgrad_tiles(dgrad_plan.dgrad)} tiles decoding floor bits, "
                    f"{dgrad_tiles(dgrad_plan.segments_dgrad or dgrad_plan.dgrad)} reading h and "
                    "the segments, a GLU also act(g) and u), PWL-16",
                    forward_on(pwl, dgrad_plan)),
                "chunked": ("library plan with the chunked backward on its residuals' kind "
                            "(backward='xla'), PWL-16", forward_on(pwl, dataclasses.replace(
                                plan, backward="xla"))),
                "dgrad-lookup-residuals-joint": (
                    "the dgrad-lookup-residuals plan with [d_g | d_u] as one array, PWL-16",
                    forward_on(pwl, dataclasses.replace(dgrad_plan, joint_glu_gradients=True)))}
    if plan.backward == "epilogue":  # a GLU's dgrad kernel writing [d_g | d_u] as one array
      variants.update({  # (what a chunked backward ignores)
          "joint": ("library plan with a GLU's [d_g | d_u] as one array "
                    "(joint_glu_gradients=True), PWL-16",
                    forward_on(pwl, dataclasses.replace(plan, joint_glu_gradients=True))),
          "lookup-residuals-joint": (
              "library plan saving act(g), u and the segments, [d_g | d_u] as one array, PWL-16",
              forward_on(pwl, dataclasses.replace(plan, lookup_residuals=True,
                                                  joint_glu_gradients=True)))})
    if args.forward_only:  # the forward alone; dy stays an argument, unused
      as_step = lambda forward: lambda x, wu, wd, wg, dy: forward(x, wu, wd, wg)
    else:
      as_step = lambda forward: with_gradients(forward, dependent)
    steps.update({key: (label, as_step(forward)) for key, (label, forward) in variants.items()})
    keys = args.variants.split(",")
    missing = [key for key in keys if key not in steps]
    if missing:
      raise ValueError(f"--variants: {missing} do not apply to {name}'s plan (joint and "
                       f"lookup-residuals-joint need its dgrad backward) or are unknown")
    jitted = {key: jax.jit(lambda sets, step=steps[key][1]: [step(*set_args) for set_args in sets])
              for key in keys}
    hlo_texts = {}
    clock_rows, stop_clocks = [], threading.Event()
    if args.log_clocks:
      threading.Thread(target=sample, args=(stop_clocks, clock_rows), daemon=True).start()
    for round_ in range(args.rounds):  # every variant once per round, in turn
      for key in keys:
        step = jitted[key]
        try:
          first_clock_row = len(clock_rows)
          record = profile(step, (arg_sets,), args.calls, len(arg_sets), top=40)
          if args.log_clocks:
            clocks = busy_clocks(clock_rows[first_clock_row:])
            record["sm_clock_mhz"] = float(np.median(clocks)) if clocks else None
          if key not in hlo_texts:
            hlo_texts[key] = step.lower(arg_sets).compile().as_text()
            if args.dump_hlo:
              with open(os.path.join(args.out, f"{name}-{key}{args.tag}.hlo.txt"), "w") as f:
                f.write(hlo_texts[key])
          record["hlo"] = fusion_signatures(hlo_texts[key], record["by_kernel_us"])
          record["gemms"] = gemm_signatures(hlo_texts[key])
        except Exception as error:  # noqa: BLE001 -- a failed variant is a result
          record = {"error": f"{type(error).__name__}: {error}"[:300]}
        record.update(shape=name, variant=steps[key][0].replace("PWL-16", args.fit),
                      rows=shape.rows, sets=len(arg_sets), fit=args.fit, round=round_ + 1)
        results.append(record)
        print(json.dumps(record)[:2000], flush=True)
        write_report(results, args.out, command, args.tag,
                     "forward" if args.forward_only else "fwd+bwd")
    stop_clocks.set()
  return 0


if __name__ == "__main__":
  sys.exit(main())
