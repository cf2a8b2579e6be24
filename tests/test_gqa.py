"""Plain MHA / GQA / MQA attention (layers/gqa.py): shapes, a numpy reference, causality, the decode
cache against the full forward, parameter counts and KV-cache bytes per token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moe_jax import config as model_config
from moe_jax.layers import gqa
from moe_jax.layers.gqa import GQA
from moe_jax.layers.rope import apply_rope, cos_sin
from moe_jax.model import Transformer


def cfg_with(g, **kw):
  return model_config.tiny(attention_type="gqa", num_key_value_heads=g, **kw)


def reference(cfg, p, x, positions):
  """Attention written out per head in numpy: head h reads key/value head h // (H / G)."""
  n = cfg.qk_nope_head_dim
  cos, sin = cos_sin(positions, cfg)
  rot = lambda t: np.concatenate([t[..., :n], np.asarray(apply_rope(jnp.asarray(t[..., n:]), cos, sin, True))], -1)  # noqa: E731
  q = rot(np.einsum("bsd,dhj->bshj", x, p["q"]))
  k = rot(np.einsum("bsd,dgj->bsgj", x, p["k"]))
  v = np.einsum("bsd,dgv->bsgv", x, p["v"])
  h, g, s = cfg.num_attention_heads, cfg.num_key_value_heads, x.shape[1]
  out = np.zeros(x.shape[:2] + (h, cfg.v_head_dim))
  for head in range(h):
    kv = head // (h // g)
    scores = np.einsum("bsj,btj->bst", q[:, :, head], k[:, :, kv]) * cfg.softmax_scale
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[:, :, head] = np.einsum("bst,btv->bsv", probs, v[:, :, kv])
  return np.einsum("bshv,hvd->bsd", out, p["o"])


@pytest.mark.parametrize("g", [4, 2, 1])  # MHA, GQA-2, MQA over 4 query heads
def test_matches_reference_and_is_causal(g):
  cfg = cfg_with(g)
  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  mod = GQA(cfg)
  v = nn.unbox(mod.init(jax.random.key(0), x, pos))
  p = {k: np.asarray(w) for k, w in v["params"].items()}
  assert p["q"].shape == (64, 4, 24) and p["k"].shape == (64, g, 24) and p["v"].shape == (64, g, 16)
  out = mod.apply(v, x, pos)
  assert out.shape == x.shape
  np.testing.assert_allclose(np.asarray(out), reference(cfg, p, np.asarray(x), pos), rtol=1e-4, atol=1e-5)
  later = x.at[:, 5:].set(7.0)  # changing tokens 5.. leaves outputs 0..4 alone
  np.testing.assert_allclose(np.asarray(mod.apply(v, later, pos))[:, :5], np.asarray(out)[:, :5], atol=1e-6)


def test_gqa_with_one_group_per_head_differs_from_mqa():
  # the grouping is real: the same q/o weights with G=1 (every head on kv head 0) give another output
  x = jax.random.normal(jax.random.key(1), (1, 6, 64))
  pos = jnp.arange(6)[None]
  v4 = nn.unbox(GQA(cfg_with(4)).init(jax.random.key(0), x, pos))
  v1 = {"params": dict(v4["params"], k=v4["params"]["k"][:, :1], v=v4["params"]["v"][:, :1])}
  same = {"params": dict(v4["params"], k=jnp.repeat(v1["params"]["k"], 4, 1), v=jnp.repeat(v1["params"]["v"], 4, 1))}
  np.testing.assert_allclose(GQA(cfg_with(1)).apply(v1, x, pos), GQA(cfg_with(4)).apply(same, x, pos), atol=1e-5)
  assert not np.allclose(GQA(cfg_with(1)).apply(v1, x, pos), GQA(cfg_with(4)).apply(v4, x, pos), atol=1e-3)


@pytest.mark.parametrize("g", [4, 1])
def test_decode_cache_matches_the_full_forward(g):
  cfg = cfg_with(g, first_k_dense_replace=2, num_nextn_predict_layers=0)  # dense: decode compares exactly
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
  full = model.apply({"params": params}, tokens)
  cache = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32), decode=True))["cache"]
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  logits, mut = model.apply({"params": params, "cache": cache}, tokens[:, :6], pos, decode=True, mutable=["cache"])
  steps = [logits]
  for t in range(6, 10):
    logits, mut = model.apply({"params": params, "cache": mut["cache"]}, tokens[:, t:t + 1],
                              jnp.full((2, 1), t), decode=True, mutable=["cache"])
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-4, atol=1e-4)
  # the cache holds G * (J + V) values per token per layer
  leaves = jax.tree.leaves(mut["cache"])
  per_token = sum(x.size for x in leaves) / (2 * 16 * cfg.num_hidden_layers)
  assert per_token == gqa.cache_values_per_token(cfg) == g * (24 + 16)


def test_parameter_counts_and_cache_bytes():
  for cfg in (model_config.tiny(), cfg_with(4), cfg_with(2), cfg_with(1), model_config.tiny(q_lora_rank=None)):
    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    p = shapes["params"]["layers_0"]["attn"]
    assert sum(x.size for x in jax.tree.leaves(p)) == gqa.attention_params(cfg), cfg.attention_type
  mla = model_config.deepseek_v3()
  assert gqa.cache_values_per_token(mla) == 576  # 512 + 64: DeepSeek-V2 section 2.1
  mha = mla.replace(attention_type="gqa", num_key_value_heads=128)
  assert gqa.cache_values_per_token(mha) == 128 * (192 + 128)
  with pytest.raises(ValueError, match="num_key_value_heads"):
    cfg_with(3)
  with pytest.raises(ValueError, match="attention_type"):
    model_config.tiny(attention_type="linear")
