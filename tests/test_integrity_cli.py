"""Integrity end to end, as clusters fail: train.py, eval.py and convert as subprocesses (in
test_train_cli.py's style, marked slow) on corrupted bytes in a checkpoint, max_to_keep below one,
a second writer, kill -9 with a torn metrics line, and checkpoints/ removed mid-run. The in-process
versions and the corruption helpers are in test_integrity.py.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from moe_jax import checkpoint
from test_integrity import ROOT, damage_what_eval_reads
from test_train_cli import command, env, error_line, losses, no_traceback, run, wait_for  # noqa: F401

SLOW = 900  # seconds per subprocess: generous, for a loaded shared machine


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """test_train_cli's 8-step reference run (checkpoints 4, 6, 8)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  p = run(env, workdir, timeout=SLOW)
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, losses(workdir)


def _cli(env, *args, timeout=SLOW):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_corrupted_checkpoint_end_to_end(env, reference, tmp_path):
  """Bytes changed in step 8's largest data file: eval scores step 6 and says so; convert falls back
  (or refuses the step named); resume with nan_policy=skip falls back to step 6 instead of
  training on garbage, and no good checkpoint is rotated out."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  damage_what_eval_reads(workdir, 8)
  (tmp_path / "val.txt").write_text("def f(x):\n  return x + 1\n" * 8)
  ev = _cli(env, "eval.py", f"--workdir={workdir}", f"--tasks=lm:{tmp_path / 'val.txt'}", "--no_progress")
  assert ev.returncode == 0, ev.stderr[-3000:]
  no_traceback(ev.stderr)
  # The data files are zstd-compressed: a changed byte decodes to other values (checksum mismatch,
  # the silent case) or, in some places, fails to decode (a read error); both are damage.
  assert "checkpoint step 8 " in ev.stderr and "is damaged (" in ev.stderr and "using step 6" in ev.stderr
  assert "step: 6" in ev.stdout

  cv = _cli(env, "-m", "moe_jax.convert", f"--from_ckpt={workdir}", f"--to_hf={tmp_path / 'hf'}")
  assert cv.returncode == 0 and "restored step 6 of" in cv.stderr, cv.stderr[-3000:]
  cv = _cli(env, "-m", "moe_jax.convert", f"--from_ckpt={workdir}/checkpoints/8", f"--to_hf={tmp_path / 'hf8'}")
  assert cv.returncode == 2 and "checkpoints/8 is damaged (" in error_line(cv)
  assert not (tmp_path / "hf8").exists()

  p = run(env, workdir, "--config.steps=10", "--config.nan_policy=skip", timeout=SLOW)
  assert p.returncode == 0, p.stderr[-3000:]
  no_traceback(p.stderr)
  warnings = [line for line in p.stderr.splitlines() if "is damaged" in line]
  assert len(warnings) == 1 and "checkpoint step 8 " in warnings[0]
  assert "using step 6 instead" in warnings[0] and "update skipped" not in p.stderr
  new = losses(workdir)
  assert [new[s] for s in range(1, 8)] == [reference[1][s] for s in range(1, 8)]
  assert all(np.isfinite(new[s]) for s in (9, 10))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "6", "8", "8.damaged"]


@pytest.mark.slow
def test_max_to_keep_below_one_deletes_nothing(env, reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  procs = [subprocess.Popen(command(workdir, "--config.steps=12", f"--config.checkpoint.max_to_keep={v}"), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in (0, -1)]
  for v, p in zip((0, -1), procs):
    p.stdout, p.stderr = p.communicate(timeout=SLOW)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"checkpoint.max_to_keep={v} must be >= 1" in error_line(p)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "8"]
  assert losses(workdir) == reference[1]


# A run that outlasts the test (which stops it): at 400 steps a quiet machine finished the run before
# the test's next look, so a removal mid-run was never seen by a save.
LIVE_RUN = "--config.steps=100000"


@pytest.mark.slow
def test_second_writer_refused_kill9_frees_the_workdir_and_a_torn_metrics_line_is_repaired(env, tmp_path):
  workdir = str(tmp_path / "run")
  first = subprocess.Popen(command(workdir, LIVE_RUN), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: checkpoint.latest_step(workdir) is not None
             and os.path.exists(os.path.join(workdir, "metrics.jsonl")), first, timeout=SLOW)
    started = time.time()
    second = run(env, workdir, LIVE_RUN, timeout=SLOW)
    assert second.returncode == 2 and time.time() - started < 120  # at once: no compile, no data
    line = error_line(second)
    assert f"is in use by process {first.pid} on host {socket.gethostname()}" in line
    first.kill()  # kill -9: its lock goes with it
    first.wait()
  finally:
    first.kill()
  step = checkpoint.latest_step(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "ab") as f:
    f.write(b'{"step": 999, "loss": 1.2')  # the torn write a kill -9 or a full disk leaves
  p = run(env, workdir, f"--config.steps={step + 2}", timeout=SLOW)
  assert p.returncode == 0, p.stderr[-3000:]
  no_traceback(p.stderr)
  assert "metrics.jsonl: its last line is not a JSON record" in p.stderr and "metrics.jsonl.damaged-1" in p.stderr
  assert sorted(losses(workdir)) == list(range(1, step + 3))
  assert open(os.path.join(workdir, "metrics.jsonl.damaged-1"), "rb").read() == b'{"step": 999, "loss": 1.2\n'


@pytest.mark.slow
def test_checkpoints_dir_removed_mid_run(env, tmp_path):
  workdir = str(tmp_path / "run")
  err_path = str(tmp_path / "stderr")
  with open(err_path, "w") as err:
    proc = subprocess.Popen(command(workdir, LIVE_RUN), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
  try:
    wait_for(lambda: checkpoint.latest_step(workdir) is not None, proc, timeout=SLOW, err_path=err_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    wait_for(lambda: "was removed during the run" in pathlib.Path(err_path).read_text()
             and checkpoint.latest_step(workdir) is not None, proc, timeout=SLOW, err_path=err_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=SLOW)
  finally:
    proc.kill()
  err = pathlib.Path(err_path).read_text()
  assert proc.returncode == 0, err[-3000:]
  assert "preempted (SIGTERM): checkpoint at step" in err
  assert max(losses(workdir)) == checkpoint.latest_step(workdir)
