"""``flashffn`` command line: one subcommand per module under ``flashffn_jax.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``flashffn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "fit": "Fit a piecewise-linear approximation of an activation and report its error.",
    "eval": "Perplexity of a (linearized or fine-tuned) causal LM on a UTF-8 text file.",
    "generate": "Generate text with a (linearized or fine-tuned) causal LM, KV-cached.",
    "finetune": "Linearize a model and distil it back to its exact self (optax, checkpoints).",
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="flashffn", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, help_text in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  if argv and argv[0] in COMMANDS:
    module = importlib.import_module(f"flashffn_jax.commands.{argv[0]}")
    command_parser = argparse.ArgumentParser(prog=f"flashffn {argv[0]}", description=COMMANDS[argv[0]])
    module.add_arguments(command_parser)
    return int(module.run(command_parser.parse_args(argv[1:])) or 0)
  parser.parse_args(argv)  # prints usage / errors for unknown commands
  return 2


if __name__ == "__main__":
  sys.exit(main())
