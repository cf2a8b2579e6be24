"""FP8 against bf16 training: the same config, seed, data and steps, with model.fp8 off and on.

Both runs use moe_jax.train's Trainer (its jitted step, optimizer and data); they differ only
in `fp8` (DeepSeek-V3 fine-grained FP8 for every projection and expert, layers/fp8.py), the
rest of the model computing in bf16 in both. Prints JSON lines: the machine, one `curve`
record per step and run (train loss of that step's batch), then `fp8_train` with the final
figures: the train loss averaged over the last `--tail` steps (the runs see the same
batches, so the difference is paired) and the validation loss on fixed batches.

On CPU the FP8 matmuls are emulated (XLA upcasts e4m3 to fp32), so only the losses count
here, not the speed. Defaults fit ~10 minutes on 2 CPU cores: configs/small.py's smoke
variant shape (batch 8 x 128 tokens, embedded byte corpus) with the model cut to CPU size
(--set overrides; see the defaults of --set below).

  python benchmarks/fp8_train.py --out fp8_curve.jsonl
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
  """configs/small.py (smoke variant's data and batch) with model overrides, bf16 compute, no scan."""
  from configs import small
  c = small.get_config("smoke")
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      c.model[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      c.model[key] = value
  c.model.dtype, c.model.scan_layers, c.model.remat_policy = "bfloat16", False, "none"
  c.steps, c.batch_size, c.seq_len = steps, batch, seq
  c.optim.lr, c.optim.warmup = lr, max(1, steps // 20)
  return c


def train(config, fp8: bool, tail: int, eval_batches: int, out) -> dict:
  config = config.copy_and_resolve_references()
  config.model.fp8 = fp8
  trainer = train_lib.Trainer(config)
  source = data.make_source(config.data, config.seq_len, config.batch_size, config.seed, trainer.mcfg.vocab_size)
  state = trainer.init_state(config.seed)
  name = "fp8" if fp8 else "bf16"
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
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--tail", type=int, default=20, help="steps averaged for the final train loss")
  p.add_argument("--eval_batches", type=int, default=4)
  p.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                 help=f"model overrides (default: {' '.join(CPU_SMALL)})")
  p.add_argument("--out", default="", help="also write the curve records to this JSON-lines file")
  args = p.parse_args()
  config = small_config(CPU_SMALL if args.set is None else args.set, args.steps, args.batch, args.seq, args.lr)
  common.emit("machine", **common.machine_info())
  out = open(args.out, "w") if args.out else None
  try:
    runs = {name: train(config, name == "fp8", args.tail, args.eval_batches, out) for name in ("bf16", "fp8")}
  finally:
    if out:
      out.close()
  b, f = runs["bf16"], runs["fp8"]
  common.emit("fp8_train", steps=args.steps, batch=args.batch, seq=args.seq, params=b["params"],
              bf16=b, fp8=f, tail_loss_rel_diff=(f["tail_loss"] - b["tail_loss"]) / b["tail_loss"],
              val_loss_rel_diff=(f["val_loss"] - b["val_loss"]) / b["val_loss"],
              final_loss_rel_diff=(f["final_loss"] - b["final_loss"]) / b["final_loss"])


if __name__ == "__main__":
  main()
