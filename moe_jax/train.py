"""Training: TrainState, the pure train_step, and the resumable loop behind `python train.py`.

One step (all inside one jit with in/out shardings, the state donated):
  batch tokens [B, S+1] -> microbatches [A, B/A, S+1] (scan, A = optim.grad_accum)
  -> loss = LM CE + mtp_lambda * mean_k MTP_k CE + balance losses (sown, alpha included)
  -> grads (fp32 master weights; compute in model.dtype) -> clip -> AdamW
  -> router bias += gamma * sign(mean(counts) - counts) from the whole batch's expert counts
  -> a non-finite loss or gradient leaves params, optimizer and router untouched.
The loop dispatches step n before it reads step n-1's metrics, so the host never waits on
the device except for that one-step-old result; process 0 alone logs and shows progress.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn, struct, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import checkpoint, data, init_from, interrupts, optim, sharding, variables, workdir_lock
from moe_jax.run_log import (DROP_WARN_FRACTION, Diverged, Logger, _truncate_jsonl, layer_drops,  # noqa: F401
                             layer_loads, maxvio, nonfinite_cause)
from moe_jax.config import ModelConfig, dropless
from moe_jax.errors import UserError
from moe_jax.model import Transformer

__all__ = ["TrainState", "Trainer", "UserError", "Diverged", "Interrupted", "base_config", "run"]
Interrupted = interrupts.Interrupted


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], steps completed
  params: Any
  opt_state: Any
  router: Any  # e_score_correction_bias per MoE layer, moved outside the optimizer
  rng: jax.Array  # uint32 [2]

  def to_dict(self) -> dict:
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "router": self.router,
            "rng": self.rng}


def base_config(model: ModelConfig, name: str) -> ml_collections.ConfigDict:
  """Every training field with its default; configs/*.py start here and override."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.steps, c.batch_size, c.seq_len, c.seed = 1000, 16, 128, 0
  c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 10, 250, 4, 500
  c.nan_policy = "stop"  # 'skip': drop the update and count it | 'stop': exit naming the step
  c.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: vendor table (bf16) or a timed matmul
  # init_from: '' = random init | a Hugging Face DeepSeek-V2/V3 directory (bf16 or FP8) | a `convert --hf`
  # checkpoint | a train.py workdir or step: its weights, shape fields and MTP depths (moe_jax/init_from.py)
  c.init_from = ""
  c.model = model.to_dict()
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, min_lr_ratio=0.1, warmup=100, schedule="cosine", step_milestones=(0.8, 0.9), step_factor=0.316,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0, grad_accum=1,
      bias_update_speed=1e-3, bias_update_until=-1, mtp_lambda=0.3,
      # schedules over tokens seen, () = off (moe_jax/optim.py): lr (schedule='tokens'), MTP lambda, gamma
      lr_tokens=(), mtp_lambda_tokens=(), bias_update_tokens=()))
  c.batch_ramp = ()  # ((from_tokens, global batch), ...): a compiled step per stage (optim.ramp_stages)
  # data.path: '' = embedded stdlib corpus | 'synthetic:copy' | a `moe_jax.data prepare` directory.
  # data.document_mask: attention stops at document boundaries inside a packed row (segment ids).
  # False: plain causal attention over the whole row (the loss still skips padding), which cuDNN
  # flash attention runs without a [B, 1, S, S] mask on GPU (attention_impl='dot_product').
  c.data = ml_collections.ConfigDict(dict(path="", tokenizer="byte", val_fraction=0.01, document_mask=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                          dcn_expert=1, dcn_tensor=1, rules=()))
  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=3, async_save=True))
  c.debug = ml_collections.ConfigDict(dict(nan_at_step=-1))  # test hook: poison the loss of that step
  return c


# --- the step ------------------------------------------------------------------------------
def targets(batch: dict, depth: int):
  """Targets [B, S] (token i+depth+1) and mask [B, S]: False where the target leaves the document or the
  window, or where the batch's loss_mask [B, S+1] (instruction data: prompt tokens 0) is 0 at the target."""
  tokens, seg = batch["tokens"], batch["segment_ids"]
  s = tokens.shape[1] - 1
  pad = ((0, 0), (0, depth))
  tgt = jnp.pad(tokens[:, depth + 1:], pad)
  ok = seg[:, depth + 1:] == seg[:, :s - depth]
  if "loss_mask" in batch:  # the mask of the TARGET token, for the LM (depth 0) and every MTP depth
    ok = ok & (batch["loss_mask"][:, depth + 1:] != 0)
  return tgt, jnp.pad(ok, pad)


@jax.custom_vjp
def token_cross_entropy(logits_XV, tgt_X):
  """-log softmax(logits)[tgt] per position, fp32 [...]; logits in any float dtype.

  Only the sum of exponentials reads the logits in fp32; the max and the target's logit are
  exact in the logits' own dtype. An fp32 copy of the logits read by several reductions is
  what XLA may keep whole (4.24 GB at V3's vocabulary, 8 layers, 2 x v5p-512), fusing it away in
  some layouts and not in others. Its own VJP for the same reason: the backward keeps the logits
  as they came and the fp32 logsumexp [...], and computes d logits = (exp(logits - lse) -
  onehot(tgt)) * g in one elementwise pass, cast back to the logits' dtype.
  """
  return _token_ce_fwd(logits_XV, tgt_X)[0]


def _token_ce_fwd(logits_XV, tgt_X):
  top_X = logits_XV.max(-1).astype(jnp.float32)
  top_X = jnp.where(jnp.isfinite(top_X), top_X, 0.0)  # all -inf: no shift (as jax.nn.logsumexp)
  lse_X = top_X + jnp.log(jnp.sum(jnp.exp(logits_XV.astype(jnp.float32) - top_X[..., None]), -1))
  label_X = jnp.take_along_axis(logits_XV, tgt_X[..., None], -1)[..., 0].astype(jnp.float32)
  return lse_X - label_X, (logits_XV, tgt_X, lse_X)


def _token_ce_bwd(res, g_X):
  logits_XV, tgt_X, lse_X = res
  p_XV = jnp.exp(logits_XV.astype(jnp.float32) - lse_X[..., None])
  is_tgt = jnp.arange(logits_XV.shape[-1]) == tgt_X[..., None]
  return ((p_XV - is_tgt) * g_X[..., None]).astype(logits_XV.dtype), None


token_cross_entropy.defvjp(_token_ce_fwd, _token_ce_bwd)


def cross_entropy(logits_BSV, tgt_BS, ok_BS):
  """(sum of masked CE, number of correct predictions), fp32, summed over B and S: scalars, or
  one per depth for stacked [K, B, S, V] logits.

  Correct iff the target's logit beats every other logit strictly: a tie is wrong (after a
  collapse every logit is equal, and that is not 100% accuracy), and so is NaN. A max reduction
  over the other logits, like logsumexp's, instead of an argmax pass over [B, S, vocab]; both
  compare in the logits' own dtype (exact).
  """
  ce = token_cross_entropy(logits_BSV, tgt_BS)
  logits = jax.lax.stop_gradient(logits_BSV)
  label = jnp.take_along_axis(logits, tgt_BS[..., None], -1)[..., 0]
  is_tgt = jnp.arange(logits.shape[-1]) == tgt_BS[..., None]
  others = jnp.where(is_tgt, -jnp.inf, logits).max(-1)
  correct = (label > others) & ok_BS
  return jnp.sum(ce * ok_BS, (-2, -1)), jnp.sum(correct, (-2, -1)).astype(jnp.float32)


def expert_counts(intermediates) -> dict[str, jax.Array]:
  """{module path of the router: tokens per expert [E] (or [L, E] scanned)}, from sown intermediates."""
  flat = traverse_util.flatten_dict(dict(intermediates))
  return {"/".join(k[:-1]): v for k, v in flat.items() if k[-1] == "expert_counts"}


def dropped_tokens(intermediates) -> dict[str, jax.Array]:
  """{module path of the MoE layer: routed assignments its dispatch dropped (scalar, or [L] scanned)};
  only dispatches that can drop ('capacity', 'ep') sow it."""
  flat = traverse_util.flatten_dict(dict(intermediates))
  return {"/".join(k[:-1]): v for k, v in flat.items() if k[-1] == "dropped_tokens"}


def attention_segments(batch: dict, document_mask: bool):
  """The model's segment ids (inputs: all but the last column) or None for plain causal attention."""
  return batch["segment_ids"][:, :-1] if document_mask else None


def make_train_step(model: Transformer, config, tx: optax.GradientTransformation, schedule,
                    param_shardings=None, accum=None):
  """train_step(state, batch) -> (state, metrics); pure, for jax.jit.

  param_shardings: the parameters' shardings. Gradients are constrained to them as soon as
  they exist, so the partitioner reduces each device's shard and holds gradients sharded like
  the parameters (ZeRO-3) rather than whole. (How XLA lowers that reduction is its choice:
  libtpu 0.0.42 compiles it to all-reduce + dynamic-slice, BENCHMARKS.md.)
  accum: microbatches per step (default optim.grad_accum; a batch_ramp stage uses more).
  """
  mcfg = model.cfg
  document_mask = config.data.get("document_mask", True)
  n_mtp, accum = mcfg.num_nextn_predict_layers, accum or config.optim.grad_accum
  nan_at = config.debug.nan_at_step
  tokens_at = optim.tokens_at(config)  # step -> tokens seen, for the token schedules

  def loss_fn(params, router, batch, norms, step):
    tokens = batch["tokens"]
    # [1 + n_mtp, B, S, V]: the main head, then each MTP depth; one loss over the stack
    logits, mut = model.apply({"params": params, "router": router}, tokens[:, :-1], batch["positions"][:, :-1],
                              attention_segments(batch, document_mask), method="all_logits",
                              mutable=["intermediates", "losses"])
    tgt, ok = (jnp.stack(x) for x in zip(*(targets(batch, k) for k in range(n_mtp + 1))))
    ce, correct = cross_entropy(logits, tgt, ok)
    lm, correct = ce[0] / norms[0], correct[0]
    mtp = sum(ce[k] / norms[k] for k in range(1, n_mtp + 1))
    mtp = mtp / n_mtp if n_mtp else jnp.zeros((), jnp.float32)
    # Scanned layers sow one loss per layer ([L] leaves): sum them all.
    balance = sum((jnp.sum(x) for x in jax.tree.leaves(mut.get("losses", {}))), jnp.zeros((), jnp.float32)) / accum
    loss = lm + optim.mtp_lambda(config, step) * mtp + balance  # lambda: a constant or over tokens seen
    if nan_at >= 0:  # test hook (debug.nan_at_step): NaN loss and gradients at that 1-based step
      loss = loss * jnp.where(step + 1 == nan_at, jnp.nan, 1.0)
    aux = {"loss": loss, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance, "correct": correct,
           "counts": expert_counts(mut.get("intermediates", {})),
           "dropped": dropped_tokens(mut.get("intermediates", {}))}
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads_and_aux(params, router, batch, norms, step):
    if accum == 1:
      (_, aux), grads = grad_fn(params, router, batch, norms, step)
      return grads, aux
    # Row r goes to microbatch r % A, so every microbatch keeps the batch's layout over devices.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    shapes = jax.eval_shape(lambda mb: grad_fn(params, router, mb, norms, step), jax.tree.map(lambda x: x[0], micro))
    (_, aux0), g0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, mb):
      (_, aux), grads = grad_fn(params, router, mb, norms, step)
      return jax.tree.map(jnp.add, carry, (grads, aux)), None

    (grads, aux), _ = jax.lax.scan(body, (g0, aux0), micro)
    return grads, aux

  def train_step(state: TrainState, batch: dict):
    norms = [jnp.maximum(jnp.sum(targets(batch, k)[1]), 1).astype(jnp.float32) for k in range(n_mtp + 1)]
    grads, aux = grads_and_aux(state.params, state.router, batch, norms, state.step)
    if param_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)
    def update(grads, params, opt_state, router):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      gamma = optim.bias_update_speed(config.optim, state.step, tokens_at(state.step))
      flat = traverse_util.flatten_dict(dict(router))
      router = traverse_util.unflatten_dict({
          k: optim.bias_update(v, aux["counts"]["/".join(k[:-1])], gamma) if "/".join(k[:-1]) in aux["counts"] else v
          for k, v in flat.items()}) if flat else router
      return params, opt_state, router

    def skip(grads, params, opt_state, router):
      return params, opt_state, router

    params, opt_state, router = jax.lax.cond(ok, update, skip, grads, state.params, state.opt_state, state.router)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, router=router,
                           rng=jax.random.split(state.rng)[0])
    metrics = {k: aux[k] for k in ("loss", "lm_loss", "mtp_loss", "balance_loss")}
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step), accuracy=aux["correct"] / norms[0],
                   nonfinite=~ok, expert_counts=aux["counts"], dropped_tokens=aux["dropped"])
    return new_state, metrics

  return train_step


def make_eval_step(model: Transformer, document_mask: bool = True):
  """eval_step(params, router, batch) -> ((sum CE, correct, targets), {router path: expert counts [E] | [L, E]})."""
  def eval_step(params, router, batch):
    logits, mut = model.apply({"params": params, "router": router}, batch["tokens"][:, :-1],
                              batch["positions"][:, :-1], attention_segments(batch, document_mask),
                              mutable=["intermediates"])
    tgt, ok = targets(batch, 0)
    ce, correct = cross_entropy(logits, tgt, ok)
    return (ce, correct, jnp.sum(ok).astype(jnp.float32)), expert_counts(mut.get("intermediates", {}))
  return eval_step


# --- setup ---------------------------------------------------------------------------------
class Trainer:
  """Model, mesh, optimizer, shardings and the compiled step for one config."""

  def __init__(self, config, devices=None):
    """devices: the mesh's devices (default: all); compile-only TPU devices for moe_jax.aot."""
    self.config = config
    self.mcfg = mcfg = checkpoint.model_config(config)
    b, s, accum = config.batch_size, config.seq_len, config.optim.grad_accum
    if config.nan_policy not in ("skip", "stop"):
      raise UserError(f"nan_policy {config.nan_policy!r} is not 'skip' or 'stop'")
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "log_every"):
      if config[name] < 1:
        raise UserError(f"{name}={config[name]} must be >= 1")
    if not config.optim.lr > 0 or config.eval_every < 0:  # a negative rate would ascend the loss
      raise UserError(f"optim.lr={config.optim.lr} must be > 0 and eval_every={config.eval_every} >= 0 (0: off)")
    if not config.optim.clip >= 0:  # a negative bound flips every gradient: ascent
      raise UserError(f"optim.clip={config.optim.clip} must be > 0 (the global-norm bound) or 0 (no clipping)")
    if config.optim.warmup < 0:
      raise UserError(f"optim.warmup={config.optim.warmup} must be >= 0 steps (0: no warmup)")
    if config.eval_every and config.eval_batches < 1:  # 0 batches would log a val_loss of 0.0
      raise UserError(f"eval_batches={config.eval_batches} must be >= 1 when eval_every={config.eval_every} > 0; "
                      "or set eval_every=0 to turn evaluation off")
    if s > mcfg.max_position_embeddings:  # eval and generation refuse positions past it
      raise UserError(f"seq_len={s} is longer than model.max_position_embeddings={mcfg.max_position_embeddings}; "
                      "lower --config.seq_len or raise --config.model.max_position_embeddings")
    if accum < 1 or b % accum:
      raise UserError(f"batch_size {b} is not divisible by optim.grad_accum {accum}")
    m = config.mesh
    try:
      self.mesh = sharding.make_mesh(m.data, m.fsdp, m.expert, m.tensor, dcn_data=m.dcn_data, dcn_fsdp=m.dcn_fsdp,
                                     dcn_expert=m.dcn_expert, dcn_tensor=m.dcn_tensor, devices=devices)
      self.rules = sharding.mesh_rules(self.mesh, m.rules)
      sharding.validate(mcfg, b // accum, self.mesh, self.rules, variables.abstract(mcfg))
      self.rows = sharding.process_rows(self.mesh, b, self.rules)  # the batch rows this process feeds
    except ValueError as e:
      raise UserError(str(e)) from None
    self.model = Transformer(mcfg)
    self.stages = optim.ramp_stages(config)  # [(first step, batch, tokens before)]; validates batch_ramp
    tokens = optim.tokens_at(config)
    self.schedule = optim.lr_schedule(config.optim, config.steps, tokens)
    self.tx = optim.make_optimizer(config.optim, config.steps, tokens)

    abstract = variables.abstract_sharded(self.model, (b // accum, s), self.mesh, self.rules)
    sharding_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    replicated = NamedSharding(self.mesh, P())
    params = abstract["params"]
    opt_abstract = jax.eval_shape(self.tx.init, params)
    opt_sharding = optax.tree_map_params(self.tx, lambda _, sh: sh, opt_abstract, sharding_of(params),
                                         transform_non_params=lambda _: replicated)
    self.state_sharding = TrainState(step=replicated, params=sharding_of(params), opt_state=opt_sharding,
                                     router=sharding_of(abstract.get("router", {})), rng=replicated)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_abstract,
                        router=abstract.get("router", {}), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    self.abstract_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                       shapes, self.state_sharding)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    self.batch_sharding = sharding.batch_sharding(self.mesh, 2, self.rules)
    self._step_fns, self._eval_fn = {}, None

  @property
  def step_fn(self):
    """train_step jitted once with in/out shardings and the state donated (compiled on first use)."""
    return self.step_fn_for(self.config.batch_size)

  def step_fn_for(self, b: int):
    """The compiled step for global batch b (a batch_ramp stage): the same microbatch
    (batch_size / optim.grad_accum) with b / microbatch accumulation steps; compiled once per b."""
    if b not in self._step_fns:
      s = self.config.seq_len
      accum = self.config.optim.grad_accum * b // self.config.batch_size
      abstract_batch = {k: jax.ShapeDtypeStruct((b, s + 1), jnp.int32, sharding=self.batch_sharding)
                        for k in data.batch_keys(self.config.data)}
      with sharding.activation_rules(self.mesh, self.rules):
        step = jax.jit(make_train_step(self.model, self.config, self.tx, self.schedule, self.state_sharding.params,
                                       accum=accum),
                       in_shardings=(self.state_sharding, self.batch_sharding),
                       out_shardings=(self.state_sharding, None), donate_argnums=0)
        self._step_fns[b] = step.lower(self.abstract_state, abstract_batch).compile()
    return self._step_fns[b]

  def init_state(self, seed: int) -> TrainState:
    """A fresh state, born sharded (jit with out_shardings; nothing is built on one device)."""
    def init(key):
      k_model, k_state = jax.random.split(key)
      v = self.model.init(k_model, jnp.zeros((1, 8), jnp.int32))
      v = nn.unbox(v)
      params = v["params"]
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                        router=v.get("router", {}), rng=k_state)
    with sharding.activation_rules(self.mesh, self.rules):
      return jax.jit(init, out_shardings=self.state_sharding)(jax.random.PRNGKey(seed))

  def batch(self, source, split: str, step: int, b: int = 0) -> dict:
    """The global batch of `step` as sharded jax.Arrays; this process reads only its rows.
    b: a smaller global batch (a batch_ramp stage): the first b rows of the full one."""
    b = b or self.config.batch_size
    rows = self.rows if b == self.config.batch_size else sharding.process_rows(self.mesh, b, self.rules)
    local = source.rows(split, step, rows)
    return sharding.global_batch(local, self.mesh, rows, b, self.rules)

  def evaluate(self, state: TrainState, source, num_batches: int) -> dict:
    """Validation LM loss, accuracy and MaxVio_global over the first num_batches val batches (fixed, so
    comparable). MaxVio_global: expert counts summed over all those batches, then maxvio per layer."""
    if self._eval_fn is None:
      with sharding.activation_rules(self.mesh, self.rules):
        # Validation never drops (config.dropless), whatever capacity training uses.
        self._eval_fn = jax.jit(make_eval_step(Transformer(dropless(self.mcfg)),
                                               self.config.data.get("document_mask", True)))
    totals, counts = np.zeros(3), {}
    with sharding.activation_rules(self.mesh, self.rules):
      for i in range(num_batches):
        sums, c = jax.device_get(self._eval_fn(state.params, state.router, self.batch(source, "val", i)))
        totals += np.asarray(sums)
        counts = {k: counts.get(k, 0) + np.asarray(v, np.float64) for k, v in c.items()}
    out = {"val_loss": totals[0] / max(totals[2], 1), "val_accuracy": totals[1] / max(totals[2], 1)}
    if counts:
      layers, mean = maxvio(layer_loads(counts))
      out.update(val_maxvio=mean, val_maxvio_layers=layers)
    return out


# --- the loop ------------------------------------------------------------------------------
def _init_from_state(trainer: Trainer, origin, seed: int) -> tuple[TrainState, dict]:
  """(step-0 state with init_from's params and router state, a fresh optimizer; what was read)."""
  abstract = {"params": trainer.abstract_state.params, "router": trainer.abstract_state.router}
  values, info = init_from.load_variables(origin, trainer.mcfg, abstract, trainer.mesh, trainer.rules)

  def fresh(params, router, key):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=trainer.tx.init(params),
                      router=router, rng=jax.random.split(key)[1])  # the rng a random init would have
  state = jax.jit(fresh, out_shardings=trainer.state_sharding, donate_argnums=(0, 1))(
      values["params"], values["router"], jax.random.PRNGKey(seed))
  return state, info


def _setup(config, workdir: str):
  """Everything before the first step -> (trainer, source, checkpointer, start, state); state is
  None when the workdir already holds the final step. Runs in a helper thread (run).
  With config.init_from, trainer.config is the run's config with the checkpoint's shape fields."""
  config, origin = init_from.resolve(config, workdir)  # config files and headers only; None: random init
  trainer = Trainer(config)  # validates config, mesh and shapes; compiles nothing yet
  source = data.make_source(config.data, config.seq_len, config.batch_size, config.seed, trainer.mcfg.vocab_size)
  if (config.data.path not in ("", "synthetic:copy")
      and not data.same_tokenizer(source.meta.get("tokenizer"), config.data.tokenizer)):
    raise UserError(f"data.path {config.data.path!r} was prepared with tokenizer {source.meta.get('tokenizer')!r} "
                    f"but data.tokenizer is {config.data.tokenizer!r}; set --config.data.tokenizer to match")
  abstract = trainer.abstract_state.to_dict()
  loaded = None
  if origin is not None and checkpoint.latest_step(workdir) is None:
    # The weights load before a new workdir is claimed (config.json, checkpoints/): a bad init_from leaves
    # it as it was. Another run's workdir, or one with foreign files, is refused first, before any read.
    if os.path.isfile(os.path.join(workdir, "config.json")) or checkpoint.foreign_entries(workdir):
      checkpoint.check_workdir(workdir, config.to_dict(), abstract)
    loaded = _init_from_state(trainer, origin, config.seed)
  checkpoint.check_workdir(workdir, config.to_dict(), abstract)
  latest = checkpoint.latest_step(workdir)  # read-only: a finished run is left exactly as it is
  if latest is not None and latest >= config.steps:
    return trainer, source, None, latest, None
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.max_to_keep, config.checkpoint.async_save)
  try:
    # The newest step that reads back whole (config item and state); damaged newer ones are named and set aside.
    start, state = ckpt.restore_intact(lambda step: (ckpt.config(step), ckpt.restore(step, abstract))[1])
    if start is not None:
      state = TrainState(**state)
    elif origin is not None:  # step 0 from init_from's weights (a run with checkpoints resumes above instead)
      state, info = loaded or _init_from_state(trainer, origin, config.seed)
      init_from.record(workdir, origin, info)
    else:
      state = trainer.init_state(config.seed)
    start = start or 0
    logging.info("%s: %.2fM parameters, mesh %s, %d processes, steps %d..%d, workdir %s; compiling the step",
                 config.name, trainer.num_params / 1e6, dict(trainer.mesh.shape), jax.process_count(), start,
                 config.steps, workdir)
    trainer.step_fn_for(optim.batch_size_at(config, start))  # compiles here, where a Ctrl-C does not wait
  except BaseException:
    ckpt.close()
    raise
  return trainer, source, ckpt, start, state


def run(config, workdir: str) -> dict:
  """Trains config.steps steps in workdir, resuming from its newest intact checkpoint.

  Returns {"step": steps completed, "state": the TrainState (None if the workdir already held
  the final step)}. SIGINT (Ctrl-C) / SIGTERM: saves the steps completed since the last
  checkpoint, then raises interrupts.Interrupted (exit_code 130 / 0); setup and compiles run in
  a helper thread, so a signal during them stops the run at once (nothing to save yet).
  One writer per workdir (workdir_lock): a second run on it stops at once, naming the holder.
  Parameters that turned NaN/inf are never saved: Diverged, the checkpoints on disk kept.
  """
  checkpoint.check_max_to_keep(config.checkpoint.max_to_keep)  # before anything is written or deleted

  def save(step: int, state: TrainState):
    try:
      ckpt.save(step, state.to_dict(), cfg_dict)
    except checkpoint.NonFinite as e:
      raise Diverged(f"{e}; nan_policy={config.nan_policy!r}") from None

  with interrupts.Signals() as signals, workdir_lock.WorkdirLock(workdir):
    try:
      trainer, source, ckpt, start, state = signals.wait(_setup, config, workdir)
    except interrupts.Interrupted as e:
      logging.warning("%s before the first step: nothing to save, exiting", _signal_name(e.signum))
      raise
    config = trainer.config  # with init_from: the checkpoint's shape fields (saved with every checkpoint)
    if state is None:
      logging.warning("workdir %s already holds the final checkpoint (step %d, config steps=%d): nothing to train; "
                      "raise --config.steps to continue this run", workdir, start, config.steps)
      return {"step": start, "state": None}
    cfg_dict = config.to_dict()
    logger = Logger(workdir, config, trainer, start)
    pending, done, saved, preempted = None, start, start, False
    try:
      for step in range(start, config.steps):
        if signals.requested:
          break
        b = optim.batch_size_at(config, step)  # batch_ramp: each stage's step compiles once, on first use
        state, metrics = trainer.step_fn_for(b)(state, trainer.batch(source, "train", step, b))
        if pending is not None:
          logger.record(*pending)
        pending, done = (step + 1, metrics), step + 1
        preempted = jax.process_count() > 1 and ckpt.manager.reached_preemption(done)
        stop = signals.requested or preempted
        if done % config.checkpoint_every == 0 or done == config.steps or stop:
          save(done, state)
          saved = done
        if config.eval_every and done % config.eval_every == 0 and not stop:
          try:
            logger.eval(done, signals.wait(trainer.evaluate, state, source, config.eval_batches))
          except interrupts.Interrupted:
            stop = True
        if stop:
          break
      if pending is not None:
        logger.record(*pending)
      if signals.requested and done > saved:  # the signal came during an eval
        save(done, state)
        saved = done
    finally:
      ckpt.close()
      logger.close()
    if signals.requested:
      what = f"checkpoint at step {done} written" if done > start else (
          f"no step completed since the checkpoint at step {start}" if start else "no step completed, nothing saved")
      logging.warning("%s: %s, exiting", _signal_name(signals.signum), what)
      raise interrupts.Interrupted(signals.signum)
    if preempted:
      logging.warning("preempted: checkpoint at step %d written, exiting", done)
    elif logger.latest is not None:
      r = logger.latest
      logging.info("%s: finished step %d of %d, lm_loss %.4f (total loss %.4f, accuracy %.3f); checkpoint %s",
                   config.name, done, config.steps, r["lm_loss"], r["loss"], r["accuracy"],
                   os.path.join(ckpt.directory, str(saved)))
  return {"step": done, "state": state}


def _signal_name(signum: int) -> str:
  return "interrupted (Ctrl-C)" if signum == signal.SIGINT else "preempted (SIGTERM)"
