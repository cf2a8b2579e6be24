"""User errors: one `error: <message>` line on stderr, exit status 2, never a traceback.

Every command shares this: `ArgumentParser` turns a bad flag into a UserError (not argparse's
usage dump), `main_guard` wraps a command's `main(argv) -> int` so a UserError, or an
OSError that names a file (permission denied, no such file, read-only file system), prints
one line and returns 2, and Ctrl-C returns 130. Resources that ran out (device or host memory,
disk space, permissions) are one line too, saying what to change (resource_error). The path checks (`output_dir`,
`output_file`) run before expensive work, so a bad --workdir or --out fails in a second,
not after a model has been loaded.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import tempfile
import warnings
from typing import Callable


class UserError(ValueError):
  """A cause the user can fix (a path, a config field, a mesh); the message is one line."""


def one_line(e: BaseException) -> str:
  """A multi-line message (config_flags, tokenizers) -> its first and last non-blank lines."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def report(msg: str, code: int = 2) -> int:
  print(f"error: {msg}", file=sys.stderr)
  # A failed restore abandons orbax's async reads; Python would name each unawaited coroutine at
  # exit, below this line. The error line stays the last thing the user reads.
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
  return code


def fail(msg: str, code: int = 2):
  """Prints the `error:` line and exits (for drivers that cannot return a status)."""
  sys.exit(report(msg, code))


def os_error_message(e: OSError) -> str:
  """'PATH: Permission denied' for an OSError that names a file."""
  where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
  return f"{where}: {e.strerror or one_line(e)}"


def main_guard(main: Callable[..., int]) -> Callable[..., int]:
  """Decorates a command's `main(argv) -> int`: user errors become one line and status 2.

  An OSError without a file name (a failing device, an internal error) still raises: only
  causes the user can act on are shortened to one line.
  """
  @functools.wraps(main)
  def guarded(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs)
    except UserError as e:
      return report(one_line(e))
    except OSError as e:
      if resource_error(e):  # disk full, permissions: with what to do
        return report(resource_error(e))
      if e.filename is None:
        raise
      return report(os_error_message(e))
    except KeyboardInterrupt:
      return report("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - only resources and the one XLA failure below are shortened
      if resource_error(e, "use a machine with more memory, or a smaller model"):
        return report(resource_error(e, "use a machine with more memory, or a smaller model"))
      if not _bf16_dot_unsupported(e):
        raise
      return report("XLA:CPU could not run a matmul with bf16 operands (the fast fp32 path of "
                    "moe_jax/layers/matmul.py on this CPU met an XLA:CPU limitation): rerun with "
                    "JAX_DEFAULT_MATMUL_PRECISION=float32 for exact fp32 matmuls, and report the model config")
  return guarded


def _bf16_dot_unsupported(e: Exception) -> bool:
  """XLA:CPU's 'Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32' (see layers/matmul.py)."""
  text = str(e)
  return type(e).__name__ == "JaxRuntimeError" and "DotThunk" in text and "BF16" in text


# What to change when memory runs out, per command (resource_error's `hint`).
TRAIN_MEMORY_HINT = ("lower batch_size or seq_len, raise optim.grad_accum (same batch, smaller microbatch), set "
                     "model.remat_policy=full, or use a mesh that shards more (mesh.fsdp, mesh.expert, mesh.tensor)")
EVAL_MEMORY_HINT = "lower --batch_size or --max_len, or use a --mesh that shards more (fsdp, tensor)"


def resource_error(e: BaseException, hint: str = "") -> str | None:
  """One line for a resource that ran out (None for anything else): device memory (XLA
  RESOURCE_EXHAUSTED), host memory (MemoryError), disk space (ENOSPC, also when orbax or
  tensorstore wrap it in another exception) and permissions. `hint`: what to change for memory."""
  text = str(e)
  first = one_line(e)[:300]
  if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in text:
    return f"out of device memory (XLA RESOURCE_EXHAUSTED: {first.removeprefix('RESOURCE_EXHAUSTED: ')}): {hint}"
  if isinstance(e, MemoryError):
    return f"out of host memory (MemoryError{': ' + first if str(e) else ''}): {hint}"
  errno_ = getattr(e, "errno", None)
  if errno_ == errno.ENOSPC or "No space left on device" in text or "Disk quota exceeded" in text:
    where = os_error_message(e) if isinstance(e, OSError) and e.filename else first
    return f"disk full ({where}): free space there, or write to another disk"
  if isinstance(e, PermissionError) or errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
    where = os_error_message(e) if isinstance(e, OSError) and e.filename else first
    return f"permission denied ({where}): make the location writable, or pick another one"
  return None


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors (unknown flag, bad value, missing argument) raise UserError."""

  def error(self, message: str):
    raise UserError(f"{message} (see {self.prog} --help)")


def _nearest_existing(path: str) -> str:
  p = os.path.abspath(path)
  while not os.path.exists(p):
    p = os.path.dirname(p)
  return p


def _probe_writable(directory: str, flag: str):
  """Creates and removes a file: os.access misses read-only mounts under some kernels and root."""
  try:
    fd, name = tempfile.mkstemp(prefix=".moe_jax_write_test_", dir=directory)
  except OSError as e:
    raise UserError(f"{flag}: cannot write into {directory} ({e.strerror}); pick a writable location") from None
  os.close(fd)
  os.unlink(name)


def output_dir(path: str, flag: str) -> str:
  """Checks that `path` is, or can be created as, a writable directory; returns it absolute.

  Nothing is created: a missing directory is checked through its nearest existing parent.
  """
  if not path:
    raise UserError(f"{flag} is empty: give a directory")
  p = os.path.abspath(path)
  if os.path.exists(p) and not os.path.isdir(p):
    raise UserError(f"{flag}={path} is a file, not a directory; pick a directory path")
  parent = _nearest_existing(p)
  if not os.path.isdir(parent):
    raise UserError(f"{flag}={path}: {parent} is a file, so the directory cannot be created")
  _probe_writable(parent, flag)
  return p


def output_file(path: str, flag: str) -> str:
  """Checks that the file `path` can be written (its directory exists or can be made)."""
  p = os.path.abspath(path)
  if os.path.isdir(p):
    raise UserError(f"{flag}={path} is a directory; give a file path")
  output_dir(os.path.dirname(p), flag)
  if os.path.exists(p) and not os.access(p, os.W_OK):
    raise UserError(f"{flag}={path}: the file is not writable")
  return p
