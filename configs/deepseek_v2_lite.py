"""DeepSeek-V2-Lite (15.7B total, 2.4B active) with the paper's training recipe.

DeepSeek-V2 section 3.2: AdamW (0.9, 0.95, wd 0.1), warmup 2000 steps, step schedule
(x0.316 after 80% and 90% of training), clip 1.0, seq_len 4096, 4608 sequences per batch
(here 512 with grad_accum as memory allows), expert-level balance loss alpha = 0.001.
V2 balances with auxiliary losses, so the aux-loss-free bias update is off (gamma = 0).
Needs a token directory made with the DeepSeek tokenizer (vocab 102400).
"""

from moe_jax import config as model_config
from moe_jax.train import base_config


def get_config(arg=None):
  model = model_config.deepseek_v2_lite(dtype="bfloat16", scan_layers=True, remat_policy="full", moe_impl="ep")
  c = base_config(model, "deepseek_v2_lite")
  c.steps, c.batch_size, c.seq_len = 100000, 512, 4096
  c.log_every, c.eval_every, c.checkpoint_every = 10, 1000, 500
  c.optim.update(dict(lr=4.2e-4, warmup=2000, schedule="step", grad_accum=4, bias_update_speed=0.0, mtp_lambda=0.0))
  c.data.tokenizer = "tokenizer.json"
  # 64 experts: expert parallelism across 8 devices, FSDP for the rest of the weights.
  c.mesh.update(dict(data=-1, fsdp=8, expert=8, tensor=1))
  if arg:
    raise ValueError(f"configs/deepseek_v2_lite.py: unknown variant {arg!r}")
  return c
