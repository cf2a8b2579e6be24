"""The TPU compile instrument (python -m moe_jax.aot) and multi-host data layouts on real topologies.

Compile-only TPU devices come from libtpu (the test extra installs it); nothing runs on them.
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from moe_jax import aot, sharding  # noqa: E402
from moe_jax.errors import UserError  # noqa: E402


@pytest.mark.parametrize("name,family,shape,chips", [
    ("v5p-16", "v5p", (2, 2, 2), 8), ("v5p-128", "v5p", (4, 4, 4), 64), ("v5p-512", "v5p", (4, 8, 8), 256),
    ("v5p-1024", "v5p", (8, 8, 8), 512), ("v5e-16", "v5e", (4, 4), 16), ("v6e-256", "v6e", (16, 16), 256),
    ("v6e-8", "v6e", (2, 4), 8), ("v4-64", "v4", (2, 4, 4), 32), ("v5:4x4x6", "v5p", (4, 4, 6), 96),
    ("v5p-8", "v5p", (2, 2, 1), 4), ("v4-8", "v4", (2, 2, 1), 4), ("v5e-4", "v5e", (2, 2), 4),
    ("v5e-8", "v5e", (2, 4), 8),
])
def test_topology_names_as_cloud_tpu_spells_them(name, family, shape, chips):
  t = aot.parse_topology(name)
  assert (t.family, t.shape, t.chips) == (family, shape, chips)


@pytest.mark.parametrize("name,message", [
    ("v5p-511", "counts TensorCores"), ("v7x-64", "unknown TPU family"), ("tpu-64", "not a TPU topology name"),
    ("v5p-96", "power-of-two"), ("v5:4x4", "3-D torus"),
])
def test_bad_topology_names(name, message):
  with pytest.raises(UserError, match=message):
    aot.parse_topology(name)


def _expected_rows(mesh, batch: int, process: int) -> set:
  """Independently of NamedSharding: a device's batch shard is its (data, fsdp, expert) coordinate
  flattened row-major; the process feeds the union of its devices' shards."""
  d, f, e = (mesh.shape[a] for a in ("data", "fsdp", "expert"))
  per = batch // (d * f * e)
  rows = set()
  for coord in np.ndindex(mesh.devices.shape):
    if mesh.devices[coord].process_index == process:
      shard = np.ravel_multi_index(coord[:3], (d, f, e))
      rows.update(range(shard * per, (shard + 1) * per))
  return rows


@pytest.mark.parametrize("topology,meshes", [
    ("v5p-16", [(-1, 1, 1, 1), (1, 2, 4, 1), (2, 1, 2, 2)]),
    ("v5p-128", [(-1, 1, 1, 1), (1, 4, 16, 1), (1, 1, 64, 1), (4, 1, 8, 2)]),
    ("v5p-1024", [(-1, 1, 1, 1), (1, 8, 64, 1), (1, 4, 64, 2)]),
])
def test_every_host_gets_its_rows(topology, meshes):
  """Every process of 2x2x2, 4x4x4 and 8x8x8 feeds exactly the rows its chips hold (scattered or not)."""
  devices = aot.parse_topology(topology).devices()
  for shape in meshes:
    mesh = sharding.make_mesh(*shape, devices=devices)
    batch = 2 * sharding.data_parallel_size(mesh)
    processes = sorted({d.process_index for d in devices})
    assert len(processes) == len(devices) // 4
    fed = []
    for p in processes:
      rows = sharding.process_rows(mesh, batch, None, p)
      assert set(rows.tolist()) == _expected_rows(mesh, batch, p), (topology, shape, p)
      fed += rows.tolist()
    assert sorted(set(fed)) == list(range(batch))
    layout = aot.data_layout(mesh, batch, sharding.DEFAULT_RULES)
    assert layout["hosts"] == len(processes)


