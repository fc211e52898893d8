"""Several-device check of the fine-tune loop: the same run on 1 device, data-parallel over all
devices, and FSDP over all devices must end with the same parameters (to rounding).

    PYTHONPATH=$PWD python3 benchmarks/multi_device_check.py --tokenizer tokenizer.json --out DIR

Runs anywhere with >= 2 devices (GPUs, or CPUs with
XLA_FLAGS=--xla_force_host_platform_device_count=2). The model is a small random Llama with
SmolLM2's vocabulary (real weights are not needed to test sharding); the tokenizer is SmolLM2's,
saved once with ``--save-tokenizer`` on a machine that has the GGUF.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from flashffn_jax.finetune import FinetuneConfig, finetune
from flashffn_jax.finetune.checkpoints import RunCheckpoints
from flashffn_jax.models.llama import Llama, LlamaConfig
from flashffn_jax.surgery import linearize


def final_trained(out: pathlib.Path, like: dict | None = None) -> dict[str, np.ndarray]:
  """The newest checkpoint's trained parameters; pass ``like`` (arrays of the same shapes) to
  read a checkpoint written on other devices (e.g. by another job layout)."""
  import orbax.checkpoint as ocp

  checkpoints = RunCheckpoints(out, keep=1, read_only=True)
  step = checkpoints.latest_step()
  if like is None:
    trained = checkpoints.manager.restore(step, args=ocp.args.Composite(
        trained=ocp.args.StandardRestore()))["trained"]
  else:
    trained = checkpoints.restore(step, trained=like)["trained"]
  checkpoints.close()
  return {k: np.asarray(v) for k, v in trained.items()}


def tiny_problem(tokenizer) -> tuple:
  """(teacher, learnable PWL-8 student, tokenizer) of a small random Llama with SmolLM2's vocabulary."""
  config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=256,
                       num_layers=2, num_heads=4, num_kv_heads=2)
  teacher = Llama(config, rngs=nnx.Rngs(0))
  return teacher, linearize(teacher, "pwl8", learnable=True), tokenizer


def train(built: tuple, out: pathlib.Path, *, sharding: str, devices: int | None):
  """Six steps of FFN fine-tuning; (result, final trained parameters)."""
  batch = 2 * jax.device_count()  # the same global batch whatever the layout
  cfg = FinetuneConfig(out=str(out), trainable="ffn", steps=6, batch_size=batch, seq_len=32,
                       learning_rate=1e-3, warmup_steps=1, eval_every=3, eval_batches=1,
                       checkpoint_every=6, keep_checkpoints=1, max_train_windows=64, sharding=sharding)
  result = finetune(cfg, progress=False, built=built, num_devices=devices)
  return result, final_trained(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokenizer", required=True, help="SmolLM2 tokenizer.json")
  parser.add_argument("--out", required=True)
  parser.add_argument("--save-tokenizer", action="store_true", help="write --tokenizer from the GGUF and exit")
  args = parser.parse_args(argv)
  if args.save_tokenizer:
    from flashffn_jax.models import smollm2
    pathlib.Path(args.tokenizer).write_text(smollm2.load(num_layers=1)[1].to_str())
    return 0
  tokenizer = Tokenizer.from_str(pathlib.Path(args.tokenizer).read_text())
  n = jax.device_count()
  if n < 2:
    raise SystemExit(f"needs at least 2 devices, found {n}")
  built = tiny_problem(tokenizer)
  out = pathlib.Path(args.out)
  runs = {"1 device": ("data", 1), f"data x{n}": ("data", n), f"fsdp x{n}": ("fsdp", n)}
  results = {name: train(built, out / name.replace(" ", "-"), sharding=sharding, devices=devices)
             for name, (sharding, devices) in runs.items()}
  reference = results["1 device"][1]
  rows = []
  for name, (result, params) in results.items():
    diff = max(float(np.max(np.abs(params[k] - reference[k])) / (np.max(np.abs(reference[k])) + 1e-12))
               for k in reference)
    rows.append({"run": name, "finetuned_ppl": result.finetuned_ppl, "max_rel_param_diff_vs_1_device": diff})
  summary = {"devices": [d.device_kind for d in jax.devices()], "rows": rows,
             "agree": all(r["max_rel_param_diff_vs_1_device"] < 1e-3 for r in rows)}
  (out / "multi_device.json").write_text(json.dumps(summary, indent=1))
  print(f"{'run':12s} {'val ppl':>10s} {'max rel param diff vs 1 device':>32s}")
  for r in rows:
    print(f"{r['run']:12s} {r['finetuned_ppl']:10.3f} {r['max_rel_param_diff_vs_1_device']:32.2e}")
  print("AGREE" if summary["agree"] else "DISAGREE")
  return 0 if summary["agree"] else 1


if __name__ == "__main__":
  raise SystemExit(main())
