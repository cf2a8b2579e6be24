"""Grouped matmul for rows sorted by group: rows [start_e, start_e + sizes[e]) use w[e].

One contract, `grouped_matmul(x_MD, w_EDF, sizes_E) -> [M, F]` (rows past sum(sizes) give
zeros, as jax.lax.ragged_dot), two implementations:
  ragged_dot  XLA's grouped GEMM. TPU and GPU lower it to a grouped kernel; the CPU backend
              lowers it to a dense masked product ([M, E*D] x [E*D, F]): E times the FLOPs
              and an [M, E, D] intermediate, which is what fine-grained MoE cannot afford.
  tiled       loops over the tiles actually in use, one [tile, D] x [D, F] matmul per tile on
              its group's weights, written in place. Tiles come in sizes bulk, bulk/2, ..., 16:
              a group of s rows takes s // bulk bulk tiles and one tail tile, the smallest
              size >= the remainder, so a group wastes about a quarter of its tail tile on
              average (bulk tiles alone waste half a bulk tile). One loop per tile size, each
              over a dynamic count; the tile -> (group, start row) table is computed up front,
              and a tile never reads past the last row (it starts earlier and masks), so
              nothing is padded.
              The backward pass is the same loops on transposed weights (input gradient) and
              per-tile x^T dy accumulated into its group (weight gradient), via custom_vjp,
              because reverse-mode cannot differentiate a loop with a dynamic trip count.
  pallas      the Pallas grouped-matmul kernels that ship with JAX (layers/gmm_pallas.py): Mosaic
              GPU on Hopper, megablox on TPU; they also run inside jax.shard_map.
`grouped_swiglu` runs down(silu(x @ gate) * (x @ up)) as one pass of these loops (the three
matmuls of a tile back to back, one set of loops forward and one backward) instead of three.
'auto' follows moe_jax.target (the mesh in context, so a TPU compile from a CPU host counts as
TPU): tiled on CPU; pallas on TPU (bf16/f32), where XLA lowers ragged_dot's weight gradient to
masked dense [E, rows, ...] products (BENCHMARKS.md, "Grouped matmul on the mesh"); pallas on a
Hopper GPU when the shapes fit its blocks (measured faster than ragged_dot there); else ragged_dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax import target
from moe_jax.config import MOE_GMMS as IMPLS
from moe_jax.layers import gmm_pallas, matmul

MIN_TILE = 16


def choose(impl: str, x_MD=None, w_EDF=None) -> str:
  """The implementation 'auto' means here (for these operands, when given)."""
  if impl not in IMPLS:
    raise ValueError(f"grouped matmul: unknown implementation {impl!r}; use one of {IMPLS}")
  if impl != "auto":
    return impl
  tgt = target.current()
  if tgt.platform == "cpu":
    return "tiled"
  kind = gmm_pallas.backend(tgt)
  if kind == "megablox" and (x_MD is None or {x_MD.dtype, w_EDF.dtype} <= {jnp.dtype(jnp.bfloat16),
                                                                          jnp.dtype(jnp.float32)}):
    return "pallas"
  if kind == "mgpu" and x_MD is not None and gmm_pallas.check(x_MD, w_EDF) is None:
    return "pallas"
  return "ragged_dot"


def tile_size(num_rows: int, num_groups: int) -> int:
  """Bulk tile: the largest power of two <= the mean group size, in [16, 256]. Bigger tiles mean
  fewer loop steps and weight-gradient updates (measured on CPU: 256-row tiles beat 128 when
  groups average 256 rows, E=16 D=256 F=128); tails keep the padding small."""
  mean = max(num_rows // max(num_groups, 1), 1)
  t = MIN_TILE
  while t * 2 <= mean and t < 256:
    t *= 2
  return t


def _levels(bulk: int) -> tuple[int, ...]:
  sizes = [bulk]
  while sizes[-1] // 2 >= MIN_TILE:
    sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def _schedule(sizes_E, num_rows: int, bulk: int):
  """[(tile, count, group [n], start row [n], lo [n], hi [n])] per tile size: rows lo <= r < hi
  of the `tile` rows from `start` are the tile's. A tile that would run past the last row
  starts earlier instead (start = num_rows - tile, lo > 0), so slices never clamp and no
  array needs padding rows (num_rows >= bulk; grouped_matmul pads when it is smaller).

  n is a static bound (num_rows // tile + E for bulk tiles, E for tail tiles); the loops run
  `count` (dynamic) of them, in group order within each size.
  """
  e = sizes_E.shape[0]
  starts = jnp.cumsum(sizes_E) - sizes_E
  full = sizes_E // bulk
  rest = sizes_E - full * bulk
  tail = jnp.zeros_like(sizes_E)
  for t in reversed(_levels(bulk)):  # the smallest size that holds the remainder
    tail = jnp.where((rest > 0) & (rest <= t) & (tail == 0), t, tail)
  out = []
  for t in _levels(bulk):
    if t == bulk:
      per_group, offset, bound = full + (tail == t), jnp.zeros_like(full), num_rows // t + e
    else:
      per_group, offset, bound = (tail == t).astype(full.dtype), full * bulk, e
    ends = jnp.cumsum(per_group)
    i = jnp.arange(bound, dtype=ends.dtype)
    g = jnp.minimum(jnp.searchsorted(ends, i, side="right"), e - 1).astype(jnp.int32)
    j = i - (ends[g] - per_group[g])
    first = starts[g] + offset[g] + j * t
    start = jnp.minimum(first, num_rows - t)
    lo = first - start
    out.append((t, ends[-1], g, start, lo, lo + sizes_E[g] - offset[g] - j * t))
  return out


def _zeros_varying_like(shape, dtype, *arrays):
  """Zeros that vary over the shard_map axes `arrays` vary over (a loop carry must match its body's type)."""
  return jnp.zeros_like(_varying_scalar(dtype, *arrays), shape=shape)


def _varying_scalar(dtype, *arrays):
  """A zero scalar of the union of the arrays' shard_map types. Only tracers vary: an eager
  array's zeros_like(shape=()) would keep its n-d sharding on a 0-d result (IndexError in jax)."""
  traced = [a for a in arrays if isinstance(a, jax.core.Tracer)]
  return sum((jnp.zeros_like(a, shape=(), dtype=dtype) for a in traced), jnp.zeros((), dtype))


def _put(buf, rows, start, keep):
  """Writes the kept rows of a tile at `start`; the others belong to neighbouring groups."""
  old = jax.lax.dynamic_slice_in_dim(buf, start, rows.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, rows.astype(buf.dtype), old), start, 0)


def _tile_loops(sizes_E, num_rows: int, bulk: int, body, carry):
  """Runs body(tile, group, start, keep [tile, 1], carry) -> carry over every tile in use."""
  for t, count, g, start, lo, hi in _schedule(sizes_E, num_rows, bulk):
    def step(i, c, t=t, g=g, start=start, lo=lo, hi=hi):
      r = jnp.arange(t)
      return body(t, g[i], start[i], ((r >= lo[i]) & (r < hi[i]))[:, None], c)
    carry = jax.lax.fori_loop(0, count, step, carry)
  return carry


def _fit(bulk: int, *arrays):
  """Zero rows appended up to `bulk` rows (only when there are fewer), so every tile fits."""
  m = arrays[0].shape[0]
  if m >= bulk:
    return arrays
  return tuple(jnp.concatenate([a, jnp.zeros((bulk - m, *a.shape[1:]), a.dtype)]) for a in arrays)


def _gmm_loop(x_MD, w_EDF, sizes_E, bulk, op):
  m = x_MD.shape[0]
  out_dtype = jnp.result_type(x_MD.dtype, w_EDF.dtype)
  (xp,), w_EDF = _fit(bulk, x_MD.astype(op)), w_EDF.astype(op)

  def body(t, g, start, keep, yp):
    return _put(yp, matmul.dot(jax.lax.dynamic_slice_in_dim(xp, start, t), w_EDF[g], op), start, keep)

  yp0 = _zeros_varying_like((xp.shape[0], w_EDF.shape[-1]), out_dtype, x_MD, w_EDF, sizes_E)
  return _tile_loops(sizes_E, xp.shape[0], bulk, body, yp0)[:m]


def _tgmm_loop(x_MD, dy_MF, sizes_E, bulk, num_groups, w_dtype, op):
  """Per-group x^T dy -> [E, D, F]."""
  xp, dyp = _fit(bulk, x_MD.astype(op), dy_MF.astype(op))
  xp_T = matmul.transposed(xp, (1, 0))  # [D, Mp]: a tile's columns are the lhs of x^T dy (module doc)

  def body(t, g, start, keep, dw):
    xs_T = jnp.where(keep.T, jax.lax.dynamic_slice_in_dim(xp_T, start, t, axis=1), 0)
    return dw.at[g].add(matmul.dot(xs_T, jax.lax.dynamic_slice_in_dim(dyp, start, t), op))

  dw0 = _zeros_varying_like((num_groups, x_MD.shape[1], dy_MF.shape[1]), jnp.float32, x_MD, dy_MF, sizes_E)
  return _tile_loops(sizes_E, xp.shape[0], bulk, body, dw0).astype(w_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_tiled(x_MD, w_EDF, sizes_E, bulk, op):
  return _gmm_loop(x_MD, w_EDF, sizes_E, bulk, op)


def _gmm_tiled_fwd(x_MD, w_EDF, sizes_E, bulk, op):
  return _gmm_loop(x_MD, w_EDF, sizes_E, bulk, op), (x_MD, w_EDF, sizes_E)


def _gmm_tiled_bwd(bulk, op, residuals, dy_MF):
  x_MD, w_EDF, sizes_E = residuals
  dx = _gmm_loop(dy_MF, matmul.transposed(w_EDF.astype(op), (0, 2, 1)), sizes_E, bulk, op).astype(x_MD.dtype)
  dw = _tgmm_loop(x_MD, dy_MF, sizes_E, bulk, w_EDF.shape[0], w_EDF.dtype, op)
  return dx, dw, None


_gmm_tiled.defvjp(_gmm_tiled_fwd, _gmm_tiled_bwd)


# --- SwiGLU in one pass: per tile [a, b] = x @ [gate, up], y = (silu(a) * b) @ down ----------
# Every matmul in the loops is in the row-major form [t, K] x [K, N] (XLA:CPU's fast bf16 kernels
# take no other, layers/matmul.py): the weights are stacked and transposed once per call, outside
# the loops, and the weight gradients, which contract over a tile's rows, read the tile's columns
# of the transposed activations ([K, t]).
def _swiglu_loop(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, bulk, op, save: bool):
  """-> (y [M, D], the pre-activations [a, b] [M, 2F] when save, for the backward pass).

  Matmul operands in `op` (layers/matmul.py), accumulated in fp32; y and [a, b] in x's dtype."""
  m, d = x_MD.shape
  f = gate_EDF.shape[-1]
  dt = x_MD.dtype
  (xp,) = _fit(bulk, x_MD.astype(op))
  gate_up_ED2F = jnp.concatenate([gate_EDF, up_EDF], -1).astype(op)
  down_EFD = down_EFD.astype(op)
  mp = xp.shape[0]

  def body(t, g, start, keep, carry):
    yp, abp = carry
    ab = matmul.dot(jax.lax.dynamic_slice_in_dim(xp, start, t), gate_up_ED2F[g], op)  # [t, 2F]
    yp = _put(yp, matmul.dot(jax.nn.silu(ab[:, :f]) * ab[:, f:], down_EFD[g], op), start, keep)
    if save:
      abp = _put(abp, ab, start, keep)
    return yp, abp

  zeros = lambda shape: _zeros_varying_like(shape, dt, x_MD, gate_EDF, sizes_E)  # noqa: E731
  carry = (zeros((mp, d)), zeros((mp if save else 0, 2 * f)))
  yp, abp = _tile_loops(sizes_E, mp, bulk, body, carry)
  return yp[:m], abp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _swiglu_tiled(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, bulk, op):
  return _swiglu_loop(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, bulk, op, save=False)[0]


def _swiglu_tiled_fwd(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, bulk, op):
  y, ab = _swiglu_loop(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, bulk, op, save=True)
  return y, (x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, ab)


def _swiglu_tiled_bwd(bulk, op, residuals, dy_MD):
  x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, ab_MF2 = residuals
  m, d = x_MD.shape
  f = gate_EDF.shape[-1]
  dt = x_MD.dtype
  xp, dyp = _fit(bulk, x_MD.astype(op), dy_MD.astype(op))
  xp_T, dyp_T = matmul.transposed(xp, (1, 0)), matmul.transposed(dyp, (1, 0))  # [D, Mp]
  gate_up_E2FD = matmul.transposed(jnp.concatenate([gate_EDF, up_EDF], -1).astype(op), (0, 2, 1))
  down_EDF = matmul.transposed(down_EFD.astype(op), (0, 2, 1))
  abp = ab_MF2  # already _fit's rows (the forward kept them)
  mp = xp.shape[0]

  def body(t, g, start, keep, carry):
    dxp, dgate_up, ddown_T = carry
    cols = lambda a: jax.lax.dynamic_slice_in_dim(a, start, t, axis=1)  # noqa: E731
    dys = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dyp, start, t), 0)  # other groups' rows: no grad
    dys_T = jnp.where(keep.T, cols(dyp_T), 0)
    ab = jax.lax.dynamic_slice_in_dim(abp, start, t).astype(jnp.float32)
    a, b = ab[:, :f], ab[:, f:]
    sig = jax.nn.sigmoid(a)
    h = (a * sig * b).astype(op)
    dh = matmul.dot(dys, down_EDF[g], op)
    # silu'(a) = sig (1 + a (1 - sig))
    dab = jnp.concatenate([dh * b * sig * (1 + a * (1 - sig)), dh * a * sig], -1).astype(op)  # [t, 2F]
    dxp = _put(dxp, matmul.dot(dab, gate_up_E2FD[g], op), start, keep)
    return (dxp, dgate_up.at[g].add(matmul.dot(cols(xp_T), dab, op)),
            ddown_T.at[g].add(matmul.dot(dys_T, h, op)))

  zeros = lambda shape, dtype: _zeros_varying_like(shape, dtype, x_MD, dy_MD, sizes_E)  # noqa: E731
  carry = (zeros((mp, d), dt), zeros((gate_EDF.shape[0], d, 2 * f), jnp.float32),
           zeros((down_EFD.shape[0], d, f), jnp.float32))
  dxp, dgate_up, ddown_T = _tile_loops(sizes_E, mp, bulk, body, carry)
  return (dxp[:m], None, dgate_up[..., :f].astype(gate_EDF.dtype), dgate_up[..., f:].astype(up_EDF.dtype),
          jnp.swapaxes(ddown_T, 1, 2).astype(down_EFD.dtype))


