"""`flashffn eval` and `flashffn generate` end to end on the installed SmolLM2, and their errors."""

import json

import numpy as np
import pytest

from flashffn_jax import cli
from tests.test_models import needs_smollm2

PROSE = ("The quick brown fox jumps over the lazy dog. Rivers run to the sea, and the sea is never "
         "full; to the place the rivers come from, there they return again.")


@needs_smollm2
def test_eval_prints_json_perplexity_of_any_text_file(tmp_path, capsys):
  text = tmp_path / "prose.txt"
  text.write_text(PROSE + " ünïcödé ✓\n", encoding="utf-8")
  assert cli.main(["eval", "--text", str(text), "--max-tokens", "24", "--activation", "pwl8",
                   "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["tokens"] == 24 and result["activation"] == "pwl8"
  assert np.isclose(result["ppl"], np.exp(result["nll"])) and 1.0 < result["ppl"] < 5000


@needs_smollm2
def test_generate_full_model_greedy_knows_paris(capsys):
  assert cli.main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "3"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("The capital of France is") and "Paris" in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "minilm", "--text", "x.txt"], "minilm is a sentence encoder"),
    (["eval", "--text", "{bad}", "--json"], "is not UTF-8 text"),
    (["eval", "--text", "/no/such/file.txt"], "is not a file"),
    (["eval", "--text", "{good}", "--activation", "pwl16", "--knot-range", "-6", "4"],
     "--knot-range: needs --activation pwlN-uniform"),
    (["eval", "--text", "{good}", "--max-tokens", "0"], "--max-tokens: expected a positive integer"),
    (["generate", "--model", "minilm", "--prompt", "hi"], "cannot generate text"),
    (["generate", "--prompt", "hi", "--tokens-per-call", "0"],
     "tokens_per_call: expected a positive integer"),
    (["eval", "--text", "{good}", "--checkpoint", "{good}.run"], "--checkpoint: "),
    (["generate", "--prompt", "hi", "--checkpoint", "{good}.run", "--activation", "pwl8"],
     "--checkpoint: the run's own activation is used"),
])
def test_errors_are_one_clear_line(tmp_path, capsys, argv, message):
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
  (tmp_path / "good.txt").write_text(PROSE)
  argv = [a.format(bad=tmp_path / "bad.txt", good=tmp_path / "good.txt") for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.startswith(f"flashffn {argv[0]}: error:")
