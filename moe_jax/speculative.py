"""Speculative decoding with the model's own multi-token-prediction module (DeepSeek-V3 section 5.4.3).

  prompt [B, S] int32 (right-padded, lengths [B]) -> tokens [B, S + n] (the layout of generate.py), stats

Each step of one jitted lax.while_loop, per row (P = the position of the newest committed token
x_P, whose latent is not in the cache yet; d_1..d_K its drafts for P+1..P+K):
  1. verify: the main model takes [x_P, d_1..d_K] at positions P..P+K in ONE call, appended to the
     latent cache (absorbed MLA, causal among the K+1 queries) -> logits and hidden states.
  2. accept: greedy keeps the longest prefix with d_j == argmax, then the model's own next token.
     Sampling accepts d_j with probability min(1, p_j(d_j) / q_j(d_j)) in order; at the first
     rejection it draws from normalize(max(p_j - q_j, 0)), after K acceptances from p_{K+1}
     (Leviathan et al. 2023): the tokens are distributed as plain sampling's. n accepted -> n + 1
     new tokens, P' = P + n + 1. The cache slots of rejected drafts (P+n+1..P+K) are stale; the
     next verify writes P'..P'+K, which covers them, before any query reads them (a query at p
     reads slots <= p, written in the same call or before).
  3. draft: MTP depth k (0-based) at position i reads the previous depth's hidden at i (depth 0:
     the main model's) and token i+k+1, and predicts token i+k+2. Depth k runs over the window
     P-D+1..P+K (D = depths used = min(num_nextn_predict_layers, K)) against its own cache, so
     the entries whose tokens were drafts last step are rewritten with committed tokens; its
     output at position P' - 1 is draft k+1. With K > D the last depth is reused on its own output
     (as vLLM does): at position P'+j it reads its own hidden at P'+j-1 and the newest draft.
     Those slots lie inside the next step's window, which rewrites them.
Rows accept different counts: every position is per row. No host sync inside the loop.

Cost per step: one main-model call over K+1 tokens, D MTP calls over K+D tokens, K-D one-token
MTP calls; the head runs on one position per MTP call.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moe_jax import generate as gen
from moe_jax.errors import UserError


def acceptance_probability(p_draft_BK: jax.Array, q_draft_BK: jax.Array) -> jax.Array:
  """min(1, p / q) at the drafted tokens: the rule that keeps the target distribution."""
  return jnp.minimum(1.0, p_draft_BK / jnp.maximum(q_draft_BK, 1e-30))


def _probs(logits, temperature, top_k, top_p):
  return jax.nn.softmax(gen.filter_logits(logits, temperature, top_k, top_p), axis=-1)


def _pick(logits_BV, rng, temperature, top_k, top_p):
  """-> (tokens [B], their distribution [B, V] fp32, or None when greedy)."""
  if temperature <= 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), None
  probs = _probs(logits_BV, temperature, top_k, top_p)
  return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32), probs


def _apply(model, variables, cache, method, *args, **kw):
  out, mutated = model.apply({**variables, "cache": cache}, *args, method=method, mutable=["cache"], **kw)
  return out, mutated["cache"]


def _draft(model, variables, cache, h_BWD, seq_BX, positions_BW, query_B, k, depths, append, rng, sampling):
  """K drafts from MTP depths 0..depths-1, then the last depth reused on its own output.

  h [B, W, D] depth 0's input hidden over the window; seq [B, W + K]: seq[:, i] is the token at
  window position i + 1 (filled with drafts past the query as they are made); query [B] the window
  index whose predictions are the drafts. -> (drafts [B, K] int32, their distributions [B, K, V]
  ([B, K, 1] zeros when greedy), cache)."""
  rows = jnp.arange(h_BWD.shape[0])
  width = h_BWD.shape[1]
  drafts, dists = [], []
  h = h_BWD
  for d in range(depths):
    tokens = jax.lax.dynamic_slice_in_dim(seq_BX, d, width, axis=1)  # token i+d+1 at window index i
    (h, logits), cache = _apply(model, variables, cache, "draft", d, tokens, h, positions_BW, query_B, append)
    tok, dist = _pick(logits, jax.random.fold_in(rng, d), *sampling)
    seq_BX = seq_BX.at[rows, query_B + d + 1].set(tok)
    drafts.append(tok)
    dists.append(dist)
  if k > depths:  # the last depth on its own output; one traced call however many (compile time)
    def chain(c, j):
      h_last, pos, tok, cache = c
      (h_last, logits), cache = _apply(model, variables, cache, "draft", depths - 1, tok[:, None], h_last,
                                       pos[:, None] + 1, jnp.zeros_like(pos), True)
      tok, dist = _pick(logits, jax.random.fold_in(rng, j), *sampling)
      return (h_last, pos + 1, tok, cache), (tok, jnp.zeros((0,)) if dist is None else dist)

    c0 = (h[rows, query_B][:, None], positions_BW[rows, query_B], drafts[-1], cache)
    (_, _, _, cache), (toks, dist) = jax.lax.scan(chain, c0, jnp.arange(depths, k))
    drafts += list(toks)
    dists += [None] * (k - depths) if dists[0] is None else list(dist)
  # Greedy drafts carry no distribution: a [B, K, 1] placeholder keeps the loop state one shape.
  q = jnp.zeros((h_BWD.shape[0], k, 1), jnp.float32) if dists[0] is None else jnp.stack(dists, 1)
  return jnp.stack(drafts, 1), q, cache


def _accept(logits_BJV, drafts_BK, q_BKV, rng, temperature, top_k, top_p):
  """Verify logits [B, K+1, V] against drafts [B, K] -> (accepted count n [B], committed [B, K+1]:
  token P+j+1 for j <= n; later entries are unused)."""
  k = drafts_BK.shape[1]
  j = jnp.arange(k + 1)
  if temperature <= 0.0:
    target = jnp.argmax(logits_BJV, axis=-1).astype(jnp.int32)  # [B, K+1]
    n = jnp.sum(jnp.cumprod(drafts_BK == target[:, :k], axis=1), axis=1)
    return n, target
  p = _probs(logits_BJV, temperature, top_k, top_p)  # [B, K+1, V]
  p_d = jnp.take_along_axis(p[:, :k], drafts_BK[..., None], -1)[..., 0]
  q_d = jnp.take_along_axis(q_BKV, drafts_BK[..., None], -1)[..., 0]
  u = jax.random.uniform(jax.random.fold_in(rng, 0), drafts_BK.shape)
  n = jnp.sum(jnp.cumprod(u < acceptance_probability(p_d, q_d), axis=1), axis=1)
  residual = jnp.maximum(p[:, :k] - q_BKV, 0.0)
  mass = residual.sum(-1, keepdims=True)
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p[:, :k])  # p == q: never rejected
  dist = jnp.concatenate([residual, p[:, k:]], axis=1)[jnp.arange(p.shape[0]), n]  # [B, V]
  final = jax.random.categorical(jax.random.fold_in(rng, 1), jnp.log(dist), axis=-1).astype(jnp.int32)
  committed = jnp.where(j[None] < n[:, None], jnp.pad(drafts_BK, ((0, 0), (0, 1))), final[:, None])
  return n, committed


def prefill(model, variables, prompt_BS, lengths_B, rng, *, max_new_tokens, k, temperature, top_k, top_p,
            pad_id, absorb, stops):
  """The prompts into a fresh latent cache (main model, then the MTP depths over the same chunk),
  the first new token and its K drafts -> the loop state (step's carry). The cache has room for
  S + max_new_tokens + K + 1 tokens: a verify writes up to position L + n - 1 + K."""
  batch, length = prompt_BS.shape
  depths = min(model.cfg.num_nextn_predict_layers, k)
  sampling = (temperature, top_k, top_p)
  total = length + max_new_tokens + k + 1
  rows = jnp.arange(batch)
  cache = gen.init_cache(model, batch, total, mtp=True)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  h, cache = _apply(model, variables, cache, "trunk", prompt_BS, positions, None, True, absorb)
  logits = model.apply(variables, h[rows, lengths_B - 1][:, None], method="logits")[:, 0]
  tok = gen.sample_logits(logits, jax.random.fold_in(rng, 0), *sampling)
  out = jnp.pad(prompt_BS, ((0, 0), (0, total - length)), constant_values=pad_id)
  out = jnp.where(jnp.arange(total)[None] < lengths_B[:, None], out, pad_id).at[rows, lengths_B].set(tok)
  seq = jnp.pad(prompt_BS[:, 1:], ((0, 0), (0, 1 + k)), constant_values=pad_id).at[rows, lengths_B - 1].set(tok)
  drafts, q, cache = _draft(model, variables, cache, h, seq, positions, lengths_B - 1, k, depths, False,
                            jax.random.fold_in(rng, 1), sampling)
  # Main hidden at positions P-depths+1..P-1 (clipped at 0) for the next MTP window.
  carry_h = h[rows[:, None], jnp.clip(lengths_B[:, None] - depths + 1 + jnp.arange(depths - 1), 0, length - 1)]
  count = jnp.ones((batch,), jnp.int32)
  stats = dict(accepted=jnp.zeros((k,), jnp.int32), steps=jnp.int32(0), tokens=jnp.int32(0))
  return dict(i=jnp.int32(2), out=out, cache=cache, tok=tok, pos=lengths_B, drafts=drafts, q=q, carry_h=carry_h,
              count=count, done=jnp.isin(tok, stops) | (count >= max_new_tokens), stats=stats)


def step(model, variables, c, rng, *, max_new_tokens, k, temperature, top_k, top_p, pad_id, absorb, stops):
  """One verify + accept + draft for every row (the while_loop's body): state -> state."""
  batch = c["tok"].shape[0]
  depths = min(model.cfg.num_nextn_predict_layers, k)
  sampling = (temperature, top_k, top_p)
  rows = jnp.arange(batch)
  step_rng = jax.random.fold_in(rng, c["i"])
  pos = c["pos"]  # P [B]
  j = jnp.arange(k + 1)
  tokens = jnp.concatenate([c["tok"][:, None], c["drafts"]], axis=1)  # [B, K+1]
  (logits, h_v), cache = _apply(model, variables, c["cache"], "verify", tokens, pos[:, None] + j, absorb)
  n, committed = _accept(logits, c["drafts"], c["q"], jax.random.fold_in(step_rng, 0), *sampling)

  # Commit committed[:n+1] at P+1.., cut at max_new_tokens and after a stop token.
  active = ~c["done"]
  valid = (j[None] <= n[:, None]) & (c["count"][:, None] + j[None] < max_new_tokens) & active[:, None]
  stop_hit = valid & jnp.isin(committed, stops)
  first_stop = jnp.where(stop_hit.any(1), jnp.argmax(stop_hit, axis=1), k + 1)
  valid = valid & (j[None] <= first_stop[:, None])
  new = valid.sum(1)
  out = c["out"].at[rows[:, None], pos[:, None] + 1 + j].set(jnp.where(valid, committed, pad_id), mode="drop")
  count = c["count"] + new
  done = c["done"] | stop_hit.any(1) | (count >= max_new_tokens)

  # Draft for the next step over the window P-depths+1..P+K (window index m <-> position P-depths+1+m).
  w = k + depths
  src = jnp.maximum(jnp.arange(w)[None], depths - 1 - pos[:, None])  # window entries before position 0
  win_pos = pos[:, None] - depths + 1 + src  # repeat position 0's entry (same slot, same values)
  h_win = jnp.concatenate([c["carry_h"], h_v], axis=1)[rows[:, None], src]
  before = c["out"][rows[:, None], jnp.clip(pos[:, None] - depths + 1 + jnp.arange(depths), 0, None)]
  ctx = jnp.concatenate([before, committed], axis=1)  # tokens at P-depths+1..P+K+1
  seq = jnp.pad(ctx[rows[:, None], src + 1], ((0, 0), (0, k)), constant_values=pad_id)
  query = depths - 1 + n
  drafts, q, cache = _draft(model, variables, cache, h_win, seq, win_pos, query, k, depths, True,
                            jax.random.fold_in(step_rng, 1), sampling)
  carry_h = h_win[rows[:, None], jnp.clip(n[:, None] + 1 + jnp.arange(depths - 1), 0, w - 1)]

  st = c["stats"]
  stats = dict(accepted=st["accepted"] + jnp.sum((n[:, None] > jnp.arange(k)[None]) & active[:, None], axis=0),
               steps=st["steps"] + active.sum(), tokens=st["tokens"] + new.sum())
  return dict(i=c["i"] + 1, out=out, cache=cache, tok=jnp.where(active, committed[rows, n], c["tok"]),
              pos=jnp.where(active, pos + n + 1, pos), drafts=drafts, q=q, carry_h=carry_h, count=count,
              done=done, stats=stats)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "k", "temperature", "top_k", "top_p",
                                             "stop_tokens", "pad_id", "absorb"))
