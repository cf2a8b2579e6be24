"""AdamW with DeepSeek defaults, the learning-rate schedules and the router-bias update.

DeepSeek-V3 (section 4.2): AdamW b1=0.9, b2=0.95, weight decay 0.1, gradient clipping 1.0;
linear warmup, then either cosine decay or DeepSeek's step schedule (DeepSeek LLM / V2:
the rate drops to 31.6% of its peak after 80% of training and to 10% after 90%).
Weight decay skips norm scales and biases (rank < 2). The router's correction bias is not
a parameter at all (`router` collection); it moves by `bias_update` after every step.

Schedules in tokens seen (DeepSeek-V3 section 4.2 states its recipe in tokens). Every config may use
them; each is a tuple of stages and () (the default) keeps the step-based behaviour:
  batch_ramp           ((from_tokens, batch_size), ...): the global batch in sequences from that many
                       tokens on. Each stage runs as its own compiled step with the same microbatch
                       (batch_size / optim.grad_accum) and more accumulation steps, so a stage
                       compiles once and memory per device does not grow (see `ramp_stages`).
  optim.lr_tokens      ((until_tokens, lr, shape), ...) after the `warmup` steps: the rate goes from
                       the previous stage's end value to `lr` by `shape` ('constant': lr throughout,
                       'cosine', 'linear'); past the last stage it stays at the last lr. schedule='tokens'.
  optim.mtp_lambda_tokens, optim.bias_update_tokens   ((from_tokens, value), ...): piecewise constant.
tokens(step) is computed inside the jitted step from the step counter (float32: exact to about 1e-7
relative, a million tokens at 15T, far finer than any stage boundary).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import traverse_util

from moe_jax.errors import UserError

SCHEDULES = ("cosine", "step", "constant", "tokens")
LR_SHAPES = ("constant", "cosine", "linear")


# --- tokens seen and the batch ramp ----------------------------------------------------------
def ramp_stages(config) -> list[tuple[int, int, float]]:
  """[(first step, global batch size, tokens seen before that step)] for config.batch_ramp; one stage
  (0, batch_size, 0) without a ramp. Stage k starts at the first step whose tokens reach its from_tokens.

  The last stage's batch must be config.batch_size (the data source draws that many rows per step; a
  stage takes the first rows) and every stage's batch a multiple of the microbatch
  batch_size / optim.grad_accum, so a stage is the same microbatch with more accumulation steps.
  """
  b, seq, accum = config.batch_size, config.seq_len, config.optim.grad_accum
  ramp = tuple(tuple(r) for r in config.get("batch_ramp", ()) or ())
  if not ramp:
    return [(0, b, 0.0)]
  micro = b // max(accum, 1)
  froms = [float(t) for t, _ in ramp]
  sizes = [int(n) for _, n in ramp]
  if froms[0] != 0 or any(x >= y for x, y in zip(froms, froms[1:])):
    raise UserError(f"batch_ramp {ramp}: from_tokens must start at 0 and increase")
  if sizes[-1] != b:
    raise UserError(f"batch_ramp ends at batch {sizes[-1]} but batch_size is {b}; make the last stage batch_size")
  bad = [n for n in sizes if n <= 0 or n % micro]
  if bad:
    raise UserError(f"batch_ramp sizes {bad} are not positive multiples of the microbatch {micro} "
                    f"(batch_size {b} / optim.grad_accum {accum})")
  stages, step, tokens = [], 0, 0.0
  for k, (start, n) in enumerate(zip(froms, sizes)):
    if k:  # the previous stage runs until its tokens reach this stage's start
      prev = stages[-1][1] * seq
      steps = max(0, -(-int(start - tokens) // prev))
      step, tokens = step + steps, tokens + steps * prev
    stages.append((step, n, tokens))
  return stages


def batch_size_at(config, step: int) -> int:
  """The global batch of `step` (host side: the loop picks the compiled stage with it)."""
  return [n for first, n, _ in ramp_stages(config) if first <= step][-1]


def tokens_at(config):
  """step (traced or not) -> tokens seen before that step, float32: piecewise linear over the ramp."""
  stages, seq = ramp_stages(config), config.seq_len

  def tokens(step):
    step = jnp.asarray(step, jnp.float32)
    out = jnp.zeros((), jnp.float32)
    for first, n, before in stages:  # the last stage whose first step <= step wins
      out = jnp.where(step >= first, before + (step - first) * float(n * seq), out)
    return out

  return tokens


def _piecewise(stages, default, t):
  """((from_tokens, value), ...) at tokens t; `default` when stages is empty."""
  value = jnp.asarray(default, jnp.float32)
  for start, v in stages or ():
    value = jnp.where(t >= float(start), jnp.float32(v), value)
  return value


def mtp_lambda(config, step):
  """The MTP loss weight at `step`: optim.mtp_lambda_tokens over tokens seen, else optim.mtp_lambda."""
  stages = config.optim.get("mtp_lambda_tokens", ())
  if not stages:
    return jnp.asarray(config.optim.mtp_lambda, jnp.float32)
  return _piecewise(stages, config.optim.mtp_lambda, tokens_at(config)(step))


def lr_schedule(optim_cfg, total_steps: int, tokens=None):
  """step -> learning rate: linear warmup to optim.lr, then cosine | step | constant, or 'tokens'
  (optim.lr_tokens over tokens(step), the function tokens_at(config) returns)."""
  peak, warmup = float(optim_cfg.lr), int(optim_cfg.warmup)
  kind = optim_cfg.schedule
  if kind not in SCHEDULES:
    raise UserError(f"optim.schedule {kind!r} is not one of {SCHEDULES}")
  if kind == "tokens":
    return _token_lr(optim_cfg, tokens)
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      floor = peak * optim_cfg.min_lr_ratio
      after = floor + 0.5 * (peak - floor) * (1 + jnp.cos(jnp.pi * frac))
    elif kind == "step":
      drops = sum((frac >= m).astype(jnp.float32) for m in optim_cfg.step_milestones)
      after = peak * optim_cfg.step_factor ** drops
    else:
      after = jnp.asarray(peak, jnp.float32)
    return jnp.where(step < warmup, warm, after)

  return schedule


def _token_lr(optim_cfg, tokens):
  pieces = tuple(tuple(p) for p in optim_cfg.get("lr_tokens", ()) or ())
  if tokens is None or not pieces:
    raise UserError("optim.schedule='tokens' needs optim.lr_tokens ((until_tokens, lr, shape), ...) "
                    "and the trainer's tokens_at(config)")
  for p in pieces:
    if len(p) != 3 or p[2] not in LR_SHAPES:
      raise UserError(f"optim.lr_tokens stage {p}: give (until_tokens, lr, shape) with shape one of {LR_SHAPES}")
  peak, warmup = float(optim_cfg.lr), int(optim_cfg.warmup)
  stages, start, begin = [], 0.0, peak  # (from tokens, until tokens, lr at from, lr at until, shape)
  for until, end, shape in pieces:
    stages.append((start, float(until), begin, float(end), shape))
    start, begin = float(until), float(end)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    t = tokens(step)
    lr = jnp.asarray(pieces[-1][1], jnp.float32)  # past the last stage
    for lo, hi, a, b, shape in reversed(stages):  # the first stage whose end is past t wins
      frac = jnp.clip((t - lo) / max(hi - lo, 1.0), 0.0, 1.0)
      if shape == "constant":
        value = jnp.float32(b)
      elif shape == "cosine":
        value = b + 0.5 * (a - b) * (1 + jnp.cos(jnp.pi * frac))
      else:
        value = a + (b - a) * frac
      lr = jnp.where(t < hi, value, lr)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    return jnp.where(step < warmup, warm, lr)

  return schedule


def decay_mask(params):
  """True for matrices (weight-decayed); False for norm scales, biases and other vectors."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v.ndim >= 2 and "bias" not in k[-1] for k, v in flat.items()})


