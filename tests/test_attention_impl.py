"""MLA expanded attention: every attention_impl equals 'einsum' (forward and gradients), and 'auto' resolves
by the target of the mesh in context. The Pallas kernels run interpreted on CPU (layers/attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config as mc
from moe_jax import target
from moe_jax.layers import attention
from moe_jax.layers.mla import MLA, attention_impl
from moe_jax.model import Transformer

# (impl, v_head_dim): v below and above qk_head_dim = 24 (dot_product and pallas_gpu pad one side; splash
# takes v's head dim as it is). Splash at v 16 runs in test_model_and_decode and tests/test_flash_attention.py.
CASES = [("dot_product", 16), ("dot_product", 40), ("splash", 40), ("pallas_gpu", 40)]


@pytest.mark.parametrize("impl,v_head_dim", CASES)
@pytest.mark.parametrize("packed", [False, True])
def test_mla_impl_matches_einsum(impl, v_head_dim, packed):
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
    return run("einsum"), run(impl)

  (out_e, g_e), (out_k, g_k) = run_both(variables)
  np.testing.assert_allclose(out_k, out_e, atol=1e-5, rtol=1e-5)
  for a, r in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_e)):
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_model_and_decode(impl):
  """Whole model logits; prefill through the kernel, then a decode step in the re-expanded form (absorb=False)."""
  cfg = mc.tiny(attention_impl=impl, num_hidden_layers=1, num_nextn_predict_layers=0)  # attention is the point
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
  for impl in mc.ATTENTION_IMPLS:  # every listed value is accepted
    assert mc.tiny(attention_impl=impl).attention_impl == impl


def _on(monkeypatch, platform, cc=None):
  """Pretend the computation targets `platform` (a GPU of compute capability cc)."""
  tgt = target.Target(platform, f"fake {platform}", cc)
  monkeypatch.setattr(target, "current", lambda mesh=None: tgt)


def test_sdpa_implementation_picks_cudnn_only_where_it_applies(monkeypatch):
  """jax.nn.dot_product_attention defaults to XLA even on GPU: MLA asks for cuDNN where it fits."""
  assert attention.sdpa_implementation(jnp.bfloat16, 128) is None  # this host: CPU
  _on(monkeypatch, "gpu", "8.0")  # A100: cuDNN flash up to head dim 128
  assert attention.sdpa_implementation(jnp.bfloat16, 128) == "cudnn"
  assert attention.sdpa_implementation(jnp.float16, 64) == "cudnn"
  assert attention.sdpa_implementation(jnp.float32, 128) is None  # cuDNN flash: half precision only
  assert attention.sdpa_implementation(jnp.bfloat16, 192) is None  # over its head-size limit before Hopper
  assert attention.sdpa_implementation(jnp.bfloat16, 100) is None  # not a multiple of 8
  _on(monkeypatch, "gpu", "9.0")  # H100: up to 256
  assert attention.sdpa_implementation(jnp.bfloat16, 192) == "cudnn"
  assert attention.sdpa_implementation(jnp.bfloat16, 264) is None
  _on(monkeypatch, "tpu")
  assert attention.sdpa_implementation(jnp.bfloat16, 128) is None


def test_auto_resolves_by_target(monkeypatch):
  v3 = mc.deepseek_v3(dtype="bfloat16")  # qk head 192, v 128
  assert mc.tiny().attention_impl == "auto"
  assert attention_impl(v3) == "einsum"  # this host: CPU
  assert attention_impl(v3.replace(attention_impl="splash")) == "splash"  # explicit values stay
  _on(monkeypatch, "tpu")
  assert attention_impl(v3) == attention_impl(v3, packed=True) == attention_impl(mc.tiny()) == "splash"
  _on(monkeypatch, "gpu", "9.0")
  assert attention_impl(v3) == "dot_product"  # cuDNN takes 192 on Hopper
  assert attention_impl(v3, packed=True) == "pallas_gpu"  # cuDNN would need a [B, 1, S, S] mask
  assert attention_impl(mc.tiny()) == "einsum"  # fp32
  _on(monkeypatch, "gpu", "8.0")
  assert attention_impl(v3) == "pallas_gpu"  # 192 > 128 before Hopper
  assert attention_impl(mc.tiny(dtype="bfloat16")) == "dot_product"  # padded head 24


def test_kernel_on_the_wrong_accelerator_is_an_error(monkeypatch):
  q = jnp.zeros((1, 4, 2, 8))
  args = (q, q[..., :4], q, q[:, :, 0, :4], q, 1.0)  # q_nope, q_rope, k_nope, k_rope, v, scale
  _on(monkeypatch, "gpu", "9.0")
  with pytest.raises(ValueError, match="splash.*runs on tpu"):
    attention.attend("splash", *args)
  _on(monkeypatch, "tpu")
  with pytest.raises(ValueError, match="pallas_gpu.*runs on gpu"):
    attention.attend("pallas_gpu", *args)
