"""moe_jax.train / optim / flops / checkpoint, in process on 8 forced host devices."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax import checkpoint, config as model_config, data, flops, optim, sharding, train
from moe_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name="tiny", arg=None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# --- pieces --------------------------------------------------------------------------------
def test_lr_schedules():
  o = ml_collections.ConfigDict(dict(lr=1.0, warmup=10, schedule="cosine", min_lr_ratio=0.1,
                                     step_milestones=(0.8, 0.9), step_factor=0.316))
  f = optim.lr_schedule(o, 110)
  np.testing.assert_allclose([f(0), f(9), f(10), f(60), f(110)], [0.1, 1.0, 1.0, 0.55, 0.1], rtol=1e-5)
  o.schedule = "step"
  f = optim.lr_schedule(o, 110)
  np.testing.assert_allclose([f(50), f(89), f(90), f(99), f(100)], [1, 1, 0.316, 0.316, 0.316 ** 2], rtol=1e-5)
  o.schedule = "linear"
  with pytest.raises(UserError, match="optim.schedule"):
    optim.lr_schedule(o, 110)


def test_decay_mask_and_bias_update():
  mask = optim.decay_mask({"a": {"scale": jnp.ones(4), "kernel": jnp.ones((4, 4))}, "bias": jnp.ones((2, 2))})
  assert mask == {"a": {"scale": False, "kernel": True}, "bias": False}
  b = optim.bias_update(jnp.zeros(4), jnp.array([8.0, 2.0, 5.0, 5.0]), 0.1)
  np.testing.assert_allclose(b, [-0.1, 0.1, 0.0, 0.0])
  np.testing.assert_allclose(optim.maxvio(jnp.array([[10.0, 2, 4, 4], [5, 5, 5, 5]])), [1.0, 0.0])
  o = ml_collections.ConfigDict(dict(bias_update_speed=0.001, bias_update_until=5))
  assert float(optim.bias_update_speed(o, 4)) == pytest.approx(0.001) and float(optim.bias_update_speed(o, 5)) == 0


def test_flops_count_activated_parameters():
  v3 = model_config.deepseek_v3()
  # DeepSeek-V3 reports 37B activated parameters (main model, embedding excluded).
  assert 36e9 < flops.activated_params(v3) < 38.5e9
  tiny = model_config.tiny()
  dense = tiny.replace(num_experts_per_tok=4, n_group=1, topk_group=1)
  assert flops.forward_flops_per_token(dense, 64) > flops.forward_flops_per_token(tiny, 64)
  assert flops.forward_flops_per_token(tiny, 128) > flops.forward_flops_per_token(tiny, 64)
  assert flops.train_flops_per_token(tiny, 64) == 3 * flops.forward_flops_per_token(tiny, 64)
  peak, how = flops.peak_flops("float32", size=256)
  assert peak > 1e8 and "measured" in how


def test_configs_load_and_validate():
  for name, arg in (("tiny", None), ("tiny", "copy"), ("small", None), ("small", "smoke"),
                    ("deepseek_v2_lite", None), ("deepseek_v3", None), ("deepseek_v3", "gpu")):
    c = load_config(name, arg)
    mcfg = checkpoint.model_config(c)
    assert c.steps > 0 and c.model.dtype in ("float32", "bfloat16"), name
    assert (c.optim.bias_update_speed > 0) == (mcfg.topk_method == "noaux_tc"), name
  with pytest.raises(ValueError, match="unknown variant"):
    load_config("tiny", "nope")


@pytest.mark.slow
def test_grad_accum_matches_one_big_batch():
  c = load_config("tiny", "test")
  c.batch_size, c.mesh.data = 16, 8
  trainers = []
  for accum in (1, 2):
    c.optim.grad_accum = accum
    trainers.append(train.Trainer(ml_collections.ConfigDict(c.to_dict())))
  src = data.make_source(c.data, c.seq_len, c.batch_size, 0, 264)
  out = []
  for t in trainers:
    state, m = t.step_fn(t.init_state(0), t.batch(src, "train", 0))
    out.append((jax.device_get(state.params), jax.device_get(state.router), jax.device_get(m)))
  (p1, r1, m1), (p2, r2, m2) = out
  for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
    np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, err_msg=k)
  # Adam's first step is ~lr * sign(g): elements with |g| near eps amplify float noise, hence atol.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), p1, p2)
  jax.tree.map(np.testing.assert_array_equal, r1, r2)
  jax.tree.map(np.testing.assert_array_equal, m1["expert_counts"], m2["expert_counts"])


def _first_step_metrics(c, step=0):
  t = train.Trainer(ml_collections.ConfigDict(c.to_dict()))
  src = data.make_source(c.data, c.seq_len, c.batch_size, 0, 264)
  batch = t.batch(src, "train", step)
  return jax.device_get(t.step_fn(t.init_state(0), batch)[1]), jax.device_get(batch)


def test_document_mask_both_positions():
  """document_mask=False attends across the packed documents of a row; the loss masking stays."""
  c = load_config("tiny", "test")
  c.mesh.data, c.batch_size, c.seq_len = 8, 8, 256
  c.model.num_nextn_predict_layers = 0  # the main model's attention is the point: a smaller compile
  src = data.make_source(c.data, c.seq_len, c.batch_size, 0, 264)
  step = next(i for i in range(200) if (np.diff(src.rows("train", i, range(8))["segment_ids"], axis=1) != 0).any())
  on, _ = _first_step_metrics(c, step)
  c.data.document_mask = False
  off, _ = _first_step_metrics(c, step)
  assert abs(float(on["lm_loss"]) - float(off["lm_loss"])) > 1e-6  # a row of several documents sees more
  assert np.isfinite(float(off["loss"]))


def test_scanned_layers_sum_their_balance_losses():
  """With scan_layers each MoE layer sows its balance loss into one [L] leaf: the loss sums it."""
  c = load_config("tiny", "test")
  c.mesh.data, c.batch_size = 8, 8
  c.model.num_hidden_layers, c.model.aux_loss_alpha = 3, 0.01
  plain, _ = _first_step_metrics(c)
  c.model.scan_layers = True
  scanned, _ = _first_step_metrics(c)
  assert np.shape(scanned["loss"]) == () and float(scanned["balance_loss"]) > 0
  # Scanned init draws other weights, so equal only up to routing noise; a single layer's loss
  # would be about half (2 MoE layers here).
  np.testing.assert_allclose(scanned["balance_loss"], plain["balance_loss"], rtol=0.05)


# --- checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A checkpoint written from an 8-way data-parallel mesh (no training: init state at step 0)."""
  workdir = str(tmp_path_factory.mktemp("saved"))
  c = load_config("tiny", "test")
  c.batch_size, c.mesh.data = 8, 8
  t = train.Trainer(c)
  checkpoint.check_workdir(workdir, c.to_dict(), t.abstract_state.to_dict())
  state = t.init_state(0).replace(step=jnp.int32(3))
  ck = checkpoint.Checkpointer(workdir)
  ck.save(3, state.to_dict(), c.to_dict())
  ck.close()
  return workdir, c, jax.device_get(state.to_dict())


