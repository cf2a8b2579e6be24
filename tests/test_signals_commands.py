"""Ctrl-C and SIGTERM in eval.py, `python -m moe_jax.convert` and `python -m moe_jax.data prepare`
(issue 23): exit 130 / 143 with one `error:` line, no traceback, no staging directory left; the
staging a kill -9 left is removed by the next run on the same output.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from moe_jax import data, interrupts

ROOT = pathlib.Path(__file__).parents[1]


def _staging(parent: pathlib.Path, kind: str) -> list[str]:
  return [n for n in os.listdir(parent) if f".{kind}-" in n]


def _stop(proc: subprocess.Popen, signum: int, when, timeout: float = 240) -> tuple[int, str]:
  """Sends signum once when() holds (polled), returns (exit status, stderr)."""
  deadline = time.monotonic() + timeout
  while not when():
    assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()}"
    assert time.monotonic() < deadline, "condition never held"
    time.sleep(0.01)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=60)
  return proc.returncode, err


def test_eval_ctrl_c_in_its_first_second(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("hello " * 50)
  proc = subprocess.Popen([sys.executable, "eval.py", "--preset=tiny", f"--tasks=lm:{text}", "--no_progress"],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  start = time.monotonic()
  code, err = _stop(proc, signal.SIGINT, lambda: time.monotonic() - start > 0.5)
  assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
  assert time.monotonic() - start < 30


def _many_documents(directory: pathlib.Path, n: int = 400) -> list[str]:
  directory.mkdir()
  paths = []
  for i in range(n):  # enough tokenizing that the signal lands while the staging directory exists
    p = directory / f"doc{i}.txt"
    p.write_text(f"document {i} " * 4000)
    paths.append(str(p))
  return paths


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_data_prepare_signal_removes_its_staging(tmp_path, signum, code, word):
  inputs = _many_documents(tmp_path / "docs")
  out = tmp_path / "tokens"
  proc = subprocess.Popen([sys.executable, "-m", "moe_jax.data", "prepare", "--out", str(out), "--input", *inputs],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  code_, err = _stop(proc, signum, lambda: bool(_staging(tmp_path, "prepare")))
  assert code_ == code and err.strip().splitlines()[-1] == f"error: {word}; the output was not written", err
  assert "Traceback" not in err
  assert not out.exists() and _staging(tmp_path, "prepare") == []


def test_staging_left_by_kill_9_is_removed_by_the_next_run(tmp_path):
  doc = tmp_path / "a.txt"
  doc.write_text("hello world " * 100)
  out = tmp_path / "tokens"
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = socket.gethostname()
  try:
    stale = tmp_path / f".tokens.prepare-{host}.pid{dead.pid}-abc"  # what a kill -9 leaves
    live = tmp_path / f".tokens.prepare-{host}.pid{sleeper.pid}-def"  # another prepare still running
    other = tmp_path / f".other.prepare-{host}.pid{dead.pid}-ghi"  # another output's: not ours to judge
    for d in (stale, live, other):
      d.mkdir()
      (d / "train.bin").write_bytes(b"x" * 100)
    data.prepare([str(doc)], "byte", str(out), val_fraction=0)
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(os.listdir(out)) == sorted(data.PREPARED_FILES)
  finally:
    sleeper.kill()
    sleeper.wait()


def test_run_command_exits_143_and_removes_staging(tmp_path):
  """convert's path (interrupts.run_command + make_staging), with a step that blocks in C."""
  script = f"""
import os, signal, threading, time
from moe_jax import interrupts
def work():
  path = interrupts.make_staging({str(tmp_path / 'hf_out')!r}, "convert")
  open(os.path.join(path, "model.safetensors"), "wb").write(b"x" * 1000)
  threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
  time.sleep(30)  # a long write
interrupts.run_command(work)
"""
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 143 and r.stderr.strip().splitlines()[-1] == "error: terminated; the output was not written"
  assert "Traceback" not in r.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_convert_sigint_while_loading(tmp_path, inherited):
  """Ctrl-C in `convert --hf` (issue 23: tracebacks after 'error: interrupted'), also when the parent
  started it with SIGINT ignored (a test runner's worker did: the Ctrl-C during the imports was lost)."""
  import numpy as np
  from safetensors.numpy import save_file
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "deepseek_v3"}')  # the full-size default: a long load
  save_file({"model.embed_tokens.weight": np.ones((4, 4), np.float32)}, str(hf / "model.safetensors"))
  argv = [sys.executable, "-m", "moe_jax.convert", "--hf", str(hf), "--out", str(tmp_path / "o")]
  if inherited == "ignored":  # exec keeps an ignored signal ignored
    argv = [sys.executable, "-c", f"import os, signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            f"os.execv({sys.executable!r}, {argv!r})"]
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  start = time.monotonic()
  code, err = _stop(proc, signal.SIGINT, lambda: time.monotonic() - start > 1.0)
  assert code == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), err
  assert "Traceback" not in err and sorted(os.listdir(tmp_path)) == ["hf"]
  assert interrupts.COMMAND_EXIT_CODES == {signal.SIGINT: 130, signal.SIGTERM: 143}