def _aot(capsys, *flags):
  code = aot.main(["--config=configs/tiny.py:test", *flags])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("topology,mesh,impl,fp8", [
    ("v5p-16", "-1,1,1,1", "ragged", False),
    ("v5p-16", "2,1,4,1", "ep", False),
    ("v5p-128", "-1,1,1,1", "ragged", False),
    ("v5p-128", "8,1,8,1", "ep", False),
    # FP8 training: the grouped XLA form inside shard_map, hidden 256 for two K blocks (libtpu 0.0.42
    # aborted on the former ragged_dot_general form there: "Check failed: groupSizesDim == ...")
    ("v5p-16", "2,1,4,1", "ep", True),
])
def test_tiny_train_step_compiles_for_tpu(capsys, topology, mesh, impl, fp8):
  chips = aot.parse_topology(topology).chips
  code, out, err = _aot(capsys, f"--topology={topology}", f"--mesh={mesh}", f"--batch={chips}",
                        f"--set=model.moe_impl={impl!r}", *(["--set=model.fp8=True", "--set=model.hidden_size=256"]
                                                             if fp8 else []))
  assert code == 0, err[-2000:]
  r = json.loads(out.strip().splitlines()[-1])
  assert r["compiled"] and r["fits"] and r["chips"] == chips and r["hosts"] == chips // 4
  assert r["data"]["hosts"] == chips // 4 and r["data"]["rows_per_host"] == 4
  assert r["device_kind"] == "TPU v5"
  assert 0 < r["argument_gb"] and 0 < r["peak_gb"] < r["hbm_gb"]
  assert r["compiled_flops"] > 0.5 * r["model_flops"] > 0
  if impl == "ragged":  # no data-dependent loop: every trip count is known
    assert r["unknown_trip_counts"] == 0
  if impl == "ep":
    assert r["collectives"].get("all-to-all", {}).get("count", 0) > 0, r["collectives"]
  assert set(r["ideal_collectives_gb"]) == {"gather", "reduce", "a2a", "total"} and r["collectives_ratio"] > 0
  assert set(r["ideal_wire_gb"]) == {"gather", "reduce", "a2a", "total"} and r["wire_ratio"] > 0
  kinds = r["collectives"].values()  # (figures rounded to MB)
  assert r["wire_gb"] == pytest.approx(sum(v["wire_gb"] for v in kinds), abs=0.001 * len(kinds))


def test_tpu_layout_keeps_weight_collectives_off_the_whole_slice(capsys):
  """fsdp 2 x expert 4 = all 8 chips of a v5p-16: the TPU layout (sharding.layout_rules) cuts non-expert
  weights over `expert` only, so no weight or gradient is all-reduced over the whole slice; ZeRO-3
  over both axes (DEFAULT_RULES, given as overrides) has libtpu turn its reduce-scatters into
  whole-slice all-reduces, and sends more on the wire. Weights of >= 1 MiB: hidden 512, vocab 1024."""
  from moe_jax import sharding
  wide = ["--topology=v5p-16", "--mesh=1,2,4,1", "--batch=8", "--set=model.moe_impl='ep'",
          "--set=model.hidden_size=512", "--set=model.vocab_size=1024"]
  restore = [r for r in sharding.DEFAULT_RULES if r[0] in sharding.ZERO_NAMES]
  runs = {}
  for name, extra in (("tpu", []), ("zero3", [f"--set=mesh.rules={restore!r}"])):
    code, out, err = _aot(capsys, *wide, *extra)
    assert code == 0, err[-2000:]
    runs[name] = json.loads(out.strip().splitlines()[-1])
  assert runs["tpu"]["non_expert_weights_over"] == ["expert"]
  assert runs["zero3"]["non_expert_weights_over"] == ["fsdp", "expert"]
  assert runs["tpu"]["whole_slice_all_reduces"]["count"] == 0, runs["tpu"]["whole_slice_all_reduces"]
  assert runs["zero3"]["whole_slice_all_reduces"]["count"] > 0
  assert runs["tpu"]["wire_gb"] < runs["zero3"]["wire_gb"]


