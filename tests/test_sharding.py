"""The rules table, mesh construction, validation, per-device bytes and the memory plan.

Golden partition specs: tests/golden/partition_specs_<preset>.txt, one line per variable
(path, shape, logical axes, mesh axes). After an intended rules or model change, regenerate
with `UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py` and review the diff.
"""

import functools
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import shard_util as su
from moe_jax import plan, sharding
from moe_jax import variables as model_variables
from moe_jax.config import PRESETS
from moe_jax.model import Transformer

GOLDEN = pathlib.Path(__file__).parent / "golden"
CFG = su.tiny_config()


@functools.lru_cache(maxsize=None)
def _abstract(preset: str):
  return model_variables.abstract(PRESETS[preset]())


def spec_table(abstract, rules=sharding.DEFAULT_RULES) -> str:
  logical = jax.tree_util.tree_leaves_with_path(sharding.logical_specs(abstract), is_leaf=lambda x: isinstance(x, P))
  mesh = jax.tree.leaves(sharding.mesh_specs(abstract, rules), is_leaf=lambda x: isinstance(x, P))
  shapes = jax.tree.leaves(nn.unbox(abstract))
  fmt = lambda spec: "(" + ", ".join(str(s) for s in spec) + ")"  # noqa: E731
  return "".join(f"{jax.tree_util.keystr(path)}  {tuple(leaf.shape)}  {fmt(lspec)}  ->  {fmt(mspec)}\n"
                 for (path, lspec), mspec, leaf in zip(logical, mesh, shapes))


V3_POD = dict(data=1, fsdp=8, expert=64, tensor=1)  # v5p-1024


@pytest.mark.parametrize("preset,layout", [("tiny", None), ("deepseek_v3", None), ("deepseek_v3", "tpu")])
def test_partition_specs_match_golden(preset, layout):
  """DEFAULT_RULES, and V3 in the TPU layout of a v5p-1024 mesh (sharding.layout_rules)."""
  rules = sharding.layout_rules(V3_POD, layout) if layout else sharding.DEFAULT_RULES
  table = spec_table(_abstract(preset), rules)
  path = GOLDEN / f"partition_specs_{preset}{'_' + layout if layout else ''}.txt"
  if os.environ.get("UPDATE_GOLDEN"):
    path.parent.mkdir(exist_ok=True)
    path.write_text(table)
  assert path.exists(), f"{path} missing; run UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py"
  assert table == path.read_text(), f"partition specs of {preset} moved; if intended, regenerate (module doc)"


def test_golden_table_sees_a_rules_change():
  moved = spec_table(_abstract("tiny"), sharding.merge_rules([("exp", None)]))
  assert moved != (GOLDEN / "partition_specs_tiny.txt").read_text()


def test_layout_rules_follow_the_mesh_and_its_platform():
  """On TPU with fsdp and expert both > 1, non-expert weights are cut over the larger of the two only
  (sub-group collectives); everywhere else, and on GPU and CPU, the rules are DEFAULT_RULES."""
  cut = lambda rules, names=("vocab", "embed"): nn.logical_to_mesh_axes(names, rules)  # noqa: E731
  for platform in ("cpu", "gpu", "tpu"):
    for sizes in (dict(fsdp=8, expert=1), dict(fsdp=1, expert=8), dict(data=8)):
      assert sharding.layout_rules(sizes, platform) == sharding.DEFAULT_RULES
  assert sharding.layout_rules(V3_POD, "gpu") == sharding.DEFAULT_RULES
  by_expert = sharding.layout_rules(V3_POD, "tpu")
  assert cut(by_expert) == P("tensor", "expert")
  assert cut(by_expert, ("q_lora", "heads", "qk_head")) == P("expert", "tensor", None)
  assert cut(by_expert, ("kv_lora", "heads", "v_head")) == P("expert", "tensor", None)
  assert cut(by_expert, ("embed", "q_lora")) == P("expert", None)  # q_a: not over fsdp too (whole slice)
  assert cut(by_expert, ("exp", "embed", "exp_mlp")) == P("expert", "fsdp", "tensor")  # experts unchanged
  assert cut(by_expert, ("batch", "length", "embed")) == P(("data", "fsdp", "expert"), None, None)
  by_fsdp = sharding.layout_rules(dict(data=1, fsdp=64, expert=8, tensor=1), "tpu")
  assert cut(by_fsdp) == P("tensor", "fsdp") and cut(by_fsdp, ("q_lora",)) == P("fsdp")
  assert cut(by_fsdp, ("exp", "embed", "exp_mlp")) == P("expert", "fsdp", "tensor")
  assert len([r for r in by_fsdp if r[0] == "embed"]) == 1
  # a config's overrides apply on top of the layout; DEFAULT_RULES' entries restore ZeRO-3 over both
  assert cut(sharding.rules_for(V3_POD, "tpu", [("embed", "fsdp")])) == P("tensor", "fsdp")
  restore = [r for r in sharding.DEFAULT_RULES if r[0] in sharding.ZERO_NAMES]
  assert sharding.rules_for(V3_POD, "tpu", restore) == sharding.DEFAULT_RULES
  # a built mesh: its devices' platform (these tests' host CPU devices)
  assert sharding.mesh_rules(sharding.make_mesh(1, 2, 4, 1)) == sharding.DEFAULT_RULES
  assert cut(sharding.mesh_rules(sharding.make_mesh(1, 2, 4, 1), [("embed", "expert")])) == P("tensor", "expert")


