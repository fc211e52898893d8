"""Helpers the GPU benchmarks rely on for their numbers (checked here, where no GPU is needed)."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

import flashffn_jax as ff
from flashffn_jax.ops import reference_ffn, to_kernel_activation
from pallas_kernels.activation import Activation

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))
from bench_gpu import (SHAPES, Recorder, Shape, bench_shape, candidates,  # noqa: E402
                       interleaved_seconds, markdown, with_pwl_gradients, xla_forward)
from gpu_profile import idle_ns_before, ns_per_launch, union_ns  # noqa: E402
import gpu_clocks  # noqa: E402
from bench_pwl_lookup import LOOKUPS, elementwise_pass, problem  # noqa: E402
import bench_backward_profile  # noqa: E402
import bench_down_projection  # noqa: E402
import bench_glu_input_grads  # noqa: E402
from profile_decode_kernel import summarize as summarize_kernel_profile  # noqa: E402
from run_epilogue_kernel import (low_bits_int8, segment_index_int32,  # noqa: E402
                                 segment_index_int32_masks)

from pallas_kernels.gpu import backward, dispatch  # noqa: E402


def test_union_of_kernel_intervals_counts_overlap_once():
  """GPU-busy time: overlapping kernels (two streams) count once, gaps not at all."""
  assert union_ns([(0, 10), (5, 15), (20, 30)]) == 25
  assert union_ns([(20, 30), (0, 100)]) == 100
  assert union_ns([(0, 4), (4, 9)]) == 9
  assert union_ns([]) == 0


def test_kernel_times_split_a_name_launched_twice_per_call():
  """Two kernels of one name per call (the forward and segment-sum Mosaic kernels) are reported
  apart by launch ordinal; a trace whose calls differ falls back to names."""
  call = [("mosaic", 10), ("gemm", 5), ("mosaic", 3)]
  events, t = [], 0
  for name, length in call * 2:
    events.append((t, t + length, name))
    t += length + 1
  assert ns_per_launch(events, calls=2) == {"mosaic#0": 20, "gemm": 10, "mosaic#1": 6}
  assert ns_per_launch(events[:-1], calls=2) == {"mosaic": 23, "gemm": 10}


def test_idle_time_is_charged_to_the_launch_the_gpu_waited_for():
  """A gap between kernels counts for the kernel after it (by launch ordinal); time covered by
  an overlapping kernel on another stream is not idle."""
  events = [(0, 10, "mosaic"), (13, 20, "gemm"), (15, 30, "copy"), (31, 40, "mosaic"),
            (50, 60, "mosaic"), (60, 65, "gemm"), (65, 70, "copy"), (74, 80, "mosaic")]
  assert idle_ns_before(events, calls=2) == {"gemm": 3, "mosaic#1": 1 + 4, "mosaic#0": 10}


def test_interleaved_timing_takes_turns():
  """Each round times every run in turn (a warm call, then reps dispatches), so drift hits all
  variants alike."""
  order = []
  runs = {name: (lambda name=name: order.append(name) or jnp.zeros(())) for name in "ab"}
  seconds = interleaved_seconds(runs, calls_per_run=1, reps=2, rounds=3, min_sample_s=0)
  assert order == (["a"] * 3 + ["b"] * 3) * 3
  assert set(seconds) == {"a", "b"} and all(value > 0 for value in seconds.values())


def test_bench_shape_times_what_compiles_and_records_what_fails(tmp_path):
  """The GPU benchmark's flow on CPU: the kernel candidates fail (recorded with their reason),
  the XLA forwards and fwd+bwd steps are compiled, checked and timed together, and the table
  renders."""
  rec = Recorder(str(tmp_path), "cpu", budget_s=600)
  summary = bench_shape(rec, Shape("tiny", 96, 64, 128, True, "silu"), np.random.default_rng(0),
                        peak_tflops=1.0, with_tokamax=False, pwl_dtypes=("float16",),
                        backward_chunks_mi=(16,), residuals=("floor-bits",))
  assert summary["best_plan"] is None
  failed = [r for r in rec.records if r["what"].startswith("epilogue")]
  assert failed and all("NVIDIA GPU" in r["error"] for r in failed)
  for key in ("xla_exact", "xla_pwl"):
    assert summary[key]["ms"] > 0 and summary[key]["rel_err"] < 2e-2
  for key in ("train:xla-exact", "train:xla-pwl16"):
    assert summary[key]["ms"] > 0 and summary[key]["saved_mb"] > 0
  assert "| tiny | 96 | none |" in markdown([summary], "cpu", 1.0)


def test_pwl_gradient_step_differentiates_the_pwl_parameters():
  """The profile's trainable-PWL step returns the gradients w.r.t. x, the weights and the PWL's
  slopes and intercepts, the latter equal to jax.grad of the same loss by hand."""
  rng = np.random.default_rng(0)
  x, wu, wd, dy = (jnp.asarray(rng.normal(size=s), jnp.float32)
                   for s in ((16, 8), (8, 24), (24, 8), (16, 8)))
  pwl = to_kernel_activation(ff.fit("gelu", 8))
  value, grads = with_pwl_gradients(xla_forward, pwl)(x, wu, wd, None, dy)
  def loss(slopes, intercepts):
    y = reference_ffn(x, wu, wd, None, None, None, None,
                      Activation("pwl", pwl.knots, slopes, intercepts))
    return jnp.sum(y * dy) + 0.5 * jnp.sum(y * y)
  want = jax.grad(loss, argnums=(0, 1))(pwl.slopes, pwl.intercepts)
  assert len(grads) == 5 and grads[3].shape == pwl.slopes.shape
  np.testing.assert_allclose(grads[3], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[4], want[1], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(grads[3])).max() > 0


def test_forward_candidates_fit_their_shapes():
  """Every epilogue plan bench_gpu times compiles within the kernel's limits for its shape (a
  refused plan would only show up as an error row after a machine start), both schedules are
  among them, and the library's own PWL plan is timed even when the sweep leaves its tiles out."""
  for shape in SHAPES:
    plans = candidates(shape)
    epilogues = [plan.epilogue for plan in plans.values() if plan.path == "epilogue"]
    assert {config.schedule for config in epilogues} == {"cooperative", "pingpong"}
    for config in epilogues:
      config.check(2 if shape.glu else 1, jnp.bfloat16)
    library = dispatch.choose_plan(shape.rows, shape.d_model, shape.hidden, shape.d_model,
                                   shape.glu, True)
    for narrowed in (candidates(shape), candidates(shape, ("float32",), ("cooperative",))):
      assert library.path != "epilogue" or any(
          (plan.epilogue, plan.down) == (library.epilogue, library.down)
          for plan in narrowed.values()), shape.name


