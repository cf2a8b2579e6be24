"""A user's mistake in any command is one `error:` line, exit status 2, no traceback, nothing written.

In-process through each command's main(argv) where it allows (plan, convert, eval, data), and
a few true subprocesses: train.py (absl), a read-only file system (a bind mount in a user
namespace, where `unshare` allows it), and `python -m moe_jax.plan`.
"""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moe_jax import convert, errors, plan

ROOT = pathlib.Path(__file__).parents[1]


def one_error(err: str) -> str:
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1, err[-3000:]
  return lines[-1]


PLAN_CASES = [  # issue 14: plan exited 1 with a traceback, or without the `error:` prefix
    (["--config=configs/nope.py"], "no such file 'configs/nope.py'"),
    (["--config=configs/tiny.py:zzz"], "unknown variant 'zzz'"),
    (["--config=README.md"], "is not a Python file"),
    (["--preset=tiny", "--mesh=1,x,1,1"], "give 4 integers data,fsdp,expert,tensor"),
    (["--preset=tiny", "--mesh=1,2"], "give 4 integers"),
    (["--preset=tiny", "--dcn=0,1,1,1"], "--dcn='0,1,1,1'"),
    (["--preset=tiny", "--mesh=-1,1,1,1"], "--mesh has a -1: also give --devices"),
    (["--preset=tiny", "--rules=[["], "--rules='[[': not JSON"),
    (["--preset=tiny", '--rules={"a": 1}'], "give a JSON list of [logical_axis, mesh_axis or null] pairs"),
    (["--preset=tiny", '--rules=[["nope", "fsdp"]]'], "unknown logical name 'nope'"),
    (["--preset=tiny", "--mesh=1,1,3,1"], "not divisible by the expert-parallel size 3"),
    (["--preset=tiny", "--batch=-3"], "--batch=-3: must be positive"),
    (["--preset=tiny", "--batch=x"], "argument --batch: invalid int value: 'x'"),
    (["--preset=tiny", "--dtype=float7"], "'float7' is not a dtype name"),
    (["--preset=nope"], "invalid choice: 'nope'"),
    (["--preset=tiny", "--remat_policy=most"], "argument --remat_policy: invalid choice: 'most'"),
    (["--preset=tiny", "--frob"], "unrecognized arguments: --frob"),
    ([], "one of the arguments --config --preset is required"),
]


@pytest.mark.parametrize("argv,message", PLAN_CASES, ids=[" ".join(a) or "none" for a, _ in PLAN_CASES])
def test_plan_bad_flags(argv, message, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert plan.main(argv) == 2
  captured = capsys.readouterr()
  assert message in one_error(captured.err) and not captured.out


def _tiny_hf_dir(path: pathlib.Path) -> pathlib.Path:
  """config.json + a model.safetensors holding one tensor: enough for the file checks, which run
  before any tensor is matched to the model."""
  from safetensors.numpy import save_file
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 1}))
  save_file({"model.embed_tokens.weight": np.ones((64, 32), np.float32)}, str(path / "model.safetensors"))
  return path


