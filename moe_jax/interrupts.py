"""Ctrl-C and SIGTERM for long runs: stop promptly, keep the work, never raise mid-callback.

Python runs a signal handler only between bytecodes of the main thread, so while the main
thread sits inside a C++ call (an XLA compile can take minutes) a Ctrl-C waits, and a
KeyboardInterrupt raised between two bytecodes of a garbage-collector callback is printed
as "Exception ignored" and lost. Hence:
  - the handler never raises: it records the signal, and the loop checks it after each step;
  - long blocking phases (setup, compiles, evaluation) run in a helper thread while the main
    thread polls, so a signal is seen within POLL_S and the run stops without waiting for them;
  - a second Ctrl-C exits at once (the last complete checkpoint stays; saves are atomic).
Exit codes (train.py): 130 after Ctrl-C, 0 after SIGTERM (a preemption with its checkpoint).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import Any, Callable, Optional

POLL_S = 0.05
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 0}


class Interrupted(KeyboardInterrupt):
  """A signal stopped the run after it saved what it had to; exit_code: 130 (Ctrl-C) or 0 (SIGTERM)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum, self.exit_code = signum, EXIT_CODES.get(signum, 128 + signum)


def exit_now(code: int, message: str = ""):
  """Leaves without waiting for helper threads (a compile in flight cannot be cancelled)."""
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


class Signals:
  """Context manager: SIGINT / SIGTERM set `signum` instead of raising (main thread only)."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._old: dict = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __enter__(self) -> "Signals":
    if threading.current_thread() is threading.main_thread():  # only it may install handlers
      self._old = {s: signal.signal(s, self._handle) for s in EXIT_CODES}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      exit_now(130, "second interrupt: exiting now (the last complete checkpoint is kept)")
    if self.signum is None or signum == signal.SIGINT:  # Ctrl-C after SIGTERM still exits 130
      self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

  def wait(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs), run in a helper thread while this one polls; raises Interrupted
    as soon as a signal arrives (the helper is abandoned: exit with exit_now)."""
    if self.requested:
      raise Interrupted(self.signum)
    if not self._old:  # no handlers here (not the main thread): nothing to poll for
      return fn(*args, **kwargs)
    out: dict[str, Any] = {}

    def target():
      try:
        out["value"] = fn(*args, **kwargs)
      except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
        out["error"] = e

    helper = threading.Thread(target=target, name=f"moe_jax:{getattr(fn, '__name__', 'wait')}", daemon=True)
    helper.start()
    while helper.is_alive():
      helper.join(POLL_S)
      if self.requested:
        raise Interrupted(self.signum)
    if "error" in out:
      raise out["error"]
    return out["value"]


# --- commands that save nothing on the way: eval.py, convert, data prepare -----------------------
COMMAND_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as a shell reports
_STAGING: set[str] = set()  # staging directories of this process, removed when a signal stops it
_STAGING_SEP = ".pid"


def run_command(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """fn(*args, **kwargs) in a helper thread while the main thread waits for SIGINT / SIGTERM.

  On a signal the staging directories this process made (make_staging) are removed and the process
  exits at once with 130 / 143 and one `error:` line: no traceback from a thread or a GC callback,
  and nothing half-written left beside the output. Exceptions of fn are re-raised here.
  """
  with Signals() as signals:
    try:
      return signals.wait(fn, *args, **kwargs)
    except Interrupted as e:
      for path in list(_STAGING):
        shutil.rmtree(path, ignore_errors=True)
      name = "interrupted" if e.signum == signal.SIGINT else "terminated"
      exit_now(COMMAND_EXIT_CODES.get(e.signum, 128 + e.signum),
               f"error: {name}; the output was not written" if _STAGING else f"error: {name}")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def make_staging(out: str, kind: str) -> str:
  """A new temporary directory beside `out`: .NAME.KIND-HOST.pidPID-XXXX, removed on a signal by
  run_command. First removes the ones a killed run (kill -9, a crash) of the same command left for
  the same output on this host: a live process's staging is never touched."""
  parent, name = os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  prefix = f".{name}.{kind}-{socket.gethostname()}{_STAGING_SEP}"
  for entry in os.listdir(parent):
    pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
  path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
  _STAGING.add(path)
  return path


def staging_done(path: str):
  """The staging directory was renamed onto the output or removed: nothing to clean on a signal."""
  _STAGING.discard(path)