def _generate(variables, prompt_BS, lengths_B, rng, *, model, max_new_tokens, k, temperature, top_k, top_p,
              stop_tokens, pad_id, absorb):
  kw = dict(max_new_tokens=max_new_tokens, k=k, temperature=temperature, top_k=top_k, top_p=top_p, pad_id=pad_id,
            absorb=absorb, stops=jnp.asarray(stop_tokens or (-1,), jnp.int32))
  init = prefill(model, variables, prompt_BS, lengths_B, rng, **kw)
  final = jax.lax.while_loop(lambda c: ~jnp.all(c["done"]), lambda c: step(model, variables, c, rng, **kw), init)
  return final["out"][:, :prompt_BS.shape[1] + max_new_tokens], final["stats"]


def generate_speculative(model: nn.Module, variables, prompt_tokens, max_new_tokens: int, k: int, *,
                         prompt_lengths=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         rng: Optional[jax.Array] = None, stop_tokens: Sequence[int] = (), pad_id: int = 0,
                         absorb: bool = True):
  """generate(..., speculative=k) -> (tokens [B, S + max_new_tokens], stats).

  stats (host numbers): accept_rate [k] (per draft position: the fraction of verify steps, over
  rows still generating, that accepted drafts 1..j), tokens_per_step (new tokens per row per
  verify step), verify_steps (row-steps), new_tokens.
  """
  k = int(k)
  if k < 1:
    raise UserError(f"speculative: the number of draft tokens must be >= 1, got {k}")
  if model.cfg.num_nextn_predict_layers < 1 or "mtp_0" not in variables.get("params", {}):
    raise UserError("speculative decoding needs the model's MTP weights (num_nextn_predict_layers >= 1 and "
                    "params['mtp_0']); this model has none: decode without --speculative")
  model, variables, prompt, lengths, rng = gen.prepare(model, variables, prompt_tokens, max_new_tokens,
                                                       prompt_lengths, temperature, rng)
  tokens, stats = _generate(variables, prompt, lengths, rng, model=model, max_new_tokens=int(max_new_tokens), k=k,
                            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                            stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id),
                            absorb=bool(absorb))
  return tokens, summarize(jax.device_get(stats), k)


