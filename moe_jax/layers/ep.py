"""Expert-parallel MoE dispatch ('ep'): tokens travel to their experts' shard by all-to-all.

Variant: capacity-bounded `jax.lax.all_to_all`. The dropless `jax.lax.ragged_all_to_all`
does not run on CPU in jax 0.10.2 (XLA:CPU: "HLO opcode `ragged-all-to-all` is not
supported"), and this path must run in CPU tests; drops are counted instead.

Runs inside `jax.shard_map` over the context mesh, with the axes the rules table gives
(sharding.activation_rules sets both): tokens on the batch axes (data x fsdp x expert),
routed experts on the `exp` axes (P shards of E/P experts), F on the `exp_mlp` axes.
Per device, with T local tokens and X choices each:
  1. Assignment (t, x) goes to shard idx // (E/P). Each (source, destination) pair has C
     slots; choice-major priority (every token's first choice before any second choice,
     as GShard); assignments past C are dropped (their output is 0) and counted.
  2. Send buffer [P*C, D] plus local expert ids [P*C]; all_to_all -> the rows every
     source sent to this shard.
  3. Sort the received rows by local expert, grouped SwiGLU on the local experts (rows of
     empty slots sort last and give 0), unsort.
  4. all_to_all back; each assignment reads its slot; weighted sum over the X choices.
     With F sharded (tensor parallel inside experts) the sum is partial: psum over exp_mlp.
  C = min(T * min(X, E/P), ceil(T * X / P * capacity_factor)). capacity_factor >= P
  reaches the worst case, so nothing can drop (at P times the balanced buffer size).
Stats: `dropped_tokens` = assignments dropped, summed over all shards (global).

Node-limited routing comes from the layout: expert e lives on shard e // (E/P), so when
n_group is a multiple of P each shard holds whole groups and a token reaches at most
topk_group shards. Weights enter shard_map with E on the expert axes and D whole: GSPMD
gathers the fsdp-sharded D (FSDP) before, and reduce-scatters their gradients after;
nothing gathers E.

Fallbacks: no mesh in the context (or a 1-device mesh, or no rules) -> plain
`dispatch_ragged`. Expert-parallel size 1 -> dropless ragged on each device's own
tokens inside shard_map (data parallel, no all-to-all, nothing dropped).
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.layers.moe import dispatch_ragged, expert_ffn_ragged, register_dispatch, sort_by_expert


def ep_capacity(tokens: int, ep: int, cfg: ModelConfig) -> int:
  """Slots C per (source, destination) shard pair for `tokens` local tokens."""
  x, local = cfg.num_experts_per_tok, cfg.n_routed_experts // ep
  worst = tokens * min(x, local)  # a token meets each local expert at most once
  return max(1, min(worst, math.ceil(tokens * x / ep * cfg.capacity_factor)))


def _local_experts(rows_MD, ids_M, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig):
  """Grouped SwiGLU of received rows on this shard's experts; id == E_local marks an empty slot."""
  e_local = gate_EDF.shape[0]
  order, inverse, sizes = sort_by_expert(ids_M[:, None], e_local + 1)  # empty slots sort last
  y = expert_ffn_ragged(rows_MD[order], sizes[:e_local], gate_EDF, up_EDF, down_EFD, cfg.compute_dtype,
                        cfg.moe_gmm, cfg.fp8)
  return y[inverse]


