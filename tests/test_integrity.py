"""Integrity under real faults, in process: corrupted bytes in a checkpoint's data files, NaN
parameters, an old checkpoint without checksums, max_to_keep, checkpoints/ removed mid-run,
damaged metrics lines, and the workdir lock (a second writer, a holder killed with -9).

Corruption is written into the real ocdbt data files of real checkpoints (state/ocdbt.process_0/d/*),
at a place that holds array values: bytes changed in place, the file keeps its size, orbax reads
it without complaint, and only the checksums (or the finiteness check) see it.
The end-to-end versions (train.py, eval.py, convert as subprocesses) are in test_integrity_cli.py.
"""

import gc
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import checkpoint, checksum, train, workdir_lock
from moe_jax.errors import UserError
from test_train import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_files(workdir, step):
  return sorted(glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*")),
                key=os.path.getsize)


def corrupt_until(files, wanted, how="flip"):
  """Changes 64 bytes at the same relative offset of each file (in place, same size), trying offsets
  from the middle outwards until wanted() holds; each miss is undone. Which bytes hold what depends
  on the layout the writer chose, which differs between machines: the files hold zstd blocks (bytes
  changed in a block's payload decode silently to other values, in its header they fail the read),
  and parameters and optimizer state share them."""
  originals = {}
  for path in files:
    with open(path, "rb") as f:
      originals[path] = f.read()
  for k in (8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13):
    for path in files:
      corrupt_file(path, how, offset=len(originals[path]) * k // 16)
    if wanted():
      return
    for path, data in originals.items():
      with open(path, "wb") as f:
        f.write(data)
  pytest.fail(f"no offset in {files} gives the damage the test needs")


def corrupt(workdir, step, abstract, how="flip"):
  """Damages the step's largest data file so that orbax reads the step without complaint and only
  the checksum of one parameter array disagrees. flip: every byte XOR 0x01; ones: 0xFF bytes
  (the issue's case: 64 random bytes)."""
  path = data_files(workdir, step)[-1]
  corrupt_until([path], lambda: _only_checksums_see_it(workdir, step, abstract), how)
  return path


def _only_checksums_see_it(workdir, step, abstract):
  ck = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    ck.restore(step, abstract)
    return False  # the bytes held nothing that is read back
  except checkpoint.Damaged as e:
    return str(e).startswith("checksum mismatch in 1 array(s): params/")
  except Exception:  # noqa: BLE001  a read error: the bytes hit a block header
    return False
  finally:
    ck.close()


def damage_what_eval_reads(workdir, step):
  """Damages every data file of the step so that reading the parameters alone (what eval reads)
  finds it: a checksum mismatch or a read error."""
  def eval_sees_it():
    try:
      checkpoint.restore_for_eval(os.path.join(workdir, "checkpoints", str(step)))
    except UserError as e:
      return "is damaged (" in str(e)
    return False
  corrupt_until(data_files(workdir, step), eval_sees_it)


def corrupt_file(path, how="flip", offset=None):
  size = os.path.getsize(path)
  offset = size // 2 if offset is None else offset
  with open(path, "r+b") as f:
    f.seek(offset)
    old = f.read(64)
    f.seek(offset)
    f.write(bytes(b ^ 1 for b in old) if how == "flip" else b"\xff" * len(old))
  assert os.path.getsize(path) == size
  return path


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
  init = t.init_state(0)
  for step in (1, 2, 3):
    state = init.replace(step=jnp.int32(step), params=jax.tree.map(lambda x: x + step, init.params))  # noqa: B023
    ck.save(step, state.to_dict(), c.to_dict())
    saved[step] = jax.device_get(state.params)
  ck.close()
  return workdir, c, t, saved, init


@pytest.fixture
def copy(steps_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(steps_run[0], workdir)
  return workdir


def restore_intact(workdir, t, read_only=False):
  ck = checkpoint.Checkpointer(workdir, read_only=read_only)
  abstract = t.abstract_state.to_dict()
  try:
    return ck.restore_intact(lambda s: (ck.config(s), ck.restore(s, abstract))[1])
  finally:
    ck.close()


def damage_warnings(caplog):
  return [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]


def test_checksum_is_the_same_on_any_sharding_and_sees_one_bit():
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  x = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
  specs = [jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("a", "b"), jax.sharding.PartitionSpec("b", None)]
  digests = {checksum.summarize({"x": jax.device_put(x, jax.sharding.NamedSharding(mesh, s))})[0]["x"]["digest"]
             for s in specs}
  assert len(digests) == 1 and digests == {checksum.summarize({"x": x})[0]["x"]["digest"]}
  y = x.copy()
  y.view(np.uint32)[5, 7] ^= 1  # one bit of one element
  assert checksum.summarize({"x": y})[0]["x"]["digest"] not in digests
  z = x.copy()
  z[[0, 1]] = z[[1, 0]]  # the same values in other places
  assert checksum.summarize({"x": z})[0]["x"]["digest"] not in digests
  for dtype in (jnp.bfloat16, jnp.int8, jnp.uint32, jnp.bool_):
    a = jnp.asarray(x[:2, :3]).astype(dtype)
    assert len(checksum.summarize({"a": a})[0]["a"]["digest"]) == 16
  _, bad = checksum.summarize({"params": {"w": np.array([1.0, np.inf])}, "step": np.int32(3)})
  assert bad == ["params/w"]


@pytest.mark.parametrize("how", ["flip", "ones"])
def test_corrupted_bytes_fall_back_to_the_newest_intact_step(steps_run, copy, how, caplog):
  _, _, t, saved, _ = steps_run
  corrupt(copy, 3, t.abstract_state.to_dict(), how)
  with caplog.at_level(logging.WARNING):
    step, state = restore_intact(copy, t)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), saved[2])
  warnings = damage_warnings(caplog)
  assert len(warnings) == 1 and "checkpoint step 3 " in warnings[0] and "using step 2 instead" in warnings[0]
  assert "checksum mismatch in 1 array(s): params/" in warnings[0]
  assert "\n" not in warnings[0] and "moved aside: 3.damaged" in warnings[0]
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["1", "2", "3.damaged"]


