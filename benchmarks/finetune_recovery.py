"""Recovery proof: linearize SmolLM2 with PWL-16/8/4, fine-tune each, report the perplexities.

    PYTHONPATH=$PWD python3 benchmarks/finetune_recovery.py --out DIR [--model-path GGUF]
        [--activations pwl16,pwl8,pwl4] [--steps 300] [--throughput-steps 30]

For each activation: validation perplexity (held-out Shakespeare plays) of the exact model,
the linearized model before and after fine-tuning, the % of the log-perplexity gap recovered,
tokens and wall time; and the perplexity on a text the loop never sees (the Python language
reference shipped with CPython, ``pydoc_data.topics``) to check for cross-domain regressions.
Training throughput (tokens/s, median step after warm-up) of each run (default FFN
implementation: the fused kernel where one serves) and of the same loop whose FFNs run the exact
activation on XLA. Writes recovery-<activations>.json under --out and prints the table last;
``--render A.json B.json`` merges several such files into finetune-recovery-<date>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import pydoc_data.topics

import flashffn_jax as ff
from flashffn_jax import models
from flashffn_jax.finetune import FinetuneConfig, finetune, load_finetuned
from flashffn_jax.surgery import linearize

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gpu_profile import kernel_events, ns_per_launch, union_ns  # noqa: E402


def reference_text_tokens(tokenizer) -> np.ndarray:
  """The Python language reference (prose + code), tokenised: not Shakespeare, never trained on."""
  text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
  return np.asarray(tokenizer.encode(text).ids, np.int32)


WARMUP_STEPS = 2  # steps a speed reading skips (compilation, warm-up)


def median_tokens_per_s(out: pathlib.Path) -> float:
  """Median training tokens/s of a run after its first ``WARMUP_STEPS`` steps."""
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return statistics.median(r["tokens_per_s"] for r in rows
                           if r["split"] == "train" and r["step"] > WARMUP_STEPS)


def speed_config(args, out: pathlib.Path, activation: str, steps: int) -> FinetuneConfig:
  """A run of the loop for its speed only: no evaluation or checkpoint along the way."""
  return FinetuneConfig(out=str(out), activation=activation, steps=steps,
                        batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=1,
                        eval_every=10**6, eval_batches=1, checkpoint_every=10**6,
                        keep_checkpoints=1, trainable=args.trainable, model_path=args.model_path,
                        compute_dtype=args.compute_dtype, learning_rate=args.learning_rate,
                        pwl_learning_rate=args.pwl_learning_rate)


def traced_loop(run, steps: int, top: int = 15) -> dict:
  """GPU time of training steps ``WARMUP_STEPS + 2 .. WARMUP_STEPS + steps + 1`` of
  ``run(on_metrics)`` (a loop of ``WARMUP_STEPS + steps + 1`` steps) under ``jax.profiler``:
  compilation, warm-up and evaluations stay out of the trace. The loop logs a step's row once it
  has dispatched the next one, so the trace starts and stops with no step in flight (the device
  drained at both ends). Returns busy ms per step (union of kernel intervals), kernel launches
  per step and the ``top`` kernels by total ms per step. Set against the loop's wall clock per
  step, it says whether a slower loop does more GPU work or leaves the GPU idle."""
  drain = lambda: jax.block_until_ready(jax.live_arrays())
  with tempfile.TemporaryDirectory() as trace_dir:
    def window(row: dict) -> None:
      if row["split"] == "train" and row["step"] == WARMUP_STEPS:
        drain()  # step WARMUP_STEPS + 1, dispatched before this row, stays out
        jax.profiler.start_trace(trace_dir)
      elif row["split"] == "train" and row["step"] == WARMUP_STEPS + steps:
        drain()  # step WARMUP_STEPS + steps + 1 is the trace's last
        jax.profiler.stop_trace()
    run(window)
    events, _ = kernel_events(trace_dir)
  by_name = sorted(ns_per_launch(events, 0).items(), key=lambda item: -item[1])[:top]
  return {"busy_ms_per_step": union_ns([(a, b) for a, b, _ in events]) / 1e6 / steps,
          "kernels_per_step": len(events) / steps,
          "top_kernels_ms_per_step": {name[:80]: ns / 1e6 / steps for name, ns in by_name}}


def ffn_implementation(base, student, args) -> str:
  """The implementation the op picks for one training micro-batch of this model's FFNs."""
  config = base.config
  dtype = jax.numpy.dtype(args.compute_dtype)
  array = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return ff.chosen_implementation(
      array(args.batch_size * args.seq_len, config.hidden_size), array(config.hidden_size, config.intermediate_size),
      array(config.intermediate_size, config.hidden_size), w_gate=array(config.hidden_size, config.intermediate_size),
      activation=student.layers[0].mlp.activation)


