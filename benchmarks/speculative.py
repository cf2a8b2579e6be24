"""MTP speculative decoding against plain greedy decoding, in the same process.

  python benchmarks/speculative.py --workdir W [--curve_steps 100,200] [--batches 1,8] [--ks 1,2]

For the newest checkpoint of a train.py run (W), and for the same config with random weights
(untrained: drafts almost never accepted, so the figure is the overhead):
  * new tokens/s of generate(..., speculative=K) and of plain greedy generate, interleaved
    (plain, spec, plain, spec, ...) so that load on a shared machine hits both alike; the
    tokens must be identical (`same_tokens`); acceptance rate per draft position and new
    tokens per verify step from the loop's own counters.
  * where the time goes, per call of one jitted step at that batch: the plain decode step
    (1 token), the verify step (K+1 tokens against the cache), the draft (the MTP depth over
    its K+1-position window plus K-1 one-token reuses), and the MTP block alone on one token
    (its share of a plain step).
--curve_steps: acceptance (K=2, batch 8) at those checkpoints of the run, for the curve over
training. Prompts: the first --prompt_len bytes after byte 256 of the validation documents of the
embedded corpus (the run's data). One JSON object a line (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import emit, machine_info, time_interleaved  # noqa: E402
from moe_jax import data, evaluate, speculative  # noqa: E402
from moe_jax.generate import _decode_call, generate, init_cache  # noqa: E402


def prompts(batch: int, length: int) -> np.ndarray:
  _, val, _ = data.embedded_corpus(0.01)
  starts = val.doc_starts[np.diff(np.append(val.doc_starts, len(val))) > 256 + length][:batch] + 256
  if len(starts) < batch:
    raise SystemExit(f"only {len(starts)} validation documents are long enough")
  return val.windows(starts, length)["tokens"]


@functools.lru_cache(maxsize=None)  # one compile per (model, K), trained and untrained weights alike
def step_fns(model, k: int):
  """Jitted single calls: plain decode step, verify of K+1 tokens, the K drafts, the MTP block on one token."""
  depths = min(model.cfg.num_nextn_predict_layers, k)
  sampling = (0.0, 0, 1.0)

  @jax.jit
  def plain(variables, cache, tok_B, pos_B):
    logits, cache = _decode_call(model, variables, cache, tok_B[:, None], pos_B[:, None])
    return jnp.argmax(logits[:, 0], -1), cache

  @jax.jit
  def verify(variables, cache, toks_BJ, pos_B):
    (logits, h), cache = speculative._apply(model, variables, cache, "verify", toks_BJ,
                                            pos_B[:, None] + jnp.arange(k + 1))
    return jnp.argmax(logits, -1), h, cache

  @jax.jit
  def draft(variables, cache, h_BWD, seq_BX, pos_B):
    positions = pos_B[:, None] - depths + 1 + jnp.arange(k + depths)
    query = jnp.full(pos_B.shape, depths - 1, jnp.int32)
    d, _, cache = speculative._draft(model, variables, cache, h_BWD, seq_BX, positions, query, k, depths, True,
                                     jax.random.key(0), sampling)
    return d, cache

  @jax.jit
  def mtp_one(variables, cache, h_B1D, tok_B, pos_B):
    (h, logits), cache = speculative._apply(model, variables, cache, "draft", 0, tok_B[:, None], h_B1D,
                                            pos_B[:, None], jnp.zeros_like(pos_B), True)
    return jnp.argmax(logits, -1), cache

  return plain, verify, draft, mtp_one, depths


def breakdown(model, variables, batch: int, k: int, length: int, iters: int) -> dict:
  """Median ms per call of each piece at a cache of `length` slots, position length // 2."""
  plain, verify, draft, mtp_one, depths = step_fns(model, k)
  cache = init_cache(model, batch, length, mtp=True)
  d = model.cfg.hidden_size
  pos = jnp.full((batch,), length // 2, jnp.int32)
  tok = jnp.ones((batch,), jnp.int32)
  times = time_interleaved({
      "plain_step": (plain, (variables, cache, tok, pos)),
      "verify_step": (verify, (variables, cache, jnp.ones((batch, k + 1), jnp.int32), pos)),
      "draft": (draft, (variables, cache, jnp.ones((batch, k + depths, d), model.cfg.compute_dtype),
                        jnp.ones((batch, 2 * k + depths), jnp.int32), pos)),
      "mtp_block_1tok": (mtp_one, (variables, cache, jnp.ones((batch, 1, d), model.cfg.compute_dtype), tok, pos)),
  }, warmup=1, iters=iters)
  return {f"{name}_ms": 1e3 * t for name, t in times.items()}


def compare(model, variables, prompt, n: int, k: int, iters: int) -> dict:
  """Interleaved timing of plain greedy and speculative generate over the same prompts."""
  batch = prompt.shape[0]
  ref = np.asarray(generate(model, variables, prompt, n))
  out, stats = speculative.generate_speculative(model, variables, prompt, n, k)
  times = time_interleaved({
      "plain": (lambda: generate(model, variables, prompt, n), ()),
      "speculative": (lambda: speculative.generate_speculative(model, variables, prompt, n, k)[0], ()),
  }, warmup=0, iters=iters)
  tokens = batch * n
  return dict(same_tokens=bool((np.asarray(out) == ref).all()), plain_tokens_per_s=tokens / times["plain"],
              speculative_tokens_per_s=tokens / times["speculative"], speedup=times["plain"] / times["speculative"],
              accept_rate=stats["accept_rate"], tokens_per_step=stats["tokens_per_step"])


def latest_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(root) if s.isdigit())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
  p.add_argument("--curve_steps", default="", help="checkpoint steps for the acceptance curve")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--ks", default="1,2")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--models", default="trained,untrained", help="trained (the checkpoint), untrained (random "
                 "weights of its config), or both")
  args = p.parse_args(argv)
  emit("machine", **machine_info())
  batches = [int(b) for b in args.batches.split(",")]
  ks = [int(k) for k in args.ks.split(",")]
  step = args.step or latest_steps(args.workdir)[-1]
  ckpt = os.path.join(args.workdir, "checkpoints", str(step))
  model, variables, _ = evaluate.load_model(checkpoint=ckpt)
  model = evaluate.for_eval(model)
  all_prompts = prompts(max(batches + [8]), args.prompt_len)

  for s in [int(x) for x in args.curve_steps.split(",") if x]:
    _, v, _ = evaluate.load_model(checkpoint=os.path.join(args.workdir, "checkpoints", str(s)))
    _, st = speculative.generate_speculative(model, v, all_prompts[:8], args.new_tokens, 2)
    emit("curve", step=s, batch=8, k=2, accept_rate=st["accept_rate"], tokens_per_step=st["tokens_per_step"])

  models = {}
  for name in args.models.split(","):
    if name == "trained":
      models[name] = variables
    elif name == "untrained":  # the same config, random weights (the model's initializers)
      init = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
      models[name] = {k: v for k, v in init.items() if k in ("params", "router")}
    else:
      raise SystemExit(f"--models: unknown {name!r}; known: trained, untrained")
  for name, v in models.items():
    for batch in batches:
      prompt = all_prompts[:batch]
      for k in ks:
        emit("compare", model=name, step=step if name == "trained" else 0, batch=batch, k=k,
             new_tokens=args.new_tokens, **compare(model, v, prompt, args.new_tokens, k, args.iters))
        emit("breakdown", model=name, batch=batch, k=k,
             **breakdown(model, v, batch, k, args.prompt_len + args.new_tokens + k + 1, 5 * args.iters))


if __name__ == "__main__":
  main()
