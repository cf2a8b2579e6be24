"""Multi-head Latent Attention (DeepSeek-V2 section 2.1), one set of weights in two forms.

Weights (shapes in the letters of layers/common.py):
  q_a [D, Q], q_norm [Q], q_b [Q, H, N+R]       (q_lora_rank set; else q [D, H, N+R])
  kv_a [D, K+R]   kv_norm [K]   k_b [K, H, N]   v_b [K, H, V]   o [H, V, D]

Expanded form (training, prefill): keys and values are materialized per head,
  k = [c @ k_b ; rope(k_rope) broadcast to heads],  v = c @ v_b,  c = kv_norm(x @ kv_a)[:K].
Absorbed form (decode): k_b is folded into the query and v_b applied after attention,
  score = (q_nope @ k_b^T) . c + q_rope . k_rope,   out = (softmax @ c) @ v_b,
so the cache holds only c [K] and the rotated k_rope [R] per token: K + R values
(512 + 64 = 576 at DeepSeek-V3 sizes) instead of 2 * H * (N+R) for multi-head attention.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_jax.config import ModelConfig
from moe_jax.layers.common import RMSNorm, project, weight
from moe_jax.layers.rope import apply_rope, cos_sin

# DeepSeek's reference and transformers build the latent norms with the default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6
NEG_INF = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax


def attention_mask(segment_ids_BS: Optional[jax.Array], batch: int, length: int) -> jax.Array:
  """Causal mask within each packed document -> bool [B, 1, S, S] (True = may attend)."""
  idx = jnp.arange(length)
  mask = (idx[:, None] >= idx[None, :])[None, None]
  if segment_ids_BS is not None:
    mask = mask & (segment_ids_BS[:, None, :, None] == segment_ids_BS[:, None, None, :])
  return jnp.broadcast_to(mask, (batch, 1, length, length))


def softmax_attend(scores_BHST: jax.Array, mask_B1ST: jax.Array) -> jax.Array:
  """fp32 masked softmax over the key axis."""
  scores = jnp.where(mask_B1ST, scores_BHST.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


def joint_qk(q_nope_BSHN, q_rope_BSHR, k_nope_BTHN, k_rope_BTR):
  """([nope; rope] queries [B, S, H, N+R], keys [B, T, H, N+R]): the one rope key broadcast to every head."""
  k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None].astype(k_nope_BTHN.dtype),
                                 (*k_nope_BTHN.shape[:3], k_rope_BTR.shape[-1]))
  return (jnp.concatenate([q_nope_BSHN, q_rope_BSHR.astype(q_nope_BSHN.dtype)], -1),
          jnp.concatenate([k_nope_BTHN, k_rope_BTHR], -1))


def dot_product_attention(q_nope, q_rope, k_nope, k_rope_BTR, v_BTHV, mask_B1ST, scale):
  """Expanded attention through jax.nn.dot_product_attention -> [B, S, H, V].

  It wants one head dim for q, k and v, so [nope; rope] queries and keys and the values are
  zero-padded to max(N + R, V) (zeros add nothing to q . k, and padded value columns are cut
  off). mask None is plain causal attention, passed as is_causal so cuDNN skips the masked half.
  A packed-document mask goes to cuDNN as an explicit mask (measured on an H100 only without
  one: train with data.document_mask=False for the flash path, BENCHMARKS.md).
  """
  q, k = joint_qk(q_nope, q_rope, k_nope, k_rope_BTR)
  v = v_BTHV.astype(q.dtype)
  width = max(q.shape[-1], v.shape[-1])
  pad = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, width - a.shape[-1]),))  # noqa: E731
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), mask=mask_B1ST, scale=scale,
                                     is_causal=mask_B1ST is None, implementation=sdpa_implementation(q.dtype, width))
  return out[..., :v_BTHV.shape[-1]]


def attention_impl(cfg: ModelConfig) -> str:
  """cfg.attention_impl with 'auto' resolved: 'dot_product' where cuDNN flash attention takes it."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  width = max(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim)
  return "dot_product" if sdpa_implementation(cfg.compute_dtype, width) else "einsum"


