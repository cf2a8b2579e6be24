"""The model's variables as shapes and as sharded arrays: what needs the Transformer class.

sharding.py stays below the model (mesh, rules, specs); the layers import it, so anything
that builds the model to learn its variables lives here, above both.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.model import Transformer

COLLECTIONS = ("params", "router")


def _init_fn(model: nn.Module, tokens_shape: tuple[int, int], collections: Sequence[str] = COLLECTIONS):
  def init(key):
    v = model.init(key, jnp.zeros(tokens_shape, jnp.int32))
    return {c: v[c] for c in collections if c in v}
  return init


def abstract(cfg: ModelConfig, seq: int = 8):
  """Boxed ShapeDtypeStructs of params + router state (no memory; every dispatch declares the same)."""
  init = _init_fn(Transformer(cfg.replace(moe_impl="ragged")), (1, seq))
  # The key is made inside the trace: nothing runs eagerly, so this works under any mesh,
  # compile-only TPU devices included.
  return jax.eval_shape(lambda: init(jax.random.key(0)))


def abstract_sharded(model: Transformer, tokens_shape: tuple[int, int], mesh: Mesh, rules) -> dict:
  """{'params', 'router'} as ShapeDtypeStructs carrying their target shardings; nothing allocated."""
  init = _init_fn(model, tokens_shape)
  with sharding.activation_rules(mesh, rules):
    boxed = jax.eval_shape(lambda: init(jax.random.key(0)))
    shardings = nn.unbox(sharding.named_shardings(boxed, mesh, rules))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)


def init_sharded(model: nn.Module, rng: jax.Array, tokens_shape: tuple[int, int], mesh: Mesh, rules,
                 collections: Sequence[str] = COLLECTIONS):
  """Parameters born sharded: eval_shape -> specs -> jit(init, out_shardings). Returns unboxed trees."""
  init = _init_fn(model, tokens_shape, collections)
  with sharding.activation_rules(mesh, rules):
    boxed = jax.eval_shape(init, rng)
    shardings = named = sharding.named_shardings(boxed, mesh, rules)
    values = jax.jit(init, out_shardings=named)(rng)
  return nn.unbox(values), nn.unbox(shardings)