def test_restore_onto_another_mesh(saved_run):
  workdir, c, saved = saved_run
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.mesh.update(dict(data=2, fsdp=2, expert=2))
  t = train.Trainer(c2)
  checkpoint.check_workdir(workdir, c2.to_dict(), t.abstract_state.to_dict())  # mesh may change on resume
  assert checkpoint.latest_step(workdir) == 3
  restored = checkpoint.Checkpointer(workdir).restore(3, t.abstract_state.to_dict())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  gate = restored["params"]["layers_1"]["moe"]["gate"]
  assert gate.sharding == t.state_sharding.params["layers_1"]["moe"]["gate"]
  assert gate.addressable_shards[0].data.shape == (4, 32, 32)  # experts over expert=2, embed over fsdp=2


def test_restore_for_eval(saved_run):
  workdir, c, saved = saved_run
  mesh = sharding.make_mesh(data=2, fsdp=4)
  for path in (workdir, os.path.join(workdir, "checkpoints", "3")):
    cfg, model, variables, step = checkpoint.restore_for_eval(path, mesh=mesh)
    assert step == 3 and cfg.name == "tiny_test" and model.cfg.vocab_size == 264
    assert set(variables) == {"params", "router"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), saved["params"])
    assert variables["params"]["embed"].sharding.spec[1] == ("fsdp", "expert")
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    logits = jax.jit(model.apply)(variables, jnp.zeros((8, 4), jnp.int32))
  assert logits.shape == (8, 4, 264)
  with pytest.raises(UserError, match="no checkpoint"):
    checkpoint.restore_for_eval(os.path.join(workdir, "missing"))
  with pytest.raises(UserError, match="no checkpoint"):
    checkpoint.restore_for_eval(os.path.dirname(workdir))


