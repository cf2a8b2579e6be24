"""End to end: train.py learns a synthetic task, eval.py scores it near 100% (an untrained
model near chance); a checkpoint that does not fit its config, and a prompt longer than the
context, are refused in one line.

The task is a fixed chain of letters: each letter is followed by f(c) = (5c + 7) mod 26, one
chain of 12 letters per line. Held-out examples start a line anywhere in the chain with 1..7
letters; the model must continue with the next 4 (gen) or pick them among 4 choices that
differ in one letter (mc).
Marked slow: a 100-step training subprocess (~40 s of CPU) plus two evaluations (~25 s).
"""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moe_jax import data

ROOT = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def chain(start: int, n: int) -> str:
  out, c = [], start
  for _ in range(n):
    out.append(chr(97 + c))
    c = (5 * c + 7) % 26
  return "".join(out)


def held_out(directory: pathlib.Path, n: int = 40, seed: int = 1) -> tuple[str, str]:
  rng = np.random.default_rng(seed)
  mc, gen = [], []
  for _ in range(n):
    k = int(rng.integers(1, 8))
    text = chain(int(rng.integers(26)), k + 4)
    prompt, answer = "\n" + text[:k], text[k:]  # a line start, as in training
    wrong = set()
    while len(wrong) < 3:
      w = list(answer)
      j = int(rng.integers(4))
      w[j] = chr(97 + (ord(w[j]) - 97 + int(rng.integers(1, 26))) % 26)
      wrong.add("".join(w))
    choices = sorted(wrong | {answer})
    mc.append({"context": prompt, "choices": choices, "gold": choices.index(answer)})
    gen.append({"prompt": prompt, "answer": answer})
  for name, recs in (("mc.jsonl", mc), ("gen.jsonl", gen)):
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
  return str(directory / "mc.jsonl"), str(directory / "gen.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  rng = np.random.default_rng(0)
  (root / "train.txt").write_text("".join(chain(int(rng.integers(26)), 12) + "\n" for _ in range(3000)))
  data.prepare([str(root / "train.txt")], "byte", str(root / "data"), val_fraction=0.05)
  workdir = root / "run"
  cmd = [sys.executable, str(ROOT / "train.py"), "--config=configs/tiny.py:test", f"--workdir={workdir}",
         f"--config.data.path={root / 'data'}", "--config.steps=100", "--config.batch_size=16",
         "--config.seq_len=64", "--config.checkpoint_every=100", "--config.log_every=50",
         "--config.optim.warmup=10"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  mc, gen = held_out(root)
  return root, workdir, mc, gen


def eval_main(argv, capsys):
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  code = cli.main(argv)
  return code, capsys.readouterr()


def results(path) -> dict:
  report = json.loads(pathlib.Path(path).read_text())
  return report, {(r["task"], r["metric"]): r["value"] for r in report["results"]}


def test_trained_model_scores_near_100_percent(trained, capsys):
  root, workdir, mc, gen = trained
  out = root / "trained.json"
  code, io = eval_main([f"--workdir={workdir}", f"--tasks=mc:{mc},gen:{gen}",
                        "--max_new_tokens=4", "--max_len=128", f"--output={out}", "--no_progress"], capsys)
  assert code == 0, io.err
  report, got = results(out)
  assert report["checkpoint_step"] == 100 and report["model"] == str(workdir)
  assert got[("mc:mc.jsonl", "acc")] >= 0.95
  assert got[("gen:gen.jsonl", "exact_match")] >= 0.9
  assert "mc:mc.jsonl" in io.out and "exact_match" in io.out  # the table


def test_untrained_model_scores_near_chance(trained, capsys):
  root, _, mc, gen = trained
  out = root / "untrained.json"
  code, io = eval_main(["--preset=tiny", f"--tasks=mc:{mc}", "--max_len=128", f"--output={out}", "--no_progress"],
                       capsys)
  assert code == 0, io.err
  _, got = results(out)
  assert got[("mc:mc.jsonl", "acc")] <= 0.5  # chance: 1/4 (40 examples)


def test_checkpoint_that_does_not_fit_its_config_is_refused(trained, tmp_path, capsys):
  _, workdir, _, gen = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  saved = copy / "checkpoints" / "100" / "config" / "config.json"
  record = json.loads(saved.read_text())
  record["config"]["model"]["hidden_size"] = 48
  saved.write_text(json.dumps(record))
  code, io = eval_main([f"--checkpoint={copy / 'checkpoints' / '100'}", f"--tasks=gen:{gen}"], capsys)
  assert code == 2
  lines = io.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "embed" in lines[0], io.err
  assert os.path.isdir(copy / "checkpoints" / "100")  # untouched


def test_prompt_longer_than_the_context_is_one_line(trained, tmp_path, capsys):
  _, workdir, _, _ = trained
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"prompt": "a" * 9, "answer": "b"}) + "\n")
  code, io = eval_main([f"--workdir={workdir}", f"--tasks=gen:{long}", "--max_len=16", "--max_new_tokens=8"], capsys)
  assert code == 2
  lines = io.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "long.jsonl:1: prompt is 9 tokens" in lines[0], io.err
