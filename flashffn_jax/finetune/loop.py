"""Distillation fine-tuning of a linearized model against its exact teacher.

    teacher = load(model)                         exact activation, frozen
    student = linearize(teacher, activation, learnable=True)
    loss    = w_kl · KL(teacher ‖ student) + w_ce · CE(student) + w_ffn · FFN-output match

One optimizer step takes ``batch_size`` windows of ``seq_len`` + 1 tokens, split into
``grad_accum`` micro-batches whose gradients are averaged (``lax.scan``). The optimizer is
clip_by_global_norm → AdamW with linear warm-up and cosine decay, with two learning rates: the
PWL parameters (a few dozen numbers per layer) take large steps, the weights small ones.
With ``compute_dtype="bfloat16"`` the model runs in bfloat16 and the trained parameters are kept
as float32 master copies (cast at every step).

Devices: a 1-D mesh ("data") over ``num_devices`` devices (default: all, of every process); the
batch is split over it; parameters are replicated ("data") or also sharded along their largest
divisible axis ("fsdp"). The same code runs on one CPU, one GPU, several devices and several
processes (call ``jax.distributed.initialize()`` first; ``flashffn finetune --distributed``).

The host reads a step's metrics (loss, KL, ...) only after it has dispatched the next step, so
the device never idles while the host logs, updates the progress bar or prepares a batch.

Determinism: batch s is a pure function of (seed, s) and the step is jitted once, so a run
resumed from its step-s checkpoint repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flashffn_jax import data, models
from flashffn_jax.finetune import objectives
from flashffn_jax.finetune.adapters import ParamSplit, is_pwl_key, split_params
from flashffn_jax.finetune.checkpoints import CheckpointError, RunCheckpoints, read_run_config
from flashffn_jax.finetune.config import FinetuneConfig
from flashffn_jax.finetune.report import MetricsLog, plot_recovery
from flashffn_jax.surgery import linearize

logger = logging.getLogger("flashffn_jax")


# --------------------------------------------------------------------------------------------
# Building the pieces
# --------------------------------------------------------------------------------------------


def build_models(config: FinetuneConfig):
  """(teacher, student, tokenizer): the exact model (with fused exact FFNs when the FFN-match
  term needs their outputs) and its linearized, learnable copy."""
  compute = jnp.dtype(config.compute_dtype)
  base, tokenizer = models.load(config.model, path=config.model_path, dtype=compute)
  teacher = linearize(base, "exact") if config.ffn_match_weight > 0 else base
  student = linearize(base, _student_activation(config, tokenizer), learnable=True)
  return teacher, student, tokenizer


def _student_activation(config: FinetuneConfig, tokenizer):
  """What linearize gets: ``config.activation``, or for a fold spec ("fold20", ...) that fold
  calibrated on the Shakespeare training split (deterministic, so checkpoints restore)."""
  from flashffn_jax.fold import calibrated

  return calibrated(config.activation, config.model, tokenizer)


def load_finetuned(out: str | pathlib.Path, *, dtype=None) -> tuple[nnx.Module, object]:
  """(model, tokenizer) of a fine-tune run's newest checkpoint: the linearized model with the
  trained parameters (LoRA folded in), computing in ``dtype`` (default: the run's)."""
  config, step = read_run_config(out)
  base, tokenizer = models.load(config.model, path=config.model_path,
                                dtype=jnp.dtype(dtype or config.compute_dtype))
  student = linearize(base, _student_activation(config, tokenizer), learnable=True)
  split = split_params(student, config.trainable, lora_rank=config.lora_rank,
                       lora_alpha=config.lora_alpha, key=jax.random.key(config.seed))
  like = {k: v.astype(jnp.float32) for k, v in split.trained.items()}
  checkpoints = RunCheckpoints(out, keep=1, read_only=True)
  trained = checkpoints.restore(step, trained=like)["trained"]
  checkpoints.close()
  return split.merge(trained), tokenizer


def build_optimizer(config: FinetuneConfig, trained: dict) -> optax.GradientTransformation:
  """clip_by_global_norm → AdamW per group: PWL parameters at ``pwl_learning_rate``, weights at
  ``learning_rate`` (weight decay on matrices); both warm up linearly and decay by cosine."""
  def adamw(peak: float, decay: float):
    # Warm-up from peak/10, not 0: a zero first step would waste a step (and look like a bug).
    schedule = optax.warmup_cosine_decay_schedule(0.1 * peak, peak, config.warmup_steps, config.steps,
                                                  end_value=0.1 * peak)
    return optax.adamw(schedule, weight_decay=decay, mask=lambda tree: jax.tree.map(lambda v: v.ndim >= 2, tree))

  labels = {k: "pwl" if is_pwl_key(k) else "weights" for k in trained}
  groups = {"pwl": adamw(config.pwl_learning_rate, 0.0),
            "weights": adamw(config.learning_rate, config.weight_decay)}
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.multi_transform(groups, labels))