def make_optimizer(optim_cfg, total_steps: int, tokens=None) -> optax.GradientTransformation:
  """Global-norm clipping (optim.clip > 0; 0: none), then AdamW on fp32 master weights with the
  configured schedule. optax's clip with a bound of 0 would zero every update; identity keeps the
  same (empty) state, so checkpoints move between the two."""
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip) if optim_cfg.clip > 0 else optax.identity(),
      optax.adamw(lr_schedule(optim_cfg, total_steps, tokens), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask),
  )


def bias_update_speed(optim_cfg, step, tokens=None):
  """gamma at `step`: optim.bias_update_speed until optim.bias_update_until (-1: always), then 0;
  with optim.bias_update_tokens ((from_tokens, gamma), ...), that over tokens (tokens seen before step)."""
  stages = optim_cfg.get("bias_update_tokens", ())
  if stages:
    if tokens is None:
      raise UserError("optim.bias_update_tokens needs the tokens seen (tokens_at(config))")
    return _piecewise(stages, optim_cfg.bias_update_speed, tokens)
  gamma = jnp.asarray(optim_cfg.bias_update_speed, jnp.float32)
  if optim_cfg.bias_update_until >= 0:
    gamma = jnp.where(step < optim_cfg.bias_update_until, gamma, 0.0)
  return gamma


def bias_update(bias_E, counts_E, gamma):
  """Aux-loss-free balancing (DeepSeek-V3 eq. 16 ff.): raise underloaded experts' bias, lower overloaded.

  bias, counts: [E] or stacked [L, E] (scan_layers); counts are global (whole batch).
  """
  mean = counts_E.mean(-1, keepdims=True)
  return bias_E + gamma * jnp.sign(mean - counts_E)


def maxvio(counts_E):
  """MaxVio = (max count - mean count) / mean count per MoE layer: 0 is perfect balance. [..., E] -> [...].
  (The host-side report over named layers is moe_jax.run_log.maxvio.)"""
  mean = counts_E.mean(-1)
  return (counts_E.max(-1) - mean) / jnp.maximum(mean, 1e-9)
