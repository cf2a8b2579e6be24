"""Expanded (training / prefill) attention for MLA, one path per `attention_impl`.

Inputs are MLA's: queries q_nope [B, S, H, N] and rotated q_rope [B, S, H, R], keys k_nope
[B, T, H, N] and the one rotated rope key k_rope [B, T, R] shared by every head, values
[B, T, H, V]; causal, optionally within packed documents (segment ids [B, S]). J = N + R is
the joint query/key head dim (192 at DeepSeek-V3 sizes, V = 128, H = 128).

  einsum       scores as one einsum, fp32 softmax, [B, H, S, T] in memory (the reference;
               fastest on CPU)
  dot_product  jax.nn.dot_product_attention: cuDNN flash attention on a GPU where cuDNN takes
               the shape (below), XLA's [B, H, S, T] form elsewhere
  splash       TPU: the Pallas splash attention shipped with JAX (Mosaic kernels for forward,
               dq and dkv), memory linear in S; interpreted on CPU (tests)
  pallas_gpu   GPU: the Pallas (Triton) flash attention shipped with JAX
               (jax.experimental.pallas.ops.gpu.attention), memory linear in S; interpreted on CPU
  auto         the mesh in context decides (moe_jax/target.py): TPU -> splash; GPU in
               bf16/fp16 -> dot_product (cuDNN) for plain causal attention where cuDNN takes
               the head dim, else pallas_gpu; CPU, and fp32 on a GPU -> einsum

Head dims (q/k 192, v 128). Splash in jax 0.10.2 takes the value head dim separately from the
query/key one, and Mosaic takes a 192-wide block as the full extent of the array (compiled for
v5p in tests/test_flash_attention.py), so nothing is padded or split on TPU: q.k contracts
over 192 and p.v over 128. (TPU tiles a 192 minor dim to 256 lanes in HBM anyway, and the
128-deep MXU takes 192 in two passes as it would 256: an explicit pad would only add copies.)
The GPU paths want one head dim for q, k and v: the narrower side is zero-padded to max(J, V)
(zeros add nothing to q . k; padded output columns are cut off), at 192/128 v to 192, 1.2x
the attention FLOPs (q.k 192 + p.v 192 against 192 + 128); splitting J into 128 + 64 buys
nothing, as the softmax needs the whole score. cuDNN (jax/_src/cudnn/fused_attention_stablehlo.py)
takes head dims that are multiples of 8 up to 128, up to 256 from Hopper (compute capability
9.0) on: 192 runs on an H100, not an A100. cuDNN's own MLA form (q/k 192, v 128 unpadded)
needs cuDNN >= 9.10 and is not reachable through jax.nn.dot_product_attention, whose value
must match the key's head dim. Packed documents reach cuDNN through that API only as an
explicit [B, 1, S, T] mask (not linear in S), so 'auto' sends them to pallas_gpu, which takes
segment ids; that kernel rounds the head dim up to a power of two inside (192 -> 256, in
registers, not in memory). The GPU choices are not measured (no GPU in this session).

Mosaic and Triton kernels cannot be partitioned by GSPMD: inside a mesh (`jax.set_mesh`,
`sharding.activation_rules`) they run in `jax.shard_map`, batch over the rules' batch axes
and heads over the rules' heads axes (as the activations are laid out), the sequence whole.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, PartitionSpec as P

from moe_jax import sharding, target
from moe_jax.config import ModelConfig
from moe_jax.layers import matmul

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax
SEQ_BLOCK = 128  # the kernels' sequence tiles are multiples of this; S is padded up to it
PAD_SEGMENT = int(np.iinfo(np.int32).min)  # segment id of padded positions: no real token has it


# --- resolving 'auto' --------------------------------------------------------------------
def resolve(cfg: ModelConfig, packed: bool = False) -> str:
  """cfg.attention_impl with 'auto' resolved for the target of the mesh in context (see module doc)."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  tgt = target.current()
  if tgt.platform == "tpu":
    return "splash"
  if tgt.platform == "gpu" and jnp.dtype(cfg.compute_dtype) in (jnp.bfloat16, jnp.float16):
    width = max(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim)
    return "dot_product" if not packed and sdpa_implementation(cfg.compute_dtype, width) else "pallas_gpu"
  return "einsum"


def sdpa_implementation(dtype, head_dim: int) -> Optional[str]:
  """'cudnn' (flash attention) when the target is a GPU whose cuDNN takes (dtype, head_dim), else None (XLA).

  jax.nn.dot_product_attention's own default (None) is the XLA form, which materializes the
  [B, H, S, T] scores: on an H100 at 8 x 2048 tokens that made the bench1b training step 2x
  slower and held gigabytes of scores per layer for the backward pass (BENCHMARKS.md).
  """
  tgt = target.current()
  if tgt.platform != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8:
    return None
  return "cudnn" if head_dim <= (256 if _hopper_or_later(tgt) else 128) else None


