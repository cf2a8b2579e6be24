"""Rotary position embeddings with YaRN, in DeepSeek's interleaved or the halves layout.

Only the qk_rope_head_dim slice of queries and the one shared rope key are rotated.
`rope_interleave=True` rotates pairs (x0, x1), (x2, x3), ... (the released DeepSeek
weights and the reference code); False rotates (x_i, x_{i+R/2}) (transformers'
`rotate_half`). Attention scores depend only on q.k, so each layout just has to be
applied to both q and k the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig, yarn_get_mscale


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Returns (inverse frequencies [R/2] as fp32, cos/sin multiplier), YaRN-corrected if configured."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
  inv_extra = 1.0 / pos_freqs
  ys = cfg.rope_scaling
  if ys is None:
    return inv_extra.astype(np.float32), 1.0
  inv_inter = 1.0 / (ys.factor * pos_freqs)

  def correction_dim(rotations):
    return dim * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(correction_dim(ys.beta_fast)), 0)
  high = min(math.ceil(correction_dim(ys.beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = 1.0 - ramp  # 1 keeps the original frequency (fast dims), 0 interpolates
  inv = inv_inter * (1 - extrapolate) + inv_extra * extrapolate
  if ys.mscale and ys.mscale_all_dim:
    attention_factor = yarn_get_mscale(ys.factor, ys.mscale) / yarn_get_mscale(ys.factor, ys.mscale_all_dim)
  else:
    attention_factor = yarn_get_mscale(ys.factor)
  return inv.astype(np.float32), float(attention_factor)


def cos_sin(positions_BS: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Angles for integer positions [B, S] -> (cos, sin) each [B, S, R/2] in fp32."""
  inv, factor = inv_frequencies(cfg)
  angles = positions_BS.astype(jnp.float32)[..., None] * jnp.asarray(inv)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos_BSr: jax.Array, sin_BSr: jax.Array, interleave: bool) -> jax.Array:
  """Rotates x [B, S, ..., R] (any head axes between S and R); computed in fp32, returns x's dtype."""
  extra = x.ndim - cos_BSr.ndim
  cos = cos_BSr.reshape(cos_BSr.shape[:2] + (1,) * extra + cos_BSr.shape[2:])
  sin = sin_BSr.reshape(cos.shape)
  x32 = x.astype(jnp.float32)
  if interleave:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
