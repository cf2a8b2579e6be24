"""FP8 GEMMs on a GPU: the fused kernel (layers/fp8_pallas.py) against bf16 and fp8.py's XLA form.

DeepSeek-V3 shapes (hidden 7168), each of the three matmuls of a linear y = x w:
  dense    x [4096 tokens, 7168] x w [7168, 18432]          (the dense layers' MLP)
  grouped  x [4096 x top-8 rows, 7168] x w [256, 7168, 2048] (routed experts' gate/up, rows
           sorted by expert, group sizes from a --skew routing; one expert empty)
  forward y = x w, dgrad dx = dy w^T, wgrad dw = x^T dy (grouped: per expert).
One `fp8_gemm` record per (shape, pass), times in ms (median of --iters, the contenders
interleaved), TFLOP/s at 2 M K N FLOPs:
  fp8        the fused kernel alone, operands already in e4m3 with their scales (DeepGEMM's figure)
  fp8_quant  fp8.py's pass with the fused kernel: the quantization of x / dy included
  fp8_xla    fp8.py's XLA form of the same pass (--no_xla skips it: its fp32 partials [K/128, M, N]
             take ~15-30 GB at these shapes)
  bf16       the bf16 GEMM: jnp.dot; grouped on Hopper the Mosaic GPU kernels of layers/gmm_pallas.py
             (bf16_impl says which), else jax.lax.ragged_dot
  forward records add fp8_rhs_kn_ms: the kernel reading w as [K, N] (N-major) instead of w^T, for
  whether FP8 wgmma pays for that layout. rel_err: fused vs the exact fp32 product (FP8's own
  error, ~0.05 for random data); rel_diff_xla: fused vs the XLA form (fp32 rounding, ~1e-6).

  python benchmarks/fp8_gemm.py              # a GPU with FP8 tensor cores (H100, H200)
  python benchmarks/fp8_gemm.py --sweep      # and block sizes / warps / stages of the kernel
  python benchmarks/fp8_gemm.py --smoke      # tiny shapes in the Pallas interpreter (CPU)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from moe_jax.layers import fp8, gmm_pallas  # noqa: E402
from moe_jax.layers import fp8_pallas as fpp  # noqa: E402

F32 = jnp.float32
BF16 = jnp.bfloat16
PASSES = ("forward", "dgrad", "wgrad")


def group_sizes(m: int, e: int, skew: float, seed: int = 0) -> np.ndarray:
  """m rows over e groups, popularity ~ 1 / rank^skew (shuffled), the last group empty."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, e + 1) ** skew
  p[-1] = 0.0
  return rng.multinomial(m, rng.permutation(p / p.sum())).astype(np.int32)


