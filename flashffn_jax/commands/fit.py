"""flashffn fit --activation gelu --segments 16 [--method optimal] [--plot fit.png] [--json]"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from flashffn_jax import activations, pwl


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--activation", default="gelu",
                      help=f"one of {sorted(activations.ACTIVATIONS) + sorted(activations.ALIASES)}")
  parser.add_argument("--segments", type=int, default=16, help="interior segments (knots - 1)")
  parser.add_argument("--method", default="optimal", choices=pwl.FIT_METHODS)
  parser.add_argument("--samples", help=".npy file of pre-activations (needed by --method data)")
  parser.add_argument("--plot", help="write the fit and its error curve to this PNG")
  parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
  samples = np.load(args.samples) if args.samples else None
  fitted = pwl.fit(args.activation, args.segments, args.method, samples=samples)
  report = fitted.error_report(args.activation, samples=samples)
  result = {"activation": args.activation, "method": args.method, **report,
            "knots": np.asarray(fitted.knots).tolist(), "values": np.asarray(fitted.values).tolist(),
            "left_slope": float(fitted.left_slope), "right_slope": float(fitted.right_slope),
            "evenly_spaced": fitted.evenly_spaced}
  if args.plot:
    plot_fit(fitted, args.activation, args.plot)
    result["plot"] = args.plot
  if args.json:
    print(json.dumps(result))
    return 0
  print(f"{args.activation}: {args.segments} segments ({args.method}), "
        f"max |err| {report['max_abs_error']:.3e} at x={report['max_error_at']:.3f}, "
        f"RMS {report['rms_error']:.3e}")
  print(" knot        value")
  for knot, value in zip(result["knots"], result["values"]):
    print(f"{knot:9.5f}  {value:9.5f}")
  print(f"tails: slope {result['left_slope']:g} on the left, {result['right_slope']:g} on the right")
  if args.plot:
    print(f"plot written to {args.plot}")
  return 0


def plot_fit(fitted: pwl.PiecewiseLinear, activation: str, path: str) -> None:
  """Two panels: the activation with its PWL fit and knots, and the error curve."""
  from matplotlib.figure import Figure  # no pyplot: leaves a notebook's inline backend alone

  fn = activations.lookup(activation).fn
  knots = np.asarray(fitted.knots, np.float64)
  x = np.linspace(knots[0] - 2, knots[-1] + 2, 4001)
  fig = Figure(figsize=(7, 6))
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.plot(x, fn(x), label=activation)
  top.plot(x, fitted.numpy(x), "--", label=f"PWL, {fitted.num_segments} segments")
  top.plot(knots, fitted.numpy(knots), "k.", label="knots")
  top.legend()
  bottom.plot(x, fitted.numpy(x) - fn(x))
  bottom.set_ylabel("PWL - exact")
  bottom.set_xlabel("x")
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
