"""Decode speed: the absorbed MLA against the expanded one, over the same latent cache.

  python benchmarks/decode.py [--config small|v3attn] [--contexts 256,1024,4096] [--batch 1]

One decode step (one token per row) is jitted for each form and timed at a cache of T
slots with every slot attended (position T-1), the forms interleaved so load on a shared
machine hits both alike; tokens/s = batch / median step time. The expanded form rebuilds
per-head keys and values from the whole cache every step (T * K * H * (N + V) MACs per
layer); the absorbed one attends in the latent space (T * H * (K + R)). Step times are
medians (and the fastest, `*_best_ms`) over --iters interleaved steps. A last figure
compares moe_jax.generate's one-dispatch lax.while_loop with a python loop over a jitted step.
Configs: `small` (the preset) and `v3attn` (DeepSeek-V3's attention dims: 128 heads,
K=512, R=64, N=V=128, in a 2-layer model with small experts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import emit, machine_info  # noqa: E402
from moe_jax import config as mcfg  # noqa: E402
from moe_jax.generate import _decode_call, generate, init_cache  # noqa: E402
from moe_jax.model import Transformer  # noqa: E402

CONFIGS = {
    "small": lambda: mcfg.small(num_nextn_predict_layers=0),
    "v3attn": lambda: mcfg.deepseek_v3(dtype="float32", num_hidden_layers=2, first_k_dense_replace=1,
                                       n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                                       num_nextn_predict_layers=0, vocab_size=1024, hidden_size=1024,
                                       intermediate_size=1024, moe_intermediate_size=256, q_lora_rank=256),
}


def step_fn(model, absorb: bool):
  """(variables, cache, tokens [B], positions [B]) -> (next tokens [B], cache); the cache is donated."""
  def step(variables, cache, tok_B, pos_B):
    logits, cache = _decode_call(model, variables, cache, tok_B[:, None], pos_B[:, None], absorb)
    return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache
  return jax.jit(step, donate_argnums=1)


def time_steps(model, variables, batch: int, context: int, iters: int):
  """Seconds per decode step for each form, interleaved, at position context - 1 -> {form: [times]}."""
  steps = {"absorbed": step_fn(model, True), "expanded": step_fn(model, False)}
  caches = {k: jax.tree.map(lambda x: x + 0.01, init_cache(model, batch, context)) for k in steps}
  tok = jnp.ones((batch,), jnp.int32)
  pos = jnp.full((batch,), context - 1, jnp.int32)
  times = {k: [] for k in steps}
  for i in range(iters + 2):  # two warmup rounds (compilation)
    for name, fn in steps.items():
      t = time.perf_counter()
      out, caches[name] = fn(variables, caches[name], tok, pos)
      jax.block_until_ready((out, caches[name]))
      if i >= 2:
        times[name].append(time.perf_counter() - t)
  return times


def time_loops(model, variables, batch: int, prompt_len: int, new: int, reps: int):
  """Seconds per new token: generate()'s while_loop vs a python loop over a jitted step."""
  prompt = jnp.ones((batch, prompt_len), jnp.int32)
  step = step_fn(model, True)
  prefill = jax.jit(lambda v, c, t: _decode_call(model, v, c, t, None))
  empty = init_cache(model, batch, prompt_len + new)  # not donated by prefill: reused every call

  def python_loop():
    logits, cache = prefill(variables, empty, prompt)
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    for i in range(new - 1):
      tok, cache = step(variables, cache, tok, jnp.full((batch,), prompt_len + i, jnp.int32))
    return tok

  fns = {"while_loop": lambda: generate(model, variables, prompt, new), "python_loop": python_loop}
  times = {k: [] for k in fns}
  for i in range(reps + 1):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      if i:
        times[name].append((time.perf_counter() - t) / new)
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="small,v3attn", help=f"comma-separated, of {sorted(CONFIGS)}")
  p.add_argument("--contexts", default="256,1024,4096")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args(argv)
  emit("machine", **machine_info())
  for name in args.config.split(","):
    cfg = CONFIGS[name]()
    model = Transformer(cfg)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32)))(jax.random.key(0))
    variables = {k: variables[k] for k in ("params", "router")}
    info = dict(config=name, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, hidden=cfg.hidden_size,
                kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, dtype=cfg.dtype, batch=args.batch)
    for context in map(int, args.contexts.split(",")):
      times = time_steps(model, variables, args.batch, context, args.iters)
      t = {k: statistics.median(v) for k, v in times.items()}
      best = {k: min(v) for k, v in times.items()}  # the least disturbed step on a shared machine
      emit("decode_tokens_per_s", context=context, absorbed=args.batch / t["absorbed"],
           expanded=args.batch / t["expanded"], speedup=t["expanded"] / t["absorbed"],
           absorbed_ms=1e3 * t["absorbed"], expanded_ms=1e3 * t["expanded"], absorbed_best_ms=1e3 * best["absorbed"],
           expanded_best_ms=1e3 * best["expanded"], **info)
    t = time_loops(model, variables, args.batch, prompt_len=64, new=64, reps=3)
    emit("decode_loop_ms_per_token", prompt=64, new_tokens=64, while_loop=1e3 * t["while_loop"],
         python_loop=1e3 * t["python_loop"], **info)


if __name__ == "__main__":
  main()
