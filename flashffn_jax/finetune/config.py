"""Fine-tuning configuration: one frozen dataclass, validated up front with messages that name
the field and what was expected.

The fields that change what a checkpoint means (model, activation, what trains, shapes of the
adapters) form its ``fingerprint``; resuming with a different fingerprint is refused.
"""

from __future__ import annotations

import dataclasses
import json

from flashffn_jax.checks import check_positive_int

TRAINABLE = ("all", "ffn", "ffn-weights", "pwl", "lora")
COMPUTE_DTYPES = ("float32", "bfloat16")
SHARDING = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Everything a run needs; ``flashffn finetune --help`` documents each field.

  The defaults are the README's CPU demo (about 10 minutes on 2 cores): SmolLM2 with PWL-8,
  the PWL parameters trained, 80 steps of 4 x 64 tokens. On a GPU raise steps, batch_size,
  seq_len and try trainable="ffn", or "ffn-weights" with learning_rate ~1e-4 to hold the PWLs
  (on Hopper its backward skips their segment sums; see benchmarks/finetune_recovery.py).
  """

  out: str = "runs/finetune"
  model: str = "smollm2"
  model_path: str | None = None  # explicit weights file instead of the installed package
  activation: str = "pwl8"  # what linearize() puts in every FFN
  trainable: str = "pwl"  # all | ffn | ffn-weights | pwl | lora
  lora_rank: int = 8
  lora_alpha: float = 16.0
  steps: int = 80
  batch_size: int = 4  # sequences per optimizer step (split into grad_accum micro-batches)
  grad_accum: int = 1
  seq_len: int = 64
  learning_rate: float = 1e-5  # weights (and LoRA factors)
  pwl_learning_rate: float = 3e-3  # the learnable PWL parameters
  warmup_steps: int = 5
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  kl_weight: float = 1.0
  ce_weight: float = 0.0
  ffn_match_weight: float = 0.0
  temperature: float = 1.0
  compute_dtype: str = "float32"  # bfloat16 = mixed precision with float32 master weights
  sharding: str = "data"  # data parallel; "fsdp" also shards the parameters
  eval_every: int = 20
  eval_batches: int = 4
  checkpoint_every: int = 20
  keep_checkpoints: int = 3
  seed: int = 0
  max_train_windows: int | None = None  # cap on the training split (small runs)

  def __post_init__(self):
    positive = ("lora_rank", "steps", "batch_size", "grad_accum", "seq_len", "eval_every",
                "eval_batches", "checkpoint_every", "keep_checkpoints")
    for name in positive:
      check_positive_int(name, getattr(self, name))
    non_negative = ("warmup_steps", "weight_decay", "kl_weight", "ce_weight", "ffn_match_weight")
    for name in non_negative:
      if getattr(self, name) < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {getattr(self, name)!r}")
    for name in ("learning_rate", "pwl_learning_rate", "clip_norm", "temperature", "lora_alpha"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}: expected a value > 0, got {getattr(self, name)!r}")
    if self.trainable not in TRAINABLE:
      raise ValueError(f"trainable: expected one of {TRAINABLE}, got {self.trainable!r}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
    if self.sharding not in SHARDING:
      raise ValueError(f"sharding: expected one of {SHARDING}, got {self.sharding!r}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size: expected a multiple of grad_accum={self.grad_accum}, got "
                       f"{self.batch_size}")
    if self.kl_weight + self.ce_weight + self.ffn_match_weight == 0:
      raise ValueError("kl_weight, ce_weight, ffn_match_weight: at least one must be > 0")
    if self.warmup_steps >= self.steps:
      raise ValueError(f"warmup_steps: expected fewer than steps={self.steps}, got {self.warmup_steps}")
    if self.max_train_windows is not None and self.max_train_windows < self.batch_size:
      raise ValueError(f"max_train_windows: expected at least batch_size={self.batch_size}, got "
                       f"{self.max_train_windows}")

  def fingerprint(self) -> dict:
    """Fields a checkpoint depends on: resuming with other values would mix two runs."""
    keys = ("model", "activation", "trainable", "lora_rank", "lora_alpha", "seq_len",
            "batch_size", "grad_accum", "seed", "max_train_windows", "learning_rate", "pwl_learning_rate",
            "warmup_steps", "steps", "weight_decay", "clip_norm", "kl_weight", "ce_weight",
            "ffn_match_weight", "temperature", "compute_dtype")
    return {k: getattr(self, k) for k in keys}

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_dict(cls, values: dict) -> FinetuneConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"config: unknown fields {unknown}")
    return cls(**values)