def rel(a, b) -> float:
  a, b = jnp.asarray(a, F32), jnp.asarray(b, F32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def dense_problem(m, k, n, mode):
  """{pass: {contender: (fn, args)}}, the exact fp32 reference fns, and FLOPs."""
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (m, k), BF16)
  w = (jax.random.normal(ks[1], (k, n), F32) / np.sqrt(k)).astype(BF16)
  dy = jax.random.normal(ks[2], (m, n), BF16)
  wq, ws = fp8.quantize_blocks(w)
  wq_t = wq.T  # K-major for the forward (fp8_pallas docstring)
  (xq, xs), (gq, gs) = fp8.quantize_tiles(x), fp8.quantize_tiles(dy)
  (xtq, xts), (gtq, gts) = fp8.quantize_tiles(x.T), fp8.quantize_tiles(dy.T)
  interp = mode == "interpret"
  mm = lambda *a, **kw: fpp.blocked_matmul(*a, interpret=interp, **kw)  # noqa: E731
  b3 = lambda a: a[None]  # noqa: E731  fp8.py's passes take [Bt, ...]
  jit = jax.jit
  c = {
      "forward": {
          "fp8": (jit(lambda *a: mm(*a, out_dtype=BF16, rhs_transposed=True)), (xq, xs, wq_t, ws)),
          "fp8_rhs_kn": (jit(lambda *a: mm(*a, out_dtype=BF16)), (xq, xs, wq, ws)),
          "fp8_quant": (jit(lambda x, wq, ws: fp8._forward(b3(x), b3(wq), b3(ws), mode, BF16)[0]), (x, wq, ws)),
          "fp8_xla": (jit(lambda x, wq, ws: fp8._forward(b3(x), b3(wq), b3(ws))[0].astype(BF16)), (x, wq, ws)),
          "bf16": (jit(lambda x, w: jnp.dot(x, w, preferred_element_type=F32).astype(BF16)), (x, w)),
      },
      "dgrad": {
          "fp8": (jit(lambda *a: mm(*a, out_dtype=BF16, rhs_transposed=True)), (gq, gs, wq, ws.T)),
          "fp8_quant": (jit(lambda g, wq, ws: fp8._input_grad(b3(g), b3(wq), b3(ws), mode, BF16)[0]), (dy, wq, ws)),
          "fp8_xla": (jit(lambda g, wq, ws: fp8._input_grad(b3(g), b3(wq), b3(ws))[0, :, :k].astype(BF16)),
                      (dy, wq, ws)),
          "bf16": (jit(lambda g, w: jnp.dot(g, w.T, preferred_element_type=F32).astype(BF16)), (dy, w)),
      },
      "wgrad": {
          "fp8": (jit(lambda *a: mm(*a, rhs_transposed=True)), (xtq, xts, gtq, gts.T)),
          "fp8_quant": (jit(lambda x, g: fp8._weight_grad(b3(x), b3(g), mode)[0]), (x, dy)),
          "fp8_xla": (jit(lambda x, g: fp8._weight_grad(b3(x), b3(g))[0]), (x, dy)),
          "bf16": (jit(lambda x, g: jnp.dot(x.T, g, preferred_element_type=F32)), (x, dy)),
      },
  }
  hi = jax.lax.Precision.HIGHEST
  exact = {"forward": lambda: jnp.dot(x.astype(F32), w.astype(F32), precision=hi),
           "dgrad": lambda: jnp.dot(dy.astype(F32), w.astype(F32).T, precision=hi),
           "wgrad": lambda: jnp.dot(x.astype(F32).T, dy.astype(F32), precision=hi)}
  return c, exact, {p: 2.0 * m * k * n for p in PASSES}, "dot"


def grouped_bf16(sizes):
  """(name, {pass: fn(x, w, dy)}): the fastest bf16 grouped GEMM this GPU has."""
  if gmm_pallas.backend() == "mgpu":
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    b = gmm_pallas.MGPU_BLOCKS
    return "mosaic_gpu", {
        "forward": lambda x, w, dy: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=sizes, **b["fwd"]),
        "dgrad": lambda x, w, dy: ragged_dot_mgpu.ragged_dot(dy, w, group_sizes=sizes, transpose_rhs=True,
                                                             **b["dx"]),
        "wgrad": lambda x, w, dy: transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=sizes,
                                                                                     **b["dw"])}
  return "ragged_dot", reference_grouped(sizes)


def reference_grouped(sizes):
  dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
                                         rhs_group_dimensions=[])
  return {
      "forward": lambda x, w, dy: jax.lax.ragged_dot(x, w, sizes),
      "dgrad": lambda x, w, dy: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), sizes),
      "wgrad": lambda x, w, dy: jax.lax.ragged_dot_general(x, dy, sizes, dn),
  }


def exact_grouped(what: str, x, w, dy, sizes) -> np.ndarray:
  """The exact fp32 grouped product, one group at a time on the host. (XLA:GPU's ragged_dot
  rewrite materializes [M, G, K]: 112 GiB at DeepSeek-V3 sizes, out of memory on an H200.)"""
  x, dy = np.asarray(x, np.float32), np.asarray(dy, np.float32)
  ends = np.cumsum(np.asarray(sizes))
  out = np.zeros((w.shape[0], x.shape[1], dy.shape[1]) if what == "wgrad" else
                 (x.shape[0], dy.shape[1] if what == "forward" else x.shape[1]), np.float32)
  for g, (start, end) in enumerate(zip(ends - np.asarray(sizes), ends)):
    w_g = np.asarray(w[g], np.float32)  # [K, N]
    if what == "forward":
      out[start:end] = x[start:end] @ w_g
    elif what == "dgrad":
      out[start:end] = dy[start:end] @ w_g.T
    else:
      out[g] = x[start:end].T @ dy[start:end]
  return out


