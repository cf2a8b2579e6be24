"""What a training run writes, host side: metrics.jsonl, expert_load.jsonl, TensorBoard and the
progress bar (Logger, process 0); MaxVio and dropped-token figures from a step's expert counts;
the nan policy's verdict; and the repair of a metrics file torn by a crash, on resume.

train.py's loop calls Logger.record(step, metrics) one step late, so that reading a step's metrics
(where the host waits for the device) overlaps the next step's compute.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from moe_jax import flops


class Diverged(RuntimeError):
  """nan_policy='stop' met a non-finite loss; the message names the step."""


def _truncate_jsonl(path: str, last_step: int):
  """Drops records past last_step (written by a run that died after its last checkpoint).

  A line that is not a JSON record (the last line of a write cut short by kill -9 or a full
  disk, or garbage) never blocks a resume: such lines move to PATH.damaged-<n>, with one
  warning. The file is rewritten through a temporary file and a rename, so a crash here loses
  nothing.
  """
  if not os.path.isfile(path):
    return
  with open(path, "rb") as f:
    lines = f.read().splitlines()
  keep, bad = [], []
  for number, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    try:
      rec = json.loads(raw)  # bytes: invalid UTF-8 is a ValueError too
      step = rec.get("step", 0) if isinstance(rec, dict) else None
      if not isinstance(step, (int, float)):
        raise ValueError("not a record")
    except ValueError:
      bad.append((number, raw))
      continue
    if step <= last_step:
      keep.append(raw)
  if bad:
    n = 1
    while os.path.exists(f"{path}.damaged-{n}"):
      n += 1
    with open(f"{path}.damaged-{n}", "wb") as f:
      f.write(b"".join(raw + b"\n" for _, raw in bad))
    which = ("its last line is" if [b[0] for b in bad] == [len(lines)] else
             f"lines {', '.join(str(b[0]) for b in bad[:5])}{' ...' if len(bad) > 5 else ''} of {len(lines)} are")
    logging.warning("%s: %s not a JSON record (a write cut short, e.g. by kill -9 or a full disk): moved to %s; "
                    "resuming", path, which, os.path.basename(f"{path}.damaged-{n}"))
  with open(path + ".tmp", "wb") as f:
    f.write(b"".join(raw + b"\n" for raw in keep))
  os.replace(path + ".tmp", path)


def layer_loads(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{layer name: tokens per expert [E]}: 'layers_1', 'mtp_0/block', 'moe_layers/3' (scanned)."""
  out = {}
  for path, c in counts.items():
    name = path.removesuffix("/moe/router")
    c = np.asarray(c)
    if c.ndim == 1:
      out[name] = c
    else:
      out.update({f"{name}/{i}": row for i, row in enumerate(c)})
  return out


def layer_drops(dropped: dict[str, np.ndarray]) -> dict[str, float]:
  """{layer name (as layer_loads): dropped assignments}, from {MoE path: scalar or [L] (scanned)}."""
  out = {}
  for path, v in dropped.items():
    name, v = path.removesuffix("/moe"), np.asarray(v)
    out.update({name: float(v)} if v.ndim == 0 else {f"{name}/{i}": float(x) for i, x in enumerate(v)})
  return out


def maxvio(loads: dict[str, np.ndarray]) -> tuple[dict[str, float], float]:
  """MaxVio (Wang et al. 2024, arXiv 2408.15664): (max load - mean load) / mean load per MoE layer.

  loads: {layer name: tokens per expert [E]} (layer_loads) -> ({layer: maxvio}, mean over the main
  model's layers). The mean leaves out MTP blocks ('mtp_k/...'), which the paper's models do not have
  and evaluation does not run, so the per-batch and the validation (global) means cover the same layers.
  0 is perfect balance; E - 1 is every token on one expert. A layer that routed nothing counts 0.
  """
  per = {k: float((v.max() - v.mean()) / v.mean()) if v.mean() > 0 else 0.0
         for k, v in ((k, np.asarray(v, np.float64)) for k, v in loads.items())}
  main = [v for k, v in per.items() if not k.startswith("mtp_")] or list(per.values())
  return per, float(np.mean(main)) if main else 0.0


DROP_WARN_FRACTION = 0.01  # warn when a MoE layer drops more than this share of its routed assignments


def nonfinite_cause(m: dict) -> str:
  """Names what was non-finite in a step's (host) metrics: the loss, or a finite loss's gradient."""
  loss, gnorm = float(m["loss"]), float(m["grad_norm"])
  if not np.isfinite(loss):
    return f"non-finite loss ({loss}; lm_loss {float(m['lm_loss'])})"
  return f"non-finite gradient (global norm {gnorm}) with a finite loss ({loss:.6g})"


