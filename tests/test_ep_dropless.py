"""'ep' drops nothing: on data x expert meshes it equals the single-device dropless result under
adversarial routing (forced by the router's correction bias), in buffers of a fixed size.

Each (config, mesh) compiles one step (loss, logits, grads) once; routing cases share it.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import shard_util as su
from moe_jax import hlo_text, sharding, variables as model_variables
from moe_jax.config import dropless
from moe_jax.evaluate import for_eval
from moe_jax.layers import ep
from moe_jax.layers.moe import MoE, dispatch_ragged
from moe_jax.model import Transformer

CFG = su.tiny_config(moe_impl="ep")  # E=8 in 4 groups of 2, X=2, topk_group=2, MTP depth 1
TOL = 1e-5
T_LOCAL = su.BATCH * su.SEQ // 8  # tokens per device: the batch axes hold all 8 devices here


def biased(cfg, experts, seed=0):
  """The shared test variables with the correction bias pushing every token to `experts`."""
  v = su.host_variables(cfg, seed)
  bias = jnp.zeros((cfg.n_routed_experts,), jnp.float32).at[jnp.asarray(experts)].set(10.0)
  return {**v, "router": jax.tree.map(lambda b: jnp.broadcast_to(bias, b.shape).astype(b.dtype), v["router"])}


@functools.lru_cache(maxsize=None)
def compiled_step(cfg, shape, layout="cpu"):
  mesh = sharding.make_mesh(*shape)
  compiled, variables, toks = su.sharded_step(cfg, mesh, sharding.layout_rules(dict(mesh.shape), layout))
  return compiled, jax.tree.map(lambda a: a.sharding, variables), toks


def run_mesh(cfg, shape, variables, layout="cpu"):
  compiled, shardings, toks = compiled_step(cfg, shape, layout)
  return jax.tree.map(np.asarray, compiled(jax.device_put(variables, shardings), toks))


def run_reference(cfg, variables, toks=None):
  step = jax.jit(su.step_fn(Transformer(cfg.replace(moe_impl="ragged", capacity_factor=0.0))))
  return jax.tree.map(np.asarray, step(variables, su.tokens(cfg) if toks is None else toks))


def assert_equal(out, ref, tol=TOL):
  assert su.max_rel_diff(out["loss"], ref["loss"]) <= tol
  assert su.max_rel_diff(out["logits"], ref["logits"]) <= tol
  diffs = jax.tree_util.tree_leaves_with_path(jax.tree.map(su.max_rel_diff, out["grads"], ref["grads"]))
  diffs = [(jax.tree_util.keystr(p), d) for p, d in diffs]
  name, worst = max(diffs, key=lambda kv: kv[1])
  assert worst <= tol, f"gradient {name} differs by {worst:.2e}"


def routed_shards(variables, cfg, e_local):
  """Per token, the set of shards its routed experts live on (single device, for the case check)."""
  _, state = Transformer(cfg.replace(moe_impl="ragged")).apply(
      variables, su.tokens(cfg), capture_intermediates=lambda m, _: type(m).__name__ == "Router",
      mutable=["intermediates"])
  flat = jax.tree_util.tree_leaves_with_path(state["intermediates"])
  idx = [np.asarray(v) for p, v in flat if jax.tree_util.keystr(p).endswith("[1]")]
  return [{tuple(sorted(set(row // e_local))) for row in i.reshape(-1, cfg.num_experts_per_tok)} for i in idx]


# (mesh, experts the bias favours, what every token then reaches)
CASES = {
    "one_expert": ((2, 1, 4, 1), [0]),  # every token's first choice is expert 0
    "one_shard": ((2, 1, 4, 1), [0, 1]),  # both choices on shard 0 (E/P = 2): P times the balanced load
    "one_group": ((1, 1, 8, 1), [2, 3]),  # group 1 (experts 2, 3) on shards 2 and 3 of 8
    # TPU layout (sharding.layout_rules): non-expert weights over `expert` only, copied over `fsdp`
    "one_shard_tpu_layout": ((1, 2, 4, 1), [0, 1]),
}


@pytest.mark.parametrize("case", CASES)
def test_adversarial_routing_matches_one_device(case):
  shape, experts = CASES[case]
  v = biased(CFG, experts)
  e_local = CFG.n_routed_experts // shape[2]
  reached = routed_shards(v, CFG, e_local)
  if case.startswith("one_shard"):
    assert all(s == {(0,)} for s in reached)
  elif case == "one_group":
    assert all(s == {(2, 3)} for s in reached)
  else:
    assert all(all(0 in t for t in s) for s in reached)
  layout = "tpu" if case.endswith("tpu_layout") else "cpu"
  if layout == "tpu":
    assert compiled_step(CFG, shape, layout)[1]["params"]["embed"].spec == P("tensor", "expert")
  out = run_mesh(CFG, shape, v, layout)
  assert out["dropped"] == 0
  assert_equal(out, run_reference(CFG, v))


def test_scanned_layers_one_shard():
  cfg = CFG.replace(scan_layers=True)  # the dense and the MoE stack scanned (1 layer each) + MTP
  v = biased(cfg, [0, 1])
  out = run_mesh(cfg, (2, 1, 4, 1), v)
  assert_equal(out, run_reference(cfg, v))


def all_to_alls(cfg, shape=(2, 1, 4, 1)) -> int:
  return compiled_step(cfg, shape)[0].as_text().count(" all-to-all(")


@pytest.mark.parametrize("policy", ["full", "ep_rows"])
def test_remat_replays_or_keeps_round_0s_received_rows(policy):
  """One-shard routing (several rounds), scanned, rematerialized: both policies equal one device.
  'full' recomputes the forward's first exchange for the backward: round 0's rows and their expert
  ids, 2 more all-to-alls per MoE stack than no remat; 'ep_rows' keeps them, as no remat does."""
  cfg = CFG.replace(scan_layers=True, remat_policy=policy)
  v = biased(cfg, [0, 1])
  out = run_mesh(cfg, (2, 1, 4, 1), v)
  assert out["dropped"] == 0
  assert_equal(out, run_reference(cfg, v))
  stacks = 1  # the scanned MoE stack (the MTP block is not rematerialized)
  extra = all_to_alls(cfg) - all_to_alls(CFG.replace(scan_layers=True))
  assert extra == (2 * stacks if policy == "full" else 0), extra


def all_gather_bytes(cfg, shape=(2, 1, 4, 1)) -> float:
  """Bytes of the gathered buffers of every all-gather in the compiled step (XLA:CPU keeps them true)."""
  found = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", compiled_step(cfg, shape)[0].as_text())
  return sum(hlo_text.type_bytes(t) for t in found)


@pytest.mark.parametrize("policy", ["full", "gathered", "gathered_offload"])
def test_remat_gathers_weights_again_or_keeps_them(policy):
  """Scanned and rematerialized on data x expert (non-expert weights cut over `expert`): every
  policy equals one device. 'full' gathers the blocks' weights again for the backward's recompute;
  'gathered' keeps what the forward gathered (in HBM; 'gathered_offload' in host memory, which
  XLA:CPU keeps in place), and gathers no more than no remat."""
  cfg = CFG.replace(scan_layers=True, remat_policy=policy)
  v = biased(cfg, [0, 1])
  out = run_mesh(cfg, (2, 1, 4, 1), v)
  assert_equal(out, run_reference(cfg, v))
  none, this = all_gather_bytes(CFG.replace(scan_layers=True)), all_gather_bytes(cfg)
  assert (this > none) if policy == "full" else (this <= none), (this, none)


def test_grad_accumulation_one_shard():
  """Two microbatches through lax.scan (as train.py's grad_accum) on a data x expert x tensor mesh."""
  cfg, shape = CFG, (2, 1, 2, 2)
  v = biased(cfg, [0, 1])
  mesh = sharding.make_mesh(*shape)
  shardings = nn.unbox(sharding.named_shardings(model_variables.abstract(cfg), mesh, sharding.DEFAULT_RULES))
  toks = su.tokens(cfg)

  def accumulated(step):
    def run(variables, tokens_BS):
      micro = tokens_BS.reshape(2, -1, tokens_BS.shape[-1])
      def body(acc, mb):
        out = step(variables, mb)
        return jax.tree.map(jnp.add, acc, (out["loss"], out["grads"])), None
      zero = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), variables["params"]))
      return jax.lax.scan(body, zero, micro)[0]
    return run

  ref = jax.jit(accumulated(su.step_fn(Transformer(cfg.replace(moe_impl="ragged")))))(v, toks)
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    out = jax.jit(accumulated(su.step_fn(Transformer(cfg))), in_shardings=(
        shardings, sharding.batch_sharding(mesh, 2)))(jax.device_put(v, shardings), toks)
  assert su.max_rel_diff(out[0], ref[0]) <= TOL
  worst = max(jax.tree.leaves(jax.tree.map(su.max_rel_diff, out[1], ref[1])))
  assert worst <= TOL


