"""flashffn generate --model smollm2 --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
[--top-p P] [--seed S] [--tokens-per-call N] [--chat] [--activation pwl16] [--checkpoint DIR] [--json]

Streams the continuation to stdout (greedy at temperature 0). --chat wraps the prompt in
SmolLM2-Instruct's chat format and stops at <|im_end|>.
"""

from __future__ import annotations

import argparse
import json
import time

from flashffn_jax.commands.model_options import add_model_arguments, fail, load_model

CHAT_TEMPLATE = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-k", type=int)
  parser.add_argument("--top-p", type=float)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tokens-per-call", type=int, default=8,
                      help="decode steps per jitted call (the text is the same for any value; "
                      "fewer streams more smoothly, more costs the host less)")
  parser.add_argument("--chat", action="store_true", help="use the instruct model's chat format")
  parser.add_argument("--json", action="store_true", help="print one JSON object at the end")


def run(args: argparse.Namespace) -> int:
  from flashffn_jax import models

  if models.MODELS[args.model].kind != "causal-lm":
    return fail("generate", f"--model: {args.model} is a sentence encoder, it cannot generate text")
  prompt = CHAT_TEMPLATE.format(prompt=args.prompt) if args.chat else args.prompt
  stream = None if args.json else lambda piece: print(piece, end="", flush=True)
  try:
    model, tokenizer = load_model(args)
    if stream is not None and not args.chat:
      stream(args.prompt)
    start = time.perf_counter()
    text = models.generate(model, tokenizer, prompt, args.max_new_tokens, args.temperature,
                           args.top_k, args.top_p, args.seed, on_text=stream,
                           tokens_per_call=args.tokens_per_call)
  except (ValueError, FileNotFoundError) as error:
    return fail("generate", str(error))
  seconds = time.perf_counter() - start
  if args.json:
    print(json.dumps({"model": args.model, "activation": args.activation, "prompt": args.prompt,
                      "text": text, "seconds": seconds}))
  else:
    print()
  return 0
