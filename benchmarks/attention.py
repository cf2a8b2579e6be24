"""MLA attention (training form) against jax.nn.dot_product_attention of the same shape.

Contenders, each forward and forward + backward (gradients of every input and parameter):
  sdpa              jax.nn.dot_product_attention(q, k, v, is_causal=True), q/k/v [B, S, H, N+R],
                    cuDNN flash attention on a GPU (bf16/fp16), XLA elsewhere
                    (v at the qk head dim, as the API wants one head dim), the yardstick
  mla_core/<impl>   MLA.expanded: keys and values up-projected from the latent c [B, S, K]
                    (k_b, v_b), then causal attention, for attention_impl einsum | dot_product
                    and, on their accelerator, splash (TPU) | pallas_gpu (GPU)
  mla_layer/<impl>  the whole MLA layer x [B, S, D] -> [B, S, D] (projections, norms, RoPE)
ratio = seconds / sdpa seconds, medians of interleaved runs.

--tpu-memory TOPOLOGY compiles instead (nothing runs) for a compile-only TPU topology and prints
the compiler's memory figures per device for forward + backward of one MLA layer and one dense
block (MLA + SwiGLU MLP), batch 1 per chip, packed documents, at each --seqs length
(`attention_memory` records: the compiler's argument / output / temp / peak bytes per device):

  python benchmarks/attention.py                  # bench10m's attention, 8 x 128
  python benchmarks/attention.py --config small --seq 1024 --batch 2
  python benchmarks/attention.py --smoke
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/attention.py --config deepseek_v3 --set dtype=bfloat16 \
      --tpu-memory v5p-2 --seqs 4096,8192,32768 --impls auto,einsum
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax import sharding, target  # noqa: E402
from moe_jax.layers.attention import sdpa_implementation  # noqa: E402
from moe_jax.layers.mla import MLA, attention_impl  # noqa: E402


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
  for impl in timed_impls():
    mla = MLA(cfg.replace(attention_impl=impl))
    core = lambda p, qn, qr, c, kr, mla=mla: mla.apply({"params": p}, qn, qr, c, kr,  # noqa: E731
                                                       method=MLA.expanded)
    fns[f"mla_core/{impl}/forward"], fns[f"mla_core/{impl}/forward_backward"] = with_grad(
        core, (params, q_nope, q_rope, c, k_rope))
    layer = lambda p, x, mla=mla: mla.apply({"params": p}, x, pos)  # noqa: E731
    fns[f"mla_layer/{impl}/forward"], fns[f"mla_layer/{impl}/forward_backward"] = with_grad(layer, (params, x))
  return fns


def timed_impls() -> list[str]:
  """einsum and dot_product everywhere; the Pallas kernel of this accelerator where there is one
  (on CPU the Pallas kernels only run interpreted, which times the interpreter)."""
  own = {"tpu": ["splash"], "gpu": ["pallas_gpu"]}.get(target.platform(), [])
  return ["einsum", "dot_product"] + own


def tpu_memory(args) -> None:
  """Compiles forward + backward of one MLA layer and one dense block for a TPU topology; emits memory figures."""
  import numpy as np
  from flax import linen as nn
  from moe_jax import aot
  from moe_jax.layers.common import RMSNorm
  from moe_jax.model import Block
  devices = aot.parse_topology(args.tpu_memory).devices()
  mesh = sharding.make_mesh(devices=devices)
  rules = sharding.DEFAULT_RULES
  cfg0 = common.model_config(args.config, args.set)
  batch = len(devices)  # one sequence per chip
  common.emit("machine", **common.machine_info(), topology=args.tpu_memory, target_devices=len(devices),
              target_device_kind=devices[0].device_kind)

  class MLALayer(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x, pos, seg):
      return x + MLA(self.cfg, name="attn")(RMSNorm(self.cfg, name="attn_norm")(x), pos, seg)

  for impl in args.impls.split(","):
    cfg = cfg0.replace(attention_impl=impl)
    modules = {"mla": MLALayer(cfg), "dense_block": Block(cfg, moe=False)}
    for layer, module in ((name, modules[name]) for name in args.layers.split(",")):
      for seq in (int(s) for s in args.seqs.split(",")):
        x = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), cfg.compute_dtype, sharding=sharding.batch_sharding(
            mesh, 3, rules))
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding(mesh, 2, rules))
        boxed = jax.eval_shape(module.init, jax.random.key(0), x, ids, ids)
        shardings = nn.unbox(sharding.named_shardings(boxed, mesh, rules))["params"]
        params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              nn.unbox(boxed)["params"], shardings)

        def loss(p, x, pos, seg, dy, module=module):
          return jnp.sum((module.apply({"params": p}, x, pos, seg) * dy).astype(jnp.float32))

        with sharding.activation_rules(mesh, rules):
          resolved = attention_impl(cfg, packed=True)
          compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids, ids, x).compile()
        mem = compiled.memory_analysis()
        text = compiled.as_text()
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        common.emit("attention_memory", layer=layer, impl=impl, resolved=resolved, seq=seq, batch=batch,
                    heads=cfg.num_attention_heads, qk_head_dim=cfg.qk_head_dim, v_head_dim=cfg.v_head_dim,
                    dtype=cfg.dtype, param_dtype=cfg.param_dtype, packed=True,
                    argument_gb=mem.argument_size_in_bytes / 1e9, output_gb=mem.output_size_in_bytes / 1e9,
                    temp_gb=mem.temp_size_in_bytes / 1e9, total_gb=total / 1e9,
                    peak_gb=mem.peak_memory_in_bytes / 1e9, tpu_custom_calls=text.count("tpu_custom_call"),
                    score_tensors=score_tensors(text, seq),
                    xla_flops=float(np.sum(compiled.cost_analysis()["flops"])))  # Mosaic kernels not counted


def score_tensors(hlo_text: str, seq: int) -> list[str]:
  """Distinct f32/bf16 arrays of the compiled HLO whose two minor dims are [seq, seq] (attention scores)."""
  import re
  return sorted(set(re.findall(r"(?:f32|bf16|f16)\[[0-9,]*%d,%d\]" % (seq, seq), hlo_text)))


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
  p.add_argument("--tpu-memory", metavar="TOPOLOGY", help="compile for this TPU topology (moe_jax.aot's "
                 "names: v5p-2 is one v5p chip) and print memory figures instead of timing")
  p.add_argument("--seqs", default="4096,8192,32768", help="sequence lengths for --tpu-memory")
  p.add_argument("--impls", default="auto,einsum", help="attention_impl values for --tpu-memory")
  p.add_argument("--layers", default="mla,dense_block", help="what --tpu-memory compiles: mla, dense_block")
  args = p.parse_args(argv)
  if args.tpu_memory:
    return tpu_memory(args)
  if args.smoke:
    args.config, args.batch, args.seq, args.iters, args.warmup = "tiny", 2, 16, 2, 1
  run(args)


if __name__ == "__main__":
  main()