def render(summaries: list[dict]) -> str:
  """One markdown report from the JSON of one or more runs of this script."""
  first = summaries[0]
  args = first["args"]
  lines = [f"# Fine-tune recovery, SmolLM2-135M, {first['device']}, {first['date']}", "",
           f"Command: `{first['command']}` (one invocation per row group). Trainable: {args['trainable']}, "
           f"{args['steps']} steps x {args['batch_size']} x {args['seq_len']} tokens, lr {args['learning_rate']} "
           f"(weights) / {args['pwl_learning_rate']} (PWL). Validation: {args['eval_batches']} batches of the held-out "
           "Shakespeare plays. Other domain: the Python language reference (pydoc_data.topics), never "
           "trained on.", "",
           "| activation | exact ppl | linearized | fine-tuned | lin. vs exact | ft vs exact | gap recovered "
           "| other-domain ppl exact / lin. / ft | tokens | seconds | train tokens/s | FFN implementation |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for summary in summaries:
    for r in summary["rows"]:
      lines.append(f"| {r['activation']} | {r['exact_ppl']:.3f} | {r['linearized_ppl']:.3f} | "
                   f"{r['finetuned_ppl']:.3f} | {100 * r['linearized_vs_exact']:+.2f}% | "
                   f"{100 * r['finetuned_vs_exact']:+.2f}% | {100 * r['recovered']:.1f}% | "
                   f"{r['reference_exact_ppl']:.2f} / {r['reference_linearized_ppl']:.2f} / "
                   f"{r['reference_finetuned_ppl']:.2f} | {r['tokens']} | {r['seconds']:.0f} | "
                   f"{r['tokens_per_s']:.0f} | {r['ffn_implementation']} |")
  for summary in summaries:
    if summary.get("exact_xla_tokens_per_s"):
      lines += ["", f"Training throughput of the same loop with exact-activation FFNs on XLA "
                    f"(`linearize(model, 'exact', implementation='xla')`): "
                    f"{summary['exact_xla_tokens_per_s']:.0f} tokens/s; the PWL runs above use the "
                    "default implementation (the fused kernel where its tuned table picks it)."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--model-path")
  parser.add_argument("--activations", default="pwl16,pwl8,pwl4")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--trainable", default="ffn")
  parser.add_argument("--learning-rate", type=float, default=1e-5)
  parser.add_argument("--pwl-learning-rate", type=float, default=3e-3)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--reference-tokens", type=int, default=16384, help="tokens of the other-domain text")
  parser.add_argument("--throughput-steps", type=int, default=30,
                      help="steps of the exact-XLA throughput run (0: skip)")
  parser.add_argument("--trace-steps", type=int, default=0,
                      help="also trace this many steps of the --trace-loops (GPU-busy ms per "
                           "step, costliest kernels; 0: skip)")
  parser.add_argument("--trace-loops", default="trained,exact-xla",
                      help="which loops --trace-steps traces: trained (each activation, PWL "
                           "learnable), frozen (each activation, linearize(..., learnable=False): "
                           "with --trainable ffn the weights alone train), exact-xla")
  parser.add_argument("--trace-only", action="store_true",
                      help="skip the recovery and throughput runs: only the --trace-steps loops "
                           "(each compiles its own step: on the H200 ~1 min with exact XLA FFNs, ~4 min "
                           "with the Mosaic kernels)")
  parser.add_argument("--render", nargs="+", metavar="JSON", help="only merge these result files into markdown")
  args = parser.parse_args(argv)
  if args.trace_only and not args.trace_steps:
    parser.error("--trace-only traces the loops: give --trace-steps > 0")
  unknown = set(args.trace_loops.split(",")) - {"trained", "frozen", "exact-xla"}
  if unknown:
    parser.error(f"--trace-loops: expected trained, frozen or exact-xla, got {sorted(unknown)}")
  out = pathlib.Path(args.out)
  if args.render:
    text = render([json.loads(pathlib.Path(p).read_text()) for p in args.render])
    (out / f"finetune-recovery-{time.strftime('%Y-%m-%d')}.md").write_text(text)
    print(text)
    return 0
  out.mkdir(parents=True, exist_ok=True)
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"

  base, tokenizer = models.load("smollm2", path=args.model_path, dtype=args.compute_dtype)
  reference = reference_text_tokens(tokenizer)[:args.reference_tokens + 1]
  ref_ppl = lambda model: models.perplexity(model, reference, seq_len=args.seq_len, batch_size=8)["ppl"]
  rows = []
  summary = {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
             "command": "python3 benchmarks/finetune_recovery.py " + " ".join(argv or sys.argv[1:]),
             "rows": rows}
  result_file = out / f"recovery-{args.activations.replace(',', '-')}.json"
  if not args.trace_only:  # the recovery runs and the exact-XLA throughput run
    exact_reference = ref_ppl(base)
    for activation in args.activations.split(","):
      config = FinetuneConfig(out=str(out / activation), model_path=args.model_path, activation=activation,
                              trainable=args.trainable, steps=args.steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, learning_rate=args.learning_rate,
                              pwl_learning_rate=args.pwl_learning_rate, compute_dtype=args.compute_dtype,
                              warmup_steps=max(1, args.steps // 20), eval_every=max(1, args.steps // 5),
                              eval_batches=args.eval_batches, checkpoint_every=args.steps, keep_checkpoints=1)
      student = linearize(base, activation, learnable=True)
      before_reference = ref_ppl(student)
      tic = time.perf_counter()
      result = finetune(config, progress=False, built=(base, student, tokenizer))
      seconds = time.perf_counter() - tic
      after_reference = ref_ppl(load_finetuned(config.out)[0])
      rows.append({"activation": activation, "exact_ppl": result.exact_ppl,
                   "linearized_ppl": result.linearized_ppl, "finetuned_ppl": result.finetuned_ppl,
                   "linearized_vs_exact": result.linearized_ppl / result.exact_ppl - 1,
                   "finetuned_vs_exact": result.finetuned_ppl / result.exact_ppl - 1,
                   "recovered": result.recovered, "tokens": result.tokens_trained, "seconds": seconds,
                   "reference_exact_ppl": exact_reference, "reference_linearized_ppl": before_reference,
                   "reference_finetuned_ppl": after_reference,
                   "tokens_per_s": median_tokens_per_s(pathlib.Path(config.out)),
                   "ffn_implementation": ffn_implementation(base, student, args)})
      print(json.dumps(rows[-1]), flush=True)
      result_file.write_text(json.dumps(summary, indent=1))  # a run cut short keeps its rows
    if args.throughput_steps:
      exact = speed_config(args, out / "speed-exact-xla", "exact", args.throughput_steps)
      finetune(exact, progress=False, built=(base, linearize(base, "exact", implementation="xla"), tokenizer))
      summary["exact_xla_tokens_per_s"] = median_tokens_per_s(pathlib.Path(exact.out))
  if args.trace_steps:
    loops = {}  # in --trace-loops order
    for kind in args.trace_loops.split(","):
      if kind == "exact-xla":
        loops[kind] = ("exact", linearize(base, "exact", implementation="xla"))
        continue
      for name in args.activations.split(","):
        # frozen: the PWL a constant, the weights alone train (the dgrad kernel's backward)
        loops[name + ("-frozen" if kind == "frozen" else "")] = (
            name, linearize(base, name, learnable=kind == "trained"))
    summary["traces"] = {}
    for name, (activation, model) in loops.items():
      config = speed_config(args, out / f"trace-{name}", activation,
                            WARMUP_STEPS + args.trace_steps + 1)
      summary["traces"][name] = traced_loop(
          lambda window: finetune(config, progress=False, built=(base, model, tokenizer),
                                  on_metrics=window), args.trace_steps)
      summary["traces"][name]["traced_tokens_per_s"] = median_tokens_per_s(pathlib.Path(config.out))
      print(json.dumps({name: summary["traces"][name]}), flush=True)
  result_file.write_text(json.dumps(summary, indent=1))
  lines = render([summary]).splitlines()
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
