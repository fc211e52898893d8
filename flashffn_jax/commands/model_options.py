"""Options shared by ``flashffn eval`` and ``flashffn generate``: which model, linearized how."""

from __future__ import annotations

import argparse
import re
import sys

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")
_SPEC = re.compile(r"^pwl(?P<segments>\d+)(?:-(?P<method>[a-z]+))?$")


def add_model_arguments(parser: argparse.ArgumentParser, *, default_model: str = "smollm2") -> None:
  from flashffn_jax.models import MODELS

  parser.add_argument("--model", default=default_model, choices=sorted(MODELS))
  parser.add_argument("--model-path", help="weights file instead of the installed package")
  parser.add_argument("--activation", default="exact",
                      help="exact (the model as trained), a PWL spec fitted to the model's own "
                           "activation (pwl16, pwl8-uniform, ...; pwl64-uniform: SmolLM2 within "
                           "0.02%% perplexity, one table lookup on Hopper), an exact name to "
                           "fuse, or a "
                           "fold calibrated on Shakespeare (fold, fold20, fold20-int2: see "
                           "flashffn_jax.fold)")
  parser.add_argument("--knot-range", type=float, nargs=2, metavar=("LO", "HI"),
                      help="knot span for a uniform/curvature spec, e.g. pwl16-uniform --knot-range -6 4")
  parser.add_argument("--checkpoint", metavar="DIR",
                      help="the --out directory of a `flashffn finetune` run (its newest checkpoint)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES)


def activation_choice(args: argparse.Namespace, base_activation: str):
  """What ``linearize`` gets for --activation/--knot-range (None: leave the model exact)."""
  from flashffn_jax.pwl import fit

  if args.knot_range is None:
    return None if args.activation == "exact" else args.activation
  match = _SPEC.match(args.activation)
  if not match or match["method"] not in ("uniform", "curvature"):
    raise ValueError(f"--knot-range: needs --activation pwlN-uniform or pwlN-curvature, got "
                     f"{args.activation!r}")
  return fit(base_activation, int(match["segments"]), match["method"], knot_range=tuple(args.knot_range))


def load_model(args: argparse.Namespace):
  """(model, tokenizer) as the options describe: loaded, then fine-tuned or linearized."""
  import flashffn_jax
  from flashffn_jax import models

  dtype = jnp.dtype(args.dtype)
  activation = activation_choice(args, models.MODELS[args.model].activation)
  if args.checkpoint:
    from flashffn_jax.finetune import CheckpointError, load_finetuned

    if activation is not None:
      raise ValueError("--checkpoint: the run's own activation is used; drop --activation/--knot-range")
    try:
      return load_finetuned(args.checkpoint, dtype=dtype)
    except CheckpointError as error:
      raise ValueError(f"--checkpoint: {error}") from error
  model, tokenizer = models.load(args.model, path=args.model_path, dtype=dtype)
  if activation is not None:
    from flashffn_jax.fold import calibrated

    model = flashffn_jax.linearize(model, calibrated(activation, args.model, tokenizer))
  return model, tokenizer


def fail(command: str, message: str) -> int:
  """Print ``flashffn COMMAND: error: message`` to stderr; the exit status 2."""
  print(f"flashffn {command}: error: {message}", file=sys.stderr)
  return 2
