"""Flash-attention kernels of layers/attention.py: the TPU splash and Pallas GPU kernels (interpreted on CPU)
equal the einsum reference across several tiles, causal and within packed documents, forward and
gradients; inside a mesh they run in shard_map; compiled for a TPU topology the Mosaic kernels appear
and no [.., S, S] score tensor does."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config as mc
from moe_jax import sharding
from moe_jax.layers import attention
from moe_jax.layers.mla import MLA

B, H, N, R, V = 2, 2, 16, 8, 16


def inputs(batch: int, length: int):
  ks = jax.random.split(jax.random.key(0), 5)
  shapes = [(batch, length, H, N), (batch, length, H, R), (batch, length, H, N), (batch, length, R),
            (batch, length, H, V)]
  return [jax.random.normal(k, s) for k, s in zip(ks, shapes)]


def attend_and_grads(impl, args, seg):
  f = lambda *a: attention.attend(impl, *a, 0.3, segment_ids_BS=seg)  # noqa: E731
  dy = jax.random.normal(jax.random.key(9), args[0].shape[:3] + (V,))
  return f(*args), jax.grad(lambda *a: jnp.sum(f(*a) * dy), argnums=tuple(range(5)))(*args)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_kernel_matches_einsum_across_tiles(impl):
  """S = 300: padded to 384, three 128-row tiles (splash) and documents that cross tile edges."""
  s = 300
  args = inputs(B, s)
  seg = jnp.array([[0] * 70 + [1] * 150 + [2] * 80, [5] * 300], jnp.int32)
  for segment_ids in (None, seg):
    (out, grads), (ref, ref_grads) = jax.jit(lambda a, sg: (attend_and_grads(impl, a, sg),
                                                            attend_and_grads("einsum", a, sg)))(args, segment_ids)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_bf16_kernel_at_highest_precision():
  """bf16 under jax_default_matmul_precision='highest' (conftest): the kernels run at the default precision
  (Mosaic rejects bf16 matmuls at HIGHEST), forward and backward, and still match the fp32 reference."""
  args = inputs(B, 128)
  seg = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 64)[None].repeat(B, 0)
  half = [a.astype(jnp.bfloat16) for a in args]
  (out, grads), (ref, ref_grads) = jax.jit(lambda a, h: (attend_and_grads("splash", h, seg),
                                                         attend_and_grads("einsum", a, seg)))(args, half)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), r, atol=0.15, rtol=5e-2)


@pytest.mark.parametrize("batch", [4, 2])  # 4: batch over data x fsdp; 2: fsdp does not divide it, left out
def test_kernel_inside_a_mesh_runs_in_shard_map(batch):
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  args = inputs(batch, 128)
  seg = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 64)[None].repeat(batch, 0)
  ref = attention.attend("einsum", *args, 0.3, segment_ids_BS=seg)
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    f = jax.jit(lambda *a: attention.attend("splash", *a, 0.3, segment_ids_BS=seg))
    assert "shard_map" in str(jax.make_jaxpr(f)(*args))
    out = f(*args)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


# --- compiled for a TPU topology (libtpu, compile only) ----------------------------------------------
SCORES = r"(?:f32|bf16)\[[0-9,]*{s},{s}\]"  # an array whose two minor dims are [S, S]: attention scores


@pytest.fixture(scope="module")
def tpu_devices():
  """8 compile-only v5p chips (moe_jax.aot's topology names)."""
  from moe_jax import aot
  try:
    return aot.parse_topology("v5:2x2x2").devices()
  except aot.UserError as e:  # no libtpu on this host
    pytest.skip(str(e))


def compile_mla_layer(cfg, devices, batch: int, length: int) -> str:
  """HLO text of the tiny MLA layer's forward + backward (packed documents), compiled for `devices`."""
  from flax import linen as nn
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=devices)
  rules = sharding.DEFAULT_RULES
  mla = MLA(cfg)
  x = jax.ShapeDtypeStruct((batch, length, cfg.hidden_size), jnp.bfloat16, sharding=sharding.batch_sharding(mesh, 3))
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
  boxed = jax.eval_shape(mla.init, jax.random.key(0), x, ids, ids)
  params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), nn.unbox(boxed)["params"],
                        nn.unbox(sharding.named_shardings(boxed, mesh, rules))["params"])
  loss = lambda p, x, pos, seg: jnp.sum(mla.apply({"params": p}, x, pos, seg).astype(jnp.float32) ** 2)  # noqa: E731
  with sharding.activation_rules(mesh, rules):
    return jax.jit(jax.grad(loss)).lower(params, x, ids, ids).compile().as_text()


def test_tpu_compile_uses_mosaic_splash_and_no_score_tensor(tpu_devices):
  cfg = mc.tiny(dtype="bfloat16")  # 'auto': the TPU mesh in context picks splash
  s = 256
  hlo = compile_mla_layer(cfg, tpu_devices, 4, s)
  assert hlo.count("tpu_custom_call") >= 3  # splash forward, dq and dkv kernels
  assert not re.findall(SCORES.format(s=s), hlo)
  # The check can fail: the einsum path holds [B, H, S, S] scores.
  assert re.findall(SCORES.format(s=s), compile_mla_layer(cfg.replace(attention_impl="einsum"), tpu_devices, 4, s))
