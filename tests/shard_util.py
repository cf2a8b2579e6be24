"""Shared by the sharding tests and the multi-process worker: one loss, one jitted step per mesh."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, traverse_util

from moe_jax import sharding

from moe_jax import variables as model_variables
from moe_jax.config import ModelConfig, tiny
from moe_jax.model import Transformer

# SEQ 12: no activation [B, S, .] can be mistaken for an [E, D, F] expert weight in HLO checks.
BATCH, SEQ = 8, 12


def tiny_config(**kw) -> ModelConfig:
  """The tiny preset (capacity_factor 0: every dispatch, 'ep' included, is dropless)."""
  return tiny(**kw)


def tokens(cfg: ModelConfig, batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size, jnp.int32))


def host_variables(cfg: ModelConfig, seed: int = 0):
  """Unboxed variables on the default device, with a non-zero router bias (so selection uses it)."""
  return _host_variables(cfg.replace(moe_impl="ragged"), seed)  # every dispatch: the same variables


@functools.lru_cache(maxsize=None)
def _host_variables(cfg: ModelConfig, seed: int):
  @jax.jit
  def init(key):
    v = Transformer(cfg.replace(moe_impl="ragged")).init(key, jnp.zeros((1, SEQ), jnp.int32))
    v = nn.unbox({"params": v["params"], "router": v["router"]})
    v["router"] = jax.tree.map(lambda b: 0.01 * jax.random.normal(jax.random.key(seed + 7), b.shape, b.dtype),
                               v["router"])
    return v
  return init(jax.random.key(seed))


def loss_fn(params, router, tokens_BS, model: Transformer):
  """Next-token + MTP cross-entropy + balance loss -> (loss, (logits, intermediates, balance loss))."""
  (logits, mtp), state = model.apply({"params": params, "router": router}, tokens_BS, return_mtp=True,
                                     mutable=["intermediates", "losses"])
  def ce(lg, targets):
    return jnp.mean(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, targets[..., None], -1)[..., 0])
  balance = sum((jnp.sum(b) for b in jax.tree.leaves(state.get("losses", {}))), jnp.zeros((), jnp.float32))
  loss = ce(logits[:, :-1], tokens_BS[:, 1:]) + balance
  for k in range(mtp.shape[0]):  # depth k+1 predicts token i+k+2
    loss += 0.3 * ce(mtp[k][:, :-(k + 2)], tokens_BS[:, k + 2:])
  return loss, (logits, state["intermediates"], balance)


def step_fn(model: Transformer):
  """(variables, tokens) -> dict(loss, logits, grads, expert_counts, balance, dropped).

  expert_counts: {layer path: [E] counts}; dropped: assignments the dispatch dropped (all layers).
  """
  def step(variables, tokens_BS):
    (loss, (logits, inter, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], variables["router"], tokens_BS, model)
    flat = traverse_util.flatten_dict(inter, sep="/")
    counts = {k: v for k, v in flat.items() if k.endswith("expert_counts")}
    dropped = sum((v for k, v in flat.items() if k.endswith("dropped_tokens")), jnp.zeros((), jnp.float32))
    return dict(loss=loss, logits=logits, grads=grads, expert_counts=counts, balance=balance, dropped=dropped)
  return step


@functools.lru_cache(maxsize=None)
def reference(cfg: ModelConfig):
  """The single-device result (moe_impl='ragged', no mesh), as numpy (cached per process)."""
  v = host_variables(cfg)
  out = jax.jit(step_fn(Transformer(cfg.replace(moe_impl="ragged"))))(v, tokens(cfg))
  return jax.tree.map(np.asarray, out)


def sharded_step(cfg: ModelConfig, mesh, rules=sharding.DEFAULT_RULES):
  """Compiles the step on `mesh` once; returns (compiled, sharded variables, sharded tokens)."""
  abstract = model_variables.abstract(cfg)
  shardings = nn.unbox(sharding.named_shardings(abstract, mesh, rules))
  variables = jax.device_put(host_variables(cfg), shardings)
  toks = jax.device_put(tokens(cfg), sharding.batch_sharding(mesh, 2, rules))
  with sharding.activation_rules(mesh, rules):
    compiled = jax.jit(step_fn(Transformer(cfg)), in_shardings=(shardings, toks.sharding)).lower(
        variables, toks).compile()
  return compiled, variables, toks


@functools.lru_cache(maxsize=None)
def run_on_mesh(cfg: ModelConfig, shape: tuple[int, int, int, int], layout: str = "cpu"):
  """(numpy outputs, compiled HLO text) of the step on a (data, fsdp, expert, tensor) mesh; cached,
  so each mesh compiles once per test process whichever test asks first. layout: the platform whose
  default rules to use (sharding.layout_rules; 'tpu' cuts non-expert weights over one axis only)."""
  mesh = sharding.make_mesh(*shape)
  compiled, variables, toks = sharded_step(cfg, mesh, sharding.layout_rules(dict(mesh.shape), layout))
  return jax.tree.map(np.asarray, compiled(variables, toks)), compiled.as_text()


def max_rel_diff(a, b) -> float:
  """max |a - b| / max |b| (0 when both are 0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.abs(b).max()
  return float(np.abs(a - b).max() / scale) if scale else float(np.abs(a).max())


def expert_weight_all_gathers(hlo_text: str, cfg: ModelConfig, mesh) -> list[str]:
  """All-gathers in compiled HLO whose result is a whole-E expert weight ([E, D', F'] or [E, F', D'])."""
  e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
  ds = {d, d // mesh.shape["fsdp"]}
  fs = {f, f // mesh.shape["tensor"]}
  shapes = {(e, a, b) for a in ds for b in fs} | {(e, b, a) for a in ds for b in fs}
  found = []
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*\w+\[([\d,]+)\][^=]*?\sall-gather(?:-start)?\(", line)
    if m and tuple(int(v) for v in m.group(1).split(",")) in shapes:
      found.append(line.strip())
  return found


def count_op(hlo_text: str, op: str) -> int:
  return len(re.findall(rf"\s{op}(?:-start)?\(", hlo_text))
