"""Measured proof of the partially-linear fold on real models (CPU is enough):

    PYTHONPATH=$PWD python3 benchmarks/bench_fold.py                  # both models
    PYTHONPATH=$PWD python3 benchmarks/bench_fold.py --models minilm --finetune-steps 0

all-MiniLM-L6-v2 (MLP, erf-GELU), per fold setting (exact fraction, predictor bits):
  - parameters read and FLOPs per token, removed vs the exact FFNs (``fold.report``), with the
    predictor's flag rate measured on held-out lines (validation plays);
  - predictor recall / precision and what its misses cost (FFN-output error of the missed
    outliers, next to the error the fold leaves inside the hot ranges);
  - embedding cosine to the exact model on 512 held-out lines, and the paraphrase-vs-unrelated
    margin (mean cosine of paraphrase pairs minus mean cosine of mismatched pairs) and retrieval
    accuracy on hand-written paraphrases of lines from the plays, for outlier modes predicted /
    oracle / predicted_or_oracle (no misses) / ignored (no corrections);
  - after fine-tuning (``--finetune-steps``, settings ``--finetune-fraction``): W_fold and b_fold
    of every layer distilled from the exact model's embeddings, loss 1 − cos, Adam, on
    training-play lines.
SmolLM2-135M (GLU, SiLU): the GLU variant's fraction removed and held-out perplexity (first
``--eval-tokens`` tokens of the validation plays) exact / folded / folded + fine-tuned (the
fine-tune loop of ``flashffn_jax.finetune``, trainable="pwl": W_fold and b_fold, KL to the exact
model).

Writes benchmarks/results/fold-<date>.json and .md (a section run again replaces its entry).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flashffn_jax as ff
from flashffn_jax import data, fold, models
from flashffn_jax.fold.model import CalibrationBatch, sentences
from flashffn_jax.fold.report import layer_cost, predictor_quality
from flashffn_jax.models import bert

# (line from a play, a paraphrase): the paraphrase-vs-unrelated margin of MiniLM.
PARAPHRASES = [
    ("To be, or not to be, that is the question.", "The question is whether to live or to die."),
    ("All the world's a stage, and all the men and women merely players.",
     "Life is a play in which every person is only an actor."),
    ("The course of true love never did run smooth.", "Real love has never had an easy path."),
    ("A horse! a horse! my kingdom for a horse!", "I would give my whole kingdom to get a horse."),
    ("Friends, Romans, countrymen, lend me your ears.", "Friends and fellow citizens of Rome, please listen to me."),
    ("Something is rotten in the state of Denmark.", "There is corruption in the Danish kingdom."),
    ("Brevity is the soul of wit.", "Being brief is the essence of being clever."),
    ("The lady doth protest too much, methinks.", "I think the woman objects too strongly to be believed."),
    ("Uneasy lies the head that wears a crown.", "A king can never rest easily."),
    ("That which we call a rose by any other name would smell as sweet.",
     "A rose would smell just as good if it were called something else."),
    ("Cowards die many times before their deaths; the valiant never taste of death but once.",
     "A coward dies many times in fear, but a brave man dies only once."),
    ("We are such stuff as dreams are made on.", "People are made of the same material as dreams."),
    ("Love looks not with the eyes, but with the mind.", "Love sees with the mind rather than with the eyes."),
    ("Double, double toil and trouble; fire burn and cauldron bubble.",
     "The witches stir the boiling pot while the fire burns."),
    ("If music be the food of love, play on.", "Keep playing music, since it feeds love."),
    ("The fault, dear Brutus, is not in our stars, but in ourselves.",
     "Brutus, our failures are our own doing and not fate's."),
    ("Out, damned spot! out, I say!", "Go away, cursed stain, go away!"),
    ("Parting is such sweet sorrow.", "Saying goodbye is sad and sweet at the same time."),
    ("Some are born great, some achieve greatness, and some have greatness thrust upon them.",
     "Greatness comes to people by birth, by effort, or by chance."),
    ("The better part of valour is discretion.", "Caution is the most important part of courage."),
    ("Neither a borrower nor a lender be.", "Do not borrow money and do not lend it."),
    ("Men at some time are masters of their fates.", "People sometimes control their own destiny."),
    ("This above all: to thine own self be true.", "Most importantly, be honest with yourself."),
    ("How sharper than a serpent's tooth it is to have a thankless child!",
     "An ungrateful child hurts more than a snake bite."),
    ("Hell is empty and all the devils are here.", "All the devils have left hell and come to this place."),
    ("I am a man more sinned against than sinning.", "Others have wronged me more than I have wronged them."),
    ("The quality of mercy is not strained.", "Mercy is not something that can be forced."),
    ("Lord, what fools these mortals be!", "Humans are such foolish creatures!"),
]
MINILM_SETTINGS = ((0.1, 4), (0.15, 4), (0.2, 4), (0.3, 4), (0.2, 2))  # (exact fraction, predictor bits)
SMOLLM2_SETTINGS = ((0.5, 4), (0.6, 4), (0.7, 4))
MEASURED_MODES = ("predicted", "oracle", "predicted_or_oracle", "ignored")

embed = nnx.jit(lambda model, tokens, mask: model.embed(tokens, mask))


def layer_report(model: nnx.Module, batches: list[CalibrationBatch]) -> dict:
  """Costs (with the held-out flag rate) and predictor quality of every FoldedFFN, summed/averaged."""
  layers = fold.folded_layers(model)
  inputs = fold.capture_inputs(model, [path for path, _ in layers], batches)
  per_layer = []
  for path, layer in layers:
    x = inputs[path]
    outliers, layer.outliers = layer.outliers, "all"  # "all" = the exact FFN up to rounding
    exact = np.asarray(jax.jit(layer.__call__)(jnp.asarray(x)), np.float64)
    layer.outliers = outliers
    quality = predictor_quality(layer, x, exact)
    per_layer.append({"path": ".".join(map(str, path)), **quality,
                      **layer_cost(layer, quality["flag_rate"]), **dict(layer.stats)})
  total = lambda key: float(sum(row[key] for row in per_layer))
  mean = lambda key: float(np.mean([row[key] for row in per_layer]))
  # Bytes-only ceiling on a decode step's speed-up with M sequences (``fold.report``).
  read_ceiling = [(m, total("exact_params") / sum(
      layer_cost(layer, dict(row["union_mean"])[m])["params_read"]
      for (_, layer), row in zip(layers, per_layer))) for m, _ in per_layer[0]["union_mean"]]
  return {"params_removed": 1 - total("params_read") / total("exact_params"),
          "read_ceiling": read_ceiling,
          "flops_removed": 1 - total("flops") / total("exact_flops"),
          "stored_vs_exact": total("stored_params") / total("exact_params"),
          "folded_fraction": total("folded") / (total("folded") + total("kept")),
          **{key: mean(key) for key in ("recall", "precision", "flag_rate", "outlier_rate",
                                        "missed_error", "in_range_error", "mean_missed_contribution",
                                        "mean_caught_contribution")},
          "layers": per_layer}


def fold_setting(model, calibration, exact_fraction: float, bits: int, batches) -> tuple:
  """(folded model with learnable lines, report entry) for one setting; the costs and predictor
  quality are measured on ``batches`` (held-out text)."""
  start = time.perf_counter()
  spec = fold.FoldSpec(exact_fraction=exact_fraction, predictor_bits=bits, calibration=calibration)
  folded = ff.linearize(model, spec, learnable=True)
  return folded, {"spec": spec.name, "exact_fraction": exact_fraction, "predictor_bits": bits,
                  "fold_seconds": time.perf_counter() - start, **layer_report(folded, batches)}


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------


def embedding_metrics(model, exact: np.ndarray, held_out: tuple, pairs: tuple) -> dict:
  """Cosine to the exact embeddings on held-out lines; paraphrase margin and retrieval accuracy."""
  embeddings = np.asarray(embed(model, *held_out))
  cosine = np.sum(embeddings * exact, axis=-1)
  first, second = (np.asarray(embed(model, *p)) for p in pairs)
  similarity = first @ second.T
  matched = np.diag(similarity)
  unrelated = similarity[~np.eye(len(similarity), dtype=bool)]
  return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
          "paraphrase_cosine": float(matched.mean()), "unrelated_cosine": float(unrelated.mean()),
          "margin": float(matched.mean() - unrelated.mean()),
          "retrieval_accuracy": float(np.mean(np.argmax(similarity, axis=1) == np.arange(len(similarity))))}


def finetune_minilm(folded, teacher, tokenizer, steps: int, learning_rate: float,
                    trainable: tuple = ("w_fold", "b_fold"), batch: int = 32):
  """Distil the folded layers' parameters named in ``trainable`` (FoldedFFN fields; "*": every
  nnx.Param inside a FoldedFFN) from the exact model's embeddings: loss = mean(1 − cos(student,
  teacher)) on training-play lines."""
  lines = sentences("train", steps * batch, seed=1)
  paths = [path for path, _ in fold.folded_layers(folded)]
  graphdef, params, rest = nnx.split(folded, nnx.Param, ...)
  flat = dict(nnx.to_flat_state(params))
  chosen = lambda k: any(k[:len(p)] == p and ("*" in trainable or k[len(p)] in trainable) for p in paths)
  trained = {k: v for k, v in flat.items() if chosen(k)}
  frozen = {k: v for k, v in flat.items() if k not in trained}
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, 0.1))
  opt_state = optimizer.init(trained)

  def loss_fn(trained, tokens, mask, target):
    state = nnx.from_flat_state({**frozen, **trained})
    student = nnx.merge(graphdef, state, rest).embed(tokens, mask)
    return jnp.mean(1.0 - jnp.sum(student * target, axis=-1))

  @jax.jit
  def step(trained, opt_state, tokens, mask, target):
    loss, grads = jax.value_and_grad(loss_fn)(trained, tokens, mask, target)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  losses = []
  for i in range(steps):
    tokens, mask = bert.tokenize(tokenizer, lines[i * batch:(i + 1) * batch])
    tokens, mask = _pad(tokens, mask, 48)
    target = embed(teacher, tokens, mask)
    trained, opt_state, loss = step(trained, opt_state, tokens, mask, target)
    losses.append(float(loss))
  return nnx.merge(graphdef, nnx.from_flat_state({**frozen, **trained}), rest), losses


def _pad(tokens, mask, length: int):
  """Pad [B, T] to T = length (one compiled step for every batch); longer lines are cut."""
  pad = lambda a: np.pad(a[:, :length], ((0, 0), (0, max(0, length - a.shape[1]))))
  return pad(tokens), pad(mask)


def run_minilm(args) -> dict:
  model, tokenizer = models.load("minilm")
  calibration = fold.shakespeare_calibration("minilm", tokenizer, tokens=args.calibration_tokens)
  held_out = bert.tokenize(tokenizer, sentences("validation", 512))
  pairs = tuple(bert.tokenize(tokenizer, list(side)) for side in zip(*PARAPHRASES))
  exact = np.asarray(embed(model, *held_out))
  predictor_batches = [CalibrationBatch(held_out, held_out[1])]
  result = {"exact": embedding_metrics(model, exact, held_out, pairs), "settings": []}
  print(f"minilm exact: {result['exact']}", flush=True)
  for exact_fraction, bits in MINILM_SETTINGS:
    folded, entry = fold_setting(model, calibration, exact_fraction, bits, predictor_batches)
    for mode in MEASURED_MODES:
      fold.set_outliers(folded, mode)
      entry[mode] = embedding_metrics(folded, exact, held_out, pairs)
    fold.set_outliers(folded, "predicted")
    if args.finetune_steps and bits == 4 and exact_fraction in args.finetune_fraction:
      start = time.perf_counter()
      tuned, losses = finetune_minilm(folded, model, tokenizer, args.finetune_steps, args.minilm_lr)
      entry["finetuned"] = {"steps": args.finetune_steps, "learning_rate": args.minilm_lr,
                            "trained": "W_fold, b_fold of every layer",
                            "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])),
                            "seconds": time.perf_counter() - start,
                            **embedding_metrics(tuned, exact, held_out, pairs),
                            "layers": layer_report(tuned, predictor_batches)}
      del entry["finetuned"]["layers"]["layers"]
    print(summary_line("minilm", entry), flush=True)
    result["settings"].append(entry)
  return result


# --------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------


def run_smollm2(args) -> dict:
  model, tokenizer = models.load("smollm2")
  calibration = fold.shakespeare_calibration("smollm2", tokenizer, tokens=args.calibration_tokens)
  tokens = data.split_tokens(tokenizer, "validation")[:args.eval_tokens + 1]
  ppl = lambda m: models.perplexity(m, tokens, seq_len=512, batch_size=2)["ppl"]
  held_out = [CalibrationBatch((tokens[None, :512],))]
  result = {"eval_tokens": args.eval_tokens, "exact_ppl": ppl(model), "settings": []}
  print(f"smollm2 exact perplexity {result['exact_ppl']:.3f}", flush=True)
  for exact_fraction, bits in SMOLLM2_SETTINGS:
    folded, entry = fold_setting(model, calibration, exact_fraction, bits, held_out)
    for mode in ("predicted", "oracle", "ignored"):
      fold.set_outliers(folded, mode)
      entry[mode + "_ppl"] = ppl(folded)
    fold.set_outliers(folded, "predicted")
    if args.finetune_steps and exact_fraction == args.smollm2_finetune_fraction:
      entry["finetuned"] = finetune_smollm2(args, model, folded, tokenizer, ppl)
    print(summary_line("smollm2", entry), flush=True)
    result["settings"].append(entry)
  return result


def finetune_smollm2(args, teacher, student, tokenizer, ppl) -> dict:
  """The library's fine-tune loop on the folded student, trainable="pwl" (for a fold: W_fold and
  b_fold of every layer), KL to the exact model on training-play windows."""
  from flashffn_jax.finetune import FinetuneConfig, finetune

  out = pathlib.Path(args.work_dir) / f"fold-smollm2-{time.strftime('%Y%m%d-%H%M%S')}"
  config = FinetuneConfig(out=str(out), model="smollm2", trainable="pwl",
                          activation=f"fold{round(100 * args.smollm2_finetune_fraction)}",
                          steps=args.finetune_steps, warmup_steps=min(5, args.finetune_steps - 1),
                          batch_size=4, seq_len=128, learning_rate=args.smollm2_lr,
                          eval_every=args.finetune_steps, checkpoint_every=args.finetune_steps)
  start = time.perf_counter()
  run = finetune(config, built=(teacher, student, tokenizer), progress=False)
  return {"steps": args.finetune_steps, "learning_rate": args.smollm2_lr, "trainable": "pwl (W_fold, b_fold)",
          "tokens_trained": run.tokens_trained, "loop_validation_ppl": run.finetuned_ppl,
          "loop_linearized_ppl": run.linearized_ppl, "loop_exact_ppl": run.exact_ppl,
          "ppl": ppl(run.model), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summary_line(name: str, entry: dict) -> str:
  quality = (f"cos {entry['predicted']['cosine_mean']:.4f} margin {entry['predicted']['margin']:.3f}"
             if "predicted" in entry else f"ppl {entry['predicted_ppl']:.2f}")
  return (f"{name} {entry['spec']}: params read -{100 * entry['params_removed']:.1f}%, FLOPs "
          f"-{100 * entry['flops_removed']:.1f}%, flag rate {entry['flag_rate']:.3f}, recall "
          f"{entry['recall']:.3f}, precision {entry['precision']:.3f}, {quality}")


def markdown(result: dict) -> str:
  out = [f"# Partially-linear fold: measured on CPU ({result['date']})", "",
         "Produced by `PYTHONPATH=$PWD python3 benchmarks/bench_fold.py` (see its docstring for "
         "what each number means). \"Params read\" / \"FLOPs\": per token at decode, against the "
         "exact FFNs, with the predictor's flag rate measured on held-out text; the folded model "
         f"stores more than the exact one (see stored ×).", ""]
  if "minilm" in result:
    m = result["minilm"]
    out += ["## all-MiniLM-L6-v2 (MLP, erf-GELU)", "",
            f"Exact model: paraphrase margin {m['exact']['margin']:.4f}, retrieval accuracy "
            f"{m['exact']['retrieval_accuracy']:.3f} ({len(PARAPHRASES)} pairs); held-out: 512 lines "
            "of the validation plays.", "",
            "| fold | params read removed | FLOPs removed | stored × | flag rate | true outlier rate | "
            "recall | precision | cos mean (min) | margin | retrieval | cos oracle | cos no misses | "
            "cos no corrections |", "|" + "---|" * 14]
    for e in m["settings"]:
      p = e["predicted"]
      out.append(f"| {e['spec']} | {100 * e['params_removed']:.1f}% | {100 * e['flops_removed']:.1f}% | "
                 f"{e['stored_vs_exact']:.2f} | {e['flag_rate']:.3f} | {e['outlier_rate']:.3f} | "
                 f"{e['recall']:.3f} | {e['precision']:.3f} | {p['cosine_mean']:.4f} ({p['cosine_min']:.4f}) | "
                 f"{p['margin']:.4f} | {p['retrieval_accuracy']:.3f} | {e['oracle']['cosine_mean']:.4f} | "
                 f"{e['predicted_or_oracle']['cosine_mean']:.4f} | {e['ignored']['cosine_mean']:.4f} |")
    out += ["", "Cost of missed outliers (mean over layers, relative to the FFN output norm): "]
    for e in m["settings"]:
      out.append(f"- {e['spec']}: missed-outlier error {e['missed_error']:.4f} vs in-range fold error "
                 f"{e['in_range_error']:.4f}; a missed outlier contributes "
                 f"{e['mean_missed_contribution']:.4f} on average vs {e['mean_caught_contribution']:.4f} "
                 "for a caught one (misses sit near the range boundary).")
    out += ceiling_table(m["settings"])
    tuned = [e for e in m["settings"] if "finetuned" in e]
    for e in tuned:
      t = e["finetuned"]
      out += ["", f"After fine-tuning {e['spec']} ({t['steps']} steps, lr {t['learning_rate']}, "
                  f"{t['seconds']:.0f} s): cos mean {t['cosine_mean']:.4f} (min {t['cosine_min']:.4f}), "
                  f"margin {t['margin']:.4f}, retrieval {t['retrieval_accuracy']:.3f}, flag rate "
                  f"{t['layers']['flag_rate']:.3f} (predictor calibrated before fine-tuning), loss "
                  f"{t['loss_first']:.5f} -> {t['loss_last']:.5f}."]
  if "smollm2" in result:
    s = result["smollm2"]
    out += ["", "## SmolLM2-135M (GLU, SiLU): the constant-segment variant", "",
            f"Perplexity on the first {s['eval_tokens']} tokens of the validation plays: exact "
            f"{s['exact_ppl']:.3f}.", "",
            "| fold | folded neurons | params read removed | FLOPs removed | stored × | flag rate | "
            "recall | precision | ppl predicted | ppl oracle | ppl no corrections | ppl fine-tuned |",
            "|" + "---|" * 12]
    for e in s["settings"]:
      t = e.get("finetuned", {})
      tuned = f"{t['ppl']:.3f}" if t.get("ppl") else (t.get("error", "—")[:80] if t else "—")
      out.append(f"| {e['spec']} | {100 * e['folded_fraction']:.1f}% | {100 * e['params_removed']:.1f}% | "
                 f"{100 * e['flops_removed']:.1f}% | {e['stored_vs_exact']:.2f} | {e['flag_rate']:.3f} | "
                 f"{e['recall']:.3f} | {e['precision']:.3f} | {e['predicted_ppl']:.3f} | "
                 f"{e['oracle_ppl']:.3f} | {e['ignored_ppl']:.3f} | {tuned} |")
    out += ceiling_table(s["settings"])
  return "\n".join(out) + "\n"


def ceiling_table(settings: list[dict]) -> list[str]:
  """Markdown lines: the bytes-only ceiling on decode speed-up per setting and decode batch M
  (none for a section measured before bench_fold reported it)."""
  if "read_ceiling" not in settings[0]:
    return []
  sizes = [m for m, _ in settings[0]["read_ceiling"]]
  out = ["", "Bytes-only ceiling on the FFN decode speed-up (exact weight reads / folded reads, bf16 "
         "weights, b-bit predictor) for a step of M independent sequences: the corrections read the "
         "union of the M tokens' flags (mean over random groups of held-out tokens). Against an exact "
         "FFN that streams its weights as fast, no fold kernel can beat it; where launch latency "
         "rather than bytes sets the time (small models), the ratio to a given exact kernel can "
         "differ either way.", "",
         "| fold | " + " | ".join(f"M={m}" for m in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
  for e in settings:
    out.append(f"| {e['spec']} | " + " | ".join(f"{c:.2f}×" for _, c in e["read_ceiling"]) + " |")
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--work-dir", default="runs", help="fine-tune run directories")
  parser.add_argument("--calibration-tokens", type=int, default=fold.model.DEFAULT_CALIBRATION_TOKENS)
  parser.add_argument("--eval-tokens", type=int, default=4096)
  parser.add_argument("--finetune-steps", type=int, default=150)
  parser.add_argument("--finetune-fraction", type=float, nargs="+", default=[0.1, 0.15, 0.2],
                      help="MiniLM settings to fine-tune")
  parser.add_argument("--smollm2-finetune-fraction", type=float, default=0.6)
  parser.add_argument("--minilm-lr", type=float, default=1e-4)
  parser.add_argument("--smollm2-lr", type=float, default=1e-4)
  args = parser.parse_args(argv)
  date = datetime.date.today().isoformat()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"fold-{date}.json"
  result = json.loads(path.read_text()) if path.exists() else {}
  result |= {"date": date, "platform": jax.devices()[0].platform, "jax": jax.__version__}
  for name in args.models:
    result[name] = {"args": vars(args), **(run_minilm if name == "minilm" else run_smollm2)(args)}
    path.write_text(json.dumps(result, indent=1))
  (out / f"fold-{date}.md").write_text(markdown(result))
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()
