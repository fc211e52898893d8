"""`flashffn fit` and `flashffn finetune` argument handling through the CLI entry point."""

import json

import numpy as np
import pytest

from flashffn_jax import cli, pwl


def test_fit_json_report_matches_the_library(capsys, tmp_path):
  plot = tmp_path / "plots" / "fit.png"
  assert cli.main(["fit", "--activation", "silu", "--segments", "12", "--method", "curvature",
                   "--json", "--plot", str(plot)]) == 0
  report = json.loads(capsys.readouterr().out)
  expected = pwl.fit("silu", 12, "curvature")
  np.testing.assert_allclose(report["knots"], np.asarray(expected.knots), rtol=1e-6)
  assert report["max_abs_error"] == pytest.approx(expected.error_report("silu")["max_abs_error"])
  assert report["segments"] == 12 and report["rms_error"] > 0 and not report["evenly_spaced"]
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_fit_json_says_when_the_knots_are_evenly_spaced(capsys):
  """A uniform fit's JSON carries its static promise (``PiecewiseLinear.evenly_spaced``: what
  rebuilding it with ``PiecewiseLinear.create`` needs for the Hopper table lookup)."""
  assert cli.main(["fit", "--segments", "64", "--method", "uniform", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  rebuilt = pwl.PiecewiseLinear.create(report["knots"], report["values"], report["left_slope"],
                                       report["right_slope"], evenly_spaced=report["evenly_spaced"])
  assert rebuilt.evenly_spaced and len(report["knots"]) == 65


def test_fit_table_and_data_samples(capsys, tmp_path, rng):
  samples = tmp_path / "pre.npy"
  np.save(samples, rng.normal(0.0, 2.0, 20_000))
  assert cli.main(["fit", "--segments", "6", "--method", "data", "--samples", str(samples)]) == 0
  out = capsys.readouterr().out
  assert out.startswith("gelu: 6 segments (data), max |err|") and len(out.splitlines()) == 3 + 7


@pytest.mark.parametrize("argv,message", [
    (["fit", "--method", "best"], "invalid choice: 'best'"),
    (["finetune", "--trainable", "bias"], "invalid choice: 'bias'"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_bad_arguments_exit_with_usage(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_finetune_rejects_bad_config_before_loading_anything(capsys, tmp_path):
  assert cli.main(["finetune", "--out", str(tmp_path), "--batch-size", "4", "--grad-accum", "3"]) == 2
  assert capsys.readouterr().err.strip() == ("flashffn finetune: error: batch_size: expected a multiple "
                                             "of grad_accum=3, got 4")