def test_segment_count_experiments_encode_what_they_claim(rng):
  """``run_epilogue_kernel``'s timing variants: both int32 counts are the library's segment index
  (NaN, infinities and points on knots included); the (bf16 hi, int8 lo) encoding gives p back
  within 2^-15 relative (half a step of ulp(hi) / 256, hi's exponent one above p's when p
  rounds up to a power of two; |p| >= 2^-100, where its exponent floor does not bite)."""
  knots = jnp.asarray(np.sort(rng.uniform(-4, 4, 16)), jnp.float32)
  p = rng.standard_normal(20_000).astype(np.float32) * np.float32(3)
  p[:4] = [np.nan, np.inf, -np.inf, knots[5]]
  p = jnp.asarray(p)
  for count in (segment_index_int32, segment_index_int32_masks):
    np.testing.assert_array_equal(count(p, knots, 16), backward.segment_index(p, knots, 16))
  magnitudes = np.concatenate([rng.standard_normal(10_000) * scale
                               for scale in (1e-20, 1e-3, 1.0, 1e3, 1e30)]).astype(np.float32)
  p = jnp.asarray(magnitudes)
  hi = p.astype(jnp.bfloat16).astype(jnp.float32)
  exponent = jnp.maximum(jax.lax.bitcast_convert_type(hi, jnp.int32) & 0x7F800000, 27 << 23)
  step = jax.lax.bitcast_convert_type(exponent - (15 << 23), jnp.float32)  # ulp(hi) / 256
  decoded = hi + low_bits_int8(p, None, 0).astype(jnp.float32) * step
  relative = np.abs(np.asarray(decoded - p, np.float64)) / np.abs(magnitudes.astype(np.float64))
  assert relative.max() <= 2.0**-15, relative.max()