def test_expert_weights_one_eighth_per_device_on_expert_8():
  """Each device holds exactly 1/(product of its spec's mesh axes) of every tensor; experts 1/8."""
  mesh = sharding.make_mesh(1, 1, 8, 1)
  abstract = model_variables.abstract(CFG)
  shardings = nn.unbox(sharding.named_shardings(abstract, mesh, sharding.DEFAULT_RULES))
  variables = jax.device_put(su.host_variables(CFG), shardings)
  moe = variables["params"]["layers_1"]["moe"]
  for name in ("gate", "up", "down"):
    assert moe[name].sharding.spec[0] == "expert"
    assert {s.data.nbytes for s in moe[name].addressable_shards} == {moe[name].nbytes // 8}
  for arr in jax.tree.leaves(variables):
    parts = math.prod(mesh.shape[a] for e in arr.sharding.spec for a in sharding.spec_axes(e))
    assert {s.data.nbytes for s in arr.addressable_shards} == {arr.nbytes // parts}
  # The planner's per-device figure is what the devices actually hold.
  held = max(sum(s.data.nbytes for a in jax.tree.leaves(variables) for s in a.addressable_shards if s.device == d)
             for d in mesh.devices.flat)
  p = plan.plan(CFG, dict(mesh.shape), su.BATCH, su.SEQ, 1.0, abstract=abstract)
  assert p.params == held
  total = sum(a.nbytes for a in jax.tree.leaves(variables))
  assert held < total / 4  # everything large is split 8 ways (router bias and tiny norms aside)


def test_born_sharded_init_has_the_rules_shardings():
  mesh = sharding.make_mesh(1, 2, 4, 1)
  variables, shardings = model_variables.init_sharded(Transformer(CFG), jax.random.key(0), (su.BATCH, su.SEQ), mesh,
                                                 sharding.DEFAULT_RULES)
  assert variables["params"]["layers_1"]["moe"]["gate"].sharding.spec == P("expert", "fsdp", "tensor")
  assert variables["params"]["embed"].sharding.spec == P("tensor", ("fsdp", "expert"))
  for arr, want in zip(jax.tree.leaves(variables), jax.tree.leaves(shardings)):
    assert arr.sharding.is_equivalent_to(want, arr.ndim)


def test_deepseek_v3_plan():
  """Full-size V3 from eval_shape on 512 devices: every weight divides 512 ways; router biases replicate."""
  cfg = PRESETS["deepseek_v3"]()  # fp32 params and compute
  sizes = dict(data=1, fsdp=16, expert=32, tensor=1)
  p = plan.plan(cfg, sizes, 512, 4096, 95.0, sharding.DEFAULT_RULES, abstract=_abstract("deepseek_v3"))
  assert 680e9 < p.total_params < 690e9  # 671B + the 14B MTP module
  biases = 256 * (cfg.num_moe_layers + cfg.num_nextn_predict_layers)  # fp32, replicated, not trained
  trained = p.total_params - biases
  assert p.params == 4 * trained / 512 + 4 * biases
  assert p.grads == 4 * trained / 512 and p.optimizer == 8 * trained / 512
  assert p.expert_params == 4 * 3 * 256 * 7168 * 2048 * 59 / 512
  assert p.kv_cache == 1 * 4096 * 61 * (512 + 64) * 4  # 512 sequences over 512 devices
  assert p.to_json()["train_fits"] and p.train < 95e9
  # The TPU layout (plan's default for this mesh): non-expert weights cut 32 ways (expert), not 512.
  tpu = plan.plan(cfg, sizes, 512, 4096, 95.0, abstract=_abstract("deepseek_v3"))
  specs = jax.tree.leaves(sharding.logical_specs(_abstract("deepseek_v3")), is_leaf=lambda x: isinstance(x, P))
  non_expert = sum(math.prod(a.shape) for a, spec in zip(jax.tree.leaves(nn.unbox(_abstract("deepseek_v3"))), specs)
                   if set(spec) & set(sharding.ZERO_NAMES) and "exp" not in spec)
  assert tpu.expert_params == p.expert_params
  assert tpu.params - p.params == pytest.approx(4 * non_expert * (1 / 32 - 1 / 512), rel=1e-9)
  assert tpu.to_json()["train_fits"]


def test_plan_working_set_follows_the_attention_form():
  """The XLA attention holds [b, H, S, S] scores (4x per doubling of S); flash kernels are linear in S."""
  cfg = PRESETS["deepseek_v3"](dtype="bfloat16", num_hidden_layers=4)
  sizes = dict(data=1, fsdp=8, expert=8, tensor=1)
  part = lambda seq, platform: plan.working_set(cfg, sizes, 1, seq, platform=platform)["attention"]  # noqa: E731
  growth = lambda platform: ((part(16384, platform) - part(8192, platform))  # noqa: E731
                              / (part(8192, platform) - part(4096, platform)))
  assert 3.9 < growth("cpu") < 4.1  # quadratic in S
  assert 1.99 < growth("tpu") < 2.01  # linear in S
  assert part(4096, "tpu") < part(4096, "cpu") / 5
  p = plan.plan(cfg, sizes, 64, 4096, 95.0, platform="tpu")
  assert p.working_set == p.working_set_parts["peak"] > 0
  assert p.train == p.params + p.grads + p.optimizer + p.activations + p.working_set


def test_plan_command_prints_table_and_json(capsys):
  plan.main(["--preset=tiny", "--mesh=2,1,4,1", "--device_memory_gb=1", "--batch=8", "--seq=32"])
  out = capsys.readouterr().out.strip().splitlines()
  assert "tiny" in out[0] and "expert=4" in out[0]
  assert any(line.startswith("train: params+grads+opt+act+working") and "fits" in line for line in out)
  record = json.loads(out[-1])
  assert record["mesh"] == dict(data=2, fsdp=1, expert=4, tensor=1) and record["train_fits"]
  assert record["host_memory"] == 0


def test_plan_command_overrides_the_remat_policy(capsys):
  """--remat_policy=gathered_offload: the gathered weights in host memory, the HBM rows as full's."""
  args = ["--preset=tiny", "--mesh=1,2,2,1", "--batch=8", "--seq=32"]
  records = {}
  for policy in ("full", "gathered", "gathered_offload"):
    plan.main(args + [f"--remat_policy={policy}"])
    out = capsys.readouterr().out.strip().splitlines()
    records[policy] = json.loads(out[-1])
    assert any(line.startswith("host memory (gathered weights, offloaded)") for line in out) == (
        policy == "gathered_offload"), policy
  full, kept, offloaded = records["full"], records["gathered"], records["gathered_offload"]
  assert offloaded["host_memory"] == kept["activations"] - full["activations"] > 0
  assert offloaded["train"] == full["train"] < kept["train"]


# --- errors before compiling, naming the numbers -----------------------------------------
def test_experts_not_divisible_by_expert_axis():
  mesh = sharding.make_mesh(1, 1, 8, 1)
  cfg = su.tiny_config(n_routed_experts=12, n_group=4)
  with pytest.raises(ValueError, match=r"n_routed_experts=12 is not divisible by the expert-parallel size 8"):
    sharding.validate(cfg, 8, mesh, None, model_variables.abstract(cfg))


def test_batch_not_divisible_by_data_parallel_size():
  mesh = sharding.make_mesh(2, 2, 2, 1)
  with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the data-parallel size 8 "
                                       r"\(mesh axes data=2xfsdp=2xexpert=2\)"):
    sharding.validate(CFG, 12, mesh, None, _abstract("tiny"))
  sharding.validate(CFG, 16, mesh, None, _abstract("tiny"))


def test_parameter_dimension_not_divisible():
  mesh = sharding.make_mesh(1, 1, 1, 8)
  with pytest.raises(ValueError, match=r"\['k_b'\] \(32, 4, 16\): dimension 1 \(heads=4\) is not divisible by mesh "
                                       r"axes tensor=8 = 8; override the rule, e.g. mesh.rules=\[\('heads', None\)\]"):
    sharding.validate(CFG, 8, mesh, None, _abstract("tiny"))


def test_mesh_product_not_device_count():
  with pytest.raises(ValueError, match=r"data\*fsdp\*expert\*tensor = 2\*2\*1\*1 = 4 but there are 8 devices"):
    sharding.make_mesh(2, 2, 1, 1)
  assert sharding.mesh_shape(-1, 2, 1, 1, num_devices=8) == (4, 2, 1, 1)


def test_unknown_logical_name_in_rules():
  with pytest.raises(ValueError, match=r"unknown logical name 'experts'"):
    sharding.merge_rules([("experts", "expert")])
  with pytest.raises(ValueError, match=r"'exp' maps to unknown mesh axis 'model'"):
    sharding.check_rules([("exp", "model")])


def test_merge_rules_replaces_every_rule_of_a_name_in_place():
  merged = sharding.merge_rules([("embed", "fsdp")])
  assert [r for r in merged if r[0] == "embed"] == [("embed", "fsdp")]
  names = [n for n, _ in merged]
  assert names.index("embed") == [n for n, _ in sharding.DEFAULT_RULES].index("embed")


def test_hybrid_mesh_shape():
  assert sharding.hybrid_mesh_shape((1, 1, 2, 2), (2, 1, 1, 1), 8) == ((1, 1, 2, 2), (2, 1, 1, 1))
  assert sharding.hybrid_mesh_shape((1, -1, 2, 1), (2, 1, 2, 1), 32) == ((1, 4, 2, 1), (2, 1, 2, 1))
  assert sharding.hybrid_mesh_shape((1, 1, 8, 1), (-1, 1, 2, 1), 128) == ((1, 1, 8, 1), (8, 1, 2, 1))
  with pytest.raises(ValueError, match=r"within each of the 2 slices/nodes, 8 devices in all"):
    sharding.hybrid_mesh_shape((1, 1, 8, 1), (2, 1, 1, 1), 8)
  with pytest.raises(ValueError, match=r"ambiguous"):
    sharding.hybrid_mesh_shape((-1, 1, 1, 1), (-1, 1, 1, 1), 8)
  with pytest.raises(ValueError, match=r"Number of slices 1 must equal the product of dcn_mesh_shape"):
    sharding.make_mesh(1, 1, 2, 2, dcn_data=2)  # one process: one granule, not two


def test_single_process_batch_helpers(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert sharding.initialize_distributed() is False
  mesh = sharding.make_mesh(2, 1, 2, 2)
  rows = sharding.process_rows(mesh, 8)
  np.testing.assert_array_equal(rows, np.arange(8))
  toks = su.tokens(CFG)
  batch = sharding.global_batch({"tokens": toks}, mesh, rows, 8)["tokens"]
  assert batch.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(np.asarray(batch), toks)


def test_plan_counts_the_rows_ep_keeps_for_the_backward():
  """'ep' keeps the rows its first round received, [P*C, D] bf16 + int32 ids per MoE layer: under remat
  ep_rows every MoE layer's, under full only the MTP block's (it is not rematerialized); ragged none."""
  cfg = PRESETS["deepseek_v3"](dtype="bfloat16", num_hidden_layers=8, moe_impl="ep", remat_policy="full")
  sizes = dict(data=1, fsdp=2, expert=4, tensor=1)  # 8 sequences of 4096: T = 4096 tokens per device
  rows = 4 * math.ceil(4096 * 8 / 4 * 1.25)  # P * C, ep_round_factor 1.25
  per_layer = rows * (7168 * 2 + 4)
  act, abstract = {}, model_variables.abstract(cfg)
  for impl, policy in (("ragged", "full"), ("ep", "full"), ("ep", "ep_rows")):
    c = cfg.replace(moe_impl=impl, remat_policy=policy)
    act[impl, policy] = plan.plan(c, sizes, 8, 4096, 95.0, abstract=abstract).activations
  assert act["ep", "full"] - act["ragged", "full"] == per_layer  # the MTP block
  assert act["ep", "ep_rows"] - act["ragged", "full"] == (5 + 1) * per_layer  # 5 MoE layers + MTP


def test_plan_table_says_when_the_remat_policy_is_not_the_planned_one():
  sizes = dict(data=1, fsdp=2, expert=2, tensor=1)
  for policy, noted in (("full", False), ("ep_rows", False), ("gathered", False), ("gathered_offload", False),
                        ("dots", True), ("none", True)):
    cfg = PRESETS["tiny"](remat_policy=policy)
    p = plan.plan(cfg, sizes, 4, 64, 95.0, abstract=_abstract("tiny"))
    table = plan.format_plan(p, cfg, "tiny")
    assert ("planned for remat_policy=full, ep_rows, gathered or gathered_offload" in table) == noted, policy
    assert ("host memory (gathered weights, offloaded)" in table) == (policy == "gathered_offload"), policy


def test_plan_counts_the_gathered_weights_the_backward_keeps():
  """Under 'gathered' every trunk block keeps its non-expert matrices gathered over the batch axes,
  cut only over tensor, in the compute dtype: tiny has 1 dense + 2 MoE blocks (the arithmetic below;
  norm scales are gathered again). 'gathered_offload' keeps the same bytes in host memory."""
  sizes = dict(data=1, fsdp=2, expert=2, tensor=2)
  cfg = PRESETS["tiny"](remat_policy="gathered", dtype="bfloat16")
  c = cfg
  attention = (c.hidden_size * c.q_lora_rank + c.q_lora_rank * c.num_attention_heads * c.qk_head_dim / 2
               + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
               + c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) / 2
               + c.num_attention_heads * c.v_head_dim * c.hidden_size / 2)  # heads cut over tensor
  dense = 3 * c.hidden_size * c.intermediate_size / 2  # mlp cut over tensor
  moe = 3 * c.hidden_size * c.moe_intermediate_size * c.n_shared_experts / 2 + c.hidden_size * c.n_routed_experts
  expected = (c.first_k_dense_replace * (attention + dense)
              + (c.num_hidden_layers - c.first_k_dense_replace) * (attention + moe)) * 2  # bf16
  rules = sharding.layout_rules(sizes, "cpu")
  assert plan.saved_gathered_weights(cfg, sizes, rules, _abstract("tiny")) == expected
  assert plan.saved_gathered_weights(cfg.replace(remat_policy="full"), sizes, rules, _abstract("tiny")) == 0
  full = plan.plan(cfg.replace(remat_policy="full"), sizes, 4, 64, 95.0, abstract=_abstract("tiny"))
  kept = plan.plan(cfg, sizes, 4, 64, 95.0, abstract=_abstract("tiny"))
  assert kept.activations - full.activations == expected and kept.host_memory == full.host_memory == 0
  offloaded = plan.plan(cfg.replace(remat_policy="gathered_offload"), sizes, 4, 64, 95.0, abstract=_abstract("tiny"))
  assert offloaded.activations == full.activations and offloaded.host_memory == expected
  assert offloaded.train == full.train
