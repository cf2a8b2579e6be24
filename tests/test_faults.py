"""Issue 23 (validation, resources, eval context): nonsense settings, stray arguments, binary
corpora, an unreachable coordinator and resources that ran out are one `error:` line each.

In-process where the path allows it; two short subprocesses (train.py's driver) where the
behaviour is the command's exit.
"""

import errno
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import checkpoint, convert, data, errors, optim, sharding
from moe_jax import train as train_lib
from moe_jax.errors import UserError

ROOT = pathlib.Path(__file__).parents[1]


def _tiny_config(**changes):
  spec = importlib.util.spec_from_file_location("tiny_cfg", ROOT / "configs" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("test")
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# --- 3. validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("changes,message", [
    ({"optim.clip": -1.0}, r"optim.clip=-1.0 must be > 0 .* or 0 \(no clipping\)"),
    ({"optim.warmup": -10}, r"optim.warmup=-10 must be >= 0"),
    ({"eval_every": 2, "eval_batches": 0}, r"eval_batches=0 must be >= 1 when eval_every=2"),
])
def test_nonsense_training_settings_are_refused_before_compiling(changes, message):
  with pytest.raises(UserError, match=message):
    train_lib.Trainer(_tiny_config(**changes))


def test_clip_zero_is_off_and_eval_batches_zero_is_fine_without_evaluation():
  train_lib.Trainer(_tiny_config(**{"eval_every": 0, "eval_batches": 0, "batch_size": 8}))  # evaluation off
  cfg = _tiny_config(**{"optim.clip": 0.0, "optim.warmup": 0}).optim
  params = {"w": jnp.ones((2, 2))}
  grads = {"w": jnp.full((2, 2), 100.0)}
  updates, _ = optim.make_optimizer(cfg, 10).update(grads, optim.make_optimizer(cfg, 10).init(params), params)
  assert float(jnp.abs(updates["w"]).min()) > 0  # optax's clip with a bound of 0 would zero every update
  clipped = optim.make_optimizer(_tiny_config().optim, 10)
  assert jax.tree.structure(clipped.init(params)) == jax.tree.structure(optim.make_optimizer(cfg, 10).init(params))