def _hopper_or_later(tgt: target.Target) -> bool:
  cc = tgt.compute_capability
  if cc is None:  # an abstract mesh names no capability: the local GPUs are the ones it compiles for
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None) if dev.platform == "gpu" else None
  return cc is not None and tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0)


# --- shared pieces ----------------------------------------------------------------------
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
  """([nope; rope] queries [B, S, H, J], keys [B, T, H, J]): the one rope key broadcast to every head."""
  k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None].astype(k_nope_BTHN.dtype),
                                 (*k_nope_BTHN.shape[:3], k_rope_BTR.shape[-1]))
  return (jnp.concatenate([q_nope_BSHN, q_rope_BSHR.astype(q_nope_BSHN.dtype)], -1),
          jnp.concatenate([k_nope_BTHN, k_rope_BTHR], -1))


def _pad_last(a, width: int):
  return jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((0, width - a.shape[-1]),))


def _pad_seq(a, length: int, value=0):
  """[B, S, ...] -> [B, length, ...], padded at the end (causal: no real query sees a padded key)."""
  return jnp.pad(a, ((0, 0), (0, length - a.shape[1])) + ((0, 0),) * (a.ndim - 2), constant_values=value)


# --- the paths ----------------------------------------------------------------------------
def attend(impl: str, q_nope, q_rope, k_nope, k_rope_BTR, v_BTHV, scale: float,
           segment_ids_BS: Optional[jax.Array] = None, mask_B1ST: Optional[jax.Array] = None) -> jax.Array:
  """Expanded attention -> [B, S, H, V] through `impl` (resolved, not 'auto').

  Causal (within segment_ids' documents when given), or, with mask_B1ST, exactly that mask
  (decode steps against a cache: einsum, or dot_product when impl is dot_product).
  """
  q, k = joint_qk(q_nope, q_rope, k_nope, k_rope_BTR)
  v = v_BTHV.astype(q.dtype)
  if mask_B1ST is not None:
    return (dot_product(q, k, v, scale, mask_B1ST) if impl == "dot_product" else einsum(q, k, v, scale, mask_B1ST))
  if impl == "einsum":
    return einsum(q, k, v, scale, attention_mask(segment_ids_BS, q.shape[0], q.shape[1]))
  if impl == "dot_product":
    mask = None if segment_ids_BS is None else attention_mask(segment_ids_BS, q.shape[0], q.shape[1])
    return dot_product(q, k, v, scale, mask)
  platform = target.platform()
  wants = {"splash": "tpu", "pallas_gpu": "gpu"}[impl]
  if platform not in (wants, "cpu"):
    raise ValueError(f"attention_impl={impl!r} runs on {wants} (or interpreted on cpu), but the computation "
                     f"targets {platform}; use attention_impl='auto'")
  kernel = functools.partial(splash if impl == "splash" else pallas_gpu, scale=scale, interpret=platform == "cpu")
  if q.dtype != jnp.float32:
    kernel = at_default_precision(kernel)
  return over_mesh(kernel, q, k, v, segment_ids_BS)


def at_default_precision(kernel):
  """kernel(q, k, v, segment_ids), its forward and backward traced at the default matmul precision.

  Mosaic rejects a bf16 x bf16 matmul at precision HIGHEST ("Bad lhs type"), which is what the
  kernels' dots ask for when jax_default_matmul_precision is 'highest' (as the tests set). For
  half-precision inputs the default precision computes the same products, so it is pinned for
  the forward and (through jax.vjp, traced here and not where the caller differentiates) the backward.
  """
  default = functools.partial(jax.default_matmul_precision, "default")

  @jax.custom_vjp
  def run(q, k, v, segment_ids):
    with default():
      return kernel(q, k, v, segment_ids)

  def fwd(q, k, v, segment_ids):
    with default():
      out, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, segment_ids), q, k, v)
    return out, (pullback, segment_ids)

  def bwd(res, g):
    pullback, segment_ids = res
    with default():
      dq, dk, dv = pullback(g)
    no_grad = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq, dk, dv, no_grad

  run.defvjp(fwd, bwd)
  return run


def einsum(q_BSHJ, k_BTHJ, v_BTHV, scale: float, mask_B1ST) -> jax.Array:
  """Scores as one einsum over [nope; rope], fp32 masked softmax -> [B, S, H, V]."""
  # One score matmul over the joint head instead of two summed ones: on CPU a small batched
  # matmul costs mostly overhead, not FLOPs.
  dtype = v_BTHV.dtype
  scores = matmul.einsum("bshj,bthj->bhst", q_BSHJ, k_BTHJ, dtype, out_dtype=jnp.float32)
  probs = softmax_attend(scores * scale, mask_B1ST)
  return matmul.einsum("bhst,bthv->bshv", probs, v_BTHV, dtype)


