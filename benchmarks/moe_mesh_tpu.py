"""One MoE layer, forward + backward, compiled for a TPU topology from this host (compile-only).

What a pod would hold, compute and send for the routed-expert layer alone, per dispatch and
grouped matmul: moe_jax.layers.MoE (router, routed experts, shared expert) on x [B, S, D] in
bf16 with fp32 master weights, gradients of the parameters and of x, the mesh and rules of
moe_jax.sharding. One JSON line per (moe_impl, moe_gmm):
  temp_gb                 XLA's temporaries per chip (memory_analysis)
  xla_flops               cost_analysis FLOPs per chip: XLA's ops plus each Pallas kernel's own
                          static estimate (megablox: 2 * rows * K * N over the whole row buffer)
  xla_matmul_flops        matmul FLOPs by moe_jax.hlo (XLA's dots/convolutions + Pallas estimates)
  kernels                 Mosaic custom calls by kernel name, and their static FLOPs
  kernel_used_flops       the kernels' FLOPs over the rows routing fills when it is balanced
                          (megablox's grid visits only the tiles of the groups in use);
                          balanced_flops_ratio: XLA's matmuls plus these, over model_flops_layer
  model_flops             per chip: routed 18*T*X*D*F (3 matmuls, 2 FLOPs each, fwd + 2x bwd),
                          shared 18*T*D*F*n_shared, router 6*T*D*E; T = tokens per chip
  collectives             count and GB per kind per chip (moe_jax.hlo)
  expert_stack_gathers    all-gathers whose result holds all E experts

  python benchmarks/moe_mesh_tpu.py --topology=v5p-128 --mesh=1,8,8,1 --seq=4096   # DeepSeek-V3 layer
  python benchmarks/moe_mesh_tpu.py --topology=v5:2x2x2 --mesh=1,2,4,1 --tiny
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from moe_jax import aot, config as model_config, hlo, sharding  # noqa: E402
from moe_jax.layers.moe import MoE  # noqa: E402

def layer_step(cfg, mesh, rules, batch: int, seq: int, repeat: int = 1):
  """The jitted fwd+bwd of one MoE layer and its abstract (sharded) arguments.

  repeat > 1: the layer applied that many times in a rematerialized scan (as scan_layers with
  remat_policy='full' run it), which re-traces the dispatch under partial evaluation."""
  d = cfg.hidden_size
  module = MoE(cfg)
  with sharding.activation_rules(mesh, rules):
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, seq, d), cfg.compute_dtype)))
    shardings = nn.unbox(sharding.named_shardings(boxed, mesh, rules))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
  x_sharding = sharding.batch_sharding(mesh, 3, rules)
  x = jax.ShapeDtypeStruct((batch, seq, d), cfg.compute_dtype, sharding=x_sharding)

  def loss(params, rest, x, dy):
    layer = lambda h: module.apply({"params": params, **rest}, h)  # noqa: E731
    if repeat > 1:
      layer = jax.checkpoint(layer)
      x = jax.lax.scan(lambda h, _: (layer(h), None), x, None, length=repeat - 1)[0]
    return jnp.sum(layer(x).astype(jnp.float32) * dy)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
  rest = {k: v for k, v in abstract.items() if k != "params"}
  return step, (abstract["params"], rest, x, jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x_sharding))


def kernel_calls(text: str) -> dict[str, dict[str, float]]:
  """Mosaic custom calls of a compiled module: {kernel: {count, static flops}}.

  A Pallas kernel is named by the jitted function around its pallas_call (megablox: gmm, tgmm);
  XLA's own Mosaic kernels (ragged_dot's on TPU) by the instruction name.
  """
  comps, _ = hlo.parse(text)
  out: dict[str, dict[str, float]] = {}
  for comp in comps.values():
    for ins in comp.instructions.values():
      if ins.opcode != "custom-call" or "tpu_custom_call" not in ins.attrs:
        continue
      m = re.search(r"jit\((\w+)\)\)*/pallas_call", ins.attrs)
      name = m.group(1) if m else re.sub(r"\.\d+$", "", ins.name)
      m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', ins.attrs)
      rec = out.setdefault(name, {"count": 0, "flops": 0.0})
      rec["count"] += 1
      rec["flops"] += float(m.group(1)) if m else 0.0
  return out


def expert_stack_gathers(text: str, cfg) -> int:
  """All-gathers whose result has the expert count E as a dimension, with D or F beside it."""
  e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
  n = 0
  for line in text.splitlines():
    m = re.search(r"=\s*\w+\[([\d,]+)\][^=]*?\sall-gather(?:-start)?\(", line)
    if m:
      dims = [int(v) for v in m.group(1).split(",")]
      n += len(dims) == 3 and dims[0] == e and (d in dims[1:] or f in dims[1:])
  return n


def model_flops(cfg, tokens: int) -> dict[str, float]:
  d, f, x, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
  routed = 18.0 * tokens * x * d * f
  return {"routed": routed, "layer": routed + 18.0 * tokens * d * f * cfg.n_shared_experts + 6.0 * tokens * d * e}


def measure(cfg, devices, mesh_shape, batch: int, seq: int, hlo_path: str | None = None) -> dict:
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  rules = sharding.DEFAULT_RULES
  step, args = layer_step(cfg, mesh, rules, batch, seq)
  t0 = time.perf_counter()
  with sharding.activation_rules(mesh, rules):
    compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  summary = hlo.summarize(text)
  chips = len(devices)
  tokens = batch * seq // chips
  kernels = kernel_calls(text)
  kflops = sum(k["flops"] for k in kernels.values())
  # Rows the grouped matmuls hold per chip against the rows balanced routing fills.
  ep = mesh.shape["expert"]
  used = tokens * cfg.num_experts_per_tok
  held = {"ragged": tokens * ep * min(cfg.num_experts_per_tok, cfg.n_routed_experts // ep)}.get(cfg.moe_impl, used)
  mf = model_flops(cfg, tokens)
  gb = lambda b: round(b / 1e9, 3)  # noqa: E731
  return {
      "moe_impl": cfg.moe_impl, "moe_gmm": cfg.moe_gmm, "chips": chips, "mesh": dict(mesh.shape),
      "tokens_per_chip": tokens, "compile_s": round(compile_s, 1), "temp_gb": gb(mem.temp_size_in_bytes),
      "argument_gb": gb(mem.argument_size_in_bytes), "xla_flops": float(f"{cost.get('flops', 0.0):.4g}"),
      "xla_matmul_flops": float(f"{summary.flops:.4g}"), "kernels": kernels,
      "kernel_used_flops": float(f"{kflops * used / held:.4g}") if kflops else 0.0,
      "model_flops_layer": float(f"{mf['layer']:.4g}"), "model_flops_routed": float(f"{mf['routed']:.4g}"),
      "xla_flops_ratio": round(cost.get("flops", 0.0) / mf["layer"], 3),
      "balanced_flops_ratio": round((summary.flops - summary.kernel_flops + kflops * used / held) / mf["layer"], 3),
      "collectives": {k: {"count": int(v["count"]), "gb": gb(v["bytes"])}
                      for k, v in sorted(summary.collectives.items())},
      "largest_collectives": [dict(d, bytes=int(d["bytes"])) for d in summary.largest[:5]],
      "expert_stack_gathers": expert_stack_gathers(text, cfg),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", default="v5p-128")
  p.add_argument("--mesh", default="1,8,8,1", help="data,fsdp,expert,tensor")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch_per_chip", type=int, default=1)
  p.add_argument("--impl", action="append", help="moe_impl:moe_gmm, repeatable (default: the four)")
  p.add_argument("--tiny", action="store_true", help="the tiny preset's widths (a fast check)")
  p.add_argument("--hlo_dir", help="write each compiled module's text there")
  args = p.parse_args(argv)
  import json
  topo = aot.parse_topology(args.topology)
  devices = topo.devices()
  mesh_shape = tuple(int(v) for v in args.mesh.split(","))
  base = (model_config.tiny if args.tiny else model_config.deepseek_v3)(
      dtype="bfloat16", num_hidden_layers=2, first_k_dense_replace=1)
  pairs = args.impl or ["ragged:ragged_dot", "ragged:pallas", "ep:ragged_dot", "ep:pallas"]
  for pair in pairs:
    impl, gmm = pair.split(":")
    cfg = base.replace(moe_impl=impl, moe_gmm=gmm)
    try:
      hlo_path = args.hlo_dir and os.path.join(args.hlo_dir, f"{impl}_{gmm}.hlo")
      rec = measure(cfg, devices, mesh_shape, args.batch_per_chip * len(devices), args.seq, hlo_path)
    except (ValueError, NotImplementedError) as e:  # a dispatch that does not compile: say so and go on
      rec = {"moe_impl": impl, "moe_gmm": gmm, "compiled": False, "error": str(e).splitlines()[0][:300]}
    print(json.dumps({"kind": "moe_mesh_tpu", "topology": args.topology, "seq": args.seq, **rec}), flush=True)


if __name__ == "__main__":
  main()