def test_ideal_collectives_of_an_fsdp_layout():
  """Pure FSDP over 8 host devices: every cut weight is gathered and reduce-scattered once at full
  size; what stays whole (norm scales, the router) is all-reduced; no all-to-all."""
  import jax
  import numpy as np
  from flax import linen as nn
  from moe_jax import train as train_lib, variables
  from moe_jax.config import tiny
  config = train_lib.base_config(tiny(), "tiny")
  config.mesh.update(data=1, fsdp=8, expert=1, tensor=1)
  config.batch_size = 8
  trainer = train_lib.Trainer(config)
  ideal = aot.ideal_collectives(trainer, config)
  boxed = variables.abstract(trainer.mcfg)["params"]
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  cut_names = {"embed", "q_lora", "kv_lora"}  # the rules' FSDP dims
  cut = sum(int(np.prod(a.shape)) * 4 for a, spec in zip(jax.tree.leaves(nn.unbox(boxed)), specs) if cut_names & set(spec))
  whole = sum(int(np.prod(a.shape)) * 4 for a, spec in zip(jax.tree.leaves(nn.unbox(boxed)), specs)
              if not cut_names & set(spec))
  assert ideal["a2a"] == 0 and ideal["gather"] == cut  # tiny computes in fp32: 4 bytes
  assert ideal["reduce"] == cut + whole
  # on the wire (ring): gather and reduce-scatter over 8 send 7/8, the all-reduce of a whole weight 2 x 7/8
  assert ideal["wire_gather"] == pytest.approx(7 / 8 * cut)
  assert ideal["wire_reduce"] == pytest.approx(7 / 8 * cut + 2 * 7 / 8 * whole)
  # expert parallelism: 4 exchanges (dispatch, combine; forward, backward) per MoE layer
  config.mesh.update(fsdp=2, expert=4)
  ep = aot.ideal_collectives(train_lib.Trainer(config), config)
  cfg = trainer.mcfg
  moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
  tokens = config.batch_size * config.seq_len / 8
  assert ep["a2a"] == 4 * moe_layers * tokens * cfg.num_experts_per_tok * cfg.hidden_size * 4 > 0
  assert ep["wire_a2a"] == pytest.approx(3 / 4 * ep["a2a"])


def test_multi_slice_sends_data_parallel_reductions_over_dcn(capsys):
  code, out, err = _aot(capsys, "--topology=v5p-16", "--num_slices=2", "--mesh=-1,1,1,1", "--batch=16")
  assert code == 0, err[-2000:]
  r = json.loads(out.strip().splitlines()[-1])
  assert r["chips"] == 16 and r["hosts"] == 4 and r["mesh"]["data"] == 16 and r["num_slices"] == 2
  assert r["collectives"].get("dcn-all-reduce", {}).get("count", 0) > 0, r["collectives"]


def test_scanned_layers_count_every_trip(capsys):
  """Doubling the layers of a scanned stack doubles the layers' FLOPs although cost_analysis counts the body once."""
  runs = {}
  for layers in (2, 4):
    code, out, err = _aot(capsys, "--topology=v5p-16", "--mesh=-1,1,1,1", "--batch=8", f"--layers={layers}",
                          "--set=model.scan_layers=True", "--set=model.first_k_dense_replace=0",
                          "--set=model.num_nextn_predict_layers=0")
    assert code == 0, err[-2000:]
    runs[layers] = json.loads(out.strip().splitlines()[-1])
  growth = runs[4]["compiled_flops"] / runs[2]["compiled_flops"]
  model_growth = runs[4]["model_flops"] / runs[2]["model_flops"]
  assert abs(growth - model_growth) / model_growth < 0.15, (growth, model_growth)
  xla_growth = runs[4]["xla_cost_flops"] / runs[2]["xla_cost_flops"]  # XLA's own figure: the loop body once
  assert xla_growth < growth - 0.2, (xla_growth, growth)


@pytest.mark.parametrize("flags,message", [
    (["--topology=v5p-16", "--mesh=2,2,1,1"], "4 but there are 8 devices"),
    (["--topology=v9-16"], "unknown TPU family"),
    (["--topology=v5p-16", "--mesh=8,1"], "give 4 integers"),
    (["--topology=v5p-16", "--set=model.no_such_field=1"], "no field 'model.no_such_field'"),
    (["--topology=v5p-16", "--batch=3"], "not divisible by the data-parallel size 8"),
    (["--topology=v5p-16", "--step=eval", "--speculative=1"], "use it with --step=generate, not --step=eval"),
    (["--topology=v5p-16", "--speculative=2"], "use it with --step=generate, not --step=train"),
    (["--topology=v5p-16", "--step=generate", "--speculative=1", "--set=model.num_nextn_predict_layers=0"],
     "num_nextn_predict_layers=0"),
])
def test_bad_input_is_one_line_exit_2(capsys, flags, message):
  code, out, err = _aot(capsys, *flags)
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
  assert "Traceback" not in err and not out.strip()