def test_fp8_dispatch_matches_one_device():
  """FP8 experts, one-shard routing (several rounds): activations are quantized per row (1x128
  tiles), so the output and the input and routing-weight gradients equal one device; expert-weight
  gradients quantize 128-row tiles of whatever rows a round brings to a shard, so they agree to
  FP8 precision only."""
  cfg = CFG.replace(fp8=True)
  e, d, f, x = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
  ks = jax.random.split(jax.random.key(5), 6)
  idx = jax.lax.top_k(jax.random.normal(ks[0], (64, e)) + jnp.zeros(e).at[:2].set(9.0), x)[1].astype(jnp.int32)
  w, xs = jax.random.uniform(ks[1], (64, x)), jax.random.normal(ks[2], (64, d))
  gate, up = (0.1 * jax.random.normal(k, (e, d, f)) for k in ks[3:5])
  down = 0.1 * jax.random.normal(ks[5], (e, f, d))

  def loss(dispatch, *args):
    y, stats = dispatch(args[0], args[1], idx, *args[2:], cfg)
    return jnp.sum(jnp.sin(y)), stats

  grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)
  with sharding.activation_rules(sharding.make_mesh(2, 1, 4, 1), sharding.DEFAULT_RULES):
    (l, stats), g = jax.jit(functools.partial(grad, ep.dispatch_ep))(xs, w, gate, up, down)
  (l_ref, _), g_ref = grad(dispatch_ragged, xs, w, gate, up, down)
  assert float(stats["ep_rounds"]) > 1
  assert su.max_rel_diff(l, l_ref) <= TOL
  assert max(su.max_rel_diff(a, b) for a, b in zip(g[:2], g_ref[:2])) <= TOL
  assert max(su.max_rel_diff(a, b) for a, b in zip(g[2:], g_ref[2:])) <= 0.1


