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
The expanded form's attention kernels (einsum, cuDNN, TPU splash, Pallas GPU flash) live in
layers/attention.py, chosen by cfg.attention_impl.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_jax.config import ModelConfig
from moe_jax.layers import attention
from moe_jax.layers.attention import softmax_attend
from moe_jax.layers.common import RMSNorm, project, weight
from moe_jax.layers.rope import apply_rope, cos_sin

# DeepSeek's reference and transformers build the latent norms with the default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def attention_impl(cfg: ModelConfig, packed: bool = False) -> str:
  """cfg.attention_impl with 'auto' resolved for the target in context (layers/attention.py)."""
  return attention.resolve(cfg, packed)


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

  def expanded(self, q_nope, q_rope, c_BTK, k_rope_BTR, mask_B1ST=None, segment_ids_BS=None):
    """Training / prefill form: per-head keys and values from the latent, then attention.

    Causal within segment_ids' documents (the kernel of cfg.attention_impl); with mask_B1ST
    (decode against a cache) exactly that mask.
    """
    cfg = self.cfg
    k_nope = project("btk,khn->bthn", c_BTK, self.k_b, cfg)
    v = project("btk,khv->bthv", c_BTK, self.v_b, cfg)
    impl = attention_impl(cfg, packed=segment_ids_BS is not None)
    return attention.attend(impl, q_nope, q_rope, k_nope, k_rope_BTR, v, cfg.softmax_scale, segment_ids_BS,
                            mask_B1ST)

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
               decode: bool = False, absorb: bool = True, append: bool = False) -> jax.Array:
    """Expanded attention, or with decode=True one step against the latent cache.

    decode=True: the first call creates the cache with room for S tokens (call it with the
    full [B, max_len] shape); later calls write each token's latent at slot positions[b, s].
    A call with S > 1 is a prefill of an empty cache (expanded attention over the chunk)
    unless append=True; a call with S == 1, or any S with append=True, attends from each
    query to every slot <= its own position (so S appended tokens are causal among
    themselves: speculative verification), in the absorbed form (absorb=False re-expands
    keys and values from the cache, for comparison). Slots are written before they are read,
    so a call may overwrite stale slots (rejected drafts) at or after its first position.
    """
    cfg = self.cfg
    length = x_BSD.shape[1]
    cos, sin = cos_sin(positions_BS, cfg)
    q_nope, q_rope = self.queries(x_BSD, cos, sin)
    c, k_rope = self.latents(x_BSD, cos, sin)

    if decode:
      cached = self.cache(c, k_rope, positions_BS)
      if cached is not None and (length == 1 or append):
        cache_c, cache_r = cached
        slots = jnp.arange(cache_c.shape[1])
        mask = (slots[None, None, :] <= positions_BS[:, :, None])[:, None]  # [B, 1, S, T]
        form = self.absorbed if absorb else self.expanded
        out = form(q_nope, q_rope, cache_c, cache_r, mask)
        return project("bshv,hvd->bsd", out, self.o, cfg)

    out = self.expanded(q_nope, q_rope, c, k_rope, segment_ids_BS=segment_ids_BS)
    return project("bshv,hvd->bsd", out, self.o, cfg)
