"""Tokens per second of ``flashffn generate`` on the real SmolLM2-135M: what a user gets.

    PYTHONPATH=$PWD python3 benchmarks/bench_generate.py --model-path smollm2.gguf --out $OUT
    PYTHONPATH=$PWD python3 benchmarks/bench_generate.py --tiny --out /tmp/x   # CPU smoke run

``bench_generate_step.py`` times ``decode_steps`` on random weights; this script runs the public
``models.generate`` host loop (prefill, k decode steps a jitted call, detokenising) on the model
``flashffn generate`` loads (GGUF weights dequantised, ``--dtypes``; ``--activations`` as its
``--activation``: exact, or a PWL spec linearizing every MLP), greedy, batch 1, without stopping at
EOS so every run makes exactly the tokens asked for. For every (dtype, activation, k) it runs
``generate`` once to compile, then times ``--repeats`` runs of ``--new-tokens`` tokens and of one
token (prefill and host set-up alone):

    ms per token = (median t(N) - median t(1)) / (N - 1)

and checks that k = 1 and every other k give the same text (they must: token n is sampled with
fold_in(key, n) whatever k is). Writes ``generate-<date><tag>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax

from flashffn_jax import models
from flashffn_jax.commands.model_options import load_model

sys.path.insert(0, os.path.dirname(__file__))
from report_files import write_json_and_markdown  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea,"
TINY = dict(new_tokens=6, repeats=1, tokens_per_call="1,2", dtypes="float32",
            activations="exact,pwl16", tag="-tiny")


def timed_generate(model, tokenizer, new_tokens: int, per_call: int, repeats: int):
  """(median seconds over ``repeats`` runs after one compiling run, the text)."""
  run = lambda: models.generate(model, tokenizer, PROMPT, new_tokens, stop_at_eos=False,
                                tokens_per_call=per_call)
  text = run()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds), text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-path", help="the SmolLM2 GGUF (default: the installed package's)")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tokens-per-call", default="1,8")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--activations", default="exact,pwl16,pwl64-uniform")
  parser.add_argument("--tag", default="")
  parser.add_argument("--tiny", action="store_true", help=f"CPU smoke run: {TINY} unless given")
  args = parser.parse_args(argv)
  if args.tiny:  # the namespace's values stand where no flag is given
    args = parser.parse_args(argv, namespace=argparse.Namespace(**TINY))
  per_calls = [int(k) for k in args.tokens_per_call.split(",")]
  rows = []
  for dtype in args.dtypes.split(","):
    for activation in args.activations.split(","):
      options = argparse.Namespace(model="smollm2", model_path=args.model_path,
                                   activation=activation, knot_range=None, checkpoint=None,
                                   dtype=dtype)
      model, tokenizer = load_model(options)
      prefill_s, _ = timed_generate(model, tokenizer, 1, 1, args.repeats)
      texts = {}
      for per_call in per_calls:
        seconds, texts[per_call] = timed_generate(model, tokenizer, args.new_tokens, per_call,
                                                  args.repeats)
        ms_per_token = 1e3 * (seconds - prefill_s) / (args.new_tokens - 1)
        row = dict(dtype=dtype, activation=activation, tokens_per_call=per_call,
                   new_tokens=args.new_tokens, seconds=seconds, prefill_seconds=prefill_s,
                   ms_per_token=ms_per_token, tokens_per_second=1e3 / ms_per_token,
                   same_text_as_first=texts[per_call] == texts[per_calls[0]],
                   text_start=texts[per_call][:80])
        rows.append(row)
        print(row, flush=True)
  device = jax.devices()[0].device_kind
  lines = [f"# `models.generate` on SmolLM2-135M, {device}", "",
           f"Command: `python3 benchmarks/bench_generate.py {' '.join(argv or sys.argv[1:])}`", "",
           f"Greedy, batch 1, prompt {PROMPT!r}, {args.new_tokens} new tokens, median of "
           f"{args.repeats}; ms per token = (t(N) - t(1)) / (N - 1).", "",
           "| dtype | activation | tokens a call | ms per token | tokens/s | prefill + set-up "
           "ms | same text as k = first |", "|---|---|---:|---:|---:|---:|---|"]
  lines += [f"| {r['dtype']} | {r['activation']} | {r['tokens_per_call']} | "
            f"{r['ms_per_token']:.2f} | {r['tokens_per_second']:.0f} | "
            f"{1e3 * r['prefill_seconds']:.1f} | {r['same_text_as_first']} |" for r in rows]
  lines += ["", "Text starts (first k):", ""]
  lines += [f"- {r['dtype']} {r['activation']}: {r['text_start']!r}" for r in rows
            if r["tokens_per_call"] == per_calls[0]]
  stem = f"generate-{datetime.date.today().isoformat()}{args.tag}"
  print(write_json_and_markdown(args.out, stem, {"device": device, "rows": rows}, lines))
  return 0 if all(r["same_text_as_first"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
