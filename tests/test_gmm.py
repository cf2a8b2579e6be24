"""Every grouped matmul (tiled CPU loops, Pallas kernels) equals jax.lax.ragged_dot, forward and backward.

The Mosaic GPU kernels of moe_gmm='pallas' need a Hopper GPU: benchmarks/gmm_gpu.py checks them
there against ragged_dot (BENCHMARKS.md). Here the TPU kernel (megablox) runs in the Pallas
interpreter through the same entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import gmm, gmm_pallas


def _problem(seed, m=300, d=24, f=40, e=6, used=None, empty=(2,)):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (m, d))
  w = jax.random.normal(k[1], (e, d, f)) / np.sqrt(d)
  used = m if used is None else used
  ids = jnp.sort(jax.random.randint(k[2], (used,), 0, e))
  for g in empty:
    ids = jnp.where(ids == g, (g + 1) % e, ids)
  ids = jnp.sort(ids)
  sizes = jnp.zeros((e,), jnp.int32).at[ids].add(1)
  dy = jax.random.normal(k[3], (m, f))
  return x, w, sizes, dy


@pytest.mark.parametrize("tile", [16, 32, 128])
@pytest.mark.parametrize("used", [300, 217])  # 217: rows past sum(sizes) must come out zero
def test_tiled_matches_ragged_dot(tile, used):
  x, w, sizes, dy = _problem(0, used=used)
  ref = jax.lax.ragged_dot(x, w, sizes)
  out = jax.jit(lambda x, w, s: gmm.grouped_matmul(x, w, s, "tiled", tile))(x, w, sizes)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(out[used:]).max(initial=0.0)) == 0.0

  def loss(impl):
    return lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, sizes, impl, tile) * dy)

  gx, gw = jax.jit(jax.grad(loss("tiled"), argnums=(0, 1)))(x, w)
  rx, rw = jax.grad(loss("ragged_dot"), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(gw, rw, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(gw[2]).max()) == 0.0  # the empty group gets no gradient


def test_swiglu_bf16_close_to_fp32():
  x, w, sizes, _ = _problem(1, d=32, f=32)
  up = w * 0.5
  down = jnp.swapaxes(w, 1, 2)
  ref = gmm.grouped_swiglu(x, sizes, w, up, down, "ragged_dot")
  b = lambda a: a.astype(jnp.bfloat16)
  out = gmm.grouped_swiglu(b(x), sizes, b(w), b(up), b(down), "tiled")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1, rtol=0.05)


def test_auto_and_bad_impl():
  assert gmm.choose("auto") == {"cpu": "tiled", "tpu": "pallas"}.get(jax.default_backend(), "ragged_dot")
  with pytest.raises(ValueError, match="unknown implementation 'fast'"):
    gmm.choose("fast")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU answers of the pallas switch")
def test_pallas_on_cpu_is_a_clear_error_and_auto_keeps_tiled():
  x, w, sizes, _ = _problem(0, d=128, f=128)
  assert gmm.choose("auto", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) == "tiled"
  with pytest.raises(ValueError, match="needs a Hopper GPU"):
    gmm.grouped_matmul(x, w, sizes, "pallas")


def test_pallas_shape_and_dtype_checks():
  b = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
  x, w, _, _ = _problem(0, d=128, f=384)
  assert gmm_pallas.check(b(x), b(w)) is None
  assert "F=40" in gmm_pallas.check(*map(b, _problem(0, d=128)[:2]))
  assert "bfloat16 or float16" in gmm_pallas.check(x, w)


@pytest.mark.parametrize("m,used", [(256, 256), (256, 217), (200, 150)])  # 200: rows padded to the row tile
def test_pallas_megablox_interpreted_matches_ragged_dot(m, used):
  """The TPU kernel (megablox gmm + tgmm VJP) in the Pallas interpreter: values and gradients."""
  x, w, sizes, dy = _problem(4, m=m, d=128, f=128, e=4, used=used, empty=(2,))
  fn = lambda x, w: gmm_pallas.grouped_matmul(x, w, sizes, interpret=True)  # noqa: E731
  np.testing.assert_allclose(fn(x, w), jax.lax.ragged_dot(x, w, sizes), atol=1e-4, rtol=1e-4)
  got = jax.grad(lambda x, w: jnp.sum(fn(x, w) * dy), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes) * dy), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("tile", [16, 64, 512])  # 512 > M: the rows get padded up to a tile
@pytest.mark.parametrize("used", [300, 217])
def test_fused_swiglu_matches_ragged_dot(tile, used):
  """The one-pass tiled SwiGLU (bulk + tail tiles, custom_vjp) equals three ragged_dots, values and grads."""
  x, w, sizes, _ = _problem(2, used=used, empty=(2, 4))
  up = w[::-1] * 0.7
  down = jnp.swapaxes(w, 1, 2)[:, :, :24] * 1.3  # [E, F, D]
  dy = jax.random.normal(jax.random.key(3), (x.shape[0], 24))

  def loss(impl):
    return lambda *a: jnp.sum(gmm.grouped_swiglu(a[0], sizes, *a[1:], impl=impl, tile=tile) * dy)

  args = (x, w, up, down)
  out = jax.jit(lambda *a: gmm.grouped_swiglu(a[0], sizes, *a[1:], impl="tiled", tile=tile))(*args)
  ref = gmm.grouped_swiglu(x, sizes, w, up, down, "ragged_dot")
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(out[used:]).max(initial=0.0)) == 0.0
  got = jax.jit(jax.grad(loss("tiled"), argnums=(0, 1, 2, 3)))(*args)
  want = jax.grad(loss("ragged_dot"), argnums=(0, 1, 2, 3))(*args)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(got[0][used:]).max(initial=0.0)) == 0.0
  assert all(float(jnp.abs(g[e]).max()) == 0.0 for g in got[1:] for e in (2, 4))  # empty groups: no gradient


def test_tail_tiles_cover_every_row():
  """Schedule: every row of every group lies in exactly one tile of its group (sizes around the bulk tile)."""
  sizes = jnp.array([0, 1, 15, 16, 17, 63, 64, 65, 128, 200], jnp.int32)
  m = int(sizes.sum())
  owner = np.full(m, -1)
  for t, count, g, start, lo, hi in gmm._schedule(sizes, m, 64):
    for i in range(int(count)):
      assert 0 <= int(start[i]) and int(start[i]) + t <= m and int(lo[i]) < min(int(hi[i]), t)
      rows = np.arange(int(start[i]) + int(lo[i]), int(start[i]) + min(t, int(hi[i])))
      assert (owner[rows] == -1).all()
      owner[rows] = int(g[i])
  np.testing.assert_array_equal(owner, np.repeat(np.arange(10), np.asarray(sizes)))
