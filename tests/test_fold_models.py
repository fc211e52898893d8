"""The fold on real models (a 2-layer SmolLM2 slice, MiniLM) and through the CLIs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flashffn_jax as ff
from flashffn_jax import cli, fold, models
from flashffn_jax.fold import model as fold_model_module
from flashffn_jax.models import bert, smollm2
from tests.conftest import relative_error
from tests.test_models import SLICE_LAYERS, needs_minilm, needs_smollm2

forward = nnx.jit(lambda model, tokens: model(tokens))
decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
SMALL_CALIBRATION = 512  # tokens: enough for a 2-layer test, fast on 2 cores


def set_implementation(model, implementation):
  for _, layer in fold.folded_layers(model):
    layer.implementation = implementation


@needs_smollm2
def test_folded_glu_slice_prefill_and_kv_cache_decode(rng):
  model, tokenizer = smollm2.load(num_layers=SLICE_LAYERS)
  calibration = fold.shakespeare_calibration("smollm2", tokenizer, tokens=SMALL_CALIBRATION,
                                             seq_len=128, batch_size=4)
  # the lines' fold, so that outliers="all" reproduces the exact model
  folded = ff.linearize(model, fold.FoldSpec(exact_fraction=0.6, calibration=calibration,
                                             refit=False))
  layers = fold.folded_layers(folded)
  assert len(layers) == SLICE_LAYERS and all(layer.glu for _, layer in layers)
  stats = [dict(layer.stats) for _, layer in layers]
  assert all(0 < s["folded"] < s["neurons"] for s in stats)  # GLU: some neurons fold, some stay
  tokens = jnp.asarray(rng.integers(0, 49152, size=(2, 40)), jnp.int32)  # 80 tokens: dense path
  exact = forward(model, tokens)
  fold.set_outliers(folded, "all")
  assert relative_error(forward(folded, tokens), exact) < 1e-4
  fold.set_outliers(folded, "predicted")
  dense = forward(folded, tokens)
  assert 1e-5 < relative_error(dense, exact) < 0.2
  # KV-cache decode, one token per step on the gather path at the calibrated capacity: equal to
  # the dense fold unless a step's flags overflow the capacity (its least important flags drop)
  set_implementation(folded, "gather")
  cache, steps = folded.init_cache(1, 16), []
  for t in range(9):
    logits, cache = decode(folded, tokens[:1, t:t + 1], cache)
    steps.append(logits)
  assert relative_error(jnp.concatenate(steps, axis=1), dense[:1, :9]) < 2e-2


@needs_minilm
def test_folded_minilm_embeddings_stay_close(rng):
  model, tokenizer = models.load("minilm")
  calibration = fold.shakespeare_calibration("minilm", tokenizer, tokens=SMALL_CALIBRATION * 2)
  folded = ff.linearize(model, fold.FoldSpec(exact_fraction=0.3, calibration=calibration), layers=[0, 5])
  assert [path for path, _ in fold.folded_layers(folded)] == [("layers", 0, "mlp"), ("layers", 5, "mlp")]
  lines = fold.model.sentences("validation", 16, seed=int(rng.integers(1 << 30)))
  tokens, mask = bert.tokenize(tokenizer, lines)
  embed = nnx.jit(lambda m, t, k: m.embed(t, k))
  exact, approx = embed(model, tokens, mask), embed(folded, tokens, mask)
  cosine = np.sum(np.asarray(exact) * np.asarray(approx), axis=-1)
  assert cosine.min() > 0.97 and cosine.mean() < 1 - 1e-6


@needs_smollm2
def test_cli_eval_and_generate_with_a_fold(monkeypatch, capsys):
  monkeypatch.setattr(models, "load", lambda name, path=None, dtype=jnp.float32:
                      smollm2.load(path, dtype=dtype, num_layers=SLICE_LAYERS))
  monkeypatch.setattr(fold_model_module, "DEFAULT_CALIBRATION_TOKENS", SMALL_CALIBRATION)
  assert cli.main(["eval", "--text", "shakespeare:validation", "--max-tokens", "64", "--seq-len",
                   "32", "--activation", "fold50-int2", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["activation"] == "fold50-int2" and result["tokens"] == 64
  assert np.isfinite(result["ppl"]) and result["ppl"] > 1
  assert cli.main(["generate", "--prompt", "To be", "--max-new-tokens", "3", "--activation",
                   "fold50", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["text"]


@needs_smollm2
def test_cli_finetune_trains_the_fold_and_eval_restores_it(monkeypatch, capsys, tmp_path):
  """`flashffn finetune --activation fold50 --trainable pwl` trains W_fold / b_fold of every
  folded layer; `flashffn eval --checkpoint` rebuilds the same fold and restores them."""
  from flashffn_jax.finetune.adapters import split_params
  from tests.test_finetune import trained_params

  monkeypatch.setattr(models, "load", lambda name, path=None, dtype=jnp.float32:
                      smollm2.load(path, dtype=dtype, num_layers=SLICE_LAYERS))
  monkeypatch.setattr(fold_model_module, "DEFAULT_CALIBRATION_TOKENS", SMALL_CALIBRATION)
  out = str(tmp_path / "run")
  assert cli.main(["finetune", "--activation", "fold50", "--trainable", "pwl", "--steps", "2",
                   "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "0", "--learning-rate",
                   "1e-3", "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
                   "--max-train-windows", "8", "--out", out, "--no-progress"]) == 0
  trained = trained_params(out)
  names = sorted(f"layers.{i}.mlp.{n}" for i in range(SLICE_LAYERS) for n in ("b_fold", "w_fold"))
  assert sorted(trained) == names
  model, tokenizer = models.load("smollm2")
  calibration = fold.shakespeare_calibration("smollm2", tokenizer)
  fresh = split_params(ff.linearize(model, fold.FoldSpec(exact_fraction=0.5, calibration=calibration),
                                    learnable=True), "pwl").trained
  assert set(fresh) == set(names) and not np.allclose(fresh[names[1]], trained[names[1]])
  capsys.readouterr()
  assert cli.main(["eval", "--checkpoint", out, "--text", "shakespeare:validation", "--max-tokens",
                   "32", "--seq-len", "16", "--json"]) == 0
  assert np.isfinite(json.loads(capsys.readouterr().out)["ppl"])
