"""Fault sweep (issue 23): real commands against bad flags, bad files, signals, full and read-only
disks, two writers and damaged checkpoints; one row per case.

  nice -n 5 python benchmarks/fault_sweep.py [--out benchmarks/results/fault_sweep.jsonl] [--jobs 2] [-k NAME]

Each case runs one command of train.py / eval.py / `python -m moe_jax.convert` /
`python -m moe_jax.data prepare` in its own temporary directory (the tiny preset, a few steps)
and records: the command, exit status, the last stderr line, whether a traceback (Python, or a
C++ check failure) appeared, and whether data was lost (a file the user had, or the newest
checkpoint, missing or changed; a staging directory left behind). A case passes when it ends
as expected (`error`: non-zero with a last line `error: ...`; `ok`: 0; a signal: its status)
with no traceback and nothing lost. Prints a markdown table, writes one JSON object per case.

Disk-full and read-only cases mount a small tmpfs (root); without it they use a read-only
chmod and are marked as such. Out-of-memory cases run under RLIMIT_AS (16 GiB) so a refused
allocation never touches the machine's RAM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fault_cases import (CONVERT, ENV, PREPARE, PY, ROOT, TASKS, TIMEOUT, TRAIN, Case, Result, cases, digest, fill_tmpfs,
                         staging_left)


# --- fixtures: one trained run, its HF export, a token directory ---------------------------
def build_fixtures(base: pathlib.Path) -> dict:
  fx = {"base": base, "run": base / "run", "hf": base / "hf", "tokens": base / "tokens", "text": base / "corpus.txt"}
  if not (fx["run"] / "checkpoints" / "8").is_dir():
    shutil.rmtree(fx["run"], ignore_errors=True)
    _must([*TRAIN, f"--workdir={fx['run']}"])
  if not (fx["hf"] / "config.json").is_file():
    shutil.rmtree(fx["hf"], ignore_errors=True)
    _must([*CONVERT, "--from_ckpt", str(fx["run"]), "--to_hf", str(fx["hf"])])
  fx["text"].write_text((TASKS / "lm.txt").read_text() * 20)
  if not (fx["tokens"] / "meta.json").is_file():
    shutil.rmtree(fx["tokens"], ignore_errors=True)
    _must([*PREPARE, "--input", str(fx["text"]), "--out", str(fx["tokens"])])
  return fx


def _must(cmd):
  r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
  if r.returncode:
    raise SystemExit(f"fixture failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")


# --- running --------------------------------------------------------------------------------
def _as_from_a_shell():
  """Children start with a shell's default Ctrl-C (a sweep run in the background inherits SIG_IGN)."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _limit_memory():
  _as_from_a_shell()
  resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))


