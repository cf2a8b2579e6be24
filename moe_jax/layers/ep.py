"""Expert-parallel MoE dispatch ('ep'): tokens travel to their experts' shard by all-to-all.

Dropless by default, with per-device buffers of a fixed size whatever the routing: tokens
are exchanged in rounds of C slots per (source, destination) shard pair until every
assignment has been served. `capacity_factor > 0` (an explicit choice) instead makes one
round of C = ceil(T*X/P * capacity_factor) slots and drops the rest, counted.

Why rounds of `jax.lax.all_to_all` and not `jax.lax.ragged_all_to_all` (checked with jax
0.10.2): XLA:CPU rejects ragged-all-to-all ("HLO opcode `ragged-all-to-all` is not supported
by XLA:CPU ThunkEmitter"), so the CPU tests could not run it; it compiles for TPU (compile-only
v5 topology), but its output buffer is a static operand, so a dropless receive still has to be
sized for the worst case, every source sending T*min(X, E/P) rows to one shard: P*T*min(X, E/P)
rows, 32x the balanced T*X rows at DeepSeek-V3 widths (E/P = 4, X = 8), about 15 GB per chip at
4,096 tokens. It saves padding traffic, not memory. Rounds bound memory on every backend:
each round's send, receive and expert buffers hold P*C rows, C = ceil(T*X/P * ep_round_factor),
1.25x the balanced T*X rows by default whatever the routing (tests/test_ep_dropless.py reads
the all-to-all shapes from the compiled HLO; at V3 widths on v5p fsdp 8 x expert 64 each
exchange moves 587 MB per chip against 15.0 GB for one worst-case exchange, BENCHMARKS.md).
The round count is data-dependent (a while loop): 1 when the routing is balanced within
ep_round_factor, up to ceil(T*min(X, E/P) / C) when every token goes to one shard; the hot
shard then computes every row, as it must, and each round moves all P*C rows, empty slots
included (8 CPU devices, bench10m layer: 1 round balanced, 4 when every token sends 2 of its
4 choices to one shard; forward + backward 0.12 s balanced and 0.20 s skewed, against 0.20 and
0.22 s for the ragged layer on one device).

Runs inside `jax.shard_map` over the context mesh, with the axes the rules table gives
(sharding.activation_rules sets both): tokens on the batch axes (data x fsdp x expert),
routed experts on the `exp` axes (P shards of E/P experts), F on the `exp_mlp` axes.
Per device, with T local tokens, X choices each, A = X*T assignments a = x*T + t:
  1. Plan: assignment a goes to shard idx // (E/P); sorted by destination (choice-major, so
     every token's first choice comes before any second choice, as GShard) it gets a rank
     in its destination's queue. Rounds R = max over all shard pairs of ceil(count / C)
     (pmax: every device runs the same number of collectives).
  2. Round r serves ranks [r*C, (r+1)*C): send buffer [P*C, D] filled by gathers (empty
     slots 0) plus local expert ids [P*C]; all_to_all -> the rows every source sent here.
  3. Sort the received rows by local expert, grouped SwiGLU on the local experts (rows of
     empty slots sort last and give 0), unsort; all_to_all back; each assignment served
     this round reads its slot, times its routing weight, into the output [T, D] (fp32).
  4. After the rounds, with F sharded (tensor parallel inside experts) the sum is partial:
     psum over exp_mlp.
Backward (custom VJP): the plan is recomputed and the rounds replayed; each round sends the
token rows, the output cotangent rows and the routing weights, recomputes the expert FFN on
the receiving shard (jax.vjp: no round's activations are stored across rounds), and sends
back the row cotangents and the routing-weight cotangents <dy, y>: 3 row all-to-alls per
round, except round 0, which reuses the rows the forward received (a residual named
EP_RECEIVED, [P*C, D] per MoE layer): 2. Under remat, policy 'ep_rows' keeps that residual
and the step sends 4 row all-to-alls per round, the minimum (forward out and back, their
transposes); 'full' recomputes it, repeating round 0's send (5, as every round did before).
Expert-weight gradients sum over rounds locally and are psummed once over the batch axes
that do not hold experts (data, fsdp).
Stats: `dropped_tokens` (assignments dropped, global; 0 unless capacity_factor > 0) and
`ep_rounds` (exchange rounds this layer ran).

Node-limited routing comes from the layout: expert e lives on shard e // (E/P), so when
n_group is a multiple of P each shard holds whole groups and a token reaches at most
topk_group shards. Rows travel per assignment: a token with two experts on one shard is sent
twice (DeepSeek sends it once per node; not done here). Weights enter shard_map with E on
the expert axes and D whole: GSPMD gathers the fsdp-sharded D (FSDP) before, and
reduce-scatters their gradients after; nothing gathers E.

Token counts that do not split over the batch shards (decoding a few rows) are padded with
zero-weight tokens. Fallbacks: no mesh in the context (or a 1-device mesh, or no rules) -> plain
`dispatch_ragged`. Expert-parallel size 1 -> dropless ragged on each device's own
tokens inside shard_map (data parallel, no all-to-all, nothing dropped).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.layers import fp8 as fp8_lib
from moe_jax.layers.ragged import dispatch_ragged, expert_ffn_ragged, sort_by_expert


# The name remat policy 'ep_rows' saves (model.REMAT_POLICIES): round 0's received rows and ids.
EP_RECEIVED = "ep_received"


def ep_capacity(tokens: int, ep: int, cfg: ModelConfig) -> int:
  """Slots C per (source, destination) shard pair and round, for `tokens` local tokens.

  capacity_factor > 0: the one round's capacity (the rest drops); else ep_round_factor.
  """
  x, local = cfg.num_experts_per_tok, cfg.n_routed_experts // ep
  worst = tokens * min(x, local)  # a token meets each local expert at most once
  factor = cfg.capacity_factor if cfg.capacity_factor > 0 else cfg.ep_round_factor
  return max(1, min(worst, math.ceil(tokens * x / ep * factor)))


class _Static(NamedTuple):
  """What both shard_map'd halves need to know (hashable: a nondiff argument of the custom VJP)."""
  cfg: ModelConfig
  mesh: jax.sharding.AbstractMesh
  token_axes: tuple[str, ...]
  exp_axes: tuple[str, ...]
  mlp_axes: tuple[str, ...]
  ep: int  # P: expert-parallel size
  cap: int  # C
  dropless: bool


