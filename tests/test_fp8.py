"""DeepSeek-V3 fine-grained FP8 (moe_jax/layers/fp8.py): error bounds, outliers, format, model.

The bound the matmul tests hold. e4m3 keeps 3 mantissa bits, so rounding a normal value
to nearest errs by at most u = 2^-4 of it; below the smallest normal 2^-6 the spacing is
a fixed 2^-9, an absolute error of at most 2^-10. A tile with scale s = amax / 448 stores
x / s, hence
  |x^ - x| <= u |x| + eta,   eta = 2^-10 s   (per element, s of its tile or block),
and for one product  |x^ w^ - x w| <= (u|x| + eta_x)|w| + ((1+u)|x| + eta_x)(u|w| + eta_w).
Summed over the contraction (the fp32 accumulation adds at most (K+2) 2^-24 sum |x^||w^|):
  |C^ - C| <= (u|A| + eta_A)|B| + ((1+u)|A| + eta_A)(u|B| + eta_B) + (K+2) 2^-24 (1+u)^2 |A||B|
elementwise, with |A|, |B| the elementwise absolute values as matrices. It holds for the
forward (A = x in 1x128 tiles along K, B = w in 128x128 blocks), the input gradient (dy in
1x128 tiles along N, w^T) and the weight gradient (x^T, dy in 128x1 tiles along tokens).
Normwise, rounding errors of random data are unbiased and uncorrelated with |delta| <= u,
so E delta^2 <= u^2/3 per operand and ||C^ - C|| / ||C|| is about sqrt(2/3) u = 0.051.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config
from moe_jax.layers import fp8
from moe_jax.layers.moe import MoE
from moe_jax.model import Transformer

U = 2.0 ** -4
F32 = jnp.float32


# References and bounds in float64 numpy, independent of the code under test.
def _eta(a, tile_rows: int, tile_cols: int):
  """2^-10 * amax / 448 of each element's tile (tiles of tile_rows x tile_cols over a 2-D array)."""
  a = np.abs(np.asarray(a, np.float64))
  r, c = a.shape
  rp, cp = -(-r // tile_rows) * tile_rows, -(-c // tile_cols) * tile_cols
  t = np.pad(a, ((0, rp - r), (0, cp - c))).reshape(rp // tile_rows, tile_rows, cp // tile_cols, tile_cols)
  amax = np.broadcast_to(t.max((1, 3), keepdims=True), t.shape).reshape(rp, cp)[:r, :c]
  return 2.0 ** -10 * amax / 448.0


def _within_bound(got, a, eta_a, b, eta_b) -> bool:
  """|got - A @ B| <= the elementwise bound of the module docstring."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  aa, ab = np.abs(a), np.abs(b)
  bound = ((U * aa + eta_a) @ ab + ((1 + U) * aa + eta_a) @ (U * ab + eta_b)
           + (a.shape[1] + 2) * 2.0 ** -24 * (1 + U) ** 2 * (aa @ ab))
  return bool(np.all(np.abs(np.asarray(got, np.float64) - a @ b) <= bound))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_matmul_and_gradients_within_e4m3_bound():
  # K = 300 and N = 200 are no multiples of 128: padded edge tiles are exercised.
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (96, 300), F32)
  w = jax.random.normal(kw, (300, 200), F32) / math.sqrt(300)
  r = jax.random.normal(kg, (96, 200), F32)  # dL/dy for L = sum(y * r)

  y, vjp = jax.vjp(lambda x, w: fp8.einsum("mk,kn->mn", x, w, F32), x, w)
  dx, dw = vjp(r)
  x, w, r = (np.asarray(a, np.float64) for a in (x, w, r))

  eta_w = _eta(w, 128, 128)
  assert _within_bound(y, x, _eta(x, 1, 128), w, eta_w)
  assert _within_bound(dx, r, _eta(r, 1, 128), w.T, eta_w.T)
  assert _within_bound(dw, x.T, _eta(x.T, 1, 128), r, _eta(r, 128, 1))
  for got, want in ((y, x @ w), (dx, r @ w.T), (dw, x.T @ r)):
    assert 0.01 < _rel(got, want) <= math.sqrt(2 / 3) * U  # FP8 really ran, and as accurately as predicted

  # The blocked contraction applies each tile's scale exactly: FP8 result == dequantized operands in fp32.
  xq, xs = fp8.quantize_tiles(x)
  wq, ws = fp8.quantize_blocks(w)
  deq = np.asarray(fp8.dequantize_tiles(xq, xs, 300), np.float64) @ np.asarray(fp8.dequantize_blocks(wq, ws))
  np.testing.assert_allclose(y, deq, rtol=1e-5, atol=1e-5 * np.abs(deq).max())


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
def test_grouped_matmul_and_gradients_within_bound(impl):
  """Routed experts: per-expert 128x128 blocks; the weight gradient tiles never straddle two experts."""
  sizes = jnp.array([70, 0, 150, 41, 36], jnp.int32)  # an empty expert, groups not aligned to 128
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, (300, 200), F32)
  w = jax.random.normal(kw, (5, 200, 130), F32) / math.sqrt(200)
  r = jax.random.normal(kg, (300, 130), F32)
  y, vjp = jax.jit(lambda x, w: jax.vjp(lambda x, w: fp8.ragged_dot(x, w, sizes, F32, impl), x, w))(x, w)
  dx, dw = vjp(r)
  y, dx, dw, x, w, r = (np.asarray(a, np.float64) for a in (y, dx, dw, x, w, r))
  bounds = np.cumsum([0, *np.asarray(sizes)])
  for e in range(5):
    rows = slice(bounds[e], bounds[e + 1])
    xe, re = x[rows], r[rows]
    eta_w = _eta(w[e], 128, 128)
    assert _within_bound(y[rows], xe, _eta(xe, 1, 128), w[e], eta_w)
    assert _within_bound(dx[rows], re, _eta(re, 1, 128), w[e].T, eta_w.T)
    if bounds[e + 1] > bounds[e]:
      assert _within_bound(dw[e], xe.T, _eta(xe.T, 1, 128), re, _eta(re, 128, 1))
    else:
      assert np.all(dw[e] == 0)
  # The CPU emulation and the FP8 ragged_dot agree (same quantized operands, fp32 rounding apart).
  other = fp8.ragged_dot(jnp.asarray(x, F32), jnp.asarray(w, F32), sizes, F32,
                         "tiled" if impl == "ragged_dot" else "ragged_dot")
  np.testing.assert_allclose(y, other, rtol=1e-5, atol=1e-5)


def test_outlier_stays_in_its_tile_unlike_per_tensor_scaling():
  """One activation 2^17 times the typical size, at token 3, channel 5 (tile 0 of row 3).

  Per-tensor scaling gives s = 2^17 / 448 for every value: those below 2^-6 s = 4.6 sigma
  become subnormals with absolute error up to 2^-10 s, an rms error of 2^-10 s / sqrt(3)
  = 0.165 sigma, against sqrt(2/3) u >= ~0.04 for fine-grained tiles: >= 3x worse. Fine-grained
  scaling leaves every other tile, and so every other token's output, exactly as without it.
  """
  kx, kw = jax.random.split(jax.random.PRNGKey(2))
  x = jax.random.normal(kx, (256, 512), F32)
  w = jax.random.normal(kw, (512, 256), F32) / math.sqrt(512)
  xo = x.at[3, 5].set(2.0 ** 17)
  ref = np.asarray(xo, np.float64) @ np.asarray(w, np.float64)
  fine, clean = fp8.einsum("md,dn->mn", xo, w, F32), fp8.einsum("md,dn->mn", x, w, F32)

  rows = jnp.arange(256) != 3
  np.testing.assert_array_equal(fine[rows], clean[rows])
  (qo, so), (qc, sc) = fp8.quantize_tiles(xo), fp8.quantize_tiles(x)
  np.testing.assert_array_equal(qo[3, 128:].astype(F32), qc[3, 128:].astype(F32))  # row 3's other tiles
  np.testing.assert_array_equal(so[3, 1:], sc[3, 1:])

  s = 2.0 ** 17 / 448.0
  per_tensor = jnp.clip(xo / s, -448, 448).astype(fp8.E4M3).astype(F32) * s
  wq, ws = fp8.quantize_blocks(w)
  coarse = np.asarray(per_tensor, np.float64) @ np.asarray(fp8.dequantize_blocks(wq, ws), np.float64)
  err_fine, err_coarse = _rel(fine[rows], ref[rows]), _rel(coarse[rows], ref[rows])
  assert err_fine <= math.sqrt(2 / 3) * U
  assert err_coarse > 3 * err_fine, (err_coarse, err_fine)


def test_released_format_round_trip(tmp_path):
  """quantize_blocks gives DeepSeek-V3's (weight e4m3 [out, in], weight_scale_inv [ceil(out/128), ceil(in/128)])."""
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  from moe_jax import hf

  w = jax.random.normal(jax.random.PRNGKey(3), (300, 200), F32) * 0.02
  q, s = fp8.quantize_blocks(w)
  assert q.dtype == jnp.float8_e4m3fn and s.shape == (3, 2) and s.dtype == F32
  path = str(tmp_path / "w.safetensors")
  q_t = torch.from_numpy(np.asarray(q).view(np.uint8).copy()).view(torch.float8_e4m3fn)
  safetensors_torch.save_file({"w.weight": q_t, "w.weight_scale_inv": torch.from_numpy(np.array(s))}, path)
  back = safetensors_torch.load_file(path)
  # DeepSeek's weight_dequant: every 128x128 block of the e4m3 weight times its scale.
  scale = back["w.weight_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
  theirs = (back["w.weight"].to(torch.float32) * scale).numpy()
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_blocks(q, s)), theirs)
  np.testing.assert_array_equal(hf.dequantize_fp8(np.asarray(q), np.asarray(s)), theirs)
  assert np.all(np.abs(theirs - np.asarray(w)) <= U * np.abs(np.asarray(w)) + _eta(w, 128, 128))
  q2, s2 = fp8.quantize_blocks(jnp.asarray(theirs))  # requantizing a dequantized weight is exact
  np.testing.assert_array_equal(q2.astype(F32), q.astype(F32))
  np.testing.assert_allclose(s2, s, rtol=1e-6)


def _tokens(cfg, b=2, s=24):
  return jax.random.randint(jax.random.PRNGKey(4), (b, s), 0, cfg.vocab_size)


def _init(module, *args, seed=0):
  """Variables as module.init draws them (normal(initializer_range), embedding normal(1), norm scales 1,
  zero router bias), drawn by numpy: compiling a jitted init costs more than these tests' models."""
  from flax import linen as nn, traverse_util
  shapes = traverse_util.flatten_dict(nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)))
  rng, std = np.random.default_rng(seed), module.cfg.initializer_range
  def draw(path, s):
    if path[0] == "router" or path[-1] == "scale":
      return jnp.full(s.shape, float(path[-1] == "scale"), s.dtype)
    return jnp.asarray(rng.normal(0.0, 1.0 if path[-1] == "embed" else std, s.shape), s.dtype)
  return traverse_util.unflatten_dict({p: draw(p, s) for p, s in shapes.items()})


