"""DeepSeek-V3 fine-grained FP8: e4m3 matmuls with fp32 tile scales, and the released format.

Scaling (DeepSeek-V3 report, section 3.3): one fp32 scale per 1x128 tile of an activation
or gradient (per row, per 128 elements of the contraction dim) and per 128x128 block of a
weight; scale = amax / 448 (the largest finite e4m3), q = e4m3(x / scale), x ~ q * scale.
A scale per small tile follows the values it covers, so an outlier coarsens only its own
tile (per-tensor scaling pushes every other value towards e4m3's subnormals).

A linear y = x w runs three matmuls, each quantized along its own contraction dim:
  forward      y  = x  w     x: 1x128 tiles along K (per token)     w: 128x128 blocks
  input grad   dx = dy w^T   dy: 1x128 tiles along N (per token)    w^T: the same blocks
                             (square blocks are why the transpose needs no requantization)
  weight grad  dw = x^T dy   x, dy: 128x1 tiles (per channel, 128 tokens per tile)
All in e4m3, gradients included, as DeepSeek-V3. Master weights stay in param_dtype and are
quantized on the fly; the backward pass keeps x in its own dtype (the weight grad quantizes
it along tokens, which the forward's tiles along K cannot give).

Why a blocked contraction: the scales change every 128 elements of the contraction dim,
  y[m, n] = sum_b sx[m, b] * sw[b, n] * (qx[m, b, :] . qw[b, :, n]),
so they cannot be pulled out of one K-long dot (a GEMM takes at most one scale per row and
per column). K is reshaped to [K/128, 128] and the block index becomes a dot_general batch
dim: one GEMM on e4m3 inputs with fp32 output gives the partials [K/128, M, N], which are
multiplied by the outer product of the scales and summed in fp32: DeepSeek's promotion to
fp32 every 128 products (section 3.3.2), written so that XLA can pick an FP8 GEMM on H100
and TPU. Cost: an fp32 intermediate K/128 times the output, which a fused kernel (DeepGEMM)
keeps in registers. (Grouped matmuls loop over the K blocks instead: _ragged_blocked_dot.)
On CPU the FP8 dot is emulated (XLA converts to fp32, where e4m3
products are exact), so there only the numerics count.

Dims that are not multiples of 128 are zero-padded to the next multiple: zeros change no
tile's amax and add nothing to a dot, so a padded edge tile is exactly the released
format's ragged edge block (a scale grid of ceil(dim / 128)).
Tiles follow the data each device holds: with tokens sharded (data parallel, expert
parallel) the weight gradient's 128-token tiles are per device, and with a contraction dim
sharded (tensor parallel) the 1x128 tiles are per shard, as in DeepSeek's own ranks; so
sharded runs agree with one device to FP8 accuracy, not bit for bit.

The released format: weight [out, in] e4m3 with `weight_scale_inv` [ceil(out/128),
ceil(in/128)] fp32, w = q * scale_inv per block (`quantize_blocks` / `dequantize_blocks`).
`Fp8Weight` carries such a pair, in our [in..., out...] layout, into `einsum` and
`ragged_dot`: an FP8 checkpoint used as it is, never dequantized to bf16.

kernel='auto' | 'xla' | 'pallas' (einsum, ragged_dot): the blocked contractions above ('xla'),
or layers/fp8_pallas.py's fused kernel, which keeps the fp32 accumulator in registers and
applies the scales inside its K loop ('pallas'; on a non-GPU target it runs in the Pallas
interpreter, which is how the tests compare the two). 'auto': the kernel on a GPU with FP8
tensor cores (compute capability >= 8.9), else 'xla'. Same quantized operands either way.
The model passes ModelConfig.fp8_kernel ('auto' unless set). On an H200 (BENCHMARKS.md) the
fused kernel ran the bench1b FP8 training step 3.0x faster than the XLA form and its dense GEMMs
2.4-2.6x faster, agreeing with it to 7e-4 (bf16 output rounding).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax import target
from moe_jax.layers import fp8_pallas, gmm

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
_AMAX_FLOOR = 1e-30  # an all-zero tile gets a tiny normal scale (q = 0), never 0 / 0
F32 = jnp.float32
KERNELS = ("auto", "xla", "pallas")
FP8_GPU_KINDS = ("H100", "H200", "H800", "H20", "GH200", "B200", "B100", "GB200", "L40", "L4")  # no cc known


def _cdiv(a, b=BLOCK):
  return -(-a // b)


def _pad_to(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _to_e4m3(x32, scale):
  # x / scale can land a rounding step above 448; e4m3fn has no inf, so clip before the cast.
  return jnp.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


# --- formats ----------------------------------------------------------------------------
def quantize_tiles(x):
  """1x128 tiles along the last axis: x [..., K] -> (q [..., Kp] e4m3, scale [..., Kp/128] fp32).

  Kp is K rounded up to a multiple of 128 (zero padding).
  """
  k = x.shape[-1]
  kp = _cdiv(k) * BLOCK
  t = _pad_to(x.astype(F32), -1, kp).reshape(*x.shape[:-1], kp // BLOCK, BLOCK)
  scale = jnp.maximum(jnp.max(jnp.abs(t), -1), _AMAX_FLOOR) / E4M3_MAX
  return _to_e4m3(t, scale[..., None]).reshape(*x.shape[:-1], kp), scale


def dequantize_tiles(q, scale, k: int | None = None):
  """Inverse of quantize_tiles -> fp32 [..., k] (k defaults to the padded length)."""
  t = q.astype(F32).reshape(*scale.shape, BLOCK) * scale[..., None]
  return t.reshape(q.shape)[..., :k]


def quantize_blocks(w):
  """128x128 blocks over the last two dims: w [..., R, C] -> (q [..., R, C] e4m3, scale [..., Rb, Cb] fp32).

  Rb = ceil(R/128), Cb = ceil(C/128). For a torch-layout weight [out, in], (q, scale) is the
  released DeepSeek-V3 (weight, weight_scale_inv) pair.
  """
  *lead, r, c = w.shape
  rb, cb = _cdiv(r), _cdiv(c)
  t = _pad_to(_pad_to(w.astype(F32), -2, rb * BLOCK), -1, cb * BLOCK).reshape(*lead, rb, BLOCK, cb, BLOCK)
  scale = jnp.maximum(jnp.max(jnp.abs(t), (-3, -1)), _AMAX_FLOOR) / E4M3_MAX
  q = _to_e4m3(t, scale[..., :, None, :, None]).reshape(*lead, rb * BLOCK, cb * BLOCK)
  return q[..., :r, :c], scale


def _expand_blocks(scale, r: int, c: int):
  return jnp.repeat(jnp.repeat(scale, BLOCK, -2), BLOCK, -1)[..., :r, :c]


def dequantize_blocks(q, scale, dtype=F32):
  """Inverse of quantize_blocks (DeepSeek's `weight_dequant`): q [..., R, C] * per-block scale."""
  return (q.astype(F32) * _expand_blocks(scale, *q.shape[-2:])).astype(dtype)


class Fp8Weight(NamedTuple):
  """A weight kept in FP8: q (the parameter's shape, e4m3) and its fp32 128x128 block scales.

  q is [*batch, *rows, *cols] (batch: the expert axis of stacked experts; rows: the input
  axes; cols: the output axes); scale is [*batch, ceil(prod(rows)/128), ceil(prod(cols)/128)],
  i.e. the transposed released `weight_scale_inv`. The rows | cols split is read off the
  shapes: it is unique unless the whole matrix is one block, when every split means the same.
  """

  q: jax.Array
  scale: jax.Array

  @property
  def shape(self):
    return self.q.shape

  @property
  def num_batch(self) -> int:
    return self.scale.ndim - 2

  @property
  def split(self) -> int:
    """Index of the first output (cols) axis of q."""
    nb, shape = self.num_batch, self.q.shape
    for s in range(nb + 1, len(shape)):
      if (_cdiv(math.prod(shape[nb:s])), _cdiv(math.prod(shape[s:]))) == tuple(self.scale.shape[nb:]):
        return s
    raise ValueError(f"Fp8Weight: scale {self.scale.shape} is no 128x128 block grid of weight {shape}")

  def matrix(self):
    """-> (q [B, R, C], scale [B, Rb, Cb]) with the batch axes flattened to B."""
    nb, s, shape = self.num_batch, self.split, self.q.shape
    b = math.prod(shape[:nb])
    return (self.q.reshape(b, math.prod(shape[nb:s]), math.prod(shape[s:])),
            self.scale.reshape(b, *self.scale.shape[nb:]))

  def dequantize(self, dtype=F32):
    q, scale = self.matrix()
    return dequantize_blocks(q, scale, dtype).reshape(self.q.shape)


def dense(w, dtype):
  """A weight in `dtype`, dequantizing an Fp8Weight (the non-FP8 compute path)."""
  return w.dequantize(dtype) if isinstance(w, Fp8Weight) else w.astype(dtype)


def _kernel(kernel: str) -> str:
  """-> 'xla', or the fused kernel: 'triton' (compiled, GPU) or 'interpret' (Pallas interpreter)."""
  if kernel not in KERNELS:
    raise ValueError(f"fp8: unknown kernel {kernel!r}; use one of {KERNELS}")
  if kernel == "xla":
    return "xla"
  tgt = target.current()
  if tgt.platform != "gpu":
    return "xla" if kernel == "auto" else "interpret"
  cc = tgt.compute_capability
  fp8_cores = (tuple(map(int, cc.split("."))) >= (8, 9) if cc is not None
               else any(k in tgt.device_kind for k in FP8_GPU_KINDS))
  return "triton" if fp8_cores or kernel == "pallas" else "xla"


def _pallas_kw(kernel: str, out_dtype):
  return dict(out_dtype=out_dtype, rhs_transposed=True, interpret=kernel == "interpret")


# --- dense matmul: [Bt, M, K] x [Bt, K, N] ----------------------------------------------
def _blocked_dot(a, sa, b, sb):
  """sum_c sa[., m, c] sb[., c, n] (a[., m, c-th 128] . b[., c-th 128, n]) -> fp32 [Bt, M, N].

  a [Bt, M, Cp] e4m3, sa [Bt, M, Cp/128]; b [Bt, Cp, N] e4m3, sb [Bt, Cp/128, N].
  """
  bt, m, cp = a.shape
  cb, n = cp // BLOCK, b.shape[-1]
  p = jax.lax.dot_general(a.reshape(bt, m, cb, BLOCK), b.reshape(bt, cb, BLOCK, n),
                          (((3,), (2,)), ((0, 2), (0, 1))), preferred_element_type=F32)  # [Bt, Cb, M, N]
  # Elementwise, not an einsum: the fp32 sum must not run at a lower default matmul precision.
  return jnp.sum(p * jnp.swapaxes(sa, 1, 2)[..., None] * sb[:, :, None, :], axis=1)


def _forward(x, wq, ws, kernel: str = "xla", out_dtype=F32):
  """x [Bt, M, K] (any float), wq [Bt, K, N] e4m3, ws [Bt, Kb, Nb] -> [Bt, M, N] (fp32 from 'xla')."""
  xq, xs = quantize_tiles(x)
  if kernel != "xla":  # the fused kernel reads w K-major (fp8_pallas): w^T as stored
    return fp8_pallas.blocked_matmul(xq, xs, jnp.swapaxes(wq, 1, 2), ws, **_pallas_kw(kernel, out_dtype))
  return _blocked_dot(xq, xs, _pad_to(wq, 1, xq.shape[-1]), jnp.repeat(ws, BLOCK, -1)[..., :wq.shape[-1]])


def _input_grad(g, wq, ws, kernel: str = "xla", out_dtype=F32):
  """dy [Bt, M, N] -> dx [Bt, M, K]: dy in 1x128 tiles along N, w^T in the forward's blocks."""
  gq, gs = quantize_tiles(g)
  if kernel != "xla":  # w [K, N] is w^T stored K-major
    return fp8_pallas.blocked_matmul(gq, gs, wq, jnp.swapaxes(ws, 1, 2), **_pallas_kw(kernel, out_dtype))
  wt = jnp.swapaxes(wq, 1, 2)  # [Bt, N, K]
  return _blocked_dot(gq, gs, _pad_to(wt, 1, gq.shape[-1]),
                      jnp.repeat(jnp.swapaxes(ws, 1, 2), BLOCK, -1)[..., :wt.shape[-1]])


def _weight_grad(x, g, kernel: str = "xla"):
  """x [Bt, M, K], dy [Bt, M, N] -> fp32 dw [Bt, K, N], both in 128x1 tiles (along tokens)."""
  xq, xs = quantize_tiles(jnp.swapaxes(x, 1, 2))  # [Bt, K, Mp]
  gq, gs = quantize_tiles(jnp.swapaxes(g, 1, 2))  # [Bt, N, Mp]
  if kernel != "xla":  # dy^T [N, Mp] is dy stored K-major
    return fp8_pallas.blocked_matmul(xq, xs, gq, jnp.swapaxes(gs, 1, 2), **_pallas_kw(kernel, F32))
  return _blocked_dot(xq, xs, jnp.swapaxes(gq, 1, 2), jnp.swapaxes(gs, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _matmul(x, w, wq, ws, dtype, kernel):
  """FP8 x @ w. w: the float weight that receives the gradient (None: frozen FP8 weight);
  (wq, ws): its blocks, which carry no gradient. kernel: 'xla' | 'triton' | 'interpret' (_kernel)."""
  return _forward(x, wq, ws, kernel, dtype).astype(dtype)


def _matmul_fwd(x, w, wq, ws, dtype, kernel):
  return _matmul(x, w, wq, ws, dtype, kernel), (x, w, wq, ws)


def _matmul_bwd(dtype, kernel, res, g):
  x, w, wq, ws = res
  dx = _input_grad(g, wq, ws, kernel, x.dtype)[..., :x.shape[-1]].astype(x.dtype)
  dw = None if w is None else _weight_grad(x, g, kernel).astype(w.dtype)
  return dx, dw, None, None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _parse(equation: str, x_ndim: int):
  """'bsd,dhe->bshe' -> (x, w, out subscripts) with any '...' in x spelled out in fresh letters."""
  ins, out = equation.replace(" ", "").split("->")
  xs, ws = ins.split(",")
  if "..." in xs:
    fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)[:x_ndim - len(xs) + 3]
    xs, out = xs.replace("...", fresh), out.replace("...", fresh)
  contracted = set(xs) & set(ws) - set(out)
  bad = (len(set(xs)) < len(xs) or len(set(ws)) < len(ws) or len(set(out)) < len(out) or "." in ws
         or set(out) != (set(xs) | set(ws)) - contracted)
  if bad:
    raise ValueError(f"fp8.einsum: {equation!r} is not a projection (each letter once per operand; letters "
                     "of only one operand must be outputs; '...' only on the activation)")
  return xs, ws, out


def einsum(equation: str, x, w, dtype, kernel: str = "auto"):
  """FP8 `jnp.einsum(equation, x, w)` -> dtype: one activation, one weight (array or Fp8Weight).

  The letters become a batched matmul [Bt, M, K] x [Bt, K, N]: batch = in x, w and the output;
  K = in x and w only (contracted); M = x only; N = w only. Each is flattened in w's axis
  order, so weight blocks are 128x128 over (flattened K, flattened N) per batch index: the
  released layout of every DeepSeek projection (q_b [Q, H*(N+R)] ...). An Fp8Weight whose
  block grid is laid out otherwise (the absorbed-MLA use of k_b) is dequantized and
  requantized in the blocks this contraction needs (frozen: no gradient).
  kernel: 'auto' | 'xla' | 'pallas' (module docstring).
  """
  xs, ws, out = _parse(equation, x.ndim)
  size = dict(zip(xs, x.shape)) | dict(zip(ws, w.shape))
  batch = [c for c in ws if c in xs and c in out]
  contract = [c for c in ws if c in xs and c not in out]
  wfree = [c for c in ws if c not in xs]
  xfree = [c for c in xs if c not in ws]
  bt, m, k, n = (math.prod(size[c] for c in g) for g in (batch, xfree, contract, wfree))
  x_c = jnp.transpose(x, [xs.index(c) for c in batch + xfree + contract]).reshape(bt, m, k).astype(dtype)

  if (isinstance(w, Fp8Weight) and ws == "".join(batch + contract + wfree) and len(batch) == w.num_batch
      and w.split == len(batch) + len(contract)):
    trained, (wq, wscale) = None, w.matrix()
  else:
    frozen = isinstance(w, Fp8Weight)
    w_c = jnp.transpose(w.dequantize() if frozen else w, [ws.index(c) for c in batch + contract + wfree])
    w_c = w_c.reshape(bt, k, n)
    trained, (wq, wscale) = (None if frozen else w_c), quantize_blocks(w_c)
  y = _matmul(x_c, trained, wq, wscale, dtype, _kernel(kernel))
  y = y.reshape([size[c] for c in batch + xfree + wfree])
  order = batch + xfree + wfree
  return jnp.transpose(y, [order.index(c) for c in out])


# --- grouped matmul: rows sorted by group, [M, K] x [G, K, N] ---------------------------
def _group_ids(sizes, m: int):
  """Group of each row (G for rows past the last group)."""
  return jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(m), side="right")


def _ragged_blocked_dot(a, sa, b, sb, sizes, impl: str):
  """Grouped _blocked_dot: a [M, Cp] e4m3, sa [M, Cb]; b [G, C, N] e4m3, sb [G, Cb, Nb] -> fp32 [M, N]."""
  (m, cp), (g, _, n) = a.shape, b.shape
  cb, nb = cp // BLOCK, _cdiv(n)
  b = _pad_to(_pad_to(b, 1, cp), 2, nb * BLOCK)
  if impl == "tiled":
    # CPU: no FP8 units (XLA upcasts e4m3 to fp32 anyway) and ragged_dot costs G times the
    # FLOPs there, so the same quantized operands meet in gmm.py's fp32 loop with their scales
    # applied first; equal to the blocked form up to fp32 rounding.
    b32 = (b.astype(F32).reshape(g, cb, BLOCK, nb, BLOCK) * sb[:, :, None, :, None]).reshape(g, cp, nb * BLOCK)
    return gmm.grouped_matmul(dequantize_tiles(a, sa), b32, sizes, "tiled")[:, :n]
  # One plain ragged_dot per 128-wide K block, scaled and summed in a loop: the fp32 partial of one
  # block at a time ([M, Np]) instead of all of them ([Cb, M, Np], 15-30 GB at DeepSeek-V3 sizes),
  # and no ragged_dot_general with a batch dim, which XLA:GPU's ragged-dot rewriter turns into an
  # invalid dot (jax 0.11.2 on an H200: "A dimension number is not unique in Dot").
  w_rows = jnp.moveaxis(sb, 1, 0)[:, jnp.minimum(_group_ids(sizes, m), g - 1)]  # [Cb, M, Nb] per row's group

  def block(kb):  # the scaled fp32 product of K block kb -> [M, Np]
    a_k = jax.lax.dynamic_slice_in_dim(a, kb * BLOCK, BLOCK, axis=1)  # [M, 128]
    b_k = jax.lax.dynamic_slice_in_dim(b, kb * BLOCK, BLOCK, axis=1)  # [G, 128, Np]
    p = jax.lax.ragged_dot(a_k, b_k, sizes, preferred_element_type=F32).reshape(m, nb, BLOCK)
    scale = sa[:, kb][:, None] * w_rows[kb]  # [M, Nb]
    return (p * scale[..., None]).reshape(m, nb * BLOCK)

  # The first block starts the sum (not zeros): inside shard_map (expert parallelism) the carry
  # must vary over the mesh axes as the products do.
  y, _ = jax.lax.scan(lambda y, kb: (y + block(kb), None), block(0), jnp.arange(1, cb))
  return y[:, :n]


def _token_tiles(x, g, sizes):
  """x [M, K], dy [M, N] -> x^T, dy^T in 128x1 tiles (along tokens) that never straddle two groups.

  Rows move to a layout where each group starts at a multiple of 128 (as DeepSeek's grouped
  GEMMs align experts; rows past the groups are dropped): -> (xq [K, T], xs [K, T/128],
  gq [N, T], gs [N, T/128], tile_group [T/128]: G past the last group).
  """
  pos, tile_group, tiles = fp8_pallas.aligned_rows(sizes, x.shape[0], BLOCK)

  def tiles_of(a):  # [M, C] -> 128x1 tiles: q [C, tiles*128], scale [C, tiles]
    buf = jnp.zeros((tiles * BLOCK, a.shape[1]), a.dtype).at[pos].set(a, mode="drop")
    return quantize_tiles(buf.T)

  return (*tiles_of(x), *tiles_of(g), tile_group)


def _grouped_weight_grad(x, g, sizes, num_groups: int, kernel: str = "xla"):
  """Per group x^T dy -> fp32 [G, K, N], in _token_tiles' 128x1 tiles.

  One FP8 GEMM per 128-row tile gives [tiles, K, N] partials, and the scaled partials are
  summed into their groups (memory: M/128 + G partials of K x N). The fused kernel contracts
  each group's tiles in its K loop instead (fp8_pallas.grouped_weight_grad).
  """
  xq, xs, gq, gs, tile_group = _token_tiles(x, g, sizes)
  if kernel != "xla":
    return fp8_pallas.grouped_weight_grad(xq, xs, gq, gs, _cdiv(sizes), interpret=kernel == "interpret")
  tiles = xs.shape[1]
  p = jax.lax.dot_general(xq.reshape(-1, tiles, BLOCK), gq.reshape(-1, tiles, BLOCK),
                          (((2,), (2,)), ((1,), (1,))), preferred_element_type=F32)  # [tiles, K, N]
  p = p * xs.T[:, :, None] * gs.T[:, None, :]
  return jax.ops.segment_sum(p, tile_group, num_segments=num_groups, indices_are_sorted=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _grouped(x, w, wq, ws, sizes, dtype, impl, kernel):
  xq, xs = quantize_tiles(x)
  if kernel != "xla":  # w^T as stored: K-major for the kernel
    return fp8_pallas.grouped_matmul(xq, xs, jnp.swapaxes(wq, 1, 2), ws, sizes, **_pallas_kw(kernel, dtype))
  return _ragged_blocked_dot(xq, xs, wq, ws, sizes, impl).astype(dtype)


def _grouped_fwd(x, w, wq, ws, sizes, dtype, impl, kernel):
  return _grouped(x, w, wq, ws, sizes, dtype, impl, kernel), (x, w, wq, ws, sizes)


def _grouped_bwd(dtype, impl, kernel, res, g):
  x, w, wq, ws, sizes = res
  gq, gs = quantize_tiles(g)
  if kernel != "xla":
    dx = fp8_pallas.grouped_matmul(gq, gs, wq, jnp.swapaxes(ws, 1, 2), sizes, **_pallas_kw(kernel, x.dtype))
  else:
    dx = _ragged_blocked_dot(gq, gs, jnp.swapaxes(wq, 1, 2), jnp.swapaxes(ws, 1, 2), sizes, impl)
  dw = None if w is None else _grouped_weight_grad(x, g, sizes, wq.shape[0], kernel).astype(w.dtype)
  return dx[:, :x.shape[1]].astype(x.dtype), dw, None, None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def _vary_together(*arrays):
  """Inside jax.shard_map: each array varies over every manual axis any of them varies over, so the
  custom_vjp's cotangents have their primals' types (autodiff then psums dw over the axes w gained)."""
  union = sum(jnp.zeros_like(a, shape=(), dtype=F32) for a in arrays)  # varies as all of them together
  return tuple(a + jnp.zeros_like(union, dtype=a.dtype) for a in arrays)


def ragged_dot(x_MK, w_GKN, sizes_G, dtype, impl: str = "auto", kernel: str = "auto"):
  """FP8 grouped matmul, rows sorted by group (as jax.lax.ragged_dot) -> [M, N] in dtype.

  w_GKN: float [G, K, N] (quantized per expert in 128x128 blocks) or Fp8Weight (scale
  [G, Kb, Nb]; frozen). impl as gmm.py: 'ragged_dot' (GPU/TPU: one jax.lax.ragged_dot on e4m3
  inputs per 128-wide K block, scaled and summed in a scan), 'tiled' (CPU emulation), 'auto'; 'pallas'
  takes the ragged_dot form (the Pallas kernels of gmm_pallas.py are bf16). kernel: 'auto' |
  'xla' | 'pallas' (module docstring); the fused kernel, when it runs, replaces impl's form.
  """
  sizes_G = sizes_G.astype(jnp.int32)
  if isinstance(w_GKN, Fp8Weight):
    x_MK, wq, ws, _ = _vary_together(x_MK, w_GKN.q, w_GKN.scale, sizes_G)
    trained = None
  else:
    x_MK, trained, _ = _vary_together(x_MK, w_GKN, sizes_G)
    wq, ws = quantize_blocks(trained)
  return _grouped(x_MK.astype(dtype), trained, wq, ws, sizes_G, dtype, gmm.choose(impl), _kernel(kernel))
