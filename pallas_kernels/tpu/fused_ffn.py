"""Fused FFN for TPU (Pallas Mosaic TPU): both matmuls and the activation in one kernel, and a
backward that recomputes the hidden activations instead of storing them.

    MLP:  y = act(x W_up + b_up) W_down + b_down
    GLU:  y = (act(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down

Forward (grid (M/bm, H/bh), dimension semantics ("parallel", "arbitrary")): for an M tile and
each H tile in turn,
    z_up = x[m] W_up[:, h] + b_up[h]       (and z_gate; full reduction over D, f32 accumulation)
    a    = act(z)                           (f32, exact per tile: act never sees a partial sum)
    acc += cast(a [* z_up]) W_down[h, :]    (acc: [bm, D_out] f32 in VMEM, initialised to b_down)
and the M tile of y is written once, after the last H tile. The [M, H] intermediate never leaves
VMEM. The PWL tables (knots, slopes, intercepts) sit in SMEM
and are read as scalars; ``pallas_kernels.activation.pwl_select`` evaluates them per element.

Blocks (``tiling`` holds the VMEM/time model that picks them per chip and kernel): bm rows of x
(a multiple of 8 for f32, 16 for bf16) by bh hidden columns (a multiple of 128); D and D_out are
zero-padded to 128 lanes, M to bm and H to bh (zeros are exact, see ``_pad``), so any size runs.
Each weight byte streamed feeds bm flops (bf16), so bm must pass the chip's ridge point (v5e 240,
v6e 561 flops/byte). For bf16 M = 8192 the model picks: v5e/v6e (128 MiB VMEM) bm 512-2048,
bh 256-1536, 33-93 MiB per kernel; v5p (64 MiB) bm 256-2048 within 48 MiB; v4 (16 MiB) bm
64-512 within 12 MiB, where llama-8B's weight-gradient tiles do not fit and the op falls back
to XLA. The scoped-VMEM limit requested is the modelled footprint + 25%.

Backward (custom VJP; residuals are the inputs only, nothing of size [M, H]). With
d = dy W_down^T, the hidden-layer gradients are
    MLP: dz_up = d * act'(z_up)                              g = d        at z_up
    GLU: dz_gate = d * z_up * act'(z_gate), dz_up = d * act(z_gate)   g = d * z_up at z_gate
    PWL: d s_j = Σ_{seg(z)=j} g z,  d c_j = Σ_{seg(z)=j} g   (zero for the knots)
and the backward kernels recompute z and d per [bm, bh] tile, each ordering its grid so that its
accumulators stay resident in VMEM. Two paths (``tiling.choose_tiling`` takes the faster that
fits):
  backward_dx       grid (M/bm "parallel", H/bh "arbitrary"):  dx[m] += dz W_in[:, h]^T
  backward_dweights grid (H/bh "parallel", M/bm "arbitrary"):  dW_in[:, h] += x[m]^T dz,
                    dW_down[h, :] += cast(hidden)^T dy[m], db_in[h] += Σ_rows dz,
                    PWL segment sums per hidden column (reduced over columns by XLA)
or
  backward_fused    grid (M/bm, H/bh), both "arbitrary": dx[m] as in backward_dx, and ALL of
                    dW_in, dW_down, db_in, PWL sums resident as f32 for the whole grid, each step
                    adding into its bh hidden columns; written back once at the end.
db_down = Σ_rows dy is one XLA reduction.

Recompute cost, in units of one [M, D] x [D, H] matmul (2 M D H flops; n = 1 MLP, 2 GLU;
D_out = D): forward n + 1. backward_dx: n (z) + 1 (d) + n (dx) = 2n + 1; backward_dweights:
n (z) + 1 (d) + n (dW_in) + 1 (dW_down) = 2n + 2; together 4n + 3. backward_fused: 3n + 2.
Autodiff that keeps z from the forward: 2n + 2. A training step is then 5n + 4 (two-kernel) or
4n + 3 (fused) against 3n + 3: 1.5x / 1.56x (MLP / GLU) and 1.17x / 1.22x the MXU flops. That
is the price of keeping no [M, H] tensor in HBM in either direction. Why two paths: dx needs a
sum over H and dW a sum over M; one grid order keeps both resident only if all of dW sits in
VMEM ((n D H + H D_out) * 4 bytes: 11 MB at SmolLM2, 19 MB at gpt2-small, 0.7 GB at llama-8B),
and the fused kernel gives up the "parallel" axis (megacore) for it. At M = 8192 the matmuls
are compute bound on v5e/v6e, so the roofline model (benchmarks/results/tpu-roofline.md)
predicts the forward at parity with XLA's best case, the training step ~1.5x slower on the
two-kernel path (llama sizes) and 0.8-1.3x XLA's speed on the fused path (small models).

Dtypes: bfloat16 or float32 inputs; matmuls accumulate in f32 (``preferred_element_type``), the
activation and its derivative run in f32, and the hidden tile is cast to x's dtype before the
second matmul (as ``flashffn_jax.ops.reference_ffn`` does). float16 is declined (Mosaic's MXU
path is bf16/f32).

Implementations registered in ``flashffn_jax.ops``: ``pallas_tpu`` (compiled, TPU only) and
``pallas_tpu_interpret`` (the same kernels under ``pltpu.InterpretParams`` on any backend: slow,
for tests; out-of-bounds reads raise and uninitialised memory reads as NaN).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import activation as activation_math
from pallas_kernels.activation import Activation
from pallas_kernels.tpu import tiling as tiling_lib
from pallas_kernels.tpu.tiling import Blocks, PaddedShape, Problem, Tiling

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)
WEIGHTS_IN = ("w_up", "w_gate")  # the [D, H] matrices in front of the activation
BIASES_IN = {"w_up": "b_up", "w_gate": "b_gate"}
TABLES = ("knots", "slopes", "intercepts")
F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a [i, k] x b [j, k] -> [i, j]
TN = (((0,), (0,)), ((), ()))  # a [k, i] x b [k, j] -> [i, j]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one fused FFN call (the custom VJP's non-differentiable part)."""

  kind: str  # activation kind: "pwl" or an exact name
  problem: Problem
  tiling: Tiling
  chip: Any  # tpu_info.TpuInfo used for the VMEM limits
  precision: Any
  interpret: Any  # False or pltpu.InterpretParams


