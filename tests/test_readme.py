"""The README's first example runs as written (its numbers come from fresh random inputs)."""

import pathlib
import re


def test_readme_quick_example_runs(capsys):
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  example = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
  scope: dict = {}
  exec(compile(example, "README.md", "exec"), scope)
  assert scope["y"].shape == (8, 128, 768) and scope["y"].dtype.name == "bfloat16"
  assert capsys.readouterr().out.strip() in scope["ff"].IMPLEMENTATIONS
  assert scope["grads"].knots.shape == scope["act"].knots.shape
