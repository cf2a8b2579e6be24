"""Named ablations of the DeepSeek papers' claims, trained on CPU from the project's configs.

Every arm of an ablation trains configs/tiny.py (byte-level embedded corpus) with the same data,
steps and seeds (a seed sets both the data order and the initialization); arms differ only by the
config fields listed in ABLATIONS. Each run evaluates every --eval_every steps on the same fixed
validation batches: val loss and MaxVio_global (expert counts summed over those batches, then
(max - mean) / mean per MoE layer, averaged over layers; moe_jax.run_log.maxvio).

  balancing  loss-free bias u=1e-3 (default); sequence-wise aux loss alpha 1e-3 / 1e-4, no bias;
             both (V3); neither; u=1e-4 and u=1e-2 (Wang et al. 2024, arXiv 2408.15664)
  attention  MLA, MHA, GQA-4, MQA at equal total parameters (8 query heads; the dense layer's MLP
             width absorbs the attention difference), with KV-cache bytes per token (DeepSeek-V2 App. D)
  experts    equal activated and total expert FLOPs: GShard-like (4 experts x 48, top-2, no shared),
             fine-grained (16 x 12, top-8, no shared), fine-grained + 1 shared (15 x 12 routed, top-7,
             + 1 x 12 shared) (DeepSeekMoE, arXiv 2401.06066); one router (sigmoid, loss-free bias) for all
  mtp        MTP lambda 0.3 vs 0 (DeepSeek-V3 Table 4)
  fp8        bf16 vs FP8 projections and experts (DeepSeek-V3 section 3.3)

Writes OUT/<ablation>.jsonl (records: `run` per step with the batch's loss and MaxVio, `eval` per
evaluation, `final` per arm and seed, `summary` per arm: mean and sample std over seeds) and
OUT/<ablation>.png (val loss and val MaxVio over steps, one line per arm: the mean over seeds,
the band min..max). An existing JSONL is never overwritten: --append adds seeds or arms to it
(same steps, base overrides and eval cadence, checked; finished arm x seed pairs refused), then
writes fresh summaries over every seed in the file and redraws the PNG.

  python benchmarks/ablations.py balancing --seeds 0,1,2 --steps 300 --out benchmarks/results/ablations
  python benchmarks/ablations.py attention experts mtp --steps 300
  python benchmarks/ablations.py balancing --set model.hidden_size=32 --steps 5   # a smoke run
  python benchmarks/ablations.py balancing --seeds 3 --steps 300 --append --out benchmarks/results/ablations
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import checkpoint, data, variables  # noqa: E402
from moe_jax import train as train_lib  # noqa: E402
from moe_jax.errors import UserError  # noqa: E402
from moe_jax.layers import gqa  # noqa: E402

# The shared base: configs/tiny.py with one more MoE layer (3 layers: 1 dense + 2 MoE), so MaxVio
# averages over layers as the paper's does. Everything else is tiny's (fp32, D=64, 8 experts top-2 in
# 4 groups, 1 shared, sigmoid noaux_tc, MTP depth 1, alpha 1e-4 sequence-wise, u=1e-3).
BASE = {"model.num_hidden_layers": 3, "batch_size": 16, "seq_len": 128, "optim.warmup": 20}

ABLATIONS: dict[str, dict[str, dict]] = {
    "balancing": {
        "loss-free u=1e-3": {"model.aux_loss_alpha": 0.0, "optim.bias_update_speed": 1e-3},
        "aux a=1e-3": {"model.aux_loss_alpha": 1e-3, "optim.bias_update_speed": 0.0},
        "aux a=1e-4": {"model.aux_loss_alpha": 1e-4, "optim.bias_update_speed": 0.0},
        "both (V3)": {"model.aux_loss_alpha": 1e-4, "optim.bias_update_speed": 1e-3},
        "neither": {"model.aux_loss_alpha": 0.0, "optim.bias_update_speed": 0.0},
        "loss-free u=1e-4": {"model.aux_loss_alpha": 0.0, "optim.bias_update_speed": 1e-4},
        "loss-free u=1e-2": {"model.aux_loss_alpha": 0.0, "optim.bias_update_speed": 1e-2},
    },
    "attention": {  # 8 query heads; equal total parameters via the dense MLP width (equalize)
        "MLA": {"model.num_attention_heads": 8},
        "MHA": {"model.num_attention_heads": 8, "model.attention_type": "gqa", "model.num_key_value_heads": 8},
        "GQA-4": {"model.num_attention_heads": 8, "model.attention_type": "gqa", "model.num_key_value_heads": 4},
        "MQA": {"model.num_attention_heads": 8, "model.attention_type": "gqa", "model.num_key_value_heads": 1},
    },
    "experts": {  # 192 expert hidden units in all, 96 activated per token, in every arm
        "GShard-like 4x48 top-2": {"model.n_routed_experts": 4, "model.moe_intermediate_size": 48,
                                   "model.num_experts_per_tok": 2, "model.n_shared_experts": 0,
                                   "model.n_group": 1, "model.topk_group": 1},
        "fine 16x12 top-8": {"model.n_routed_experts": 16, "model.moe_intermediate_size": 12,
                             "model.num_experts_per_tok": 8, "model.n_shared_experts": 0,
                             "model.n_group": 1, "model.topk_group": 1},
        "fine 15x12 top-7 + 1 shared": {"model.n_routed_experts": 15, "model.moe_intermediate_size": 12,
                                        "model.num_experts_per_tok": 7, "model.n_shared_experts": 1,
                                        "model.n_group": 1, "model.topk_group": 1},
    },
    "mtp": {
        "lambda 0.3": {"optim.mtp_lambda": 0.3},
        "lambda 0": {"optim.mtp_lambda": 0.0},
    },
    "fp8": {
        "bf16": {"model.dtype": "bfloat16", "model.fp8": False},
        "fp8": {"model.dtype": "bfloat16", "model.fp8": True},
    },
}
EQUAL_PARAMS = {"attention"}  # ablations whose arms are brought to the largest arm's total parameters


def tiny_config():
  from configs import tiny
  return tiny.get_config()


def apply(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of c with dotted fields set ('model.hidden_size': 32); a field c lacks is a UserError."""
  c = ml_collections.ConfigDict(c.to_dict())
  for key, value in overrides.items():
    node, *path = key.split(".")
    parent, name = (c, node) if not path else (c[node], path[-1])
    for p in path[:-1]:
      parent = parent[p]
    if name not in parent:
      raise UserError(f"--set {key}: no such config field")
    parent[name] = value
  return c