def test_eval_restore_names_the_step_it_used(steps_run, copy, caplog):
  corrupt(copy, 3, steps_run[2].abstract_state.to_dict())
  with caplog.at_level(logging.WARNING):
    _, _, variables, step = checkpoint.restore_for_eval(copy)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), steps_run[3][2])
  assert any("checkpoint step 3 " in m and "checksum mismatch" in m and "using step 2" in m
             for m in damage_warnings(caplog))
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["1", "2", "3"]  # eval moves nothing
  with pytest.raises(UserError, match=r"checkpoints/3 is damaged \(checksum mismatch in 1 array"):
    checkpoint.restore_for_eval(os.path.join(copy, "checkpoints", "3"))


def test_convert_from_ckpt_falls_back_or_refuses(steps_run, copy, tmp_path, capfd):
  from moe_jax import convert
  corrupt(copy, 3, steps_run[2].abstract_state.to_dict())
  out = convert.ckpt_to_hf(copy, tmp_path / "hf")
  assert "restored step 2 of" in capfd.readouterr().err and (out / "config.json").is_file()
  with pytest.raises(UserError, match="checksum mismatch"):
    convert.ckpt_to_hf(os.path.join(copy, "checkpoints", "3"), tmp_path / "hf3")
  assert not (tmp_path / "hf3").exists()