def exchange_rows(hlo_text: str) -> list[int]:
  """Rows each MoE all-to-all (inside the shard_map) moves per device, from compiled HLO text: the
  leading dimension, summed over the per-peer operands of XLA:CPU's tuple form."""
  rows = []
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\sall-to-all(?:-start)?\(", line)
    if m and "/moe/shard_map/" in line:
      rows.append(sum(int(s.split(",")[0]) for s in re.findall(r"\w+\[([\d,]+)\]", m.group(1))))
  return rows


def test_buffers_are_bounded_by_the_compiled_program():
  """Every all-to-all in the compiled step moves P*C rows, C = ceil(T*X/P * 1.25): <= 2x the balanced
  T*X rows per device, while one-shard routing would need P*T*min(X, E/P) = 4x in one exchange."""
  shape = (2, 1, 4, 1)
  compiled, _, _ = compiled_step(CFG, shape)
  rows = exchange_rows(compiled.as_text())
  p, x = shape[2], CFG.num_experts_per_tok
  cap = ep.ep_capacity(T_LOCAL, p, CFG)
  balanced = T_LOCAL * x
  assert len(rows) >= 2 * 3, rows  # 2 MoE layers (one in the MTP block), 3 exchanges forward, 6 backward
  assert set(rows) == {p * cap}, rows
  assert p * cap <= 2 * balanced < p * T_LOCAL * min(x, CFG.n_routed_experts // p)


def test_one_shard_routing_takes_rounds():
  """The same fixed buffers serve one-shard routing in ceil(T*X / C) rounds (sown as ep_rounds)."""
  cfg, shape = CFG, (2, 1, 4, 1)
  v = biased(cfg, [0, 1])
  mesh = sharding.make_mesh(*shape)
  x = jax.random.normal(jax.random.key(3), (su.BATCH, su.SEQ, cfg.hidden_size))
  mv = {"params": v["params"]["layers_1"]["moe"], "router": v["router"]["layers_1"]["moe"]}
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    _, state = jax.jit(lambda mv, x: MoE(cfg).apply(mv, x, mutable=["intermediates"]))(
        mv, jax.device_put(x, sharding.batch_sharding(mesh, 3)))
  cap = ep.ep_capacity(T_LOCAL, shape[2], cfg)
  assert float(state["intermediates"]["ep_rounds"]) == -(-T_LOCAL * 2 // cap) > 1
  assert float(state["intermediates"]["dropped_tokens"]) == 0


def test_eval_of_a_capacity_model_drops_nothing():
  """A model trained with a capacity (capacity_factor > 0 on 'ep': drops, counted; test_ep.py) is
  evaluated and generates (for_eval, config.dropless) with the same 'ep' exchange, dropless on the
  expert mesh: equal to one device under one-shard routing, where the capacity would drop half."""
  cfg, shape = CFG.replace(capacity_factor=0.5), (2, 1, 4, 1)
  v = biased(cfg, [0, 1])
  model = for_eval(Transformer(cfg))
  assert model.cfg == dropless(cfg) and model.cfg.moe_impl == "ep" and model.cfg.capacity_factor == 0
  mesh = sharding.make_mesh(*shape)
  shardings = nn.unbox(sharding.named_shardings(model_variables.abstract(cfg), mesh, sharding.DEFAULT_RULES))
  toks = jax.device_put(su.tokens(cfg), sharding.batch_sharding(mesh, 2))
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    logits = jax.jit(model.apply)(jax.device_put(v, shardings), toks)
  ref = Transformer(cfg.replace(moe_impl="ragged", capacity_factor=0.0)).apply(v, su.tokens(cfg))
  assert su.max_rel_diff(logits, ref) <= TOL


def test_generation_of_a_capacity_model_drops_nothing():
  """generate() on the expert mesh (2 rows: padded over the 8 batch shards) with a capacity 'ep'
  model and one-shard routing gives the one-device greedy tokens."""
  from moe_jax import generate
  cfg, shape = CFG.replace(capacity_factor=0.5), (2, 1, 4, 1)
  v = biased(cfg, [0, 1])
  prompt = su.tokens(cfg, batch=2, seq=6)
  ref = generate.generate(Transformer(cfg.replace(moe_impl="ragged", capacity_factor=0.0)), v, prompt, 4)
  mesh = sharding.make_mesh(*shape)
  shardings = nn.unbox(sharding.named_shardings(model_variables.abstract(cfg), mesh, sharding.DEFAULT_RULES))
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    out = generate.generate(Transformer(cfg), jax.device_put(v, shardings), prompt, 4)
  np.testing.assert_array_equal(out, ref)
