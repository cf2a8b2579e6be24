"""Plain attention with G key/value heads: MHA (G = H), GQA (1 < G < H), MQA (G = 1).

The baseline MLA is measured against (DeepSeek-V2 appendix D); the same call as layers/mla.py's
MLA, so model.py swaps one for the other by cfg.attention_type. The head geometry is MLA's:
queries and keys have J = N + R dims per head, the last R rotated by RoPE (decoupled from the N
"nope" dims, as MLA's rope key is), values V dims, and the same softmax scale, so an ablation
changes only how keys and values are produced and cached.

Weights (letters of layers/common.py; G = cfg.num_key_value_heads, J = N + R):
  q [D, H, J]   k [D, G, J]   v [D, G, V]   o [H, V, D]
Head h reads key/value head h // (H / G). Keys and values are repeated to H heads before the
attention kernel of cfg.attention_impl (layers/attention.py), so every kernel runs unchanged.
The decode cache holds G * (J + V) values per token per layer (MLA: K + R), `cache_values_per_token`.

Sharding: query heads and MHA's key/value heads on the 'heads' logical axis; with G < H the
key/value projections are small and stay whole over 'tensor' (a G that a tensor axis does not
divide could not be cut anyway).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_jax.config import ModelConfig
from moe_jax.layers import attention
from moe_jax.layers.common import project, weight
from moe_jax.layers.rope import apply_rope, cos_sin


def cache_values_per_token(cfg: ModelConfig) -> int:
  """Values one layer caches per token for decoding: MLA K + R, plain attention G * (J + V)."""
  if cfg.attention_type == "mla":
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim
  return cfg.num_key_value_heads * (cfg.qk_head_dim + cfg.v_head_dim)


def attention_params(cfg: ModelConfig) -> int:
  """Parameters of one attention layer (norms included), for equal-parameter comparisons."""
  d, h, j, v = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
  if cfg.attention_type == "mla":
    q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * j if cfg.q_lora_rank else d * h * j
    k = cfg.kv_lora_rank
    return q + d * (k + cfg.qk_rope_head_dim) + k + k * h * cfg.qk_nope_head_dim + k * h * v + h * v * d
  return d * h * j + d * cfg.num_key_value_heads * (j + v) + h * v * d


class KVCache(nn.Module):
  """The decode cache: keys [B, T, G, J] (rope part rotated) and values [B, T, G, V] per layer.

  Created with T = the length of the first (init) call; afterwards writes each token at slot
  positions[b, s] and returns the whole cache, or None on the creating call (as MLA's LatentCache).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, k_BSGJ, v_BSGV, positions_BS):
    cfg = self.cfg
    batch, length, g, _ = k_BSGJ.shape
    initialized = self.has_variable("cache", "key")
    key = self.variable("cache", "key", jnp.zeros, (batch, length, g, cfg.qk_head_dim), cfg.compute_dtype)
    value = self.variable("cache", "value", jnp.zeros, (batch, length, g, cfg.v_head_dim), cfg.compute_dtype)
    if not initialized:
      return None
    rows = jnp.arange(batch)[:, None]
    key.value = key.value.at[rows, positions_BS].set(k_BSGJ.astype(key.value.dtype))
    value.value = value.value.at[rows, positions_BS].set(v_BSGV.astype(value.value.dtype))
    return key.value, value.value


class GQA(nn.Module):
  """Grouped-query attention. Call: x [B, S, D], positions [B, S] -> [B, S, D] (MLA's signature)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, h, g, j = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.qk_head_dim
    kv_axis = "heads" if g == h else None
    self.q = weight(self, cfg, "q", (d, h, j), ("embed", "heads", "qk_head"))
    self.k = weight(self, cfg, "k", (d, g, j), ("embed", kv_axis, "qk_head"))
    self.v = weight(self, cfg, "v", (d, g, cfg.v_head_dim), ("embed", kv_axis, "v_head"))
    self.o = weight(self, cfg, "o", (h, cfg.v_head_dim, d), ("heads", "v_head", "embed"))
    self.cache = KVCache(cfg)

  def _rotate(self, x, cos, sin):
    """[B, S, heads, J]: RoPE on the last R dims."""
    n = self.cfg.qk_nope_head_dim
    return jnp.concatenate([x[..., :n], apply_rope(x[..., n:], cos, sin, self.cfg.rope_interleave)], -1)

  def _attend(self, q_BSHJ, k_BTGJ, v_BTGV, segment_ids_BS=None, mask_B1ST=None):
    cfg = self.cfg
    rep = cfg.num_attention_heads // cfg.num_key_value_heads  # head h reads kv head h // rep
    k, v = jnp.repeat(k_BTGJ, rep, axis=2), jnp.repeat(v_BTGV, rep, axis=2)
    no_rope_q = q_BSHJ[..., :0]  # the kernels take MLA's [nope; shared rope key]: here all of J is per head
    no_rope_k = jnp.zeros(k.shape[:2] + (0,), k.dtype)
    impl = attention.resolve(cfg, packed=segment_ids_BS is not None)
    return attention.attend(impl, q_BSHJ, no_rope_q, k.astype(q_BSHJ.dtype), no_rope_k, v, cfg.softmax_scale,
                            segment_ids_BS, mask_B1ST)

  def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, segment_ids_BS: Optional[jax.Array] = None,
               decode: bool = False, absorb: bool = True, append: bool = False) -> jax.Array:
    """Causal attention, or with decode=True against the KV cache (as MLA.__call__: the first call
    creates the cache with room for S tokens; S == 1, or append=True, attends from each query to
    every slot <= its position; S > 1 otherwise prefills an empty cache). absorb has no meaning here."""
    cfg = self.cfg
    cos, sin = cos_sin(positions_BS, cfg)
    q = self._rotate(project("bsd,dhj->bshj", x_BSD, self.q, cfg), cos, sin)
    k = self._rotate(project("bsd,dgj->bsgj", x_BSD, self.k, cfg), cos, sin)
    v = project("bsd,dgv->bsgv", x_BSD, self.v, cfg)
    if decode:
      cached = self.cache(k, v, positions_BS)
      if cached is not None and (x_BSD.shape[1] == 1 or append):
        cache_k, cache_v = cached
        slots = jnp.arange(cache_k.shape[1])
        mask = (slots[None, None, :] <= positions_BS[:, :, None])[:, None]  # [B, 1, S, T]
        out = self._attend(q, cache_k.astype(cfg.compute_dtype), cache_v.astype(cfg.compute_dtype), mask_B1ST=mask)
        return project("bshv,hvd->bsd", out, self.o, cfg)
    out = self._attend(q, k, v, segment_ids_BS)
    return project("bshv,hvd->bsd", out, self.o, cfg)
