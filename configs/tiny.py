"""Tiny preset: trains in minutes on a laptop CPU; `python train.py` runs it on the embedded corpus.

Variants (`--config=configs/tiny.py:VARIANT`):
  (none)  the default run: byte-level Python standard library, falling loss in < 10 CPU minutes.
  test    a few steps on small batches, for the subprocess tests.
  copy    the synthetic copy task (data.path='synthetic:copy'): [x_1..x_8, SEP, x_1..x_8].
"""

from moe_jax import config as model_config
from moe_jax.train import base_config


def get_config(arg=None):
  # 256 bytes + end-of-document = 257 ids, padded to a multiple of 8 so `vocab` can shard.
  # fp32 compute: bf16 matmuls are emulated (slower) on CPU; the larger presets use bf16.
  # initializer_range: DeepSeek's 0.02 suits width 7168; at width 64 (and MLA's products of two
  # low-rank factors) attention stays near uniform for hundreds of steps, so use ~1/sqrt(64).
  model = model_config.tiny(vocab_size=264, dtype="float32", initializer_range=0.1)
  c = base_config(model, "tiny")
  c.steps, c.batch_size, c.seq_len = 600, 16, 128
  c.log_every, c.eval_every, c.checkpoint_every = 10, 200, 200
  c.optim.lr, c.optim.warmup = 3e-3, 50
  if arg == "test":
    c.name = "tiny_test"
    c.steps, c.batch_size, c.seq_len = 8, 4, 32
    c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 4
    c.optim.warmup = 2
  elif arg == "copy":
    c.name = "tiny_copy"
    c.data.path = "synthetic:copy"
    c.steps, c.batch_size, c.seq_len = 300, 32, 16  # copy 8 symbols of 16: 100% token accuracy by step 300
    c.eval_every, c.checkpoint_every = 0, 300
    c.optim.warmup = 20
  elif arg:
    raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; known: test, copy")
  return c
