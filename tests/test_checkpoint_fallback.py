"""Damaged checkpoints in process: the newest intact step restores, the damaged one is named,
and restored variables serve model.apply with or without jit.

The steps are init states (no training), so the file stays fast; the damage is what a user
does by accident: a truncated or deleted data file, a deleted state/_METADATA or config item.
"""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import checkpoint, sharding, train
from moe_jax.errors import UserError
from test_train import load_config


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory):
  """A workdir with steps 1, 2, 3 whose params differ (init params + step)."""
  workdir = str(tmp_path_factory.mktemp("steps"))
  c = load_config("tiny", "test")
  c.batch_size = 8  # 8 host devices
  t = train.Trainer(c)
  checkpoint.check_workdir(workdir, c.to_dict(), t.abstract_state.to_dict())
  ck = checkpoint.Checkpointer(workdir)
  saved = {}
  init = t.init_state(0)  # one compile; each step shifts the params so that the steps differ
  for step in (1, 2, 3):
    state = init.replace(step=jnp.int32(step), params=jax.tree.map(lambda x: x + step, init.params))  # noqa: B023
    ck.save(step, state.to_dict(), c.to_dict())
    saved[step] = jax.device_get(state.params)
  ck.close()
  return workdir, c, t, saved


def damage(workdir, step, how):
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  data = sorted(glob.glob(os.path.join(state, "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  if how == "truncate":  # every data file, so the parameters (all eval reads) are hit too
    for path in data:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  elif how == "delete":
    os.remove(data[-1])  # the largest
  elif how == "metadata":
    os.remove(os.path.join(state, "_METADATA"))
  elif how == "config":
    os.remove(os.path.join(workdir, "checkpoints", str(step), "config", "config.json"))
  else:
    raise ValueError(how)


@pytest.fixture
def copy(steps_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(steps_run[0], workdir)
  return workdir


@pytest.mark.parametrize("how", ["truncate", "delete", "metadata", "config"])
def test_resume_falls_back_to_newest_intact_step(steps_run, copy, how, caplog):
  _, _, t, saved = steps_run
  damage(copy, 3, how)
  ck = checkpoint.Checkpointer(copy)
  abstract = t.abstract_state.to_dict()
  with caplog.at_level(logging.WARNING):
    step, state = ck.restore_intact(lambda s: (ck.config(s), ck.restore(s, abstract))[1])
  ck.close()
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), saved[2])
  warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint step 3 " in warnings[0] and "using step 2 instead" in warnings[0]
  assert "\n" not in warnings[0] and "moved aside: 3.damaged" in warnings[0]
  # Moved aside, so training can save step 3 again; the other steps are untouched.
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["1", "2", "3.damaged"]


def test_every_step_damaged_is_one_line(steps_run, copy):
  for step in (1, 2, 3):
    damage(copy, step, "truncate")
  ck = checkpoint.Checkpointer(copy, read_only=True)
  abstract = steps_run[2].abstract_state.to_dict()
  with pytest.raises(UserError, match="no intact checkpoint") as e:
    ck.restore_intact(lambda s: ck.restore(s, abstract))
  ck.close()
  assert "\n" not in str(e.value) and all(f"checkpoint step {s} " in str(e.value) for s in (1, 2, 3))


def test_config_mismatch_is_not_damage(steps_run, copy):
  """A checkpoint of another shape is the user's to fix: refused, not skipped as damaged."""
  c = load_config("tiny", "test")
  c.batch_size, c.model.hidden_size = 8, 96
  t = train.Trainer(c)
  ck = checkpoint.Checkpointer(copy)
  with pytest.raises(UserError, match="does not fit this config"):
    ck.restore_intact(lambda s: ck.restore(s, t.abstract_state.to_dict()))
  ck.close()
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["1", "2", "3"]


def test_restore_for_eval_falls_back_and_names_the_step(steps_run, copy, caplog):
  damage(copy, 3, "truncate")
  with caplog.at_level(logging.WARNING):
    _, _, variables, step = checkpoint.restore_for_eval(copy)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), steps_run[3][2])
  assert any("checkpoint step 3 " in r.getMessage() and "using step 2" in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["1", "2", "3"]  # eval never moves anything
  with pytest.raises(UserError, match=r"checkpoints/3 is damaged \(cannot read .*--workdir="):
    checkpoint.restore_for_eval(os.path.join(copy, "checkpoints", "3"))


def test_restored_variables_apply_without_jit(steps_run):
  """restore_for_eval's sharded variables used to fail outside jit (IndexError in named_sharding)."""
  mesh = sharding.make_mesh(data=2, fsdp=4)
  _, model, variables, _ = checkpoint.restore_for_eval(steps_run[0], mesh=mesh)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 264)
  eager = model.apply(variables, tokens)
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    jitted = jax.jit(model.apply)(variables, tokens)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=2e-5, rtol=2e-5)
