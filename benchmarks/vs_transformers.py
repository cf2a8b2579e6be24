"""moe_jax against transformers' PyTorch DeepseekV3ForCausalLM: same config, weights and batch, this CPU.

The model is initialised in moe_jax, written with moe_jax.hf.save_pretrained and read by
transformers' from_pretrained (its default experts / attention implementations), so both
sides hold the same weights; the script checks that their logits agree before timing.
Figures, each the median of interleaved runs (jax, torch, jax, torch, ...):
  forward   logits of a [B, S] batch (torch under no_grad)
  train     one step: forward, next-token cross-entropy, backward, global-norm clipping to
            1.0 and AdamW (lr 1e-4, b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices).
            moe_jax: moe_jax.train's jitted step (also moves the router bias, which torch
            does not train); torch: loss.backward(), clip_grad_norm_, torch.optim.AdamW.
ratio = torch seconds / moe_jax seconds (> 1: moe_jax is faster).

  python benchmarks/vs_transformers.py                # bench10m, batch 8 x 128, 2 torch threads
  python benchmarks/vs_transformers.py --smoke
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.train_step import build  # noqa: E402
from moe_jax import hf  # noqa: E402


def torch_side(path: str, threads: int, lr: float):
  """(model, optimizer) from the saved directory, fp32, with AdamW as optim/make_optimizer sets it."""
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(threads)
  model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  rest = [p for n, p in model.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, betas=(0.9, 0.95), eps=1e-8)
  return model, opt


def run(args) -> None:
  import torch
  common.emit("machine", **common.machine_info(), torch=torch.__version__, torch_threads=args.threads)
  mcfg = common.model_config(args.config, args.set)
  trainer, state, batch = build(mcfg, args.config, args.batch, args.seq)
  trainer.config.optim.lr = args.lr
  step = trainer.step_fn
  tokens = np.asarray(batch["tokens"])

  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(trainer.model, {"params": state.params, "router": state.router}, tmp)
    model, opt = torch_side(tmp, args.threads, args.lr)
  impl = {"experts": model.config._experts_implementation, "attention": model.config._attn_implementation}

  inputs = jnp.asarray(tokens[:, :-1])
  fwd = jax.jit(lambda p, r, t: trainer.model.apply({"params": p, "router": r}, t))
  ours = np.asarray(fwd(state.params, state.router, inputs))
  t_in, t_tgt = torch.tensor(tokens[:, :-1]).long(), torch.tensor(tokens[:, 1:]).long()
  with torch.no_grad():
    theirs = model(t_in).logits.numpy()
  max_diff = float(np.abs(ours - theirs).max())

  def torch_fwd():
    with torch.no_grad():
      return model(t_in).logits

  def torch_train():
    opt.zero_grad(set_to_none=True)
    logits = model(t_in).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_tgt.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  holder = {"state": state}

  def jax_train():
    holder["state"], metrics = step(holder["state"], batch)
    return holder["state"], metrics

  fns = {"forward": {"jax": lambda: fwd(state.params, state.router, inputs), "torch": torch_fwd},
         "train": {"jax": jax_train, "torch": torch_train}}
  for kind, pair in fns.items():
    for _ in range(args.warmup):
      for f in pair.values():
        common.block(f())
    times = {name: [] for name in pair}
    for _ in range(args.iters):
      for name, f in pair.items():
        t = time.perf_counter()
        common.block(f())
        times[name].append(time.perf_counter() - t)
    jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
    common.emit("vs_transformers", what=kind, config=args.config, batch=args.batch, seq=args.seq,
                params=trainer.num_params, moe_jax_s=jax_s, torch_s=torch_s, ratio=torch_s / jax_s,
                moe_jax_s_min=min(times["jax"]), torch_s_min=min(times["torch"]),
                logits_max_abs_diff=max_diff, torch_impl=impl, torch_threads=args.threads, iters=args.iters,
                loadavg=common.load_average())


def main(argv=None):
  p = common.parser(__doc__, "the model (sigmoid routing)", "a tiny model, 2 iterations")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--lr", type=float, default=1e-4)
  args = p.parse_args(argv)
  if args.smoke:
    args.set = ["vocab_size=256", "hidden_size=64", "intermediate_size=128", "moe_intermediate_size=32",
                "num_hidden_layers=1", "first_k_dense_replace=0", "num_attention_heads=2", "q_lora_rank=32", "kv_lora_rank=32",
                "qk_nope_head_dim=16", "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=8"] + args.set
    args.batch, args.seq, args.iters, args.warmup = 2, 16, 2, 1
  run(args)


if __name__ == "__main__":
  main()
