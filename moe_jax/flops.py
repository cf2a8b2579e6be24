"""Model FLOPs from activated parameters (plus causal attention), and the peak they are measured against.

Per token, a matmul with an [a, b] weight costs 2ab FLOPs forward; training costs 3x the
forward (backward is twice the forward). Only the activated parameters count: the top-k
routed experts, the shared experts and the router, not all E experts. Attention adds
2 * H * (N + R + V) * ctx per token and layer for the QK^T and AV products, with the causal
average context ctx = (S + 1) / 2. Rematerialization is not counted (MFU, not HFU).
"""

from __future__ import annotations

import time

from moe_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_BF16 = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
             "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
             "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12}


def attention_params(cfg: ModelConfig) -> int:
  d, h, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
  q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk if cfg.q_lora_rank else d * h * qk
  kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  return q + kv + h * cfg.v_head_dim * d


def ffn_params(cfg: ModelConfig, moe: bool) -> int:
  """Activated FFN parameters of one layer: dense SwiGLU, or router + shared + top-k experts."""
  d = cfg.hidden_size
  if not moe:
    return 3 * d * cfg.intermediate_size
  f = cfg.moe_intermediate_size
  return d * cfg.n_routed_experts + 3 * d * f * (cfg.n_shared_experts + cfg.num_experts_per_tok)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
  """Forward FLOPs per token: activated matmuls of every block, the head(s), MTP and attention."""
  ctx = (seq_len + 1) / 2
  attn_ctx = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx
  head = cfg.hidden_size * cfg.vocab_size
  flops = sum(2 * (attention_params(cfg) + ffn_params(cfg, cfg.is_moe_layer(i))) + attn_ctx
              for i in range(cfg.num_hidden_layers)) + 2 * head
  if with_mtp:
    mtp_block = 2 * (attention_params(cfg) + ffn_params(cfg, cfg.is_moe_layer(cfg.num_hidden_layers))) + attn_ctx
    flops += cfg.num_nextn_predict_layers * (mtp_block + 2 * (2 * cfg.hidden_size ** 2 + head))
  return float(flops)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  return 3.0 * forward_flops_per_token(cfg, seq_len)


def activated_params(cfg: ModelConfig) -> int:
  """Parameters a token touches in the main model (embedding lookup excluded, head included)."""
  return sum(attention_params(cfg) + ffn_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)) \
      + cfg.hidden_size * cfg.vocab_size


def peak_flops(dtype: str = "bfloat16", size: int = 1024) -> tuple[float, str]:
  """(peak FLOP/s of all local devices, where the figure comes from).

  Accelerators: the vendor bf16 table by device kind. Otherwise (CPU, unknown kinds, fp32):
  a timed [size, size] matmul on one device, with the operands the model's matmuls take there
  (layers/matmul.py); on CPU the host devices share the same cores, so that one figure is the
  whole host's peak.
  """
  import jax
  import jax.numpy as jnp

  dev = jax.local_devices()[0]
  n = 1 if dev.platform == "cpu" else jax.local_device_count()
  if dtype == "bfloat16":
    for kind, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
      if dev.device_kind.startswith(kind):
        return peak * n, f"{kind} table x {n}"
  from moe_jax.layers import matmul
  op = matmul.operand_dtype(dtype)  # what the model's matmuls take here (bf16 for fp32 on an AMX CPU)
  x = jax.device_put(jnp.ones((size, size), op), dev)
  mm = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
  mm(x).block_until_ready()
  reps, t = 5, time.perf_counter()
  for _ in range(reps):
    y = mm(x)
  y.block_until_ready()
  per_device = 2 * size ** 3 * reps / (time.perf_counter() - t)
  return per_device * n, f"measured {size}^3 matmul of {jnp.dtype(op)} operands on {dev.device_kind} x {n}"