def run_case(case: Case, fx: dict, root: pathlib.Path) -> Result:
  d = pathlib.Path(tempfile.mkdtemp(prefix="case-", dir=root))
  note, mounts = "", []
  start = time.monotonic()
  try:
    if case.setup:
      case.setup(d, fx)
    mounts = [p for p in d.rglob("*") if p.is_dir() and os.path.ismount(p)]
    if case.kind == "disk" and not mounts:
      note = "no tmpfs (not root?): case not run"
      return Result(case.name, case.kind, case.owner, "", -1, "", False, "", False, note, 0.0)
    for m in mounts:
      if "full" in m.name:
        fill_tmpfs(m, leave=64 << 10)
    precious = case.precious(d)
    before = digest(precious)
    cmd = case.cmd(d, fx)
    env = {**ENV, **(case.env or {})}
    bg = subprocess.Popen(case.background(d, fx), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) if case.background else None
    if bg:
      time.sleep(0.5)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_limit_memory if case.limit_memory else _as_from_a_shell)
    if case.signal_when:
      signum, when = case.signal_when
      t0 = time.monotonic()
      while proc.poll() is None and not when(d, time.monotonic() - t0):
        time.sleep(0.02)
        if time.monotonic() - t0 > TIMEOUT:
          break
      if proc.poll() is None:
        proc.send_signal(signum)
      else:
        note = "finished before the signal"
    try:
      out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
      note = f"timed out after {TIMEOUT} s"
    if bg:
      _, bg_err = bg.communicate(timeout=TIMEOUT)
      note += f"first writer: exit {bg.returncode}, " + (bg_err.strip().splitlines() or [""])[-1][:160]
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    tb = "Traceback (most recent call last)" in err or "Check failure stack trace" in err
    after = digest(precious)
    lost = [f"{pathlib.Path(p).relative_to(d)} {'missing' if after[p] == 'missing' else 'changed'}"
            for p in before if after[p] != before[p]]
    lost += [f"staging left: {s}" for s in staging_left(d)]
    shown = [_short(a, d) for a in cmd]
    docs = [a for a in shown if a.startswith("$CASE/docs/")]
    if len(docs) > 3:  # 300 input files: one glob in the table
      shown = [a for a in shown if a not in docs[1:]]
      shown[shown.index(docs[0])] = f"$CASE/docs/*.txt ({len(docs)} files)"
    r = Result(case.name, case.kind, case.owner, " ".join(shown), proc.returncode, last[:300], tb,
               "; ".join(lost), False, note, round(time.monotonic() - start, 1), err[-4000:])
    if case.expect == "error":
      ok = r.exit not in (0, None) and last.startswith("error:")
    elif case.expect == "ok":
      ok = r.exit == 0
    elif case.expect == "any":
      ok = True
    else:
      ok = r.exit == int(case.expect)
    problem = case.check(d, r) if case.check else ""
    if problem:
      r.note = (r.note + "; " if r.note else "") + problem
    r.ok = ok and not tb and not lost and not problem and "timed out" not in r.note
    return r
  except Exception as e:  # noqa: BLE001 - a broken case is reported, not the end of the sweep
    return Result(case.name, case.kind, case.owner, "", -1, "", False, "", False, f"sweep error: {e!r}",
                  round(time.monotonic() - start, 1))
  finally:
    for m in sorted((p for p in d.rglob("*") if p.is_dir() and os.path.ismount(p)), key=lambda p: -len(p.parts)):
      subprocess.run(["umount", str(m)], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _short(arg: str, d: pathlib.Path) -> str:
  return arg.replace(PY, "python").replace(str(d), "$CASE").replace(str(ROOT) + "/", "")


def table(results: list[Result]) -> str:
  rows = ["| # | case | kind | owner | command | exit | last stderr line | traceback | data lost | pass |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
  for i, r in enumerate(results, 1):
    note = f" ({esc(r.note)})" if r.note else ""
    rows.append(f"| {i} | {esc(r.name)} | {r.kind} | {r.owner} | `{esc(r.command)}` | {r.exit} | {esc(r.last_line)}"
                f" | {'yes' if r.traceback else 'no'} | {esc(r.lost) or 'no'} | {'yes' if r.ok else '**no**'}{note} |")
  passed = sum(r.ok for r in results)
  return "\n".join(rows) + f"\n\n{passed} of {len(results)} cases pass."


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_sweep.jsonl"))
  ap.add_argument("--table", default=None, help="markdown table path (default: --out with .md)")
  ap.add_argument("--jobs", type=int, default=2)
  ap.add_argument("--fixtures", default=None, help="directory for the shared run/hf/tokens (kept between sweeps)")
  ap.add_argument("-k", default="", help="only cases whose name contains this (A|B: either)")
  ap.add_argument("--start", type=int, default=1, help="first case number to run (the others are not run)")
  args = ap.parse_args(argv)
  selected = [c for i, c in enumerate(cases(), 1) if any(k in c.name for k in args.k.split("|")) and i >= args.start]
  root = pathlib.Path(tempfile.mkdtemp(prefix="fault_sweep-"))
  fx = build_fixtures(pathlib.Path(args.fixtures) if args.fixtures else root / "fixtures")
  print(f"{len(selected)} cases, {args.jobs} at a time; fixtures in {fx['base']}", file=sys.stderr, flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, open(args.out, "w") as jsonl:
    futures = [pool.submit(run_case, c, fx, root) for c in selected]
    results = []
    for f, c in zip(futures, selected):
      results.append(f.result())
      r = results[-1]
      jsonl.write(json.dumps(dataclasses.asdict(r)) + "\n")  # as they complete: a stopped sweep keeps its rows
      jsonl.flush()
      print(f"[{len(results)}/{len(selected)}] {'pass' if r.ok else 'FAIL'} {r.name}: exit {r.exit}, {r.last_line[:120]}",
            file=sys.stderr, flush=True)
  md = table(results)
  with open(args.table or os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(f"Fault sweep, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `python benchmarks/fault_sweep.py`\n\n"
            + md + "\n")
  print(md)
  shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
