"""What trains: a split of the student's parameters into trained and frozen, and LoRA.

Modes (``FinetuneConfig.trainable``):
  all   every parameter of the student.
  ffn   every parameter inside a fused-FFN layer (weights, biases, learnable PWLs) or a folded
        FFN (``flashffn_jax.fold.FoldedFFN``: fold, correction rows, kept neurons, lines).
  ffn-weights  the same without the PWL parameters, which stay at their fit: the fused FFN's
        backward on Hopper then skips the PWL's segment sums. SmolLM2's training loop on the
        H200, GPU busy per step: this mode 24.60 ms (twenty-eighth session), PWLs built frozen
        (the same backward) 24.61 vs exact XLA FFNs 25.67 (twenty-sixth); PWLs trained, their
        sums in the dgrad kernel, 25.51 vs 25.68 (twenty-eighth: 158.9k vs 149.5k tokens/s).
        Give the weights a larger learning rate (~1e-4).
  pwl   only the learnable PWL parameters (tiny and cheap); in a folded FFN, the fold itself
        (W_fold, b_fold: the linear map that replaced the folded neurons).
  lora  low-rank adapters on each fused FFN's weight matrices, W' = W + (α/r) A B, with
        A ~ N(0, 1/in) [in, r] and B = 0 [r, out], so training starts from the linearized model;
        W stays frozen, plus the learnable PWL parameters.

Parameters are handled as flat dicts keyed by dotted paths ("layers.3.mlp.w_up"), so optax
and orbax see plain pytrees of arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flashffn_jax.fold.layer import FoldedFFN
from flashffn_jax.nnx import FusedFFN

Path = tuple


def _fused_ffn_paths(model: nnx.Module, kinds: tuple = (FusedFFN, FoldedFFN)) -> list[Path]:
  return [tuple(path) for path, module in nnx.iter_graph(model) if isinstance(module, kinds)]


def _under(path: Path, prefixes: list[Path]) -> bool:
  return any(path[:len(p)] == p for p in prefixes)


def _is_pwl(path: Path) -> bool:
  return any(str(part) in FusedFFN.PWL_PARAM_NAMES for part in path)


def is_pwl_key(key: str) -> bool:
  """Whether a dotted parameter key is one of a fused FFN's PWL parameters."""
  return _is_pwl(tuple(key.split(".")))


def trained_paths(model: nnx.Module, mode: str) -> set[Path]:
  """Paths (tuples of keys) of the parameters that ``mode`` trains directly."""
  ffn_paths = _fused_ffn_paths(model)
  if mode != "all" and not ffn_paths:
    raise ValueError(f"trainable: {mode!r} needs fused FFN layers; linearize the model first")
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  paths = {tuple(path) for path, _ in params}
  if mode == "all":
    return paths
  if mode == "ffn":
    return {p for p in paths if _under(p, ffn_paths)}
  if mode == "ffn-weights":
    return {p for p in trained_paths(model, "ffn") if not _is_pwl(p)}
  folds = _fused_ffn_paths(model, (FoldedFFN,))
  chosen = {p for p in paths if _under(p, ffn_paths) and _is_pwl(p)
            or _under(p, folds) and str(p[-1]) in FoldedFFN.FOLD_PARAM_NAMES}
  if mode == "pwl" and not chosen:
    raise ValueError("trainable: 'pwl' needs learnable PWL activations (linearize(..., learnable=True))")
  return chosen


def dotted(path: Path) -> str:
  return ".".join(str(part) for part in path)


@dataclasses.dataclass(frozen=True)
class ParamSplit:
  """The student as (graph, trained, frozen); ``merge`` rebuilds a callable model."""

  graphdef: nnx.GraphDef
  trained: dict[str, jax.Array]  # dotted path -> array; LoRA factors are "<weight>.lora_a/b"
  frozen: dict[str, jax.Array]  # (pass as a jit argument, see merge)
  rest: nnx.State  # non-Param state
  paths: dict[str, Path]  # dotted -> original path of every model parameter
  dtypes: dict[str, jnp.dtype]  # dotted -> the model's dtype for it (trained copies may be f32)
  adapted: tuple[str, ...]  # weights with LoRA factors (empty unless mode == "lora")
  lora_scale: float

  def effective_params(self, trained: dict, frozen: dict) -> dict[str, jax.Array]:
    """All model parameters with the adapters folded in: W + scale · A B."""
    params = {**frozen, **{k: v for k, v in trained.items() if k in self.paths}}
    for name in self.adapted:
      delta = self.lora_scale * (trained[name + ".lora_a"] @ trained[name + ".lora_b"])
      params[name] = params[name] + delta
    return params

  def merge(self, trained: dict, frozen: dict | None = None) -> nnx.Module:
    """The model with ``trained`` (and ``frozen``, default: the split's own) in place, each
    parameter cast to the model's dtype (float32 masters of bfloat16 weights compute in bf16).
    Inside jit pass ``frozen`` as an argument so it is not baked in as a constant."""
    frozen = self.frozen if frozen is None else frozen
    params = {k: v.astype(self.dtypes[k]) for k, v in self.effective_params(trained, frozen).items()}
    state = nnx.from_flat_state([(self.paths[k], v) for k, v in params.items()])
    return nnx.merge(self.graphdef, state, self.rest)


def split_params(model: nnx.Module, mode: str, *, lora_rank: int = 8, lora_alpha: float = 16.0,
                 key: jax.Array | None = None) -> ParamSplit:
  """Split ``model`` for training in ``mode`` (see the module docstring)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = {tuple(path): value for path, value in nnx.to_flat_state(params)}
  arrays = {dotted(p): v.get_value() if isinstance(v, nnx.Variable) else v for p, v in flat.items()}
  paths = {dotted(p): p for p in flat}
  adapted: list[str] = []
  if mode == "lora":
    ffn = trained_paths(model, "ffn")
    adapted = sorted(dotted(p) for p in ffn if arrays[dotted(p)].ndim == 2 and not _is_pwl(p))
    chosen = {dotted(p) for p in ffn if _is_pwl(p)}
  else:
    chosen = {dotted(p) for p in trained_paths(model, mode)}
  trained = {k: v for k, v in arrays.items() if k in chosen}
  frozen = {k: v for k, v in arrays.items() if k not in chosen}
  key = jax.random.key(0) if key is None else key
  for name, sub in zip(adapted, jax.random.split(key, max(len(adapted), 1))):
    fan_in, fan_out = arrays[name].shape
    trained[name + ".lora_a"] = jax.random.normal(sub, (fan_in, lora_rank), jnp.float32) / jnp.sqrt(fan_in)
    trained[name + ".lora_b"] = jnp.zeros((lora_rank, fan_out), jnp.float32)
  dtypes = {k: v.dtype for k, v in arrays.items()}
  return ParamSplit(graphdef, trained, frozen, rest, paths, dtypes, tuple(adapted), lora_alpha / lora_rank)