def sdpa_implementation(dtype, head_dim: int):
  """'cudnn' (flash attention) on a GPU for the dtypes and head sizes it takes, else None (XLA).

  jax.nn.dot_product_attention's own default (None) is the XLA form, which materializes the
  [B, H, S, T] scores: on an H100 at 8 x 2048 tokens that made the bench1b training step 2x
  slower and held gigabytes of scores per layer for the backward pass (BENCHMARKS.md).
  """
  ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if ok and jax.default_backend() == "gpu" else None


class LatentCache(nn.Module):
  """The decode cache: latent c [B, T, K] and rotated rope key [B, T, R] per layer.

  Created with T = the length of the first (init) call; afterwards writes each token at
  slot positions[b, s] and returns the whole cache, or None on the creating call.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, c_BSK, k_rope_BSR, positions_BS):
    cfg = self.cfg
    batch, length, _ = c_BSK.shape
    initialized = self.has_variable("cache", "latent")
    latent = self.variable("cache", "latent", jnp.zeros, (batch, length, cfg.kv_lora_rank), cfg.compute_dtype)
    rope_key = self.variable("cache", "rope_key", jnp.zeros, (batch, length, cfg.qk_rope_head_dim),
                             cfg.compute_dtype)
    if not initialized:
      return None
    rows = jnp.arange(batch)[:, None]
    latent.value = latent.value.at[rows, positions_BS].set(c_BSK.astype(latent.value.dtype))
    rope_key.value = rope_key.value.at[rows, positions_BS].set(k_rope_BSR.astype(rope_key.value.dtype))
    return latent.value, rope_key.value


class MLA(nn.Module):
  """Multi-head Latent Attention. Call: x [B, S, D], positions [B, S] -> [B, S, D]."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, h, k, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
      self.q_a = weight(self, cfg, "q_a", (d, cfg.q_lora_rank), ("embed", "q_lora"))
      self.q_norm = RMSNorm(cfg, axis_name="q_lora", eps=LATENT_NORM_EPS)
      self.q_b = weight(self, cfg, "q_b", (cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"))
    else:
      self.q = weight(self, cfg, "q", (d, h, cfg.qk_head_dim), ("embed", "heads", "qk_head"))
    self.kv_a = weight(self, cfg, "kv_a", (d, k + r), ("embed", "kv_lora"))
    self.kv_norm = RMSNorm(cfg, axis_name="kv_lora", eps=LATENT_NORM_EPS)
    self.k_b = weight(self, cfg, "k_b", (k, h, cfg.qk_nope_head_dim), ("kv_lora", "heads", "qk_head"))
    self.v_b = weight(self, cfg, "v_b", (k, h, cfg.v_head_dim), ("kv_lora", "heads", "v_head"))
    self.o = weight(self, cfg, "o", (h, cfg.v_head_dim, d), ("heads", "v_head", "embed"))
    self.cache = LatentCache(cfg)

  def queries(self, x_BSD, cos, sin):
    """-> q_nope [B, S, H, N], rotated q_rope [B, S, H, R]."""
    cfg = self.cfg
    if cfg.q_lora_rank:
      q = project("bsq,qhe->bshe", self.q_norm(project("bsd,dq->bsq", x_BSD, self.q_a, cfg)), self.q_b, cfg)
    else:
      q = project("bsd,dhe->bshe", x_BSD, self.q, cfg)
    q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    return q_nope, apply_rope(q_rope, cos, sin, cfg.rope_interleave)

  def latents(self, x_BSD, cos, sin):
    """-> normed latent c [B, S, K], rotated shared rope key [B, S, R] (what the cache holds)."""
    cfg = self.cfg
    kv = project("bsd,de->bse", x_BSD, self.kv_a, cfg)
    c, k_rope = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
    return self.kv_norm(c), apply_rope(k_rope, cos, sin, cfg.rope_interleave)

  def expanded(self, q_nope, q_rope, c_BTK, k_rope_BTR, mask_B1ST):
    """Training / prefill form: per-head keys and values from the latent. mask None: causal."""
    cfg = self.cfg
    k_nope = project("btk,khn->bthn", c_BTK, self.k_b, cfg)
    v = project("btk,khv->bthv", c_BTK, self.v_b, cfg)
    if attention_impl(cfg) == "dot_product":
      return dot_product_attention(q_nope, q_rope, k_nope, k_rope_BTR, v, mask_B1ST, cfg.softmax_scale)
    if mask_B1ST is None:
      mask_B1ST = attention_mask(None, q_nope.shape[0], q_nope.shape[1])
    # One score matmul over [nope; rope] (the shared rope key broadcast to every head) instead
    # of two summed ones: on CPU a small batched matmul costs mostly overhead, not FLOPs.
    q, k = joint_qk(q_nope, q_rope, k_nope, k_rope_BTR)
    scores = jnp.einsum("bshe,bthe->bhst", q, k, preferred_element_type=jnp.float32)
    probs = softmax_attend(scores * cfg.softmax_scale, mask_B1ST).astype(v.dtype)
    return jnp.einsum("bhst,bthv->bshv", probs, v)

  def absorbed(self, q_nope, q_rope, c_BTK, k_rope_BTR, mask_B1ST):
    """Decode form: attention runs in the K-dim latent space; k_b and v_b never touch the cache."""
    cfg = self.cfg
    q_latent = project("bshn,khn->bshk", q_nope, self.k_b, cfg)
    c = c_BTK.astype(cfg.compute_dtype)
    scores = (jnp.einsum("bshk,btk->bhst", q_latent, c, preferred_element_type=jnp.float32)
              + jnp.einsum("bshr,btr->bhst", q_rope, k_rope_BTR.astype(q_rope.dtype),
                           preferred_element_type=jnp.float32))
    probs = softmax_attend(scores * cfg.softmax_scale, mask_B1ST).astype(c.dtype)
    o_latent = jnp.einsum("bhst,btk->bshk", probs, c)
    return project("bshk,khv->bshv", o_latent, self.v_b, cfg)

  def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, segment_ids_BS: Optional[jax.Array] = None,
               decode: bool = False, absorb: bool = True) -> jax.Array:
    """Expanded attention, or with decode=True one step against the latent cache.

    decode=True: the first call creates the cache with room for S tokens (call it with the
    full [B, max_len] shape); later calls write each token's latent at slot positions[b, s].
    A call with S > 1 is a prefill of an empty cache (expanded attention over the chunk);
    a call with S == 1 is a decode step over every slot <= its position, in the absorbed
    form (absorb=False re-expands keys and values from the cache, for comparison).
    """
    cfg = self.cfg
    batch, length, _ = x_BSD.shape
    cos, sin = cos_sin(positions_BS, cfg)
    q_nope, q_rope = self.queries(x_BSD, cos, sin)
    c, k_rope = self.latents(x_BSD, cos, sin)

    if decode:
      cached = self.cache(c, k_rope, positions_BS)
      if cached is not None and length == 1:
        cache_c, cache_r = cached
        slots = jnp.arange(cache_c.shape[1])
        mask = (slots[None, :] <= positions_BS[:, :1])[:, None, None, :]  # [B, 1, 1, T]
        form = self.absorbed if absorb else self.expanded
        out = form(q_nope, q_rope, cache_c, cache_r, mask)
        return project("bshv,hvd->bsd", out, self.o, cfg)

    mask = None if segment_ids_BS is None else attention_mask(segment_ids_BS, batch, length)
    out = self.expanded(q_nope, q_rope, c, k_rope, mask)
    return project("bshv,hvd->bsd", out, self.o, cfg)