def test_gpu_clocks_summarise_the_busy_samples_only():
  """``gpu_clocks.summary``: median / minimum clock and median power over the samples at >= 90%
  utilization (compiles and teardown drop out), with every throttle reason seen there."""
  rows = [["1980", "80.0", "0", "0x0"],  # idle: left out
          ["1600", "690.5", "100", "0x4"], ["1500", "691.0", "99", "0x4"],
          ["1700", "689.0", "95", "0x0"], ["N/A", "N/A", "N/A", "N/A"]]
  assert gpu_clocks.summary(rows) == (
      "SM clock median 1600 MHz (min 1500), power median 690 W, clock-event reasons "
      "['0x0', '0x4'], 3 busy samples")
  assert gpu_clocks.summary(rows[:1]) == "no busy samples among 1"
  assert gpu_clocks.busy_clocks(rows) == [1600.0, 1500.0, 1700.0]


def test_pwl_lookup_variants_compute_the_same_pass():
  """The lookups bench_pwl_lookup times give the backward's (d_pre, h): the gather exactly, the
  step sums up to f32 rounding of the accumulated slope differences."""
  inputs = problem(64, 96)
  want = elementwise_pass(LOOKUPS["selects"])(*inputs)
  for name, tolerance in (("count-gather", 0.0), ("steps", 1e-2)):
    for got, expected in zip(elementwise_pass(LOOKUPS[name])(*inputs), want):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                                 rtol=tolerance, atol=tolerance, err_msg=name)


def test_down_projection_bench_compares_like_with_like(rng):
  """``bench_down_projection``: a config string gives those tiles, and its kernel (GPU interpret
  mode) computes XLA's h W_down + b_down at a shape with partial tiles."""
  config = bench_down_projection.parse_config("64x128x3:pingpong")
  assert (config.tile_m, config.tile_n, config.stages, config.schedule) == (64, 128, 3,
                                                                            "pingpong")
  args = bench_down_projection.problem(100, 128, 136, rng)
  want = bench_down_projection.projection(None)(*args)
  with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
    got = bench_down_projection.projection(config)(*args)
  assert got.shape == want.shape == (100, 136)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_glu_input_grads_bench_variants_compute_the_same_gradients(rng):
  """``bench_glu_input_grads``: the joint forms (one [M, 2H] array [d_g | d_u]) give the
  library's dx, dW_up, dW_down, dW_gate and bias sums, in the library's order."""
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  x, dy, h, d_up, d_gate, w_up, w_gate = (draw(40, 24), draw(40, 24), draw(40, 56), draw(40, 56),
                                          draw(40, 56), draw(24, 56), draw(24, 56))
  want = bench_glu_input_grads.separate(x, dy, w_up, w_gate, h, d_up, d_gate)
  got = bench_glu_input_grads.joint(x, dy, w_up, w_gate, h, jnp.concatenate([d_gate, d_up], 1))
  assert [g.shape for g in got] == [w.shape for w in want]
  for g, w in zip(got, want):  # one bf16 rounding of the same f32 sums
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=1e-2,
                               atol=1e-2 * float(np.max(np.abs(w))))


def test_backward_profile_rounds_table_takes_each_variants_median():
  """``bench_backward_profile --rounds``: one row per (shape, variant) with its times in round
  order and their median, a failed round shown and left out of the median; no table when every
  variant ran once."""
  runs = [dict(shape="s", variant="a", device_us=30.0), dict(shape="s", variant="b", device_us=5.0),
          dict(shape="s", variant="a", device_us=10.0), dict(shape="s", variant="b"),
          dict(shape="s", variant="a", device_us=20.0), dict(shape="s", variant="b", device_us=7.0)]
  table = bench_backward_profile.rounds_table(runs)
  assert "| s | a | 30.0 / 10.0 / 20.0 | 20.0 |" in table
  assert "| s | b | 5.0 / failed / 7.0 | 6.0 |" in table
  assert bench_backward_profile.rounds_table(runs[:2]) == []
  runs[0]["sm_clock_mhz"], runs[2]["sm_clock_mhz"] = 1755.0, 1590.0  # --log-clocks
  table = bench_backward_profile.rounds_table(runs)
  assert table[0].endswith("(@ median SM clock, MHz)")
  assert "| s | a | 30.0 @1755 / 10.0 @1590 / 20.0 | 20.0 |" in table