# ------------------------------------------------------------------------------------------------
# Tile math shared by the kernel bodies (values already loaded from VMEM)
# ------------------------------------------------------------------------------------------------


class _TileActivation:
  """act and act' on a float32 tile; PWL tables are scalars read from SMEM refs."""

  def __init__(self, kind: str, refs: dict):
    self.kind = kind
    if kind == "pwl":
      self.knots, self.slopes, self.intercepts = (
          [refs[name][k] for k in range(refs[name].shape[0])] for name in TABLES)

  def __call__(self, z):
    if self.kind == "pwl":
      return self.with_derivative(z)[0]
    return activation_math.exact_activation(self.kind, z)

  def with_derivative(self, z):
    if self.kind == "pwl":
      slope, intercept = activation_math.pwl_select(z, self.knots, self.slopes, self.intercepts)
      return slope * z + intercept, slope
    return activation_math.exact_activation_and_derivative(self.kind, z)

  def segment_column_sums(self, z, g) -> list:
    """[Σ_{seg(z)=j} g z over rows, j = 0..K] + [Σ_{seg(z)=j} g over rows], each [1, bh]."""
    segment = jnp.zeros(z.shape, jnp.int32)
    for knot in self.knots:
      segment = segment + (z >= knot).astype(jnp.int32)
    gz = g * z
    masks = [segment == j for j in range(len(self.knots) + 1)]
    return ([jnp.sum(jnp.where(mask, gz, 0.0), axis=0, keepdims=True) for mask in masks]
            + [jnp.sum(jnp.where(mask, g, 0.0), axis=0, keepdims=True) for mask in masks])


def _dot(a, b, precision, dimension_numbers=(((1,), (0,)), ((), ()))):
  return jax.lax.dot_general(a, b, dimension_numbers, precision=precision,
                             preferred_element_type=F32)