def summarize(stats, k: int) -> dict:
  """Raw loop counters -> the report's numbers (host); `accepted` [k] keeps the raw counts (row-steps
  that accepted draft j) so that batches can be pooled (pool)."""
  steps = max(int(stats["steps"]), 1)
  accepted = [int(a) for a in np.asarray(stats["accepted"])]
  return dict(k=k, accept_rate=[a / steps for a in accepted], tokens_per_step=(sum(accepted) + int(stats["steps"])) / steps,
              verify_steps=int(stats["steps"]), new_tokens=int(stats["tokens"]), accepted=accepted)


def pool(records: Sequence[dict]) -> dict:
  """Scorer.gen_log records (one per batch) -> totals: new tokens, seconds, new tokens/s over the batches
  that did not compile (steady state; None if every batch compiled), and with drafts the acceptance
  rate per draft position and new tokens per row per verify step."""
  run = [r for r in records if not r["compiled"]]
  out = dict(batches=len(records), compiled_batches=len(records) - len(run),
             new_tokens=sum(r["new_tokens"] for r in records), seconds=round(sum(r["seconds"] for r in records), 3),
             tokens_per_s=(round(sum(r["new_tokens"] for r in run) / sum(r["seconds"] for r in run), 2)
                           if run and sum(r["seconds"] for r in run) > 0 else None))
  if records and "accepted" in records[0]:
    steps = max(sum(r["verify_steps"] for r in records), 1)
    accepted = np.sum([r["accepted"] for r in records], axis=0)
    out.update(k=records[0]["k"], accept_rate=[round(float(a) / steps, 4) for a in accepted],
               tokens_per_step=round(float(accepted.sum() + steps) / steps, 4), verify_steps=steps)
  return out
