"""One process of the two-process fine-tune in test_finetune_multiprocess.py (not a test).

    python -m tests.multiprocess_worker PROCESS_ID PORT OUT

Joins a 2-process JAX job on 127.0.0.1:PORT (CPU, gloo collectives, one device per process) and
trains the small model of benchmarks/multi_device_check.py data-parallel over both processes.
"""

import pathlib
import sys

import jax

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def main(process_id: int, port: int, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  sys.path.insert(0, str(BENCHMARKS))
  import multi_device_check

  from flashffn_jax.models import smollm2

  tokenizer = smollm2.load(num_layers=1)[1]
  multi_device_check.train(multi_device_check.tiny_problem(tokenizer), pathlib.Path(out),
                           sharding="data", devices=None)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
