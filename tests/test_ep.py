"""Sharded runs equal the single-device run; expert parallelism moves tokens, not weights.

Every mesh compiles one step (loss, logits, grads, balance statistics) once per dispatch
(shard_util.run_on_mesh caches it for the other tests, test_multiprocess.py included).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import shard_util as su
from moe_jax import sharding
from moe_jax import variables as model_variables
from moe_jax.layers import ep
from moe_jax.layers.moe import MoE, dispatch_ragged
from moe_jax.layers.router import Router

MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 1, 8, 1), (2, 1, 2, 2), (1, 2, 4, 1)]
CFG = su.tiny_config()
TOL = 1e-5


def _mesh_id(shape):
  return "x".join(map(str, shape))


# The TPU layout (sharding.layout_rules): non-expert weights cut over the larger of fsdp / expert only
# (expert on 2x2x2 and 1x2x4, fsdp on 1x4x2).
TPU_LAYOUT = [((2, 2, 2, 1), "ep"), ((1, 2, 4, 1), "ep"), ((1, 2, 4, 1), "ragged"), ((1, 4, 2, 1), "ep")]


@pytest.mark.parametrize("shape,impl,layout", [(s, i, "cpu") for s in MESHES for i in ("ragged", "ep")]
                         + [(s, i, "tpu") for s, i in TPU_LAYOUT],
                         ids=lambda v: _mesh_id(v) if isinstance(v, tuple) else v)
def test_matches_single_device(shape, impl, layout):
  """Logits, loss and every gradient leaf within 1e-5 of the single-device result (relative to scale)."""
  out, _ = su.run_on_mesh(CFG.replace(moe_impl=impl), shape, layout)
  ref = su.reference(CFG)
  assert su.max_rel_diff(out["loss"], ref["loss"]) <= TOL
  assert su.max_rel_diff(out["logits"], ref["logits"]) <= TOL
  diffs = jax.tree.map(su.max_rel_diff, out["grads"], ref["grads"])
  worst = max(jax.tree_util.tree_leaves_with_path(diffs), key=lambda kv: kv[1])
  assert worst[1] <= TOL, f"gradient {jax.tree_util.keystr(worst[0])} differs by {worst[1]:.2e}"
  assert out["dropped"] == 0  # capacity_factor 0 (default): dropless


@pytest.mark.parametrize("shape", [(2, 2, 2, 1), (1, 1, 8, 1)], ids=_mesh_id)
def test_balance_statistics_are_global(shape):
  """Expert counts (bias update, load metrics) and the balance loss are the whole batch's, not a shard's."""
  out, _ = su.run_on_mesh(CFG.replace(moe_impl="ep"), shape)
  ref = su.reference(CFG)
  assert set(out["expert_counts"]) == set(ref["expert_counts"]) and out["expert_counts"]
  for name, counts in ref["expert_counts"].items():
    np.testing.assert_array_equal(out["expert_counts"][name], counts)
    assert counts.sum() == su.BATCH * su.SEQ * CFG.num_experts_per_tok
  assert ref["balance"] > 0 and su.max_rel_diff(out["balance"], ref["balance"]) <= TOL


@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (1, 2, 4, 1), (2, 1, 2, 2)], ids=_mesh_id)
def test_hlo_has_all_to_all_and_no_expert_weight_all_gather(shape):
  mesh = sharding.make_mesh(*shape)
  _, hlo = su.run_on_mesh(CFG.replace(moe_impl="ep"), shape)
  assert su.count_op(hlo, "all-to-all") >= 4  # 2 MoE layers (incl. MTP), there and back, fwd + bwd
  assert su.expert_weight_all_gathers(hlo, CFG, mesh) == []


def test_hlo_check_sees_the_all_gather_regression():
  """An expert stack gathered whole along E (what GSPMD once made of 'ragged'): the check must see it."""
  mesh = sharding.make_mesh(1, 1, 8, 1)
  e, d, f = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  gather = jax.jit(lambda w: w * 2, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  hlo = gather.lower(jax.ShapeDtypeStruct((e, d, f), jnp.float32, sharding=spec)).compile().as_text()
  assert su.expert_weight_all_gathers(hlo, CFG, mesh)


def _dispatch_inputs(cfg, tokens, seed=0, skew=None):
  e, d, f, x = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
  ks = jax.random.split(jax.random.key(seed), 6)
  logits = jax.random.normal(ks[0], (tokens, e)) + (0 if skew is None else skew)
  idx = jax.lax.top_k(logits, x)[1].astype(jnp.int32)  # distinct experts per token
  w = jax.random.uniform(ks[1], (tokens, x))
  xs = jax.random.normal(ks[2], (tokens, d))
  gate, up = (0.1 * jax.random.normal(k, (e, d, f)) for k in ks[3:5])
  down = 0.1 * jax.random.normal(ks[5], (e, f, d))
  return xs, w, idx, gate, up, down


def _expected_keep(idx, shards, ep_size, e_local, cap):
  """Numpy model of the drop rule: per token shard, choice-major, at most cap per destination."""
  idx = np.asarray(idx)
  t_local = idx.shape[0] // shards
  keep = np.zeros(idx.shape, bool)
  for s in range(shards):
    used = np.zeros(ep_size, int)
    rows = slice(s * t_local, (s + 1) * t_local)
    for c in range(idx.shape[1]):  # every first choice before any second choice
      for t in range(rows.start, rows.stop):
        dest = idx[t, c] // e_local
        keep[t, c] = used[dest] < cap
        used[dest] += 1
  return keep


def test_capacity_drops_are_counted_and_zeroed():
  """With a small capacity, exactly the assignments past C per (source, destination) drop."""
  cfg = su.tiny_config(capacity_factor=0.5)
  mesh = sharding.make_mesh(2, 1, 4, 1)
  tokens, shards, ep_size = 128, 8, 4
  skew = jnp.array([2.0, 1.5, 0, 0, 0, 0, 0, 0])  # crowd shard 0's experts so its slots overflow
  xs, w, idx, gate, up, down = _dispatch_inputs(cfg, tokens, skew=skew)
  cap = ep.ep_capacity(tokens // shards, ep_size, cfg)
  keep = _expected_keep(idx, shards, ep_size, cfg.n_routed_experts // ep_size, cap)
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    y, stats = jax.jit(lambda *a: ep.dispatch_ep(*a, cfg))(xs, w, idx, gate, up, down)
  assert (~keep).sum() > 0
  assert float(stats["dropped_tokens"]) == (~keep).sum()
  y_ref, _ = dispatch_ragged(xs, w * keep, idx, gate, up, down, cfg)
  assert su.max_rel_diff(y, y_ref) <= TOL


@pytest.mark.parametrize("shape", [(2, 1, 4, 1), (2, 1, 2, 2)], ids=_mesh_id)
def test_dropless_dispatch_under_one_shard_routing(shape):
  """Default (capacity_factor 0): every token to shard 0's experts takes several rounds of the
  fixed buffers; output and gradients (x, routing weights, expert weights) equal ragged."""
  cfg = CFG
  skew = jnp.array([9.0, 9.0, 0, 0, 0, 0, 0, 0])
  xs, w, idx, gate, up, down = _dispatch_inputs(cfg, 64, skew=skew)
  assert (np.asarray(idx) < 2).all()

  def loss(dispatch, xs, w, gate, up, down):
    y, stats = dispatch(xs, w, idx, gate, up, down, cfg)
    return jnp.sum(jnp.sin(y)), stats

  grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)
  with sharding.activation_rules(sharding.make_mesh(*shape), sharding.DEFAULT_RULES):
    (l, stats), g = jax.jit(functools.partial(grad, ep.dispatch_ep))(xs, w, gate, up, down)
  (l_ref, _), g_ref = grad(dispatch_ragged, xs, w, gate, up, down)
  assert float(stats["dropped_tokens"]) == 0 and float(stats["ep_rounds"]) > 1
  assert su.max_rel_diff(l, l_ref) <= TOL
  for a, b in zip(g, g_ref):
    assert su.max_rel_diff(a, b) <= TOL


def test_without_a_mesh_ep_is_ragged():
  xs, w, idx, gate, up, down = _dispatch_inputs(CFG, 24)
  y, stats = ep.dispatch_ep(xs, w, idx, gate, up, down, CFG)
  y_ref, _ = dispatch_ragged(xs, w, idx, gate, up, down, CFG)
  np.testing.assert_array_equal(y, y_ref)
  assert float(stats["dropped_tokens"]) == 0


def _routing_on_mesh(cfg, shape):
  """Router indices [B*S, X] from an expert-parallel MoE layer run on the mesh, and the mesh."""
  mesh = sharding.make_mesh(*shape)
  x = jax.random.normal(jax.random.key(3), (su.BATCH, 16, cfg.hidden_size))
  variables = nn.unbox(MoE(cfg.replace(moe_impl="ragged")).init(jax.random.key(0), x))
  variables = {c: variables[c] for c in ("params", "router")}
  x = jax.device_put(x, sharding.batch_sharding(mesh, 3))
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    def run(v, x):
      _, state = MoE(cfg).apply(v, x, capture_intermediates=lambda m, _: isinstance(m, Router),
                                mutable=["intermediates"])
      return state["intermediates"]["router"]["__call__"][0][1]
    idx = jax.jit(run)(variables, x)
  return np.asarray(idx).reshape(-1, cfg.num_experts_per_tok), mesh


def test_node_limited_routing_reaches_at_most_topk_group_shards():
  """n_group a multiple of the expert axis: groups lie along it, each token reaches <= topk_group shards."""
  cfg = su.tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, moe_impl="ep")
  idx, mesh = _routing_on_mesh(cfg, (2, 1, 4, 1))
  ep_size, e_local = 4, 4
  # Layout: expert e's weights live on expert-axis coordinate e // e_local.
  gate_sharding = sharding.named_shardings(
      model_variables.abstract(cfg), mesh, sharding.DEFAULT_RULES)["params"]["layers_1"]["moe"]["gate"]
  gate_sharding = nn.unbox(gate_sharding)
  for device, index in gate_sharding.devices_indices_map((16, cfg.hidden_size, cfg.moe_intermediate_size)).items():
    coord = int(np.argwhere(mesh.devices == device)[0][2])
    assert range(16)[index[0]] == range(coord * e_local, (coord + 1) * e_local)
  shards_per_token = np.array([len(set(row // e_local)) for row in idx])
  assert shards_per_token.max() <= cfg.topk_group
  assert ep_size > cfg.topk_group


def test_without_groups_tokens_reach_more_shards():
  """The control: the same layer without group limits sends some tokens to more than topk_group shards."""
  cfg = su.tiny_config(n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=4, moe_impl="ep")
  idx, _ = _routing_on_mesh(cfg, (2, 1, 4, 1))
  assert max(len(set(row // 4)) for row in idx) > 2


def test_tokens_not_divisible_by_batch_shards_are_padded():
  """Decoding 3 rows on 8 batch shards: zero-weight padding tokens, the rows' result unchanged."""
  mesh = sharding.make_mesh(2, 1, 4, 1)
  xs, w, idx, gate, up, down = _dispatch_inputs(CFG, 3)
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    y, stats = jax.jit(lambda *a: ep.dispatch_ep(*a, CFG))(xs, w, idx, gate, up, down)
  y_ref, _ = dispatch_ragged(xs, w, idx, gate, up, down, CFG)
  assert y.shape == y_ref.shape and float(stats["dropped_tokens"]) == 0
  assert su.max_rel_diff(y, y_ref) <= TOL


