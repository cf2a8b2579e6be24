"""FP8 against bf16 training: the same config, seed, data and steps, with model.fp8 off and on.

Both runs use moe_jax.train's Trainer (its jitted step, optimizer and data); they differ only
in `fp8` (DeepSeek-V3 fine-grained FP8 for every projection and expert, layers/fp8.py), the
rest of the model computing in bf16 in both. `--runs fp32,bf16` measures the noise floor the
same way: how far two precisions that should train alike drift apart over the same steps.
Prints JSON lines: the machine, one `curve` record per step and run (train loss of that
step's batch), then `fp8_train` with the final figures of each run and their relative
differences from the first run: the train loss averaged over the last `--tail` steps (the
runs see the same batches, so the difference is paired) and the validation loss on fixed
batches.

On CPU the FP8 matmuls are emulated (XLA upcasts e4m3 to fp32), so only the losses count
here, not the speed. Defaults fit ~10 minutes on 2 idle CPU cores: configs/small.py's smoke
variant (batch 8 x 128 tokens, embedded byte corpus, its optimizer with lr 1e-3) for 150
steps, with the model cut to CPU size (8.5M parameters; see CPU_SMALL, replaced by --set).

  python benchmarks/fp8_train.py --out fp8_curve.jsonl
  python benchmarks/fp8_train.py --runs fp32,bf16          # the noise floor
  python benchmarks/fp8_train.py --steps 400 --set hidden_size=384 --set num_hidden_layers=6
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax import data  # noqa: E402
from moe_jax import train as train_lib  # noqa: E402

# configs/small.py's shape, cut for 2 CPU cores: 4 layers (1 dense + 3 MoE), D=256, 16 experts
# top-4 in 4 groups, byte vocabulary. Dims stay >= 128 where FP8 tiles them, so padding is rare.
CPU_SMALL = ("vocab_size=512", "hidden_size=256", "intermediate_size=768", "moe_intermediate_size=128",
             "num_hidden_layers=4", "num_attention_heads=4", "q_lora_rank=128", "kv_lora_rank=128",
             "qk_nope_head_dim=32", "qk_rope_head_dim=32", "v_head_dim=32", "n_routed_experts=16")


def small_config(overrides, steps: int, batch: int, seq: int, lr: float):
  """configs/small.py (smoke variant's data and batch) with model overrides, no scan or remat."""
  from configs import small
  c = small.get_config("smoke")
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      c.model[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      c.model[key] = value
  c.model.scan_layers, c.model.remat_policy = False, "none"
  c.steps, c.batch_size, c.seq_len = steps, batch, seq
  c.optim.lr = c.optim.lr if lr is None else lr
  c.optim.warmup = max(1, steps // 20)
  return c


RUNS = {"bf16": ("bfloat16", False), "fp8": ("bfloat16", True), "fp32": ("float32", False)}


def train(config, name: str, tail: int, eval_batches: int, out) -> dict:
  config = config.copy_and_resolve_references()
  config.model.dtype, config.model.fp8 = RUNS[name]
  trainer = train_lib.Trainer(config)
  source = data.make_source(config.data, config.seq_len, config.batch_size, config.seed, trainer.mcfg.vocab_size)
  state = trainer.init_state(config.seed)
  t = time.perf_counter()
  trainer.step_fn  # noqa: B018  (compiles)
  compile_s, losses, start = time.perf_counter() - t, [], time.perf_counter()
  for step in range(config.steps):
    state, metrics = trainer.step_fn(state, trainer.batch(source, "train", step))
    loss = float(jax.device_get(metrics["loss"]))  # a benchmark: one sync a step is fine
    losses.append(loss)
    rec = {"kind": "curve", "run": name, "step": step + 1, "loss": loss,
           "lm_loss": float(jax.device_get(metrics["lm_loss"]))}
    print(json.dumps(rec), flush=True)
    if out:
      out.write(json.dumps(rec) + "\n")
  seconds = time.perf_counter() - start
  ev = trainer.evaluate(state, source, eval_batches)
  return {"final_loss": losses[-1], "tail_loss": float(np.mean(losses[-tail:])), "val_loss": ev["val_loss"],
          "step_s": seconds / config.steps, "compile_s": compile_s, "params": trainer.num_params}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--lr", type=float, default=None, help="default: configs/small.py's optim.lr")
  p.add_argument("--tail", type=int, default=20, help="steps averaged for the final train loss")
  p.add_argument("--eval_batches", type=int, default=4)
  p.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                 help=f"model overrides (default: {' '.join(CPU_SMALL)})")
  p.add_argument("--runs", default="bf16,fp8", help=f"comma-separated, from {sorted(RUNS)}; the first is the baseline")
  p.add_argument("--out", default="", help="also write the curve records to this JSON-lines file")
  args = p.parse_args()
  config = small_config(CPU_SMALL if args.set is None else args.set, args.steps, args.batch, args.seq, args.lr)
  common.emit("machine", **common.machine_info())
  out = open(args.out, "w") if args.out else None
  try:
    runs = {name: train(config, name, args.tail, args.eval_batches, out) for name in args.runs.split(",")}
  finally:
    if out:
      out.close()
  first, *others = runs
  rel = {f"{name}_vs_{first}": {k: (runs[name][k] - runs[first][k]) / runs[first][k]
                                for k in ("tail_loss", "val_loss", "final_loss")} for name in others}
  common.emit("fp8_train", steps=args.steps, batch=args.batch, seq=args.seq, lr=config.optim.lr, **runs, rel_diff=rel)


if __name__ == "__main__":
  main()
