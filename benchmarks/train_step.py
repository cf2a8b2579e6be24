"""Training step (forward, backward, AdamW) throughput: tokens/s, model TFLOP/s and MFU.

MFU = the step's model FLOPs (moe_jax/flops.py: activated parameters, 6 per parameter per
token, plus causal attention) over its time, against the dense matmul peak of the compute
dtype measured in the same run, interleaved with the steps (so a busy machine moves both).
The step is moe_jax.train's: jitted once with in/out shardings and the state donated. The
script checks that no step after the first compiles (jax.monitoring compile events) and that
the donated state's buffers were consumed.

  python benchmarks/train_step.py --config bench10m --batch 8 --seq 128
  python benchmarks/train_step.py --config small --batch 8 --seq 256 --set dtype=bfloat16 --set scan_layers=True
  python benchmarks/train_step.py --config bench1b --batch 8 --seq 2048 --router_steps 300   # GPU
  python benchmarks/train_step.py --smoke

--router_steps N first trains N steps on the embedded corpus (real text, byte tokens), so the
router (and its aux-loss-free bias) is trained, not random, when the timed steps run; the timed
steps then use corpus batches too and the record carries the expert-load imbalance they saw
(max over experts of the load / the mean load, averaged over MoE layers; 1.0 = balanced).
"""

from __future__ import annotations

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
from moe_jax.layers import gmm, mla  # noqa: E402


def make_batch(trainer, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """A random [B, S+1] batch (one document per row) placed with the trainer's batch sharding."""
  rng = np.random.RandomState(seed)
  host = {"tokens": rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32),
          "positions": np.broadcast_to(np.arange(seq + 1, dtype=np.int32), (batch, seq + 1)).copy(),
          "segment_ids": np.ones((batch, seq + 1), np.int32)}
  return {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}


def gmm_operands(mcfg):
  """Shape stand-ins for the routed experts' x [M, D] and w [E, D, F] ('auto' looks at shapes and dtype)."""
  x = jax.ShapeDtypeStruct((1, mcfg.hidden_size), mcfg.compute_dtype)
  return x, jax.ShapeDtypeStruct((mcfg.n_routed_experts, mcfg.hidden_size, mcfg.moe_intermediate_size),
                                 mcfg.compute_dtype)


def corpus_batches(trainer, batch: int, seq: int, vocab: int, count: int, start: int = 0) -> list[dict]:
  """`count` consecutive training batches of the embedded corpus, already on device."""
  from moe_jax import data
  source = data.make_source(trainer.config.data, seq, batch, 0, vocab)
  return [trainer.batch(source, "train", start + i) for i in range(count)]


def load_imbalance(counts) -> float:
  """Mean over MoE layers of max expert load / mean expert load (1.0 = balanced)."""
  loads = train_lib.layer_loads(jax.device_get(counts))
  ratios = [float(c.max() / max(c.mean(), 1e-9)) for c in loads.values() if c.sum() > 0]
  return float(np.mean(ratios)) if ratios else float("nan")


def build(mcfg, name: str, batch: int, seq: int, document_mask: bool = True):
  """(Trainer, state, batch) for a model config: the train library's own step, optimizer and shardings."""
  config = train_lib.base_config(mcfg, name)
  config.batch_size, config.seq_len, config.steps = batch, seq, 10 ** 6
  config.data.document_mask = document_mask
  config.optim.warmup = 1
  trainer = train_lib.Trainer(config)
  return trainer, trainer.init_state(0), make_batch(trainer, batch, seq, mcfg.vocab_size)