@pytest.mark.parametrize("step", ["eval", "generate"])
def test_tiny_inference_steps_compile_for_tpu(capsys, step):
  """--step=eval|generate: one sequence per data shard, FP8 weights (tiny is V3-shaped), per-chip memory."""
  code, out, err = _aot(capsys, "--topology=v5p-16", "--mesh=2,1,4,1", f"--step={step}", "--set=model.moe_impl='ep'")
  assert code == 0, err[-2000:]
  r = json.loads(out.strip().splitlines()[-1])
  assert r["step"] == step and r["chips"] == 8 and r["batch"] == 8 and r["seq"] == 32
  assert r["weights"].startswith("fp8") and 0 < r["weights_gb_per_chip"] < r["hbm_gb"]
  if step == "eval":
    assert r["fits"] and 0 < r["argument_gb"] <= r["peak_gb"] < r["hbm_gb"]
    assert r["compiled_flops"] > 0.5 * r["model_flops"] > 0
    assert r["collectives"].get("all-to-all", {}).get("count", 0) > 0, r["collectives"]  # EP dispatch
  else:
    assert r["fits"] and r["prefill"]["fits"] and r["decode"]["fits"] and r["cache_gb_per_chip"] > 0
    # The decode step donates the cache: its output cache aliases the argument.
    assert r["decode"]["alias_gb"] >= r["cache_gb_per_chip"] > 0
    assert r["decode_collectives"].get("all-to-all", {}).get("count", 0) > 0


def test_tiny_speculative_generate_compiles_for_tpu(capsys):
  """--step=generate --speculative=3 with 2 MTP depths (the last one reused once): prefill into the
  main and MTP caches, and one verify + accept + draft step with the loop state donated."""
  code, out, err = _aot(capsys, "--topology=v5p-16", "--mesh=2,1,4,1", "--step=generate", "--speculative=3",
                        "--set=model.moe_impl='ep'", "--set=model.num_nextn_predict_layers=2")
  assert code == 0, err[-2000:]
  r = json.loads(out.strip().splitlines()[-1])
  assert r["step"] == "generate" and r["speculative"] == 3 and r["mtp_depths_used"] == 2
  assert r["batch"] == 8 and r["seq"] == 32 and r["cache_slots"] == 32 + 3 + 2
  assert r["fits"] and r["prefill"]["fits"] and r["spec_step"]["fits"]
  assert 0 < r["cache_gb_per_chip"] < r["state_gb_per_chip"]
  assert r["spec_step"]["alias_gb"] >= r["state_gb_per_chip"]  # the whole loop state is donated
  assert r["spec_step_collectives"].get("all-to-all", {}).get("count", 0) > 0  # EP dispatch in verify + draft


