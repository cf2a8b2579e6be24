"""Trains a DeepSeek-V3-style MoE model: flags -> moe_jax.train.run(config, workdir).

  python train.py                                   # tiny preset, embedded corpus, ./workdir/tiny
  python train.py --config=configs/small.py --workdir=W --config.optim.lr=3e-4
  python train.py --config=configs/small.py:smoke   # a variant of the preset

Restarting with the same --workdir resumes from its latest complete checkpoint. SIGTERM or
Ctrl-C writes a checkpoint and exits 0. Bad input prints one `error:` line and exits 2.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")
# No default here: config_flags would load it (and apply --config.* overrides) at import time,
# outside _parse's error handling; _parse supplies it instead.
_CONFIG = config_flags.DEFINE_config_file("config", default=None, lock_config=True,
                                          help_string=f"training config file[:variant] (default {DEFAULT_CONFIG})")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints and metrics (default ./workdir/<config name>)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host); "
                                 "also on when JAX_COORDINATOR_ADDRESS is set")


def _fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def _one_line(e: Exception) -> str:
  """config_flags' messages run over several lines, the cause on the last one."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _parse(argv):
  """absl flag parsing, but a bad flag or config field is one `error:` line, not a usage dump."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # lock_config: an override names a field that does not exist
    _fail(f"--config: no such config field {str(e).strip(chr(34))}")
  except (flags.Error, OSError, TypeError, ValueError) as e:
    _fail(_one_line(e))


class _QuietLibraries(std_logging.Filter):
  """orbax logs every save at INFO level through absl; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from moe_jax import sharding, train  # after flag parsing, so `--help` stays fast

  try:
    sharding.initialize_distributed(enable=_DISTRIBUTED.value or None)
  except ValueError as e:
    _fail(f"distributed: {e}")
  import jax

  try:
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdir", config.get("name", "run"))
  except OSError as e:  # config_flags defers a file that failed to load until first use
    _fail(_one_line(e))
  logging.info("JAX %s, process %d of %d, %d local of %d devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)
  try:
    train.run(config, workdir)
  except train.UserError as e:
    _fail(str(e))
  except train.Diverged as e:
    _fail(str(e), code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
