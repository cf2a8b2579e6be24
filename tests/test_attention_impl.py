"""MLA expanded attention: attention_impl 'dot_product' (jax.nn.dot_product_attention) equals 'einsum'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config as mc
from moe_jax.layers.mla import MLA
from moe_jax.model import Transformer


@pytest.mark.parametrize("v_head_dim", [16, 40])  # below and above qk_head_dim = 24: q/k or v get padded
@pytest.mark.parametrize("packed", [False, True])
def test_mla_dot_product_matches_einsum(v_head_dim, packed):
  cfg = mc.tiny(v_head_dim=v_head_dim)
  b, s = 2, 12
  x = jax.random.normal(jax.random.key(0), (b, s, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  seg = jnp.array([[0] * 5 + [1] * 7, [0] * 12]) if packed else None
  variables = MLA(cfg).init(jax.random.key(1), x, pos, seg)

  @jax.jit
  def run_both(variables):
    def run(impl):
      mla = MLA(cfg.replace(attention_impl=impl))
      out = mla.apply(variables, x, pos, seg)
      grads = jax.grad(lambda p: jnp.sum(mla.apply({"params": p}, x, pos, seg) ** 2))(variables["params"])
      return out, grads
    return run("einsum"), run("dot_product")

  (out_e, g_e), (out_d, g_d) = run_both(variables)
  np.testing.assert_allclose(out_d, out_e, atol=1e-5, rtol=1e-5)
  for a, r in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_e)):
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


def test_model_and_decode_with_dot_product():
  """Whole model logits, and a decode step in the re-expanded form (absorb=False) that uses it too."""
  cfg = mc.tiny(attention_impl="dot_product", num_hidden_layers=1, num_nextn_predict_layers=0)  # attention is the point
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  variables = Transformer(cfg).init(jax.random.key(3), tokens)
  ref = Transformer(cfg.replace(attention_impl="einsum")).apply(variables, tokens)
  np.testing.assert_allclose(Transformer(cfg).apply(variables, tokens), ref, atol=1e-5, rtol=1e-5)

  model = Transformer(cfg)
  cache = model.init(jax.random.key(0), jnp.zeros((2, 10), jnp.int32), decode=True)["cache"]
  params = {k: v for k, v in variables.items() if k != "cache"}
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  _, mut = model.apply({**params, "cache": cache}, tokens[:, :9], pos, decode=True, mutable=["cache"])
  step = model.apply({**params, "cache": mut["cache"]}, tokens[:, 9:], jnp.full((2, 1), 9), decode=True,
                     absorb=False, mutable=["cache"])[0]
  np.testing.assert_allclose(step[:, 0], ref[:, 9], atol=1e-4, rtol=1e-4)


def test_bad_attention_impl():
  with pytest.raises(ValueError, match="attention_impl"):
    mc.tiny(attention_impl="flash")


def test_sdpa_implementation_picks_cudnn_only_where_it_applies(monkeypatch):
  """jax.nn.dot_product_attention defaults to XLA even on GPU: MLA asks for cuDNN where it fits."""
  from moe_jax.layers import mla
  assert mla.sdpa_implementation(jnp.bfloat16, 128) is None or jax.default_backend() == "gpu"
  monkeypatch.setattr(mla.jax, "default_backend", lambda: "gpu")
  assert mla.sdpa_implementation(jnp.bfloat16, 128) == "cudnn"
  assert mla.sdpa_implementation(jnp.float16, 64) == "cudnn"
  assert mla.sdpa_implementation(jnp.float32, 128) is None  # cuDNN flash: half precision only
  assert mla.sdpa_implementation(jnp.bfloat16, 192) is None  # over its head-size limit
  assert mla.sdpa_implementation(jnp.bfloat16, 100) is None  # not a multiple of 8


def test_auto_attention_resolves_to_cudnn_shapes_only(monkeypatch):
  from moe_jax.layers import mla
  bf16 = mc.tiny(dtype="bfloat16")  # qk 24, v 16: padded width 24
  assert mc.tiny().attention_impl == "auto"
  assert mla.attention_impl(bf16) == ("dot_product" if jax.default_backend() == "gpu" else "einsum")
  monkeypatch.setattr(mla.jax, "default_backend", lambda: "gpu")
  assert mla.attention_impl(bf16) == "dot_product"
  assert mla.attention_impl(mc.tiny()) == "einsum"  # fp32
  assert mla.attention_impl(mc.deepseek_v3(dtype="bfloat16")) == "einsum"  # qk head 192 > 128
  assert mla.attention_impl(bf16.replace(attention_impl="einsum")) == "einsum"
