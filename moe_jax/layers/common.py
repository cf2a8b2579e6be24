"""Shared pieces: logical-axis parameters, projections, RMSNorm and the SwiGLU MLP.

Shape letters used across moe_jax/layers and moe_jax/model.py:
  B batch   S query length   T key length   D embed (hidden_size)
  H heads   Q q_lora_rank    K kv_lora_rank N qk_nope_head_dim  R qk_rope_head_dim
  V v_head_dim   F MLP hidden   E routed experts   X experts per token   G expert groups
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax.ad_checkpoint import checkpoint_name

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.layers import fp8 as fp8_lib
from moe_jax.layers import matmul

FP8_SCALES = "fp8_scales"  # collection: block scales of an FP8 checkpoint kept as it is
# The name remat policies 'gathered' and 'gathered_offload' save (model.REMAT_POLICIES): a block's
# weights as its matmuls read them, gathered over the batch axes, in the compute dtype (see `gathered`).
GATHERED = "gathered_weight"
GATHERING_POLICIES = ("gathered", "gathered_offload")
# Logical axes of the weights `gathered` leaves alone: the embedding table and head gather on their
# own terms (model.py); routed experts stay where they are (the expert exchange moves the tokens).
NOT_GATHERED = frozenset({"vocab", "exp"})


def keeps_gathered(shape: Sequence[int], axes: Sequence[str | None]) -> bool:
  """Whether remat 'gathered'/'gathered_offload' keeps this weight gathered for the backward: the
  matrices outside NOT_GATHERED. Vectors (norm scales) are regathered: a few KB, and libtpu 0.0.42
  aborts the compile offloading their layer stack ("Sublane slicing size not multiple of update
  chunk sublane size")."""
  return len(shape) >= 2 and not NOT_GATHERED & set(axes)


def weight(mod: nn.Module, cfg: ModelConfig, name: str, shape: Sequence[int], axes: Sequence[str | None],
           init=None):
  """Declares a parameter with logical axis names (one name per dimension)."""
  assert len(shape) == len(axes), (name, shape, axes)
  init = init or nn.initializers.normal(stddev=cfg.initializer_range)
  w = mod.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), cfg.weight_dtype)
  if mod.has_variable(FP8_SCALES, name):  # e4m3 params with their block scales (hf.py, keep_fp8)
    return fp8_lib.Fp8Weight(w, mod.get_variable(FP8_SCALES, name))
  if cfg.remat_policy in GATHERING_POLICIES and keeps_gathered(shape, axes):
    return gathered(w, axes, cfg)
  return w


def gathered(w: jax.Array, axes: Sequence[str | None], cfg: ModelConfig) -> jax.Array:
  """w in the compute dtype, gathered over the batch (data-parallel) axes it is cut over: cut only
  over the others (tensor), as the matmul reads it. Named GATHERED, so remat policy 'gathered'
  keeps it for the backward, which then does not gather the weight a second time (under 'full' the
  recomputed forward gathers every layer's weights again: 2x the gather bytes of the ideal).
  Costs each rematerialized layer's gathered weights for the whole step (`plan` counts them).
  Only for the weights keeps_gathered names (weight() skips the others). Outside a mesh: w as it
  is, in the compute dtype.
  """
  rules, mesh = nn.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
  w = w.astype(cfg.compute_dtype)
  if rules and not mesh.empty:
    w = _gather(w, sharding.gathered_spec(axes, rules), nn.logical_to_mesh_axes(tuple(axes), rules))
  return checkpoint_name(w, GATHERED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(w, gathered_spec, own_spec):
  """w laid out as gathered_spec; its cotangent goes back to w's own layout (own_spec). Plain
  autodiff would give the cotangent gathered_spec too: an all-reduce of the whole gradient over
  every batch axis, where the own layout lets the compiler reduce-scatter it."""
  return jax.lax.with_sharding_constraint(w, gathered_spec)


def _gather_fwd(w, gathered_spec, own_spec):
  return _gather(w, gathered_spec, own_spec), None


def _gather_bwd(gathered_spec, own_spec, _, g):
  return (jax.lax.with_sharding_constraint(g, own_spec),)


_gather.defvjp(_gather_fwd, _gather_bwd)


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
