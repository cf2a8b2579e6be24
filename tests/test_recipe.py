"""DeepSeek-V3's training recipe (section 4.2) as config: every value at named token counts, and the
batch ramp's compiled stages (a warm stage never recompiles)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import checkpoint, data, optim, train
from moe_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 1e9, 1e12


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def v3():
  return load("deepseek_v3")


def step_at(c, tokens: float) -> int:
  """The first step whose tokens seen (before it) reach `tokens`."""
  seen = optim.tokens_at(c)
  lo, hi = 0, c.steps + 1
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (mid + 1, hi) if float(seen(mid)) < tokens else (lo, mid)
  return lo


def test_init_std_alpha_and_length(v3):
  m = checkpoint.model_config(v3)
  assert m.initializer_range == 0.006
  assert m.aux_loss_alpha == 1e-4 and m.balance_loss == "sequence"
  seen = optim.tokens_at(v3)
  assert float(seen(v3.steps - 1)) < 14.8 * T <= float(seen(v3.steps))  # 14.8T tokens in all


@pytest.mark.parametrize("tokens,batch", [(0, 3072), (117 * B, 3072), (118 * B, 6144), (300 * B, 9216),
                                          (468 * B, 12288), (470 * B, 15360), (10 * T, 15360)])
def test_batch_ramp(v3, tokens, batch):
  assert optim.batch_size_at(v3, step_at(v3, tokens)) == batch
  assert v3.batch_size == 15360 and v3.batch_size // v3.optim.grad_accum == 1024  # one microbatch throughout


@pytest.mark.parametrize("tokens,lr", [
    (1 * T, 2.2e-4), (9.99 * T, 2.2e-4),
    (10 * T, 2.2e-4), (12.15 * T, (2.2e-4 + 2.2e-5) / 2), (14.3 * T - 1e9, 2.2e-5),  # cosine over 4.3T
    (14.3 * T + 1e9, 2.2e-5), (14.632 * T, 2.2e-5),  # 333B at 2.2e-5
    (14.634 * T, 7.3e-6), (14.8 * T, 7.3e-6)])  # the last 167B
def test_lr_over_tokens(v3, tokens, lr):
  # the schedule as a function of tokens (warmup done) ...
  sched = optim.lr_schedule(v3.optim, v3.steps, lambda step: jnp.float32(tokens))
  assert float(sched(5000)) == pytest.approx(lr, rel=2e-3)
  # ... and through the real step -> tokens map (a step is 63M tokens: a looser tolerance at the cosine)
  seen = optim.tokens_at(v3)
  sched = optim.lr_schedule(v3.optim, v3.steps, seen)
  step = step_at(v3, tokens)
  want = float(optim.lr_schedule(v3.optim, v3.steps, lambda s: seen(step))(step))
  assert float(sched(step)) == pytest.approx(want, rel=1e-6) and want == pytest.approx(lr, rel=2e-3)


def test_lr_warmup_in_steps(v3):
  sched = optim.lr_schedule(v3.optim, v3.steps, optim.tokens_at(v3))
  assert float(sched(0)) == pytest.approx(2.2e-4 / 2000)
  assert float(sched(999)) == pytest.approx(2.2e-4 / 2)
  assert float(sched(1999)) == pytest.approx(2.2e-4) and float(sched(2000)) == pytest.approx(2.2e-4)


@pytest.mark.parametrize("tokens,lam", [(0, 0.3), (9.99 * T, 0.3), (10.01 * T, 0.1), (14.7 * T, 0.1)])
def test_mtp_lambda_over_tokens(v3, tokens, lam):
  assert float(optim.mtp_lambda(v3, step_at(v3, tokens))) == pytest.approx(lam)


@pytest.mark.parametrize("tokens,gamma", [(0, 1e-3), (14.29 * T, 1e-3), (14.31 * T, 0.0), (14.8 * T, 0.0)])
def test_bias_update_speed_over_tokens(v3, tokens, gamma):
  step = step_at(v3, tokens)
  assert float(optim.bias_update_speed(v3.optim, step, optim.tokens_at(v3)(step))) == pytest.approx(gamma)


def test_token_schedules_default_off_and_bad_ramps_named():
  c = load("tiny", "test")
  assert float(optim.mtp_lambda(c, 10**6)) == pytest.approx(c.optim.mtp_lambda)
  assert optim.ramp_stages(c) == [(0, c.batch_size, 0.0)]
  c.batch_ramp = ((0, 2), (100, 8))
  with pytest.raises(UserError, match="batch_ramp ends at batch 8 but batch_size is 4"):
    optim.ramp_stages(c)
  c.batch_ramp, c.optim.grad_accum = ((0, 3), (100, 4)), 2
  with pytest.raises(UserError, match=r"not positive multiples of the microbatch 2"):
    optim.ramp_stages(c)
  c.batch_ramp, c.optim.schedule = (), "tokens"
  with pytest.raises(UserError, match="optim.lr_tokens"):
    optim.lr_schedule(c.optim, 10, optim.tokens_at(c))


def test_ramp_step_does_not_recompile_once_warm():
  c = load("tiny", "test")
  c.batch_size, c.optim.grad_accum, c.seq_len = 16, 2, 16  # microbatch 8: a row per host device
  c.batch_ramp = ((0, 8), (2 * 8 * c.seq_len, 16))  # 2 steps of 8 sequences, then 16
  c.optim.mtp_lambda_tokens = ((0, 0.3), (2 * 8 * c.seq_len, 0.0))
  trainer = train.Trainer(c)
  assert [(f, b) for f, b, _ in trainer.stages] == [(0, 8), (2, 16)]
  source = data.make_source(c.data, c.seq_len, c.batch_size, c.seed, trainer.mcfg.vocab_size)
  state = trainer.init_state(0)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  per_step = []
  for step in range(4):
    b = optim.batch_size_at(c, step)
    batch = trainer.batch(source, "train", step, b)
    before = len(compiles)
    fn = trainer.step_fn_for(b)
    state, m = fn(state, batch)
    jax.block_until_ready(m["loss"])
    per_step.append(len(compiles) - before)
    if step in (0, 2):  # a stage's first step compiles its program ...
      assert per_step[-1] >= 1, per_step
    else:  # ... and every later step of the stage reuses it
      assert per_step[-1] == 0, per_step
    assert int(state.step) == step + 1 and np.isfinite(float(m["loss"]))
    assert float(m["mtp_loss"]) > 0
  assert sorted(trainer._step_fns) == [8, 16]
