"""Small preset: DeepSeek-V3-shaped, tens of millions of parameters (6 layers, 32 experts, top-4).

Variants (`--config=configs/small.py:VARIANT`):
  (none)  a real run: bf16 compute, scanned layers, your token directory (vocab <= 32768):
          python -m moe_jax.data prepare --input corpus.jsonl --tokenizer tokenizer.json --out data/c
          python train.py --config=configs/small.py --config.data.path=data/c --config.data.tokenizer=tokenizer.json
  smoke   20 CPU steps on the embedded byte corpus (fp32), to check the plumbing.
"""

from moe_jax import config as model_config
from moe_jax.train import base_config


def get_config(arg=None):
  model = model_config.small(dtype="bfloat16", scan_layers=True, remat_policy="dots_no_batch")
  c = base_config(model, "small")
  c.steps, c.batch_size, c.seq_len = 20000, 64, 1024
  c.log_every, c.eval_every, c.checkpoint_every = 50, 1000, 1000
  c.optim.lr, c.optim.warmup = 1e-3, 500
  if arg == "smoke":
    c.name = "small_smoke"
    c.model.dtype, c.model.remat_policy = "float32", "none"
    c.steps, c.batch_size, c.seq_len = 20, 8, 128
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 5, 20, 1, 10
    c.optim.warmup = 5
  elif arg:
    raise ValueError(f"configs/small.py: unknown variant {arg!r}; known: smoke")
  return c
