"""Recovery proof: linearize SmolLM2 with PWL-16/8/4, fine-tune each, report the perplexities.

    PYTHONPATH=$PWD python3 benchmarks/finetune_recovery.py --out DIR [--model-path GGUF]
        [--activations pwl16,pwl8,pwl4] [--steps 300] [--throughput-steps 30]

For each activation: validation perplexity (held-out Shakespeare plays) of the exact model,
the linearized model before and after fine-tuning, the % of the log-perplexity gap recovered,
tokens and wall time; and the perplexity on a text the loop never sees (the Python language
reference shipped with CPython, ``pydoc_data.topics``) to check for cross-domain regressions.
Then training throughput (tokens/s, median step after warm-up) of the linearized model on the
default FFN implementation (the fused kernel where one serves) against the same loop whose FFNs
run the exact activation on XLA. Writes recovery.json / recovery.md under --out and prints the
table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import numpy as np
import pydoc_data.topics

from flashffn_jax import models
from flashffn_jax.finetune import FinetuneConfig, finetune, load_finetuned
from flashffn_jax.surgery import linearize


def reference_text_tokens(tokenizer) -> np.ndarray:
  """The Python language reference (prose + code), tokenised: not Shakespeare, never trained on."""
  text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
  return np.asarray(tokenizer.encode(text).ids, np.int32)


def throughput(config: FinetuneConfig, built: tuple) -> float:
  """Median training tokens/s over the steps after the first (compilation) of a short run."""
  finetune(config, progress=False, built=built)
  rows = [json.loads(line) for line in (pathlib.Path(config.out) / "metrics.jsonl").read_text().splitlines()]
  return statistics.median(r["tokens_per_s"] for r in rows if r["split"] == "train" and r["step"] > 2)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--model-path")
  parser.add_argument("--activations", default="pwl16,pwl8,pwl4")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--trainable", default="ffn")
  parser.add_argument("--learning-rate", type=float, default=3e-5)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--reference-tokens", type=int, default=16384, help="tokens of the other-domain text")
  parser.add_argument("--throughput-steps", type=int, default=30)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"

  base, tokenizer = models.load("smollm2", path=args.model_path)
  reference = reference_text_tokens(tokenizer)[:args.reference_tokens + 1]
  ref_ppl = lambda model: models.perplexity(model, reference, seq_len=args.seq_len, batch_size=8)["ppl"]
  exact_reference = ref_ppl(base)
  rows = []
  for activation in args.activations.split(","):
    config = FinetuneConfig(out=str(out / activation), model_path=args.model_path, activation=activation,
                            trainable=args.trainable, steps=args.steps, batch_size=args.batch_size,
                            seq_len=args.seq_len, learning_rate=args.learning_rate,
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
                 "reference_finetuned_ppl": after_reference})
    print(json.dumps(rows[-1]), flush=True)

  speed = {}
  if args.throughput_steps:
    short = dict(steps=args.throughput_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                 warmup_steps=1, eval_every=10**6, eval_batches=1, checkpoint_every=10**6,
                 keep_checkpoints=1, trainable=args.trainable, model_path=args.model_path)
    pwl = FinetuneConfig(out=str(out / "speed-pwl16"), activation="pwl16", **short)
    speed["pwl16_default_impl"] = throughput(pwl, (base, linearize(base, "pwl16", learnable=True), tokenizer))
    exact = FinetuneConfig(out=str(out / "speed-exact-xla"), activation="exact", **short)
    speed["exact_xla"] = throughput(exact, (base, linearize(base, "exact", implementation="xla"), tokenizer))
    speed["ratio"] = speed["pwl16_default_impl"] / speed["exact_xla"]

  summary = {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows,
             "throughput_tokens_per_s": speed}
  (out / "recovery.json").write_text(json.dumps(summary, indent=1))
  lines = [f"# Fine-tune recovery, SmolLM2-135M, {device}, {summary['date']}", "",
           f"Trainable: {args.trainable}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
           f"lr {args.learning_rate}. Validation: held-out Shakespeare plays. Other domain: Python "
           "language reference (pydoc_data.topics), never trained on.", "",
           "| activation | exact ppl | linearized | fine-tuned | lin. vs exact | ft vs exact | gap recovered "
           "| other-domain exact / lin. / ft | tokens | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['activation']} | {r['exact_ppl']:.3f} | {r['linearized_ppl']:.3f} | "
                 f"{r['finetuned_ppl']:.3f} | {100 * r['linearized_vs_exact']:+.2f}% | "
                 f"{100 * r['finetuned_vs_exact']:+.2f}% | {100 * r['recovered']:.1f}% | "
                 f"{r['reference_exact_ppl']:.2f} / {r['reference_linearized_ppl']:.2f} / "
                 f"{r['reference_finetuned_ppl']:.2f} | {r['tokens']} | {r['seconds']:.0f} |")
  if speed:
    lines += ["", f"Training throughput: linearized PWL-16 on the default FFN implementation "
                  f"{speed['pwl16_default_impl']:.0f} tokens/s vs exact activation on XLA "
                  f"{speed['exact_xla']:.0f} tokens/s (ratio {speed['ratio']:.2f})."]
  (out / "recovery.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
