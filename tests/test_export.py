"""Export of a trained run: train.py (with a tokenizer.json) -> `python -m moe_jax.convert
--from_ckpt WORKDIR --to_hf OUT` -> transformers and `eval.py --hf=OUT` see the same model and
tokenizer as `eval.py --workdir=WORKDIR`.

One test runs the whole chain (an 8-step train.py subprocess on tiny, ~20 s of CPU, then the
conversion, transformers' forward pass and four evaluations), so pytest-xdist never trains twice.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from moe_jax import convert, data

ROOT = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def chain_text(rng, lines: int) -> str:
  """Lines of three 6-letter words; each letter c is followed by (5c + 7) mod 26."""
  def word(c):
    out = []
    for _ in range(6):
      out.append(chr(97 + c))
      c = (5 * c + 7) % 26
    return "".join(out)
  return "".join(" ".join(word(int(rng.integers(26))) for _ in range(3)) + "\n" for _ in range(lines))


def make_tokenizer(text: str, path: pathlib.Path):
  """A small BPE (vocab 120 <= the tiny model's 264) with a lossless Metaspace decoder and </s>."""
  tokenizers = pytest.importorskip("tokenizers")
  tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tk.decoder = tokenizers.decoders.Metaspace()
  tk.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
  tk.save(str(path))


def eval_main(argv, capsys):
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  code = cli.main(argv)
  out = capsys.readouterr()
  assert code == 0, out.err[-3000:]


def scores(path) -> dict:
  return {(r["task"], r["metric"]): r["value"] for r in json.loads(pathlib.Path(path).read_text())["results"]}


def test_train_run_exports_to_transformers_and_eval(tmp_path, capsys):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  (tmp_path / "train.txt").write_text(chain_text(rng, 400))
  (tmp_path / "val.txt").write_text(chain_text(rng, 20))
  tok_path = tmp_path / "tok.json"
  make_tokenizer((tmp_path / "train.txt").read_text(), tok_path)
  assert data.main(["prepare", "--input", str(tmp_path / "train.txt"), "--tokenizer", str(tok_path),
                    "--out", str(tmp_path / "data"), "--val_fraction", "0.05"]) == 0
  workdir = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py:test", f"--workdir={workdir}",
                         f"--config.data.path={tmp_path / 'data'}", f"--config.data.tokenizer={tok_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # The real command, under umask 022: every file it writes is 0644, the directory 0755.
  out = tmp_path / "hf"
  proc = subprocess.run([sys.executable, "-m", "moe_jax.convert", "--from_ckpt", str(workdir), "--to_hf", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        preexec_fn=lambda: os.umask(0o022))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  assert stat.S_IMODE(out.stat().st_mode) == 0o755
  assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == dict.fromkeys(os.listdir(out), 0o644)
  assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
  assert not [p for p in os.listdir(tmp_path) if ".convert-" in p]  # the staging directory is gone

  # transformers: the same tokenizer (ids, EOS) and the same logits as our restored model.
  from moe_jax import checkpoint
  _, model, variables, step = checkpoint.restore_for_eval(str(workdir))
  assert step == 8
  ours = data.load_tokenizer(str(tok_path))
  text = (tmp_path / "val.txt").read_text()
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = ours.encode(text)[:48]
  assert hf_tok(text)["input_ids"][:48] == ids and hf_tok.eos_token_id == ours.eos_id == 1
  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
  assert hf_model.config.eos_token_id == ours.eos_id
  layers = model.cfg.num_hidden_layers  # the MTP layer is saved as layer L; transformers skips it
  assert not info["missing_keys"] and info["unexpected_keys"]
  assert all(k.startswith(f"model.layers.{layers}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
  with torch.no_grad():
    theirs = hf_model(torch.tensor([ids])).logits.numpy()
  logits = np.asarray(model.apply(variables, np.asarray([ids], np.int32)))
  np.testing.assert_allclose(logits, theirs, atol=1e-4, rtol=1e-4)

  # eval.py: --hf=OUT picks OUT/tokenizer.json and scores what --workdir scores (text and a
  # prepared directory, whose meta names the original tokenizer.json: same bytes, accepted).
  tasks = f"--tasks=lm:{tmp_path / 'val.txt'},lm:{tmp_path / 'data'}"
  eval_main([f"--workdir={workdir}", tasks, f"--output={tmp_path / 'w.json'}", "--no_progress"], capsys)
  # the run is scored at its seq_len (32, tiny:test) by default; the export at the same window
  eval_main([f"--hf={out}", tasks, f"--output={tmp_path / 'h.json'}", "--no_progress", "--max_len=32"], capsys)
  assert json.loads((tmp_path / "w.json").read_text())["max_len_from"] == "the run's seq_len"
  w, h = scores(tmp_path / "w.json"), scores(tmp_path / "h.json")
  assert w.keys() == h.keys() and ("lm:val.txt", "bits_per_byte") in w
  for key in w:
    assert h[key] == pytest.approx(w[key], rel=1e-5), key
  assert 0.5 < w[("lm:val.txt", "bits_per_byte")] < 8  # scored with the BPE, not bytes

  # A step directory converts too; --no_mtp leaves nothing for transformers to report.
  step_dir = workdir / "checkpoints" / "8"
  assert convert.main(["--from_ckpt", str(step_dir), "--to_hf", str(tmp_path / "hf2"), "--no_mtp"]) == 0
  _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32,
                                                              output_loading_info=True)
  assert not info["unexpected_keys"] and not info["missing_keys"]

  # The run's tokenizer path no longer resolves: one line naming the fix, nothing written.
  moved = tmp_path / "elsewhere.json"
  shutil.move(tok_path, moved)
  capsys.readouterr()
  assert convert.main(["--from_ckpt", str(workdir), "--to_hf", str(tmp_path / "hf3")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: the run's tokenizer") and "pass --tokenizer=PATH" in err and err.count("\n") == 1
  assert not (tmp_path / "hf3").exists()
  assert convert.main(["--from_ckpt", str(workdir), "--to_hf", str(tmp_path / "hf3"), "--tokenizer", str(moved)]) == 0
  assert (tmp_path / "hf3" / "tokenizer.json").read_bytes() == moved.read_bytes()
  # Never over a non-empty directory.
  assert convert.main(["--from_ckpt", str(workdir), "--to_hf", str(tmp_path / "hf3"), "--tokenizer", str(moved)]) == 2
  assert "exists and is not empty" in capsys.readouterr().err
