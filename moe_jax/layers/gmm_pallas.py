"""Grouped matmul as the Pallas kernels that ship with JAX (`moe_gmm='pallas'`).

Same contract as layers/gmm.py: x [M, D] with rows sorted by group, w [E, D, F], sizes [E]
-> [M, F], rows past sum(sizes) zero.
  TPU: jax.experimental.pallas.ops.tpu.megablox: gmm forward, gmm on w^T (its transpose_rhs
      form) for the input gradient and tgmm (per group x^T dy) for the weight gradient, joined
      by a custom VJP here. The grid visits only the row tiles of the groups in use (a dynamic
      grid), so rows past sum(sizes) cost memory but no MXU time. tokamax's newer grouped
      matmul needs Python >= 3.12 (this project: 3.11), so megablox it is.
  GPU, Hopper (sm_90: H100, H200): jax.experimental.pallas.ops.gpu.ragged_dot_mgpu, a Mosaic GPU
      kernel (TMA loads, wgmma, persistent over the 132 SMs) for the forward and the input
      gradient (transpose_rhs), and transposed_ragged_dot_mgpu for the weight gradient.
      bf16 / fp16 only, D and F multiples of the block sizes below.
Which one runs follows moe_jax.target (the mesh in context), so a TPU compile from a CPU host
picks megablox; `interpret=True` runs megablox in the Pallas interpreter on any backend (tests).

Inside jax.shard_map (the 'ep' dispatch, the shard_mapped 'ragged' dispatch) the kernels'
out_shape carries no varying-axes type, which shard_map's check_vma rejects. The kernels are
per-device code, so each call runs in a nested shard_map over no axes with that check off and
its outputs are typed as varying over the axes its inputs vary over (`_per_device`); the
custom VJPs keep autodiff out of it.
Block sizes: the fastest of benchmarks/gmm_gpu.py --sweep on an H100 (98304 rows, D=1024, F=384,
64 experts; BENCHMARKS.md), where these kernels ran 17-34x faster than jax.lax.ragged_dot.
Each pallas_call site compiles its own kernel, so an unscanned model compiles these once per
layer (minutes at 12 layers): use scan_layers=True with moe_gmm='pallas'.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import target

# Mosaic GPU kernels: {kernel: block sizes}. block_k of "fwd" divides D, of "dx" divides F; the
# weight-gradient kernel's block_m divides D and block_n divides F (its block_k runs over rows).
MGPU_BLOCKS = {
    "fwd": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4),
    "dx": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4),
    "dw": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=6, grid_block_n=1),
}
MEGABLOX_TILING = (128, 128, 128)  # TPU (rows, contraction, output) tiles: the v5p MXU is 128 x 128
HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")  # device_kind when no compute capability is known


def backend(tgt: target.Target | None = None) -> str | None:
  """'megablox' for a TPU target, 'mgpu' for a Hopper GPU, None where no Pallas grouped matmul applies."""
  tgt = tgt or target.current()
  if tgt.platform == "tpu":
    return "megablox"
  if tgt.platform == "gpu":
    cc = tgt.compute_capability
    if cc is not None and cc.startswith("9") or cc is None and any(k in tgt.device_kind for k in HOPPER_KINDS):
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


def _varying(a) -> frozenset:
  mat = getattr(jax.typeof(a), "mat", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def _per_device(fn, *args, interpret: bool = False):
  """fn(*args) for a Pallas kernel; inside jax.shard_map, typed for its check_vma.

  Inside shard_map the call goes through a nested jax.shard_map over no axes with check_vma off,
  so the kernel's untyped out_shape is accepted and the kernel's glue (megablox concatenates an
  invariant zero with the varying group ends) is never re-checked when remat, scan or autodiff
  re-trace the program later; its outputs are then typed as varying over the axes its inputs vary
  over. 16-bit operands are traced at the default matmul precision: Mosaic rejects a bf16 dot
  asked for more ("Bad lhs type"), which jax_default_matmul_precision='highest' would ask.
  """
  half = all(a.dtype in (jnp.bfloat16, jnp.float16) for a in args if jnp.issubdtype(a.dtype, jnp.floating))
  with jax.default_matmul_precision("default") if half else contextlib.nullcontext():
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes:
      return fn(*args)
    body = fn
    if interpret:  # the interpreter's loops need carries of one type: inputs re-made untyped (x + 0)
      body = lambda *a: fn(*(v + jnp.zeros((), v.dtype) for v in a))  # noqa: E731
    out = jax.shard_map(body, mesh=mesh, in_specs=(P(),) * len(args), out_specs=P(), axis_names=frozenset(),
                        check_vma=False)(*args)
  axes = frozenset().union(*map(_varying, args))

  def retype(o):
    missing = tuple(sorted(axes - _varying(o)))
    return jax.lax.pcast(o, missing, to="varying") if missing else o

  return jax.tree.map(retype, out)


def _rows_in_groups(y_MF, sizes_E):
  """Zeros past sum(sizes): the kernels leave those rows unwritten."""
  return jnp.where(jnp.arange(y_MF.shape[0])[:, None] < jnp.sum(sizes_E), y_MF, 0)


# --- TPU: megablox -------------------------------------------------------------------------
def _tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
  return tuple(min(t, s) for t, s in zip(MEGABLOX_TILING, (m, k, n)))


def _pad_rows(a, tm: int):
  """Rows up to a multiple of the row tile (megablox needs it); the extra rows lie past every group."""
  extra = -a.shape[0] % tm
  return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


def _megablox():
  """The kernels module (the package's own `gmm` attribute is the custom-VJP wrapper, not it)."""
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _mb_gmm(x_MD, w_EDF, sizes_E, interpret, transpose_rhs=False):
  mb = _megablox()
  m, k = x_MD.shape
  n = w_EDF.shape[1] if transpose_rhs else w_EDF.shape[2]
  tiling = _tiles(m, k, n)
  xp = _pad_rows(x_MD, tiling[0])
  fn = lambda x, w, s: mb.gmm(x, w, s, x_MD.dtype, tiling, transpose_rhs=transpose_rhs,  # noqa: E731
                              interpret=interpret)
  return _rows_in_groups(_per_device(fn, xp, w_EDF, sizes_E, interpret=interpret)[:m], sizes_E)


def _mb_tgmm(x_MD, dy_MF, sizes_E, w_dtype, interpret):
  mb = _megablox()
  (m, d), f = x_MD.shape, dy_MF.shape[1]
  tm, tk, tn = _tiles(m, d, f)
  xp, dyp = _pad_rows(x_MD, tm), _pad_rows(dy_MF, tm)
  fn = lambda xt, dy, s: mb.tgmm(xt, dy, s, w_dtype, (tm, tk, tn), interpret=interpret)  # noqa: E731
  return _per_device(fn, xp.T, dyp, sizes_E, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_megablox(x_MD, w_EDF, sizes_E, interpret):
  return _mb_gmm(x_MD, w_EDF, sizes_E, interpret)


def _gmm_megablox_fwd(x_MD, w_EDF, sizes_E, interpret):
  return _mb_gmm(x_MD, w_EDF, sizes_E, interpret), (x_MD, w_EDF, sizes_E)


def _gmm_megablox_bwd(interpret, res, dy_MF):
  x_MD, w_EDF, sizes_E = res
  dy_MF = dy_MF.astype(x_MD.dtype)
  dx = _mb_gmm(dy_MF, w_EDF, sizes_E, interpret, transpose_rhs=True)  # dy @ w[g]^T
  dw = _mb_tgmm(x_MD, dy_MF, sizes_E, w_EDF.dtype, interpret)  # rows past sum(sizes): in no group
  return dx, dw, None


_gmm_megablox.defvjp(_gmm_megablox_fwd, _gmm_megablox_bwd)


# --- GPU: Mosaic GPU -----------------------------------------------------------------------
def _mgpu_fwd_only(x_MD, w_EDF, sizes_E):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  fn = lambda x, w, s: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=s, **MGPU_BLOCKS["fwd"])  # noqa: E731
  return _rows_in_groups(_per_device(fn, x_MD, w_EDF, sizes_E), sizes_E)


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
  dx = _per_device(lambda dy, w, s: ragged_dot_mgpu.ragged_dot(dy, w, group_sizes=s, transpose_rhs=True,
                                                               **MGPU_BLOCKS["dx"]), dy_MF, w_EDF, sizes_E)
  # dw[g] = x[rows of g]^T @ dy[rows of g]: the row axis is the (ragged) contraction.
  dw = _per_device(lambda x, dy, s: transposed_ragged_dot_mgpu.transposed_ragged_dot(
      x, dy, group_sizes=s, **MGPU_BLOCKS["dw"]), x_MD, dy_MF, sizes_E)
  return _rows_in_groups(dx, sizes_E), dw.astype(w_EDF.dtype), None


_gmm_mgpu.defvjp(_gmm_mgpu_fwd, _gmm_mgpu_bwd)


def grouped_matmul(x_MD, w_EDF, sizes_E, *, interpret: bool = False):
  """[M, D] x [E, D, F] -> [M, F] through the target's Pallas kernel.

  interpret: run the TPU (megablox) kernel in the Pallas interpreter, on any backend (tests).
  """
  sizes_E = sizes_E.astype(jnp.int32)
  kind = "megablox" if interpret else backend()
  if kind == "megablox":
    return _gmm_megablox(x_MD, w_EDF, sizes_E, interpret)
  if kind == "mgpu":
    why = check(x_MD, w_EDF)
    if why:
      raise ValueError(f"moe_gmm='pallas' (Mosaic GPU grouped matmul): {why}; use moe_gmm='ragged_dot' "
                       "or 'auto' for these shapes")
    return _gmm_mgpu(x_MD, w_EDF, sizes_E)
  tgt = target.current()
  raise ValueError(f"moe_gmm='pallas' needs a Hopper GPU (sm_90) or a TPU; this is {tgt.platform} "
                   f"({tgt.device_kind}). Use moe_gmm='auto'.")


def available() -> bool:
  """Whether the target in context (see moe_jax.target) has a Pallas grouped matmul."""
  return backend() is not None