def test_workdir_guard(saved_run, tmp_path):
  workdir, c, _ = saved_run
  other = ml_collections.ConfigDict(c.to_dict())
  other.optim.lr = 1e-2
  other.model.hidden_size = 96
  t = train.Trainer(other)
  with pytest.raises(UserError) as e:
    checkpoint.check_workdir(workdir, other.to_dict(), t.abstract_state.to_dict())
  msg = str(e.value)
  assert "optim.lr: workdir 0.003 != this run 0.01" in msg and "model.hidden_size" in msg
  assert "params/embed: checkpoint (264, 64) vs this config (264, 96)" in msg and "\n" not in msg
  with pytest.raises(UserError, match="differing shapes: .*params/embed"):
    checkpoint.Checkpointer(workdir).restore(3, t.abstract_state.to_dict())
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not empty .*notes.txt"):
    checkpoint.check_workdir(str(tmp_path), c.to_dict(), t.abstract_state.to_dict())
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_workdir_of_an_older_version_resumes(saved_run, tmp_path):
  """A config.json written before a field existed (absent: its default) or before a kernel default
  changed (fp8_kernel 'xla', attention_impl, moe_gmm: how, not what, is computed) resumes; a field
  that is absent but set away from its default in this run is still a difference."""
  workdir, c, _ = saved_run
  old = json.loads(open(os.path.join(workdir, "config.json")).read())
  del old["model"]["attention_type"], old["model"]["num_key_value_heads"]
  old["model"].update(fp8_kernel="xla", attention_impl="einsum", moe_gmm="tiled")
  older = tmp_path / "older"
  shutil.copytree(workdir, older)
  (older / "config.json").write_text(json.dumps(old))
  t = train.Trainer(c)
  checkpoint.check_workdir(str(older), c.to_dict(), t.abstract_state.to_dict())
  gqa = ml_collections.ConfigDict(c.to_dict())
  gqa.model.attention_type, gqa.model.num_key_value_heads = "gqa", 2
  with pytest.raises(UserError, match="model.attention_type: workdir 'mla' != this run 'gqa'"):
    checkpoint.check_workdir(str(older), gqa.to_dict(), t.abstract_state.to_dict())


# --- it learns -----------------------------------------------------------------------------
@pytest.mark.slow
def test_copy_task_learns(tmp_path):
  c = load_config("tiny", "copy")
  out = train.run(c, str(tmp_path))
  state = out["state"]
  src = data.make_source(c.data, c.seq_len, c.batch_size, c.seed, 264)
  batch = src.rows("val", 0, range(c.batch_size))
  tokens = jnp.asarray(batch["tokens"])
  model = train.Transformer(checkpoint.model_config(c))
  with sharding.activation_rules(sharding.make_mesh(data=-1), sharding.DEFAULT_RULES):
    logits = jax.jit(model.apply)({"params": state.params, "router": state.router}, tokens[:, :-1])
  half = src.half  # inputs at L..2L-1 predict the copies at L+1..2L
  acc = float(jnp.mean(jnp.argmax(logits[:, half:2 * half], -1) == tokens[:, half + 1:2 * half + 1]))
  assert acc >= 0.95, acc


@pytest.mark.slow
def test_aux_free_balancing_lowers_violation(tmp_path):
  violations = {}
  for gamma in (0.0, 0.01):
    c = load_config("tiny", "test")
    c.steps, c.batch_size, c.seq_len, c.checkpoint_every = 60, 16, 64, 1000
    c.model.aux_loss_alpha = 0.0
    c.optim.bias_update_speed = gamma
    run_dir = str(tmp_path / f"g{gamma}")
    train.run(c, run_dir)
    last = read_metrics(run_dir)[-20:]
    violations[gamma] = np.mean([r["maxvio_layers"]["layers_1"] for r in last])
  assert violations[0.01] < 0.5 * violations[0.0], violations
