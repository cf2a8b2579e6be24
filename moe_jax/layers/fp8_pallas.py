"""DeepSeek-V3 FP8 GEMMs as one fused Pallas kernel: the tile scales applied inside the K loop.

layers/fp8.py's XLA form writes the per-128 partial products [K/128, M, N] in fp32 and then
scales and sums them: K/128 times the output in memory traffic, which made the FP8 training
step slower than bf16 on an H100. This kernel (DeepGEMM's scheme) keeps one fp32 accumulator
tile in registers and, per 128-wide block kb of the contraction,
  acc[m, n] += (qa[m, kb-th 128] . qb[kb-th 128, n]) * sa[m, kb] * sb[kb, n],
one e4m3 x e4m3 -> fp32 tensor-core dot per block, then the scales: DeepSeek's promotion to
fp32 every 128 products, fused. Equal to fp8.py's XLA form up to fp32 summation order.

One general form serves the three matmuls of a linear y = x w (fp8.py's module docstring):
  a [M, K] e4m3 with sa [M, K/128]: per row, per 128 of K (1x128 tiles along the contraction);
  b e4m3, sb [K/128, N] per column or [K/128, N/128] per 128x128 block (expanded here);
    forward      a = x  (1x128 tiles),  b = w   (sb: its 128x128 blocks)
    input grad   a = dy (1x128 tiles),  b = w^T (sb: the same blocks, transposed)
    weight grad  a = x^T (128x1 tiles of x: per channel, 128 tokens), b = dy (sb: 128x1 tiles,
                 per column, 128 tokens per tile): the contraction runs over tokens.
b is given as [K, N], or with rhs_transposed as [N, K] (its transpose as stored). FP8 wgmma on
Hopper reads both operands K-major (contraction dim contiguous), as DeepGEMM and cuBLAS FP8
require: fp8.py passes every b that way round, which for w^T (input grad) and dy (weight grad,
quantized from dy^T) is how they are already stored; the forward transposes w, a copy XLA
can fuse into the on-the-fly quantization of the master weights.

Grouped (routed experts, rows sorted by group, layers/gmm.py's contract): DeepGEMM's
"contiguous layout". The wrapper moves each group's rows to start at a multiple of BLOCK_M
(zero rows between), so every row block belongs to one group; a per-block group id array
goes to the kernel, which reads the weights as a whole-array ref and indexes that group's
[128, BLOCK_N] tiles itself (Pallas on Triton has no scalar prefetch for a data-dependent
BlockSpec). Blocks past the last group skip their work and their store; rows move back after.
Grouped weight grad (per group x_g^T dy_g): its own kernel, not the dense one looped over
groups (group sizes are data, shapes must be static). fp8.py lays tokens out so that each
group starts at a multiple of 128 (its 128-token scale tiles never straddle two groups); a
program per (group, row block, column block) then runs the K loop over that group's token
tiles only: the dense kernel's loop with dynamic bounds, each token contracted once.

Dims that are not multiples of the blocks are zero-padded (zeros change no tile's amax and
add nothing to a dot, fp8.py). Leading batch dims (fp8.einsum's batch letters) are vmapped,
which adds grid axes. `interpret=True` runs the kernels in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 128  # K block: the scale granularity (fp8.BLOCK), fixed
# Output tile per program. 64 rows is one Hopper warpgroup's wgmma M (64 x 128 fp32 accumulator:
# 64 registers a thread at 4 warps), and it bounds the grouped layout's padding to < 64 rows a
# group (DeepSeek-V3: ~128 rows a group at 4096 tokens x top-8 / 256 experts; 128-row blocks
# would pad ~40%). 128 columns: one weight block, so one weight scale per program and K block.
BLOCK_M = 64
BLOCK_N = 128
NUM_WARPS = 4  # one warpgroup for a 64-row tile
NUM_STAGES = 4  # software pipeline depth of the K loop: 4 x (64 + 128) x 128 B = 96 KB shared memory
F32 = jnp.float32


def _cdiv(a, b):
  return -(-a // b)


def _pad(x, sizes):
  """Zero-pads each axis of x at its end up to sizes (None: unchanged)."""
  pads = [(0, 0 if s is None else s - d) for d, s in zip(x.shape, sizes)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _column_scales(sb, n: int):
  """sb [..., Kb, N] per column, or [..., Kb, ceil(N/128)] per 128x128 block -> per column [..., Kb, N].

  The two shapes coincide only when N = 1, where a block is a column."""
  if sb.shape[-1] == n:
    return sb
  if sb.shape[-1] != _cdiv(n, BLOCK):
    raise ValueError(f"fp8 kernel: rhs scales {sb.shape} are neither per column nor per 128 columns of N={n}")
  return jnp.repeat(sb, BLOCK, -1)[..., :n]


def _compiler_params():
  return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _per_device(fn, *args, interpret: bool):
  # Inside jax.shard_map (the 'ep' dispatch) a pallas_call needs gmm_pallas's typing shim.
  from moe_jax.layers import gmm_pallas
  return gmm_pallas._per_device(fn, *args, interpret=interpret)


# --- the K loop ---------------------------------------------------------------------------
def _k_loop(load, lo, hi, shape, rhs_transposed: bool):
  """sum over K blocks lo <= k < hi of (a_k . b_k) * sa_k[:, None] * sb_k[None, :] in fp32.

  load(k) -> (a_k [bm, 128], b_k [128, bn] or [bn, 128], sa_k [bm], sb_k [bn])."""
  dims = (((1,), (1,)), ((), ())) if rhs_transposed else (((1,), (0,)), ((), ()))

  def body(k, acc):
    a, b, sa, sb = load(k)
    p = jax.lax.dot_general(a, b, dims, preferred_element_type=F32)
    return acc + p * sa[:, None] * sb[None, :]

  return jax.lax.fori_loop(lo, hi, body, jnp.zeros(shape, F32))


def _ks(k):
  return pl.ds(pl.multiple_of(k * BLOCK, BLOCK), BLOCK)


def _dense_kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, *, rhs_transposed: bool):
  """One [bm, bn] output tile; a_ref [bm, Kp], sa_ref [Kb, bm], b_ref [Kp, bn] | [bn, Kp], sb_ref [Kb, bn]."""
  def load(k):
    b = b_ref[:, _ks(k)] if rhs_transposed else b_ref[_ks(k), :]
    return a_ref[:, _ks(k)], b, sa_ref[k, :], sb_ref[k, :]

  o_ref[...] = _k_loop(load, 0, sa_ref.shape[0], o_ref.shape, rhs_transposed).astype(o_ref.dtype)


def _b_spec(kp: int, bn: int, rhs_transposed: bool, lead=()):
  """b's block: all of K for one column block, index maps over the grid (*lead, i, j)."""
  if rhs_transposed:
    return pl.BlockSpec((bn, kp), lambda *ij: (ij[-1], 0))
  return pl.BlockSpec((kp, bn), lambda *ij: (0, ij[-1]))