class _Plan(NamedTuple):
  flat: jax.Array  # [A] expert of assignment a = x*T + t (choice-major)
  dest: jax.Array  # [A] destination shard
  order: jax.Array  # [A] assignments sorted by destination (stable: choice-major within one)
  rank: jax.Array  # [A] position in its destination's queue
  counts: jax.Array  # [P] assignments per destination
  starts: jax.Array  # [P] first sorted position of each destination
  rounds: jax.Array  # int32 scalar, the same on every device


def _plan(idx_TX, s: _Static) -> _Plan:
  e_local = s.cfg.n_routed_experts // s.ep
  flat = idx_TX.T.reshape(-1)
  dest = flat // e_local
  order = jnp.argsort(dest, stable=True)
  counts = jnp.zeros((s.ep,), jnp.int32).at[dest].add(1)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.argsort(order).astype(jnp.int32) - starts[dest]  # argsort of a permutation: its inverse
  if s.dropless:
    rounds = jax.lax.pmax((jnp.max(counts) + s.cap - 1) // s.cap, tuple(s.mesh.axis_names))
  else:
    rounds = jnp.ones((), jnp.int32)
  return _Plan(flat, dest, order, rank, counts, starts, rounds.astype(jnp.int32))


def _round_slots(plan: _Plan, r, s: _Static):
  """Round r -> (filler [P*C]: the assignment in each send slot, -1 if empty;
  slot [A]: each assignment's slot, P*C (a zero row) if it is not served this round)."""
  pos = r * s.cap + jnp.arange(s.cap, dtype=jnp.int32)  # ranks served this round
  filled = pos[None, :] < plan.counts[:, None]  # [P, C]
  filler = plan.order[jnp.minimum(plan.starts[:, None] + pos[None, :], plan.order.shape[0] - 1)]
  filler = jnp.where(filled, filler, -1).reshape(-1)
  served = (plan.rank >= r * s.cap) & (plan.rank < (r + 1) * s.cap)
  slot = jnp.where(served, plan.dest * s.cap + plan.rank - r * s.cap, s.ep * s.cap)
  return filler, slot


def _gather_rows(rows_TD, filler):
  """rows[token of each filler] ([P*C, D]), zero rows for empty slots."""
  t = rows_TD.shape[0]
  return jnp.where((filler >= 0)[:, None], rows_TD[jnp.maximum(filler, 0) % t], 0).astype(rows_TD.dtype)


def _read_slots(back_M, slot):
  """back[slot] with the slot P*C reading zeros ([P*C, ...] -> [A, ...])."""
  return jnp.take(back_M, slot, axis=0, mode="fill", fill_value=0)


def _combine(back_MD, slot_A, t: int, w_A=None):
  """sum over choices x of back[slot[x*T + t]] (times w[x*T + t]), fp32 [T, D] (A = X*T, choice-major).

  One choice at a time, so no [A, D] array exists: read whole and upcast, it is what XLA kept in
  fp32 (0.94 GB per MoE layer at V3 widths) in the multi-slice compile, where one slice fused it.
  """
  out = jnp.zeros((t, back_MD.shape[-1]), jnp.float32)
  for x in range(slot_A.shape[0] // t):
    rows = _read_slots(back_MD, slot_A[x * t:(x + 1) * t]).astype(jnp.float32)
    out = out + (rows if w_A is None else rows * w_A[x * t:(x + 1) * t, None])
  return out


def _a2a(x, s: _Static):
  return jax.lax.all_to_all(x, s.exp_axes, 0, 0, tiled=True)  # block i: what shard i sent here


def _local_experts(rows_MD, ids_M, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig):
  """Grouped SwiGLU of received rows on this shard's experts; id == E_local marks an empty slot."""
  e_local = gate_EDF.shape[0]
  order, inverse, sizes = sort_by_expert(ids_M[:, None], e_local + 1)  # empty slots sort last
  y = expert_ffn_ragged(rows_MD[order], sizes[:e_local], gate_EDF, up_EDF, down_EFD, cfg.compute_dtype,
                        cfg.moe_gmm, cfg.fp8_kernel if cfg.fp8 else None)
  return y[inverse]


def _send(x_TD, plan: _Plan, filler, s: _Static):
  """The round's rows (compute dtype) and their local expert ids, after the all-to-all."""
  e_local = s.cfg.n_routed_experts // s.ep
  rows = _gather_rows(x_TD.astype(s.cfg.compute_dtype), filler)
  ids = jnp.where(filler >= 0, plan.flat[jnp.maximum(filler, 0)] % e_local, e_local)
  return _a2a(rows, s), _a2a(ids, s)


def _forward_shard(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, *, s: _Static):
  """One device's steps 1-4 -> (out [T, D], dropped (global), rounds, round 0's received rows
  [P*C, D] and their local expert ids [P*C]: the backward's first round reuses them)."""
  t = idx_TX.shape[0]
  plan = _plan(idx_TX, s)
  w_A = w_TX.T.reshape(-1)

  def round_(r, out_TD, received):
    recv_x, recv_id = received
    back = _a2a(_local_experts(recv_x, recv_id, gate_EDF, up_EDF, down_EFD, s.cfg), s)
    return out_TD + _combine(back, _round_slots(plan, r, s)[1], t, w_A)

  def send(r):
    return _send(x_TD, plan, _round_slots(plan, r, s)[0], s)

  first = send(0)  # written out before the loop: the backward reuses what it received
  out = round_(0, jnp.zeros((t, x_TD.shape[-1]), jnp.float32), first)
  out = jax.lax.fori_loop(1, plan.rounds, lambda r, o: round_(r, o, send(r)), out)
  if s.mlp_axes:
    out = jax.lax.psum(out, s.mlp_axes)
  dropped = jnp.sum(jnp.maximum(plan.counts - s.cap, 0)).astype(jnp.float32) if not s.dropless else 0.0
  dropped = jax.lax.psum(jnp.asarray(dropped, jnp.float32), s.token_axes)
  return out.astype(s.cfg.compute_dtype), dropped, plan.rounds.astype(jnp.float32), *first


def _backward_shard(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, recv_x0, recv_id0, g_TD, *, s: _Static):
  """Replays the rounds: -> (dx [T, D], dw [T, X], dgate, dup, ddown) (see the module docstring).
  Round 0 reads the rows the forward received (recv_x0, recv_id0) instead of sending them again."""
  t, k = idx_TX.shape
  plan = _plan(idx_TX, s)
  w_A = w_TX.T.reshape(-1)
  trained = not any(isinstance(w, fp8_lib.Fp8Weight) for w in (gate_EDF, up_EDF, down_EFD))
  weights = (gate_EDF, up_EDF, down_EFD)

  def round_(r, carry, received=None):
    dx_TD, dw_A, dweights = carry
    filler, slot = _round_slots(plan, r, s)
    recv_x, recv_id = _send(x_TD, plan, filler, s) if received is None else received
    recv_g = _a2a(_gather_rows(g_TD, filler), s)
    recv_w = _a2a(jnp.where(filler >= 0, w_A[jnp.maximum(filler, 0)], 0.0), s)
    ffn = lambda rows, *ws: _local_experts(rows, recv_id, *ws, s.cfg)  # noqa: E731
    if trained:
      y, vjp = jax.vjp(ffn, recv_x, *weights)
    else:  # FP8 checkpoint weights (Fp8Weight) are frozen: no weight cotangents
      y, vjp = jax.vjp(lambda rows: ffn(rows, *weights), recv_x)
    # d out / d w = <dy, this expert's output>, accumulated in fp32 without an fp32 copy of either
    dw_rows = jnp.einsum("md,md->m", recv_g, y, preferred_element_type=jnp.float32)
    grads = vjp((recv_w[:, None] * recv_g.astype(jnp.float32)).astype(y.dtype))
    d_rows = _a2a(grads[0], s)
    dw_back = _a2a(dw_rows, s)
    dx_TD = dx_TD + _combine(d_rows, slot, t)
    dw_A = dw_A + _read_slots(dw_back, slot)
    if trained:
      dweights = tuple(a + b.astype(jnp.float32) for a, b in zip(dweights, grads[1:]))
    return dx_TD, dw_A, dweights

  zeros_w = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights) if trained else ()
  init = (jnp.zeros(x_TD.shape, jnp.float32), jnp.zeros(w_A.shape, jnp.float32), zeros_w)
  carry = round_(0, init, (recv_x0, recv_id0))
  dx, dw, dweights = jax.lax.fori_loop(1, plan.rounds, round_, carry)
  if s.mlp_axes:  # x and w meet every F shard: their cotangents are partial sums
    dx, dw = jax.lax.psum((dx, dw), s.mlp_axes)
  replicas = tuple(a for a in s.token_axes if a not in s.exp_axes)  # batch axes that copy the experts
  if trained:
    if replicas:
      dweights = jax.lax.psum(dweights, replicas)
    dweights = tuple(d.astype(w.dtype) for d, w in zip(dweights, weights))
  else:
    dweights = (None, None, None)
  return (dx.astype(x_TD.dtype), dw.reshape(k, t).T.astype(w_TX.dtype), *dweights)


def _specs(s: _Static):
  tok = P(s.token_axes or None, None)
  exp, mlp = s.exp_axes or None, s.mlp_axes or None
  return tok, (P(exp, None, mlp), P(exp, None, mlp), P(exp, mlp, None))


def _forward(s: _Static, x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD):
  """Global arrays in -> (out [T, D], dropped, rounds, received rows, their expert ids)."""
  tok, wspecs = _specs(s)
  # check_vma=False: every collective is written out here (the backward too), none is implied.
  # The received rows are the same on every F shard (x is): they leave on the token axes only.
  return jax.shard_map(functools.partial(_forward_shard, s=s), mesh=s.mesh,
                       in_specs=(tok, tok, tok, *wspecs), out_specs=(tok, P(), P(), tok, P(s.token_axes or None)),
                       check_vma=False)(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _exchange(s: _Static, x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD):
  """Global arrays in, (out [T, D], dropped, rounds) out; gradients by replaying the rounds."""
  return _forward(s, x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD)[:3]


def _exchange_fwd(s, x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD):
  *out, recv_x, recv_id = _forward(s, x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD)
  # Named for remat: policy 'ep_rows' saves them, so the recompute does not repeat round 0's exchange.
  recv_x, recv_id = checkpoint_name(recv_x, EP_RECEIVED), checkpoint_name(recv_id, EP_RECEIVED)
  return tuple(out), (x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, recv_x, recv_id)


def _exchange_bwd(s, res, cotangents):
  g_TD = cotangents[0]  # dropped and rounds are statistics: no gradient
  tok, wspecs = _specs(s)
  trained = not any(isinstance(w, fp8_lib.Fp8Weight) for w in res[3:6])
  dws = wspecs if trained else (P(), P(), P())
  dx, dw, dgate, dup, ddown = jax.shard_map(
      functools.partial(_backward_shard, s=s), mesh=s.mesh,
      in_specs=(tok, tok, tok, *wspecs, tok, P(s.token_axes or None), tok),
      out_specs=(tok, tok, *dws), check_vma=False)(*res, g_TD)
  return dx, dw, None, dgate, dup, ddown


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _dp_shard(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, *, cfg, mlp_axes):
  """Expert-parallel size 1: every device holds all experts; dropless ragged on its own tokens."""
  out, _ = dispatch_ragged(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg)
  if mlp_axes:
    out = jax.lax.psum(out.astype(jnp.float32), mlp_axes).astype(out.dtype)
  return out, jnp.zeros((), jnp.float32)


def _no_stats():
  return {"dropped_tokens": jnp.zeros((), jnp.float32), "ep_rounds": jnp.zeros((), jnp.float32)}


def dispatch_ep(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig):
  """x [T, D], weights/indices [T, X], gate/up [E, D, F], down [E, F, D] -> ([T, D], stats)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or mesh.size == 1 or not rules:
    if rules and mesh.empty:
      warnings.warn("moe_impl='ep' traced with sharding rules but no mesh in context (jax.set_mesh / "
                    "sharding.activation_rules): running the plain ragged dispatch")
    out, _ = dispatch_ragged(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg)
    return out, _no_stats()
  sizes = dict(mesh.shape)
  missing = sorted(set(sharding.MESH_AXES) - set(sizes))
  if missing:
    raise ValueError(f"moe_impl='ep': the context mesh has axes {tuple(sizes)}, the rules need "
                     f"{sharding.MESH_AXES} (missing {missing}); build it with sharding.make_mesh")
  sharding.check_moe_layout(cfg, rules, sizes, expert_parallel=True)
  token_axes = sharding.batch_axes(rules)
  exp_axes, mlp_axes = sharding.moe_axes(rules)
  shards = math.prod(sizes[a] for a in token_axes)
  t, k = idx_TX.shape
  pad = -t % shards
  if pad:  # e.g. decoding fewer rows than batch shards: zero-weight tokens on distinct experts fill them
    x_TD, w_TX = jnp.pad(x_TD, ((0, pad), (0, 0))), jnp.pad(w_TX, ((0, pad), (0, 0)))
    idx_TX = jnp.concatenate([idx_TX, jnp.broadcast_to(jnp.arange(k, dtype=idx_TX.dtype), (pad, k))])
  ep = math.prod(sizes[a] for a in exp_axes)
  if ep == 1:
    tok = P(token_axes or None, None)
    exp, mlp = exp_axes or None, mlp_axes or None
    out, _ = jax.shard_map(
        functools.partial(_dp_shard, cfg=cfg, mlp_axes=mlp_axes), mesh=mesh,
        in_specs=(tok, tok, tok, P(exp, None, mlp), P(exp, None, mlp), P(exp, mlp, None)),
        out_specs=(tok, P()))(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD)
    return out[:t], _no_stats()
  s = _Static(cfg, mesh, token_axes, exp_axes, mlp_axes, ep, ep_capacity((t + pad) // shards, ep, cfg),
              dropless=cfg.capacity_factor <= 0)
  out, dropped, rounds = _exchange(s, x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD)
  return out[:t], {"dropped_tokens": dropped, "ep_rounds": rounds}
