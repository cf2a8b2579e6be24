"""Grouped matmul for rows sorted by group: rows [start_e, start_e + sizes[e]) use w[e].

One contract, `grouped_matmul(x_MD, w_EDF, sizes_E) -> [M, F]` (rows past sum(sizes) give
zeros, as jax.lax.ragged_dot), two implementations:
  ragged_dot  XLA's grouped GEMM. TPU and GPU lower it to a grouped kernel; the CPU backend
              lowers it to a dense masked product ([M, E*D] x [E*D, F]): E times the FLOPs
              and an [M, E, D] intermediate, which is what fine-grained MoE cannot afford.
  tiled       a loop over the tiles actually in use (sum_e ceil(sizes[e] / tile), a dynamic
              count), one [tile, D] x [D, F] matmul per tile on its group's weights, in place.
              The backward pass is the same loop on transposed weights (input gradient) and a
              per-tile x^T dy accumulated into its group (weight gradient), via custom_vjp,
              because reverse-mode cannot differentiate a loop with a dynamic trip count.
              Waste: under one tile of padding rows per group; nothing of size E x M.
'auto' picks tiled on CPU and ragged_dot on GPU/TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def choose(impl: str) -> str:
  if impl == "auto":
    return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if impl not in ("tiled", "ragged_dot"):
    raise ValueError(f"grouped matmul: unknown implementation {impl!r}; use auto, tiled or ragged_dot")
  return impl


def tile_size(num_rows: int, num_groups: int) -> int:
  """About half the mean group size, a power of two in [16, 128]: padding < ~half a tile per group."""
  half_mean = max(num_rows // max(num_groups, 1) // 2, 1)
  t = 16
  while t * 2 <= half_mean and t < 128:
    t *= 2
  return t


def _tile(i, sizes_E, tile):
  """Tile i (in group order) -> (group, first row, rows of it that belong to the group)."""
  per_group = -(-sizes_E // tile)
  tile_ends = jnp.cumsum(per_group)
  g = jnp.minimum(jnp.searchsorted(tile_ends, i, side="right"), sizes_E.shape[0] - 1)
  j = i - (tile_ends[g] - per_group[g])
  first = (jnp.cumsum(sizes_E) - sizes_E)[g] + j * tile
  return g, first, sizes_E[g] - j * tile


def _num_tiles(sizes_E, tile):
  return jnp.sum(-(-sizes_E // tile))


def _gmm_loop(x_MD, w_EDF, sizes_E, tile):
  m, d = x_MD.shape
  out_dtype = jnp.result_type(x_MD.dtype, w_EDF.dtype)
  xp = jnp.concatenate([x_MD, jnp.zeros((tile, d), x_MD.dtype)])  # slices never clamp

  def body(i, yp):
    g, first, valid = _tile(i, sizes_E, tile)
    xs = jax.lax.dynamic_slice_in_dim(xp, first, tile)
    ys = (xs @ jax.lax.dynamic_index_in_dim(w_EDF, g, keepdims=False)).astype(out_dtype)
    keep = (jnp.arange(tile) < valid)[:, None]  # rows past the group belong to the next one
    ys = jnp.where(keep, ys, jax.lax.dynamic_slice_in_dim(yp, first, tile))
    return jax.lax.dynamic_update_slice_in_dim(yp, ys, first, 0)

  yp = jax.lax.fori_loop(0, _num_tiles(sizes_E, tile), body, jnp.zeros((m + tile, w_EDF.shape[-1]), out_dtype))
  return yp[:m]


def _tgmm_loop(x_MD, dy_MF, sizes_E, tile, num_groups, w_dtype):
  """Per-group x^T dy -> [E, D, F]."""
  d, f = x_MD.shape[1], dy_MF.shape[1]
  xp = jnp.concatenate([x_MD, jnp.zeros((tile, d), x_MD.dtype)])
  dyp = jnp.concatenate([dy_MF, jnp.zeros((tile, f), dy_MF.dtype)])

  def body(i, dw):
    g, first, valid = _tile(i, sizes_E, tile)
    keep = (jnp.arange(tile) < valid)[:, None]
    xs = jnp.where(keep, jax.lax.dynamic_slice_in_dim(xp, first, tile), 0)
    contrib = jnp.einsum("td,tf->df", xs, jax.lax.dynamic_slice_in_dim(dyp, first, tile),
                         preferred_element_type=jnp.float32)
    cur = jax.lax.dynamic_index_in_dim(dw, g, keepdims=True)
    return jax.lax.dynamic_update_index_in_dim(dw, cur + contrib[None], g, 0)

  dw = jax.lax.fori_loop(0, _num_tiles(sizes_E, tile), body, jnp.zeros((num_groups, d, f), jnp.float32))
  return dw.astype(w_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_tiled(x_MD, w_EDF, sizes_E, tile):
  return _gmm_loop(x_MD, w_EDF, sizes_E, tile)


def _gmm_tiled_fwd(x_MD, w_EDF, sizes_E, tile):
  return _gmm_loop(x_MD, w_EDF, sizes_E, tile), (x_MD, w_EDF, sizes_E)


def _gmm_tiled_bwd(tile, residuals, dy_MF):
  x_MD, w_EDF, sizes_E = residuals
  dx = _gmm_loop(dy_MF, jnp.swapaxes(w_EDF, 1, 2), sizes_E, tile).astype(x_MD.dtype)
  dw = _tgmm_loop(x_MD, dy_MF, sizes_E, tile, w_EDF.shape[0], w_EDF.dtype)
  return dx, dw, None


_gmm_tiled.defvjp(_gmm_tiled_fwd, _gmm_tiled_bwd)


def grouped_matmul(x_MD, w_EDF, sizes_E, impl: str = "auto", tile: int | None = None):
  """[M, D] rows sorted by group x [E, D, F] -> [M, F]; sizes_E int32 rows per group."""
  if choose(impl) == "ragged_dot":
    return jax.lax.ragged_dot(x_MD, w_EDF, sizes_E)
  return _gmm_tiled(x_MD, w_EDF, sizes_E.astype(jnp.int32), tile or tile_size(x_MD.shape[0], w_EDF.shape[0]))


def grouped_swiglu(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, impl: str = "auto"):
  """down(silu(x @ gate) * (x @ up)) per group, rows sorted by group."""
  h = jax.nn.silu(grouped_matmul(x_MD, gate_EDF, sizes_E, impl)) * grouped_matmul(x_MD, up_EDF, sizes_E, impl)
  return grouped_matmul(h, down_EFD, sizes_E, impl)