def test_convert_bad_input(tmp_path, capsys):
  good = _tiny_hf_dir(tmp_path / "hf")
  (tmp_path / "afile").write_text("x")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  cases = [
      ([], "give either --hf DIR --out CKPT_DIR or --from_ckpt CKPT_DIR --to_hf DIR"),
      (["--hf", str(good)], "give either"),
      (["--hf", str(good), "--out", str(tmp_path / "o"), "--no_mtp"], "--no_mtp go with --from_ckpt/--to_hf"),
      (["--hf", str(good), "--out", str(tmp_path / "o"), "--dtype=int8"], "--dtype=int8: give float32"),
      (["--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist or is not a directory"),
      (["--hf", str(good), "--out", str(tmp_path / "afile")], "is a file, not a directory"),
      (["--hf", str(good), "--out", str(tmp_path / "full")], "exists and is not empty"),
      (["--from_ckpt", str(tmp_path / "nope"), "--to_hf", str(tmp_path / "o")], "no such directory"),
      (["--from_ckpt", str(tmp_path / "full"), "--to_hf", str(tmp_path / "o")],
       "neither a moe_jax.convert checkpoint (model_config.json) nor a train.py run"),
  ]
  for argv, message in cases:
    assert convert.main(argv) == 2, argv
    assert message in one_error(capsys.readouterr().err), argv

  # Damaged Hugging Face files are named (issue 14: a JSONDecodeError / reshape traceback).
  bad = tmp_path / "bad"
  shutil.copytree(good, bad)
  (bad / "config.json").write_text('{"model_type": "deepseek_v3",')
  assert convert.main(["--hf", str(bad), "--out", str(tmp_path / "o")]) == 2
  assert f"{bad / 'config.json'}: not valid JSON" in one_error(capsys.readouterr().err)
  shutil.copy(good / "config.json", bad / "config.json")
  blob = (good / "model.safetensors").read_bytes()
  (bad / "model.safetensors").write_bytes(blob[:-100])
  assert convert.main(["--hf", str(bad), "--out", str(tmp_path / "o")]) == 2
  assert f"{bad / 'model.safetensors'}: not a complete safetensors file" in one_error(capsys.readouterr().err)
  (bad / "model.safetensors").write_bytes(blob[:20])
  assert convert.main(["--hf", str(bad), "--out", str(tmp_path / "o")]) == 2
  assert "not a complete safetensors file" in one_error(capsys.readouterr().err)
  (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2.safetensors"}}))
  assert convert.main(["--hf", str(bad), "--out", str(tmp_path / "o")]) == 2
  assert "model-2.safetensors: missing, but model.safetensors.index.json lists it" in one_error(capsys.readouterr().err)
  assert not (tmp_path / "o").exists() and (tmp_path / "full").is_dir() and (tmp_path / "afile").read_text() == "x"


def test_eval_checks_paths_and_flags_before_loading(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  (tmp_path / "v.txt").write_text("hello")
  (tmp_path / "afile").write_text("x")
  task = f"--tasks=lm:{tmp_path / 'v.txt'}"
  cases = [
      ([f"--output={tmp_path}"], "is a directory; give a file path"),
      ([f"--output={tmp_path / 'afile' / 'r.json'}"], "afile is a file, not a directory"),
      (["--batch_size=0"], "--batch_size=0: must be > 0"),
      (["--max_len=-1"], "--max_len=-1: must be > 0"),  # scored 0.0 bits/byte before
      (["--top_p=0"], "--top_p=0.0: must be in (0, 1]"),
      (["--mesh=1,1"], "--mesh=1,1: expected four integers"),
      (["--stop=\\x"], "--stop: truncated \\xXX escape"),
      (["--dtype=float7"], "'float7' is not a dtype name"),
      (["--weights=int4"], "--weights='int4' is not one of auto, fp8, dense"),
      (["--weights=fp8"], "--weights=fp8 applies to --hf only"),
  ]
  for argv, message in cases:
    try:
      code = cli.main(["--preset=tiny", task, "--no_progress", *argv])
    except SystemExit as e:  # argparse-level checks exit from parse_args
      code = e.code
    assert code == 2, argv
    assert message in one_error(capsys.readouterr().err), argv


def test_output_dir_checks(tmp_path):
  (tmp_path / "f").write_text("x")
  assert errors.output_dir(str(tmp_path / "new" / "deeper"), "--out") == str(tmp_path / "new" / "deeper")
  assert not (tmp_path / "new").exists()  # checked, not created
  with pytest.raises(errors.UserError, match="is a file, not a directory"):
    errors.output_dir(str(tmp_path / "f"), "--out")
  with pytest.raises(errors.UserError, match="f is a file, so the directory cannot be created"):
    errors.output_dir(str(tmp_path / "f" / "sub"), "--out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the write probe leaves nothing


@pytest.mark.slow
def test_commands_in_subprocesses(tmp_path):
  """train.py (absl) and `python -m` entry points: one line and status 2 before any work starts."""
  (tmp_path / "afile").write_text("x")
  env_cmds = {
      "config": ([sys.executable, "train.py", "--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
      "workdir": ([sys.executable, "train.py", f"--workdir={tmp_path / 'afile'}"], "is a file, not a directory"),
      "plan": ([sys.executable, "-m", "moe_jax.plan", "--preset=tiny", "--mesh=1,x,1,1"], "give 4 integers"),
      "data": ([sys.executable, "-m", "moe_jax.data", "prepare", "--input", "README.md", "--tokenizer", "README.md",
                "--out", str(tmp_path / "o")], "README.md: not a Hugging Face tokenizer.json"),
  }
  procs = {k: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k, (cmd, _) in env_cmds.items()}
  for k, p in procs.items():
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, (k, err[-3000:])
    assert env_cmds[k][1] in one_error(err), k
  assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_read_only_file_system(tmp_path):
  """--workdir / --out on a read-only mount: refused before training or tokenizing starts."""
  if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
    pytest.skip("no user namespaces here (unshare -rm) to mount a read-only directory")
  ro = tmp_path / "ro"
  ro.mkdir()
  (tmp_path / "a.txt").write_text("some text")
  script = (f"mount --bind -o ro {ro} {ro} && cd {ROOT} && "
            f"{{ {sys.executable} train.py --workdir={ro}/run; echo rc=$?; "
            f"{sys.executable} -m moe_jax.data prepare --input {tmp_path / 'a.txt'} --out {ro}/tok; echo rc=$?; }}")
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
  assert proc.stdout.split() == ["rc=2", "rc=2"], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert lines == [f"error: --workdir: cannot write into {ro} (Read-only file system); pick a writable location",
                   f"error: --out: cannot write into {ro} (Read-only file system); pick a writable location"]
  assert not list(ro.iterdir())


def test_damaged_workdir_config_is_named(tmp_path):
  from moe_jax import checkpoint
  (tmp_path / "config.json").write_text('{"steps": 8,')  # a write cut short
  with pytest.raises(errors.UserError, match=r"config.json: not valid JSON .* pick another --workdir"):
    checkpoint.check_workdir(str(tmp_path), {"steps": 8}, {})