_swiglu_tiled.defvjp(_swiglu_tiled_fwd, _swiglu_tiled_bwd)


def _vary_together(*arrays):
  """Inside jax.shard_map: the arrays vary over the union of axes any of them varies over, so the
  custom_vjp's cotangents match its inputs' types (autodiff then psums dw over the axes w gained)."""
  union = _varying_scalar(jnp.float32, *arrays)
  return tuple(a + jnp.zeros_like(union, dtype=a.dtype) for a in arrays[:-1])


def grouped_matmul(x_MD, w_EDF, sizes_E, impl: str = "auto", tile: int | None = None):
  """[M, D] rows sorted by group x [E, D, F] -> [M, F]; sizes_E int32 rows per group. tile: the bulk tile."""
  impl = choose(impl, x_MD, w_EDF)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_MD, w_EDF, sizes_E)
  x_MD, w_EDF = _vary_together(x_MD, w_EDF, sizes_E)
  if impl == "pallas":
    return gmm_pallas.grouped_matmul(x_MD, w_EDF, sizes_E)
  return _gmm_tiled(x_MD, w_EDF, sizes_E.astype(jnp.int32), tile or tile_size(x_MD.shape[0], w_EDF.shape[0]),
                    matmul.operand_dtype(x_MD.dtype))


def grouped_swiglu(x_MD, sizes_E, gate_EDF, up_EDF, down_EFD, impl: str = "auto", tile: int | None = None):
  """down(silu(x @ gate) * (x @ up)) per group, rows sorted by group: [M, D] -> [M, D]."""
  impl = choose(impl, x_MD, gate_EDF)
  if impl in ("ragged_dot", "pallas"):
    mm = functools.partial(grouped_matmul, sizes_E=sizes_E, impl=impl)
    return mm(jax.nn.silu(mm(x_MD, gate_EDF)) * mm(x_MD, up_EDF), down_EFD)
  x_MD, gate_EDF, up_EDF, down_EFD = _vary_together(x_MD, gate_EDF, up_EDF, down_EFD, sizes_E)
  return _swiglu_tiled(x_MD, sizes_E.astype(jnp.int32), gate_EDF, up_EDF, down_EFD,
                       tile or tile_size(x_MD.shape[0], gate_EDF.shape[0]), matmul.operand_dtype(x_MD.dtype))
