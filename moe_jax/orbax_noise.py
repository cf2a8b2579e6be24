"""Quieting what orbax leaves behind after a failure moe_jax already reports in one line.

A failed read (a damaged checkpoint) leaves tensorstore callbacks that print tracebacks into a
closed event loop; a failed save (checkpoints/ removed under it) leaves its fragment writes
unawaited, and Python warns for each one whenever it collects it. checkpoint.py reports those
failures itself (Damaged, the "was removed during the run" warning); these hooks drop only the
leftovers, and every other exception or warning still prints.
"""

from __future__ import annotations

import logging as std_logging
import sys
import threading
import warnings

# What a failed orbax read prints after the restore has already failed (tensorstore callbacks
# into a closed event loop, the full TensorStore spec of every array left unread).
_READ_NOISE = ("Event loop is closed", "Encountered error while reading array index", "in OCDBT database at")
_quiet = False


def silence_read_noise():
  """Drop the tracebacks a failed read's leftover callbacks print (installed once per process,
  before reading, since those callbacks run on other threads and may print before the restore
  itself fails): the damage is reported in one line instead. Other exceptions still print."""
  global _quiet
  if _quiet:
    return
  _quiet = True
  hook, unraisable = sys.excepthook, sys.unraisablehook
  noise = lambda e: any(n in str(e) for n in _READ_NOISE)  # noqa: E731
  sys.excepthook = lambda t, v, tb: None if noise(v) else hook(t, v, tb)
  sys.unraisablehook = lambda u: None if noise(u.exc_value) else unraisable(u)
  thread_hook = threading.excepthook
  threading.excepthook = lambda a: None if noise(a.exc_value) else thread_hook(a)
  # The reads abandoned mid-flight: Python names each unawaited coroutine when it is collected,
  # wherever that happens (inside jax's tracing, at exit).
  warnings.filterwarnings("ignore", message=r"coroutine '_read_\w*' was never awaited", category=RuntimeWarning)
  # asyncio logs "Task exception was never retrieved" for the reads still in flight.
  for name in ("asyncio", "concurrent.futures"):  # a future's callback into the closed loop
    std_logging.getLogger(name).addFilter(
        lambda r: not (noise(r.getMessage()) or (r.exc_info and noise(r.exc_info[1]))))


def silence_abandoned_writes():
  """Drop the "coroutine '...write_fragment' was never awaited" warnings of a failed save. They can
  come at any later moment (whenever the coroutines are collected), so this is installed before
  saving, by every writing Checkpointer."""
  warnings.filterwarnings("ignore", message=r"coroutine '[\w.<>]*write_fragment' was never awaited",
                          category=RuntimeWarning)