def test_fp8_abstract_variables_are_the_released_layout():
  """--weights=fp8: every linear weight but embed, head and router gate is e4m3 with a 128x128 scale grid
  that layers/fp8.Fp8Weight accepts, sharded like its weight's leading dims; all abstract (nothing built)."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from moe_jax import aot_steps
  from moe_jax.config import tiny
  from moe_jax.layers.fp8 import Fp8Weight
  from moe_jax.model import Transformer
  devices = aot.parse_topology("v5p-16").devices()
  mesh = sharding.make_mesh(1, 2, 4, 1, devices=devices)
  cfg = tiny(num_nextn_predict_layers=1, scan_layers=True)
  flat = {}
  for fp8 in (True, False):
    v = aot_steps.abstract_variables(Transformer(cfg), mesh, sharding.DEFAULT_RULES, fp8, 8)
    flat[fp8] = traverse_util.flatten_dict(v)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding.mesh is mesh for x in flat[fp8].values())
  e4m3 = {p for p, x in flat[True].items() if x.dtype == jnp.float8_e4m3fn}
  scales = {p for p in flat[True] if p[0] == "fp8_scales"}
  assert {("params", *p[1:]) for p in scales} == e4m3 and not any(p[0] == "fp8_scales" for p in flat[False])
  names = {"/".join(p[1:]) for p in e4m3}
  assert not any(n.startswith(("embed", "head")) or "router" in n or "norm" in n for n in names), names
  assert any("experts" in n or "moe" in n for n in names) and any(n.endswith("attn/k_b") for n in names)
  dense = {p for p, x in flat[False].items() if x.dtype == jnp.float32 and len(x.shape) >= 2
           and not p[-1].startswith(("embed", "head")) and "router" not in "/".join(p) and p[-1] != "embed"}
  for p in e4m3:
    q, s = flat[True][p], flat[True][("fp8_scales", *p[1:])]
    Fp8Weight(q, s).split  # noqa: B018 (raises unless s is q's 128x128 block grid)
    assert tuple(s.sharding.spec) == tuple(q.sharding.spec)[:s.ndim - 2]
  assert e4m3 <= dense


def test_inference_step_that_does_not_fit_is_a_result(capsys):
  """XLA's out-of-memory refusal is reported as fits: false (with its message), not as an error."""
  code, out, err = _aot(capsys, "--topology=v6e-1", "--mesh=1,1,1,1", "--step=eval", "--weights=dense",
                        "--set=model.vocab_size=150000000")  # a 38 GB embedding on a 34 GB chip
  assert code == 0, err[-2000:]
  r = json.loads(out.strip().splitlines()[-1])
  assert r["fits"] is False and r["compiled"] is False and "RESOURCE_EXHAUSTED" in r["oom"]
  assert r["weights_gb_per_chip"] > r["hbm_gb"]


def test_tpu_flags_keep_what_the_user_set_and_only_go_to_a_checked_libtpu():
  from moe_jax import tpu_flags
  env = {}
  assert tpu_flags.apply(env, "0.0.42.1").split() == list(tpu_flags.OVERLAP_FLAGS)
  assert tpu_flags.apply(env, "0.0.42.1") == env["LIBTPU_INIT_ARGS"] == " ".join(tpu_flags.OVERLAP_FLAGS)  # idempotent
  env = {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_collective_fusion=false --xla_foo=1"}
  flags = tpu_flags.apply(env, "0.0.42.1").split()
  assert flags[:2] == ["--xla_tpu_enable_async_collective_fusion=false", "--xla_foo=1"]
  assert "--xla_tpu_enable_async_collective_fusion=true" not in flags and len(flags) == 1 + len(tpu_flags.OVERLAP_FLAGS)
  # libtpu aborts on a flag it does not know: another version, or none installed, gets nothing added
  for version in ("0.0.43", "0.0.4", None):
    env = {"LIBTPU_INIT_ARGS": "--xla_foo=1"}
    assert tpu_flags.apply(env, version) == "--xla_foo=1" and env == {"LIBTPU_INIT_ARGS": "--xla_foo=1"}
    assert tpu_flags.apply({}, version) == ""
  assert tpu_flags.installed_libtpu().startswith(tpu_flags.VERIFIED)  # the test extra installs jax[tpu]


def test_weight_gathers_compile_async_with_the_tpu_flags():
  """A fresh process (libtpu reads its flags once): the FSDP weight gathers of the tiny step become
  async collective fusions with compute scheduled under them; with the fusion turned off by the
  user's own LIBTPU_INIT_ARGS, every gather is a plain synchronous all-gather."""
  import os
  import subprocess
  import sys
  runs = {}
  for name, user in (("default", ""), ("off", "--xla_tpu_enable_async_collective_fusion=false")):
    env = dict(os.environ, LIBTPU_INIT_ARGS=user, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    out = subprocess.run([sys.executable, "-m", "moe_jax.aot", "--config=configs/tiny.py:test", "--topology=v5p-16",
                          "--mesh=1,8,1,1", "--batch=8", "--set=model.hidden_size=256"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
  on, off = runs["default"]["async_collectives"], runs["off"]["async_collectives"]
  gathers = {k: r["collectives"]["all-gather"]["count"] for k, r in runs.items()}
  assert off["sync_gathers"] == gathers["off"] > 0
  assert on["sync_gathers"] < gathers["default"] / 2 and on["overlapped"] > 0