def _prepare(qa, sa, qb, sb, rhs_transposed: bool, bm: int, bn: int):
  """Pads to whole blocks: -> (a [Mp, Kp], sa^T [Kb, Mp], b [Kp, Np] | [Np, Kp], sb [Kb, Np]), (m, n)."""
  (m, ka), kb_ = qa.shape, (qb.shape[1] if rhs_transposed else qb.shape[0])
  n = qb.shape[0] if rhs_transposed else qb.shape[1]
  kp = _cdiv(max(ka, kb_), BLOCK) * BLOCK
  mp, np_ = _cdiv(m, bm) * bm, _cdiv(n, bn) * bn
  a = _pad(qa, (mp, kp))
  sa_t = _pad(sa.astype(F32), (mp, kp // BLOCK)).T  # [Kb, Mp]: a K block's row scales are contiguous
  b = _pad(qb, (np_, kp) if rhs_transposed else (kp, np_))
  sb = _pad(_column_scales(sb.astype(F32), n), (kp // BLOCK, np_))
  return (a, sa_t, b, sb), (m, n)


def _dense_2d(qa, sa, qb, sb, out_dtype, rhs_transposed, bm, bn, interpret):
  (a, sa_t, b, sb), (m, n) = _prepare(qa, sa, qb, sb, rhs_transposed, bm, bn)
  (mp, kp), np_ = a.shape, sb.shape[1]
  kb = kp // BLOCK
  call = pl.pallas_call(
      functools.partial(_dense_kernel, rhs_transposed=rhs_transposed),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // bm, np_ // bn),
      in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kb, bm), lambda i, j: (0, i)),
                _b_spec(kp, bn, rhs_transposed), pl.BlockSpec((kb, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=_compiler_params(), interpret=interpret, name="fp8_blocked_matmul")
  return call(a, sa_t, b, sb)[:m, :n]


def blocked_matmul(qa_MK, sa_MKb, qb_KN, sb_KbN, *, out_dtype=F32, rhs_transposed: bool = False,
                   block_m: int = BLOCK_M, block_n: int = BLOCK_N, interpret: bool = False):
  """sum_kb sa[m, kb] sb[kb, n] (qa[m, kb-th 128] . qb[kb-th 128, n]) -> [..., M, N] out_dtype.

  qa [..., M, K] e4m3, sa [..., M, ceil(K/128)] fp32; qb [..., K, N] e4m3 ([..., N, K] with
  rhs_transposed), sb [..., ceil(K/128), N] per column or [..., ceil(K/128), ceil(N/128)] per
  block. Leading dims (the same on all four) are batch. Accumulates in fp32.
  """
  fn = functools.partial(_dense_2d, out_dtype=out_dtype, rhs_transposed=rhs_transposed, bm=block_m, bn=block_n,
                         interpret=interpret)
  for _ in range(qa_MK.ndim - 2):
    fn = jax.vmap(fn)
  return _per_device(fn, qa_MK, sa_MKb, qb_KN, sb_KbN, interpret=interpret)


# --- grouped: rows sorted by group, [M, K] x [G, K, N] ----------------------------------------
def _grouped_kernel(gid_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref, *, rhs_transposed: bool, num_groups: int):
  """One [bm, bn] tile of the rows of group gid[i]; b_ref [G, Kp, Np] | [G, Np, Kp] and sb_ref [G, Kb, Np] whole."""
  g = gid_ref[pl.program_id(0)]
  cols = pl.ds(pl.multiple_of(pl.program_id(1) * o_ref.shape[1], o_ref.shape[1]), o_ref.shape[1])

  @pl.when(g < num_groups)  # blocks past the last group: no work and no store (the wrapper never reads them)
  def _():
    def load(k):
      b = b_ref[g, cols, _ks(k)] if rhs_transposed else b_ref[g, _ks(k), cols]
      return a_ref[:, _ks(k)], b, sa_ref[k, :], sb_ref[g, k, cols]

    o_ref[...] = _k_loop(load, 0, sa_ref.shape[0], o_ref.shape, rhs_transposed).astype(o_ref.dtype)


def aligned_rows(sizes_G, num_rows: int, align: int):
  """DeepGEMM's contiguous layout: every group starts at a multiple of `align`.

  -> (pos [M]: each row's place (num_tiles * align for rows past the groups), tile_group
  [num_tiles]: the group of each aligned tile (G past the last group), num_tiles static).
  num_tiles bounds sum_g ceil(sizes_g / align) for any sizes summing to at most num_rows.
  """
  g = sizes_G.shape[0]
  num_tiles = _cdiv(num_rows + g * (align - 1), align)
  ends = jnp.cumsum(sizes_G)
  aligned = _cdiv(sizes_G, align) * align
  aligned_ends = jnp.cumsum(aligned)
  rows = jnp.arange(num_rows, dtype=ends.dtype)
  gid = jnp.searchsorted(ends, rows, side="right")
  gc = jnp.minimum(gid, g - 1)
  pos = (aligned_ends - aligned)[gc] + rows - (ends - sizes_G)[gc]
  pos = jnp.where(gid < g, pos, num_tiles * align)
  tile_group = jnp.searchsorted(aligned_ends, jnp.arange(num_tiles, dtype=ends.dtype) * align, side="right")
  return pos, tile_group.astype(jnp.int32), num_tiles


def _grouped_2d(qa, sa, qb, sb, sizes, out_dtype, rhs_transposed, bm, bn, interpret):
  (m, ka), g = qa.shape, qb.shape[0]
  n = qb.shape[1] if rhs_transposed else qb.shape[2]
  kp = _cdiv(max(ka, qb.shape[2] if rhs_transposed else qb.shape[1]), BLOCK) * BLOCK
  kb, np_ = kp // BLOCK, _cdiv(n, bn) * bn
  pos, tile_group, tiles = aligned_rows(sizes, m, bm)
  a = jnp.zeros((tiles * bm, kp), qa.dtype).at[pos].set(_pad(qa, (None, kp)), mode="drop")
  sa_t = jnp.zeros((tiles * bm, kb), F32).at[pos].set(_pad(sa.astype(F32), (None, kb)), mode="drop").T
  b = _pad(qb, (None, np_, kp) if rhs_transposed else (None, kp, np_))
  sb = _pad(_column_scales(sb.astype(F32), n), (None, kb, np_))
  whole = pl.BlockSpec()  # the kernel indexes the group's tiles itself
  call = pl.pallas_call(
      functools.partial(_grouped_kernel, rhs_transposed=rhs_transposed, num_groups=g),
      out_shape=jax.ShapeDtypeStruct((tiles * bm, np_), out_dtype),
      grid=(tiles, np_ // bn),
      in_specs=[whole, pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kb, bm), lambda i, j: (0, i)),
                whole, whole],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=_compiler_params(), interpret=interpret, name="fp8_grouped_matmul")
  y = call(tile_group, a, sa_t, b, sb)
  return jnp.take(y, pos, axis=0, mode="fill", fill_value=0)[:, :n]  # rows past the groups: zeros


def grouped_matmul(qa_MK, sa_MKb, qb_GKN, sb_GKbN, sizes_G, *, out_dtype=F32, rhs_transposed: bool = False,
                   block_m: int = BLOCK_M, block_n: int = BLOCK_N, interpret: bool = False):
  """Rows sorted by group: rows of group g times (qb[g], sb[g]) as blocked_matmul -> [M, N] out_dtype.

  qa [M, K] e4m3, sa [M, ceil(K/128)]; qb [G, K, N] ([G, N, K] with rhs_transposed), sb
  [G, ceil(K/128), N or ceil(N/128)]; sizes_G int32, rows past sum(sizes) give zeros.
  """
  fn = functools.partial(_grouped_2d, out_dtype=out_dtype, rhs_transposed=rhs_transposed, bm=block_m, bn=block_n,
                         interpret=interpret)
  return _per_device(fn, qa_MK, sa_MKb, qb_GKN, sb_GKbN, sizes_G.astype(jnp.int32), interpret=interpret)


def _segment_kernel(start_ref, count_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref):
  """Tile (i, j) of group g's product over its K blocks [start[g], start[g] + count[g]); b is [N, K]."""
  g = pl.program_id(0)
  lo = start_ref[g]

  def load(k):
    return a_ref[:, _ks(k)], b_ref[:, _ks(k)], sa_ref[k, :], sb_ref[k, :]

  o_ref[...] = _k_loop(load, lo, lo + count_ref[g], o_ref.shape, True).astype(o_ref.dtype)


def grouped_weight_grad(qx_KT, sx_KTb, qg_NT, sg_NTb, tiles_G, *, out_dtype=F32, block_m: int = BLOCK_M,
                        block_n: int = BLOCK_N, interpret: bool = False):
  """Per group x_g^T dy_g -> [G, K, N] out_dtype, tokens in fp8.py's 128-aligned grouped layout.

  qx [K, T] e4m3 (x^T), sx [K, T/128]: x in 128x1 tiles; qg [N, T] (dy^T), sg [N, T/128]. T is a
  multiple of 128 and group g owns token tiles [sum(tiles[:g]), sum(tiles[:g+1])) (no tile
  holds two groups; tokens in no group are zeros); empty groups give zeros.
  """
  def fn(qx, sx, qg, sg, tiles):
    k, n, g = qx.shape[0], qg.shape[0], tiles.shape[0]
    (a, sa_t, b, sb), _ = _prepare(qx, sx, qg, sg.T, True, block_m, block_n)
    (kp, tp), np_ = a.shape, sb.shape[1]
    starts = (jnp.cumsum(tiles) - tiles).astype(jnp.int32)
    whole = pl.BlockSpec()
    call = pl.pallas_call(
        _segment_kernel,
        out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        grid=(g, kp // block_m, np_ // block_n),
        in_specs=[whole, whole, pl.BlockSpec((block_m, tp), lambda e, i, j: (i, 0)),
                  pl.BlockSpec((tp // BLOCK, block_m), lambda e, i, j: (0, i)),
                  pl.BlockSpec((block_n, tp), lambda e, i, j: (j, 0)),
                  pl.BlockSpec((tp // BLOCK, block_n), lambda e, i, j: (0, j))],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda e, i, j: (e, i, j)),
        compiler_params=_compiler_params(), interpret=interpret, name="fp8_grouped_weight_grad")
    return call(starts, tiles.astype(jnp.int32), a, sa_t, b, sb)[:, :k, :n]

  return _per_device(fn, qx_KT, sx_KTb, qg_NT, sg_NTb, tiles_G.astype(jnp.int32), interpret=interpret)
