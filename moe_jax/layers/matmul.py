"""Matmuls that accumulate in fp32, with operands in the fastest dtype the target allows.

JAX's matmul precision (`jax_default_matmul_precision`, `jax.default_matmul_precision`) says
how fp32 products may be computed. At the default, a TPU takes one bf16 pass (bf16 operands,
fp32 accumulation) and a GPU takes TF32; 'highest' / 'float32' asks for exact fp32. XLA:CPU
ignores the setting and always computes fp32 exactly, although on CPUs with AMX (Intel Sapphire
Rapids and later) bf16 operands with fp32 accumulation run 5-6x faster (a 1024^3 matmul: 1,223-
1,353 against 225-227 GFLOP/s; BENCHMARKS.md, "Against transformers"). So on the CPU this module
gives the setting its TPU meaning:

  precision in effect                  fp32 matmul operands on the CPU
  default (unset), on a CPU with AMX   bf16, fp32 accumulation (as a TPU)
  default, on a CPU without AMX        fp32 (no speed-up measured there; exactness kept)
  'bfloat16' / 'BF16_BF16_F32'         bf16, fp32 accumulation, on any CPU
  'float32', 'highest', anything else  fp32, exact

Either way parameters, activations, gradients and the optimizer stay fp32; only the operands
of a matmul are rounded, forward and backward (a custom VJP, because autodiff would transpose
a bf16 x bf16 -> fp32 product into a mixed fp32 x bf16 one, which XLA:CPU runs as fp32, and
round the input gradient to bf16). Half-precision compute dtypes also accumulate in fp32
here: XLA:CPU's bf16 x bf16 -> bf16 dots are several times slower than -> fp32. The tests pin
'highest' (tests/conftest.py), so numerics against references are exact fp32.

On TPU and GPU, `einsum` is plain jnp.einsum in the compute dtype: their compilers apply the
precision setting themselves.
"""

from __future__ import annotations

import functools
import math
import string

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import target

FAST_PRECISIONS = ("bfloat16", "BF16_BF16_F32")  # bf16 operands on any CPU
DEFAULT_PRECISIONS = (None, "default")  # bf16 operands on a CPU with AMX


@functools.cache
def cpu_has_amx_bf16() -> bool:
  """Whether this host's CPU has AMX bf16 tiles (Linux /proc/cpuinfo; False where it cannot tell)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return "amx_bf16" in line.split()
  except OSError:
    pass
  return False


def operand_dtype(dtype) -> np.dtype:
  """The dtype the operands of a matmul in compute dtype `dtype` are rounded to (see module doc)."""
  dtype = jnp.dtype(dtype)
  if dtype != jnp.float32 or target.platform() != "cpu":
    return dtype
  precision = jax.config.jax_default_matmul_precision
  if precision in FAST_PRECISIONS or (precision in DEFAULT_PRECISIONS and cpu_has_amx_bf16()):
    return jnp.dtype(jnp.bfloat16)
  return dtype


def accumulates_apart(dtype) -> bool:
  """True where a matmul in compute dtype `dtype` runs as operand_dtype operands -> fp32 (the CPU)."""
  return target.platform() == "cpu" and operand_dtype(dtype) != jnp.float32


def einsum(equation: str, x: jax.Array, y: jax.Array, dtype, out_dtype=None) -> jax.Array:
  """jnp.einsum(equation, x, y) in compute dtype `dtype` on the fast path of the target -> out_dtype
  (default: dtype). Two operands, each index in at least two of x, y and the output (every
  projection and attention product in moe_jax).
  """
  dtype = jnp.dtype(dtype)
  out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
  if not accumulates_apart(dtype):
    return jnp.einsum(equation, x.astype(dtype), y.astype(dtype),
                      preferred_element_type=None if out_dtype == dtype else out_dtype)
  grads = _grad_equations(equation, x.ndim, y.ndim)
  return _einsum32(grads, operand_dtype(dtype), x.dtype, y.dtype, equation, x, y).astype(out_dtype)


def dot(x: jax.Array, y: jax.Array, op_dtype) -> jax.Array:
  """x @ y with both operands in op_dtype, accumulated and returned in fp32 (inside custom VJPs)."""
  return jnp.matmul(x.astype(op_dtype), y.astype(op_dtype), preferred_element_type=jnp.float32)


def _explicit(equation: str, x_ndim: int, y_ndim: int) -> tuple[str, str, str]:
  """'...d,dgf->...gf' -> ('ABd', 'dgf', 'ABgf') for the operands' ranks (no ellipsis left)."""
  inputs, out = equation.replace(" ", "").split("->")
  xs, ys = inputs.split(",")
  spare = iter(c for c in string.ascii_uppercase if c not in equation)
  width = max((n - len(s.replace("...", "")) for s, n in ((xs, x_ndim), (ys, y_ndim)) if "..." in s), default=0)
  dots = "".join(next(spare) for _ in range(width))
  fill = lambda s, n: s.replace("...", dots[width - (n - len(s.replace("...", ""))):])  # noqa: E731
  return fill(xs, x_ndim), fill(ys, y_ndim), out.replace("...", dots)