def test_kernel_profile_summary_reads_nested_regions_per_cta():
  """``profile_decode_kernel.summarize`` on a Mosaic GPU trace: per CTA, a region entered in a
  loop sums its entries, nested regions count inside their parent, shares are of the CTA's span
  (first entry to last exit), and medians run over CTAs; CTA starts are compared in us."""
  events = []
  for cta, (start, wait) in enumerate([(1000.0, 0.5), (1000.25, 1.5)]):
    add = lambda name, ph, t: events.append(dict(name=name, ph=ph, ts=start + t, tid=cta + 1,
                                                 pid=cta + 1))
    add("issue_loads", "B", 0.0), add("issue_loads", "E", 1.0), add("gemm1", "B", 1.0)
    for k in range(3):  # three K steps, each waiting `wait` kcycles
      add("wait_k_slice", "B", 1.0 + 2 * k), add("wait_k_slice", "E", 1.0 + 2 * k + wait)
    add("gemm1", "E", 7.0), add("final_store_wait", "B", 7.0), add("final_store_wait", "E", 8.0)
  summary = summarize_kernel_profile({"traceEvents": events})
  assert summary["ctas"] == 2 and summary["span_kcycles_median"] == 8.0
  assert summary["cta_start_spread_us"] == 0.25
  waits = summary["regions"]["wait_k_slice"]
  assert waits["entries"] == 3 and waits["total_kcycles"] == 3.0  # median of 1.5 and 4.5
  assert waits["start_kcycles"] == 1.0 and waits["share"] == 3.0 / 8.0
  assert summary["regions"]["gemm1"]["total_kcycles"] == 6.0


def test_generate_step_bench_times_every_variant_and_names_the_ffn_path(tmp_path):
  """bench_generate_step on one layer: a row per batch, steps a call and variant with a wall
  time and the implementation its MLPs run as (XLA on a CPU), the ratio to the exact model at
  that batch and steps a call, and the markdown table written."""
  import bench_generate_step
  rows = bench_generate_step.main(["--tiny", "--layers", "1", "--batches", "2", "--steps", "4",
                                   "--tokens-per-call", "1,3", "--out", str(tmp_path)])
  assert [(r["batch"], r["tokens_per_call"], r["variant"]) for r in rows] == [
      (2, k, v) for k in (1, 3) for v in bench_generate_step.VARIANTS]
  assert [r["ffn"] for r in rows] == ["nnx.Linear", "xla", "xla"] * 2
  assert all(r["wall_us_per_step"] > 0 for r in rows)
  assert all(r["wall_vs_exact"] > 0 for r in rows if r["variant"] != "exact-xla")
  (table,) = tmp_path.glob("generate-step-*-tiny.md")
  assert all(v in table.read_text() for v in bench_generate_step.VARIANTS)


def test_generate_bench_times_the_public_loop_and_checks_the_text(tmp_path):
  """bench_generate on the installed SmolLM2 (a few tokens): a row per steps a call with its
  time, the same text at 1 and 2 steps a call (its exit status says so), and
  the markdown table written."""
  import bench_generate
  status = bench_generate.main(["--tiny", "--activations", "exact", "--new-tokens", "4",
                                "--out", str(tmp_path)])
  (record,) = tmp_path.glob("generate-*-tiny.json")
  rows = json.loads(record.read_text())["rows"]
  assert status == 0 and [r["tokens_per_call"] for r in rows] == [1, 2]
  assert all(r["same_text_as_first"] and r["seconds"] > 0 for r in rows)
  assert rows[0]["text_start"] and "| float32 | exact | 2 |" in (
      tmp_path / record.name.replace(".json", ".md")).read_text()


def test_weights_stream_probe_lowers_for_cuda():
  """bench_decode_profile's weights-only launch lowers to a Mosaic GPU kernel at SmolLM2's
  decode shape (GLU: W_up, W_gate, W_down) and gpt2-small's (MLP), no GPU needed."""
  from bench_decode_profile import weights_stream
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  for d_model, hidden, glu in ((576, 1536, True), (768, 3072, False)):
    specs = (spec(16, d_model), spec(d_model, hidden), spec(hidden, d_model),
             spec(d_model, hidden) if glu else None)
    stream = lambda x, wu, wd, wg: weights_stream(48)(x, wu, wd, wg)
    module = jax.export.export(jax.jit(stream), platforms=["cuda"])(*specs).mlir_module()
    assert "mosaic_gpu" in module
