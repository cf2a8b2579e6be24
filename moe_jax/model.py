"""Transformer: embed -> blocks (dense | MoE) -> final norm -> head (+ multi-token prediction).

A token's way (shape letters in moe_jax/layers/common.py):
  tokens [B, S] -> embed [B, S, D]
  per block:  x = x + MLA(RMSNorm(x));  x = x + (MLP | MoE)(RMSNorm(x))
  -> RMSNorm -> head -> logits [B, S, vocab]
  MTP depth k (DeepSeek-V3 section 2.2): h = eh_proj([enorm(embed(token_{i+k})); hnorm(h_{k-1})])
  -> one block -> shared_head_norm -> the same head -> logits predicting token i+k+1.

Variables: `params` (trained), `router` (e_score_correction_bias per MoE layer),
`cache` (decode), and sown `intermediates` (expert_counts, expert_scores, dropped_tokens)
and `losses` (balance_loss).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.layers.common import GATHERED, MLP, RMSNorm, project, weight
from moe_jax.layers.ep import EP_RECEIVED
from moe_jax.layers.gqa import GQA
from moe_jax.layers.mla import MLA
from moe_jax.layers.moe import MoE

BLOCK_BOUNDARY = ("batch", "length", "embed")
SCANNED_COLLECTIONS = ("params", "router", "cache", "intermediates", "losses", "fp8_scales")

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block
    # save only round 0's rows the expert-parallel all-to-all received (layers/ep.py; one [P*C, D]
    # buffer per MoE layer): the backward does not repeat the forward's exchange
    "ep_rows": jax.checkpoint_policies.save_only_these_names(EP_RECEIVED),
    # save only each block's gathered weights (layers/common.gathered, in the compute dtype): the
    # backward does not gather them again. Non-expert weights of every layer, for the whole step.
    "gathered": jax.checkpoint_policies.save_only_these_names(GATHERED),
    # the same weights, kept in host memory (pinned_host) instead of HBM: the forward copies each
    # layer's out, the backward copies it back in, over the host link rather than the interconnect
    "gathered_offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(GATHERED,),
        offload_src="device", offload_dst="pinned_host"),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm decoder block: MLA then a dense SwiGLU MLP or a DeepSeekMoE layer."""

  cfg: ModelConfig
  moe: bool

  @nn.compact
  def __call__(self, x_BSD, positions_BS, segment_ids_BS=None, decode: bool = False, absorb: bool = True,
               append: bool = False):
    cfg = self.cfg
    attn = GQA if cfg.attention_type == "gqa" else MLA  # plain attention for ablations (layers/gqa.py)
    h = x_BSD + attn(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x_BSD), positions_BS, segment_ids_BS,
                                      decode, absorb, append)
    ffn = MoE(cfg, name="moe") if self.moe else MLP(cfg, cfg.intermediate_size, name="mlp")
    out = h + ffn(RMSNorm(cfg, name="ffn_norm")(h))
    return nn.with_logical_constraint(out, BLOCK_BOUNDARY)


class ScanBlock(Block):
  """Block with the (carry, x) -> (carry, y) signature that nn.scan wants."""

  @nn.compact
  def __call__(self, x_BSD, positions_BS, segment_ids_BS=None, decode: bool = False, absorb: bool = True,
               append: bool = False):
    return super().__call__(x_BSD, positions_BS, segment_ids_BS, decode, absorb, append), None


def _block_class(cfg: ModelConfig, scanned: bool):
  cls = ScanBlock if scanned else Block
  if cfg.remat_policy == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not scanned,
                  static_argnums=(4, 5, 6))  # decode, absorb, append (self is argnum 0)


