"""Grouped matmul on a Hopper GPU: the Pallas (Mosaic GPU) kernels against jax.lax.ragged_dot.

For the routed experts of a MoE layer (default: bench1b's, 8 x 2048 tokens, top-6 of 64 experts,
D=1024, F=384) and group sizes drawn from a skewed routing (Zipf-like expert popularity, as a
router produces before balancing settles), in bf16:
  check   each Pallas kernel (forward y = x w, input gradient dy w^T, weight gradient x^T dy)
          against the fp32 product, ||out - ref|| / ||ref||, next to ragged_dot's own error;
  sweep   block sizes of each kernel (the winners go into layers/gmm_pallas.py MGPU_BLOCKS);
  time    forward and forward + backward of one grouped matmul and of the grouped SwiGLU, each
          implementation against a dense [M, D] x [D, F] matmul of the same FLOPs (ratio).

  python benchmarks/gmm_gpu.py                  # needs a Hopper GPU (H100, H200)
  python benchmarks/gmm_gpu.py --sweep          # and a grid of block sizes
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax.layers import gmm, gmm_pallas  # noqa: E402


def group_sizes(m: int, e: int, skew: float, seed: int = 0) -> np.ndarray:
  """m rows over e groups, popularity ~ 1 / rank^skew (shuffled), one empty group."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, e + 1) ** skew
  p[-1] = 0.0
  p = rng.permutation(p / p.sum())
  return rng.multinomial(m, p).astype(np.int32)


def rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def kernels(blocks):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
  return {
      "fwd": lambda x, w, dy, s: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=s, **blocks["fwd"]),
      "dx": lambda x, w, dy, s: ragged_dot_mgpu.ragged_dot(dy, w, group_sizes=s, transpose_rhs=True, **blocks["dx"]),
      "dw": lambda x, w, dy, s: transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=s,
                                                                                   **blocks["dw"]),
  }


def references():
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
                                         rhs_group_dimensions=[])
  return {
      "fwd": lambda x, w, dy, s: jax.lax.ragged_dot(x, w, s),
      "dx": lambda x, w, dy, s: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), s),
      "dw": lambda x, w, dy, s: jax.lax.ragged_dot_general(x, dy, s, dn),
  }, f32


def run(args):
  common.emit("machine", **common.machine_info())
  m, d, f, e = args.tokens * args.topk, args.hidden, args.ffn, args.experts
  sizes = jnp.asarray(group_sizes(m, e, args.skew))
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (m, d), jnp.bfloat16)
  w = (jax.random.normal(k[1], (e, d, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
  dy = jax.random.normal(k[2], (m, f), jnp.bfloat16)
  flops = 2.0 * m * d * f
  common.emit("problem", rows=m, hidden=d, ffn=f, experts=e, skew=args.skew, max_group=int(sizes.max()),
              min_group=int(sizes.min()), gflop_per_matmul=flops / 1e9)

  refs, f32 = references()
  for name in ("fwd", "dx", "dw"):
    want = jax.jit(refs[name])(f32(x), f32(w), f32(dy), sizes)
    got = jax.jit(kernels(gmm_pallas.MGPU_BLOCKS)[name])(x, w, dy, sizes)
    xla = jax.jit(refs[name])(x, w, dy, sizes)
    common.emit("check", kernel=name, pallas_rel_err=rel_err(got, want), ragged_dot_rel_err=rel_err(xla, want),
                nan=bool(jnp.isnan(got.astype(jnp.float32)).any()))

  best = {}
  if args.sweep:
    for name in ("fwd", "dx", "dw"):
      results = []
      for bm, bn, bk, steps, gbn in itertools.product((64, 128), (64, 128), (64,), (2, 4, 6), (1, 2, 4)):
        blocks = {**gmm_pallas.MGPU_BLOCKS, name: dict(block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps,
                                                       grid_block_n=gbn)}
        if name == "dw" and gbn != 1:
          continue
        try:
          fn = jax.jit(kernels(blocks)[name])
          secs = common.time_fn(fn, x, w, dy, sizes, warmup=2, iters=args.iters)
        except Exception as err:  # a block that overflows shared memory or the kernel rejects
          common.emit("sweep_skip", kernel=name, blocks=blocks[name], error=str(err).splitlines()[0][:160])
          continue
        results.append((secs, blocks[name]))
        common.emit("sweep", kernel=name, blocks=blocks[name], ms=secs * 1e3, tflops=flops / secs / 1e12)
      if results:
        secs, blocks = min(results, key=lambda r: r[0])
        best[name] = blocks
        common.emit("sweep_best", kernel=name, blocks=blocks, ms=secs * 1e3, tflops=flops / secs / 1e12)
    gmm_pallas.MGPU_BLOCKS.update(best)

  # One grouped matmul and the grouped SwiGLU, each implementation vs a dense matmul of the same FLOPs.
  dense_w = w[0]
  up, down = w * 0.5, jnp.swapaxes(w, 1, 2)
  fns = {"dense_matmul/forward": (jax.jit(lambda x, w: x @ w), (x, dense_w)),
         "dense_matmul/forward_backward": (jax.jit(jax.grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32) * dy),
                                                            argnums=(0, 1))), (x, dense_w))}
  for impl in ("ragged_dot", "pallas"):
    mm = lambda x, w, impl=impl: gmm.grouped_matmul(x, w, sizes, impl)  # noqa: E731
    fns[f"{impl}/forward"] = (jax.jit(mm), (x, w))
    fns[f"{impl}/forward_backward"] = (jax.jit(jax.grad(lambda x, w, mm=mm: jnp.sum(mm(x, w).astype(jnp.float32) * dy),
                                                        argnums=(0, 1))), (x, w))
    sw = lambda x, g, u, dn, impl=impl: gmm.grouped_swiglu(x, sizes, g, u, dn, impl)  # noqa: E731
    fns[f"{impl}_swiglu/forward"] = (jax.jit(sw), (x, w, up, down))
    fns[f"{impl}_swiglu/forward_backward"] = (jax.jit(jax.grad(
        lambda x, g, u, dn, sw=sw: jnp.sum(sw(x, g, u, dn).astype(jnp.float32) * x), argnums=(0, 1, 2, 3))),
        (x, w, up, down))
  times = common.time_interleaved(fns, warmup=2, iters=args.iters)
  for name, secs in times.items():
    impl, what = name.split("/")
    matmuls = 3 if "swiglu" in impl else 1  # per pass; forward + backward is 3 passes on both sides
    passes = 3 if what == "forward_backward" else 1
    base = times[f"dense_matmul/{what}"] * matmuls  # the dense entry of the same `what` already holds its passes
    common.emit("gmm", impl=impl, what=what, ms=secs * 1e3, tflops=matmuls * passes * flops / secs / 1e12,
                vs_dense_same_flops=secs / base)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=8 * 2048)
  p.add_argument("--topk", type=int, default=6)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--ffn", type=int, default=384)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--skew", type=float, default=0.5, help="popularity exponent of the group sizes (0: uniform)")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--sweep", action="store_true", help="also time a grid of kernel block sizes")
  args = p.parse_args(argv)
  if gmm_pallas.backend() != "mgpu":
    raise SystemExit("benchmarks/gmm_gpu.py needs a Hopper GPU (sm_90); this backend is "
                     f"{jax.default_backend()} ({jax.devices()[0].device_kind})")
  run(args)


if __name__ == "__main__":
  main()
