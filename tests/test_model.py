"""The model's own invariants: MLA forms, MoE dispatches, scan/remat/dtypes, packing, router math,
full-size shapes and parameter counts, config validation. Tiny configs, fp32, jitted."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import traverse_util
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

from moe_jax import config as mcfg
from moe_jax.config import ModelConfig
from moe_jax.layers import MoE, Router
from moe_jax.layers.router import balance_loss, select_experts
from moe_jax.model import Transformer

# 1 dense + 2 MoE layers, MTP on; the dense dispatch compiles fastest (the dispatches are compared below).
CFG = mcfg.tiny(num_hidden_layers=3, max_position_embeddings=128, moe_impl="dense")
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 32)), jnp.int32)


def abstract(model, collections=("params", "router")):
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), TOKENS[:, :1])))
  return {c: shapes[c] for c in collections if c in shapes}


def random_variables(shapes, seed=0):
  """Random values for an abstract tree (no init compile): weights N(0, 0.1^2) so routing is
  not tied, norm scales near 1, negative correction biases."""
  rng = np.random.RandomState(seed)
  flat = {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    if path[-1] == "scale":
      flat[path] = 1 + 0.2 * rng.randn(*s.shape)
    elif path[-1] == "e_score_correction_bias":
      flat[path] = -0.2 * rng.rand(*s.shape)
    else:
      flat[path] = (0.3 if path[-1] == "embed" else 0.1) * rng.randn(*s.shape)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), traverse_util.unflatten_dict(flat))


def stack_layers(tree, cfg):
  """An unscanned tree {layers_i: ...} -> the scanned layout {dense_layers, moe_layers} (leading layer axis)."""
  out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
  k = cfg.first_k_dense_replace
  for name, ids in (("dense_layers", range(k)), ("moe_layers", range(k, cfg.num_hidden_layers))):
    layers = [tree[f"layers_{i}"] for i in ids if f"layers_{i}" in tree]
    if layers:
      out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=atol, err_msg=str(k))


@pytest.fixture(scope="module")
def tiny():
  model = Transformer(CFG)
  variables = random_variables(abstract(model))
  logits, mtp = jax.jit(lambda v, t: model.apply(v, t, return_mtp=True))(variables, TOKENS)
  return model, variables, np.asarray(logits), np.asarray(mtp)


# --- MLA ------------------------------------------------------------------------------
def test_prefill_then_decode_equals_teacher_forcing(tiny):
  """Prefill 20 tokens, then decode 12 one at a time from the latent cache, in the absorbed and in
  the expanded form: both give the logits of one full pass."""
  model, variables, full, _ = tiny
  b, s = TOKENS.shape
  prefill = 20
  # The cache has room for s tokens; eval_shape gives its shapes without running anything.
  shapes = jax.eval_shape(lambda: model.apply(variables, TOKENS, decode=True, mutable=["cache"]))[1]["cache"]
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  assert cache["layers_0"]["attn"]["cache"]["latent"].shape == (b, s, CFG.kv_lora_rank)

  @functools.partial(jax.jit, static_argnums=3)
  def step(cache, tokens, positions, absorb):
    return model.apply({**variables, "cache": cache}, tokens, positions, decode=True, absorb=absorb,
                       mutable=["cache"])

  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  first, state = step(cache, TOKENS[:, :prefill], pos[:, :prefill], True)
  np.testing.assert_allclose(first, full[:, :prefill], atol=1e-5, rtol=1e-5)
  for absorb in (True, False):
    cache, got = state["cache"], []
    for i in range(prefill, s):
      logits, new = step(cache, TOKENS[:, i:i + 1], pos[:, i:i + 1], absorb)
      cache = new["cache"]
      got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full[:, prefill:], atol=1e-4, rtol=1e-4)


def test_segment_ids_block_attention_across_documents(tiny):
  model, variables, _, _ = tiny
  run = jax.jit(lambda t, seg, pos: model.apply(variables, t, pos, seg))
  seg = jnp.asarray([[0] * 12 + [1] * 20])
  pos = jnp.asarray([list(range(12)) + list(range(20))])
  packed = run(TOKENS[:1], seg, pos)
  changed = run(TOKENS[:1].at[0, :12].set((TOKENS[0, :12] + 7) % CFG.vocab_size), seg, pos)
  np.testing.assert_array_equal(packed[0, 12:], changed[0, 12:])  # doc 2 does not see doc 1
  assert np.abs(packed[0, :12] - changed[0, :12]).max() > 1e-3
  alone = jax.jit(lambda t: model.apply(variables, t))(TOKENS[:1, 12:])
  np.testing.assert_allclose(packed[0, 12:], alone[0], atol=1e-5)  # and equals doc 2 run alone


# --- MoE dispatch -----------------------------------------------------------------------
MOE_CFG = mcfg.tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, aux_loss_alpha=0.0)


def moe_run(cfg, params, x, r):
  """Forward, gradients wrt params and input of sum(y * r), and the sown intermediates."""
  layer = MoE(cfg)

  def loss(p, x):
    y, state = layer.apply({"params": p, "router": params["router"]}, x, mutable=["intermediates"])
    return jnp.sum(y * r), (y, state["intermediates"])
  (_, (y, inter)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params["params"], x)
  return y, grads, inter


@pytest.fixture(scope="module")
def moe_setup():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 32, MOE_CFG.hidden_size), jnp.float32)
  r = jnp.asarray(rng.randn(2, 32, MOE_CFG.hidden_size), jnp.float32)
  shapes = jax.eval_shape(lambda: nn.unbox(MoE(MOE_CFG).init(jax.random.PRNGKey(0), x)))
  params = random_variables({c: shapes[c] for c in ("params", "router")}, seed=2)
  return x, r, params, moe_run(MOE_CFG.replace(moe_impl="dense"), params, x, r)


@pytest.mark.parametrize("impl", ["ragged", "capacity"])
def test_dispatches_agree_forward_and_gradients(moe_setup, impl):
  x, r, params, (y_ref, g_ref, _) = moe_setup
  y, g, inter = moe_run(MOE_CFG.replace(moe_impl=impl, capacity_factor=8.0), params, x, r)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert_trees_close(g[0], g_ref[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-4, atol=1e-5)
  if impl == "capacity":
    assert float(inter["dropped_tokens"]) == 0.0


def test_capacity_drops_and_counts(moe_setup):
  x, r, params, (y_ref, _, _) = moe_setup
  cfg = MOE_CFG.replace(moe_impl="capacity", capacity_factor=0.5)
  y, _, inter = moe_run(cfg, params, x, r)
  counts = np.asarray(inter["router"]["expert_counts"])
  c = math.ceil(x.shape[0] * x.shape[1] * cfg.num_experts_per_tok / cfg.n_routed_experts * cfg.capacity_factor)
  expected = np.maximum(counts - c, 0).sum()  # each expert keeps its first c assignments
  assert expected > 0 and float(inter["dropped_tokens"]) == expected
  assert np.abs(np.asarray(y) - np.asarray(y_ref)).max() > 1e-3


# --- scan, remat, dtypes ------------------------------------------------------------------
def test_scan_layers_equals_unscanned(tiny):
  model, variables, logits, mtp = tiny
  scanned = Transformer(CFG.replace(scan_layers=True))
  restacked = {c: stack_layers(variables[c], CFG) for c in variables}
  assert jax.tree.map(lambda s: s.shape, abstract(scanned)) == jax.tree.map(jnp.shape, restacked)
  got, got_mtp = jax.jit(lambda v: scanned.apply(v, TOKENS, return_mtp=True))(restacked)
  np.testing.assert_allclose(got, logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_mtp, mtp, atol=1e-5, rtol=1e-5)


def lm_loss_and_grads(cfg, variables):
  model = Transformer(cfg)

  def loss(params):
    logits = model.apply({"params": params, "router": variables["router"]}, TOKENS)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1).mean()
  return jax.jit(jax.value_and_grad(loss))(variables["params"])


REMAT_CFG = mcfg.tiny(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0, moe_impl="dense")


@pytest.fixture(scope="module")
def remat_reference():
  variables = random_variables(abstract(Transformer(REMAT_CFG)), seed=3)
  return variables, lm_loss_and_grads(REMAT_CFG, variables)


@pytest.mark.parametrize("policy, scan", [("full", False), ("ep_rows", True), ("gathered", True), ("gathered", False),
                                         ("gathered_offload", True), ("gathered_offload", False),
                                         ("dots", True), ("dots_no_batch", False)])
def test_remat_policies_same_loss_and_grads(remat_reference, policy, scan):
  variables, (loss_ref, grads_ref) = remat_reference
  cfg = REMAT_CFG.replace(remat_policy=policy, scan_layers=scan)
  if scan:
    variables = {c: stack_layers(v, cfg) for c, v in variables.items()}
    grads_ref = stack_layers(grads_ref, cfg)
  loss, grads = lm_loss_and_grads(cfg, variables)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert_trees_close(grads, grads_ref, rtol=1e-4, atol=1e-6)


def test_bf16_compute_runs_and_is_close(tiny):
  _, variables, logits, _ = tiny
  bf16 = Transformer(CFG.replace(dtype="bfloat16"))
  got = np.asarray(jax.jit(bf16.apply)(variables, TOKENS))
  assert got.dtype == np.float32 and np.isfinite(got).all()
  # bf16 rounding flips a few near-tied expert choices, so compare the bulk, not the worst token.
  assert np.median(np.abs(got - logits)) < 0.01 * np.abs(logits).max()
  assert (got.argmax(-1) == logits.argmax(-1)).mean() > 0.9


# --- router ---------------------------------------------------------------------------
ROUTER_CFG = mcfg.tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)


def select_reference(choice, cfg):
  """The group-limited top-k written out per token."""
  out = []
  for row in choice:
    groups = row.reshape(cfg.n_group, -1)
    group_score = np.sort(groups, -1)[:, -2:].sum(-1) if cfg.scoring_func == "sigmoid" else groups.max(-1)
    keep = np.argsort(-group_score)[:cfg.topk_group]
    masked = np.full_like(groups, -np.inf)
    masked[keep] = groups[keep]
    out.append(np.sort(np.argsort(-masked.reshape(-1))[:cfg.num_experts_per_tok]))
  return np.stack(out)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_group_limited_routing(scoring):
  cfg = ROUTER_CFG.replace(scoring_func=scoring, topk_method="noaux_tc" if scoring == "sigmoid"
                           else "group_limited_greedy", norm_topk_prob=scoring == "sigmoid")
  scores = np.random.RandomState(4).rand(64, 16).astype(np.float32)
  bias = np.zeros(16, np.float32)
  idx = np.sort(np.asarray(select_experts(jnp.asarray(scores), jnp.asarray(bias), cfg)), -1)
  np.testing.assert_array_equal(idx, select_reference(scores, cfg))
  assert max(len(set(row // cfg.experts_per_group)) for row in idx) <= cfg.topk_group
  ungrouped = cfg.replace(n_group=1, topk_group=1)
  free = np.sort(np.asarray(select_experts(jnp.asarray(scores), jnp.asarray(bias), ungrouped)), -1)
  assert (free != idx).any()  # the group limit matters for these scores


def router_apply(cfg, kernel, bias, x):
  router = Router(cfg)
  return router.apply({"params": {"kernel": kernel}, "router": {"e_score_correction_bias": bias}}, x,
                      mutable=["intermediates", "losses"])


def test_bias_selects_but_does_not_weight():
  cfg = ROUTER_CFG
  rng = np.random.RandomState(5)
  x = jnp.asarray(rng.randn(2, 32, cfg.hidden_size), jnp.float32)
  kernel = jnp.asarray(0.2 * rng.randn(cfg.hidden_size, 16), jnp.float32)
  bias = jnp.asarray(-0.5 * rng.rand(16), jnp.float32)
  (w0, i0), _ = router_apply(cfg, kernel, jnp.zeros(16), x)
  (w1, i1), _ = router_apply(cfg, kernel, bias, x)
  assert (np.sort(i0, -1) != np.sort(i1, -1)).any()
  scores = jax.nn.sigmoid(x @ kernel)  # unbiased
  for w, i in ((w0, i0), (w1, i1)):
    s = np.take_along_axis(np.asarray(scores), np.asarray(i), -1)
    np.testing.assert_allclose(w, s / s.sum(-1, keepdims=True) * cfg.routed_scaling_factor, rtol=1e-5)
  (w2, i2), _ = router_apply(cfg, kernel, jnp.full(16, -0.3), x)  # a uniform shift changes nothing
  np.testing.assert_array_equal(i2, i0)
  np.testing.assert_allclose(w2, w0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sequence", "expert"])
def test_balance_loss_matches_hand_computation(kind):
  cfg = ROUTER_CFG.replace(balance_loss=kind, aux_loss_alpha=0.01)
  rng = np.random.RandomState(6)
  x = jnp.asarray(rng.randn(3, 16, cfg.hidden_size), jnp.float32)
  kernel = jnp.asarray(0.2 * rng.randn(cfg.hidden_size, 16), jnp.float32)
  (_, idx), state = router_apply(cfg, kernel, jnp.zeros(16), x)
  scores = np.asarray(jax.nn.sigmoid(x @ kernel), np.float64)
  idx = np.asarray(idx)
  e, k = 16, cfg.num_experts_per_tok
  probs = scores / scores.sum(-1, keepdims=True)

  def f_p(rows, sel):  # DeepSeek-V3 eq. 18-19: f_i = E/(K T) #tokens choosing i;  P_i = mean s'_i
    f = np.array([sum(i in row for row in sel) for i in range(e)]) * e / (k * len(sel))
    return f, rows.mean(0)
  if kind == "sequence":
    want = np.mean([(lambda f, p: (f * p).sum())(*f_p(probs[b], idx[b])) for b in range(3)])
  else:
    f, p = f_p(probs.reshape(-1, e), idx.reshape(-1, k))
    want = (f * p).sum()
  got = float(state["losses"]["balance_loss"])
  np.testing.assert_allclose(got, cfg.aux_loss_alpha * want, rtol=1e-5)
  np.testing.assert_allclose(balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(idx), cfg), want, rtol=1e-5)
  counts = np.asarray(state["intermediates"]["expert_counts"])
  np.testing.assert_array_equal(counts, np.bincount(idx.reshape(-1), minlength=e))


# --- full-size shapes and parameter counts ---------------------------------------------
def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def hf_count(cfg: ModelConfig) -> int:
  hf_config = cfg.to_hf()
  cls, config_cls = ((DeepseekV3ForCausalLM, DeepseekV3Config) if cfg.scoring_func == "sigmoid"
                     else (DeepseekV2ForCausalLM, DeepseekV2Config))
  with torch.device("meta"):
    return sum(p.numel() for p in cls(config_cls(**hf_config)).parameters())


def test_deepseek_v3_full_size_shapes_and_count():
  cfg = mcfg.deepseek_v3(scan_layers=True)  # released values, MTP on; scanned, so tracing takes ~1 s
  params = abstract(Transformer(cfg))["params"]
  assert params["moe_layers"]["moe"]["gate"].shape == (58, 256, 7168, 2048)
  assert params["dense_layers"]["attn"]["kv_a"].shape == (3, 7168, 512 + 64)
  main = count({k: v for k, v in params.items() if not k.startswith("mtp_")})
  hf_main = hf_count(cfg)
  assert main == hf_main and round(main / 1e9) == 671  # DeepSeek-V3: 671B main-model parameters
  # MTP = one HF decoder layer (MoE) + enorm + hnorm + shared_head.norm + eh_proj; embedding and head are shared.
  d = cfg.hidden_size
  with torch.device("meta"):
    hf_config = DeepseekV3Config(**cfg.to_hf())
    layer = sum(p.numel() for p in DeepseekV3DecoderLayer(hf_config, cfg.num_hidden_layers).parameters())
  assert count(params) == hf_main + layer + 3 * d + 2 * d * d
  no_mtp = abstract(Transformer(cfg.replace(num_nextn_predict_layers=0)))["params"]
  assert count(no_mtp) == hf_main


def test_deepseek_v2_lite_count():
  cfg = mcfg.deepseek_v2_lite()
  params = abstract(Transformer(cfg.replace(scan_layers=True)))["params"]
  assert count(params) == hf_count(cfg) and round(count(params) / 1e8) == 157  # 15.7B


# --- config validation ----------------------------------------------------------------
@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(topk_group=5, n_group=4), "topk_group"),
    (dict(num_experts_per_tok=5, n_group=4, topk_group=1), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="best"), "topk_method"),
    (dict(moe_impl="sparse"), "moe_impl"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(first_k_dense_replace=3), "first_k_dense_replace"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(dtype="float33"), "dtype"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(n_routed_experts=8, n_group=8, topk_group=2), "n_group"),  # sigmoid groups need >= 2 experts
    (dict(scan_layers=True, moe_layer_freq=2, num_hidden_layers=3), "scan_layers"),
    (dict(balance_loss="token"), "balance_loss"),
])
def test_config_validation_names_the_field(changes, field):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}:"):
    mcfg.tiny(**changes)


def test_config_round_trips():
  for name, preset in mcfg.PRESETS.items():
    cfg = preset()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg, name
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name
