"""flashffn finetune --model smollm2 --activation pwl16 --steps N --out DIR [--resume] ...

Linearizes the model, distils it from its exact self on the Shakespeare training split, and
prints the exact / linearized / fine-tuned validation perplexities side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing

from flashffn_jax.finetune.config import COMPUTE_DTYPES, SHARDING, TRAINABLE, FinetuneConfig

_CHOICES = {"trainable": TRAINABLE, "compute_dtype": COMPUTE_DTYPES, "sharding": SHARDING}
_HELP = {
    "out": "run directory: checkpoints/, metrics.jsonl, summary.json, recovery.png",
    "model": "model name (smollm2)",
    "model_path": "explicit weights file instead of the installed package",
    "activation": "what replaces each MLP activation: pwl16, pwl8-uniform, ...",
    "trainable": "what trains: all weights, FFN weights (+PWL), FFN weights (PWL held), PWL only, or LoRA adapters (+PWL)",
    "batch_size": "sequences per optimizer step",
    "grad_accum": "micro-batches per step (gradient accumulation)",
    "seq_len": "tokens per training window",
    "kl_weight": "weight of KL(teacher || student)",
    "ce_weight": "weight of next-token cross-entropy",
    "ffn_match_weight": "weight of the per-layer FFN-output matching term",
    "compute_dtype": "bfloat16 = mixed precision with float32 master weights",
    "sharding": "data parallel, or fsdp (also shard parameters over devices)",
    "max_train_windows": "use only the first N training windows",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  hints = typing.get_type_hints(FinetuneConfig)
  for field in dataclasses.fields(FinetuneConfig):
    flag = "--" + field.name.replace("_", "-")
    kind = hints[field.name]
    convert = int if kind in (int, int | None) else float if kind is float else str
    parser.add_argument(flag, type=convert, default=field.default, choices=_CHOICES.get(field.name),
                        help=_HELP.get(field.name, field.name.replace("_", " ")) + f" (default {field.default})")
  parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
  parser.add_argument("--num-devices", type=int, help="devices to use (default: all)")
  parser.add_argument("--distributed", action="store_true",
                      help="multi-process job: call jax.distributed.initialize() first (it detects "
                           "TPU pod slices, SLURM, Open MPI and Kubernetes; elsewhere give the three "
                           "options below or JAX_COORDINATOR_ADDRESS)")
  parser.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
  parser.add_argument("--num-processes", type=int, help="processes in the job (with --distributed)")
  parser.add_argument("--process-id", type=int, help="this process's index (with --distributed)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
  import jax

  from flashffn_jax.commands.model_options import fail
  from flashffn_jax.finetune import CheckpointError, finetune

  if args.distributed:
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  logging.basicConfig(level=logging.WARNING)
  try:
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    result = finetune(config, resume=args.resume, num_devices=args.num_devices,
                      progress=not args.no_progress)
  except (ValueError, FileNotFoundError, CheckpointError) as error:
    return fail("finetune", str(error))
  if jax.process_index() == 0:
    print(result.table())
    print(f"run directory: {result.out} (metrics.jsonl, summary.json, recovery.png, checkpoints/)")
  return 0
