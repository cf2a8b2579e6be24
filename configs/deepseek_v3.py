"""DeepSeek-V3 (671B total, 37B active) with the paper's training recipe and a suggested mesh.

DeepSeek-V3 section 4.2: AdamW (0.9, 0.95, wd 0.1), clip 1.0, seq_len 4096, peak lr 2.2e-4
after 2000 warmup steps, 15360 sequences per batch at full size; bias update speed
gamma = 0.001 (set to 0 for the last 500B tokens: bias_update_until), sequence-wise balance
loss alpha = 1e-4, MTP depth 1 with lambda = 0.3. Node-limited routing (8 groups, top-4).

Mesh (variants): weights need ~1.3 TB in bf16 plus ~5.4 TB of fp32 master weights and Adam
moments, so both experts (expert axis) and everything else (fsdp) are sharded.
  pod  (default) TPU v5p-1024 (512 chips, 8x8x8; Cloud TPU counts TensorCores in the name):
        fsdp=8 x expert=64 (256 experts, 4 per chip). More chips: raise data (data=-1 fills).
        Check what a pod holds before launching: python -m moe_jax.aot --config=configs/deepseek_v3.py
        --topology=v5p-1024 (compiles the real step for that topology from any host; BENCHMARKS.md).
  gpu   H100 nodes of 8: expert=8 within a node x dcn_expert=8 across nodes (one expert group
        per node, so a token reaches at most topk_group=4 nodes), fsdp across the remaining
        nodes (dcn_fsdp=-1; 32 nodes -> fsdp 4, 46 GB per GPU by the planner).
Validate a layout before launching with the sharding planner (`python -m moe_jax.plan`).
"""

from moe_jax import config as model_config
from moe_jax.train import base_config


def get_config(arg=None):
  model = model_config.deepseek_v3(dtype="bfloat16", scan_layers=True, remat_policy="full", moe_impl="ep")
  c = base_config(model, "deepseek_v3")
  c.steps, c.batch_size, c.seq_len = 1000000, 4096, 4096
  c.log_every, c.eval_every, c.checkpoint_every = 10, 2000, 500
  c.optim.update(dict(lr=2.2e-4, min_lr_ratio=0.1, warmup=2000, schedule="cosine", grad_accum=4,
                      bias_update_speed=1e-3, bias_update_until=960000, mtp_lambda=0.3))
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
