"""moe_jax against transformers' PyTorch DeepseekV3ForCausalLM: same config, weights and batch, this CPU.

The model is initialised in moe_jax, written with moe_jax.hf.save_pretrained and read by
transformers' from_pretrained (its default experts / attention implementations), so both
sides hold the same weights; the script checks that their logits agree (at exact fp32 matmul
precision) before timing. Figures, each the median of interleaved runs (jax, torch, jax, ...):
  forward   logits of a [B, S] batch (torch under no_grad)
  train     moe_jax.train's jitted step (document masks, metrics, clipping, AdamW, router bias)
            against loss.backward(), clip_grad_norm_(1.0) and torch.optim.AdamW (lr 1e-4,
            b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices)
  user      the plain path a user writes: hf.load_pretrained(dir), jax.jit of value_and_grad of
            the cross-entropy, optax.adamw(1e-4); torch: the same loss, backward, AdamW(1e-4)
ratio = torch seconds / moe_jax seconds (> 1: moe_jax is faster). Both sides in --set dtype
(float32 unless set; bfloat16 gives the bf16 figure). moe_jax runs once per --precisions entry,
JAX's matmul precision: 'default' is what a user gets (on a CPU with AMX: bf16 operands, fp32
accumulation, moe_jax/layers/matmul.py), 'float32' exact fp32 products as torch computes them.
Also printed: both libraries' dense matmul peaks in this run (fp32, and bf16 operands with
fp32 output) and, with --loss_steps N, the training loss after N steps on the embedded corpus
at each precision (the fast path must stay within 1% of exact fp32).

  python benchmarks/vs_transformers.py                       # bench10m, 8 x 128, 2 torch threads
  python benchmarks/vs_transformers.py --config user8k --loss_steps 100
  python benchmarks/vs_transformers.py --set dtype=bfloat16 --set param_dtype=bfloat16
  python benchmarks/vs_transformers.py --smoke
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.train_step import build, corpus_batches  # noqa: E402
from moe_jax import hf  # noqa: E402
from moe_jax.layers import matmul  # noqa: E402

PRECISIONS = {"default": None, "float32": "float32"}  # flag value -> jax_default_matmul_precision


def precision(name: str):
  return jax.default_matmul_precision(PRECISIONS[name])


def torch_side(path: str, threads: int, lr: float, dtype: str):
  """(model, optimizer) from the saved directory, with AdamW as optim/make_optimizer sets it."""
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(threads)
  model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  rest = [p for n, p in model.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, betas=(0.9, 0.95), eps=1e-8)
  return model, opt


def matmul_peaks(size: int, iters: int) -> dict:
  """GFLOP/s of one [size]^3 matmul: jax fp32 (exact), jax bf16 operands -> fp32, torch fp32 and bf16."""
  import torch
  x = np.random.default_rng(0).standard_normal((size, size), np.float32)
  xj, xb, xt = jnp.asarray(x), jnp.asarray(x, jnp.bfloat16), torch.tensor(x)
  f32 = jax.jit(lambda a, b: a @ b)
  bf16 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  flop = 2 * size ** 3 / 1e9
  times = common.time_interleaved({"jax_f32": (f32, (xj, xj)), "jax_bf16_f32acc": (bf16, (xb, xb)),
                                   "torch_f32": (torch.mm, (xt, xt)), "torch_bf16": (torch.mm, (xt.bfloat16(),) * 2)},
                                  iters=iters)
  return {f"{k}_gflops": flop / v for k, v in times.items()}


def user_path(path: str, tokens: np.ndarray, lr: float, dtype: str):
  """The plain user step over a Hugging Face directory: -> (step(params, opt_state), params, opt_state)."""
  model, variables = hf.load_pretrained(path, dtype=dtype)
  params, router = variables["params"], variables["router"]
  opt = optax.adamw(lr)
  x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])

  def loss_fn(p):
    logits = model.apply({"params": p, "router": router}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  return step, params, opt.init(params)


def loss_after(mcfg, args, name: str) -> float:
  """Mean training loss of the last 5 of --loss_steps moe_jax.train steps on the corpus, at precision `name`."""
  with precision(name):
    trainer, state, _ = build(mcfg, args.config, args.batch, args.seq)
    step = trainer.step_fn
    losses = []
    for b in corpus_batches(trainer, args.batch, args.seq, mcfg.vocab_size, args.loss_steps):
      state, metrics = step(state, b)
      losses.append(float(metrics["loss"]))
  return float(np.mean(losses[-5:]))


def run(args) -> None:
  import torch
  mcfg = common.model_config(args.config, args.set)
  dtype = str(jnp.dtype(mcfg.compute_dtype))
  common.emit("machine", **common.machine_info(), torch=torch.__version__, torch_threads=args.threads,
              amx_bf16=matmul.cpu_has_amx_bf16())
  torch.set_num_threads(args.threads)
  common.emit("matmul_peaks", size=args.peak_size, **matmul_peaks(args.peak_size, args.iters))

  with precision("float32"):  # the weights and the parity reference at exact fp32
    trainer, state, batch = build(mcfg, args.config, args.batch, args.seq)
    trainer.config.optim.lr = args.lr
    tokens = np.asarray(batch["tokens"])
    inputs = jnp.asarray(tokens[:, :-1])
    variables = {"params": state.params, "router": state.router}
    ours = np.asarray(jax.jit(trainer.model.apply)(variables, inputs), np.float32)
  tmp = tempfile.TemporaryDirectory()
  hf.save_pretrained(trainer.model, variables, tmp.name)
  model, opt = torch_side(tmp.name, args.threads, args.lr, dtype)
  impl = {"experts": model.config._experts_implementation, "attention": model.config._attn_implementation}
  t_in, t_tgt = torch.tensor(tokens[:, :-1]).long(), torch.tensor(tokens[:, 1:]).long()
  with torch.no_grad():
    theirs = model(t_in).logits.float().numpy()
  max_diff = float(np.abs(ours - theirs).max())

  def torch_fwd():
    with torch.no_grad():
      return model(t_in).logits

  def torch_step(clip: bool):
    opt.zero_grad(set_to_none=True)
    logits = model(t_in).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t_tgt.reshape(-1))
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  for name in args.precisions:
    with precision(name):
      operands = str(jnp.dtype(matmul.operand_dtype(mcfg.compute_dtype)))
      trainer, state, batch = build(mcfg, args.config, args.batch, args.seq)
      trainer.config.optim.lr = args.lr
      fwd = jax.jit(trainer.model.apply)
      variables = {"params": state.params, "router": state.router}
      holder = {"state": state}
      train_step = trainer.step_fn

      def jax_train():
        holder["state"], metrics = train_step(holder["state"], batch)
        return holder["state"], metrics

      ustep, uparams, uopt = user_path(tmp.name, tokens, args.lr, dtype)
      user = {"s": (uparams, uopt)}

      def jax_user():
        p, o, loss = ustep(*user["s"])
        user["s"] = (p, o)
        return loss

      pairs = {"forward": (lambda: fwd(variables, inputs), torch_fwd),
               "train": (jax_train, lambda: torch_step(True)),
               "user": (jax_user, lambda: torch_step(False))}
      for what, (jax_fn, torch_fn) in pairs.items():
        times = common.time_interleaved({"jax": (jax_fn, ()), "torch": (torch_fn, ())}, args.warmup, args.iters)
        common.emit("vs_transformers", what=what, precision=name, operands=operands, dtype=dtype, config=args.config,
                    batch=args.batch, seq=args.seq, params=trainer.num_params, moe_jax_s=times["jax"],
                    torch_s=times["torch"], ratio=times["torch"] / times["jax"], logits_max_abs_diff=max_diff,
                    torch_impl=impl, torch_threads=args.threads, iters=args.iters, loadavg=common.load_average())
  tmp.cleanup()

  if args.loss_steps:
    losses = {name: loss_after(mcfg, args, name) for name in args.precisions}
    exact = losses.get("float32")
    common.emit("precision_loss", steps=args.loss_steps, config=args.config, dtype=dtype,
                **{f"loss_{k}": v for k, v in losses.items()},
                rel_diff=None if exact is None else max(abs(v - exact) / exact for v in losses.values()))


def main(argv=None):
  p = common.parser(__doc__, "the model (sigmoid routing)", "a tiny model, 2 iterations")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--precisions", default="default,float32",
                 help=f"comma-separated JAX matmul precisions for moe_jax: {', '.join(PRECISIONS)}")
  p.add_argument("--loss_steps", type=int, default=0, help="also compare the loss after N corpus steps per precision")
  p.add_argument("--peak_size", type=int, default=1024)
  args = p.parse_args(argv)
  args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
  bad = [x for x in args.precisions if x not in PRECISIONS]
  if bad:
    p.error(f"--precisions: {', '.join(bad)} not among {', '.join(PRECISIONS)}")
  if args.smoke:
    args.set = ["vocab_size=512", "hidden_size=64", "intermediate_size=128", "moe_intermediate_size=32",
                "num_hidden_layers=1", "first_k_dense_replace=0", "num_attention_heads=2", "q_lora_rank=32", "kv_lora_rank=32",
                "qk_nope_head_dim=16", "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=8"] + args.set
    args.batch, args.seq, args.iters, args.warmup, args.peak_size = 2, 16, 2, 1, 128
    args.loss_steps = args.loss_steps or 6
  run(args)


if __name__ == "__main__":
  main()