def parse_set(items: Sequence[str]) -> dict:
  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"--set {item!r}: expected FIELD=VALUE")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def num_params(c) -> int:
  mcfg = checkpoint.model_config(c)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables.abstract(mcfg)["params"]))


def equalize(c, target: int):
  """c with the dense layers' MLP width set so the model has the parameter count closest to target
  (each unit of width is 3 * hidden_size parameters per dense layer)."""
  mcfg = checkpoint.model_config(c)
  per_unit = 3 * mcfg.hidden_size * mcfg.first_k_dense_replace
  if per_unit == 0:
    raise UserError("equal-parameter arms need a dense layer (model.first_k_dense_replace >= 1)")
  width = max(1, c.model.intermediate_size + round((target - num_params(c)) / per_unit))
  return apply(c, {"model.intermediate_size": width})


def arm_configs(name: str, base_overrides: dict, steps: int, eval_every: int, eval_batches: int) -> dict:
  if name not in ABLATIONS:
    raise UserError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
  base = apply(tiny_config(), {**BASE, **base_overrides})
  base = apply(base, {"steps": steps, "eval_every": eval_every, "eval_batches": eval_batches,
                      "checkpoint_every": steps})
  arms = {arm: apply(base, o) for arm, o in ABLATIONS[name].items()}
  if name in EQUAL_PARAMS:
    target = max(num_params(c) for c in arms.values())  # the largest arm (MHA): the others widen
    arms = {arm: equalize(c, target) for arm, c in arms.items()}
  return arms


