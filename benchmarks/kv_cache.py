"""KV-cache bytes per token: MLA's latent cache vs the expanded per-head cache vs MHA.

  python benchmarks/kv_cache.py [--dtype bfloat16] [--tokens 4096]

Figures come from the cache arrays the model creates, not from a formula alone:
  latent    jax.eval_shape of the decode init at full DeepSeek-V3 size (all 61 layers, no
            memory), and a real allocation (moe_jax.generate.init_cache) of a 2-layer model
            with V3's attention dimensions, whose bytes are counted from the live arrays.
  expanded  what the expanded form would have to keep per token: per-head keys [H, N+R] and
            values [H, V], shaped by eval_shape of the module's own k_b / v_b projections
            applied to the cache arrays.
  mha       multi-head attention with the same heads and head size (2 * H * V values per
            token per layer, DeepSeek-V2's comparison), and with the model width (2 * D).
One JSON object a line: a machine record, then one record per figure.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from common import emit, machine_info  # noqa: E402
from moe_jax import config as mcfg  # noqa: E402
from moe_jax.generate import init_cache  # noqa: E402
from moe_jax.model import Transformer  # noqa: E402


def cache_shapes(cfg, batch: int, tokens: int):
  """The decode cache as ShapeDtypeStructs (abstract init: nothing is allocated)."""
  model = Transformer(cfg)
  init = lambda: model.init(jax.random.key(0), jnp.zeros((batch, tokens), jnp.int32), decode=True)  # noqa: E731
  shapes = jax.eval_shape(init)
  return nn.unbox(shapes["cache"]), nn.unbox(shapes["params"])


def nbytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def expanded_shapes(cfg, cache, params):
  """Per-head K and V that the expanded form builds from each layer's cache (eval_shape only)."""
  def expand(latent_BTK, rope_BTR, k_b, v_b):
    k_nope = jnp.einsum("btk,khn->bthn", latent_BTK, k_b.astype(latent_BTK.dtype))
    k_rope = jnp.broadcast_to(rope_BTR[:, :, None, :], (*rope_BTR.shape[:2], cfg.num_attention_heads,
                                                        cfg.qk_rope_head_dim))
    return jnp.concatenate([k_nope, k_rope], -1), jnp.einsum("btk,khv->bthv", latent_BTK,
                                                            v_b.astype(latent_BTK.dtype))
  out = []
  for i in range(cfg.num_hidden_layers):
    c, attn = cache[f"layers_{i}"]["attn"]["cache"], params[f"layers_{i}"]["attn"]
    out.append(jax.eval_shape(expand, c["latent"], c["rope_key"], attn["k_b"], attn["v_b"]))
  return out


def exact(x: float):
  """Integers stay integers (emit rounds floats to 4 significant digits)."""
  return int(x) if float(x).is_integer() else x


def report(name: str, cfg, cache, params, batch: int, tokens: int, allocated: bool):
  per = batch * tokens
  layers = cfg.num_hidden_layers
  latent = nbytes(cache) / per
  expanded = nbytes(expanded_shapes(cfg, cache, params)) / per
  item = jnp.dtype(cfg.dtype).itemsize
  mha_heads = 2 * cfg.num_attention_heads * cfg.v_head_dim * item * layers
  mha_width = 2 * cfg.hidden_size * item * layers
  common = dict(config=name, dtype=cfg.dtype, layers=layers, heads=cfg.num_attention_heads,
                kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim, batch=batch, tokens=tokens,
                allocated=allocated)
  for kind, total in (("mla_latent", latent), ("mla_expanded_per_head", expanded), ("mha_same_heads", mha_heads),
                      ("mha_model_width", mha_width)):
    emit("kv_cache_bytes_per_token", cache=kind, bytes=exact(total), bytes_per_layer=exact(total / layers),
         values_per_layer=exact(total / layers / item), ratio_to_latent=total / latent, **common)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dtype", default="bfloat16", help="cache (compute) dtype")
  p.add_argument("--tokens", type=int, default=4096, help="cache length")
  p.add_argument("--batch", type=int, default=1)
  args = p.parse_args(argv)
  emit("machine", **machine_info())

  v3 = mcfg.deepseek_v3(dtype=args.dtype)
  cache, params = cache_shapes(v3, args.batch, args.tokens)
  report("deepseek_v3", v3, cache, params, args.batch, args.tokens, allocated=False)

  # Real arrays: V3's attention dimensions in a 2-layer model small enough to allocate.
  small = mcfg.deepseek_v3(dtype=args.dtype, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8,
                           n_group=1, topk_group=1, num_nextn_predict_layers=0, vocab_size=256,
                           intermediate_size=256, moe_intermediate_size=64)
  real = init_cache(Transformer(small), args.batch, args.tokens)
  live = sum(x.nbytes for x in jax.tree.leaves(real))
  assert live == nbytes(real)
  _, small_params = cache_shapes(small, args.batch, args.tokens)
  report("deepseek_v3_attention_2_layers", small, real, small_params, args.batch, args.tokens, allocated=True)


if __name__ == "__main__":
  main()
