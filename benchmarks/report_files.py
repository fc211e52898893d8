"""Writing a benchmark's results: ``<stem>.json`` (the record) and ``<stem>.md`` (its table)."""

from __future__ import annotations

import json
import os


def write_json_and_markdown(out: str, stem: str, record: dict, lines: list[str]) -> str:
  """Writes ``out/stem.json`` and ``out/stem.md`` (``lines`` joined); returns the markdown."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, stem)
  with open(path + ".json", "w") as f:
    json.dump(record, f, indent=1)
  markdown = "\n".join(lines)
  with open(path + ".md", "w") as f:
    f.write(markdown + "\n")
  return markdown
