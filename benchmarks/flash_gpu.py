"""Packed-document flash attention on a GPU: attention_impl='pallas_gpu' (the GPU default for
packed rows, layers/attention.py) checked and timed against the other paths.

  check  the Pallas (Triton) kernel in bf16, forward and the gradients of all five inputs
         (q_nope, q_rope, k_nope, the shared k_rope, v), against the einsum path in fp32 at
         HIGHEST precision: ||out - ref|| / ||ref||, next to the einsum path's own bf16 error
         (the yardstick: the kernel passes at <= 2x that plus 2e-3, and finite). S is no
         multiple of the kernel's blocks and the documents cross block edges, so padding runs.
  time   forward + backward of one attention at MLA's head dims (q/k 192 = 128 + 64 rope,
         v 128) on packed rows: pallas_gpu, einsum (XLA, [B, H, S, S] scores) and cuDNN
         (dot_product) with the documents as an explicit [B, 1, S, S] mask; and cuDNN on plain
         causal rows, the yardstick for a kernel that needs
         no mask; medians of interleaved runs, ratio = seconds / cuDNN seconds.

  python benchmarks/flash_gpu.py                       # a GPU (H100, H200)
  python benchmarks/flash_gpu.py --smoke               # tiny, kernel interpreted on CPU
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from moe_jax.layers import attention  # noqa: E402

N, R, V = 128, 64, 128  # DeepSeek-V3's q/k nope, rope and value head dims


def inputs(batch: int, length: int, heads: int, dtype, seed: int = 0):
  """(q_nope, q_rope, k_nope, k_rope, v) and the cotangent dy, normal, in dtype."""
  shapes = [(batch, length, heads, N), (batch, length, heads, R), (batch, length, heads, N), (batch, length, R),
            (batch, length, heads, V), (batch, length, heads, V)]
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]


def documents(batch: int, length: int, seed: int = 1) -> jax.Array:
  """Segment ids [B, S]: each row cut into documents of random lengths (16 .. S/3 tokens)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    ids, doc = [], 0
    while len(ids) < length:
      ids += [doc] * int(rng.integers(16, max(17, length // 3)))
      doc += 1
    rows.append(ids[:length])
  return jnp.asarray(rows, jnp.int32)


def forward_backward(impl: str, segment_ids):
  """(q_nope, q_rope, k_nope, k_rope, v, dy) -> (out, five input gradients), jitted."""
  scale = (N + R) ** -0.5

  def f(q_nope, q_rope, k_nope, k_rope, v, dy):
    run = lambda *a: attention.attend(impl, *a, scale, segment_ids_BS=segment_ids)  # noqa: E731
    out, pullback = jax.vjp(run, q_nope, q_rope, k_nope, k_rope, v)
    return (out, *pullback(dy.astype(out.dtype)))
  return jax.jit(f)


def rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


NAMES = ("out", "d_q_nope", "d_q_rope", "d_k_nope", "d_k_rope", "d_v")


def check(batch: int, length: int, heads: int) -> bool:
  args32 = inputs(batch, length, heads, jnp.float32)
  args16 = [a.astype(jnp.bfloat16) for a in args32]
  seg = documents(batch, length)
  with jax.default_matmul_precision("highest"):
    ref = forward_backward("einsum", seg)(*args32)
  kernel = forward_backward("pallas_gpu", seg)(*args16)
  yard = forward_backward("einsum", seg)(*args16)
  ok = True
  for name, k, y, r in zip(NAMES, kernel, yard, ref):
    err, yard_err = rel_err(k, r), rel_err(y, r)
    passed = bool(np.isfinite(np.asarray(k, np.float32)).all()) and err <= 2 * yard_err + 2e-3
    ok &= passed
    common.emit("flash_check", tensor=name, batch=batch, seq=length, heads=heads,
                documents=int(seg.max()) + 1, pallas_gpu_rel_err=err, einsum_bf16_rel_err=yard_err, ok=passed)
  return ok


def time_paths(batch: int, length: int, heads: int, iters: int) -> None:
  args = inputs(batch, length, heads, jnp.bfloat16)
  seg = documents(batch, length)
  fns = {"pallas_gpu_packed": (forward_backward("pallas_gpu", seg), args),
         "einsum_packed": (forward_backward("einsum", seg), args),
         "cudnn_packed": (forward_backward("dot_product", seg), args),  # an explicit [B, 1, S, S] mask
         "cudnn_causal": (forward_backward("dot_product", None), args)}
  for name, (fn, a) in list(fns.items()):
    try:
      common.block(fn(*a))  # compile; a path that cannot run at this size says why and is left out
    except Exception as e:  # noqa: BLE001  (out of memory, a shape cuDNN refuses)
      common.emit("flash_time", path=name, batch=batch, seq=length, heads=heads, error=str(e).splitlines()[0][:300])
      del fns[name]
  times = common.time_interleaved(fns, warmup=1, iters=iters)
  base = times.get("cudnn_causal")
  flops = 4 * batch * heads * length * length / 2 * ((N + R) + V) * 3  # causal half; fwd + bwd = 3x fwd
  for name, secs in times.items():
    common.emit("flash_time", path=name, batch=batch, seq=length, heads=heads, ms=secs * 1e3,
                attention_tflops=flops / secs / 1e12, vs_cudnn_causal=secs / base if base else None)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--check_seq", type=int, default=2000, help="no multiple of the blocks: padding runs")
  p.add_argument("--seqs", default="2048,8192", help="sequence lengths timed")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, kernel interpreted on CPU: plumbing only")
  args = p.parse_args()
  if args.smoke:
    args.batch, args.heads, args.check_seq, args.seqs, args.iters = 1, 2, 100, "128", 1
  common.emit("machine", **common.machine_info())
  ok = check(args.batch, args.check_seq, args.heads)
  for length in filter(None, args.seqs.split(",")):
    time_paths(args.batch, int(length), args.heads, args.iters)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
