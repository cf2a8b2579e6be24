"""DeepSeekMoE router: fp32 scores, group-limited top-k, and what balancing needs.

Routing, step by step (per token, scores over E routed experts):
  1. logits = x @ W (fp32).  scores = sigmoid(logits) (V3) or softmax(logits) (V2).
  2. choice = scores + e_score_correction_bias. The bias (aux-loss-free balancing) lives in
     the `router` collection, not `params`: the optimizer and weight decay never see it, and
     it only *selects* experts, it never weights them.
  3. Group-limited routing (n_group > 1): group score = sum of the group's top-2 choice
     scores (V3) or its max (V2); keep the topk_group best groups, set the rest to -inf.
  4. indices = top-k(choice); weights = scores[indices] (unbiased scores).
  5. norm_topk_prob: weights /= sum(weights); then weights *= routed_scaling_factor.
Balance statistics are sown: `intermediates/expert_counts` [E] (tokens routed to each
expert in this batch, for the bias update and load metrics), `intermediates/expert_scores`
[E] (mean score of each expert over the batch) and `losses/balance_loss`
(aux_loss_alpha x the sequence-wise (V3) or expert-level (V2) balance loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moe_jax.config import ModelConfig
from moe_jax.layers.common import weight


def select_experts(scores_TE: jax.Array, bias_E: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Steps 2-4: expert indices [T, X] (int32) from fp32 scores and the correction bias."""
  choice = scores_TE + bias_E
  if cfg.group_limited:
    g = cfg.n_group
    grouped = choice.reshape(*choice.shape[:-1], g, cfg.experts_per_group)
    if cfg.scoring_func == "sigmoid":
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_scores = grouped.max(-1)
    _, keep = jax.lax.top_k(group_scores, cfg.topk_group)  # [T, topk_group]
    group_mask = jnp.zeros(group_scores.shape, bool).at[
        jnp.arange(group_scores.shape[0])[:, None], keep].set(True)
    choice = jnp.where(group_mask[..., None], grouped, -jnp.inf).reshape(choice.shape)
  return jax.lax.top_k(choice, cfg.num_experts_per_tok)[1].astype(jnp.int32)


def balance_loss(scores_BSE: jax.Array, idx_BSX: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Sequence-wise (DeepSeek-V3 eq. 17-20) or expert-level (V2) balance loss, unweighted.

  f_i = E / (X * T) * #tokens choosing i;  P_i = mean over tokens of s'_i, where s' are
  the scores normalized over all experts; loss = sum_i f_i P_i, per sequence (then averaged
  over the batch) or over the whole batch.
  """
  e, x = cfg.n_routed_experts, cfg.num_experts_per_tok
  probs = scores_BSE / scores_BSE.sum(-1, keepdims=True)
  chosen = jax.nn.one_hot(idx_BSX, e, dtype=jnp.float32).sum(-2)  # [B, S, E]
  if cfg.balance_loss == "sequence":
    f = chosen.mean(1) * (e / x)  # [B, E]
    p = probs.mean(1)
    return (f * p).sum(-1).mean()
  f = chosen.mean((0, 1)) * (e / x)
  return (f * probs.mean((0, 1))).sum()


class Router(nn.Module):
  """x [B, S, D] -> (weights [B, S, X] fp32, indices [B, S, X] int32)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    e = cfg.n_routed_experts
    w = weight(self, cfg, "kernel", (cfg.hidden_size, e), ("embed", None))
    bias = self.variable("router", "e_score_correction_bias",
                         nn.with_logical_partitioning(jnp.zeros, (None,)), (e,), jnp.float32)
    bias_E = nn.unbox(bias.value).astype(jnp.float32)

    logits = jnp.einsum("bsd,de->bse", x_BSD.astype(jnp.float32), w.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    b, s = scores.shape[:2]
    idx = select_experts(scores.reshape(b * s, e), jax.lax.stop_gradient(bias_E), cfg).reshape(b, s, -1)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
      weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor

    counts = jnp.zeros((e,), jnp.float32).at[idx.reshape(-1)].add(1.0)
    self.sow("intermediates", "expert_counts", counts,
             init_fn=lambda: jnp.zeros((e,), jnp.float32), reduce_fn=lambda a, b: a + b)
    self.sow("intermediates", "expert_scores", scores.mean((0, 1)),
             init_fn=lambda: jnp.zeros((e,), jnp.float32), reduce_fn=lambda a, b: a + b)
    if cfg.aux_loss_alpha > 0:
      loss = cfg.aux_loss_alpha * balance_loss(scores, idx, cfg)
      self.sow("losses", "balance_loss", loss, init_fn=lambda: jnp.zeros((), jnp.float32),
               reduce_fn=lambda a, b: a + b)
    return weights, idx