def train_arm(trainer: train_lib.Trainer, arm: str, seed: int, log_every: int, write) -> dict:
  """Trains one arm with one seed (the arm's Trainer: its step compiles once, for every seed; no
  checkpoints); the seed sets the data order and the initialization. Writes run/eval records."""
  c = trainer.config
  source = data.make_source(c.data, c.seq_len, c.batch_size, seed, trainer.mcfg.vocab_size)
  state = trainer.init_state(seed)
  t0 = time.perf_counter()
  trainer.step_fn  # noqa: B018  (compiles on the first seed)
  compile_s, start, last_eval = time.perf_counter() - t0, time.perf_counter(), None
  for step in range(c.steps):
    state, m = trainer.step_fn(state, trainer.batch(source, "train", step))
    done = step + 1
    if done % log_every == 0 or done == c.steps:
      m = jax.device_get(m)
      per_layer, mean = train_lib.maxvio(train_lib.layer_loads(m["expert_counts"]))
      write({"kind": "run", "arm": arm, "seed": seed, "step": done, "loss": float(m["loss"]),
             "lm_loss": float(m["lm_loss"]), "maxvio": mean, "maxvio_layers": per_layer})
      if not np.isfinite(float(m["loss"])):
        raise RuntimeError(f"{arm} seed {seed}: non-finite loss at step {done}")
    if done % c.eval_every == 0 or done == c.steps:
      ev = trainer.evaluate(state, source, c.eval_batches)
      last_eval = {"step": done, "val_loss": ev["val_loss"], "val_maxvio": ev.get("val_maxvio", 0.0),
                   "val_maxvio_layers": ev.get("val_maxvio_layers", {})}
      write({"kind": "eval", "arm": arm, "seed": seed, **last_eval})
  seconds = time.perf_counter() - start
  mcfg = trainer.mcfg
  return {"kind": "final", "arm": arm, "seed": seed, "steps": c.steps, "val_loss": last_eval["val_loss"],
          "val_maxvio": last_eval["val_maxvio"], "params": trainer.num_params,
          "tokens": c.steps * c.batch_size * c.seq_len, "train_s": round(seconds, 1), "compile_s": round(compile_s, 1),
          "step_s": seconds / c.steps, "kv_values_per_token_layer": gqa.cache_values_per_token(mcfg),
          "kv_bytes_per_token_bf16": 2 * gqa.cache_values_per_token(mcfg) * mcfg.num_hidden_layers}


