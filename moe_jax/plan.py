"""Memory plan: per-device bytes of a model on a mesh, from jax.eval_shape and the rules table.

  python -m moe_jax.plan --preset=deepseek_v3 --mesh=1,16,32,1 --device_memory_gb=95 \
      --batch=512 --seq=4096 [--dcn=1,1,8,1] [--param_dtype=bfloat16] [--remat_policy=gathered]
  python -m moe_jax.plan --config=configs/deepseek_v3.py ...

Nothing is allocated: shapes come from eval_shape, partition specs from the rules, and
each dimension is divided by the product of the mesh axes it is sharded over (rounded
up). Reported per device:
  params       every variable (params + router state) in its own dtype
  grads        the trained params, in the params' dtype
  optimizer    AdamW mu + nu in fp32 (8 bytes per trained parameter)
  activations  what the backward keeps from the forward: with remat=full one saved [b, S, D]
               block input per layer (b = batch / data-parallel size), plus the head's logits;
               plus the first received rows of each MoE layer that keeps them (ep_saved_rows:
               every one under remat=ep_rows, the MTP block always), and under remat=gathered
               every block's gathered non-expert weights (saved_gathered_weights; under
               remat=gathered_offload they are in pinned host memory: reported apart, as host)
  working set  the transient peak on top (`working_set`): the larger of one layer's
               backward (recomputed forward, attention core: [b, H, S, S] scores for the XLA
               form, O(S) for flash kernels; MoE dispatch buffers and expert hidden rows; that
               layer's gathered weights and their full-size gradients) and the head's backward
               (fp32 logits and their gradient over the vocabulary, the gathered head weight)
  kv cache     the MLA latent cache: b x S x layers x (kv_lora_rank + qk_rope_head_dim)
Train = params + grads + optimizer + activations + working set; serve = params + kv cache.
The attention form follows the platform (`--platform`, default tpu: flash kernels on TPU and
GPU). `python -m moe_jax.aot` compiles the real step for a topology and reports what XLA
allocates; BENCHMARKS.md compares the two.
Prints a table and one JSON line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import AbstractMesh, AxisType

from moe_jax import flops, sharding, variables
from moe_jax.config import PRESETS, REMAT_POLICIES, ModelConfig
from moe_jax.errors import ArgumentParser, UserError, main_guard, one_line
from moe_jax.layers.common import GATHERING_POLICIES, keeps_gathered
from moe_jax.layers.ep import ep_capacity

GB = 1e9


def per_device_elements(shape, spec, axis_sizes: dict[str, int]) -> int:
  """Elements of one device's shard: each dim / product of its mesh axes, rounded up."""
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  return math.prod(-(-n // math.prod(axis_sizes[a] for a in sharding.spec_axes(s))) for n, s in zip(shape, spec))


def _is_expert(path) -> bool:
  names = [getattr(k, "key", str(k)) for k in path]
  return "moe" in names and names[-1] in ("gate", "up", "down") and "shared" not in names


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  batch: int
  seq: int
  total_params: int
  params: float  # per-device bytes from here on
  expert_params: float
  grads: float
  optimizer: float
  activations: float
  working_set: float
  kv_cache: float
  device_memory: float
  working_set_parts: dict = dataclasses.field(default_factory=dict)
  host_memory: float = 0.0  # pinned host bytes per device (remat gathered_offload), not in train

  @property
  def train(self) -> float:
    return self.params + self.grads + self.optimizer + self.activations + self.working_set

  @property
  def serve(self) -> float:
    return self.params + self.kv_cache

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(train=self.train, serve=self.serve, train_fits=self.train <= self.device_memory,
             serve_fits=self.serve <= self.device_memory)
    return d


def _attention_is_flash(cfg: ModelConfig, platform: str) -> bool:
  """Whether the expanded attention runs as a flash kernel (O(S) memory) on this platform."""
  impl = cfg.attention_impl
  if impl == "auto":
    return platform in ("tpu", "gpu")
  return impl in ("splash", "pallas_gpu") or (impl == "dot_product" and platform == "gpu")


def working_set(cfg: ModelConfig, axis_sizes: dict[str, int], b_local: int, seq: int, rules=None,
                platform: str = "tpu") -> dict[str, float]:
  """Per-device transient bytes at the backward's peak (see the module docstring), by part.

  Returns {'layer': one layer's backward, 'head': the head's backward, 'peak': the larger}.
  """
  rules = sharding.layout_rules(axis_sizes, platform) if rules is None else rules
  act, f32 = jnp.dtype(cfg.compute_dtype).itemsize, 4
  size = lambda name: math.prod(axis_sizes[a] for a in sharding.spec_axes(  # noqa: E731
      nn.logical_to_mesh_axes((name,), rules)[0]))
  tokens, d = b_local * seq, cfg.hidden_size
  heads = -(-cfg.num_attention_heads // size("heads"))
  qk, v = cfg.qk_head_dim, cfg.v_head_dim
  # attention: the core, the per-head projections (values and their gradients), the gathered weights
  if _attention_is_flash(cfg, platform):
    core = tokens * heads * (2 * qk + 2 * v) * act * 2 + b_local * heads * seq * f32 * 2
  else:  # scores and their gradient in fp32, probabilities in the compute dtype, the mask
    core = b_local * heads * seq * seq * (2 * f32 + act) + b_local * seq * seq
  proj = tokens * heads * (2 * qk + v) * act * 3
  attn_w = flops.attention_params(cfg) / size("heads") * (act + f32)
  attention = core + proj + attn_w
  # feed-forward of the biggest layer: dense MLP, or MoE (dispatch buffers, hidden rows, local experts)
  mlp = size("mlp")
  dense = tokens * cfg.intermediate_size / mlp * act * 6 + 3 * d * cfg.intermediate_size / mlp * (act + f32)
  moe = 0.0
  if cfg.num_moe_layers:
    exp_axes, mlp_axes = sharding.moe_axes(rules)
    ep = math.prod(axis_sizes[a] for a in exp_axes)
    f = cfg.moe_intermediate_size / math.prod(axis_sizes[a] for a in mlp_axes)
    rows = tokens * cfg.num_experts_per_tok * (cfg.capacity_factor or 1.0)
    buffers = rows * d * act * 8  # sent, received, expert output, returned; and their gradients
    hidden = rows * f * act * 6  # gate, up, activation; and their gradients
    experts = cfg.n_routed_experts / ep * 3 * d * f * (act + f32)  # gathered over fsdp, and gradients
    shared = tokens * cfg.n_shared_experts * cfg.moe_intermediate_size * act * 6
    moe = buffers + hidden + experts + shared
  layer = attention + max(dense if cfg.first_k_dense_replace else 0.0, moe)
  vocab = cfg.vocab_size / size("vocab")
  head = tokens * vocab * (2 * f32 + act) + d * vocab * (act + f32)
  return {"attention": attention, "ffn": layer - attention, "layer": layer, "head": head, "peak": max(layer, head)}


def plan(cfg: ModelConfig, axis_sizes: dict[str, int], batch: int, seq: int, device_memory_gb: float,
         rules=None, abstract=None, platform: str = "tpu") -> Plan:
  """Per-device bytes of cfg on a mesh with these axis sizes (validated first); rules default to
  the mesh's layout on this platform (sharding.layout_rules)."""
  rules = sharding.check_rules(sharding.layout_rules(axis_sizes, platform) if rules is None else rules)
  mesh = AbstractMesh(tuple(axis_sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))
  abstract = variables.abstract(cfg) if abstract is None else abstract
  sharding.validate(cfg, batch, mesh, rules, abstract)
  specs = sharding.mesh_specs(abstract, rules)
  shapes = nn.unbox(abstract)
  leaves = jax.tree_util.tree_leaves_with_path(shapes)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  params = expert = trained_elems = trained_bytes = 0.0
  total = 0
  for (path, leaf), spec in zip(leaves, spec_leaves):
    n = per_device_elements(leaf.shape, spec, axis_sizes)
    b = n * np.dtype(leaf.dtype).itemsize
    params += b
    total += int(np.prod(leaf.shape))
    if _is_expert(path):
      expert += b
    if getattr(path[0], "key", None) == "params":
      trained_elems += n
      trained_bytes += b
  dp = sharding.data_parallel_size(mesh, rules)
  b_local = -(-batch // dp)
  act_bytes = jnp.dtype(cfg.compute_dtype).itemsize
  layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  activations = b_local * seq * cfg.hidden_size * layers * act_bytes
  # The loss's fp32 logits (main head and each MTP head) stay alive for the backward.
  activations += (1 + cfg.num_nextn_predict_layers) * b_local * seq * cfg.vocab_size * 4 / math.prod(
      axis_sizes[a] for a in sharding.spec_axes(nn.logical_to_mesh_axes(("vocab",), rules)[0]))
  activations += ep_saved_rows(cfg, axis_sizes, b_local * seq, rules)
  kept = saved_gathered_weights(cfg, axis_sizes, rules, abstract)
  activations += kept if cfg.remat_policy == "gathered" else 0.0
  ws = working_set(cfg, axis_sizes, b_local, seq, rules, platform)
  kv = b_local * seq * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * act_bytes
  return Plan(mesh=dict(axis_sizes), batch=batch, seq=seq, total_params=total, params=params,
              expert_params=expert, grads=trained_bytes, optimizer=8.0 * trained_elems,
              activations=float(activations), working_set=float(ws["peak"]), kv_cache=float(kv),
              device_memory=device_memory_gb * GB, working_set_parts={k: float(v) for k, v in ws.items()},
              host_memory=kept if cfg.remat_policy == "gathered_offload" else 0.0)


def ep_saved_rows(cfg: ModelConfig, axis_sizes: dict[str, int], tokens: int, rules) -> float:
  """Bytes of the rows the 'ep' exchange received in its first round, which the backward reuses
  (layers/ep.py): [P*C, D] in the compute dtype plus int32 expert ids, per MoE layer that keeps
  them: every one under remat_policy 'ep_rows' or 'none', else only the MTP block (not rematerialized)."""
  exp_axes, _ = sharding.moe_axes(rules)
  ep = math.prod(axis_sizes[a] for a in exp_axes)
  if cfg.moe_impl != "ep" or ep == 1 or not cfg.num_moe_layers:
    return 0.0
  mtp = cfg.num_nextn_predict_layers if cfg.is_moe_layer(cfg.num_hidden_layers) else 0
  kept = mtp + (cfg.num_moe_layers if cfg.remat_policy in ("ep_rows", "none") else 0)
  rows = ep * ep_capacity(tokens, ep, cfg)
  return float(kept * rows * (cfg.hidden_size * jnp.dtype(cfg.compute_dtype).itemsize + 4))


def saved_gathered_weights(cfg: ModelConfig, axis_sizes: dict[str, int], rules, abstract) -> float:
  """Bytes of the gathered weights remat policies 'gathered' (in HBM) and 'gathered_offload' (in
  pinned host memory) keep for the backward (layers/common.gathered): every trunk block's
  non-expert matrices in the compute dtype, cut only over the mesh axes that do not hold the batch
  (tensor). 0 under any other policy."""
  if cfg.remat_policy not in GATHERING_POLICIES:
    return 0.0
  boxed = abstract["params"]
  logical = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  total = 0.0
  for (path, leaf), names in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)), logical):
    block, names = getattr(path[0], "key", ""), tuple(names)
    stacked = names[:1] == ("layers",)  # a scanned stack: judge one layer's weight
    one_layer = (leaf.shape[1:], names[1:]) if stacked else (leaf.shape, names)
    if not (block in ("dense_layers", "moe_layers") or block.startswith("layers_")) or not keeps_gathered(*one_layer):
      continue
    spec = sharding.gathered_spec(names, rules)
    total += per_device_elements(leaf.shape, spec, axis_sizes) * jnp.dtype(cfg.compute_dtype).itemsize
  return float(total)


def max_shards_per_token(cfg: ModelConfig, ep: int) -> int:
  """Expert shards one token can reach: expert e lives on shard e // (E / ep)."""
  if not cfg.num_moe_layers:
    return 0
  x = cfg.num_experts_per_tok
  if cfg.group_limited and cfg.n_group % ep == 0:
    return min(x, cfg.topk_group, ep)  # whole groups per shard: at most topk_group shards
  if cfg.group_limited and ep % cfg.n_group == 0:
    return min(x, cfg.topk_group * (ep // cfg.n_group), ep)
  return min(x, ep)


def format_plan(p: Plan, cfg: ModelConfig, name: str, rules=None, dcn: Optional[dict[str, int]] = None) -> str:
  """A readable table of a Plan (dcn: the across-slices/nodes part of each axis, if any)."""
  exp_axes, _ = sharding.moe_axes(rules)
  ep = math.prod(p.mesh[a] for a in exp_axes)
  devices = math.prod(p.mesh.values())
  mem = p.device_memory / GB
  fits = lambda v: "fits" if v <= p.device_memory else "DOES NOT FIT"  # noqa: E731
  rows = [
      ("params (" + cfg.param_dtype + ")", p.params),
      ("  of which routed experts", p.expert_params),
      ("grads (" + cfg.param_dtype + ")", p.grads),
      ("optimizer (AdamW mu+nu fp32)", p.optimizer),
      (f"activations (remat={cfg.remat_policy}, {cfg.dtype})", p.activations),
      ("working set (backward peak)", p.working_set),
      ("  one layer: attention", p.working_set_parts.get("attention", 0.0)),
      ("  one layer: ffn / moe", p.working_set_parts.get("ffn", 0.0)),
      ("  head (logits, weights)", p.working_set_parts.get("head", 0.0)),
      ("kv cache (latent, " + cfg.dtype + ")", p.kv_cache),
  ]
  groups = ""
  if cfg.num_moe_layers and cfg.group_limited and ep % cfg.n_group == 0:
    groups = (f" (node-limited: {cfg.n_group} groups of {ep // cfg.n_group} consecutive shards, "
              f"at most {cfg.topk_group} groups per token)")
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
  if dcn and math.prod(dcn.values()) > 1:
    mesh += "; across slices/nodes " + " ".join(f"{k}={v}" for k, v in dcn.items() if v > 1)
  out = [f"{name}: {p.total_params / 1e9:.1f}B parameters on {devices} devices ({mesh}), "
         f"batch {p.batch} x seq {p.seq}",
         f"experts: {cfg.n_routed_experts} over expert-parallel size {ep} = {cfg.n_routed_experts // ep} per "
         f"device; a token reaches at most {max_shards_per_token(cfg, ep)} expert shards" + groups,
         f"{'per device':<40}{'GB':>10}"]
  out += [f"{label:<40}{v / GB:>10.2f}" for label, v in rows]
  out += [f"{'train: params+grads+opt+act+working':<40}{p.train / GB:>10.2f}  of {mem:g} GB: {fits(p.train)}",
          f"{'serve: params+kv cache':<40}{p.serve / GB:>10.2f}  of {mem:g} GB: {fits(p.serve)}"]
  if p.host_memory:
    out.append(f"{'host memory (gathered weights, offloaded)':<40}{p.host_memory / GB:>10.2f}  pinned host "
               "memory per device, outside the HBM figures above")
  if cfg.remat_policy not in ("full", "ep_rows") + GATHERING_POLICIES:
    out.append("note: activations are planned for remat_policy=full, ep_rows, gathered or gathered_offload; "
               f"this config has {cfg.remat_policy!r}, "
               "which keeps more of each layer: size it with `python -m moe_jax.aot` (BENCHMARKS.md)")
  return "\n".join(out)


def _sizes(text: str, what: str) -> dict[str, int]:
  try:
    vals = [int(v) for v in text.split(",")]
  except ValueError:
    vals = []
  if len(vals) != len(sharding.MESH_AXES) or any(v == 0 or v < -1 for v in vals):
    raise UserError(f"--{what}={text!r}: give {len(sharding.MESH_AXES)} integers {','.join(sharding.MESH_AXES)} "
                    "(positive, or -1 to fill)")
  return dict(zip(sharding.MESH_AXES, vals))


def load_config(spec: str):
  """configs/x.py[:arg] -> the ConfigDict its get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"no such file {path!r} (the presets are configs/*.py)")
  module_spec = importlib.util.spec_from_file_location("plan_config", path)
  if module_spec is None:
    raise UserError(f"{path} is not a Python file (configs/x.py with get_config)")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # the user's config file: any error in it is theirs to fix
    raise UserError(f"{path} failed to load: {type(e).__name__}: {one_line(e)}") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"{path} defines no get_config()")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (ValueError, TypeError, KeyError) as e:  # e.g. an unknown variant
    raise UserError(f"get_config({arg!r}) failed: {one_line(e)}") from None


def model_config_from(config) -> ModelConfig:
  """ModelConfig from a config's `model` field: a ModelConfig, a dict of fields, or a dict with
  'preset' plus overrides."""
  model = config.get("model", config) if hasattr(config, "get") else config
  if isinstance(model, ModelConfig):
    return model
  d = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  preset = d.pop("preset", None)
  return PRESETS[preset](**d) if preset else ModelConfig.from_dict(d)


def _positive(name: str, value):
  if value is not None and not value > 0:
    raise UserError(f"--{name}={value}: must be positive")
  return value


def _rules(text: Optional[str]) -> list[tuple]:
  try:
    rules = json.loads(text or "[]")
  except json.JSONDecodeError as e:
    raise UserError(f"--rules={text!r}: not JSON ({e}); e.g. '[[\"kv_lora\", \"fsdp\"]]'") from None
  if not isinstance(rules, list) or not all(isinstance(r, list) and len(r) == 2 for r in rules):
    raise UserError(f"--rules={text!r}: give a JSON list of [logical_axis, mesh_axis or null] pairs")
  return [tuple(r) for r in rules]


@main_guard
def main(argv: Optional[list[str]] = None):
  ap = ArgumentParser(prog="python -m moe_jax.plan", description=__doc__.split("\n")[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="configs/x.py[:arg] (get_config -> ConfigDict with a model field)")
  src.add_argument("--preset", choices=sorted(PRESETS))
  ap.add_argument("--mesh", help="data,fsdp,expert,tensor sizes (within a slice/node; -1 fills)")
  ap.add_argument("--dcn", default="1,1,1,1", help="data,fsdp,expert,tensor multipliers across slices/nodes")
  ap.add_argument("--devices", type=int, help="device count, needed when --mesh has a -1")
  ap.add_argument("--device_memory_gb", type=float, default=95.0)
  ap.add_argument("--batch", type=int, help="global batch in sequences per step (default: the config's "
                  "batch_size / optim.grad_accum)")
  ap.add_argument("--seq", type=int, help="sequence length (also the kv cache length)")
  ap.add_argument("--rules", help='rules overrides as JSON, e.g. \'[["kv_lora", "fsdp"]]\' (after the config\'s)')
  ap.add_argument("--param_dtype", help="override the config's param_dtype")
  ap.add_argument("--dtype", help="override the config's compute dtype")
  ap.add_argument("--remat_policy", choices=REMAT_POLICIES, help="override the config's model.remat_policy")
  ap.add_argument("--platform", default="tpu", choices=("tpu", "gpu", "cpu"),
                  help="where it runs: picks the attention form the working set assumes (default tpu)")
  args = ap.parse_args(argv)
  for name in ("devices", "device_memory_gb", "batch", "seq"):
    _positive(name, getattr(args, name))

  try:
    config = load_config(args.config) if args.config else None
  except UserError as e:
    raise UserError(f"--config={args.config}: {e}") from None
  if config is not None and config.get("init_from"):  # the checkpoint's shape, as train.py builds it
    from moe_jax import init_from
    config, _ = init_from.resolve(config)
  try:
    cfg = model_config_from(config) if config is not None else PRESETS[args.preset]()
    over = {k: v for k, v in (("param_dtype", args.param_dtype), ("dtype", args.dtype),
                              ("remat_policy", args.remat_policy)) if v}
    cfg = cfg.replace(**over) if over else cfg
  except (TypeError, ValueError, KeyError) as e:  # a model field or dtype the config cannot take
    raise UserError(f"model config: {one_line(e)}") from None
  get = lambda key, default=None: config.get(key, default) if config is not None else default  # noqa: E731
  mesh_cfg = dict(get("mesh") or {})
  ici = _sizes(args.mesh, "mesh") if args.mesh else {a: mesh_cfg.get(a, 1) for a in sharding.MESH_AXES}
  dcn = (_sizes(args.dcn, "dcn") if args.mesh or not mesh_cfg
         else {a: mesh_cfg.get("dcn_" + a, 1) for a in sharding.MESH_AXES})
  if -1 in ici.values() and not args.devices:
    raise UserError("--mesh has a -1: also give --devices")
  devices = args.devices or math.prod(ici.values()) * math.prod(dcn.values())
  overrides = [tuple(r) for r in mesh_cfg.get("rules", ())] + _rules(args.rules)
  try:
    ici_t, dcn_t = sharding.hybrid_mesh_shape(tuple(ici.values()), tuple(dcn.values()), devices)
    axis_sizes = {a: i * d for a, i, d in zip(sharding.MESH_AXES, ici_t, dcn_t)}
    rules = sharding.rules_for(axis_sizes, args.platform, overrides)
    accum = (get("optim") or {}).get("grad_accum", 1)  # one step's activations are a micro-batch's
    batch = args.batch or (get("batch_size") or 0) // accum or sharding.data_parallel_size(
        AbstractMesh(tuple(axis_sizes.values()), sharding.MESH_AXES), rules)
    seq = args.seq or get("seq_len") or 4096
    p = plan(cfg, axis_sizes, batch, seq, args.device_memory_gb, rules, platform=args.platform)
  except ValueError as e:  # the mesh, the rules or the layout do not fit the model: say why
    raise UserError(f"plan: {one_line(e)}") from None
  print(format_plan(p, cfg, args.preset or args.config, rules, dict(zip(sharding.MESH_AXES, dcn_t))))
  print(json.dumps({"model": args.preset or args.config, "dcn": dict(zip(sharding.MESH_AXES, dcn_t)), **p.to_json()}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
