"""DeepSeek-V3 (671B total, 37B active) with the paper's training recipe and a suggested mesh.

DeepSeek-V3 section 4.2, each a field (tests/test_recipe.py checks each value at named token counts):
  init std 0.006 (model.initializer_range); AdamW (0.9, 0.95, wd 0.1), clip 1.0, seq_len 4096;
  batch ramp 3072 -> 15360 sequences over the first 469B tokens (batch_ramp: 3072, 6144, 9216, 12288
  in four equal token spans, 15360 from 469B on), 14.8T tokens in all (steps);
  lr (schedule='tokens'): linear warmup over 2000 steps to 2.2e-4, 2.2e-4 until 10T tokens, cosine to
  2.2e-5 over the next 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B (optim.lr_tokens);
  MTP depth 1, lambda 0.3 for the first 10T tokens then 0.1 (optim.mtp_lambda_tokens);
  bias update speed gamma 0.001, 0 for the last 500B tokens (optim.bias_update_tokens);
  sequence-wise balance loss alpha 1e-4 (model.aux_loss_alpha, balance_loss='sequence');
  node-limited routing (8 groups, top-4).

The batch ramp on a pod: every stage is the same microbatch of 1024 sequences (batch_size 15360 /
grad_accum 15) with 3, 6, 9, 12, 15 accumulation steps, so memory per chip never changes and the
loop compiles five programs, each on first use (Trainer.step_fn_for), then reuses it: no step
recompiles once its stage is warm. The data source draws 15360 rows per step; a stage takes the first.

Mesh (variants): weights need ~1.3 TB in bf16 plus ~5.4 TB of fp32 master weights and Adam
moments, so both experts (expert axis) and everything else (fsdp) are sharded.
  pod  (default) TPU v5p-1024 (512 chips, 8x8x8; Cloud TPU counts TensorCores in the name):
        fsdp=8 x expert=64 (256 experts, 4 per chip). More chips: raise data (data=-1 fills).
        Check what a pod holds before launching: python -m moe_jax.aot --config=configs/deepseek_v3.py
        --topology=v5p-1024 (compiles the real step for that topology from any host; BENCHMARKS.md).
        (aot's --batch drops the ramp; a batch that 15 does not divide needs --set optim.grad_accum=N.)
  gpu   H100 nodes of 8: expert=8 within a node x dcn_expert=8 across nodes (one expert group
        per node, so a token reaches at most topk_group=4 nodes), fsdp across the remaining
        nodes (dcn_fsdp=-1; 32 nodes -> fsdp 4, 46 GB per GPU by the planner).
Validate a layout before launching with the sharding planner (`python -m moe_jax.plan`).
"""

import math

from moe_jax import config as model_config
from moe_jax import optim
from moe_jax.train import base_config

B, T = 1e9, 1e12  # tokens
TOTAL_TOKENS = 14.8 * T
RAMP_TOKENS = 469 * B


def get_config(arg=None):
  # remat 'full' fits 61 layers on v5p-512 and v5p-1024 (plan: 65.3 / 44.5 GB per chip). On v5p-1024,
  # --config.model.remat_policy=gathered (75.0 GB) keeps the gathered weights: 1.20x the ideal wire
  # bytes at 8 layers against 1.44x (BENCHMARKS.md, "Pod communication"). 'gathered_offload' keeps
  # them in host memory instead (HBM as 'full', +30.5 GB pinned host memory per chip): 1.13x, but
  # each layer's weights cross the host link twice a step, which no compile-only figure can time.
  model = model_config.deepseek_v3(dtype="bfloat16", scan_layers=True, remat_policy="full", moe_impl="ep",
                                   initializer_range=0.006, aux_loss_alpha=1e-4, balance_loss="sequence")
  c = base_config(model, "deepseek_v3")
  c.batch_size, c.seq_len = 15360, 4096
  c.batch_ramp = tuple((RAMP_TOKENS * k / 4, 3072 * (k + 1)) for k in range(4)) + ((RAMP_TOKENS, 15360),)
  c.log_every, c.eval_every, c.checkpoint_every = 10, 2000, 500
  c.optim.update(dict(
      lr=2.2e-4, warmup=2000, schedule="tokens", grad_accum=15,
      lr_tokens=((10 * T, 2.2e-4, "constant"), (14.3 * T, 2.2e-5, "cosine"), (14.633 * T, 2.2e-5, "constant"),
                 (TOTAL_TOKENS, 7.3e-6, "constant")),
      mtp_lambda=0.3, mtp_lambda_tokens=((0, 0.3), (10 * T, 0.1)),
      bias_update_speed=1e-3, bias_update_until=-1, bias_update_tokens=((0, 1e-3), (TOTAL_TOKENS - 500 * B, 0.0))))
  first, b, before = optim.ramp_stages(c)[-1]  # steps: through the ramp, then full batches to 14.8T
  c.steps = first + math.ceil((TOTAL_TOKENS - before) / (b * c.seq_len))
  c.data.tokenizer = "tokenizer.json"
  c.checkpoint.max_to_keep = 2
  variant = arg or "pod"
  if variant == "pod":
    c.mesh.update(dict(data=-1, fsdp=8, expert=64, tensor=1))
  elif variant == "gpu":
    c.mesh.update(dict(data=1, fsdp=1, expert=8, tensor=1, dcn_fsdp=-1, dcn_expert=8))
  else:
    raise ValueError(f"configs/deepseek_v3.py: unknown variant {variant!r}; known: pod, gpu")
  return c
