"""AdamW with DeepSeek defaults, the learning-rate schedules and the router-bias update.

DeepSeek-V3 (section 4.2): AdamW b1=0.9, b2=0.95, weight decay 0.1, gradient clipping 1.0;
linear warmup, then either cosine decay or DeepSeek's step schedule (DeepSeek LLM / V2:
the rate drops to 31.6% of its peak after 80% of training and to 10% after 90%).
Weight decay skips norm scales and biases (rank < 2). The router's correction bias is not
a parameter at all (`router` collection); it moves by `bias_update` after every step.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import traverse_util

from moe_jax.errors import UserError

SCHEDULES = ("cosine", "step", "constant")


def lr_schedule(optim_cfg, total_steps: int):
  """step -> learning rate: linear warmup to optim.lr, then cosine | step | constant."""
  peak, warmup = float(optim_cfg.lr), int(optim_cfg.warmup)
  kind = optim_cfg.schedule
  if kind not in SCHEDULES:
    raise UserError(f"optim.schedule {kind!r} is not one of {SCHEDULES}")
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


def decay_mask(params):
  """True for matrices (weight-decayed); False for norm scales, biases and other vectors."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v.ndim >= 2 and "bias" not in k[-1] for k, v in flat.items()})


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on fp32 master weights with the configured schedule."""
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip),
      optax.adamw(lr_schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask),
  )


def bias_update_speed(optim_cfg, step):
  """gamma at `step`: optim.bias_update_speed until optim.bias_update_until (-1: always), then 0."""
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
  (The host-side report over named layers is moe_jax.train.maxvio.)"""
  mean = counts_E.mean(-1)
  return (counts_E.max(-1) - mean) / jnp.maximum(mean, 1e-9)