def test_tiny_model_fp8_close_to_fp32():
  cfg = config.tiny(num_nextn_predict_layers=0)
  tokens = _tokens(cfg)
  variables = _init(Transformer(cfg), tokens)

  def loss_and_grad(c):
    def loss(params):
      logits = Transformer(c).apply({**variables, "params": params}, tokens)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  (l32, g32), (l8, g8) = loss_and_grad(cfg), loss_and_grad(cfg.replace(fp8=True))
  assert abs(float(l8 - l32)) <= U * abs(float(l32)) and float(l8) != float(l32)
  flat32, flat8 = jax.tree.leaves(g32), jax.tree.leaves(g8)
  err = math.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat8, flat32)))
  assert 0 < err <= U * math.sqrt(sum(float(jnp.sum(a ** 2)) for a in flat32))


def test_moe_dispatches_agree_in_fp8():
  """Same 1x128 token tiles and per-expert blocks in every dispatch: equal up to fp32 rounding."""
  cfg = config.tiny(capacity_factor=8.0, fp8=True)  # nothing drops: capacity equals the dropless ones
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 24, cfg.hidden_size), F32)
  variables = _init(MoE(cfg), x)
  outs = {impl: jax.jit(MoE(cfg.replace(moe_impl=impl)).apply)(variables, x)
          for impl in ("dense", "ragged", "capacity")}
  for out in outs.values():
    np.testing.assert_allclose(out, outs["ragged"], rtol=1e-5, atol=1e-6)
  # Three chained matmuls (gate, up -> h -> down), each off by ~sqrt(2/3) u: ~sqrt(3 * 2/3) u overall.
  exact = MoE(cfg.replace(fp8=False)).apply(variables, x)
  assert 0 < _rel(outs["ragged"], exact) <= math.sqrt(2) * U


