"""Batched, jitted scoring and generation over lists of requests (used by evaluate and lm-eval).

Requests are sorted by length and cut into batches of `batch_size` rows; each batch is
padded to a length bucket (a power of two >= 16, capped at max_len) and to the full batch
size, so a whole evaluation compiles one program per bucket. On a mesh the batch is
sharded over data x fsdp x expert (batch_size is rounded up to a multiple of that size)
and tracing happens under the training rules, so evaluation runs where training ran.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from tqdm.auto import tqdm

from moe_jax import generate as gen_lib
from moe_jax import sharding, speculative

MIN_BUCKET = 16
DEFAULT_MAX_LEN = 4096  # without max_len: long-context models (163840 positions) would score giant windows


def bucket(length: int, cap: int) -> int:
  """Smallest power of two >= length (at least MIN_BUCKET), capped at cap."""
  return min(cap, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("model",))
def _score(variables, inputs_BL, targets_BL, mask_BL, *, model):
  """-> (sum log p(target) over mask [B], every masked target is the argmax [B], per-token log p [B, L])."""
  logits = model.apply(variables, inputs_BL).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logp = jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets_BL
  return (jnp.sum(jnp.where(mask_BL, token_logp, 0.0), axis=-1),
          jnp.all(greedy | ~mask_BL, axis=-1), jnp.where(mask_BL, token_logp, 0.0))


def split_context(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of context and continuation as lm-eval splits them: trailing spaces of the
  context move to the continuation, and the continuation is what encoding both adds."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = tok.encode(context + continuation)
  ctx = tok.encode(context)
  if whole[:len(ctx)] != ctx:  # a merge across the boundary: fall back to separate encodings
    return ctx, tok.encode(continuation)
  return ctx, whole[len(ctx):]


class Scorer:
  """Log-likelihoods and generations for a model; see the module docstring for batching."""

  def __init__(self, model: nn.Module, variables, *, batch_size: int = 8, max_len: Optional[int] = None,
               mesh=None, rules=None, pad_id: int = 0, progress: bool = True, speculative: int = 0):
    self.model, self.pad_id, self.progress = model, pad_id, progress
    # generate(): speculative=K drafts with the MTP module (moe_jax/speculative.py); gen_log gets
    # one record per batch (new tokens, seconds, whether it compiled, draft counters, the caller's
    # desc), gen_calls one (prompts, max_new_tokens, settings) per call, so that a report can run
    # every generation again without drafts (evaluate's --speculative_compare).
    self.speculative, self.gen_log, self.gen_calls = speculative, [], []
    self.max_len = min(max_len or DEFAULT_MAX_LEN, model.cfg.max_position_embeddings)
    self.mesh = mesh
    self.rules = rules or (sharding.mesh_rules(mesh) if mesh is not None else sharding.DEFAULT_RULES)
    dp = sharding.data_parallel_size(mesh, self.rules) if mesh is not None else 1
    self.batch_size = -(-batch_size // dp) * dp
    self.variables = {k: v for k, v in variables.items() if k in ("params", "router")}
    if mesh is not None:
      self.variables = place(model, self.variables, mesh, self.rules)

  def _context(self):
    return sharding.activation_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

  def _put(self, x):
    x = np.asarray(x)
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim, self.rules))

  def _batches(self, lengths: Sequence[int], desc: str):
    """Yields index lists, longest first, with a progress bar over requests."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bar = tqdm(total=len(order), desc=desc, disable=not self.progress, leave=False)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      yield idx
      bar.update(len(idx))
    bar.close()

  def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "score",
                    token_logprobs: bool = False):
    """requests: (context tokens, continuation tokens), context non-empty, total <= max_len + 1.

    -> list of (sum log p(continuation | context), continuation is the greedy one), and with
    token_logprobs a third item: the continuation's per-token log p.
    """
    seqs = []
    for ctx, cont in requests:
      if len(ctx) < 1 or len(cont) < 1:
        raise ValueError("loglikelihood needs at least one context and one continuation token")
      seq = list(ctx) + list(cont)
      if len(seq) - 1 > self.max_len:
        raise ValueError(f"context + continuation is {len(seq)} tokens; a window of max_len={self.max_len} "
                         f"scores at most {self.max_len + 1}")
      seqs.append((seq, len(cont)))
    results: list = [None] * len(seqs)
    for idx in self._batches([len(s) - 1 for s, _ in seqs], desc):
      width = bucket(max(len(seqs[i][0]) - 1 for i in idx), self.max_len)
      inputs = np.full((self.batch_size, width), self.pad_id, np.int32)
      targets = np.full((self.batch_size, width), self.pad_id, np.int32)
      mask = np.zeros((self.batch_size, width), bool)
      for row, i in enumerate(idx):
        seq, n_cont = seqs[i]
        n = len(seq) - 1
        inputs[row, :n], targets[row, :n] = seq[:-1], seq[1:]
        mask[row, n - n_cont:n] = True
      with self._context():
        sums, greedy, per_token = _score(self.variables, self._put(inputs), self._put(targets), self._put(mask),
                                         model=self.model)
      sums, greedy = np.asarray(sums), np.asarray(greedy)
      per_token = np.asarray(per_token) if token_logprobs else None
      for row, i in enumerate(idx):
        out = (float(sums[row]), bool(greedy[row]))
        if token_logprobs:
          n, n_cont = len(seqs[i][0]) - 1, seqs[i][1]
          out += (per_token[row, n - n_cont:n].tolist(),)
        results[i] = out
    return results

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
               desc: str = "generate") -> list[list[int]]:
    """Prompts (token lists) -> each one's new tokens, cut after its first stop token."""
    room = self.max_len - max_new_tokens
    for i, p in enumerate(prompts):
      if not 1 <= len(p) <= room:
        raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} the context "
                         f"of {self.max_len} leaves room for 1..{room}")
    self.gen_calls.append((list(map(list, prompts)), max_new_tokens, dict(temperature=temperature, top_k=top_k,
                                                                          top_p=top_p, stop_tokens=list(stop_tokens),
                                                                          seed=seed, desc=desc)))
    results: list = [None] * len(prompts)
    rng = jax.random.key(seed)
    for b, idx in enumerate(self._batches([len(p) for p in prompts], desc)):
      width = bucket(max(len(prompts[i]) for i in idx), room)
      tokens = np.full((self.batch_size, width), self.pad_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)  # filler rows: one pad token
      for row, i in enumerate(idx):
        tokens[row, :len(prompts[i])] = prompts[i]
        lengths[row] = len(prompts[i])
      kw = dict(prompt_lengths=self._put(lengths), temperature=temperature, top_k=top_k, top_p=top_p,
                rng=jax.random.fold_in(rng, b), stop_tokens=stop_tokens, pad_id=self.pad_id)
      with self._context():
        program = speculative._generate if self.speculative else gen_lib._generate
        compiled, start = program._cache_size(), time.perf_counter()
        if self.speculative:
          out, counters = speculative.generate_speculative(self.model, self.variables, self._put(tokens),
                                                           max_new_tokens, self.speculative, **kw)
        else:
          out, counters = gen_lib.generate(self.model, self.variables, self._put(tokens), max_new_tokens, **kw), {}
        out = np.asarray(out)  # waits for the device: the time below is the whole generation
        record = dict(seconds=time.perf_counter() - start, compiled=program._cache_size() != compiled, **counters)
      new = gen_lib.continuations(out, lengths, max_new_tokens, stop_tokens)
      for row, i in enumerate(idx):
        results[i] = new[row]
      self.gen_log.append(dict(record, new_tokens=sum(len(new[row]) for row in range(len(idx))),
                               outputs=new[:len(idx)], desc=desc))
    return results


def place(model: nn.Module, variables, mesh, rules):
  """Puts params/router on `mesh` with the shardings training uses (from the modules' logical axes)."""
  tokens = jnp.zeros((sharding.data_parallel_size(mesh, rules), 1), jnp.int32)
  with sharding.activation_rules(mesh, rules):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  shardings = nn.unbox(sharding.named_shardings({k: abstract[k] for k in variables}, mesh, rules))
  return jax.device_put(variables, shardings)
