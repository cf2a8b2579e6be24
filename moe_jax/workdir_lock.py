"""One writer per workdir: an exclusive lock on WORKDIR/train.lock, held for the whole run.

The lock is `fcntl.flock` on an open file, so the kernel drops it when the holder exits in any
way, kill -9 included: a lock left by a dead process never blocks the next run. The file
stays (it holds the last holder's PID and host, for the message a refused run prints);
deleting it is harmless. In a multi-host run process 0 holds it, and its answer is broadcast
so that every process of a refused run stops.

Caveats:
- Across machines the lock is only as good as the file system's locking: local disks and
  NFS with locking (NFSv4, or NFSv3 with lockd) work; Linux emulates flock with POSIX locks
  on NFS. After a crash of the holder's *machine* (not just its process), an NFS server
  keeps the lock until the client's lease expires (NFSv4: about 90 s).
- Where the file system refuses locks (some FUSE mounts, Lustre without -o flock) the run
  goes on unguarded, with one warning.
- The lock file descriptor is not inherited by subprocesses (PEP 446); a process forked
  without exec would share it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

import jax
import numpy as np
from absl import logging

from moe_jax.errors import UserError

LOCK_NAME = "train.lock"
_MSG_BYTES = 512  # the refusal broadcast to the other processes of a multi-host run


class Busy(UserError):
  """Another process holds the workdir's lock (the message names its PID and host)."""


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir):` holds the workdir's lock, or raises Busy (a
  UserError) naming the holder's PID and host. Creates workdir when it does not exist."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK_NAME)
    self.fd: Optional[int] = None
    self.created = False  # this run made the directory (removed again if nothing else lands in it)

  def __enter__(self) -> "WorkdirLock":
    refusal = self._acquire() if jax.process_index() == 0 else ""
    if jax.process_count() > 1:
      refusal = _broadcast(refusal)
    if refusal:
      raise Busy(refusal)
    return self

  def __exit__(self, *exc):
    if self.fd is None:
      return
    if self.created and os.listdir(self.workdir) == [LOCK_NAME]:  # a start that failed leaves nothing behind
      os.remove(self.path)  # (still locked: a run that opened it meanwhile sees another inode and retries)
      os.rmdir(self.workdir)
    os.close(self.fd)  # releases the lock
    self.fd = None

  def _acquire(self) -> str:
    """'' once held (or unsupported here, with a warning); else the one-line refusal."""
    from moe_jax import checkpoint
    if checkpoint.foreign_entries(self.workdir) and not os.path.exists(os.path.join(self.workdir, "config.json")):
      return ""  # not a run's directory: check_workdir refuses it, and nothing is added to it
    self.created = not os.path.isdir(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          return self._refusal()
        logging.warning("cannot lock %s (%s): this file system does not support locks, so a second train.py "
                        "on this workdir would not be stopped", self.path, e.strerror)
        return ""
      # The file may have been replaced between open and flock: only the lock on the current file counts.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    self.fd = fd
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
    return ""

  def _refusal(self) -> str:
    holder = {}
    for _ in range(10):  # the holder writes its PID right after it locks: wait a moment for it
      try:
        with open(self.path) as f:
          holder = json.loads(f.read() or "{}")
      except (OSError, ValueError):
        holder = {}
      if holder:
        break
      time.sleep(0.05)
    who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}" if holder
           else "another process (its PID is not recorded yet)")
    return (f"workdir {self.workdir} is in use by {who} (it holds {self.path}): wait for that run to end or "
            "stop it, or pick another --workdir")


def _broadcast(message: str) -> str:
  """Process 0's message, on every process (a collective: every process calls it)."""
  from jax.experimental import multihost_utils
  buf = np.zeros(_MSG_BYTES, np.uint8)
  raw = message.encode()[:_MSG_BYTES]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out[out != 0].astype(np.uint8)).decode(errors="replace")