def test_fp8_weight_consumed_as_is():
  """An Fp8Weight (checkpoint blocks) gives the FP8 product of its own blocks, and no requantization."""
  kx, kw = jax.random.split(jax.random.PRNGKey(5))
  x = jax.random.normal(kx, (2, 7, 160), F32)
  w = jax.random.normal(kw, (160, 4, 48), F32) * 0.05  # q_b-like: blocks straddle heads (4 * 48 = 192)
  q, s = fp8.quantize_blocks(w.reshape(160, 192))
  kept = fp8.Fp8Weight(q.reshape(160, 4, 48), s)
  assert kept.split == 1
  np.testing.assert_array_equal(fp8.einsum("bsd,dhe->bshe", x, kept, F32), fp8.einsum("bsd,dhe->bshe", x, w, F32))
  np.testing.assert_array_equal(kept.dequantize(), fp8.dequantize_blocks(q, s).reshape(160, 4, 48))
  with pytest.raises(ValueError, match="not a projection"):
    fp8.einsum("bsd,dd->bs", x, w[:, 0, :], F32)
  with pytest.raises(ValueError, match="fp8"):
    config.tiny(fp8="yes")


def _to_released_fp8(path):
  """Rewrites a saved checkpoint as DeepSeek-V3 ships: every projection e4m3 + weight_scale_inv."""
  import json
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  f = path / "model.safetensors"
  tensors = safetensors_torch.load_file(str(f))
  for key in [k for k in tensors if k.endswith(("_proj.weight", "_proj_with_mqa.weight"))]:
    q, s = fp8.quantize_blocks(jnp.asarray(tensors[key].float().numpy()))
    tensors[key] = torch.from_numpy(np.asarray(q).view(np.uint8).copy()).view(torch.float8_e4m3fn)
    tensors[key + "_scale_inv"] = torch.from_numpy(np.array(s))
  safetensors_torch.save_file(tensors, str(f), metadata={"format": "pt"})
  hf_cfg = json.loads((path / "config.json").read_text())
  hf_cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                   "weight_block_size": [128, 128]}
  (path / "config.json").write_text(json.dumps(hf_cfg))