def make_mesh(num_devices: int | None) -> jax.sharding.Mesh:
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"num_devices: expected at most {len(devices)} (the devices present), got {num_devices}")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), ("data",))


def param_sharding(mesh: jax.sharding.Mesh, array: jax.Array, mode: str) -> NamedSharding:
  """Replicated, or ("fsdp") split along the largest axis the device count divides."""
  n = mesh.devices.size
  if mode == "fsdp" and array.ndim:
    axes = sorted(range(array.ndim), key=lambda a: -array.shape[a])
    for axis in axes:
      if array.shape[axis] % n == 0:
        spec = [None] * array.ndim
        spec[axis] = "data"
        return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def _ffn_outputs(intermediates: nnx.State) -> list[jax.Array]:
  """The recorded FFN outputs, in one fixed order of their paths (the same for both models)."""
  leaves = jax.tree_util.tree_leaves_with_path(intermediates)
  return [leaf for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0]))
          if "ffn_output" in jax.tree_util.keystr(path)]


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
  """Train/eval steps over a teacher and a split student. Every array (trained, frozen,
  teacher) enters the steps as an argument, so jit compiles no weights in as constants."""

  config: FinetuneConfig
  split: ParamSplit
  teacher_graph: nnx.GraphDef
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  def put_batch(self, batch: np.ndarray) -> jax.Array:
    """A global [B, T+1] batch (identical on every process) as an array split over "data"."""
    return jax.make_array_from_callback(batch.shape, self.batch_sharding, lambda index: batch[index])

  @staticmethod
  def _forward(model: nnx.Module, tokens, capture: bool):
    if capture:
      logits, intermediates = nnx.capture(model, nnx.Intermediate)(tokens)
      return logits, _ffn_outputs(intermediates)
    return model(tokens), []

  def losses(self, trained: dict, frozen: dict, teacher: nnx.State, batch: jax.Array):
    """(total loss, {kl, ce, ffn}) on one micro-batch [b, T+1]."""
    config = self.config
    inputs, targets = batch[:, :-1], batch[:, 1:]
    capture = config.ffn_match_weight > 0
    teacher_logits, teacher_ffn = self._forward(nnx.merge(self.teacher_graph, teacher), inputs, capture)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    student_logits, student_ffn = self._forward(self.split.merge(trained, frozen), inputs, capture)
    terms = {"kl": objectives.kl_divergence(teacher_logits, student_logits, config.temperature),
             "ce": objectives.cross_entropy(student_logits, targets)}
    terms["ffn"] = (objectives.ffn_output_match(student_ffn, jax.lax.stop_gradient(teacher_ffn))
                    if capture else jnp.zeros(()))
    total = config.kl_weight * terms["kl"] + config.ce_weight * terms["ce"] + config.ffn_match_weight * terms["ffn"]
    return total, terms

  def train_step(self, trained: dict, opt_state, frozen: dict, teacher: nnx.State, batch: jax.Array):
    """One optimizer step over grad_accum micro-batches; returns (trained, opt_state, metrics)."""
    micro = batch.reshape(self.config.grad_accum, -1, batch.shape[-1])
    grad_fn = jax.value_and_grad(self.losses, has_aux=True)

    def accumulate(carry, micro_batch):
      (loss, terms), grads = grad_fn(trained, frozen, teacher, micro_batch)
      total_grads, total_loss, total_terms = carry
      return (jax.tree.map(jnp.add, total_grads, grads), total_loss + loss,
              jax.tree.map(jnp.add, total_terms, terms)), None

    zeros = (jax.tree.map(jnp.zeros_like, trained), jnp.zeros(()),
             {"kl": jnp.zeros(()), "ce": jnp.zeros(()), "ffn": jnp.zeros(())})
    (grads, loss, terms), _ = jax.lax.scan(accumulate, zeros, micro)
    scale = 1.0 / self.config.grad_accum
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = self.optimizer.update(grads, opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    metrics = {"loss": loss * scale, **{k: v * scale for k, v in terms.items()},
               "grad_norm": optax.tree.norm(grads)}
    return trained, opt_state, metrics

  def eval_step(self, trained: dict, frozen: dict, teacher: nnx.State, batch: jax.Array) -> dict:
    """Summed NLLs of student and teacher and the summed KL over the batch's targets."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    teacher_logits = self._forward(nnx.merge(self.teacher_graph, teacher), inputs, False)[0]
    student_logits = self._forward(self.split.merge(trained, frozen), inputs, False)[0]
    count = targets.size
    return {"student_nll": objectives.cross_entropy(student_logits, targets) * count,
            "teacher_nll": objectives.cross_entropy(teacher_logits, targets) * count,
            "kl": objectives.kl_divergence(teacher_logits, student_logits) * count,
            "tokens": jnp.asarray(count, jnp.float32)}


def evaluate(trainer: Trainer, eval_fn: Callable, arrays: tuple, batches: list[np.ndarray]) -> dict:
  """Validation perplexities (student, teacher) and KL over fixed batches; ``arrays`` =
  (trained, frozen, teacher state)."""
  totals = None
  for batch in batches:
    out = eval_fn(*arrays, trainer.put_batch(batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = {k: float(v) for k, v in totals.items()}
  tokens = totals["tokens"]
  return {"ppl": math.exp(totals["student_nll"] / tokens), "exact_ppl": math.exp(totals["teacher_nll"] / tokens),
          "kl": totals["kl"] / tokens, "tokens": int(tokens)}


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
  """What a run reports: perplexities before/after, and where its files are. ``model`` is the
  fine-tuned model itself (the student with the trained parameters in place)."""

  exact_ppl: float
  linearized_ppl: float
  finetuned_ppl: float
  eval_tokens: int
  steps: int
  tokens_trained: int
  seconds: float
  out: str
  model: nnx.Module | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def recovered(self) -> float:
    """Fraction of the log-perplexity gap closed: (log lin − log ft) / (log lin − log exact)."""
    gap = math.log(self.linearized_ppl) - math.log(self.exact_ppl)
    return float("nan") if gap == 0 else (math.log(self.linearized_ppl) - math.log(self.finetuned_ppl)) / gap

  def summary(self) -> dict:
    """The JSON-able numbers (no model)."""
    numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
    return {**numbers, "recovered": self.recovered}

  def table(self) -> str:
    below = (f" (the fine-tuned model is below the exact one; the linearized was "
             f"{100 * (self.linearized_ppl / self.exact_ppl - 1):+.2f}%)"
             if self.finetuned_ppl < self.exact_ppl else "")
    return ("                 exact   linearized   fine-tuned\n"
            f"perplexity   {self.exact_ppl:9.3f}   {self.linearized_ppl:10.3f}   {self.finetuned_ppl:10.3f}\n"
            f"(validation: {self.eval_tokens} tokens) gap recovered: {100 * self.recovered:.1f}% of the "
            f"log-perplexity gap{below}, {self.steps} steps, {self.tokens_trained} tokens trained, "
            f"{self.seconds:.0f} s")


def finetune(config: FinetuneConfig, *, resume: bool = False, num_devices: int | None = None,
             progress: bool = True, stop_after: int | None = None, built: tuple | None = None,
             on_metrics: Callable[[dict], None] | None = None) -> FinetuneResult:
  """Run (or resume) a fine-tune; writes checkpoints, metrics.jsonl, summary.json, recovery.png
  under ``config.out``.

  Args:
    resume: continue from the newest checkpoint in ``config.out`` (refused if it belongs to a
      run with other settings). Without it, a directory that already has checkpoints is refused.
    num_devices: devices of the data mesh (default: all).
    stop_after: stop (after checkpointing) at this step, as if killed — for tests and time limits.
    built: (teacher, student, tokenizer) to reuse instead of loading ``config.model``.
    on_metrics: called with every metrics row as it is logged (live plots, custom loggers).
  """
  out = pathlib.Path(config.out)
  checkpoints = RunCheckpoints(out, config.keep_checkpoints)
  existing = checkpoints.latest_step()
  if existing is not None and not resume:
    raise CheckpointError(f"out: {out.absolute()} already has checkpoints (newest: step {existing}); "
                          "pass --resume to continue that run, or choose another --out")
  if existing is not None:
    checkpoints.check_fingerprint(existing, config)  # before the slow model load
  teacher, student, tokenizer = built or build_models(config)
  split = split_params(student, config.trainable, lora_rank=config.lora_rank,
                       lora_alpha=config.lora_alpha, key=jax.random.key(config.seed))
  mesh = make_mesh(num_devices)
  micro_batch = config.batch_size // config.grad_accum
  if micro_batch % mesh.devices.size:
    raise ValueError(f"batch_size: each micro-batch ({config.batch_size} / grad_accum "
                     f"{config.grad_accum} = {micro_batch}) must split evenly over "
                     f"{mesh.devices.size} devices")

  place = lambda tree: jax.tree.map(lambda a: jax.device_put(a, param_sharding(mesh, a, config.sharding)), tree)
  frozen = place(split.frozen)
  # Own buffers (layers may share one PWL array) so the step can donate them.
  trained = place({k: jnp.array(v, jnp.float32, copy=True) for k, v in split.trained.items()})
  teacher_graph, teacher_state = nnx.split(teacher)
  teacher_state = place(teacher_state)
  optimizer = build_optimizer(config, trained)
  trainer = Trainer(config, split, teacher_graph, optimizer, mesh)
  opt_state = place(jax.tree.map(jnp.copy, jax.jit(optimizer.init)(trained)))

  train_data = data.shakespeare(tokenizer, "train", seq_len=config.seq_len, batch_size=config.batch_size,
                                seed=config.seed, max_windows=config.max_train_windows)
  val_data = data.shakespeare(tokenizer, "validation", seq_len=config.seq_len, batch_size=config.batch_size)
  val_batches = [val_data.batch(i) for i in range(min(config.eval_batches, val_data.steps_per_epoch))]
  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  train_step = jax.jit(trainer.train_step, donate_argnums=(0, 1),
                       out_shardings=(shardings(trained), shardings(opt_state), NamedSharding(mesh, P())))
  eval_fn = jax.jit(trainer.eval_step)

  baseline = evaluate(trainer, eval_fn, (trained, frozen, teacher_state), val_batches)
  start = 0
  if existing is not None:
    state = checkpoints.restore(existing, trained=trained, optimizer={"opt_state": opt_state, "step": np.zeros((), np.int32)})
    trained, opt_state, start = state["trained"], state["optimizer"]["opt_state"], int(state["optimizer"]["step"])
    logger.info("finetune: resumed %s at step %d", out, start)
  log = MetricsLog(out, truncate_after=start, on_row=on_metrics)
  if start == 0:
    log.write({"step": 0, "split": "validation", **baseline})

  tokens_per_step = config.batch_size * config.seq_len
  last = config.steps if stop_after is None else min(stop_after, config.steps)
  bar = log.progress(range(start, last), total=config.steps, initial=start, enabled=progress)
  wall = time.perf_counter()
  finished = wall  # when the last logged step ended (its metrics were read)
  pending = None  # (step, metrics on the device): dispatched, not yet logged

  def log_train_row(done: int, metrics: dict) -> None:
    """Log step ``done``'s row: reading its metrics waits for that step only, so the next step,
    already dispatched, keeps the device busy meanwhile (tokens/s: the time between two steps'
    ends)."""
    nonlocal finished
    metrics = {k: float(v) for k, v in metrics.items()}
    now = time.perf_counter()
    tokens_per_s = tokens_per_step / (now - finished)
    finished = now
    log.write({"step": done, "split": "train", **metrics, "tokens_per_s": tokens_per_s})
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}", tok_s=f"{tokens_per_s:.0f}")

  step = start
  for step in bar:
    trained, opt_state, metrics = train_step(trained, opt_state, frozen, teacher_state,
                                             trainer.put_batch(train_data.batch(step)))
    if pending is not None:
      log_train_row(*pending)  # the previous step's row, while this one runs
    done = step + 1
    pending = (done, metrics)
    evaluating = done % config.eval_every == 0 or done == config.steps
    saving = done % config.checkpoint_every == 0 or done == last  # the last step's row too
    if evaluating or saving:  # both wait for this step anyway; its row goes first
      log_train_row(*pending)
      pending = None
      if evaluating:
        log.write({"step": done, "split": "validation", **evaluate(trainer, eval_fn, (trained, frozen, teacher_state), val_batches)})
      if saving:
        checkpoints.save(done, trained, opt_state, config)
      finished = time.perf_counter()  # the next step's time leaves these out
  final_step = last if last > start else start
  final = evaluate(trainer, eval_fn, (trained, frozen, teacher_state), val_batches)
  result = FinetuneResult(exact_ppl=baseline["exact_ppl"], linearized_ppl=baseline["ppl"],
                          finetuned_ppl=final["ppl"], eval_tokens=final["tokens"], steps=final_step,
                          tokens_trained=final_step * tokens_per_step,
                          seconds=time.perf_counter() - wall, out=str(out), model=split.merge(trained))
  if jax.process_index() == 0:
    (out / "summary.json").write_text(json.dumps({**result.summary(), "config": json.loads(config.to_json())},
                                                 indent=1))
    plot_recovery(log.path, out / "recovery.png", result)
  log.close()
  checkpoints.close()
  return result
