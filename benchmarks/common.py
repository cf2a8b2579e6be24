"""Shared benchmark plumbing: machine line, JSON-line output, timing, the measured matmul peak.

Every script prints one JSON object a line: first a `machine` record (cpu, cores, jax and
jaxlib versions, backend, device kind, date, load average), then one record per figure.
Timings are medians of N calls after warmup, each call ended by block_until_ready; when
two functions are compared they run interleaved (a, b, a, b, ...) so a busy shared machine
slows both alike and their ratio holds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def machine_info() -> dict:
  """What a figure was measured on: cpu, cores, versions, backend, device kind, date, load."""
  import jaxlib
  dev = jax.devices()[0]
  return {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "python": platform.python_version(), "backend": jax.default_backend(), "device_kind": dev.device_kind,
          "devices": jax.device_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "loadavg": load_average(), "argv": " ".join(sys.argv)}


def emit(kind: str, **fields) -> dict:
  """Prints one JSON line {"kind": kind, ...fields} (floats rounded to 4 significant digits)."""
  rec = {"kind": kind, **{k: _round(v) for k, v in fields.items()}}
  print(json.dumps(rec), flush=True)
  return rec


def _round(v):
  if isinstance(v, float):
    return float(f"{v:.4g}")
  if isinstance(v, dict):
    return {k: _round(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_round(x) for x in v]
  return v


def block(x):
  return jax.block_until_ready(x)


def time_once(fn: Callable, *args) -> float:
  t = time.perf_counter()
  block(fn(*args))
  return time.perf_counter() - t


def time_fn(fn: Callable, *args, warmup: int = 2, iters: int = 10) -> float:
  """Median seconds of fn(*args) over `iters` calls after `warmup` calls (compilation included there)."""
  for _ in range(warmup):
    block(fn(*args))
  return statistics.median(time_once(fn, *args) for _ in range(iters))


def time_interleaved(fns: dict[str, tuple[Callable, Sequence]], warmup: int = 2, iters: int = 10) -> dict[str, float]:
  """{name: median seconds}, the functions called in turn (a, b, c, a, b, c, ...) so load hits all alike."""
  for _ in range(warmup):
    for fn, args in fns.values():
      block(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, (fn, args) in fns.items():
      times[name].append(time_once(fn, *args))
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(dtype: str = "float32", size: int = 1024, iters: int = 10) -> float:
  """Measured FLOP/s of one jitted [size, size] x [size, size] matmul of `dtype` (median of iters)."""
  x = jnp.ones((size, size), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  return 2 * size ** 3 / time_fn(mm, x, x, warmup=2, iters=iters)


def interleaved_with_peak(fns: dict[str, tuple[Callable, Sequence]], dtype: str, size: int = 1024, warmup: int = 2,
                          iters: int = 10) -> tuple[dict[str, float], float]:
  """time_interleaved with the dense matmul peak as one more contender: (times, peak FLOP/s)."""
  x = jnp.ones((size, size), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  times = time_interleaved({**fns, "_peak": (mm, (x, x))}, warmup, iters)
  return {k: v for k, v in times.items() if k != "_peak"}, 2 * size ** 3 / times["_peak"]


def count_compiles():
  """A context manager whose value counts the XLA compilations started inside it (jax.monitoring)."""
  return _CompileCounter()


class _CompileCounter:
  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    self._on = False

  def _listener(self, event, duration, **kw):
    if self._on and event == self.EVENT:
      self.count += 1

  def __enter__(self):
    if not getattr(_CompileCounter, "_registered", False):
      jax.monitoring.register_event_duration_secs_listener(_CompileCounter._dispatch)
      _CompileCounter._registered = True
    _CompileCounter._active.append(self)
    self._on = True
    return self

  def __exit__(self, *exc):
    self._on = False
    _CompileCounter._active.remove(self)

  _active: list = []

  @staticmethod
  def _dispatch(event, duration, **kw):
    for c in _CompileCounter._active:
      c._listener(event, duration, **kw)


# --- configs ------------------------------------------------------------------------------
def bench10m(**kw):
  """~10M parameters, DeepSeek-V3-shaped (MLA with q_lora, 1 dense + 4 MoE layers, 16 experts top-4 in
  4 groups, 1 shared expert, sigmoid noaux_tc routing); no MTP and no balance loss, which
  transformers' DeepseekV3ForCausalLM does not train, so both sides compute the same step."""
  from moe_jax.config import ModelConfig
  base = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
              num_hidden_layers=5, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
              n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
              num_nextn_predict_layers=0, aux_loss_alpha=0.0, max_position_embeddings=512)
  base.update(kw)
  return ModelConfig(**base)


def bench1b(**kw):
  """~1B parameters, fine-grained DeepSeek-V3-shaped MoE for one GPU: 12 layers (1 dense + 11 MoE),
  64 routed experts of width 384 (top-6 in 8 groups, 4 groups per token) + 2 shared, MLA with
  q_lora; qk and v head dims both 128 so cuDNN flash attention takes them unpadded; bf16; layers
  scanned (one compiled layer per stack: the Pallas grouped matmul compiles per call site)."""
  from moe_jax.config import ModelConfig
  base = dict(vocab_size=32768, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384,
              num_hidden_layers=12, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=96,
              qk_rope_head_dim=32, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
              n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1,
              num_nextn_predict_layers=0, aux_loss_alpha=1e-4, max_position_embeddings=4096,
              dtype="bfloat16", attention_impl="dot_product", scan_layers=True)
  base.update(kw)
  return ModelConfig(**base)


def user8k(**kw):
  """The shape of the user-path measurement in issue 15 (not tuned for): vocab 8192, d 256, 4 layers
  (1 dense), 8 heads, q_lora 128, kv_lora 64, 16 experts top-4 in 4 groups, 1 shared, fp32."""
  from moe_jax.config import ModelConfig
  base = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
              num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
              n_group=4, topk_group=2, n_shared_experts=1, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
  base.update(kw)
  return ModelConfig(**base)


CONFIGS = {"bench10m": bench10m, "bench1b": bench1b, "user8k": user8k}


def parser(doc: str, what: str, smoke: str) -> argparse.ArgumentParser:
  """The flags every model benchmark shares: --config/--set (the model), --batch/--seq, --warmup, --smoke.

  doc: the script's docstring (its first line is the description); what: what --config shapes;
  smoke: what --smoke runs. Scripts add their own flags (--iters, --steps, ...) to the result.
  """
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--config", default="bench10m", help=f"{', '.join(CONFIGS)} or a moe_jax.config preset: {what}")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="ModelConfig override")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--warmup", type=int, default=2, help="untimed calls first")
  p.add_argument("--smoke", action="store_true", help=f"{smoke}: checks the plumbing only")
  return p


def model_config(name: str, overrides: Sequence[str] = ()):
  """'bench10m', 'bench1b' or a moe_jax.config preset name, with FIELD=VALUE overrides (Python literals or strings)."""
  import ast
  from moe_jax import config as mc
  kw = {}
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      kw[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      kw[key] = value
  if name in CONFIGS:
    return CONFIGS[name](**kw)
  if name not in mc.PRESETS:
    raise SystemExit(f"unknown config {name!r}; known: {', '.join(CONFIGS)}, {', '.join(mc.PRESETS)}")
  return mc.PRESETS[name](**kw)


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))

