"""The MoE layer per dispatch against an ideal dense SwiGLU MLP with the same activated FLOPs.

Both sides are whole layers on x [B, S, D]: moe_jax.layers.MoE (router, routed experts through
the dispatch, shared experts) and moe_jax.layers.MLP with hidden (top-k + shared) x F, which
does the same expert FLOPs with no routing at all; ratio = MoE seconds / MLP seconds (the
router's D x E matmul counts against the MoE). Dispatches:
  dense       every expert on every token (E / top-k times the FLOPs; the reference)
  capacity    GShard [E, C, D] buffers (capacity_factor from the config)
  ragged      dropless sort + the tiled grouped matmul (layers/gmm.py, the CPU path)
  ragged_dot  dropless sort + jax.lax.ragged_dot (XLA's grouped GEMM; dense masked on CPU)
  pallas      dropless sort + the Pallas grouped matmul of layers/gmm_pallas.py (Hopper GPU, TPU)
  ep          expert parallel (layers/ep.py) on --ep forced host devices, run in a subprocess
              (XLA_FLAGS); there the MLP runs data-parallel over the same devices. Host devices
              share this machine's cores, so ep measures the dispatch's overhead, not scaling.
Each figure: forward, and forward + backward (gradients of params and x), medians of
interleaved runs.

--ep_routing adds, in the ep subprocess, 'ep_routing' figures: ep on every forced device
against the dropless ragged layer on one device, with balanced routing (random init) and
skewed routing (the router's correction bias sends every token to shard 0's experts):
seconds, compiled temp memory (per device for ep), exchange rounds and all-to-all rows.

  python benchmarks/moe_layer.py                     # bench10m's MoE layer, 8 x 128 tokens
  python benchmarks/moe_layer.py --set n_routed_experts=64 --set moe_intermediate_size=64
  python benchmarks/moe_layer.py --smoke
  python benchmarks/moe_layer.py --dispatch ep --ep_routing   # the EP section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax.layers.common import MLP  # noqa: E402
from moe_jax.layers.moe import MoE  # noqa: E402

DISPATCHES = ("dense", "capacity", "ragged", "ragged_dot", "pallas", "ep")


def layer_cfg(cfg, dispatch: str):
  if dispatch in ("ragged_dot", "pallas"):
    return cfg.replace(moe_impl="ragged", moe_gmm=dispatch)
  if dispatch == "ragged":
    return cfg.replace(moe_impl="ragged", moe_gmm="tiled")
  return cfg.replace(moe_impl=dispatch)


def fwd_and_grad(module, variables, x):
  """(jitted forward, jitted forward+backward) of a module on x, the cotangent fixed."""
  dy = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
  fwd = jax.jit(lambda v, x: module.apply(v, x))

  def loss(params, rest, x):
    return jnp.sum(module.apply({"params": params, **rest}, x).astype(jnp.float32) * dy)

  grad = jax.jit(jax.grad(loss, argnums=(0, 2)))
  rest = {k: v for k, v in variables.items() if k != "params"}
  return (fwd, (variables, x)), (grad, (variables["params"], rest, x))


def contenders(cfg, dispatches, x, mesh=None, rules=None):
  """{name: (fn, args)} for the ideal MLP and each dispatch; variables placed on the mesh when given."""
  from moe_jax import sharding
  ideal = MLP(cfg, (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size)
  key = jax.random.key(0)
  modules = {"ideal_mlp": ideal, **{d: MoE(layer_cfg(cfg, d)) for d in dispatches}}
  boxed = {"ideal_mlp": ideal.init(key, x), "moe": MoE(cfg.replace(moe_impl="ragged")).init(key, x)}
  out = {}
  for name, module in modules.items():
    v = boxed["ideal_mlp" if name == "ideal_mlp" else "moe"]
    if mesh is not None:
      v = jax.device_put(nn.unbox(v), nn.unbox(sharding.named_shardings(v, mesh, rules)))
    fwd, grad = fwd_and_grad(module, nn.unbox(v), x)
    out[f"{name}/forward"], out[f"{name}/forward_backward"] = fwd, grad
  return out


def report(cfg, args, times, devices: int):
  tokens = args.batch * args.seq
  for name, secs in times.items():
    layer, what = name.split("/")
    if layer == "ideal_mlp":
      continue
    base = times[f"ideal_mlp/{what}"]
    common.emit("moe_layer", dispatch=layer, what=what, tokens=tokens, hidden=cfg.hidden_size,
                experts=cfg.n_routed_experts, topk=cfg.num_experts_per_tok, expert_ffn=cfg.moe_intermediate_size,
                shared=cfg.n_shared_experts, dtype=cfg.dtype, devices=devices, moe_s=secs, ideal_mlp_s=base,
                ratio=secs / base, loadavg=common.load_average())


def run_ep(cfg, args) -> None:
  """In the subprocess: expert parallel over every (forced host) device, and the MLP data-parallel."""
  from moe_jax import sharding
  n = jax.device_count()
  mesh = sharding.make_mesh(data=1, fsdp=1, expert=n, tensor=1)
  rules = sharding.DEFAULT_RULES
  x = jax.random.normal(jax.random.key(2), (args.batch, args.seq, cfg.hidden_size), cfg.dtype)
  x = jax.device_put(x, sharding.batch_sharding(mesh, 3, rules))
  with sharding.activation_rules(mesh, rules):
    fns = contenders(cfg, ["ep"], x, mesh, rules)
    times = common.time_interleaved(fns, warmup=args.warmup, iters=args.iters)
  report(cfg, args, times, n)


def _all_to_all_rows(hlo_text: str) -> list[int]:
  """Rows per device of each distinct MoE all-to-all (XLA:CPU's tuple form: per-peer blocks summed)."""
  rows = set()
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\sall-to-all(?:-start)?\(", line)
    if m and "shard_map" in line:
      rows.add(sum(int(s.split(",")[0]) for s in re.findall(r"\w+\[([\d,]+)\]", m.group(1))))
  return sorted(rows)


def run_ep_routing(cfg, args) -> None:
  """ep over every device vs ragged on one, balanced and skewed routing (module docstring)."""
  from moe_jax import sharding
  n = jax.device_count()
  mesh = sharding.make_mesh(data=1, fsdp=1, expert=n, tensor=1)
  rules = sharding.DEFAULT_RULES
  x = jax.random.normal(jax.random.key(2), (args.batch, args.seq, cfg.hidden_size), cfg.dtype)
  boxed = MoE(cfg.replace(moe_impl="ragged")).init(jax.random.key(0), x)
  shardings = nn.unbox(sharding.named_shardings(boxed, mesh, rules))
  e_local = cfg.n_routed_experts // n
  for routing in ("balanced", "skewed"):
    bias = jnp.zeros((cfg.n_routed_experts,), jnp.float32)
    if routing == "skewed":
      bias = bias.at[:e_local].set(10.0)
    v = nn.unbox(boxed)
    v["router"] = jax.tree.map(lambda b: jnp.broadcast_to(bias, b.shape).astype(b.dtype), v["router"])
    one_cfg = cfg.replace(moe_impl="ragged", moe_gmm="tiled")
    fns = {}
    fns["ragged_1dev/forward"], fns["ragged_1dev/forward_backward"] = fwd_and_grad(MoE(one_cfg), v, x)
    with sharding.activation_rules(mesh, rules):
      ep_cfg = cfg.replace(moe_impl="ep")
      xs = jax.device_put(x, sharding.batch_sharding(mesh, 3, rules))
      vs = jax.device_put(v, shardings)
      fns["ep/forward"], fns["ep/forward_backward"] = fwd_and_grad(MoE(ep_cfg), vs, xs)
      compiled = {k: fn.lower(*a).compile() for k, (fn, a) in fns.items()}
      _, inter = jax.jit(lambda v, x: MoE(ep_cfg).apply(v, x, mutable=["intermediates"]))(vs, xs)
      times = common.time_interleaved(fns, warmup=args.warmup, iters=args.iters)
    rounds = float(inter["intermediates"]["ep_rounds"])
    for what in ("forward", "forward_backward"):
      mem = {k: compiled[f"{k}/{what}"].memory_analysis().temp_size_in_bytes for k in ("ep", "ragged_1dev")}
      common.emit("ep_routing", routing=routing, what=what, tokens=args.batch * args.seq, devices=n,
                  experts=cfg.n_routed_experts, topk=cfg.num_experts_per_tok, hidden=cfg.hidden_size,
                  expert_ffn=cfg.moe_intermediate_size, ep_s=times[f"ep/{what}"],
                  ragged_1dev_s=times[f"ragged_1dev/{what}"], ratio=times[f"ep/{what}"] / times[f"ragged_1dev/{what}"],
                  ep_temp_bytes_per_device=mem["ep"], ragged_1dev_temp_bytes=mem["ragged_1dev"], ep_rounds=rounds,
                  all_to_all_rows=_all_to_all_rows(compiled[f"ep/{what}"].as_text()),
                  balanced_rows=args.batch * args.seq // n * cfg.num_experts_per_tok, loadavg=common.load_average())


def run(args) -> None:
  cfg = common.model_config(args.config, args.set)
  if args.only_ep:
    run_ep(cfg, args)
    if args.ep_routing:
      run_ep_routing(cfg, args)
    return
  common.emit("machine", **common.machine_info())
  local = [d for d in args.dispatch if d != "ep"]
  x = jax.random.normal(jax.random.key(2), (args.batch, args.seq, cfg.hidden_size), cfg.dtype)
  report(cfg, args, common.time_interleaved(contenders(cfg, local, x), warmup=args.warmup, iters=args.iters), 1)
  if "ep" in args.dispatch:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={args.ep}".strip(), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--only_ep", *sys.argv[1:]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    sys.stdout.write(out.stdout)
    if out.returncode:
      sys.stderr.write(out.stderr)
      raise SystemExit(f"ep subprocess failed with code {out.returncode}")


def main(argv=None):
  p = common.parser(__doc__, "the MoE layer's shape", "a tiny layer, 2 iterations")
  p.add_argument("--dispatch", type=lambda s: s.split(","), default=None,
                 help=f"comma-separated subset of {','.join(DISPATCHES)} (default: all that run here; "
                      "pallas needs a Hopper GPU or a TPU)")
  p.add_argument("--ep", type=int, default=8, help="forced host devices (expert-parallel size) for 'ep'")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--ep_routing", action="store_true",
                 help="also ep vs one-device ragged under balanced and skewed routing (time, memory, rounds)")
  p.add_argument("--only_ep", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.dispatch is None:
    from moe_jax.layers import gmm_pallas
    args.dispatch = [d for d in DISPATCHES if d != "pallas" or gmm_pallas.available()]
  bad = set(args.dispatch) - set(DISPATCHES)
  if bad:
    p.error(f"unknown dispatch {sorted(bad)}; known: {', '.join(DISPATCHES)}")
  if args.smoke:
    args.config, args.batch, args.seq, args.iters, args.warmup, args.ep = "tiny", 2, 16, 2, 1, 2
    args.set = ["num_hidden_layers=1", "first_k_dense_replace=0"] + args.set
    if "--dispatch" not in " ".join(sys.argv):
      args.dispatch = ["ragged", "ep"]
  run(args)


if __name__ == "__main__":
  main()
