"""Trains a DeepSeek-V3-style MoE model: flags -> moe_jax.train.run(config, workdir).

  python train.py                                   # tiny preset, embedded corpus, ./workdir/tiny
  python train.py --config=configs/small.py --workdir=W --config.optim.lr=3e-4
  python train.py --config=configs/small.py:smoke   # a variant of the preset

Restarting with the same --workdir resumes from its newest intact checkpoint. Ctrl-C stops at
once (during a compile too), checkpoints the steps done since the last save and exits 130; a
second Ctrl-C exits without waiting for that save. SIGTERM (preemption) does the same and exits
0. Bad input prints one `error:` line and exits 2.
"""

import logging as std_logging
import os
import signal
import sys


def _interrupted_early(signum, frame):
  """Ctrl-C before training has anything to save (imports, config, devices): exit 130 at once.
  Python's default handler would raise KeyboardInterrupt, which jax's GC callback swallows."""
  print("interrupted", file=sys.stderr, flush=True)
  os._exit(130)


if __name__ == "__main__":  # before the imports below: loading the config imports jax
  signal.signal(signal.SIGINT, _interrupted_early)  # moe_jax.train.run installs its own
  from moe_jax import tpu_flags  # stdlib only; before jax starts the TPU backend
  tpu_flags.apply()  # weight gathers overlap compute (no effect off TPU)

from absl import app, flags, logging
from ml_collections import config_flags

from moe_jax.errors import fail as _fail, one_line as _one_line  # stdlib only: no jax yet

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")
# No default here: config_flags would load it (and apply --config.* overrides) at import time,
# outside _parse's error handling; _parse supplies it instead.
_CONFIG = config_flags.DEFINE_config_file("config", default=None, lock_config=True,
                                          help_string=f"training config file[:variant] (default {DEFAULT_CONFIG})")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints and metrics (default ./workdir/<config name>)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host); "
                                 "also on when JAX_COORDINATOR_ADDRESS is set")
_COORDINATOR_TIMEOUT = flags.DEFINE_integer("coordinator_timeout", None, "seconds to wait for the distributed "
                                            "coordinator before failing (default $MOE_JAX_COORDINATOR_TIMEOUT, "
                                            "else 300)", lower_bound=1)


def _parse(argv):
  """absl flag parsing, but a bad flag or config field is one `error:` line, not a usage dump."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  spec = next((a.split("=", 1)[1] if "=" in a else b for a, b in zip(argv[1:], argv[2:] + [""])
               if a == "--config" or a.startswith("--config=")), "")
  if not os.path.isfile(spec.partition(":")[0]):  # config_flags would defer this until first use
    _fail(f"--config={spec}: no such file {spec.partition(':')[0]!r} (the presets are configs/*.py)")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # lock_config: an override names a field that does not exist
    _fail(f"--config: no such config field {str(e).strip(chr(34))}")
  except (flags.Error, OSError, TypeError, ValueError) as e:
    _fail(_one_line(e))
  except (SyntaxError, ImportError, NameError) as e:  # the config file itself does not run
    _fail(f"--config={spec}: {type(e).__name__}: {e}")


class _QuietLibraries(std_logging.Filter):
  """orbax logs every save at INFO level through absl; keep its warnings, drop the chatter. Its
  errors keep their line but lose the traceback (a full disk made 33 of them): the run ends with
  one `error:` line naming the cause."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING


def main(argv):
  if len(argv) > 1:  # absl hands over what it did not parse; a forgotten `--` or `=` lands here
    _fail(f"unexpected argument(s) {' '.join(argv[1:])!r}: flags are --name=value (see --help)")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from moe_jax import errors, init_from, interrupts, sharding, train, workdir_lock  # after flag parsing

  try:
    sharding.initialize_distributed(enable=_DISTRIBUTED.value or None, timeout_s=_COORDINATOR_TIMEOUT.value)
  except ValueError as e:
    _fail(f"distributed: {e}")
  import jax

  try:
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdir", config.get("name", "run"))
  except OSError as e:  # config_flags defers a file that failed to load until first use
    _fail(_one_line(e))
  try:  # a file, or a read-only place: say so now, not after compiling
    errors.output_dir(workdir, "--workdir")
    # init_from sets the model's shape fields: one given on the command line must agree with its checkpoint
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    init_from.check_explicit(config, [k.removeprefix("model.") for k in overrides if k.startswith("model.")], workdir)
  except errors.UserError as e:
    _fail(str(e))
  logging.info("JAX %s, process %d of %d, %d local of %d devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)
  claimed = os.path.isfile(os.path.join(workdir, "config.json"))
  try:
    try:
      train.run(config, workdir)
    except BaseException as e:
      if not claimed and not isinstance(e, workdir_lock.Busy):  # refused: the workdir is the holder's
        _release_claim(workdir)
      raise
  except train.UserError as e:
    _fail(str(e))
  except train.Diverged as e:
    _fail(str(e), code=1)
  except train.Interrupted as e:  # already saved; a compile may still run in a helper thread: do not wait
    interrupts.exit_now(e.exit_code)
  except Exception as e:  # noqa: BLE001 - resources that ran out become one line; anything else is a bug
    msg = errors.resource_error(e, errors.TRAIN_MEMORY_HINT)
    if msg is None and isinstance(e, OSError) and e.filename is not None:  # a file the run reads or writes
      msg = errors.os_error_message(e)
    if msg is None:
      raise
    # exit_now: a failed orbax save leaves a background thread that a normal exit would wait on forever
    interrupts.exit_now(2, f"error: {msg}; {_survived(workdir)}")


def _release_claim(workdir: str):
  """A start that failed before its first checkpoint (out of memory in the first step, a compile
  error, Ctrl-C) does not claim the workdir: the corrected command must not be refused as "another
  config". Only the config.json this start wrote goes, and only while no checkpoint exists."""
  import jax

  from moe_jax import checkpoint
  try:
    if jax.process_index() == 0 and checkpoint.latest_step(workdir) is None:
      os.remove(os.path.join(workdir, "config.json"))
  except Exception:  # noqa: BLE001 - never written (failed before check_workdir), or the disk is what failed
    pass


def _survived(workdir: str) -> str:
  """What is left after a failure: the newest checkpoint, or that nothing was claimed."""
  from moe_jax import checkpoint
  try:
    step = checkpoint.latest_step(workdir)
  except Exception:  # noqa: BLE001 - the workdir itself may be what failed
    step = None
  if step is None:
    return f"no checkpoint was written and {workdir} is not claimed: rerun with the change"
  return f"checkpoint {step} in {workdir} is kept: rerun with the change to resume from it"


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
