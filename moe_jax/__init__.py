"""moe_jax: DeepSeek-V3 architecture (MLA + DeepSeekMoE + MTP) in JAX/Flax."""

import glob as _glob
import os as _os
import signal as _signal
import sys as _sys
import threading as _threading

# A Linux host with no accelerator device files (TPU: /dev/accel*, /dev/vfio; GPU: /dev/nvidia*, /dev/kfd)
# runs on the CPU: say so before jax is imported, so jax does not try the installed libtpu first and log
# "Unable to initialize backend 'tpu'" at every start. An explicit JAX_PLATFORMS always wins; compile-only
# TPU topologies (moe_jax.aot) still load libtpu on their own.
if ("JAX_PLATFORMS" not in _os.environ and _sys.platform == "linux"
    and not any(_glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*", "/dev/kfd"))):
  _os.environ["JAX_PLATFORMS"] = "cpu"


def _exit_at_once(signum, frame):
  del frame
  print("error: interrupted" if signum == _signal.SIGINT else "error: terminated", file=_sys.stderr, flush=True)
  _os._exit(128 + signum)


# `python -m moe_jax.X` (argv[0] is "-m" while the package loads): Ctrl-C / SIGTERM during the imports
# below (jax: seconds) exit at once, 130 / 143; Python's default would print a KeyboardInterrupt
# traceback from inside an import. Commands install their own handlers for the work itself, so a
# SIGINT inherited as ignored (a parent that ignores it, e.g. a test runner's worker) is replaced
# here too: otherwise a Ctrl-C in the first seconds would be lost and one a second later obeyed.
if _sys.argv[:1] == ["-m"] and _threading.current_thread() is _threading.main_thread():
  for _s in (_signal.SIGINT, _signal.SIGTERM):
    if _signal.getsignal(_s) in (_signal.default_int_handler, _signal.SIG_DFL, _signal.SIG_IGN):
      _signal.signal(_s, _exit_at_once)

from moe_jax.config import ModelConfig, RopeScaling  # noqa: E402
from moe_jax.model import Transformer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ModelConfig", "RopeScaling", "Transformer"]