class Logger:
  """Host side of the metrics: nan policy, progress bar, metrics.jsonl, expert_load.jsonl, TensorBoard."""

  def __init__(self, workdir: str, config, trainer, start: int):
    """trainer: the run's train.Trainer (its stages and model config)."""
    self.config, self.main = config, jax.process_index() == 0
    self.workdir, self.skipped, self.last = workdir, 0, None
    self.latest = None  # the last metrics record written (the run's final summary)
    self.dropped, self.routed = 0.0, 0.0  # assignments over the steps this run recorded (drop-counting layers)
    self.tokens_per_step = config.batch_size * config.seq_len  # the full batch; batch_ramp stages are smaller
    self.stages = trainer.stages
    self.flops_per_step = flops.train_flops_per_token(trainer.mcfg, config.seq_len) * self.tokens_per_step
    if config.peak_flops > 0:
      self.peak, src = config.peak_flops * jax.device_count(), "config.peak_flops"
    else:
      self.peak, src = flops.peak_flops(trainer.mcfg.dtype)
      self.peak *= jax.process_count()
    self.bar, self.tb = None, None
    if self.main:
      logging.info("peak FLOP/s %.3g (%s); model FLOPs per step %.3g", self.peak, src, self.flops_per_step)
      for name in ("metrics.jsonl", "expert_load.jsonl"):
        _truncate_jsonl(os.path.join(workdir, name), start)
      from tqdm import tqdm
      self.bar = tqdm(total=config.steps, initial=start, desc=config.name, dynamic_ncols=True)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        logging.info("tensorboardX is not installed; metrics go to metrics.jsonl only")

  def tokens_seen(self, steps: int) -> float:
    """Tokens trained on in the first `steps` steps (host side, over the batch_ramp stages)."""
    first, b, before = [st for st in self.stages if st[0] <= steps][-1]
    return before + (steps - first) * b * self.config.seq_len

  def _write(self, name: str, record: dict):
    with open(os.path.join(self.workdir, name), "a") as f:
      f.write(json.dumps(record) + "\n")

  def record(self, step: int, metrics: dict):
    """Step `step`'s metrics (device arrays; this is where the host waits for that step)."""
    m = jax.device_get(metrics)
    now = time.perf_counter()
    if bool(m["nonfinite"]):
      what = nonfinite_cause(m)
      if self.config.nan_policy == "stop":
        raise Diverged(f"{what} at step {step}; nan_policy='stop' (the update was not applied)")
      self.skipped += 1
      logging.warning("step %d: %s, update skipped (%d so far)", step, what, self.skipped)
    if not self.main:
      return
    self.bar.update(1)
    drops = self._drops(m)
    first = self.last is None  # its wall time includes compilation: logged, but not timed
    if not first and step % self.config.log_every and step != self.config.steps:
      return
    loads = layer_loads(m["expert_counts"])
    violation, mean_violation = maxvio(loads)  # this batch's MaxVio per layer and its mean
    rec = {"step": step, **{k: float(m[k]) for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm",
                                                     "lr", "accuracy")}}
    rec.update(skipped=self.skipped)
    if violation:
      rec.update(maxvio=mean_violation, maxvio_layers=violation)
    if drops:  # only dispatches that can drop report it: 'capacity', 'ep' (0 unless capacity_factor > 0)
      worst = max(drops, key=drops.get)
      rec.update(dropped_fraction=drops, dropped_fraction_max=drops[worst])
      if drops[worst] > DROP_WARN_FRACTION:
        logging.warning("step %d: the MoE dispatch dropped %.2f%% of the routed assignments in %s "
                        "(model.capacity_factor=%g; 0 is dropless)", step, 100 * drops[worst], worst,
                        self.config.model.capacity_factor)
    if not first:
      n, dt = step - self.last[0], now - self.last[1]
      if len(self.stages) > 1:  # batch_ramp: the steps since the last record may differ in size
        n = (self.tokens_seen(step) - self.tokens_seen(self.last[0])) / self.tokens_per_step
      rec.update(tokens_per_s=n * self.tokens_per_step / dt, flops_per_s=n * self.flops_per_step / dt)
      rec["mfu"] = rec["flops_per_s"] / self.peak
      # lm_loss is what the README and eval quote; total adds MTP and balance losses.
      postfix = dict(lm_loss=f"{rec['lm_loss']:.3f}", total_loss=f"{rec['loss']:.3f}",
                     tok_s=f"{rec['tokens_per_s']:.0f}", mfu=f"{rec['mfu']:.1%}")
      if violation:
        postfix["maxvio"] = f"{mean_violation:.3f}"
      if drops:
        postfix["dropped"] = f"{rec['dropped_fraction_max']:.2%}"
      self.bar.set_postfix(postfix)  # positional: tqdm keeps this order (it sorts keyword arguments)
    self.last = (step, now)
    self._write("metrics.jsonl", rec)
    self.latest = rec
    if loads:
      self._write("expert_load.jsonl", {"step": step, **{k: (v / max(v.sum(), 1)).tolist() for k, v in loads.items()}})
    self.scalars(step, {k: v for k, v in rec.items() if isinstance(v, float)} | {
        f"maxvio/{k}": v for k, v in violation.items()} | {
        f"dropped_fraction/{k}": v for k, v in drops.items()})

  def _drops(self, m: dict) -> dict[str, float]:
    """{layer: dropped / routed assignments} of this step; adds to the run's totals."""
    dropped = layer_drops(m.get("dropped_tokens", {}))
    loads = layer_loads(m["expert_counts"]) if dropped else {}
    out = {}
    for name, d in dropped.items():
      routed = float(loads[name].sum()) if name in loads else 0.0
      self.dropped, self.routed = self.dropped + d, self.routed + routed
      out[name] = d / max(routed, 1.0)
    return out

  def scalars(self, step: int, values: dict):
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def eval(self, step: int, values: dict):
    """Trainer.evaluate's values: scalars, and {layer: value} dicts (val_maxvio_layers) that TensorBoard
    gets as '<name minus _layers>/<layer>'."""
    if self.main:
      self._write("metrics.jsonl", {"step": step, **values})
      flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
      for k, v in values.items():
        if isinstance(v, dict):
          flat.update({f"{k.removesuffix('_layers')}/{layer}": x for layer, x in v.items()})
      self.scalars(step, flat)
      self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items() if not isinstance(v, dict)))

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.main and self.routed:
      (logging.warning if self.dropped else logging.info)(
          "MoE dispatch dropped %d of %d routed assignments (%.3f%%) over this run's steps%s", self.dropped,
          self.routed, 100 * self.dropped / self.routed, " (model.capacity_factor > 0)" if self.dropped else "")
    if self.tb is not None:
      self.tb.close()
