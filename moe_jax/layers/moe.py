"""DeepSeekMoE layer: shared experts + fine-grained routed experts, several dispatches.

Routed expert weights are stacked: gate, up [E, D, F] and down [E, F, D] (logical axis
`exp` on E, so expert parallelism is a rules-table change). Every dispatch computes
  y_t = sum_{x < X} w_{t,x} * down(silu(gate(h)) * up(h)),  h = x_t, expert = idx_{t,x}
over the same weights; they differ only in how tokens meet their experts:
  dense     reference: every expert on every token, then masked ([T, E, F] materialized).
  ragged    dropless: sort the T*X assignments by expert, grouped matmul (layers/gmm.py:
            a tiled loop on CPU, Pallas kernels on TPU and Hopper, else ragged_dot), unsort;
            on a mesh inside jax.shard_map, each device on its own experts (_ragged_on_mesh);
            the sort / grouped-FFN pieces live in layers/ragged.py, which ep.py uses too.
  capacity  GShard: each expert takes at most C = ceil(T*X/E * capacity_factor) tokens
            (config.CAPACITY_FACTOR when capacity_factor is 0) into an [E, C, D] buffer,
            first choices before second; the rest are dropped (counted in
            intermediates/dropped_tokens, reported by train.py as dropped_fraction).
  ep        expert parallel: ragged inside jax.shard_map, tokens move by all-to-all in
            rounds of fixed size, dropless unless capacity_factor > 0 (moe_jax/layers/ep.py).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_jax.config import CAPACITY_FACTOR, ModelConfig
from moe_jax.layers.common import MLP, project, weight
from moe_jax.layers.ep import dispatch_ep
from moe_jax.layers.ragged import _swiglu, dispatch_ragged
from moe_jax.layers.router import Router


def dispatch_dense(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig):
  """Reference: all experts on all tokens, combined with a dense [T, E] weight matrix."""
  dt = cfg.compute_dtype
  x = x_TD.astype(dt)
  # FP8 weight blocks are per expert, so there experts are a batch dim (x broadcast), not part of N.
  xe, eq = (jnp.broadcast_to(x, (cfg.n_routed_experts, *x.shape)), "etd,edf->tef") if cfg.fp8 else (x, "td,edf->tef")
  h = _swiglu(project(eq, xe, gate_EDF, cfg), project(eq, xe, up_EDF, cfg))
  y_TED = project("tef,efd->ted", h, down_EFD, cfg)
  combine_TE = jnp.zeros((x.shape[0], cfg.n_routed_experts), jnp.float32).at[
      jnp.arange(x.shape[0])[:, None], idx_TX].add(w_TX)
  return jnp.einsum("ted,te->td", y_TED.astype(jnp.float32), combine_TE).astype(dt), {}


def capacity(num_tokens: int, cfg: ModelConfig) -> int:
  factor = cfg.capacity_factor if cfg.capacity_factor > 0 else CAPACITY_FACTOR
  return max(1, math.ceil(num_tokens * cfg.num_experts_per_tok / cfg.n_routed_experts * factor))


def dispatch_capacity(x_TD, w_TX, idx_TX, gate_EDF, up_EDF, down_EFD, cfg: ModelConfig):
  """GShard-style capacity-bounded dispatch into [E, C, D] and combine back."""
  t, k = idx_TX.shape
  e, dt = cfg.n_routed_experts, cfg.compute_dtype
  c = capacity(t, cfg)
  # Priority: every token's first choice, then every token's second, ... (GShard).
  flat = idx_TX.T.reshape(-1)  # [X*T], choice-major
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
  starts = jnp.cumsum(sizes) - sizes
  rank_sorted = jnp.arange(flat.shape[0]) - starts[flat[order]]
  rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)  # position in its expert's queue
  keep = rank < c
  slot = jnp.where(keep, flat * c + rank, e * c)  # e*c: the drop slot
  token = jnp.tile(jnp.arange(t), k)
  buf = jnp.zeros((e * c + 1, x_TD.shape[-1]), dt).at[slot].set(x_TD[token].astype(dt))
  x_ECD = buf[: e * c].reshape(e, c, -1)
  h = _swiglu(project("ecd,edf->ecf", x_ECD, gate_EDF, cfg), project("ecd,edf->ecf", x_ECD, up_EDF, cfg))
  y_ECD = project("ecf,efd->ecd", h, down_EFD, cfg)
  y_flat = jnp.concatenate([y_ECD.reshape(e * c, -1), jnp.zeros((1, y_ECD.shape[-1]), dt)])[slot]
  y_XTD = y_flat.reshape(k, t, -1)
  y = jnp.einsum("xtd,tx->td", y_XTD.astype(jnp.float32), w_TX)
  return y.astype(dt), {"dropped_tokens": jnp.sum(~keep).astype(jnp.float32)}


DISPATCH: dict[str, Callable] = {
    "dense": dispatch_dense,
    "ragged": dispatch_ragged,
    "capacity": dispatch_capacity,
    "ep": dispatch_ep,
}


def register_dispatch(name: str, fn: Callable):
  """Adds a dispatch implementation (same signature as dispatch_ragged)."""
  DISPATCH[name] = fn


class MoE(nn.Module):
  """x [B, S, D] -> [B, S, D]: routed experts (top-k of E) + shared experts."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    cfg = self.cfg
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    w_BSX, idx_BSX = Router(cfg, name="router")(x_BSD)
    gate = weight(self, cfg, "gate", (e, d, f), ("exp", "embed", "exp_mlp"))
    up = weight(self, cfg, "up", (e, d, f), ("exp", "embed", "exp_mlp"))
    down = weight(self, cfg, "down", (e, f, d), ("exp", "exp_mlp", "embed"))

    b, s, _ = x_BSD.shape
    if cfg.moe_impl not in DISPATCH:
      raise ValueError(f"ModelConfig.moe_impl: unknown dispatch {cfg.moe_impl!r}; known {sorted(DISPATCH)}")
    routed, stats = DISPATCH[cfg.moe_impl](
        x_BSD.reshape(b * s, d), w_BSX.reshape(b * s, -1), idx_BSX.reshape(b * s, -1), gate, up, down, cfg)
    for name, value in stats.items():
      self.sow("intermediates", name, value, init_fn=lambda: jnp.zeros((), jnp.float32),
               reduce_fn=lambda a, b: a + b)
    out = routed.reshape(b, s, d)
    if cfg.n_shared_experts:
      out = out + MLP(cfg, cfg.n_shared_experts * f, name="shared")(x_BSD)
    return out