def _pre_activations(refs: dict, x, precision) -> dict:
  """{"w_up": z_up, "w_gate": z_gate}: x @ W[:, h] + b[h] in f32 for each weight present."""
  z = {}
  for name in WEIGHTS_IN:
    if name in refs:
      z[name] = _dot(x, refs[name][...], precision)
      if BIASES_IN[name] in refs:
        z[name] = z[name] + refs[BIASES_IN[name]][...].astype(F32)
  return z


def _hidden(act: _TileActivation, z: dict):
  """act(z_up) (MLP) or act(z_gate) * z_up (GLU), f32."""
  if "w_gate" in z:
    return act(z["w_gate"]) * z["w_up"]
  return act(z["w_up"])


@dataclasses.dataclass(frozen=True)
class _HiddenGrads:
  hidden: jax.Array  # recomputed hidden tile, f32
  dz: dict  # {"w_up": dz_up, "w_gate": dz_gate}
  act_input: jax.Array  # z at the activation
  act_cotangent: jax.Array  # g = d(loss)/d(act output)


def _hidden_backward(act: _TileActivation, z: dict, d_hidden) -> _HiddenGrads:
  """Chain rule through the activation (and the GLU product) for one tile; see module doc."""
  if "w_gate" in z:
    value, derivative = act.with_derivative(z["w_gate"])
    g = d_hidden * z["w_up"]
    return _HiddenGrads(value * z["w_up"], {"w_up": d_hidden * value, "w_gate": g * derivative},
                        z["w_gate"], g)
  value, derivative = act.with_derivative(z["w_up"])
  return _HiddenGrads(value, {"w_up": d_hidden * derivative}, z["w_up"], d_hidden)


def _first(axis: int):
  return pl.program_id(axis) == 0


def _last(axis: int):
  return pl.program_id(axis) == pl.num_programs(axis) - 1


# ------------------------------------------------------------------------------------------------
# Kernel bodies
# ------------------------------------------------------------------------------------------------


def _forward_body(config: KernelConfig, refs: dict) -> None:
  """Grid (M tiles, H tiles); y[m] accumulates over H in acc."""
  acc = refs["acc"]

  @pl.when(_first(1))
  def _init():
    if "b_down" in refs:
      acc[...] = jnp.broadcast_to(refs["b_down"][...].astype(F32), acc.shape)
    else:
      acc[...] = jnp.zeros(acc.shape, F32)

  x = refs["x"][...]
  hidden = _hidden(_TileActivation(config.kind, refs), _pre_activations(refs, x, config.precision))
  acc[...] += _dot(hidden.astype(x.dtype), refs["w_down"][...], config.precision)

  @pl.when(_last(1))
  def _flush():
    refs["y"][...] = acc[...].astype(refs["y"].dtype)