def grouped_problem(rows, k, n, e, skew, mode):
  sizes = jnp.asarray(group_sizes(rows, e, skew))
  ks = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(ks[0], (rows, k), BF16)
  w = (jax.random.normal(ks[1], (e, k, n), F32) / np.sqrt(k)).astype(BF16)
  dy = jax.random.normal(ks[2], (rows, n), BF16)
  wq, ws = fp8.quantize_blocks(w)
  wq_t, ws_t = jnp.swapaxes(wq, 1, 2), jnp.swapaxes(ws, 1, 2)
  (xq, xs), (gq, gs) = fp8.quantize_tiles(x), fp8.quantize_tiles(dy)
  xtq, xts, gtq, gts, _ = fp8._token_tiles(x, dy, sizes)
  interp = mode == "interpret"
  gmm = lambda *a, **kw: fpp.grouped_matmul(*a, interpret=interp, **kw)  # noqa: E731
  impl, bf16 = grouped_bf16(sizes)
  jit = jax.jit

  c = {
      "forward": {
          "fp8": (jit(lambda *a: gmm(*a, sizes, out_dtype=BF16, rhs_transposed=True)), (xq, xs, wq_t, ws)),
          "fp8_rhs_kn": (jit(lambda *a: gmm(*a, sizes, out_dtype=BF16)), (xq, xs, wq, ws)),
          "fp8_quant": (jit(lambda x, wq_t, ws: gmm(*fp8.quantize_tiles(x), wq_t, ws, sizes, out_dtype=BF16,
                                                    rhs_transposed=True)), (x, wq_t, ws)),
          "fp8_xla": (jit(lambda x, wq, ws: fp8._ragged_blocked_dot(*fp8.quantize_tiles(x), wq, ws, sizes,
                                                                    "ragged_dot").astype(BF16)), (x, wq, ws)),
      },
      "dgrad": {
          "fp8": (jit(lambda *a: gmm(*a, sizes, out_dtype=BF16, rhs_transposed=True)), (gq, gs, wq, ws_t)),
          "fp8_quant": (jit(lambda g, wq, ws_t: gmm(*fp8.quantize_tiles(g), wq, ws_t, sizes, out_dtype=BF16,
                                                    rhs_transposed=True)), (dy, wq, ws_t)),
          "fp8_xla": (jit(lambda g, wq_t, ws_t: fp8._ragged_blocked_dot(*fp8.quantize_tiles(g), wq_t, ws_t, sizes,
                                                                        "ragged_dot")[:, :k].astype(BF16)),
                      (dy, wq_t, ws_t)),
      },
      "wgrad": {
          "fp8": (jit(lambda *a: fpp.grouped_weight_grad(*a, fp8._cdiv(sizes), interpret=interp)),
                  (xtq, xts, gtq, gts)),
          "fp8_quant": (jit(lambda x, g: fp8._grouped_weight_grad(x, g, sizes, e, mode)), (x, dy)),
          "fp8_xla": (jit(lambda x, g: fp8._grouped_weight_grad(x, g, sizes, e)), (x, dy)),
      },
  }
  for p in PASSES:
    c[p]["bf16"] = (jit(bf16[p]), (x, w, dy))
  exact = {p: (lambda p=p: exact_grouped(p, x, w, dy, sizes)) for p in PASSES}
  return c, exact, {p: 2.0 * rows * k * n for p in PASSES}, impl


def measure(shape, problem, args, extra):
  contenders, exact, flops, bf16_impl = problem
  for what in PASSES:
    fns = {name: f for name, f in contenders[what].items() if args.xla or name != "fp8_xla"}
    times = common.time_interleaved(fns, warmup=args.warmup, iters=args.iters)
    fused = jax.block_until_ready(fns["fp8"][0](*fns["fp8"][1]))
    rec = dict(shape=shape, what=what, **extra, bf16_impl=bf16_impl, gflop=flops[what] / 1e9,
               rel_err=rel(fused, exact[what]()),
               rel_diff_xla=rel(fused, fns["fp8_xla"][0](*fns["fp8_xla"][1])) if "fp8_xla" in fns else None)
    for name, secs in times.items():
      rec[f"{name}_ms"] = secs * 1e3
      rec[f"{name}_tflops"] = flops[what] / secs / 1e12
    rec["fp8_vs_bf16"] = times["bf16"] / times["fp8"]  # > 1: the fused FP8 GEMM is faster
    rec["fp8_quant_vs_bf16"] = times["bf16"] / times["fp8_quant"]
    if "fp8_xla" in times:
      rec["fp8_vs_xla"] = times["fp8_xla"] / times["fp8"]
    common.emit("fp8_gemm", **rec)