def test_convert_checkpoint_is_verified(tmp_path):
  """moe_jax.convert's own checkpoints (--hf ... --out) carry checksums.json and are verified too."""
  from moe_jax import convert
  from moe_jax.config import PRESETS
  from moe_jax.model import Transformer
  from flax import linen as nn
  model = Transformer(PRESETS["tiny"]())
  v = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  variables = {"params": v["params"], "router": v["router"]}
  out = tmp_path / "ck"
  with convert._Staging(out) as tmp:
    convert.write_checkpoint(tmp, model.cfg, variables)
  convert.restore(out)  # intact
  data = sorted(glob.glob(str(out / convert.VARIABLES_DIR / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
  with open(data[-1], "r+b") as f:
    f.seek(os.path.getsize(data[-1]) // 2)
    old = f.read(16)
    f.seek(os.path.getsize(data[-1]) // 2)
    f.write(bytes(b ^ 1 for b in old))
  with pytest.raises(UserError, match=r"ck is damaged: (checksum mismatch in 1 array|non-finite parameters)"):
    convert.restore(out)


def test_nonfinite_parameters_are_never_saved(steps_run, copy):
  """nan_policy=skip kept saving NaN parameters, which rotated the good checkpoints out."""
  _, c, _, _, init = steps_run
  ck = checkpoint.Checkpointer(copy, max_to_keep=3)
  bad = init.replace(step=jnp.int32(4), params=jax.tree.map(lambda x: x * jnp.nan, init.params))
  with pytest.raises(checkpoint.NonFinite, match=r"parameters at step 4 hold NaN or inf \(params/.*kept: step 3"):
    ck.save(4, bad.to_dict(), c.to_dict())
  ck.close()
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["1", "2", "3"]


def test_old_checkpoint_without_checksums_restores_with_one_warning(steps_run, tmp_path, caplog):
  """A step as checkpoints were written before checksums existed (state + config items only)."""
  _, c, t, _, init = steps_run
  workdir = str(tmp_path / "old")
  ck = checkpoint.Checkpointer(workdir)
  ck.manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(init.to_dict()),
                                              config=checkpoint._ConfigSave({"step": 5, "config": c.to_dict()})))
  ck.close()
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "5", "checksums"))
  checkpoint._warned_unverified = False
  with caplog.at_level(logging.WARNING):
    step, _ = restore_intact(workdir, t)
    restore_intact(workdir, t)
  assert step == 5
  warned = [r.getMessage() for r in caplog.records if "no checksums" in r.getMessage()]
  assert len(warned) == 1 and "checkpoint step 5 " in warned[0]


def test_nonfinite_parameters_are_refused_on_restore(steps_run, tmp_path, caplog):
  """Steps whose parameters hold NaN (written without the save guard, as before it existed) are damage."""
  _, c, t, _, init = steps_run
  workdir = str(tmp_path / "nan")
  ck = checkpoint.Checkpointer(workdir)
  for step, scale in ((1, 1.0), (2, jnp.nan)):
    state = init.replace(step=jnp.int32(step), params=jax.tree.map(lambda x: x * scale, init.params))  # noqa: B023
    ck.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.to_dict()),
        config=checkpoint._ConfigSave({"step": step, "config": c.to_dict()})))
  ck.close()
  with caplog.at_level(logging.WARNING):
    step, _ = restore_intact(workdir, t, read_only=True)
  assert step == 1
  warnings = damage_warnings(caplog)
  assert len(warnings) == 1 and "checkpoint step 2 " in warnings[0] and "non-finite parameters (NaN or inf in params/" \
      in warnings[0]
  with pytest.raises(UserError, match=r"checkpoints/2 is damaged \(non-finite parameters"):
    checkpoint.restore_for_eval(os.path.join(workdir, "checkpoints", "2"))


@pytest.mark.parametrize("sums_of", ["finite", "nan"])
def test_checksums_speak_before_nan(steps_run, tmp_path, sums_of):
  """Damaged bytes often decode to NaN: a step whose checksums do not match says "checksum mismatch"
  (the cause), not "NaN"; NaN parameters that match their checksums are still refused."""
  _, c, t, _, init = steps_run
  workdir = str(tmp_path / "ck")
  ck = checkpoint.Checkpointer(workdir)
  nan = init.replace(step=jnp.int32(1), params=jax.tree.map(lambda x: x * jnp.nan, init.params)).to_dict()
  sums, _ = checksum.summarize(nan if sums_of == "nan" else init.replace(step=jnp.int32(1)).to_dict())
  ck.manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave(nan),
      config=checkpoint._ConfigSave({"step": 1, "config": c.to_dict(), "checksums": checksum.FORMAT}),
      checksums=ocp.args.JsonSave({"format": checksum.FORMAT, "arrays": sums})))
  ck.close()
  expected = (r"damaged \(checksum mismatch in \d+ array\(s\): params/"
              if sums_of == "finite" else r"damaged \(non-finite parameters \(NaN or inf in params/")
  with pytest.raises(UserError, match=expected):
    checkpoint.restore_for_eval(os.path.join(workdir, "checkpoints", "1"))


@pytest.mark.parametrize("value", [0, -1, 1.5, "3"])
def test_max_to_keep_below_one_is_refused(tmp_path, value):
  with pytest.raises(UserError, match=f"checkpoint.max_to_keep={value!r} must be >= 1"):
    checkpoint.Checkpointer(str(tmp_path), max_to_keep=value)
  assert not os.path.exists(tmp_path / "checkpoints")
  assert checkpoint.check_max_to_keep(None) is None and checkpoint.check_max_to_keep(1) == 1