def test_tensor_parallel_on_a_batch_axis_is_rejected():
  mesh = sharding.make_mesh(2, 1, 2, 2)
  rules = sharding.merge_rules([("exp_mlp", "data")])
  xs, w, idx, gate, up, down = _dispatch_inputs(CFG, 16)
  with sharding.activation_rules(mesh, rules):
    with pytest.raises(ValueError, match=r"exp_mlp is sharded over \('data',\), which also shards the batch"):
      jax.eval_shape(lambda *a: ep.dispatch_ep(*a, CFG), xs, w, idx, gate, up, down)


def test_capacity_formula():
  assert ep.ep_capacity(64, 4, su.tiny_config()) == math.ceil(64 * 2 / 4 * 1.25)  # dropless rounds: ep_round_factor
  assert ep.ep_capacity(64, 4, su.tiny_config(ep_round_factor=2.0)) == 64
  cfg = su.tiny_config(capacity_factor=1.25)  # E=8, X=2
  assert ep.ep_capacity(64, 4, cfg) == math.ceil(64 * 2 / 4 * 1.25)
  assert ep.ep_capacity(64, 4, cfg.replace(capacity_factor=8.0)) == 64 * 2  # worst case: nothing drops
  assert ep.ep_capacity(64, 8, cfg.replace(capacity_factor=8.0)) == 64  # one local expert: once per token