def summarize(finals: list[dict]) -> list[dict]:
  """One record per arm: mean and sample std (0 for one seed) of the final val loss and MaxVio_global."""
  out = []
  for arm in dict.fromkeys(f["arm"] for f in finals):
    rows = [f for f in finals if f["arm"] == arm]
    rec = {"kind": "summary", "arm": arm, "seeds": [f["seed"] for f in rows]}
    for key in ("val_loss", "val_maxvio"):
      v = np.array([f[key] for f in rows])
      rec.update({f"{key}_mean": float(v.mean()), f"{key}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  f"{key}_all": v.tolist()})
    rec.update({k: rows[0][k] for k in ("params", "tokens", "kv_bytes_per_token_bf16", "kv_values_per_token_layer")})
    rec["train_s_mean"] = float(np.mean([f["train_s"] for f in rows]))
    out.append(rec)
  return out


def plot(name: str, records: list[dict], path: str) -> str:
  """val loss and val MaxVio over steps, one line per arm (mean over seeds, band min..max)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  finals = ordered_finals(name, records)
  done = {(r["arm"], r["seed"]) for r in finals}
  # a run killed before its final record (then rerun by --append) leaves evals: keep finished pairs, last eval
  last = {(r["arm"], r["seed"], r["step"]): r for r in records
          if r.get("kind") == "eval" and (r["arm"], r["seed"]) in done}
  evals = list(last.values())
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for arm in dict.fromkeys(r["arm"] for r in finals):
    steps = sorted({r["step"] for r in evals if r["arm"] == arm})
    for ax, key in zip(axes, ("val_loss", "val_maxvio")):
      vals = np.array([[r[key] for r in evals if r["arm"] == arm and r["step"] == s] for s in steps], dtype=object)
      mean = [float(np.mean(v)) for v in vals]
      lo, hi = [float(np.min(v)) for v in vals], [float(np.max(v)) for v in vals]
      line, = ax.plot(steps, mean, marker="o", ms=3, label=arm)
      ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
  axes[0].set_ylabel("validation loss (nats/byte)")
  axes[1].set_ylabel("MaxVio_global (validation)")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  n_seeds = len({r["seed"] for r in evals})
  fig.suptitle(f"ablation: {name} (mean of {n_seeds} seed{'s' * (n_seeds > 1)}, band min..max)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def read_records(jsonl: str) -> list[dict]:
  """The records of an ablation JSONL, in file order. A torn line (a killed writer) is dropped where
  it ends the file or a new run (`machine` record) follows it; elsewhere it is a UserError."""
  if not os.path.isfile(jsonl):
    raise UserError(f"{jsonl}: no such file")
  recs, torn = [], None
  with open(jsonl) as f:
    for n, line in enumerate(f, 1):
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        torn = n
        continue
      if torn is not None and rec.get("kind") != "machine":  # only a killed run's tail, then a new run
        raise UserError(f"{jsonl}:{torn}: a damaged line inside a run; fix or move the file")
      torn = None
      recs.append(rec)
  return recs


def check_append(name: str, jsonl: str, recs: list[dict], settings: dict, arm_overrides: dict,
                 seeds: Sequence[int]) -> None:
  """Refuses to add runs to `jsonl` unless they are comparable with the runs already in it (same
  ablation, steps, base overrides, batch, sequence length, evaluation cadence, arm definitions) and
  none of the (arm, seed) pairs is already finished there. Raises UserError naming the mismatch."""
  first = next((r for r in recs if r.get("kind") == "machine"), None)
  if first is None or first.get("ablation") != name:
    raise UserError(f"{jsonl} is not a {name!r} ablation file; pass another --out")
  for key, want in settings.items():
    have = first.get(key)
    if key == "eval_every" and have is None:  # files written before eval_every was recorded
      steps = [r["step"] for r in recs if r.get("kind") == "eval"]
      have = min(steps) if steps else None
      want = min(want, settings["steps"])
    if have is not None and have != want:
      raise UserError(f"--append to {jsonl}: {key} is {have!r} there, {want!r} here; use the file's settings or another --out")
  for arm, o in arm_overrides.items():
    for r in recs:
      if r.get("kind") == "machine" and arm in r.get("arms", {}) and r["arms"][arm] != o:
        raise UserError(f"--append to {jsonl}: arm {arm!r} was {r['arms'][arm]} there, {o} now; use another --out")
  done = {(r["arm"], r["seed"]) for r in recs if r.get("kind") == "final"}
  clash = sorted(f"{a} seed {s}" for a in arm_overrides for s in seeds if (a, s) in done)
  if clash:
    raise UserError(f"--append to {jsonl}: already finished there: {', '.join(clash)}; drop those seeds or --arms")


def run_ablation(name: str, out_dir: str, seeds: Sequence[int], steps: int, eval_every: int, eval_batches: int = 4,
                 log_every: int = 10, overrides: Optional[dict] = None, arms: Optional[Sequence[str]] = None,
                 printer=print, append: bool = False) -> tuple[str, str]:
  """Runs every arm (or `arms`) x seeds -> (jsonl path, png path). Seeds run in the outer loop, so a
  cut-short run still has every arm at the first seeds.

  An existing JSONL is never overwritten: without `append` it is a UserError; with `append` the new
  runs are added after its records (after a new `machine` record, settings checked by check_append),
  then a `summary` per arm over every finished seed in the file (the last summary of an arm is the
  current one), and the PNG is redrawn from the whole file."""
  configs = arm_configs(name, overrides or {}, steps, eval_every, eval_batches)
  if arms:
    unknown = sorted(set(arms) - set(configs))
    if unknown:
      raise UserError(f"ablation {name}: unknown arms {unknown}; known: {list(configs)}")
    configs = {a: c for a, c in configs.items() if a in arms}
  os.makedirs(out_dir, exist_ok=True)
  jsonl, png = os.path.join(out_dir, f"{name}.jsonl"), os.path.join(out_dir, f"{name}.png")
  c0 = next(iter(configs.values()))
  settings = {"steps": steps, "base": {**BASE, **(overrides or {})}, "batch_size": c0.batch_size,
              "seq_len": c0.seq_len, "eval_every": eval_every, "eval_batches": eval_batches}
  arm_overrides = {a: ABLATIONS[name][a] for a in configs}
  old = []
  if os.path.exists(jsonl):  # never overwrite a saved result
    if not append:
      raise UserError(f"{jsonl} exists; pass --append to add seeds or arms to it, or another --out")
    old = read_records(jsonl)
    # JSON round trip, so tuples/ints compare as the file has them
    check_append(name, jsonl, old, json.loads(json.dumps(settings)), json.loads(json.dumps(arm_overrides)), seeds)
  records = list(old)
  torn_tail = False
  if os.path.exists(jsonl) and os.path.getsize(jsonl) > 0:
    with open(jsonl, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn_tail = f.read(1) != b"\n"
  with open(jsonl, "a") as f:
    if torn_tail:
      f.write("\n")  # a killed writer's torn line stays on its own line (read_records drops it)
    def write(rec):
      records.append(rec)
      f.write(json.dumps(rec) + "\n")
      f.flush()

    from benchmarks import common
    write({"kind": "machine", "ablation": name, **common.machine_info(), "append": bool(old),
           "arms": arm_overrides, "seeds": list(seeds), "log_every": log_every, **settings})
    trainers = {}
    for seed in seeds:
      for arm, c in configs.items():
        if arm not in trainers:
          trainers[arm] = train_lib.Trainer(c)
        trainer = trainers[arm]
        rec = train_arm(trainer, arm, seed, log_every, write)
        write(rec)
        printer(f"{name} | {arm} | seed {seed}: val_loss {rec['val_loss']:.4f} MaxVio_global {rec['val_maxvio']:.3f} "
                f"({rec['params']} params, {rec['train_s']:.0f} s)")
    for rec in summarize(ordered_finals(name, records)):
      write(rec)
      printer(f"{name} | {rec['arm']}: val_loss {rec['val_loss_mean']:.4f} ± {rec['val_loss_std']:.4f}, "
              f"MaxVio_global {rec['val_maxvio_mean']:.3f} ± {rec['val_maxvio_std']:.3f} (seeds {rec['seeds']})")
  return jsonl, plot(name, records, png)


def ordered_finals(name: Optional[str], records: list[dict]) -> list[dict]:
  """The `final` records, arms in the ablation's order (the first is the reference for paired
  differences), seeds ascending; an (arm, seed) finished twice keeps its last record."""
  last = {(r["arm"], r["seed"]): r for r in records if r.get("kind") == "final"}
  order = list(ABLATIONS.get(name, {}))
  rank = lambda arm: order.index(arm) if arm in order else len(order)  # noqa: E731
  return [last[k] for k in sorted(last, key=lambda k: (rank(k[0]), k[1]))]


def markdown_table(jsonl: str) -> str:
  """The summary of a finished ablation JSONL as a markdown table: per arm the final val loss (mean ±
  sample std over seeds, each seed's value), its paired difference from the first arm (same seed:
  same data and validation batches), MaxVio_global, parameters and KV-cache bytes per token."""
  recs = read_records(jsonl)
  name = next((r.get("ablation") for r in recs if r.get("kind") == "machine"), None)
  finals = ordered_finals(name, recs)
  if not finals:
    raise UserError(f"{jsonl}: no finished run (no `final` record)")
  arms = list(dict.fromkeys(r["arm"] for r in finals))
  first = {r["seed"]: r for r in finals if r["arm"] == arms[0]}
  lines = ["| arm | val loss (mean ± std) | per seed | Δ vs " + arms[0] + " (paired, mean ± std) | "
           "MaxVio_global (mean ± std) | per seed | params | KV bytes/token (bf16, all layers) |",
           "|---|---|---|---|---|---|---|---|"]
  for arm in arms:
    rows = [r for r in finals if r["arm"] == arm]
    loss, mv = np.array([r["val_loss"] for r in rows]), np.array([r["val_maxvio"] for r in rows])
    delta = np.array([r["val_loss"] - first[r["seed"]]["val_loss"] for r in rows if r["seed"] in first])
    std = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
    lines.append(f"| {arm} | {loss.mean():.4f} ± {std(loss):.4f} | {' / '.join(f'{x:.4f}' for x in loss)} | "
                 f"{delta.mean():+.4f} ± {std(delta):.4f} | {mv.mean():.3f} ± {std(mv):.3f} | "
                 f"{' / '.join(f'{x:.3f}' for x in mv)} | {rows[0]['params']:,} | {rows[0]['kv_bytes_per_token_bf16']:,} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("ablations", nargs="*", help=f"from {list(ABLATIONS)}")
  p.add_argument("--table", metavar="JSONL", help="print a finished ablation's summary as a markdown table")
  p.add_argument("--seeds", default="0", help="comma-separated")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--eval_every", type=int, default=50)
  p.add_argument("--eval_batches", type=int, default=4)
  p.add_argument("--log_every", type=int, default=10)
  p.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override for every arm")
  p.add_argument("--out", default="ablations_out")
  p.add_argument("--append", action="store_true",
                 help="add seeds/arms to an existing OUT/<ablation>.jsonl run with the same settings (checked)")
  args = p.parse_args(argv)
  try:
    if args.table:
      print(markdown_table(args.table))
      return 0
    if not args.ablations:
      raise UserError(f"name one or more ablations: {', '.join(ABLATIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_set(args.set)
    for name in args.ablations:
      if name not in ABLATIONS:
        raise UserError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    if args.steps < 1 or args.eval_every < 1:
      raise UserError("--steps and --eval_every must be >= 1")
    for name in args.ablations:
      arms = [a for a in args.arms.split(",") if a] or None
      for path in run_ablation(name, args.out, seeds, args.steps, args.eval_every, args.eval_batches, args.log_every,
                               overrides, arms, append=args.append):
        print(path)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
