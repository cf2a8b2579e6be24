"""Checkpoint save and restore time with and without the integrity checks (moe_jax/checksum.py).

A training state (params + AdamW moments + router bias + step + rng, as train.py saves it) of
a model of ~100M+ parameters is saved
  verified: moe_jax.checkpoint.Checkpointer.save (digests and a finiteness check computed on
            device, written as a third item inside the atomic commit), then waited for;
  plain:    the same CheckpointManager and items without the checksums item (orbax alone),
and restored
  verified: Checkpointer.restore (orbax restore + digests recomputed and compared + finiteness);
  plain:    the orbax restore alone, into the same sharded abstract tree.
The two sides run interleaved (verified, plain, verified, ...) and report medians, so a busy
machine slows both alike. `digest_s` times moe_jax.checksum.summarize alone on the state.

  python benchmarks/checkpoint_integrity.py                 # 119M parameters (state 1.43 GB fp32)
  python benchmarks/checkpoint_integrity.py --smoke         # tiny, for the test
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax import checkpoint, checksum, train  # noqa: E402


def model(smoke: bool):
  if smoke:
    return common.bench10m(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=2)
  # bench10m widened: d 768, vocab 32768, 4 layers (1 dense + 3 MoE of 16 experts of width 512): 119M.
  return common.bench10m(vocab_size=32768, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args()
  common.emit("machine", **common.machine_info())
  cfg = train.base_config(model(args.smoke), "integrity_bench")
  cfg.batch_size, cfg.seq_len = jax.device_count(), 16
  trainer = train.Trainer(cfg)
  state = trainer.init_state(0).to_dict()
  abstract = trainer.abstract_state.to_dict()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  root = tempfile.mkdtemp(prefix="ckpt_integrity_", dir=args.dir)
  try:
    verified = checkpoint.Checkpointer(os.path.join(root, "verified"), max_to_keep=2)
    plain = checkpoint.Checkpointer(os.path.join(root, "plain"), max_to_keep=2)
    config = cfg.to_dict()

    def save_verified(step):
      verified.save(step, state, config)
      verified.wait()

    def save_plain(step):
      plain.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), config=checkpoint._ConfigSave({"step": step, "config": config})),
          force=True)
      plain.wait()

    def restore_verified(step):
      jax.block_until_ready(verified.restore(step, abstract))

    def restore_plain(step):
      jax.block_until_ready(plain.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"])

    def digest(_):
      checksum.summarize(state)

    times = {k: [] for k in ("save_verified", "save_plain", "restore_verified", "restore_plain", "digest")}
    digest(0)  # compiles the digest jit once, outside the timings (a run compiles it at its first save)
    for i in range(args.iters + 1):  # the first round warms up (restore compiles, page cache)
      step = i + 1
      for name, fn in (("save_verified", save_verified), ("save_plain", save_plain),
                       ("restore_verified", restore_verified), ("restore_plain", restore_plain), ("digest", digest)):
        t = time.perf_counter()
        fn(step)
        if i:
          times[name].append(time.perf_counter() - t)
    verified.close()
    plain.close()
  finally:
    shutil.rmtree(root, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  common.emit("checkpoint_integrity", params=trainer.num_params, state_bytes=state_bytes, iters=args.iters,
              save_verified_s=med["save_verified"], save_plain_s=med["save_plain"],
              restore_verified_s=med["restore_verified"], restore_plain_s=med["restore_plain"],
              digest_s=med["digest"], save_overhead=med["save_verified"] / med["save_plain"] - 1,
              restore_overhead=med["restore_verified"] / med["restore_plain"] - 1,
              digest_gb_per_s=state_bytes / med["digest"] / 1e9, loadavg_end=common.load_average(),
              all_s={k: [float(f"{x:.4g}") for x in v] for k, v in times.items()})
  assert np.isfinite(med["digest"])


if __name__ == "__main__":
  main()