def _backward_body(config: KernelConfig, refs: dict, *, kernel: str) -> None:
  """One body for the three backward kernels; the accumulators present decide what it computes.

  backward_dx (grid (m, h)): acc_dx, reset / flushed at the first / last H step.
  backward_dweights (grid (h, m)): per-H-tile weight-gradient blocks, reset / flushed at the
    first / last M step.
  backward_fused (grid (m, h)): both; the weight gradients are whole arrays resident for the
    entire grid, reset before the first step, flushed after the last, and each step adds into
    its bh hidden columns.
  """
  h_axis = 0 if kernel == "backward_dweights" else 1
  m_axis = 1 - h_axis
  whole = kernel == "backward_fused"
  weight_accumulators = [name for name in refs if name.startswith("acc_dw")]
  sums = [name for name in ("db_up", "db_gate", "pwl_sums") if name in refs]
  starts = _first(m_axis) & _first(h_axis) if whole else _first(m_axis)
  ends = _last(m_axis) & _last(h_axis) if whole else _last(m_axis)

  if "acc_dx" in refs:
    @pl.when(_first(h_axis))
    def _init_dx():
      refs["acc_dx"][...] = jnp.zeros(refs["acc_dx"].shape, F32)

  if weight_accumulators:
    @pl.when(starts)
    def _init_weight_grads():
      for name in weight_accumulators + sums:
        refs[name][...] = jnp.zeros(refs[name].shape, F32)

  x, dy = refs["x"][...], refs["dy"][...]
  act = _TileActivation(config.kind, refs)
  z = _pre_activations(refs, x, config.precision)
  grads = _hidden_backward(act, z, _dot(dy, refs["w_down"][...], config.precision, NT))

  if "acc_dx" in refs:
    for name, dz in grads.dz.items():
      refs["acc_dx"][...] += _dot(dz.astype(x.dtype), refs[name][...], config.precision, NT)

    @pl.when(_last(h_axis))
    def _flush_dx():
      refs["dx"][...] = refs["acc_dx"][...].astype(refs["dx"].dtype)

  if not weight_accumulators:
    return
  block_h = refs["w_up"].shape[1]
  columns = (pl.ds(pl.multiple_of(pl.program_id(h_axis) * block_h, block_h), block_h)
             if whole else slice(None))
  for name, dz in grads.dz.items():
    refs[f"acc_d{name}"][:, columns] += _dot(x, dz.astype(x.dtype), config.precision, TN)
    if f"d{BIASES_IN[name]}" in refs:
      refs[f"d{BIASES_IN[name]}"][:, columns] += jnp.sum(dz, axis=0, keepdims=True)
  refs["acc_dw_down"][columns, :] += _dot(grads.hidden.astype(x.dtype), dy, config.precision, TN)
  if config.kind == "pwl":
    for row, column_sum in enumerate(act.segment_column_sums(grads.act_input, grads.act_cotangent)):
      refs["pwl_sums"][pl.ds(row, 1), columns] += column_sum

  @pl.when(ends)
  def _flush_weight_grads():
    for name in weight_accumulators:
      out = refs[name.removeprefix("acc_")]
      out[...] = refs[name][...].astype(out.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call plumbing: named operands, padding, block specs
# ------------------------------------------------------------------------------------------------


def _block_specs(blocks: Blocks, padded: PaddedShape, num_pwl_rows: int, m_axis: int,
                 whole_weight_grads: bool) -> dict:
  """BlockSpec per operand name for a 2-D grid whose M-tile index is grid axis `m_axis`; the
  weight-gradient outputs are per-H-tile blocks, or whole arrays if `whole_weight_grads`."""
  bm, bh = blocks.block_m, blocks.block_h

  def spec(shape, index):  # index: (m, h) -> block index
    return pl.BlockSpec(shape, lambda *ij: index(ij[m_axis], ij[1 - m_axis]))

  rows_by_m = lambda m, h: (m, 0)
  cols_by_h = lambda m, h: (0, h)
  rows_by_h = lambda m, h: (h, 0)
  whole = lambda m, h: (0, 0)
  specs = dict(
      x=spec((bm, padded.d), rows_by_m), dy=spec((bm, padded.d_out), rows_by_m),
      y=spec((bm, padded.d_out), rows_by_m), dx=spec((bm, padded.d), rows_by_m),
      w_down=spec((bh, padded.d_out), rows_by_h), b_down=spec((1, padded.d_out), whole))
  for name in WEIGHTS_IN:
    specs[name] = spec((padded.d, bh), cols_by_h)
    specs[BIASES_IN[name]] = spec((1, bh), cols_by_h)
  gradient_columns = padded.h if whole_weight_grads else bh
  by_h = (lambda index: whole) if whole_weight_grads else (lambda index: index)
  specs.update(dw_down=spec((gradient_columns, padded.d_out), by_h(rows_by_h)),
               pwl_sums=spec((num_pwl_rows, gradient_columns), by_h(cols_by_h)))
  for name in WEIGHTS_IN:
    specs[f"d{name}"] = spec((padded.d, gradient_columns), by_h(cols_by_h))
    specs[f"d{BIASES_IN[name]}"] = spec((1, gradient_columns), by_h(cols_by_h))
  for name in TABLES:
    specs[name] = pl.BlockSpec(memory_space=pltpu.SMEM)
  return specs


def _padded_shapes(padded: PaddedShape) -> dict:
  """The padded 2-D shape of every operand name (biases as [1, n] rows)."""
  shapes = dict(x=(padded.m, padded.d), dy=(padded.m, padded.d_out), y=(padded.m, padded.d_out),
                dx=(padded.m, padded.d), w_down=(padded.h, padded.d_out),
                dw_down=(padded.h, padded.d_out), b_down=(1, padded.d_out))
  for name in WEIGHTS_IN:
    shapes[name] = shapes[f"d{name}"] = (padded.d, padded.h)
    shapes[BIASES_IN[name]] = shapes[f"d{BIASES_IN[name]}"] = (1, padded.h)
  return shapes


def _pad(array, shape):
  """Zero-pad a 1-D bias to a [1, n] row or a 2-D array to `shape` (no-op when already there).

  Zeros are exact here: padded D columns add 0 to every dot product; padded H columns have
  z = 0 and meet zero rows of W_down (forward) and d = 0 (backward); padded rows of x and dy
  contribute 0 to every weight gradient."""
  array = array.reshape(1, -1) if array.ndim == 1 else array
  return jnp.pad(array, [(0, s - n) for s, n in zip(shape, array.shape)])


def _run_kernel(config: KernelConfig, kernel: str, inputs: dict, outputs: dict,
                scratch: dict) -> dict:
  """Run `kernel`'s body over its grid on the zero-padded `inputs` (name -> array).

  `outputs` maps name -> (dtype, unpadded 2-D shape) and `scratch` name -> f(blocks, padded
  shape) -> f32 VMEM shape; returns {name: output sliced back to its unpadded shape}."""
  blocks: Blocks = getattr(config.tiling, kernel)
  padded = PaddedShape.of(config.problem, blocks)
  m_axis = 1 if kernel == "backward_dweights" else 0
  whole_weight_grads = kernel == "backward_fused"  # resident across the whole grid: sequential
  num_pwl_rows = 2 * config.problem.pwl_segments
  specs = _block_specs(blocks, padded, num_pwl_rows, m_axis, whole_weight_grads)
  shapes = _padded_shapes(padded)
  shapes["pwl_sums"] = (num_pwl_rows, padded.h)
  tiles = (padded.m // blocks.block_m, padded.h // blocks.block_h)
  grid = tiles if m_axis == 0 else tiles[::-1]
  arrays = [a if name in TABLES else _pad(a, shapes[name]) for name, a in inputs.items()]
  names = [*inputs, *outputs, *scratch]
  body = (_forward_body if kernel == "forward"
          else functools.partial(_backward_body, kernel=kernel))

  def kernel_fn(*refs):
    body(config, dict(zip(names, refs)))

  results = pl.pallas_call(
      kernel_fn, grid=grid,
      in_specs=[specs[name] for name in inputs],
      out_specs=[specs[name] for name in outputs],
      out_shape=[jax.ShapeDtypeStruct(shapes[name], dtype) for name, (dtype, _) in outputs.items()],
      scratch_shapes=[pltpu.VMEM(shape_fn(blocks, padded), F32) for shape_fn in scratch.values()],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("arbitrary" if whole_weight_grads else "parallel", "arbitrary"),
          vmem_limit_bytes=tiling_lib.vmem_limit_bytes(kernel, config.problem, blocks, config.chip)),
      interpret=config.interpret,
  )(*arrays)
  return {name: result[tuple(slice(0, n) for n in shape)]
          for (name, (_, shape)), result in zip(outputs.items(), results)}


def _inputs(x, weights: dict, tables: tuple, dy=None) -> dict:
  """Kernel inputs by name; the backward kernels get dy and do not need b_down."""
  if dy is None:
    return {"x": x, **weights, **dict(zip(TABLES, tables))}
  weights = {name: value for name, value in weights.items() if name != "b_down"}
  return {"x": x, "dy": dy, **weights, **dict(zip(TABLES, tables))}


def forward_kernel(config: KernelConfig, x, weights: dict, tables: tuple):
  m, d_out = x.shape[0], weights["w_down"].shape[1]
  out = _run_kernel(config, "forward", _inputs(x, weights, tables),
                    outputs={"y": (x.dtype, (m, d_out))},
                    scratch={"acc": lambda blocks, padded: (blocks.block_m, padded.d_out)})
  return out["y"]


_DX_SCRATCH = {"acc_dx": lambda blocks, padded: (blocks.block_m, padded.d)}


def _weight_grad_operands(config: KernelConfig, x, weights: dict, whole: bool):
  """(outputs, scratch) of the weight gradients: f32 accumulators of [D, bh] / [bh, D_out]
  blocks, or of the whole [D, H] / [H, D_out] arrays if `whole`; bias and PWL sums in f32."""
  d, h = weights["w_up"].shape
  d_out = weights["w_down"].shape[1]
  columns = (lambda blocks, padded: padded.h) if whole else (lambda blocks, padded: blocks.block_h)
  outputs = {"dw_down": (x.dtype, (h, d_out))}
  scratch = {"acc_dw_down": lambda blocks, padded: (columns(blocks, padded), padded.d_out)}
  for name in WEIGHTS_IN:
    if name in weights:
      outputs[f"d{name}"] = (x.dtype, (d, h))
      scratch[f"acc_d{name}"] = lambda blocks, padded: (padded.d, columns(blocks, padded))
      if BIASES_IN[name] in weights:
        outputs[f"d{BIASES_IN[name]}"] = (F32, (1, h))
  if config.kind == "pwl":
    outputs["pwl_sums"] = (F32, (2 * config.problem.pwl_segments, h))
  return outputs, scratch


def _finish_weight_grads(config: KernelConfig, out: dict, weights: dict, tables: tuple,
                         dy) -> tuple[dict, tuple]:
  """Kernel outputs -> ({weight name: gradient}, PWL table gradients or ()); db_down by XLA."""
  grads = {name: out[f"d{name}"].reshape(weights[name].shape).astype(weights[name].dtype)
           for name in weights if name != "b_down"}
  if "b_down" in weights:
    grads["b_down"] = jnp.sum(dy.astype(F32), axis=0).astype(weights["b_down"].dtype)
  if config.kind != "pwl":
    return grads, ()
  sums = jnp.sum(out["pwl_sums"], axis=1)
  knots, slopes, intercepts = tables
  segments = config.problem.pwl_segments
  return grads, (jnp.zeros_like(knots), sums[:segments].astype(slopes.dtype),
                 sums[segments:].astype(intercepts.dtype))


def backward_dx_kernel(config: KernelConfig, x, weights: dict, tables: tuple, dy):
  out = _run_kernel(config, "backward_dx", _inputs(x, weights, tables, dy=dy),
                    outputs={"dx": (x.dtype, x.shape)}, scratch=_DX_SCRATCH)
  return out["dx"]


def backward_dweights_kernel(config: KernelConfig, x, weights: dict, tables: tuple,
                             dy) -> tuple[dict, tuple]:
  """({weight name: gradient}, gradients of the PWL tables or ())."""
  outputs, scratch = _weight_grad_operands(config, x, weights, whole=False)
  out = _run_kernel(config, "backward_dweights", _inputs(x, weights, tables, dy=dy), outputs,
                    scratch)
  return _finish_weight_grads(config, out, weights, tables, dy)


def backward_fused_kernel(config: KernelConfig, x, weights: dict, tables: tuple,
                          dy) -> tuple[jax.Array, dict, tuple]:
  """(dx, {weight name: gradient}, gradients of the PWL tables or ()) from one kernel."""
  outputs, scratch = _weight_grad_operands(config, x, weights, whole=True)
  out = _run_kernel(config, "backward_fused", _inputs(x, weights, tables, dy=dy),
                    {"dx": (x.dtype, x.shape), **outputs}, {**_DX_SCRATCH, **scratch})
  return (out["dx"], *_finish_weight_grads(config, out, weights, tables, dy))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_ffn(config: KernelConfig, x, weights: dict, tables: tuple):
  return forward_kernel(config, x, weights, tables)


def _fused_ffn_fwd(config, x, weights, tables):
  return forward_kernel(config, x, weights, tables), (x, weights, tables)


def _fused_ffn_bwd(config, residuals, dy):
  x, weights, tables = residuals
  if config.tiling.backward_fused:
    return backward_fused_kernel(config, x, weights, tables, dy)
  dx = backward_dx_kernel(config, x, weights, tables, dy)
  d_weights, d_tables = backward_dweights_kernel(config, x, weights, tables, dy)
  return dx, d_weights, d_tables


_fused_ffn.defvjp(_fused_ffn_fwd, _fused_ffn_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------


def make_config(x, w_up, w_down, w_gate, activation: Activation, *, precision=None,
                tiling: Tiling | None = None, interpret: Any = False,
                chip: str | None = None) -> KernelConfig:
  """Check what the kernels can serve and fix their static configuration (see ``fused_ffn``)."""
  if activation.kind == "callable":
    raise NotImplementedError("arbitrary callable activations run on the XLA path only")
  if x.ndim != 2:
    raise ValueError(f"x: expected a 2-D array [M, D], got shape {x.shape}")
  if x.dtype not in SUPPORTED_DTYPES:
    raise NotImplementedError(f"{x.dtype.name} inputs (the TPU kernel takes bfloat16 or float32)")
  if x.shape[0] == 0:
    raise NotImplementedError("empty input (M = 0)")
  problem = Problem(m=x.shape[0], d=x.shape[1], h=w_up.shape[1], d_out=w_down.shape[1],
                    itemsize=x.dtype.itemsize, glu=w_gate is not None,
                    pwl_segments=activation.knots.shape[0] + 1 if activation.kind == "pwl" else 0)
  chip_info = tiling_lib.chip_info(chip) if chip else _attached_chip(interpret)
  if tiling is None:
    tiling = tiling_lib.choose_tiling(problem, chip_info)
  tiling.validate(problem)
  return KernelConfig(activation.kind, problem, tiling, chip_info, precision,
                      interpret)


def pack_operands(w_up, w_down, w_gate, b_up, b_gate, b_down,
                  activation: Activation) -> tuple[dict, tuple]:
  """(weights and biases present, by name; the PWL tables (knots, slopes, intercepts) or ())."""
  weights = dict(w_up=w_up, w_down=w_down, w_gate=w_gate, b_up=b_up, b_gate=b_gate, b_down=b_down)
  tables = (activation.knots, activation.slopes, activation.intercepts) if activation.kind == "pwl" else ()
  return {name: value for name, value in weights.items() if value is not None}, tables


def fused_ffn(x, w_up, w_down, w_gate=None, b_up=None, b_gate=None, b_down=None, *,
              activation: Activation, precision=None, tiling: Tiling | None = None,
              interpret: Any = False, chip: str | None = None) -> jax.Array:
  """The fused FFN on 2-D x [M, D]; the signature of ``flashffn_jax.ops.reference_ffn`` plus:

  Args:
    tiling: blocks per kernel; None chooses them with ``tiling.choose_tiling`` for the chip.
    interpret: False (compile with Mosaic) or a ``pltpu.InterpretParams`` (run on any backend).
    chip: "v5e", "v6e", ... whose VMEM to budget for; None: the attached TPU, or
      ``tiling.DEFAULT_CHIP`` when interpreting without one.

  Raises:
    NotImplementedError: for what this kernel does not serve (callable activations, float16,
      shapes whose blocks fit no VMEM), so the public op falls back to XLA.
  """
  config = make_config(x, w_up, w_down, w_gate, activation, precision=precision, tiling=tiling,
                       interpret=interpret, chip=chip)
  weights, tables = pack_operands(w_up, w_down, w_gate, b_up, b_gate, b_down, activation)
  return _fused_ffn(config, x, weights, tables)


def _attached_chip(interpret):
  if not interpret and pltpu.is_tpu_device():
    return pltpu.get_tpu_info()
  return tiling_lib.chip_info(tiling_lib.DEFAULT_CHIP)


INTERPRET_PARAMS = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def pallas_tpu(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation: Activation,
               precision=None) -> jax.Array:
  """Registered implementation "pallas_tpu": the compiled kernel; declines off TPU."""
  if jax.default_backend() != "tpu":
    raise NotImplementedError(f"needs a TPU (the default backend is {jax.default_backend()}); "
                              "'pallas_tpu_interpret' runs the same kernel anywhere")
  return fused_ffn(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation=activation,
                   precision=precision)


def pallas_tpu_interpret(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation: Activation,
                         precision=None) -> jax.Array:
  """Registered implementation "pallas_tpu_interpret": the same kernel in TPU interpret mode
  (any backend; out-of-bounds reads raise, uninitialised memory is NaN). Never auto-selected."""
  return fused_ffn(x, w_up, w_down, w_gate, b_up, b_gate, b_down, activation=activation,
                   precision=precision, interpret=INTERPRET_PARAMS)