def _grad_equations(equation: str, x_ndim: int, y_ndim: int) -> tuple[str, str]:
  """The einsums of the two input gradients: 'bsd,dv->bsv' -> ('bsv,dv->bsd', 'bsd,bsv->dv')."""
  xs, ys, out = _explicit(equation, x_ndim, y_ndim)
  for operand, others in ((xs, ys + out), (ys, xs + out)):
    if set(operand) - set(others) or len(set(operand)) != len(operand):
      raise ValueError(f"matmul.einsum: {equation!r} sums or repeats an index within one operand ({operand}); "
                       "its gradient is not a product of the other two: use jnp.einsum")
  return f"{out},{ys}->{xs}", f"{xs},{out}->{ys}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _einsum32(grads, op_dtype, x_dtype, y_dtype, equation, x, y):
  return product(equation, x.astype(op_dtype), y.astype(op_dtype))


def _einsum32_fwd(grads, op_dtype, x_dtype, y_dtype, equation, x, y):
  xo, yo = x.astype(op_dtype), y.astype(op_dtype)  # the residuals are the rounded operands (half the bytes)
  return product(equation, xo, yo), (xo, yo)


def _einsum32_bwd(grads, op_dtype, x_dtype, y_dtype, equation, residuals, g):
  (dx_equation, dy_equation), (xo, yo) = grads, residuals
  go = g.astype(op_dtype)
  dx = product(dx_equation, go, yo)
  dy = product(dy_equation, xo, go)
  return dx.astype(x_dtype), dy.astype(y_dtype)


def product(equation: str, a, b) -> jax.Array:
  """einsum(equation, a, b) -> fp32 as one dot in the row-major form [batch, M, K] x [batch, K, N].

  XLA:CPU runs a bf16 x bf16 -> fp32 dot only through its YNNPACK kernels, which take that form
  alone; a dot it leaves to its generic runtime fails there ("Unsupported element type for
  DotThunk::Execute: BF16 x BF16 = F32", jaxlib 0.10.2). Left to itself, XLA folded a transpose
  into the gradient of the attention scores and hit that. So the operands are transposed into
  the form here, a as the left operand (tests/test_matmul.py runs every product in moe_jax this
  way; the other orientation, b^T a^T, was measured to fail for the weight gradients).
  """
  a_idx, b_idx, out = _explicit(equation, a.ndim, b.ndim)
  batch = [c for c in out if c in a_idx and c in b_idx]
  m = [c for c in out if c in a_idx and c not in batch]
  n = [c for c in out if c in b_idx and c not in batch]
  k = [c for c in a_idx if c in b_idx and c not in out]
  sizes = dict(zip(a_idx, a.shape)) | dict(zip(b_idx, b.shape))
  # Each group of dims flattened to one (free for a row-major operand): [B, M, K] x [B, K, N], or
  # [M, K] x [K, N] without batch dims; dots with two contracting dims also failed unflattened.
  size = lambda idx: math.prod(sizes[c] for c in idx)  # noqa: E731
  lead = (size(batch),) if batch else ()
  lhs = _permute(a, a_idx, batch + m + k).reshape(*lead, size(m), size(k))
  rhs = _permute(b, b_idx, batch + k + n).reshape(*lead, size(k), size(n))
  y = jnp.matmul(lhs, rhs, preferred_element_type=jnp.float32)
  return _permute(y.reshape([sizes[c] for c in batch + m + n]), batch + m + n, list(out))


def _permute(x, have, want):
  return transposed(x, [list(have).index(c) for c in want])


def transposed(x: jax.Array, perm) -> jax.Array:
  """jnp.transpose(x, perm), skipped when perm is the identity: operands put in product's form."""
  if list(perm) == list(range(x.ndim)):
    return x
  return jnp.transpose(x, perm)


_einsum32.defvjp(_einsum32_fwd, _einsum32_bwd)
