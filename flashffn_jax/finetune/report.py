"""Run output: metrics as JSON lines (+ TensorBoard when tensorboardX is installed), a tqdm
progress bar, and the recovery plot."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import jax
from tqdm.auto import tqdm


class MetricsLog:
  """``<out>/metrics.jsonl``: one JSON object per line, each with "step" and "split".

  Written by process 0 only. On resume, rows after the resumed step are dropped first, so the
  file reads as if the run had never stopped.
  """

  def __init__(self, out: pathlib.Path, truncate_after: int = 0,
               on_row: Callable[[dict], None] | None = None):
    self.path = pathlib.Path(out) / "metrics.jsonl"
    self.on_row = on_row
    self.enabled = jax.process_index() == 0
    self.tensorboard = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line in self.path.read_text().splitlines()
            if json.loads(line)["step"] <= truncate_after] if self.path.exists() and truncate_after else []
    self.path.write_text("".join(line + "\n" for line in kept))
    try:
      from tensorboardX import SummaryWriter
      self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
    except ImportError:
      pass

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    if self.on_row is not None:
      self.on_row(row)
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tensorboard is not None:
      for key, value in row.items():
        if key not in ("step", "split") and isinstance(value, (int, float)):
          self.tensorboard.add_scalar(f"{row['split']}/{key}", value, row["step"])

  def progress(self, steps, *, total: int, initial: int, enabled: bool):
    return tqdm(steps, total=total, initial=initial, desc="finetune", unit="step",
                disable=not (enabled and self.enabled), dynamic_ncols=True)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


def read_metrics(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def plot_recovery(metrics_path: pathlib.Path, png: pathlib.Path, result) -> None:
  """Validation perplexity over steps against the exact and linearized levels, and the KL."""
  from matplotlib.figure import Figure  # no pyplot: leaves a notebook's inline backend alone

  rows = [r for r in read_metrics(metrics_path) if r["split"] == "validation" and "ppl" in r]
  train = [r for r in read_metrics(metrics_path) if r["split"] == "train"]
  fig = Figure(figsize=(7, 6))
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.plot([r["step"] for r in rows], [r["ppl"] for r in rows], "o-", label="student (validation)")
  top.axhline(result.exact_ppl, color="k", ls="--", label=f"exact {result.exact_ppl:.2f}")
  top.axhline(result.linearized_ppl, color="r", ls=":", label=f"linearized {result.linearized_ppl:.2f}")
  top.set_ylabel("perplexity")
  top.legend()
  bottom.semilogy([r["step"] for r in train], [max(r["kl"], 1e-9) for r in train], label="train KL")
  bottom.semilogy([r["step"] for r in rows], [max(r["kl"], 1e-9) for r in rows], "o-", label="validation KL")
  bottom.set_xlabel("step")
  bottom.set_ylabel("KL(teacher ‖ student)")
  bottom.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=100)
