"""The dropless sort / grouped-FFN pieces every routed dispatch shares (moe.py, ep.py).

  sort_by_expert     assignments sorted by expert: order, inverse permutation, group sizes
  expert_ffn_ragged  grouped SwiGLU over rows sorted by expert (layers/gmm.py, FP8 via fp8.py)
  dispatch_ragged    moe_impl='ragged': sort, grouped matmul, unsort; on a mesh inside
                     jax.shard_map, each device on the experts it holds (_ragged_on_mesh)

moe.py (the MoE layer and its dispatch table) and ep.py (expert parallelism) both import
this module; it imports neither.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_jax.config import ModelConfig
from moe_jax.layers import fp8 as fp8_lib
from moe_jax.layers.gmm import grouped_swiglu


def _swiglu(h_gate, h_up):
  return nn.silu(h_gate) * h_up


def expert_ffn_ragged(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, dt, impl: str = "auto", fp8: str | None = None):
  """Grouped SwiGLU over rows sorted by expert: rows [sum(sizes[:e]), ...) go to expert e.

  impl: the grouped matmul (layers/gmm.py): 'ragged_dot' (XLA), 'tiled' (CPU), 'pallas' (TPU, Hopper),
  'auto' (by moe_jax.target).
  fp8: the three grouped matmuls in DeepSeek-V3 FP8 through this FP8 kernel ('xla' | 'pallas',
  layers/fp8.py); None: not in FP8. Weights may be Fp8Weight.
  """
  if fp8:
    mm = functools.partial(fp8_lib.ragged_dot, sizes_G=sizes_E, dtype=dt, impl=impl, kernel=fp8)
    return mm(_swiglu(mm(x_MD, gate_EDF), mm(x_MD, up_EDF)), down_EFD)
  return grouped_swiglu(x_MD.astype(dt), sizes_E, fp8_lib.dense(gate_EDF, dt), fp8_lib.dense(up_EDF, dt),
                        fp8_lib.dense(down_EFD, dt), impl)


def sort_by_expert(idx_TX: jax.Array, num_experts: int):
  """-> (order [T*X]: assignment ids sorted by expert, inverse permutation, group sizes [E])."""
  flat = idx_TX.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  return order, inverse, sizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _expand_sorted(x_TD, order_M, inverse_M, k: int, rows: int):
  """x_TD[order[:rows] // k]: each token's row once per choice, in expert order -> [rows, D].

  The gradient is a gather too (dx[t] = sum_x dy[inverse[t*X + x]], 0 for sorted positions
  past `rows`) instead of the scatter-add that autodiff of a gather makes, serial on CPU.
  """
  return x_TD[order_M[:rows] // k]


def _expand_sorted_fwd(x_TD, order_M, inverse_M, k, rows):
  return x_TD[order_M[:rows] // k], (order_M, inverse_M)


def _expand_sorted_bwd(k, rows, res, dy_RD):
  _, inverse_M = res
  return _unsort(dy_RD, inverse_M).reshape(-1, k, dy_RD.shape[-1]).sum(1), None, None


_expand_sorted.defvjp(_expand_sorted_fwd, _expand_sorted_bwd)


def _unsort(y_RD, inverse_M):
  """y[inverse]: assignment a reads sorted row inverse[a]; rows past R read zeros."""
  if y_RD.shape[0] < inverse_M.shape[0]:
    y_RD = jnp.concatenate([y_RD, jnp.zeros((1, y_RD.shape[-1]), y_RD.dtype)])
    inverse_M = jnp.minimum(inverse_M, y_RD.shape[0] - 1)
  return y_RD[inverse_M]


@jax.custom_vjp
def _unsort_rows(y_RD, inverse_M, order_M):
  """_unsort with the gather dy[order[:R]] as its gradient (order: the inverse permutation)."""
  return _unsort(y_RD, inverse_M)


_unsort_rows.defvjp(lambda y, q, p: (_unsort(y, q), p[:y.shape[0]]), lambda p, dy: (dy[p], None, None))


def _ragged_local(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig, first=0):
  """One device's routed output from the experts it holds, [first, first + E_local): fp32 [T, D].

  Assignments to other experts sort last and are cut off: the grouped matmul sees at most
  T * min(X, E_local) rows (a token meets each expert once), all of them when E_local >= X.
  """
  t, k = idx_TX.shape
  e_local = gate_EDF.shape[0]
  local = idx_TX - first
  order, inverse, sizes = sort_by_expert(jnp.where((local >= 0) & (local < e_local), local, e_local), e_local + 1)
  x_sorted = _expand_sorted(x_TD, order, inverse, k, t * min(k, e_local))  # [R, D]
  y_sorted = expert_ffn_ragged(x_sorted, sizes[:e_local], gate_EDF, up_EDF, down_EFD, cfg.compute_dtype,
                               cfg.moe_gmm, cfg.fp8_kernel if cfg.fp8 else None)
  y_TXD = _unsort_rows(y_sorted, inverse, order).reshape(t, k, -1)
  return jnp.einsum("txd,tx->td", y_TXD.astype(jnp.float32), w_TX)


def dispatch_ragged(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig):
  """Dropless grouped matmul; memory O(T*X*max(D, F)), never [T, E, ...].

  On a mesh (jax.set_mesh with logical-axis rules, as sharding.activation_rules sets, more
  than one device, not already inside jax.shard_map) it runs in jax.shard_map
  (_ragged_on_mesh) rather than leaving the grouped matmul to GSPMD, which gathered the
  expert stack along E and cannot partition a Pallas kernel at all.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if rules and not mesh.empty and mesh.size > 1 and not mesh.manual_axes:
    return _ragged_on_mesh(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg, mesh, rules), {}
  y = _ragged_local(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg)
  return y.astype(cfg.compute_dtype), {}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gather_weight(w, fsdp: tuple, axis: int, replicated: tuple, dt):
  """Inside shard_map: w in the compute dtype, all-gathered over its FSDP axes along `axis` and
  typed as varying over the batch axes it is replicated on. The gradient is reduce-scattered
  over fsdp, then summed over those axes, in w's own dtype (fp32 master weights reduce in fp32)."""
  return _gather_weight_fwd(w, fsdp, axis, replicated, dt)[0]


def _gather_weight_fwd(w, fsdp, axis, replicated, dt):
  y = w.astype(dt)
  if fsdp:
    y = jax.lax.all_gather(y, fsdp, axis=axis, tiled=True)
  if replicated:
    y = jax.lax.pcast(y, replicated, to="varying")
  return y, jnp.zeros((0,), w.dtype)  # the residual carries only w's dtype


def _gather_weight_bwd(fsdp, axis, replicated, dt, like, g):
  g = g.astype(like.dtype)
  if fsdp:
    g = jax.lax.psum_scatter(g, fsdp, scatter_dimension=axis, tiled=True)
  return (jax.lax.psum(g, replicated) if replicated else g,)


_gather_weight.defvjp(_gather_weight_fwd, _gather_weight_bwd)


def _ragged_on_mesh(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig, mesh, rules):
  """moe_impl='ragged' on a mesh: each device computes the experts it holds, dropless.

  Layout from the rules: tokens on the batch axes, experts E on the `exp` axes (P shards),
  F on `exp_mlp`, D on the expert weights' `embed` axes (FSDP). Per device:
    1. Tokens (with their routing) are all-gathered over the batch axes that also hold
       experts or F (the expert axis by default): the P devices of an expert group then see
       the same P*T tokens. Expert weights are all-gathered over their FSDP axes inside
       shard_map, so autodiff turns that into a reduce-scatter of their gradients.
    2. Each device runs the dropless ragged path on its E/P local experts only: its grouped
       matmul holds at most P*T * min(X, E/P) rows (the worst case: every assignment is
       local), computes only the rows actually routed to it (the Pallas kernels visit only
       the tiles in use), and never touches another shard's experts.
    3. The partial outputs [P*T, D] (compute dtype) are reduce-scattered back over the
       gathered axes and psummed over the expert / F axes that hold the same tokens.
  Traffic per device and direction: (P-1)*T rows of D, against X*T rows for the all-to-all
  of moe_impl='ep' (about equal at P = X = 8). Memory: the grouped-matmul buffers hold P*T*X
  rows where 'ep' holds ~1.25*T*X: one DeepSeek-V3 MoE layer, fwd+bwd, 4,096 tokens per chip on
  v5p fsdp 8 x expert 8 compiles to 18.3 GB of temporaries per chip (megablox), 'ep' to 9.7 GB,
  the GSPMD-partitioned form this replaces to 97.8 GB (did not fit). So at scale moe_impl='ep'
  is the layout to use; this one never drops a token and needs no capacity (BENCHMARKS.md,
  "Grouped matmul on the mesh"). Token counts that do not split over the batch shards are
  padded with zero-weight tokens.
  """
  from jax.sharding import PartitionSpec as P

  from moe_jax import sharding
  sizes = dict(mesh.shape)
  token_axes = sharding.batch_axes(rules)
  exp_axes, mlp_axes = sharding.moe_axes(rules)
  sharding.check_moe_layout(cfg, rules, sizes, expert_parallel=False)
  t, k = idx_TX.shape
  pad = -t % math.prod(sizes[a] for a in token_axes)
  if pad:  # e.g. decoding fewer rows than batch shards: zero-weight tokens on distinct experts fill them
    x_TD, w_TX = jnp.pad(x_TD, ((0, pad), (0, 0))), jnp.pad(w_TX, ((0, pad), (0, 0)))
    idx_TX = jnp.concatenate([idx_TX, jnp.broadcast_to(jnp.arange(k, dtype=idx_TX.dtype), (pad, k))])
  gather = tuple(a for a in token_axes if a in exp_axes + mlp_axes)
  reduce = tuple(a for a in exp_axes + mlp_axes if a not in gather)
  w_spec = nn.logical_to_mesh_axes(("exp", "embed", "exp_mlp"), rules)
  down_spec = nn.logical_to_mesh_axes(("exp", "exp_mlp", "embed"), rules)
  fsdp = sharding.spec_axes(w_spec[1])
  frozen = any(isinstance(w, fp8_lib.Fp8Weight) for w in (gate_EDF, up_EDF, down_EFD))
  if frozen:  # FP8 checkpoint blocks, no gradient: D whole (GSPMD gathers it before)
    fsdp, w_spec, down_spec = (), P(w_spec[0], None, w_spec[2]), P(down_spec[0], down_spec[1], None)
  replicated = tuple(a for a in token_axes if a not in exp_axes + mlp_axes + fsdp)
  e_local = cfg.n_routed_experts // math.prod(sizes[a] for a in exp_axes)

  def shard(x, w, idx, gate, up, down):
    if gather:
      x, w, idx = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, w, idx))
    if not frozen:
      dt = gate.dtype if cfg.fp8 else cfg.compute_dtype  # FP8 quantizes the master weights
      gate, up = (_gather_weight(a, fsdp, 1, replicated, dt) for a in (gate, up))
      down = _gather_weight(down, fsdp, 2, replicated, dt)
    first = jax.lax.axis_index(exp_axes) * e_local if exp_axes else 0
    out = _ragged_local(x, w, idx, gate, up, down, cfg, first).astype(cfg.compute_dtype)
    if gather:
      out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
    return jax.lax.psum(out, reduce) if reduce else out

  tok = P(token_axes or None, None)
  out = jax.shard_map(shard, mesh=mesh, in_specs=(tok, tok, tok, w_spec, w_spec, down_spec), out_specs=tok)(
      x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD)
  return out[:t] if pad else out
