"""SM clock and board power while a command runs on the GPU (nvidia-smi samples): does a kernel
run at a lower clock than another, i.e. is it power-bound rather than issue- or memory-bound?

    PYTHONPATH=$PWD python3 benchmarks/gpu_clocks.py -- python3 benchmarks/run_epilogue_kernel.py \
        --shape gpt2-small --activation hinges --calls 20000

Prints one line: the median and minimum SM clock (MHz), the median board power (W) and the
clock-event (throttle) reasons seen, over the samples where the GPU was busy (utilization >= 90%:
compiles and teardown drop out), and the command's exit status.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading

FIELDS = "clocks.sm,power.draw,utilization.gpu,clocks_event_reasons.active"


def sample(stop: threading.Event, rows: list, period_s: float = 0.05) -> None:
  """Append nvidia-smi's FIELDS for GPU 0 to ``rows`` about every ``period_s`` until ``stop``.
  One query per sample: ``nvidia-smi -lms`` into a pipe buffers its lines, so a reader would
  see them seconds late and attribute them to the wrong interval."""
  while not stop.is_set():
    query = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={FIELDS}",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True)
    rows += [[v.strip() for v in line.split(",")] for line in query.stdout.splitlines()]
    stop.wait(period_s)


def busy_rows(rows: list, busy_percent: int = 90) -> list:
  """The samples taken while the GPU was busy (compiles and teardown drop out)."""
  return [r for r in rows if len(r) == 4 and r[2].isdigit() and int(r[2]) >= busy_percent]


def busy_clocks(rows: list) -> list[float]:
  """SM clocks (MHz) of the busy samples among ``rows``."""
  return [float(r[0]) for r in busy_rows(rows)]


def summary(rows: list) -> str:
  busy = busy_rows(rows)
  if not busy:
    return f"no busy samples among {len(rows)}"
  clocks, power = busy_clocks(busy), [float(r[1]) for r in busy]
  reasons = sorted({r[3] for r in busy})
  return (f"SM clock median {statistics.median(clocks):.0f} MHz (min {min(clocks):.0f}), "
          f"power median {statistics.median(power):.0f} W, clock-event reasons {reasons}, "
          f"{len(busy)} busy samples")


def main(argv: list[str]) -> int:
  command = argv[argv.index("--") + 1:] if "--" in argv else argv
  if not command:
    sys.exit("usage: gpu_clocks.py -- COMMAND [ARGS...]")
  rows, stop = [], threading.Event()
  sampler = threading.Thread(target=sample, args=(stop, rows), daemon=True)
  sampler.start()
  status = subprocess.run(command).returncode
  stop.set()
  sampler.join(timeout=2)
  print(f"{' '.join(command[-6:])}: {summary(rows)}; exit {status}", flush=True)
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