class MTPLayer(nn.Module):
  """One multi-token-prediction depth: combine the next token's embedding with h, one block."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, emb_BSD, h_BSD, positions_BS, segment_ids_BS=None, decode: bool = False,
               append: bool = False):
    cfg = self.cfg
    eh = weight(self, cfg, "eh_proj", (2 * cfg.hidden_size, cfg.hidden_size), (None, "embed"))
    joined = jnp.concatenate([RMSNorm(cfg, name="enorm")(emb_BSD), RMSNorm(cfg, name="hnorm")(h_BSD)], -1)
    h = project("bse,ed->bsd", joined, eh, cfg)
    h = Block(cfg, moe=cfg.is_moe_layer(cfg.num_hidden_layers), name="block")(h, positions_BS, segment_ids_BS,
                                                                             decode, True, append)
    return h, RMSNorm(cfg, name="head_norm")(h)


# libtpu 0.0.42 (V3 proxy, v5p-1024) kept the head gradient's 1.85 GB reduce-scatter over 64 chips as
# an all-reduce plus a slice, and kept it true in pieces of <= ~0.5 GB (as it does the layers' ones).
SCATTER_PIECE_BYTES = 512 * 2 ** 20


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_rows(w_dV: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """all_gather of w's rows over `axes` (inside shard_map); its transpose, a reduce-scatter, runs in
  column pieces of at most SCATTER_PIECE_BYTES (whole 128-column tiles)."""
  return jax.lax.all_gather(w_dV, axes, axis=0, tiled=True)


def _gather_rows_fwd(w_dV, axes):
  return _gather_rows(w_dV, axes), None


def _gather_rows_bwd(axes, _, g_DV):
  d, v = g_DV.shape
  tiles = -(-v // 128)
  n = min(tiles, max(1, -(-d * v * g_DV.dtype.itemsize // SCATTER_PIECE_BYTES)))
  cuts = [128 * (tiles * i // n) for i in range(1, n)]
  pieces = [jax.lax.psum_scatter(p, axes, scatter_dimension=0, tiled=True) for p in jnp.split(g_DV, cuts, axis=1)]
  return (pieces[0] if n == 1 else jnp.concatenate(pieces, axis=1),)


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def head_matmul(x_KBSD: jax.Array, w_DV, cfg: ModelConfig) -> jax.Array:
  """x [K, B, S, D] @ head [D, V] -> [K, B, S, V] in the compute dtype (K: main + MTP depths).

  On a mesh whose rules cut the head's D over batch axes, the product runs in shard_map: each
  chip gathers the head's D explicitly (compute dtype) and multiplies its own tokens, so the
  weight gradient is the transpose of that gather, a reduce-scatter over the D-cutting axes, then
  an all-reduce of the 1/n shard over the other batch axes. Left to GSPMD, the [D, V] gradient was
  all-reduced whole over the D-cutting group and then sliced (libtpu 0.0.42, V3 proxy: 1.85 GB
  more on the wire per chip and step; BENCHMARKS.md "Pod communication").
  """
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or not rules or not isinstance(w_DV, jax.Array):
    return project("kbsd,dv->kbsv", x_KBSD, w_DV, cfg, fp8=False)  # head stays bf16/fp32
  cut = lambda axes: tuple(a for a in axes if mesh.shape[a] > 1)  # noqa: E731
  batch = cut(sharding.batch_axes(rules))
  d_axes, v_axes = (cut(sharding.spec_axes(a)) for a in nn.logical_to_mesh_axes(("embed", "vocab"), rules))
  others = tuple(a for a in batch if a not in d_axes)
  if (not d_axes or not set(d_axes) <= set(batch) or set(v_axes) & set(batch)
      or x_KBSD.shape[1] % math.prod(mesh.shape[a] for a in batch)):  # GSPMD: a replicated head's
    return project("kbsd,dv->kbsv", x_KBSD, w_DV, cfg, fp8=False)   # gradient is one all-reduce
  dtype = cfg.compute_dtype

  def local(x_KbSD, w_dV):
    w = w_dV.astype(dtype)
    if others:  # marked varying on the shard, so the backward all-reduces the shard, not [D, V]
      w = jax.lax.pcast(w, others, to="varying")
    return project("kbsd,dv->kbsv", x_KbSD, _gather_rows(w, d_axes), cfg, fp8=False)

  v = v_axes or None
  return jax.shard_map(local, mesh=mesh, in_specs=(P(None, batch or None, None, None), P(d_axes, v)),
                       out_specs=P(None, batch or None, None, v))(x_KBSD, w_DV)


class Transformer(nn.Module):
  """DeepSeek-V2/V3 causal LM. `apply(variables, tokens [B, S] int32) -> logits [B, S, vocab] fp32`."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = weight(self, cfg, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                        init=nn.initializers.normal(stddev=1.0))
    if cfg.scan_layers:
      def stack(moe, n, name):
        return nn.scan(_block_class(cfg, True), variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                       split_rngs={"params": True}, in_axes=(nn.broadcast,) * 5, length=n,
                       metadata_params={nn.PARTITION_NAME: "layers"})(cfg, moe, name=name)
      k = cfg.first_k_dense_replace
      self.dense_layers = stack(False, k, "dense_layers") if k else None
      n_moe = cfg.num_hidden_layers - k
      self.moe_layers = stack(True, n_moe, "moe_layers") if n_moe else None
    else:
      block = _block_class(cfg, False)
      self.layers = [block(cfg, cfg.is_moe_layer(i), name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_word_embeddings:
      self.head = weight(self, cfg, "head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
    self.mtp = [MTPLayer(cfg, name=f"mtp_{k}") for k in range(cfg.num_nextn_predict_layers)]

  def embed_tokens(self, tokens_BS):
    """tokens [B, S] -> [B, S, D]. On a mesh, each shard of the table (D split over the `embed`
    axes) looks up the tokens of all the chips that split it (their ids gathered: 4 bytes a token),
    and one all-to-all of the compute-dtype rows hands every chip its own tokens' full rows.
    Backward: the all-to-all back, then a scatter-add into the local shard, so the table's
    gradient is never reduced over the axes that shard it. (A lookup in the tokens' layout made
    whole fp32 copies of the [V, D] gradient, 3.7 GB each at V3 sizes, wherever the table is
    copied: across slices, or over `fsdp` under ZeRO over `expert`; BENCHMARKS.md.)"""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
      x = jnp.take(self.embed, tokens_BS, axis=0).astype(self.cfg.compute_dtype)
      return nn.with_logical_constraint(x, BLOCK_BOUNDARY)
    token_axes, table_axes = sharding.lookup_axes(rules)
    ids_BS = jax.lax.with_sharding_constraint(tokens_BS, P(token_axes or None, None))
    x = jnp.take(self.embed, ids_BS, axis=0).astype(self.cfg.compute_dtype)
    x = jax.lax.with_sharding_constraint(x, P(token_axes or None, None, table_axes or None))
    return nn.with_logical_constraint(x, BLOCK_BOUNDARY)

  def logits(self, h_normed_BSD):
    w = self.embed.T if self.cfg.tie_word_embeddings else self.head
    return project("bsd,dv->bsv", h_normed_BSD, w, self.cfg, fp8=False).astype(jnp.float32)  # head stays bf16/fp32

  def trunk(self, tokens_BS: jax.Array, positions_BS: jax.Array, segment_ids_BS: Optional[jax.Array] = None,
            decode: bool = False, absorb: bool = True, append: bool = False) -> jax.Array:
    """tokens [B, S] -> final-normed hidden states [B, S, D] (what the head and MTP depth 1 read)."""
    x = self.embed_tokens(tokens_BS)
    if self.cfg.scan_layers:
      for stack in (self.dense_layers, self.moe_layers):
        if stack is not None:
          x, _ = stack(x, positions_BS, segment_ids_BS, decode, absorb, append)
    else:
      for layer in self.layers:
        x = layer(x, positions_BS, segment_ids_BS, decode, absorb, append)
    return self.final_norm(x)

  def __call__(self, tokens_BS: jax.Array, positions_BS: Optional[jax.Array] = None,
               segment_ids_BS: Optional[jax.Array] = None, decode: bool = False, absorb: bool = True,
               return_mtp: bool = False):
    """Logits [B, S, V]; with return_mtp, (logits, mtp_logits [num_nextn_predict_layers, B, S, V]).

    positions default to 0..S-1; segment_ids (packed documents) restrict attention to
    tokens of the same id. decode/absorb: see MLA.__call__. MTP logits at position i of
    depth k predict token i+k+1 (positions within k of the end see padding and are not
    meaningful; the loss masks them). Initializing with decode=True also creates the MTP
    depths' own caches (speculative decoding drafts with them).
    """
    b, s = tokens_BS.shape
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    h = self.trunk(tokens_BS, positions_BS, segment_ids_BS, decode, absorb)
    if not (return_mtp or self.is_initializing()):
      return self.logits(h)
    all_KBSV = self._head_and_mtp(tokens_BS, h, positions_BS, segment_ids_BS, decode).astype(jnp.float32)
    if not return_mtp:
      return all_KBSV[0]
    return all_KBSV[0], all_KBSV[1:]

  def all_logits(self, tokens_BS: jax.Array, positions_BS: jax.Array, segment_ids_BS: Optional[jax.Array] = None):
    """[1 + num_nextn_predict_layers, B, S, V] in the compute dtype: the main logits, then each
    MTP depth's.

    What training's loss reads: one array, so the loss's gradient is one [K, B, S, V] buffer.
    (Sliced into logits and MTP logits first, each slice's cotangent was padded back to the
    full [K, B, S, V] and the two summed: libtpu 0.0.42 kept three such buffers alive at the
    V3 proxy's peak, 2.1 GB each.) Not upcast here: the loss upcasts inside its reductions,
    where a whole fp32 copy (4.2 GB on the multi-slice proxy) need not exist. BENCHMARKS.md
    "Pod communication".
    """
    h = self.trunk(tokens_BS, positions_BS, segment_ids_BS)
    return self._head_and_mtp(tokens_BS, h, positions_BS, segment_ids_BS, False)

  def _head_and_mtp(self, tokens_BS, h, positions_BS, segment_ids_BS, decode):
    b = tokens_BS.shape[0]
    cfg = self.cfg
    normed = [h]
    for k, layer in enumerate(self.mtp, start=1):
      # Token i+k's embedding at position i; the last k positions see token 0 (masked in the loss).
      shifted = jnp.concatenate([tokens_BS[:, k:], jnp.zeros((b, k), tokens_BS.dtype)], axis=1)
      h, h_normed = layer(self.embed_tokens(shifted), h, positions_BS, segment_ids_BS, decode)
      normed.append(h_normed)
    # One head matmul for the main and the MTP depths (they share the head): its weight gradient
    # is then one dot, summed over depths before the batch-axis reduction, so a step reduces the
    # [D, V] head gradient once instead of once per depth (issue 21). Stacked on a new leading
    # axis: the batch axis keeps its sharding.
    w = self.embed.T if cfg.tie_word_embeddings else self.head
    return head_matmul(jnp.stack(normed), w, cfg)

  # --- speculative decoding (moe_jax/speculative.py) ---------------------------------------
  def verify(self, tokens_BS: jax.Array, positions_BS: jax.Array, absorb: bool = True):
    """S tokens appended to the decode cache, causal among themselves ->
    (logits [B, S, V] fp32, final-normed hidden [B, S, D])."""
    h = self.trunk(tokens_BS, positions_BS, None, True, absorb, True)
    return self.logits(h), h

  def draft(self, depth: int, next_tokens_BS: jax.Array, h_BSD: jax.Array, positions_BS: jax.Array,
            query_B: jax.Array, append: bool = True):
    """MTP depth `depth` (0-based) against its own decode cache: at position i, h [B, S, D] (the
    main model's final-normed hidden for depth 0, else the previous depth's output) and token
    i+depth+1 (next_tokens) -> (output hidden [B, S, D], logits [B, V] at column query_B [B]),
    the logits predicting token i+depth+2. append=False: a prefill of the empty cache."""
    h, h_normed = self.mtp[depth](self.embed_tokens(next_tokens_BS), h_BSD, positions_BS, None, True, append)
    rows = jnp.arange(h.shape[0])
    return h, self.logits(h_normed[rows, query_B][:, None])[:, 0]
