"""Several processes: the fine-tune loop run as a 2-process JAX job (CPU, loopback, gloo) ends
with the parameters of the same run in one process with 2 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
import multi_device_check  # noqa: E402

from flashffn_jax.models import smollm2  # noqa: E402

REPO = pathlib.Path(__file__).parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.skipif(jax.device_count() != 2, reason="compares with 2 host devices (tests/conftest.py sets them)")
def test_two_processes_match_one_process_with_two_devices(tmp_path):
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(REPO)}
  workers = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(i), str(port),
                               str(tmp_path / "two-processes")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  for worker in workers:
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0, output[-3000:]
  tokenizer = smollm2.load(num_layers=1)[1]
  _, want = multi_device_check.train(multi_device_check.tiny_problem(tokenizer), tmp_path / "one-process",
                                     sharding="data", devices=None)
  got = multi_device_check.final_trained(tmp_path / "two-processes", like=want)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
