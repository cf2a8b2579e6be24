"""The fault sweep's catalogue (benchmarks/fault_sweep.py runs it): each Case is one real command
of train.py / eval.py / `python -m moe_jax.convert` / `python -m moe_jax.data prepare` against a
bad flag, a bad file, a signal, a full or read-only disk, a second writer or a damaged checkpoint,
with what it must end as, what must survive it, and any check of its own; plus the file tools the
cases and the runner share (copies of the fixtures, tmpfs mounts, corruption, digests).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
from typing import Callable, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = [PY, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:test"]
EVAL = [PY, str(ROOT / "eval.py"), "--no_progress"]
CONVERT = [PY, "-m", "moe_jax.convert"]
PREPARE = [PY, "-m", "moe_jax.data", "prepare"]
TASKS = ROOT / "examples" / "tasks"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
ENV.pop("XLA_FLAGS", None)
TIMEOUT = 600


@dataclasses.dataclass
class Case:
  name: str
  kind: str
  cmd: Callable[[pathlib.Path, dict], list[str]]  # (case dir, fixtures) -> argv
  expect: str = "error"  # error | ok | 130 | 143 | 0 (a signal's status)
  setup: Optional[Callable[[pathlib.Path, dict], None]] = None
  precious: Callable[[pathlib.Path], list[pathlib.Path]] = lambda d: []  # must survive unchanged
  signal_when: Optional[tuple[int, Callable[[pathlib.Path, float], bool]]] = None  # (signum, (dir, t) -> send?)
  background: Optional[Callable[[pathlib.Path, dict], list[str]]] = None  # started first (two writers)
  check: Optional[Callable[[pathlib.Path, "Result"], str]] = None  # "" or what went wrong
  env: Optional[dict] = None
  limit_memory: bool = False
  owner: str = "faults"  # faults | integrity (checksums, lock, retention, log repair: another engineer)


@dataclasses.dataclass
class Result:
  name: str
  kind: str
  owner: str
  command: str
  exit: int
  last_line: str
  traceback: bool
  lost: str
  ok: bool
  note: str
  seconds: float
  stderr: str = ""



def copy_run(d: pathlib.Path, fx: dict, name: str = "w") -> pathlib.Path:
  shutil.copytree(fx["run"], d / name)
  return d / name


def copy_hf(d: pathlib.Path, fx: dict, name: str = "hf") -> pathlib.Path:
  shutil.copytree(fx["hf"], d / name)
  return d / name


def mount_tmpfs(path: pathlib.Path, size: str, read_only: bool = False) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  opts = f"size={size}" + (",ro" if read_only else "")
  return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def fill_tmpfs(path: pathlib.Path, leave: int = 0):
  """Fills a tmpfs but `leave` bytes."""
  st = os.statvfs(path)
  free = st.f_bavail * st.f_frsize - leave
  if free > 0:
    with open(path / "filler", "wb") as f:
      f.write(b"\0" * free)


def corrupt(path: pathlib.Path, n: int = 64):
  """n random bytes into the middle of the largest file under path (a real data file)."""
  files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  target = files[-1]
  size = target.stat().st_size
  with open(target, "r+b") as f:
    f.seek(max(0, size // 2 - n // 2))
    f.write(os.urandom(n))


def corrupt_all(path: pathlib.Path, n: int = 64):
  """n random bytes into every ocdbt data file under path. eval and convert read only the
  parameters (verified by their checksums): a damaged optimizer-state file is, rightly, not
  theirs to refuse, so their cases damage every data file to be sure the parameters are hit."""
  for f in sorted(path.rglob("ocdbt.process_*/d/*")):
    size = f.stat().st_size
    with open(f, "r+b") as fh:
      fh.seek(max(0, size // 2 - n // 2))
      fh.write(os.urandom(n))


def newest_step(w: pathlib.Path) -> Optional[pathlib.Path]:
  steps = [p for p in (w / "checkpoints").glob("*") if p.name.isdigit()] if (w / "checkpoints").is_dir() else []
  return max(steps, key=lambda p: int(p.name)) if steps else None


def ckpt_files(w: pathlib.Path) -> list[pathlib.Path]:
  step = newest_step(w)
  return [p for p in step.rglob("*") if p.is_file()] if step else []


def staging_left(d: pathlib.Path) -> list[str]:
  return [str(p.relative_to(d)) for p in d.rglob(".*") if p.is_dir() and (".convert-" in p.name
                                                                         or ".prepare-" in p.name)]


def digest(paths: list[pathlib.Path]) -> dict[str, str]:
  out = {}
  for p in paths:
    try:
      out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
      out[str(p)] = "missing"
  return out


def _many_docs(d: pathlib.Path, fx: dict):
  (d / "docs").mkdir()
  for i in range(300):
    (d / "docs" / f"{i}.txt").write_text(f"document {i} " * 4000)


def _docs(d: pathlib.Path) -> list[str]:
  return [str(p) for p in sorted((d / "docs").glob("*.txt"))]


def _stale_staging(kind: str, out_name: str):
  def setup(d: pathlib.Path, fx: dict):
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    stale = d / f".{out_name}.{kind}-{socket.gethostname()}.pid{dead.pid}-stale"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"x" * 1000)
  return setup


def _after(seconds: float):
  return lambda d, t: t > seconds


def _when_staging(d: pathlib.Path, t: float) -> bool:
  return bool(staging_left(d))


def _when_step(n: int):
  return lambda d, t: (d / "w" / "metrics.jsonl").is_file() and sum(
      1 for _ in open(d / "w" / "metrics.jsonl")) >= n


def _report_is_finite(d: pathlib.Path, r: Result) -> str:
  p = d / "r.json"
  if not p.is_file():
    return "" if r.exit else "no report"
  text = p.read_text()
  return "NaN in the report" if "NaN" in text or "nan" in text.lower().split("model")[0] else ""


def _no_claim(d: pathlib.Path, r: Result) -> str:
  return "the failed start claimed the workdir (config.json)" if (d / "w" / "config.json").exists() else ""


def _ctx_is_seq_len(d: pathlib.Path, r: Result) -> str:
  rep = json.loads((d / "r.json").read_text()) if (d / "r.json").is_file() else {}
  return "" if rep.get("max_len") == 32 and rep.get("max_len_from") == "the run's seq_len" else f"context {rep.get('max_len')}"


def _metrics_once(d: pathlib.Path, r: Result) -> str:
  p = d / "w" / "metrics.jsonl"
  steps = [json.loads(line).get("step") for line in open(p) if line.strip()] if p.is_file() else []
  steps = [s for s in steps if s is not None]
  return "metrics.jsonl has repeated steps" if len(steps) != len(set(steps)) else ""


def _bad_hf_config(mutate: Callable[[dict], None]):
  def setup(d: pathlib.Path, fx: dict):
    hf = copy_hf(d, fx)
    cfg = json.loads((hf / "config.json").read_text())
    mutate(cfg)
    (hf / "config.json").write_text(json.dumps(cfg))
  return setup


def _truncate(rel: str):
  def setup(d: pathlib.Path, fx: dict):
    hf = copy_hf(d, fx)
    p = hf / rel
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  return setup


def _coordinator_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


W = lambda d: f"--workdir={d / 'w'}"  # noqa: E731
USER_FILE = lambda d: [d / "keep.txt"]  # noqa: E731


def _keep(d: pathlib.Path, fx: dict):
  (d / "keep.txt").write_text("the user's file")


def _train_nonempty(d: pathlib.Path, fx: dict):
  (d / "w").mkdir()
  (d / "w" / "notes.txt").write_text("mine")


def cases() -> list[Case]:
  c: list[Case] = []
  add = c.append
  # --- train.py: bad flags and settings (before compiling) ---
  for name, flags in [
      ("train stray positional", ["stray"]),
      ("train optim.clip=-1", ["--config.optim.clip=-1"]),
      ("train optim.warmup=-10", ["--config.optim.warmup=-10"]),
      ("train eval_batches=0 with eval on", ["--config.eval_every=2", "--config.eval_batches=0"]),
      ("train unknown config field", ["--config.no_such_field=1"]),
      ("train steps=0", ["--config.steps=0"]),
      ("train optim.lr=-1", ["--config.optim.lr=-1"]),
      ("train seq_len > max_position", ["--config.seq_len=100000"]),
      ("train nan_policy=maybe", ["--config.nan_policy=maybe"]),
      ("train model.n_group=3", ["--config.model.n_group=3"]),
      ("train data.path missing", ["--config.data.path=/nonexistent/tokens"]),
      ("train mesh.data=3 on 1 device", ["--config.mesh.data=3"]),
      ("train grad_accum=3 with batch 4", ["--config.optim.grad_accum=3"]),
  ]:
    add(Case(name, "bad flag", lambda d, fx, f=flags: [*TRAIN, W(d), *f], precious=USER_FILE, setup=_keep))
  add(Case("train config file missing", "bad flag", lambda d, fx: [PY, str(ROOT / "train.py"), "--config=nope.py", W(d)]))
  add(Case("train checkpoint.max_to_keep=0", "bad flag",
           lambda d, fx: [*TRAIN, W(d), "--config.checkpoint.max_to_keep=0"], owner="integrity"))
  add(Case("train checkpoint.max_to_keep=-1", "bad flag",
           lambda d, fx: [*TRAIN, W(d), "--config.checkpoint.max_to_keep=-1"], owner="integrity"))
  add(Case("train workdir is a file", "bad file", lambda d, fx: [*TRAIN, f"--workdir={d / 'keep.txt'}"],
           setup=_keep, precious=USER_FILE))
  add(Case("train workdir not empty (foreign)", "bad file", lambda d, fx: [*TRAIN, W(d)], setup=_train_nonempty,
           precious=lambda d: [d / "w" / "notes.txt"]))
  add(Case("train resume with another config", "bad flag", lambda d, fx: [*TRAIN, W(d), "--config.model.hidden_size=32"],
           setup=lambda d, fx: copy_run(d, fx), precious=lambda d: ckpt_files(d / "w")))
  add(Case("train unreachable coordinator", "environment",
           lambda d, fx: [*TRAIN, W(d), "--coordinator_timeout=3"],
           env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_coordinator_port()}", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "1"}))
  add(Case("train coordinator timeout env not a number", "environment", lambda d, fx: [*TRAIN, W(d)],
           env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                "MOE_JAX_COORDINATOR_TIMEOUT": "soon"}))
  add(Case("train out of memory (batch 65536 x 512)", "resource",
           lambda d, fx: [*TRAIN, W(d), "--config.batch_size=65536", "--config.seq_len=512"], limit_memory=True,
           check=_no_claim))
  add(Case("train disk full (2 MiB tmpfs workdir)", "disk", lambda d, fx: [*TRAIN, W(d)],
           setup=lambda d, fx: mount_tmpfs(d / "w", "2m")))
  add(Case("train read-only workdir (ro tmpfs)", "disk", lambda d, fx: [*TRAIN, W(d)],
           setup=lambda d, fx: mount_tmpfs(d / "w", "1m", read_only=True)))
  add(Case("train resume after kill -9 (ok)", "signal", lambda d, fx: [*TRAIN, W(d), "--config.steps=10"], expect="ok",
           setup=lambda d, fx: copy_run(d, fx), precious=lambda d: ckpt_files(d / "w")))
  add(Case("train SIGTERM mid-run", "signal", lambda d, fx: [*TRAIN, W(d), "--config.steps=200",
                                                             "--config.checkpoint_every=100"], expect="0",
           signal_when=(signal.SIGTERM, _when_step(3)),
           check=lambda d, r: "" if newest_step(d / "w") is not None else "no checkpoint after SIGTERM"))
  add(Case("train Ctrl-C while compiling", "signal", lambda d, fx: [*TRAIN, W(d)], expect="130",
           signal_when=(signal.SIGINT, lambda d, t: (d / "w" / "config.json").exists() or t > 20)))
  add(Case("train corrupt bytes in newest checkpoint", "corrupt", lambda d, fx: [*TRAIN, W(d), "--config.steps=10"],
           expect="ok", setup=lambda d, fx: corrupt(copy_run(d, fx) / "checkpoints" / "8"), owner="integrity",
           check=lambda d, r: "" if (d / "w" / "checkpoints" / "8.damaged").exists() or "damaged" in r.stderr
           else "the damaged step was not named"))
  add(Case("train garbage last line in metrics.jsonl", "bad file", lambda d, fx: [*TRAIN, W(d), "--config.steps=10"],
           expect="ok", owner="integrity",
           setup=lambda d, fx: open(copy_run(d, fx) / "metrics.jsonl", "a").write('{"step": 9, "lm_lo'),
           precious=lambda d: ckpt_files(d / "w")))
  add(Case("train two writers on one workdir", "two writers", lambda d, fx: [*TRAIN, W(d), "--config.steps=40"],
           background=lambda d, fx: [*TRAIN, W(d), "--config.steps=40"], owner="integrity", check=_metrics_once))
  add(Case("train checkpoints/ removed before resume", "bad file", lambda d, fx: [*TRAIN, W(d), "--config.steps=10"],
           expect="ok", setup=lambda d, fx: shutil.rmtree(copy_run(d, fx) / "checkpoints"), owner="integrity"))
  # --- eval.py ---
  for name, flags in [
      ("eval stray positional", ["stray", "--preset=tiny", f"--tasks=mc:{TASKS / 'mc.jsonl'}"]),
      ("eval no model source", [f"--tasks=mc:{TASKS / 'mc.jsonl'}"]),
      ("eval nothing to evaluate", ["--preset=tiny"]),
      ("eval task file missing", ["--preset=tiny", "--tasks=mc:/nonexistent.jsonl"]),
      ("eval unknown task kind", ["--preset=tiny", f"--tasks=qa:{TASKS / 'mc.jsonl'}"]),
      ("eval batch_size=0", ["--preset=tiny", f"--tasks=mc:{TASKS / 'mc.jsonl'}", "--batch_size=0"]),
      ("eval max_len=-1", ["--preset=tiny", f"--tasks=mc:{TASKS / 'mc.jsonl'}", "--max_len=-1"]),
      ("eval mesh=1,2", ["--preset=tiny", f"--tasks=mc:{TASKS / 'mc.jsonl'}", "--mesh=1,2"]),
      ("eval workdir missing", ["--workdir=/nonexistent/w", f"--tasks=mc:{TASKS / 'mc.jsonl'}"]),
      ("eval tokenizer missing", ["--preset=tiny", f"--tasks=mc:{TASKS / 'mc.jsonl'}", "--tokenizer=/no/tok.json"]),
      ("eval preset unknown", ["--preset=huge", f"--tasks=mc:{TASKS / 'mc.jsonl'}"]),
  ]:
    add(Case(name, "bad flag", lambda d, fx, f=flags: [*EVAL, *f]))
  add(Case("eval output is a directory", "bad file",
           lambda d, fx: [*EVAL, "--preset=tiny", f"--tasks=mc:{TASKS / 'mc.jsonl'}", f"--output={d}"]))
  add(Case("eval gen file not JSON", "bad file", lambda d, fx: [*EVAL, "--preset=tiny", f"--tasks=gen:{d / 'g.jsonl'}"],
           setup=lambda d, fx: (d / "g.jsonl").write_text('{"prompt": "x",\n')))
  add(Case("eval hf dir without config.json", "bad file", lambda d, fx: [*EVAL, f"--hf={d}", f"--tasks=lm:{TASKS / 'lm.txt'}"]))
  add(Case("eval sample tasks on the run (context = seq_len)", "ok",
           lambda d, fx: [*EVAL, f"--workdir={fx['run']}", f"--tasks=lm:{TASKS / 'lm.txt'},mc:{TASKS / 'mc.jsonl'},"
                          f"gen:{TASKS / 'gen.jsonl'}", "--max_new_tokens=8", f"--output={d / 'r.json'}"], expect="ok",
           check=_ctx_is_seq_len))
  add(Case("eval out of memory (batch 65536 x 1024)", "resource",
           lambda d, fx: [*EVAL, "--preset=tiny", f"--tasks=lm:{d / 'big.txt'}", "--batch_size=65536", "--max_len=1024"],
           setup=lambda d, fx: (d / "big.txt").write_text("x" * 200000), limit_memory=True))
  add(Case("eval Ctrl-C in the first second", "signal",
           lambda d, fx: [*EVAL, "--preset=tiny", f"--tasks=lm:{TASKS / 'lm.txt'}"], expect="130",
           signal_when=(signal.SIGINT, _after(0.5))))
  add(Case("eval SIGTERM while scoring", "signal",
           lambda d, fx: [*EVAL, f"--workdir={fx['run']}", f"--tasks=lm:{TASKS / 'lm.txt'}"], expect="143",
           signal_when=(signal.SIGTERM, _after(6))))
  add(Case("eval corrupt bytes in the checkpoint", "corrupt",
           lambda d, fx: [*EVAL, f"--workdir={d / 'w'}", f"--tasks=lm:{TASKS / 'lm.txt'}", f"--output={d / 'r.json'}"],
           expect="any", setup=lambda d, fx: corrupt_all(copy_run(d, fx) / "checkpoints" / "8"), owner="integrity",
           check=lambda d, r: _report_is_finite(d, r) or ("" if r.exit or "damaged" in r.stderr
                                                         else "restored without naming the damage")))
  # --- convert ---
  for name, flags in [
      ("convert stray positional", ["stray", "--hf", "/x", "--out", "/y"]),
      ("convert no arguments", []),
      ("convert hf dir missing", ["--hf", "/nonexistent/hf", "--out", "OUT"]),
      ("convert --no_mtp with --hf", ["--hf", "HF", "--out", "OUT", "--no_mtp"]),
      ("convert --dtype=int8", ["--from_ckpt", "RUN", "--to_hf", "OUT", "--dtype=int8"]),
      ("convert from_ckpt not a checkpoint", ["--from_ckpt", "KEEP", "--to_hf", "OUT"]),
  ]:
    add(Case(name, "bad flag", lambda d, fx, f=flags: [*CONVERT, *[
        {"OUT": str(d / "out"), "HF": str(fx["hf"]), "RUN": str(fx["run"]), "KEEP": str(d)}.get(a, a) for a in f]]))
  add(Case("convert --out not empty", "bad file", lambda d, fx: [*CONVERT, "--hf", str(fx["hf"]), "--out", str(d)],
           setup=_keep, precious=USER_FILE))
  add(Case("convert --to_hf is a file", "bad file",
           lambda d, fx: [*CONVERT, "--from_ckpt", str(fx["run"]), "--to_hf", str(d / "keep.txt")], setup=_keep,
           precious=USER_FILE))
  add(Case("convert V2 config without num_experts_per_tok", "bad file",
           lambda d, fx: [*CONVERT, "--hf", str(d / "hf"), "--out", str(d / "out")],
           setup=_bad_hf_config(lambda c: (c.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"]),
                                           c.pop("num_experts_per_tok")))))
  add(Case("convert V3 config without routed_scaling_factor (2.5)", "bad file",
           lambda d, fx: [*CONVERT, "--hf", str(d / "hf"), "--out", str(d / "out")], expect="ok",
           setup=_bad_hf_config(lambda c: c.pop("routed_scaling_factor")),
           check=lambda d, r: "" if json.loads((d / "out" / "model_config.json").read_text())[
               "routed_scaling_factor"] == 2.5 else "not transformers' default 2.5"))
  add(Case("convert truncated safetensors", "bad file",
           lambda d, fx: [*CONVERT, "--hf", str(d / "hf"), "--out", str(d / "out")], setup=_truncate("model.safetensors")))
  add(Case("convert config.json not JSON", "bad file",
           lambda d, fx: [*CONVERT, "--hf", str(d / "hf"), "--out", str(d / "out")],
           setup=lambda d, fx: (copy_hf(d, fx) / "config.json").write_text('{"model_type": "deepseek_v3",')))
  add(Case("convert Ctrl-C during start-up", "signal",
           lambda d, fx: [*CONVERT, "--hf", str(fx["hf"]), "--out", str(d / "out")], expect="130",
           signal_when=(signal.SIGINT, _after(1.0))))
  add(Case("convert SIGTERM while writing", "signal",
           lambda d, fx: [*CONVERT, "--from_ckpt", str(fx["run"]), "--to_hf", str(d / "out")], expect="143",
           signal_when=(signal.SIGTERM, _when_staging)))
  add(Case("convert after kill -9 (stale staging swept)", "signal",
           lambda d, fx: [*CONVERT, "--from_ckpt", str(fx["run"]), "--to_hf", str(d / "out")], expect="ok",
           setup=_stale_staging("convert", "out")))
  add(Case("convert corrupt checkpoint bytes --to_hf", "corrupt",
           lambda d, fx: [*CONVERT, "--from_ckpt", str(d / "w" / "checkpoints" / "8"), "--to_hf", str(d / "out")],
           setup=lambda d, fx: corrupt_all(copy_run(d, fx) / "checkpoints" / "8"), owner="integrity"))
  add(Case("convert --to_hf on a full disk (1 MiB tmpfs)", "disk",
           lambda d, fx: [*CONVERT, "--from_ckpt", str(fx["run"]), "--to_hf", str(d / "full" / "out")],
           setup=lambda d, fx: mount_tmpfs(d / "full", "1m")))
  add(Case("convert --to_hf on a read-only disk", "disk",
           lambda d, fx: [*CONVERT, "--from_ckpt", str(fx["run"]), "--to_hf", str(d / "ro" / "out")],
           setup=lambda d, fx: mount_tmpfs(d / "ro", "1m", read_only=True)))
  # --- data prepare ---
  for name, flags in [
      ("prepare stray positional", ["stray", "--input", "TEXT", "--out", "OUT"]),
      ("prepare input missing", ["--input", "/nonexistent.txt", "--out", "OUT"]),
      ("prepare val_fraction=0.9", ["--input", "TEXT", "--out", "OUT", "--val_fraction=0.9"]),
      ("prepare tokenizer missing", ["--input", "TEXT", "--out", "OUT", "--tokenizer=/no/tokenizer.json"]),
      ("prepare unknown format", ["--input", "TEXT", "--out", "OUT", "--format=yaml"]),
  ]:
    add(Case(name, "bad flag", lambda d, fx, f=flags: [*PREPARE, *[
        {"OUT": str(d / "out"), "TEXT": str(fx["text"])}.get(a, a) for a in f]]))
  add(Case("prepare binary corpus", "bad file", lambda d, fx: [*PREPARE, "--input", str(d / "blob.bin"), "--out",
                                                               str(d / "out")],
           setup=lambda d, fx: (d / "blob.bin").write_bytes(os.urandom(50000))))
  add(Case("prepare empty input", "bad file", lambda d, fx: [*PREPARE, "--input", str(d / "e.txt"), "--out", str(d / "out")],
           setup=lambda d, fx: (d / "e.txt").write_text("")))
  add(Case("prepare --out not empty", "bad file", lambda d, fx: [*PREPARE, "--input", str(fx["text"]), "--out", str(d)],
           setup=_keep, precious=USER_FILE))
  add(Case("prepare jsonl without text", "bad file", lambda d, fx: [*PREPARE, "--input", str(d / "x.jsonl"), "--out",
                                                                    str(d / "out")],
           setup=lambda d, fx: (d / "x.jsonl").write_text('{"body": "hi"}\n')))
  add(Case("prepare SIGTERM while tokenizing", "signal",
           lambda d, fx: [*PREPARE, "--out", str(d / "out"), "--input", *_docs(d)], expect="143", setup=_many_docs,
           signal_when=(signal.SIGTERM, _when_staging)))
  add(Case("prepare Ctrl-C while tokenizing", "signal",
           lambda d, fx: [*PREPARE, "--out", str(d / "out"), "--input", *_docs(d)], expect="130", setup=_many_docs,
           signal_when=(signal.SIGINT, _when_staging)))
  add(Case("prepare after kill -9 (stale staging swept)", "signal",
           lambda d, fx: [*PREPARE, "--input", str(fx["text"]), "--out", str(d / "out")], expect="ok",
           setup=_stale_staging("prepare", "out")))
  add(Case("prepare on a full disk (1 MiB tmpfs)", "disk",
           lambda d, fx: [*PREPARE, "--out", str(d / "full" / "out"), "--input", *_docs(d)],
           setup=lambda d, fx: (_many_docs(d, fx), mount_tmpfs(d / "full", "1m"))))
  add(Case("prepare on a read-only disk", "disk",
           lambda d, fx: [*PREPARE, "--input", str(fx["text"]), "--out", str(d / "ro" / "out")],
           setup=lambda d, fx: mount_tmpfs(d / "ro", "1m", read_only=True)))
  add(Case("prepare --overwrite of a prepared set (ok)", "ok",
           lambda d, fx: [*PREPARE, "--input", str(fx["text"]), "--out", str(d / "tok"), "--overwrite"], expect="ok",
           setup=lambda d, fx: shutil.copytree(fx["tokens"], d / "tok")))
  return c
