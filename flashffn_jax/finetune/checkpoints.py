"""Orbax checkpoints of a fine-tune run: atomic, keep-last-N, refuse what does not fit.

A checkpoint at step s holds three items:
  trained    the trained parameters (flat dict, dotted paths) — all ``flashffn eval`` needs
  optimizer  {"opt_state": optax state, "step": s}
  meta       JSON: the run's full config and its fingerprint (``FinetuneConfig.fingerprint``)

Orbax writes each step into a temporary directory and renames it when complete, so a killed run
leaves either a whole checkpoint or none. The data order is a pure function of (seed, step),
so restoring the step restores the data position too.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from flashffn_jax.finetune.config import FinetuneConfig


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run; nothing was written."""


def _abstract(leaf) -> jax.ShapeDtypeStruct:
  """Restore target for one leaf: its shape, dtype and sharding (NumPy leaves: this process's
  first device), so a checkpoint written under another device layout restores here."""
  sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


class RunCheckpoints:
  """The checkpoints of one run directory (``<out>/checkpoints``)."""

  def __init__(self, out: str | pathlib.Path, keep: int, *, read_only: bool = False):
    self.directory = pathlib.Path(out).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("trained", "optimizer", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, trained: dict, opt_state, config: FinetuneConfig) -> None:
    meta = {"config": json.loads(config.to_json()), "fingerprint": config.fingerprint()}
    # A NumPy step: a host-local jax scalar cannot be saved from several processes.
    optimizer = {"opt_state": opt_state, "step": np.asarray(step, np.int32)}
    self.manager.save(step, args=ocp.args.Composite(
        trained=ocp.args.StandardSave(trained), optimizer=ocp.args.StandardSave(optimizer),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types for a damaged directory
      raise CheckpointError(f"checkpoint {self.directory}/{step}: metadata unreadable "
                            f"({type(error).__name__}: {error}); it may be corrupt") from error
    return restored["meta"]

  def check_fingerprint(self, step: int, config: FinetuneConfig) -> None:
    """CheckpointError unless step ``step`` was written by a run with ``config``'s fingerprint."""
    saved = self.read_meta(step)["fingerprint"]
    mismatched = {k: (saved.get(k), v) for k, v in config.fingerprint().items() if saved.get(k) != v}
    if mismatched:
      details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
      raise CheckpointError(f"checkpoint {self.directory}/{step} belongs to a different run "
                            f"({details}); use another --out or the same settings")

  def restore(self, step: int, **like) -> dict:
    """Restore the items named in ``like`` (trained=..., optimizer=...) shaped like the given
    trees; CheckpointError if they are unreadable or shaped otherwise."""
    abstract = {name: jax.tree.map(_abstract, tree) for name, tree in like.items()}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
    except Exception as error:  # orbax raises many types for damaged or foreign checkpoints
      raise CheckpointError(f"checkpoint {self.directory}/{step}: cannot restore "
                            f"{'/'.join(abstract)} ({type(error).__name__}: {error}); it is corrupt "
                            "or from an incompatible model") from error
    for name in abstract:
      got, want = restored[name], abstract[name]
      if jax.tree.structure(got) != jax.tree.structure(want):
        raise CheckpointError(f"checkpoint {self.directory}/{step}: {name} has other parameters "
                              "than this model")
      for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        if g.shape != w.shape or g.dtype != w.dtype:
          raise CheckpointError(f"checkpoint {self.directory}/{step}: {name}{jax.tree_util.keystr(path)} "
                                f"has {g.dtype}{list(g.shape)}, expected {w.dtype}{list(w.shape)}")
    return {name: restored[name] for name in abstract}

  def close(self) -> None:
    self.manager.close()


def read_run_config(out: str | pathlib.Path) -> tuple[FinetuneConfig, int]:
  """(config, newest step) of a finished or running fine-tune directory, for evaluation."""
  checkpoints = RunCheckpoints(out, keep=1, read_only=True)
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f"{pathlib.Path(out).absolute()}: no checkpoints (expected the --out "
                          "directory of a `flashffn finetune` run)")
  config = FinetuneConfig.from_dict(checkpoints.read_meta(step)["config"])
  checkpoints.close()
  return config, step
