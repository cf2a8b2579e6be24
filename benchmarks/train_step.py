"""Training step (forward, backward, AdamW) throughput: tokens/s, model TFLOP/s and MFU.

MFU = the step's model FLOPs (moe_jax/flops.py: activated parameters, 6 per parameter per
token, plus causal attention) over its time, against the dense matmul peak of the compute
dtype measured in the same run, interleaved with the steps (so a busy machine moves both).
The step is moe_jax.train's: jitted once with in/out shardings and the state donated. The
script checks that no step after the first compiles (jax.monitoring compile events) and that
the donated state's buffers were consumed.

  python benchmarks/train_step.py --config bench10m --batch 8 --seq 128
  python benchmarks/train_step.py --config small --batch 8 --seq 256 --set dtype=bfloat16 --set scan_layers=True
  python benchmarks/train_step.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax import flops  # noqa: E402
from moe_jax import train as train_lib  # noqa: E402


def make_batch(trainer, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """A random [B, S+1] batch (one document per row) placed with the trainer's batch sharding."""
  rng = np.random.RandomState(seed)
  host = {"tokens": rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32),
          "positions": np.broadcast_to(np.arange(seq + 1, dtype=np.int32), (batch, seq + 1)).copy(),
          "segment_ids": np.ones((batch, seq + 1), np.int32)}
  return {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}


def build(mcfg, name: str, batch: int, seq: int):
  """(Trainer, state, batch) for a model config: the train library's own step, optimizer and shardings."""
  config = train_lib.base_config(mcfg, name)
  config.batch_size, config.seq_len, config.steps = batch, seq, 10 ** 6
  config.optim.warmup = 1
  trainer = train_lib.Trainer(config)
  return trainer, trainer.init_state(0), make_batch(trainer, batch, seq, mcfg.vocab_size)


def run(args) -> None:
  mcfg = common.model_config(args.config, args.set)
  common.emit("machine", **common.machine_info())
  trainer, state, batch = build(mcfg, args.config, args.batch, args.seq)
  t = time.perf_counter()
  step = trainer.step_fn  # lower + compile
  compile_s = time.perf_counter() - t
  mem = step.memory_analysis()
  leaf = jax.tree.leaves(state.params)[0]
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  donated = leaf.is_deleted()

  size = args.peak_size
  x = jnp.ones((size, size), mcfg.dtype)
  mm = jax.jit(lambda a, b: a @ b)
  common.block(mm(x, x))
  step_times, peak_times = [], []
  with common.count_compiles() as compiles:
    for i in range(args.warmup + args.steps):
      t = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      dt = time.perf_counter() - t
      tp = common.time_once(mm, x, x)
      if i >= args.warmup:
        step_times.append(dt)
        peak_times.append(tp)
  step_s = statistics.median(step_times)
  peak = 2 * size ** 3 / statistics.median(peak_times)
  tokens = args.batch * args.seq
  model_flops = flops.train_flops_per_token(mcfg, args.seq) * tokens
  common.emit(
      "train_step", config=args.config, overrides=list(args.set), batch=args.batch, seq=args.seq,
      dtype=mcfg.dtype, moe_impl=mcfg.moe_impl, remat_policy=mcfg.remat_policy, scan_layers=mcfg.scan_layers,
      params=trainer.num_params, activated_params=flops.activated_params(mcfg), steps=args.steps,
      step_s=step_s, step_s_min=min(step_times), tokens_per_s=tokens / step_s,
      model_flops_per_step=model_flops, model_tflops=model_flops / step_s / 1e12,
      peak_tflops=peak / 1e12, peak_source=f"measured {size}^3 {mcfg.dtype} matmul, interleaved",
      mfu=model_flops / step_s / peak, compile_s=compile_s, compiles_after_first_step=compiles.count,
      donated=bool(donated), loss=float(metrics["loss"]),
      temp_bytes=getattr(mem, "temp_size_in_bytes", None), argument_bytes=getattr(mem, "argument_size_in_bytes", None),
      loadavg=common.load_average())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="bench10m", help="bench10m or a moe_jax.config preset (tiny, small, ...)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="ModelConfig override")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  p.add_argument("--peak_size", type=int, default=1024, help="N of the N^3 peak matmul")
  p.add_argument("--smoke", action="store_true", help="tiny config, 2 steps: checks the plumbing only")
  args = p.parse_args(argv)
  if args.smoke:
    args.config, args.batch, args.seq, args.steps, args.warmup, args.peak_size = "tiny", 2, 16, 2, 1, 128
    args.set = ["num_hidden_layers=1", "first_k_dense_replace=0", "num_nextn_predict_layers=0"] + args.set
  run(args)


if __name__ == "__main__":
  main()
