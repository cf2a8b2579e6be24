"""The fused FP8 kernel (moe_jax/layers/fp8_pallas.py, Pallas interpreter) against fp8.py's XLA form.

Both contract the same e4m3 operands with the same fp32 scales; only the order of the fp32
sums differs (per 128 block in registers vs partials summed after), so they agree to fp32
rounding. The XLA form is the reference: an independent contraction (a dot_general with the
K blocks as a batch dim, or ragged_dot_general per group), not the kernel run twice. Shapes
are no multiples of the blocks (BLOCK_M = 64, BLOCK_N = 128, K block 128), so padding runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import target
from moe_jax.layers import fp8
from moe_jax.layers import fp8_pallas as fpp

F32 = jnp.float32


def _close(got, want):
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _normal(seed, *shapes):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return [jax.random.normal(k, s, F32) for k, s in zip(keys, shapes)]


def test_dense_forward_input_grad_weight_grad_match_xla():
  """The three matmuls of a linear, batched (Bt = 2: a grid axis by vmap), M=100 K=300 N=200."""
  x, w, g = _normal(0, (2, 100, 300), (2, 300, 200), (2, 100, 200))
  wq, ws = fp8.quantize_blocks(w)
  _close(fp8._forward(x, wq, ws, "interpret"), fp8._forward(x, wq, ws))
  _close(fp8._input_grad(g, wq, ws, "interpret")[..., :300], fp8._input_grad(g, wq, ws)[..., :300])
  _close(fp8._weight_grad(x, g, "interpret"), fp8._weight_grad(x, g))


def test_rhs_as_kn_with_column_scales_and_bf16_out():
  """b as [K, N] (not transposed) and per-column scales, written in bf16: the same product."""
  x, w = _normal(4, (1, 100, 300), (1, 300, 200))
  wq, ws = fp8.quantize_blocks(w)
  xq, xs = fp8.quantize_tiles(x[0])
  ref = fp8._forward(x, wq, ws)[0]
  got = fpp.blocked_matmul(xq, xs, wq[0], jnp.repeat(ws[0], 128, -1)[:, :200], out_dtype=jnp.bfloat16,
                           interpret=True)
  assert got.dtype == jnp.bfloat16 and got.shape == (100, 200)
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2 ** -8, atol=1e-5 * float(jnp.abs(ref).max()))


def test_kernel_applies_each_blocks_scales():
  """One weight block 2^10 larger than the rest: a scale applied to the wrong block would show."""
  x, w = _normal(1, (64, 256), (256, 256))
  w = w.at[128:, :128].multiply(2.0 ** 10)
  xq, xs = fp8.quantize_tiles(x)
  wq, ws = fp8.quantize_blocks(w)
  want = np.asarray(fp8.dequantize_tiles(xq, xs), np.float64) @ np.asarray(fp8.dequantize_blocks(wq, ws), np.float64)
  _close(fpp.blocked_matmul(xq, xs, wq.T, ws, rhs_transposed=True, interpret=True), want)


def test_grouped_forms_match_xla():
  """Groups of 70, 0 (empty), 150, 41, 30 rows: 291 of 300 rows, the last 9 in no group (zeros)."""
  sizes = jnp.array([70, 0, 150, 41, 30], jnp.int32)
  x, w, g = _normal(2, (300, 200), (5, 200, 130), (300, 130))
  wq, ws = fp8.quantize_blocks(w)
  xq, xs = fp8.quantize_tiles(x)
  gq, gs = fp8.quantize_tiles(g)

  y = fpp.grouped_matmul(xq, xs, jnp.swapaxes(wq, 1, 2), ws, sizes, rhs_transposed=True, interpret=True)
  _close(y, fp8._ragged_blocked_dot(xq, xs, wq, ws, sizes, "ragged_dot"))
  assert np.all(np.asarray(y[291:]) == 0)
  dx = fpp.grouped_matmul(gq, gs, wq, jnp.swapaxes(ws, 1, 2), sizes, rhs_transposed=True, interpret=True)
  _close(dx, fp8._ragged_blocked_dot(gq, gs, jnp.swapaxes(wq, 1, 2), jnp.swapaxes(ws, 1, 2), sizes,
                                     "ragged_dot")[:, :200])
  dw = fp8._grouped_weight_grad(x, g, sizes, 5, "interpret")
  _close(dw, fp8._grouped_weight_grad(x, g, sizes, 5))
  assert np.all(np.asarray(dw[1]) == 0) and np.all(np.asarray(dw[0]) != 0)


def test_aligned_rows_layout():
  """Every group starts at a multiple of the block; the static tile count always suffices."""
  sizes = jnp.array([1, 0, 63, 64, 65, 2], jnp.int32)
  pos, tile_group, tiles = fpp.aligned_rows(sizes, 200, 64)
  starts = np.asarray(pos)[np.cumsum([0, 1, 0, 63, 64, 65])]
  np.testing.assert_array_equal(starts, [0, 64, 64, 128, 192, 320])  # group 1 is empty: 1 and 2 share 64
  assert np.all(np.asarray(pos)[195:] == tiles * 64)  # 195 rows in groups; the rest are dropped
  np.testing.assert_array_equal(np.asarray(tile_group)[:7], [0, 2, 3, 4, 4, 5, 6])
  assert tiles == -(-(200 + 6 * 63) // 64) >= 7


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_grad_through_einsum_and_ragged_dot(dtype):
  """kernel='pallas' (interpreted here) and 'xla' give the same values and gradients."""
  x, w, xr, wr, r = _normal(3, (3, 40, 160), (3, 160, 72), (150, 136), (4, 136, 96), (150, 96))
  sizes = jnp.array([60, 0, 50, 30], jnp.int32)

  def loss(kernel):
    def f(x, w, xr, wr):
      y = fp8.einsum("hbd,hde->hbe", x.astype(dtype), w, dtype, kernel=kernel)  # h: a batch letter
      z = fp8.ragged_dot(xr.astype(dtype), wr, sizes, dtype, kernel=kernel)
      return jnp.sum(y.astype(F32) ** 2) + jnp.sum(z.astype(F32) * r)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, w, xr, wr)

  (lp, gp), (lx, gx) = loss("pallas"), loss("xla")
  tol = 1e-5 if dtype == F32 else 2 ** -7  # bf16 dx: one rounding of fp32 values a few ulps apart
  np.testing.assert_allclose(lp, lx, rtol=tol)
  for a, b in zip(gp, gx):
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol * np.abs(b).max())


def test_kernel_choice(monkeypatch):
  assert fp8._kernel("auto") == "xla" and fp8._kernel("xla") == "xla"  # this is a CPU
  assert fp8._kernel("pallas") == "interpret"
  with pytest.raises(ValueError, match="unknown kernel"):
    fp8._kernel("triton")
  for kind, cc, want in (("NVIDIA H100 80GB HBM3", "9.0", "triton"), ("NVIDIA A100-SXM4-80GB", "8.0", "xla"),
                         ("NVIDIA H200", None, "triton")):
    monkeypatch.setattr(target, "current", lambda mesh=None, k=kind, c=cc: target.Target("gpu", k, c))
    assert fp8._kernel("auto") == want, kind
    assert fp8._kernel("pallas") == "triton"


def test_model_fp8_kernel_switch_both_positions():
  """ModelConfig.fp8_kernel: 'pallas' (interpreted here) gives the 'xla' model's loss and gradients;
  'auto' (the default) is the XLA form on this CPU (which kernel it picks on a GPU: the test above)."""
  import optax

  from moe_jax import config as mcfg
  from moe_jax.model import Transformer
  with pytest.raises(ValueError, match="fp8_kernel"):
    mcfg.tiny(fp8=True, fp8_kernel="cublas")
  tokens = jax.random.randint(jax.random.key(7), (2, 9), 0, 256)
  grads = {}
  assert mcfg.tiny(fp8=True).fp8_kernel == "auto"
  for kernel in ("xla", "pallas", "auto"):
    cfg = mcfg.tiny(fp8=True, fp8_kernel=kernel, num_nextn_predict_layers=0, num_hidden_layers=1)  # dense layer:
    # the projections and the MLP through fp8.einsum; the grouped kernels are held to XLA above
    model = Transformer(cfg)
    variables = model.init(jax.random.key(8), tokens[:, :-1])

    def loss(params):
      logits = model.apply({**variables, "params": params}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    grads[kernel] = jax.value_and_grad(loss)(variables["params"])
  (lx, gx), (lp, gp), (la, ga) = grads["xla"], grads["pallas"], grads["auto"]
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert la == lx  # the same program: 'auto' is 'xla' on a CPU
  jax.tree.map(np.testing.assert_array_equal, ga, gx)