def _ep_shard(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, *, cfg, exp_axes, mlp_axes, token_axes, ep, cap):
  """One device's part of steps 1-4 (see the module docstring)."""
  t, k = idx_TX.shape
  d = x_TD.shape[-1]
  e_local = gate_EDF.shape[0]
  dt = cfg.compute_dtype
  flat = idx_TX.T.reshape(-1)  # [X*T] choice-major: a = x*T + t
  dest = flat // e_local
  order = jnp.argsort(dest, stable=True)
  counts = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(k * t, dtype=order.dtype) - starts[dest[order]])
  keep = rank < cap
  slot = jnp.where(keep, dest * cap + rank, ep * cap)  # ep*cap: the drop slot
  # Which assignment fills each slot, so rows move by gathers (the drop slot is cut off).
  filler = jnp.full((ep * cap + 1,), -1, jnp.int32).at[slot].set(jnp.arange(k * t, dtype=jnp.int32))[:-1]
  filled = filler >= 0
  send_x = jnp.where(filled[:, None], x_TD.astype(dt)[jnp.where(filled, filler % t, 0)], 0)
  send_id = jnp.where(filled, flat[jnp.maximum(filler, 0)] % e_local, e_local)

  recv_x = jax.lax.all_to_all(send_x, exp_axes, 0, 0, tiled=True)  # block i: what source i sent here
  recv_id = jax.lax.all_to_all(send_id, exp_axes, 0, 0, tiled=True)
  y = _local_experts(recv_x, recv_id, gate_EDF, up_EDF, down_EFD, cfg)
  back = jax.lax.all_to_all(y, exp_axes, 0, 0, tiled=True)  # block j: what shard j computed for us
  back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)])  # the drop slot reads zeros
  y_XTD = back[slot].reshape(k, t, d)
  out = jnp.einsum("xtd,tx->td", y_XTD.astype(jnp.float32), w_TX)
  if mlp_axes:
    out = jax.lax.psum(out, mlp_axes)
  dropped = jax.lax.psum(jnp.sum(~keep).astype(jnp.float32), token_axes)
  return out.astype(dt), dropped


def _dp_shard(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, *, cfg, mlp_axes):
  """Expert-parallel size 1: every device holds all experts; dropless ragged on its own tokens."""
  out, _ = dispatch_ragged(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg)
  if mlp_axes:
    out = jax.lax.psum(out.astype(jnp.float32), mlp_axes).astype(out.dtype)
  return out, jnp.zeros((), jnp.float32)


def dispatch_ep(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig):
  """x [T, D], weights/indices [T, X], gate/up [E, D, F], down [E, F, D] -> ([T, D], stats)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or mesh.size == 1 or not rules:
    if rules and mesh.empty:
      warnings.warn("moe_impl='ep' traced with sharding rules but no mesh in context (jax.set_mesh / "
                    "sharding.activation_rules): running the plain ragged dispatch")
    out, _ = dispatch_ragged(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg)
    return out, {"dropped_tokens": jnp.zeros((), jnp.float32)}
  sizes = dict(mesh.shape)
  missing = sorted(set(sharding.MESH_AXES) - set(sizes))
  if missing:
    raise ValueError(f"moe_impl='ep': the context mesh has axes {tuple(sizes)}, the rules need "
                     f"{sharding.MESH_AXES} (missing {missing}); build it with sharding.make_mesh")
  sharding.check_moe_layout(cfg, rules, sizes, expert_parallel=True)
  token_axes = sharding.batch_axes(rules)
  exp_axes, mlp_axes = sharding.moe_axes(rules)
  shards = math.prod(sizes[a] for a in token_axes)
  t = x_TD.shape[0]
  if t % shards:
    raise ValueError(f"moe_impl='ep': {t} tokens (batch x length) do not split over the {shards} batch shards "
                     f"(mesh axes {token_axes}); use a batch divisible by {shards} or moe_impl='ragged'")
  ep = math.prod(sizes[a] for a in exp_axes)
  if ep == 1:
    local = functools.partial(_dp_shard, cfg=cfg, mlp_axes=mlp_axes)
  else:
    local = functools.partial(_ep_shard, cfg=cfg, exp_axes=exp_axes, mlp_axes=mlp_axes, token_axes=token_axes,
                              ep=ep, cap=ep_capacity(t // shards, ep, cfg))
  tok = P(token_axes or None, None)
  exp, mlp = exp_axes or None, mlp_axes or None
  out, dropped = jax.shard_map(
      local, mesh=mesh, in_specs=(tok, tok, tok, P(exp, None, mlp), P(exp, None, mlp), P(exp, mlp, None)),
      out_specs=(tok, P()))(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD)
  return out, {"dropped_tokens": dropped}


register_dispatch("ep", dispatch_ep)
