"""MLA attention (training form) against jax.nn.dot_product_attention of the same shape.

Contenders, each forward and forward + backward (gradients of every input and parameter):
  sdpa              jax.nn.dot_product_attention(q, k, v, is_causal=True), q/k/v [B, S, H, N+R],
                    cuDNN flash attention on a GPU (bf16/fp16), XLA elsewhere
                    (v at the qk head dim, as the API wants one head dim), the yardstick
  mla_core/<impl>   MLA.expanded: keys and values up-projected from the latent c [B, S, K]
                    (k_b, v_b), then causal attention, for attention_impl einsum | dot_product
  mla_layer/<impl>  the whole MLA layer x [B, S, D] -> [B, S, D] (projections, norms, RoPE)
ratio = seconds / sdpa seconds, medians of interleaved runs.

  python benchmarks/attention.py                  # bench10m's attention, 8 x 128
  python benchmarks/attention.py --config small --seq 1024 --batch 2
  python benchmarks/attention.py --smoke
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax.layers.mla import MLA, sdpa_implementation  # noqa: E402


def with_grad(f, args):
  """(jitted f, jitted grad of sum(f * fixed cotangent) wrt every argument)."""
  out = jax.eval_shape(f, *args)
  dy = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
  loss = lambda *a: jnp.sum((f(*a) * dy).astype(jnp.float32))  # noqa: E731
  return (jax.jit(f), args), (jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))), args)


def contenders(cfg, batch: int, seq: int) -> dict:
  b, s, h, qk = batch, seq, cfg.num_attention_heads, cfg.qk_head_dim
  keys = jax.random.split(jax.random.key(0), 8)
  dt = cfg.compute_dtype
  q, k, v = (jax.random.normal(keys[i], (b, s, h, qk), dt) for i in range(3))
  sdpa_impl = sdpa_implementation(cfg.dtype, cfg.qk_head_dim)
  sdpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=cfg.softmax_scale,  # noqa: E731
                                                      implementation=sdpa_impl)
  fns = {}
  fns["sdpa/forward"], fns["sdpa/forward_backward"] = with_grad(sdpa, (q, k, v))

  x = jax.random.normal(keys[3], (b, s, cfg.hidden_size), dt)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  params = MLA(cfg).init(keys[4], x, pos)["params"]
  q_nope = jax.random.normal(keys[5], (b, s, h, cfg.qk_nope_head_dim), dt)
  q_rope = jax.random.normal(keys[6], (b, s, h, cfg.qk_rope_head_dim), dt)
  c = jax.random.normal(keys[7], (b, s, cfg.kv_lora_rank), dt)
  k_rope = jax.random.normal(keys[2], (b, s, cfg.qk_rope_head_dim), dt)
  for impl in ("einsum", "dot_product"):
    mla = MLA(cfg.replace(attention_impl=impl))
    core = lambda p, qn, qr, c, kr, mla=mla: mla.apply({"params": p}, qn, qr, c, kr, None,  # noqa: E731
                                                       method=MLA.expanded)
    fns[f"mla_core/{impl}/forward"], fns[f"mla_core/{impl}/forward_backward"] = with_grad(
        core, (params, q_nope, q_rope, c, k_rope))
    layer = lambda p, x, mla=mla: mla.apply({"params": p}, x, pos)  # noqa: E731
    fns[f"mla_layer/{impl}/forward"], fns[f"mla_layer/{impl}/forward_backward"] = with_grad(layer, (params, x))
  return fns


def run(args) -> None:
  cfg = common.model_config(args.config, args.set)
  common.emit("machine", **common.machine_info())
  times = common.time_interleaved(contenders(cfg, args.batch, args.seq), warmup=args.warmup, iters=args.iters)
  for name, secs in times.items():
    what = name.rsplit("/", 1)[1]
    common.emit("attention", name=name.rsplit("/", 1)[0], what=what, batch=args.batch, seq=args.seq,
                heads=cfg.num_attention_heads, qk_head_dim=cfg.qk_head_dim, v_head_dim=cfg.v_head_dim,
                kv_lora_rank=cfg.kv_lora_rank, dtype=cfg.dtype, seconds=secs, sdpa_s=times[f"sdpa/{what}"],
                ratio=secs / times[f"sdpa/{what}"], loadavg=common.load_average())


def main(argv=None):
  p = common.parser(__doc__, "the attention shape", "tiny shapes, 2 iterations")
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args(argv)
  if args.smoke:
    args.config, args.batch, args.seq, args.iters, args.warmup = "tiny", 2, 16, 2, 1
  run(args)


if __name__ == "__main__":
  main()