def sweep(args):
  """Block sizes, warps and stages of the fused kernel on the dense and grouped forward."""
  m, k, n = args.tokens, args.hidden, args.dense_ffn
  rows = args.tokens * args.topk
  ks = jax.random.split(jax.random.key(2), 2)
  xq, xs = fp8.quantize_tiles(jax.random.normal(ks[0], (rows, k), BF16))
  sizes = jnp.asarray(group_sizes(rows, args.experts, args.skew))
  wq_d, ws_d = fp8.quantize_blocks(jax.random.normal(ks[1], (n, k), BF16))  # already w^T
  wq_g, ws_g = fp8.quantize_blocks(jax.random.normal(ks[1], (args.experts, args.ffn, k), BF16))
  dense = lambda bm, bn, *a: fpp.blocked_matmul(*a, out_dtype=BF16, rhs_transposed=True, block_m=bm,  # noqa: E731
                                                 block_n=bn)
  grouped = lambda bm, bn, *a: fpp.grouped_matmul(*a, sizes, out_dtype=BF16, rhs_transposed=True,  # noqa: E731
                                                  block_m=bm, block_n=bn)
  cases = {"dense": (dense, (xq[:m], xs[:m], wq_d, ws_d.T), 2.0 * m * k * n),
           "grouped": (grouped, (xq, xs, wq_g, jnp.swapaxes(ws_g, 1, 2)), 2.0 * rows * k * args.ffn)}
  saved = fpp.NUM_WARPS, fpp.NUM_STAGES
  grid = itertools.product(cases.items(), (64, 128), (64, 128, 256), (4, 8), (3, 4, 5))
  for (shape, (fn, operands, flops)), bm, bn, warps, stages in grid:
    fpp.NUM_WARPS, fpp.NUM_STAGES = warps, stages
    cfg = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
    try:
      secs = common.time_fn(jax.jit(functools.partial(fn, bm, bn)), *operands, warmup=2, iters=args.iters)
    except Exception as err:  # shared memory or registers exceeded
      common.emit("sweep_skip", shape=shape, **cfg, error=str(err).splitlines()[0][:160])
      continue
    common.emit("sweep", shape=shape, **cfg, ms=secs * 1e3, tflops=flops / secs / 1e12)
  fpp.NUM_WARPS, fpp.NUM_STAGES = saved


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--hidden", type=int, default=7168)
  p.add_argument("--dense_ffn", type=int, default=18432)
  p.add_argument("--ffn", type=int, default=2048, help="routed expert width")
  p.add_argument("--experts", type=int, default=256)
  p.add_argument("--topk", type=int, default=8)
  p.add_argument("--skew", type=float, default=0.0, help="popularity exponent of the group sizes (0: uniform)")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no_xla", dest="xla", action="store_false", help="skip fp8.py's XLA form (memory)")
  p.add_argument("--sweep", action="store_true", help="also time a grid of kernel configurations")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, kernels in the Pallas interpreter: plumbing only")
  args = p.parse_args(argv)
  if args.smoke:
    args.tokens, args.hidden, args.dense_ffn, args.ffn, args.experts, args.topk = 48, 256, 320, 128, 4, 4
    args.iters, args.warmup = 1, 1
    mode = "interpret"
  elif jax.default_backend() != "gpu":
    raise SystemExit("benchmarks/fp8_gemm.py needs a GPU with FP8 tensor cores (H100, H200); this backend is "
                     f"{jax.default_backend()} ({jax.devices()[0].device_kind}). --smoke runs it interpreted.")
  else:
    mode = "triton"
  common.emit("machine", **common.machine_info())
  blocks = dict(block_m=fpp.BLOCK_M, block_n=fpp.BLOCK_N, num_warps=fpp.NUM_WARPS, num_stages=fpp.NUM_STAGES)
  measure("dense", dense_problem(args.tokens, args.hidden, args.dense_ffn, mode), args,
          dict(m=args.tokens, k=args.hidden, n=args.dense_ffn, groups=1, **blocks))
  rows = args.tokens * args.topk
  measure("grouped", grouped_problem(rows, args.hidden, args.ffn, args.experts, args.skew, mode), args,
          dict(m=rows, k=args.hidden, n=args.ffn, groups=args.experts, **blocks))
  if args.sweep and not args.smoke:
    sweep(args)


if __name__ == "__main__":
  main()