def test_checkpoints_dir_removed_mid_run_is_recreated(steps_run, tmp_path, caplog):
  _, c, t, saved, init = steps_run
  workdir = str(tmp_path / "run")
  ck = checkpoint.Checkpointer(workdir)
  ck.save(1, init.to_dict(), c.to_dict())
  ck.wait()
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with caplog.at_level(logging.WARNING):
    ck.save(2, init.replace(step=jnp.int32(2)).to_dict(), c.to_dict())
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)  # maybe while step 2 is in flight
    ck.save(3, init.replace(step=jnp.int32(3)).to_dict(), c.to_dict())
  ck.close()
  removed = [r.getMessage() for r in caplog.records if "was removed during the run" in r.getMessage()]
  assert len(removed) == 2 and "to save step 2" in removed[0] and "to save step 3" in removed[1]
  assert checkpoint.latest_step(workdir) == 3
  step, _ = restore_intact(workdir, t)
  assert step == 3


def test_checkpoints_dir_emptied_but_not_removed_is_noticed(steps_run, tmp_path, caplog):
  """`rm -rf checkpoints` racing the writer: the save in flight adds entries to checkpoints/, so the
  final rmdir meets ENOTEMPTY and the directory keeps its inode, but the steps in it are gone."""
  _, c, t, _, init = steps_run
  workdir = str(tmp_path / "run")
  ck = checkpoint.Checkpointer(workdir)
  ck.save(1, init.to_dict(), c.to_dict())
  ck.wait()
  directory = os.path.join(workdir, "checkpoints")
  inode = os.stat(directory).st_ino
  for name in os.listdir(directory):
    shutil.rmtree(os.path.join(directory, name))
  with caplog.at_level(logging.WARNING):
    ck.save(2, init.replace(step=jnp.int32(2)).to_dict(), c.to_dict())
    ck.save(3, init.replace(step=jnp.int32(3)).to_dict(), c.to_dict())  # settles step 2: nothing more lost
  ck.close()
  assert os.stat(directory).st_ino == inode
  removed = [r.getMessage() for r in caplog.records if "was removed during the run" in r.getMessage()]
  assert len(removed) == 1 and "to save step 2" in removed[0], removed
  assert checkpoint.latest_step(workdir) == 3
  assert restore_intact(workdir, t)[0] == 3


def test_a_save_lost_to_a_removal_leaves_no_unawaited_write_warnings(steps_run, tmp_path, monkeypatch):
  """A save failing because checkpoints/ went away abandons its fragment writes, and Python warns for
  each one whenever it collects it (here, before the failure even reaches us). The user gets the one
  removal warning instead."""
  _, c, _, _, init = steps_run

  def async_serialize_from_host():  # orbax's writer, as the warning names it
    async def write_fragment():
      pass
    return write_fragment()

  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ck = checkpoint.Checkpointer(str(tmp_path / "run"))
    finish, failures = ck.manager.wait_until_finished, [FileNotFoundError(
        2, "No such file or directory", str(tmp_path / "run" / "checkpoints" / "1"))]

    def lost_save():
      finish()  # the real save ends first; only its report is of a loss, and only once
      if failures:
        async_serialize_from_host()  # dropped unawaited, as a failed save's writes are
        raise failures.pop()

    ck.save(1, init.to_dict(), c.to_dict())
    monkeypatch.setattr(ck.manager, "wait_until_finished", lost_save)
    ck.save(2, init.replace(step=jnp.int32(2)).to_dict(), c.to_dict())  # settles step 1: its save "failed"
    gc.collect()
    monkeypatch.undo()
    ck.close()
  assert not failures
  assert not [w for w in seen if "never awaited" in str(w.message)], [str(w.message) for w in seen]
  assert checkpoint.latest_step(str(tmp_path / "run")) == 2


