"""Argument checks shared by the public functions: a clear error naming the argument."""

from __future__ import annotations


def check_positive_int(name: str, value, *, optional: bool = False) -> None:
  """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (a bool is not), or None
  when ``optional``."""
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    expected = "None or a positive integer" if optional else "a positive integer"
    raise ValueError(f"{name}: expected {expected}, got {value!r}")
