"""moe_jax.interrupts: a signal never raises inside library code, and a blocking call in the
helper thread does not delay it (the subprocess tests in test_train_cli.py cover train.py)."""

import os
import signal
import threading
import time

import pytest

from moe_jax import interrupts


def kill_self_later(signum, seconds=0.2):
  threading.Timer(seconds, os.kill, (os.getpid(), signum)).start()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signal_stops_a_blocking_call_at_once(signum, code):
  """time.sleep stands for an XLA compile: C code that holds the main thread for minutes."""
  before = signal.getsignal(signum)
  start = time.time()
  with interrupts.Signals() as signals:
    kill_self_later(signum)
    with pytest.raises(interrupts.Interrupted) as e:
      signals.wait(time.sleep, 30)
  assert time.time() - start < 5
  assert e.value.signum == signum and e.value.exit_code == code
  assert signal.getsignal(signum) == before  # handlers restored


def test_flag_instead_of_exception_and_results_pass_through():
  with interrupts.Signals() as signals:
    assert signals.wait(lambda a, b: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):  # the helper's exception, re-raised here
      signals.wait(lambda: 1 / 0)
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.time() + 5
    while not signals.requested and time.time() < deadline:
      time.sleep(0.01)  # no KeyboardInterrupt: the handler only records the signal
    assert signals.signum == signal.SIGINT
    with pytest.raises(interrupts.Interrupted):  # a later blocking call does not start
      signals.wait(time.sleep, 30)
