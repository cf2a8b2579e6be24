"""The grouped matmul on a mesh: the shard_mapped 'ragged' dispatch, the Pallas kernel inside shard_map,
and a compile for a TPU topology with moe_gmm='pallas' (megablox) in both 'ragged' and 'ep'.

CPU meshes (8 forced host devices) hold the shard_mapped dispatch equal to the single-device one,
values and gradients; the TPU kernel runs there in the Pallas interpreter. The TPU compile is
compile-only (libtpu, nothing runs) and reads the optimized HLO.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import shard_util as su  # noqa: E402
from moe_jax import sharding  # noqa: E402
from moe_jax.layers import gmm, gmm_pallas  # noqa: E402
from moe_jax.layers.moe import dispatch_ragged  # noqa: E402

CFG = su.tiny_config()  # E=8 experts, top-2, D=64, F=32
TOKENS = 64
TOL = 1e-5


def _inputs(cfg, tokens=TOKENS, seed=0):
  e, d, f, x = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
  ks = jax.random.split(jax.random.key(seed), 7)
  idx = jax.lax.top_k(jax.random.normal(ks[0], (tokens, e)), x)[1].astype(jnp.int32)
  w = jax.random.uniform(ks[1], (tokens, x))
  xs = jax.random.normal(ks[2], (tokens, d))
  gate, up = (0.1 * jax.random.normal(k, (e, d, f)) for k in ks[3:5])
  down = 0.1 * jax.random.normal(ks[5], (e, f, d))
  dy = jax.random.normal(ks[6], (tokens, d))
  return (xs, w, idx, gate, up, down), dy


def _loss_and_grads(cfg, args, dy):
  def loss(xs, w, gate, up, down):
    y, _ = dispatch_ragged(xs, w, args[2], gate, up, down, cfg)
    return jnp.sum(y * dy)
  xs, w, _, gate, up, down = args
  return jax.jit(jax.value_and_grad(loss, argnums=range(5)))(xs, w, gate, up, down)


def _on_mesh(cfg, args, dy, shape):
  """The same loss and gradients with tokens and expert weights laid out on the mesh by the rules."""
  mesh = sharding.make_mesh(*shape)
  rules = sharding.DEFAULT_RULES
  tok = sharding.batch_sharding(mesh, 2, rules)
  if args[0].shape[0] % sharding.data_parallel_size(mesh, rules):
    tok = NamedSharding(mesh, P())  # the dispatch itself has to split them
  w_spec = NamedSharding(mesh, nn.logical_to_mesh_axes(("exp", "embed", "exp_mlp"), rules))
  down_spec = NamedSharding(mesh, nn.logical_to_mesh_axes(("exp", "exp_mlp", "embed"), rules))
  placed = [jax.device_put(a, s) for a, s in zip(args, (tok, tok, tok, w_spec, w_spec, down_spec))]
  with sharding.activation_rules(mesh, rules):
    return _loss_and_grads(cfg, placed, jax.device_put(dy, tok))


def _assert_close(got, want, tol=TOL):
  (lg, gg), (lw, gw) = got, want
  assert su.max_rel_diff(lg, lw) <= tol
  for name, a, b in zip(("x", "routing weights", "gate", "up", "down"), gg, gw):
    assert su.max_rel_diff(a, b) <= tol, f"d{name}: {su.max_rel_diff(a, b):.2e}"


# fsdp x expert; data x expert x tensor (F split); expert 8 (1 expert per shard < top-2: rows cut to T*1);
# fsdp alone (no expert parallelism: every device all experts, weights gathered over fsdp)
@pytest.mark.parametrize("shape", [(1, 2, 4, 1), (2, 1, 2, 2), (1, 1, 8, 1), (1, 8, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_ragged_on_mesh_matches_single_device(shape):
  args, dy = _inputs(CFG)
  _assert_close(_on_mesh(CFG, args, dy, shape), _loss_and_grads(CFG, args, dy))


def test_ragged_on_mesh_pads_tokens_that_do_not_split():
  """12 tokens over 8 batch shards (decoding a small batch): zero-weight filler tokens, same result."""
  args, dy = _inputs(CFG, tokens=12)
  _assert_close(_on_mesh(CFG, args, dy, (1, 2, 4, 1)), _loss_and_grads(CFG, args, dy))


def test_ragged_on_mesh_runs_in_shard_map_without_expert_gathers():
  """The compiled step: tokens all-gathered over `expert`, outputs reduce-scattered, the expert stack
  never gathered along E (each device reads only its own experts), FSDP weight gradients reduce-scattered."""
  args, dy = _inputs(CFG)
  mesh = sharding.make_mesh(1, 2, 4, 1)
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    fn = jax.jit(jax.grad(lambda xs, w, g, u, d: jnp.sum(dispatch_ragged(xs, w, args[2], g, u, d, CFG)[0] * dy),
                          argnums=range(5)))
    hlo = fn.lower(*args[:2], *args[3:]).compile().as_text()
  assert su.expert_weight_all_gathers(hlo, CFG, mesh) == []
  assert su.count_op(hlo, "reduce-scatter") >= 4  # outputs (fwd), x cotangent, the three weight gradients
  assert su.count_op(hlo, "all-gather") >= 2


def test_megablox_inside_shard_map_checks_types():
  """The Pallas kernel under jax.shard_map's check_vma (which rejected its untyped out_shape): values and
  gradients equal ragged_dot's, the weight gradient summed over the axis the weights are replicated on."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  m, d, f, e = 128, 128, 128, 4
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (2 * m, d))
  w = jax.random.normal(ks[1], (4 * e, d, f)) / 10
  sizes = jnp.tile(jnp.array([30, 0, 50, 40], jnp.int32), (2, 4))  # 120 of 128 rows in groups

  def loss(mm):
    def body(x, w, s):
      return gmm.grouped_matmul(x, w, s[0], impl="ragged_dot") if mm is None else mm(*gmm._vary_together(x, w, s), s[0])
    def f(x, w):
      y = jax.shard_map(body, mesh=mesh, in_specs=(P("a"), P("b"), P("a", "b")), out_specs=P("a", "b"))(x, w, sizes)
      return jnp.sum(y * jnp.cos(y))
    return f

  got = jax.jit(jax.value_and_grad(loss(functools.partial(gmm_pallas.grouped_matmul, interpret=True)), (0, 1)))(x, w)
  want = jax.value_and_grad(loss(None), (0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert su.max_rel_diff(a, b) <= 1e-5


def test_ragged_on_mesh_with_the_interpreted_tpu_kernel(monkeypatch):
  """moe_gmm='pallas' through the whole shard_mapped dispatch, megablox in the Pallas interpreter."""
  monkeypatch.setattr(gmm_pallas, "grouped_matmul", functools.partial(gmm_pallas.grouped_matmul, interpret=True))
  args, dy = _inputs(CFG, tokens=32)
  want = _loss_and_grads(CFG.replace(moe_gmm="tiled"), args, dy)
  _assert_close(_on_mesh(CFG.replace(moe_gmm="pallas"), args, dy, (1, 2, 4, 1)), want)


# --- TPU, compile-only ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tpu_devices():
  from moe_jax import aot
  return aot.parse_topology("v5:2x2x2").devices()


def _tpu_compile(cfg, shape=(1, 2, 4, 1)):
  """An MoE layer twice (a rematerialized scan), fwd+bwd, bf16, compiled for v5p 2x2x2 -> HLO text."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
  import moe_mesh_tpu
  mesh = sharding.make_mesh(*shape, devices=_tpu_devices())
  step, args = moe_mesh_tpu.layer_step(cfg, mesh, sharding.DEFAULT_RULES, 8, 32, repeat=2)  # remat + scan
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    assert gmm.choose("auto") == "pallas"  # the target is the mesh's TPU, not this CPU host
    text = step.lower(*args).compile().as_text()
  return text, moe_mesh_tpu.kernel_calls(text)


@pytest.mark.parametrize("impl", ["ragged", "ep"])
def test_pallas_compiles_for_tpu_on_the_mesh(impl):
  cfg = su.tiny_config(dtype="bfloat16", moe_impl=impl, moe_gmm="pallas")
  text, kernels = _tpu_compile(cfg)
  # megablox: gmm forward x3 (gate, up, down) and backward x3 (dx), tgmm x3 (dw), more with remat
  assert kernels.get("gmm", {}).get("count", 0) >= 6 and kernels.get("tgmm", {}).get("count", 0) >= 3, kernels
  mesh = sharding.make_mesh(1, 2, 4, 1, devices=_tpu_devices())
  assert su.expert_weight_all_gathers(text, cfg, mesh) == []
  assert not re.search(r"\sragged-dot|ragged_dot", text)  # no XLA grouped matmul left beside the kernels
