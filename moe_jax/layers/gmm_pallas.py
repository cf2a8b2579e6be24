"""Grouped matmul as the Pallas kernels that ship with JAX (`moe_gmm='pallas'`).

Same contract as layers/gmm.py: x [M, D] with rows sorted by group, w [E, D, F], sizes [E]
-> [M, F], rows past sum(sizes) zero.
  GPU, Hopper (sm_90: H100, H200): jax.experimental.pallas.ops.gpu.ragged_dot_mgpu, a Mosaic GPU
      kernel (TMA loads, wgmma, persistent over the 132 SMs) for the forward and the input
      gradient (dy @ w^T, its transpose_rhs form), and transposed_ragged_dot_mgpu for the weight
      gradient (per group x^T dy). A custom VJP joins the three. bf16 / fp16 only, D and F
      multiples of the block sizes below.
  TPU: jax.experimental.pallas.ops.tpu.megablox (gmm forward, gmm + tgmm backward, its own VJP).
Block sizes: the fastest of benchmarks/gmm_gpu.py --sweep on an H100 (98304 rows, D=1024, F=384,
64 experts; BENCHMARKS.md), where these kernels ran 17-34x faster than jax.lax.ragged_dot.
Each pallas_call site compiles its own kernel, so an unscanned model compiles these once per
layer (minutes at 12 layers): use scan_layers=True with moe_gmm='pallas'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Mosaic GPU kernels: {kernel: block sizes}. block_k of "fwd" divides D, of "dx" divides F; the
# weight-gradient kernel's block_m divides D and block_n divides F (its block_k runs over rows).
MGPU_BLOCKS = {
    "fwd": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4),
    "dx": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4),
    "dw": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=6, grid_block_n=1),
}
MEGABLOX_TILING = (128, 128, 128)  # TPU (m, k, n) tiles


def backend() -> str | None:
  """'mgpu' on a Hopper GPU, 'megablox' on TPU, None where no Pallas grouped matmul applies."""
  dev = jax.devices()[0]
  if dev.platform == "tpu":
    return "megablox"
  if dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9"):
    return "mgpu"
  return None


def check(x_MD, w_EDF, blocks: dict = MGPU_BLOCKS) -> str | None:
  """Why the Mosaic GPU kernels cannot take these operands (None: they can).

  Both feature sizes must be multiples of every block size: a grouped SwiGLU uses each weight
  both ways round (gate/up [E, D, F], down [E, F, D]) and the backward transposes them again.
  """
  (_, d), (_, _, f) = x_MD.shape, w_EDF.shape
  if x_MD.dtype != w_EDF.dtype or x_MD.dtype not in (jnp.bfloat16, jnp.float16):
    return f"operands must both be bfloat16 or float16, got {x_MD.dtype} and {w_EDF.dtype}"
  sizes = {b[k] for b in blocks.values() for k in ("block_m", "block_n", "block_k")}
  for name, size in (("D", d), ("F", f)):
    for b in sorted(sizes):
      if size % b:
        return f"{name}={size} is not a multiple of the kernel block {b}"
  return None


def _rows_in_groups(y_MF, sizes_E):
  """Zeros past sum(sizes): the kernels leave those rows unwritten."""
  return jnp.where(jnp.arange(y_MF.shape[0])[:, None] < jnp.sum(sizes_E), y_MF, 0)


@jax.custom_vjp
def _rows_in_groups_grad(x_MD, sizes_E):
  """Identity whose gradient is zero past sum(sizes) (a kernel's VJP leaves those rows unwritten)."""
  return x_MD


_rows_in_groups_grad.defvjp(lambda x, s: (x, s), lambda s, g: (_rows_in_groups(g, s), None))


def _mgpu_fwd_only(x_MD, w_EDF, sizes_E):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  y = ragged_dot_mgpu.ragged_dot(x_MD, w_EDF, group_sizes=sizes_E, **MGPU_BLOCKS["fwd"])
  return _rows_in_groups(y, sizes_E)


@jax.custom_vjp
def _gmm_mgpu(x_MD, w_EDF, sizes_E):
  return _mgpu_fwd_only(x_MD, w_EDF, sizes_E)


def _gmm_mgpu_fwd(x_MD, w_EDF, sizes_E):
  return _mgpu_fwd_only(x_MD, w_EDF, sizes_E), (x_MD, w_EDF, sizes_E)


def _gmm_mgpu_bwd(res, dy_MF):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
  x_MD, w_EDF, sizes_E = res
  dy_MF = _rows_in_groups(dy_MF.astype(x_MD.dtype), sizes_E)
  # dx = dy @ w[g]^T: the forward kernel reading w [E, D, F] as [E, N=D, K=F].
  dx = ragged_dot_mgpu.ragged_dot(dy_MF, w_EDF, group_sizes=sizes_E, transpose_rhs=True, **MGPU_BLOCKS["dx"])
  # dw[g] = x[rows of g]^T @ dy[rows of g]: the row axis is the (ragged) contraction.
  dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(x_MD, dy_MF, group_sizes=sizes_E, **MGPU_BLOCKS["dw"])
  return _rows_in_groups(dx, sizes_E), dw.astype(w_EDF.dtype), None


_gmm_mgpu.defvjp(_gmm_mgpu_fwd, _gmm_mgpu_bwd)


def grouped_matmul(x_MD, w_EDF, sizes_E, *, interpret: bool = False):
  """[M, D] x [E, D, F] -> [M, F] through the platform's Pallas kernel.

  interpret: run the TPU (megablox) kernel in the Pallas interpreter, on any backend (tests).
  """
  sizes_E = sizes_E.astype(jnp.int32)
  kind = "megablox" if interpret else backend()
  if kind == "megablox":
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
    m, (_, d, f) = x_MD.shape[0], w_EDF.shape
    tiling = tuple(min(t, n) for t, n in zip(MEGABLOX_TILING, (m, d, f)))
    x_MD = _rows_in_groups_grad(x_MD, sizes_E)
    y = megablox.gmm(x_MD, w_EDF, sizes_E, x_MD.dtype, tiling, None, None, False, interpret)
    return _rows_in_groups(y, sizes_E)
  if kind == "mgpu":
    why = check(x_MD, w_EDF)
    if why:
      raise ValueError(f"moe_gmm='pallas' (Mosaic GPU grouped matmul): {why}; use moe_gmm='ragged_dot' "
                       "or 'auto' for these shapes")
    return _gmm_mgpu(x_MD, w_EDF, sizes_E)
  dev = jax.devices()[0]
  raise ValueError(f"moe_gmm='pallas' needs a Hopper GPU (sm_90) or a TPU; this is {dev.platform} "
                   f"({dev.device_kind}). Use moe_gmm='auto'.")


@functools.lru_cache(maxsize=None)
def available() -> bool:
  return backend() is not None