def dot_product(q_BSHJ, k_BTHJ, v_BTHV, scale: float, mask_B1ST) -> jax.Array:
  """jax.nn.dot_product_attention with v zero-padded to J (it wants one head dim) -> [B, S, H, V].

  mask None is plain causal attention, passed as is_causal so cuDNN skips the masked half;
  a mask goes to cuDNN as an explicit [B, 1, S, T] mask.
  """
  width = max(q_BSHJ.shape[-1], v_BTHV.shape[-1])
  q, k, v = (_pad_last(a, width) for a in (q_BSHJ, k_BTHJ, v_BTHV))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask_B1ST, scale=scale, is_causal=mask_B1ST is None,
                                     implementation=sdpa_implementation(q.dtype, width))
  return out[..., :v_BTHV.shape[-1]]


def splash_block(length: int) -> int:
  """Splash tile along S (length a multiple of SEQ_BLOCK): 512 as MaxText's TPU default, else what divides."""
  return next(b for b in (512, 256, SEQ_BLOCK) if length % b == 0)


def splash(q_BSHJ, k_BTHJ, v_BTHV, segment_ids_BS, *, scale: float, interpret: bool) -> jax.Array:
  """One device's causal splash attention (TPU Mosaic kernels, or interpreted) -> [B, S, H, V]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, s, h, _ = q_BSHJ.shape
  length = -(-s // SEQ_BLOCK) * SEQ_BLOCK
  blk = splash_block(length)
  sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  # The kernel takes no scale: it goes on q. One causal mask per head (splash's mask info is per head).
  kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.CausalMask((length, length))] * h), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  to_heads = lambda a: _pad_seq(a, length).transpose(0, 2, 1, 3)  # noqa: E731  [B, H, S, .]
  q, k, v = to_heads(q_BSHJ * jnp.asarray(scale, q_BSHJ.dtype)), to_heads(k_BTHJ), to_heads(v_BTHV)
  if segment_ids_BS is None:
    out = jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
  else:
    seg = _pad_seq(segment_ids_BS.astype(jnp.int32), length, PAD_SEGMENT)
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=sa.SegmentIds(ids, ids)))(q, k, v, seg)
  return out.transpose(0, 2, 1, 3)[:, :s]


def pallas_gpu(q_BSHJ, k_BTHJ, v_BTHV, segment_ids_BS, *, scale: float, interpret: bool) -> jax.Array:
  """One device's causal Pallas (Triton) flash attention, head dims padded to max(J, V) -> [B, S, H, V]."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  s = q_BSHJ.shape[1]
  width = max(q_BSHJ.shape[-1], v_BTHV.shape[-1])
  length = -(-s // SEQ_BLOCK) * SEQ_BLOCK
  # Forward tiles of 64 above a head of 128 (the kernel rounds 192 up to 256): q, k and v tiles of
  # 128 x 256 would not fit shared memory twice over (num_stages=2). Not timed (no GPU here).
  fwd = 64 if width > 128 else 128
  sizes = gpu_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                                   block_kv_dq=32)
  q, k, v = (_pad_seq(_pad_last(a, width), length) for a in (q_BSHJ, k_BTHJ, v_BTHV))
  seg = None if segment_ids_BS is None else _pad_seq(segment_ids_BS.astype(jnp.int32), length, PAD_SEGMENT)
  out = gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :s, :, :v_BTHV.shape[-1]]


def over_mesh(kernel, q_BSHJ, k_BTHJ, v_BTHV, segment_ids_BS):
  """kernel(q, k, v, segment_ids) per device inside jax.shard_map over the mesh in context.

  Batch goes on the rules' batch axes and heads on their heads axes (an axis that does not
  divide B or H is left out: those devices repeat the work); S stays whole. No mesh, or a
  one-device one: the kernel runs as it is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q_BSHJ, k_BTHJ, v_BTHV, segment_ids_BS)
  rules = nn.get_logical_axis_rules() or sharding.DEFAULT_RULES
  free = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
  batch_spec, _, heads_spec = nn.logical_to_mesh_axes(("batch", "length", "heads"), rules)

  def fitting(entry, n):
    axes = []
    for a in sharding.spec_axes(entry):
      if a in free and n % (math.prod(mesh.shape[x] for x in axes) * mesh.shape[a]) == 0:
        axes.append(a)
    return tuple(axes) or None

  bt, hd = fitting(batch_spec, q_BSHJ.shape[0]), fitting(heads_spec, q_BSHJ.shape[2])
  spec = P(bt, None, hd, None)
  if segment_ids_BS is None:
    return jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(q_BSHJ, k_BTHJ, v_BTHV)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3 + (P(bt, None),), out_specs=spec,
                       check_vma=False)(q_BSHJ, k_BTHJ, v_BTHV, segment_ids_BS)