def test_removal_racing_the_start_of_a_save_and_the_reread(steps_run, tmp_path, caplog, monkeypatch):
  """`rm -rf checkpoints` still under way while a save starts: orbax's first writes fail (a bare file
  name, from its own rmtree of an old step), and rereading the steps meets a step that vanishes."""
  _, c, t, _, init = steps_run
  workdir = str(tmp_path / "run")
  ck = checkpoint.Checkpointer(workdir)
  ck.save(1, init.to_dict(), c.to_dict())
  ck.wait()
  save, reload = ck.manager.save, ck.manager.reload
  calls = {"save": 0, "reload": 0}

  def racing_save(*args, **kwargs):
    calls["save"] += 1
    if calls["save"] == 1:
      shutil.rmtree(os.path.join(workdir, "checkpoints"))
      raise FileNotFoundError(2, "No such file or directory", "dda1f23579b4baaf224f40c2d013beec")
    return save(*args, **kwargs)

  def racing_reload():
    calls["reload"] += 1
    if calls["reload"] == 1:
      raise FileNotFoundError(2, "No such file or directory", os.path.join(workdir, "checkpoints", "1"))
    return reload()

  monkeypatch.setattr(ck.manager, "save", racing_save)
  monkeypatch.setattr(ck.manager, "reload", racing_reload)
  with caplog.at_level(logging.WARNING):
    ck.save(2, init.replace(step=jnp.int32(2)).to_dict(), c.to_dict())
  ck.close()
  assert calls == {"save": 2, "reload": 2}
  removed = [r.getMessage() for r in caplog.records if "was removed during the run" in r.getMessage()]
  assert len(removed) == 1 and "starting the save of step 2 failed" in removed[0], removed
  assert checkpoint.latest_step(workdir) == 2
  assert restore_intact(workdir, t)[0] == 2


def test_a_save_failing_for_another_cause_is_not_retried(steps_run, tmp_path, monkeypatch):
  _, c, _, _, init = steps_run
  ck = checkpoint.Checkpointer(str(tmp_path / "run"))
  calls = []

  def full_disk(*args, **kwargs):
    calls.append(1)
    raise OSError(28, "No space left on device", ck.directory)

  monkeypatch.setattr(ck.manager, "save", full_disk)
  with pytest.raises(OSError, match="No space left"):
    ck.save(1, init.to_dict(), c.to_dict())
  assert len(calls) == 1
  ck.close()


def test_damaged_metrics_lines_are_moved_aside(tmp_path, caplog):
  path = str(tmp_path / "metrics.jsonl")
  good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
  with open(path, "wb") as f:  # step 4's record cut short by kill -9
    f.write(("\n".join(good) + "\n").encode() + b'{"step": 4, "lo')
  with caplog.at_level(logging.WARNING):
    train._truncate_jsonl(path, 2)
  with open(path) as f:
    assert f.read().splitlines() == good[:2]
  assert open(path + ".damaged-1", "rb").read() == b'{"step": 4, "lo\n'
  msg = [r.getMessage() for r in caplog.records if "not a JSON record" in r.getMessage()]
  assert len(msg) == 1 and "its last line is" in msg[0] and "metrics.jsonl.damaged-1" in msg[0]

  with open(path, "ab") as f:  # binary garbage, a bare number, then a good record
    f.write(b"\x00\xff\xfegarbage\n42\n" + json.dumps({"step": 2, "val_loss": 0.5}).encode() + b"\n")
  train._truncate_jsonl(path, 2)
  assert [json.loads(x)["step"] for x in open(path)] == [1, 2, 2]
  assert open(path + ".damaged-2", "rb").read() == b"\x00\xff\xfegarbage\n42\n"


LOCK_HOLDER = """
import sys, time
from moe_jax import workdir_lock
with workdir_lock.WorkdirLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_workdir_lock_one_writer_and_kill9_frees_it(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError) as e:
      with workdir_lock.WorkdirLock(workdir):
        pass
    msg = str(e.value)
    assert f"in use by process {holder.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  finally:
    holder.kill()
  with workdir_lock.WorkdirLock(workdir) as lock:  # the dead holder's lock does not block
    assert json.load(open(lock.path))["pid"] == os.getpid()
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # kept: its directory existed before


def test_workdir_lock_leaves_no_trace_of_a_failed_start(tmp_path):
  workdir = str(tmp_path / "new")
  with pytest.raises(UserError):
    with workdir_lock.WorkdirLock(workdir):
      raise UserError("bad config")
  assert not os.path.exists(workdir)
  (tmp_path / "foreign").mkdir()
  (tmp_path / "foreign" / "results.csv").write_text("precious")
  with workdir_lock.WorkdirLock(str(tmp_path / "foreign")):  # not a run's directory: check_workdir refuses it
    pass
  assert os.listdir(tmp_path / "foreign") == ["results.csv"]
