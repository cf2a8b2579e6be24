"""Per-chip buffers of the expert-parallel MoE layer (layers/ep.py) on a TPU topology, compile-only.

Compiles one MoE layer (router, routed experts through 'ep', shared expert), forward and
backward, at a preset's widths for a compile-only TPU topology (moe_jax.aot's topology names;
libtpu on the CPU host, nothing runs), and prints one JSON line: per-chip tokens, exchange
slots C per shard pair, the bytes each MoE all-to-all moves per chip (read from the compiled
HLO), the balanced size T*X*D (bytes) and the worst case a one-exchange dropless buffer would
need, P*T*min(X, E/P)*D, and XLA's per-chip temp memory.

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/ep_buffers.py --topology=v5p-1024 --mesh=1,8,64,1
  python benchmarks/ep_buffers.py --smoke          # tiny widths on v5:2x2x2
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax import aot, sharding  # noqa: E402
from moe_jax.config import PRESETS  # noqa: E402
from moe_jax.layers import ep  # noqa: E402
from moe_jax.layers.moe import MoE  # noqa: E402

BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f8e4m3fn": 1, "pred": 1}


def exchange_bytes(hlo_text: str) -> list[int]:
  """Bytes per chip of each all-to-all inside the MoE shard_map (all operands of one op summed)."""
  out = []
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\sall-to-all(?:-start)?\(", line)
    if m and "shard_map" in line:
      out.append(sum(BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                     for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="deepseek_v3")
  p.add_argument("--topology", default="v5p-1024")
  p.add_argument("--mesh", default="1,8,64,1", help="data,fsdp,expert,tensor")
  p.add_argument("--tokens_per_chip", type=int, default=4096)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  if args.smoke:
    args.preset, args.topology, args.mesh = "tiny", "v5:2x2x2", "1,2,4,1"
    args.tokens_per_chip, args.dtype = 64, "float32"
  cfg = PRESETS[args.preset](dtype=args.dtype, param_dtype=args.dtype, moe_impl="ep")
  topo = aot.parse_topology(args.topology)
  mesh = sharding.make_mesh(*aot.sizes(args.mesh, "--mesh"), devices=topo.devices())
  rules = sharding.DEFAULT_RULES
  chips = mesh.devices.size
  t_chip, p_ep = args.tokens_per_chip, mesh.shape["expert"]
  d, x = cfg.hidden_size, cfg.num_experts_per_tok
  seq = min(t_chip, 4096)
  batch = chips * t_chip // seq
  x_abs = jax.ShapeDtypeStruct((batch, seq, d), cfg.compute_dtype, sharding=sharding.batch_sharding(mesh, 3, rules))
  boxed = jax.eval_shape(lambda: MoE(cfg).init(jax.random.key(0), jnp.zeros((1, 8, d), cfg.compute_dtype)))
  shardings = nn.unbox(sharding.named_shardings(boxed, mesh, rules))
  v_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)

  def loss(params, rest, x):
    y = MoE(cfg).apply({"params": params, **rest}, x)
    return jnp.sum(y.astype(jnp.float32))

  t0 = time.perf_counter()
  with sharding.activation_rules(mesh, rules):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(
        v_abs["params"], {k: v for k, v in v_abs.items() if k != "params"}, x_abs).compile()
  compile_s = time.perf_counter() - t0
  cap = ep.ep_capacity(t_chip, p_ep, cfg)
  width = jnp.dtype(cfg.compute_dtype).itemsize
  exchanged = exchange_bytes(compiled.as_text())
  mem = compiled.memory_analysis()
  common.emit("ep_buffers", preset=args.preset, topology=args.topology, chips=chips, mesh=dict(mesh.shape),
              tokens_per_chip=t_chip, experts=cfg.n_routed_experts, local_experts=cfg.n_routed_experts // p_ep,
              topk=x, hidden=d, dtype=args.dtype, ep_round_factor=cfg.ep_round_factor, slots_per_pair=cap,
              row_exchange_bytes=max(exchanged) if exchanged else 0, exchanges=len(exchanged),
              balanced_bytes=t_chip * x * d * width,
              worst_one_exchange_bytes=p_ep * t_chip * min(x, cfg.n_routed_experts // p_ep) * d * width,
              temp_bytes=mem.temp_size_in_bytes, argument_bytes=mem.argument_size_in_bytes,
              compile_s=compile_s, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