def test_stray_positional_arguments_are_errors(tmp_path, capsys):
  assert convert.main(["stray", "--hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "unrecognized arguments: stray" in capsys.readouterr().err
  assert data.main(["prepare", "stray", "--input", __file__, "--out", str(tmp_path / "d")]) == 2
  assert "unrecognized arguments: stray" in capsys.readouterr().err
  r = subprocess.run([sys.executable, "train.py", "stray", f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
      "error: unexpected argument(s) 'stray': flags are --name=value (see --help)"), r.stderr
  assert not (tmp_path / "w").exists()


def test_binary_corpus_is_refused_naming_the_file(tmp_path):
  blob = tmp_path / "random.bin"
  blob.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
  with pytest.raises(UserError, match=r"--input '.*random.bin': \d+% of it is not UTF-8 text"):
    data.prepare([str(blob)], "byte", str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["random.bin"]  # no staging left
  latin1 = tmp_path / "latin1.txt"  # a few undecodable bytes: still text
  latin1.write_bytes(("caf\xe9 na\xefve r\xe9sum\xe9 " * 200).encode("latin-1"))
  assert data.prepare([str(latin1)], "byte", str(tmp_path / "ok"), val_fraction=0)["n_tokens"]["train"] > 0


def test_unreachable_coordinator_fails_in_bounded_time(monkeypatch):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  start = time.monotonic()
  with pytest.raises(ValueError, match=rf"coordinator 127.0.0.1:{port} unreachable for 1 s .*"
                                       "MOE_JAX_COORDINATOR_TIMEOUT"):
    sharding.wait_for_coordinator(f"127.0.0.1:{port}", 1)
  assert time.monotonic() - start < 5
  monkeypatch.setenv(sharding.COORDINATOR_TIMEOUT_ENV, "7")
  assert sharding.coordinator_timeout() == 7
  monkeypatch.setenv(sharding.COORDINATOR_TIMEOUT_ENV, "soon")
  with pytest.raises(ValueError, match="not a whole number"):
    sharding.coordinator_timeout()
  with pytest.raises(ValueError, match="not HOST:PORT"):
    sharding.wait_for_coordinator("nohost", 1)


# --- 4. resources ----------------------------------------------------------------------------
def test_resource_errors_are_one_line_with_what_to_change():
  try:  # a real XLA refusal: 16 TiB in one buffer, refused before anything is touched
    jnp.ones((2**42,), jnp.float32).block_until_ready()
  except Exception as e:  # noqa: BLE001
    oom = e
  msg = errors.resource_error(oom, errors.TRAIN_MEMORY_HINT)
  assert msg.startswith("out of device memory (XLA RESOURCE_EXHAUSTED") and "batch_size or seq_len" in msg
  assert "grad_accum" in msg and "remat_policy" in msg and "mesh" in msg and "\n" not in msg
  assert errors.resource_error(MemoryError(), "HINT") == "out of host memory (MemoryError): HINT"
  full = OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/8/x")
  assert errors.resource_error(full) == ("disk full (/w/checkpoints/8/x: No space left on device): free space "
                                         "there, or write to another disk")
  wrapped = ValueError("Error writing local file \"/w/d/ocdbt.process_0/d/abc\": [OS error 28: No space left on device]")
  assert errors.resource_error(wrapped).startswith("disk full (Error writing local file")
  denied = PermissionError(errno.EACCES, "Permission denied", "/w/metrics.jsonl")
  assert errors.resource_error(denied).startswith("permission denied (/w/metrics.jsonl: Permission denied)")
  assert errors.resource_error(ValueError("a bug")) is None


def test_main_guard_turns_resources_into_one_line(capsys):
  @errors.main_guard
  def main():
    raise OSError(errno.ENOSPC, "No space left on device")  # no file name: used to be a traceback
  assert main() == 2
  assert capsys.readouterr().err == ("error: disk full ([Errno 28] No space left on device): free space there, or "
                                     "write to another disk\n")


OOM_DRIVER = """
import runpy, sys
import jax.numpy as jnp
from moe_jax import train
def step_fn_for(self, b):  # the step's compile/first run, refused by XLA as a too large batch would be
  jnp.ones((2**42,), jnp.float32).block_until_ready()
train.Trainer.step_fn_for = step_fn_for
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_out_of_memory_in_train_is_one_line_and_does_not_claim_the_workdir(tmp_path):
  workdir = tmp_path / "w"
  r = subprocess.run([sys.executable, "-c", OOM_DRIVER, "--config=configs/tiny.py:test", f"--workdir={workdir}",
                      "--config.batch_size=8"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert last.startswith("error: out of device memory (XLA RESOURCE_EXHAUSTED") and "batch_size" in last
  assert last.endswith(f"no checkpoint was written and {workdir} is not claimed: rerun with the change")
  # the corrected command would be accepted: no config.json, nothing foreign, no checkpoint
  assert not (workdir / "config.json").exists() and checkpoint.foreign_entries(str(workdir)) == []
  assert checkpoint.latest_step(str(workdir)) is None


# --- 5. eval context -------------------------------------------------------------------------
def test_eval_scores_a_run_at_its_seq_len_and_says_so(tmp_path, monkeypatch, capsys):
  from moe_jax import evaluate
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  eval_cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(eval_cli)
  real_load = evaluate.load_model

  def load_run(**kw):  # a train.py run trained at seq_len 32 (the random tiny preset stands in for it)
    model, variables, info = real_load(preset="tiny", vocab_size=kw["vocab_size"] or 264, seed=0)
    return model, variables, {**info, "seq_len": 32}
  monkeypatch.setattr(evaluate, "load_model", load_run)
  text = tmp_path / "t.txt"
  text.write_text("hello world " * 20)
  out = tmp_path / "r.json"
  assert eval_cli.main([f"--workdir={tmp_path}", f"--tasks=lm:{text}", f"--output={out}", "--no_progress"]) == 0
  report = json.loads(out.read_text())
  assert (report["max_len"], report["max_len_from"]) == (32, "the run's seq_len")
  assert report["weights"] == "float32"  # the parameters' dtype (an FP8 --hf load says fp8)
  assert "context: 32 tokens (the run's seq_len)" in capsys.readouterr().out


def test_shipped_sample_tasks_are_valid():
  """examples/tasks (README's eval example): one file per task kind, each accepted as it is."""
  from moe_jax import evaluate
  tasks = ROOT / "examples" / "tasks"
  spec = f"lm:{tasks / 'lm.txt'},mc:{tasks / 'mc.jsonl'},gen:{tasks / 'gen.jsonl'}"
  evaluate.check_tasks(spec, ("\n",))
  assert [k for k, _ in evaluate.parse_tasks(spec)] == ["lm", "mc", "gen"]
  assert len((tasks / "mc.jsonl").read_text().splitlines()) >= 8 and (tasks / "lm.txt").stat().st_size > 500