def test_fp8_checkpoint_loads_as_fp8(tmp_path):
  """Released-layout FP8 checkpoint: kept e4m3 + scales, logits = the dequantized load's within FP8 rounding."""
  from flax import traverse_util
  from moe_jax import hf
  cfg = config.tiny(initializer_range=0.05)  # projections large enough to matter in the logits
  tokens = _tokens(cfg)
  hf.save_pretrained(cfg, _init(Transformer(cfg), tokens), tmp_path)
  _to_released_fp8(tmp_path)

  model, deq = hf.load_pretrained(tmp_path)
  kept_model, kept = hf.load_pretrained(tmp_path, keep_fp8=True)
  assert kept_model.cfg.fp8 and not model.cfg.fp8
  flat_deq, flat_kept = traverse_util.flatten_dict(deq["params"]), traverse_util.flatten_dict(kept["params"])
  scales = traverse_util.flatten_dict(kept["fp8_scales"])
  # Every projection of the checkpoint (kv_b split into k_b / v_b, o, experts, MTP eh_proj) is kept,
  # and its blocks are the checkpoint's: dequantized, they are the dequantized load bit for bit.
  assert len(scales) == sum(1 for k in flat_deq if k[-1] in ("q_a", "q_b", "kv_a", "k_b", "v_b", "o", "gate", "up",
                                                           "down", "eh_proj"))
  for path, scale in scales.items():
    assert flat_kept[path].dtype == jnp.float8_e4m3fn, path
    np.testing.assert_array_equal(fp8.Fp8Weight(flat_kept[path], scale).dequantize(), flat_deq[path])
  for path in set(flat_kept) - set(scales):  # router, norms, embedding, head: never FP8
    assert flat_kept[path].dtype == jnp.float32, path

  want = jax.jit(model.apply)(deq, tokens)
  got = jax.jit(kept_model.apply)(kept, tokens)  # FP8 compute on the kept blocks
  assert 0 < _rel(got, want) <= U


def test_kv_b_blocks_split_per_head():
  """kv_b [H*(N+V), K]: with N, V multiples of 128 each head's key and value rows are whole blocks."""
  from moe_jax import hf
  rule = hf.Rule("kv_b_proj.weight", "kv_b", ((("params", "k_b"), ()), (("params", "v_b"), ())))
  for (k, h, n, v), splits in (((256, 2, 128, 256), True), ((256, 4, 64, 64), False)):
    slot_shapes = [(k, h, n), (k, h, v)]
    q, s = (np.asarray(a) for a in fp8.quantize_blocks(jax.random.normal(jax.random.PRNGKey(7), (h * (n + v), k))))
    kept = rule.to_ours_fp8(q, s, slot_shapes)
    if not splits:  # blocks straddle key and value rows: the loader dequantizes instead
      assert kept is None
      continue
    for (kq, ks), want in zip(kept, rule.to_ours(hf.dequantize_fp8(q, s), slot_shapes)):
      np.testing.assert_array_equal(fp8.Fp8Weight(jnp.asarray(kq), jnp.asarray(ks)).dequantize(), want)