def run(args) -> None:
  mcfg = common.model_config(args.config, args.set)
  common.emit("machine", **common.machine_info())
  trainer, state, batch = build(mcfg, args.config, args.batch, args.seq, not args.no_document_mask)
  t = time.perf_counter()
  step = trainer.step_fn  # lower + compile
  compile_s = time.perf_counter() - t
  mem = step.memory_analysis()
  leaf = jax.tree.leaves(state.params)[0]
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  donated = leaf.is_deleted()
  batches, imbalance_before = [batch], load_imbalance(metrics["expert_counts"])
  if args.router_steps:
    t = time.perf_counter()
    for b in corpus_batches(trainer, args.batch, args.seq, mcfg.vocab_size, args.router_steps):
      state, metrics = step(state, b)
    common.emit("router_training", steps=args.router_steps, seconds=time.perf_counter() - t,
                loss=float(metrics["loss"]), load_imbalance_random_init=imbalance_before)
    batches = corpus_batches(trainer, args.batch, args.seq, mcfg.vocab_size, 4, start=args.router_steps)

  size = args.peak_size
  x = jnp.ones((size, size), mcfg.dtype)
  mm = jax.jit(lambda a, b: a @ b)
  common.block(mm(x, x))
  step_times, peak_times, imbalance = [], [], []
  with common.count_compiles() as compiles:
    for i in range(args.warmup + args.steps):
      t = time.perf_counter()
      state, metrics = step(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
      dt = time.perf_counter() - t
      tp = common.time_once(mm, x, x)
      if i >= args.warmup:
        step_times.append(dt)
        peak_times.append(tp)
        imbalance.append(load_imbalance(metrics["expert_counts"]))
  if args.trace:  # a profile of 3 more steps (perfetto_trace.json.gz under args.trace)
    with jax.profiler.trace(args.trace, create_perfetto_trace=True):
      for i in range(3):
        state, metrics = step(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
  step_s = statistics.median(step_times)
  peak = 2 * size ** 3 / statistics.median(peak_times)
  tokens = args.batch * args.seq
  model_flops = flops.train_flops_per_token(mcfg, args.seq) * tokens
  common.emit(
      "train_step", config=args.config, overrides=list(args.set), batch=args.batch, seq=args.seq,
      dtype=mcfg.dtype, moe_impl=mcfg.moe_impl, moe_gmm=gmm.choose(mcfg.moe_gmm, *gmm_operands(mcfg)),
      attention_impl=mla.attention_impl(mcfg, packed=not args.no_document_mask),
      remat_policy=mcfg.remat_policy, scan_layers=mcfg.scan_layers,
      params=trainer.num_params, activated_params=flops.activated_params(mcfg), steps=args.steps,
      step_s=step_s, step_s_min=min(step_times), tokens_per_s=tokens / step_s,
      model_flops_per_step=model_flops, model_tflops=model_flops / step_s / 1e12,
      peak_tflops=peak / 1e12, peak_source=f"measured {size}^3 {mcfg.dtype} matmul, interleaved",
      mfu=model_flops / step_s / peak, compile_s=compile_s, compiles_after_first_step=compiles.count,
      donated=bool(donated), loss=float(metrics["loss"]), router_steps=args.router_steps,
      document_mask=not args.no_document_mask,
      load_imbalance=float(np.mean(imbalance)), data="embedded corpus" if args.router_steps else "random tokens",
      temp_bytes=getattr(mem, "temp_size_in_bytes", None), argument_bytes=getattr(mem, "argument_size_in_bytes", None),
      loadavg=common.load_average())


def main(argv=None):
  p = common.parser(__doc__, "the model", "tiny config, 2 steps")
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--peak_size", type=int, default=1024, help="N of the N^3 peak matmul (8192 on a GPU)")
  p.add_argument("--trace", default="", help="write a jax.profiler trace of 3 more steps to this directory")
  p.add_argument("--no_document_mask", action="store_true",
                 help="config.data.document_mask=False: plain causal attention over packed rows (cuDNN flash on GPU)")
  p.add_argument("--router_steps", type=int, default=0,
                 help="train this many steps on the embedded corpus before timing (a trained router)")
  args = p.parse_args(argv)
  if args.smoke:
    args.config, args.batch, args.seq, args.steps, args.warmup, args.peak_size = "tiny", 2, 16, 2, 1, 128
    args.router_steps = min(args.router_steps, 2)
    args.set = ["num_hidden_layers=1", "first_k_dense_replace=0", "num_nextn_predict_layers=0",
                "vocab_size=320"] + args.set  # the corpus is byte tokens + specials
  run(args)


if __name__ == "__main__":
  main()
