"""`python -m moe_jax.plot WORKDIR`: PNG figures of a run's loss curves and per-MoE-layer expert load.

Reads WORKDIR/metrics.jsonl and WORKDIR/expert_load.jsonl (written by moe_jax.train) and
writes WORKDIR/plots/loss.png (loss, LM, MTP, validation; learning rate) and
WORKDIR/plots/expert_load_<layer>.png (each expert's share of routed tokens over training,
as a heat map, with its MaxVio = (max - mean) / mean curve under it). matplotlib is an optional extra.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from moe_jax.errors import UserError, main_guard


def _read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file; a last line cut short (a run killed mid-write) is skipped."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  out = []
  for i, (n, line) in enumerate(lines):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1 and not line.endswith("\n"):
        break
      raise UserError(f"{path}:{n}: not a JSON record ({e})") from None
  return out


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise UserError("plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot(workdir: str, out: Optional[str] = None) -> list[str]:
  """Writes the figures; returns their paths."""
  records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if "loss" in r]
  if not train:
    raise UserError(f"{workdir}/metrics.jsonl has no training records; is {workdir!r} a moe_jax workdir?")
  plt = _pyplot()
  out = out or os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  written = []

  fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
  steps = [r["step"] for r in train]
  for key in ("loss", "lm_loss", "mtp_loss"):
    if any(r.get(key) for r in train):
      ax.plot(steps, [r[key] for r in train], label=key)
  val = [r for r in records if "val_loss" in r]
  if val:
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val_loss")
  ax.set_ylabel("cross-entropy (nats)")
  ax.legend()
  ax.grid(alpha=0.3)
  ax_lr.plot(steps, [r["lr"] for r in train])
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("step")
  fig.tight_layout()
  written.append(os.path.join(out, "loss.png"))
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)

  loads = _read_jsonl(os.path.join(workdir, "expert_load.jsonl"))
  layers = sorted({k for r in loads for k in r if k != "step"})
  for layer in layers:
    rows = [r for r in loads if layer in r]
    share = np.array([r[layer] for r in rows])  # [T, E], each row sums to 1
    steps = [r["step"] for r in rows]
    fig, (ax, ax_v) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                   extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, share.shape[1] - 0.5))
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    ax.set_ylabel("expert")
    ax.set_title(f"expert load, {layer} (balanced: {1 / share.shape[1]:.3f} each)")
    ax_v.plot(steps, share.max(1) * share.shape[1] - 1)
    ax_v.set_ylabel("MaxVio")
    ax_v.set_xlabel("step")
    fig.tight_layout()
    written.append(os.path.join(out, f"expert_load_{layer.replace('/', '_')}.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
  return written


def load_heatmap(loads: dict, path: str, title: str = "") -> str:
  """One checkpoint's expert load as a heat map: MoE layers x experts, each cell the expert's share of
  its layer's routed tokens, the layer's MaxVio beside its row. loads: {layer: counts [E]} -> path."""
  from moe_jax.run_log import maxvio
  plt = _pyplot()
  names = list(loads)
  share = np.array([np.asarray(loads[k], np.float64) / max(float(np.sum(loads[k])), 1.0) for k in names])  # [L, E]
  per_layer, mean = maxvio(loads)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * share.shape[1] + 3), max(2.5, 0.4 * len(names) + 1.5)))
  im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
  fig.colorbar(im, ax=ax, label=f"share of routed tokens (balanced: {1 / share.shape[1]:.3f})")
  ax.set_yticks(range(len(names)), [f"{k}  (MaxVio {per_layer[k]:.2f})" for k in names])
  ax.set_xlabel("expert")
  ax.set_title(f"{title}  MaxVio_global {mean:.3f}".strip(), fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


@main_guard
def main(argv: Sequence[str]) -> int:
  if argv in (["--help"], ["-h"]):
    print(__doc__)
    return 0
  if len(argv) != 1 or argv[0].startswith("-"):
    print("error: give one run directory: python -m moe_jax.plot WORKDIR", file=sys.stderr)
    return 2
  if not os.path.isdir(argv[0]):
    print(f"error: {argv[0]}: no such directory (give a train.py --workdir)", file=sys.stderr)
    return 2
  for path in plot(argv[0]):  # a UserError or an unwritable plots/ directory: one line (main_guard)
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
