"""Shared pieces: logical-axis parameters, projections, RMSNorm and the SwiGLU MLP.

Shape letters used across moe_jax/layers and moe_jax/model.py:
  B batch   S query length   T key length   D embed (hidden_size)
  H heads   Q q_lora_rank    K kv_lora_rank N qk_nope_head_dim  R qk_rope_head_dim
  V v_head_dim   F MLP hidden   E routed experts   X experts per token   G expert groups
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_jax.config import ModelConfig
from moe_jax.layers import fp8 as fp8_lib
from moe_jax.layers import matmul

FP8_SCALES = "fp8_scales"  # collection: block scales of an FP8 checkpoint kept as it is


def weight(mod: nn.Module, cfg: ModelConfig, name: str, shape: Sequence[int], axes: Sequence[str | None],
           init=None):
  """Declares a parameter with logical axis names (one name per dimension)."""
  assert len(shape) == len(axes), (name, shape, axes)
  init = init or nn.initializers.normal(stddev=cfg.initializer_range)
  w = mod.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), cfg.weight_dtype)
  if mod.has_variable(FP8_SCALES, name):  # e4m3 params with their block scales (hf.py, keep_fp8)
    return fp8_lib.Fp8Weight(w, mod.get_variable(FP8_SCALES, name))
  return w


def project(equation: str, x: jax.Array, w, cfg: ModelConfig, fp8: bool = True) -> jax.Array:
  """x @ w in the compute dtype (the one place a projection happens, so precision changes live here):
  fp32 accumulation and, on the CPU, the operand dtype of JAX's matmul precision (layers/matmul.py).

  cfg.fp8: DeepSeek-V3 fine-grained FP8 (layers/fp8.py); fp8=False keeps this projection out
  of it (the output head). w may be an fp8_lib.Fp8Weight (dequantized when not in FP8).
  """
  dtype = cfg.compute_dtype
  if fp8 and cfg.fp8:
    return fp8_lib.einsum(equation, x, w, dtype, kernel=cfg.fp8_kernel)
  return matmul.einsum(equation, x, fp8_lib.dense(w, dtype), dtype)


class RMSNorm(nn.Module):
  """RMSNorm computed in fp32; returns the input dtype (as DeepSeek and transformers do)."""

  cfg: ModelConfig
  axis_name: str = "embed"
  eps: float | None = None  # None: cfg.rms_norm_eps

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eps = self.cfg.rms_norm_eps if self.eps is None else self.eps
    scale = weight(self, self.cfg, "scale", (x.shape[-1],), (self.axis_name,), init=nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(self.cfg.compute_dtype) * x32.astype(self.cfg.compute_dtype)


class MLP(nn.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up)). Used for dense layers and shared experts."""

  cfg: ModelConfig
  hidden: int  # F

  @nn.compact
  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    cfg, d = self.cfg, self.cfg.hidden_size
    w_gate = weight(self, cfg, "gate", (d, self.hidden), ("embed", "mlp"))
    w_up = weight(self, cfg, "up", (d, self.hidden), ("embed", "mlp"))
    w_down = weight(self, cfg, "down", (self.hidden, d), ("mlp", "embed"))
    if cfg.fp8 or isinstance(w_gate, fp8_lib.Fp8Weight) or isinstance(w_up, fp8_lib.Fp8Weight):
      h_gate, h_up = project("...d,df->...f", x_BSD, w_gate, cfg), project("...d,df->...f", x_BSD, w_up, cfg)
    else:
      # gate and up in one matmul over the stacked weights [D, 2, F]: half the small matmuls
      # forward and backward (faster on CPU), and stacking on a new axis keeps F's sharding.
      h_BS2F = project("...d,dgf->...gf", x_BSD, jnp.stack([w_gate, w_up], 1), cfg)
      h_gate, h_up = h_BS2F[..., 0, :], h_BS2F[..., 1, :]
    return project("...f,fd->...d", nn.silu(h_gate) * h_up, w_down, cfg)
