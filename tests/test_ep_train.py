"""train.py shows every drop: a capacity-bounded 'ep' run reports dropped_fraction per MoE layer."""

import json
import logging
import os

import numpy as np

from moe_jax import train
from test_train import load_config


def test_capacity_drops_are_reported(tmp_path, caplog):
  c = load_config("tiny", "test")
  c.steps, c.batch_size, c.checkpoint_every, c.log_every = 2, 8, 100, 1
  c.mesh.data, c.mesh.expert = 2, 4
  c.model.moe_impl, c.model.capacity_factor = "ep", 0.5  # half the balanced slots: about half drops
  with caplog.at_level(logging.INFO):
    train.run(c, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f if "loss" in line]
  assert [r["step"] for r in recs] == [1, 2]
  for r in recs:
    assert set(r["dropped_fraction"]) == {"layers_1", "mtp_0/block"}
    assert all(0.3 < v < 0.8 for v in r["dropped_fraction"].values()), r["dropped_fraction"]
    assert r["dropped_fraction_max"] == max(r["dropped_fraction"].values())
  text = caplog.text
  assert "step 1: the MoE dispatch dropped" in text and "capacity_factor=0.5" in text
  routed = 2 * 2 * c.batch_size * c.seq_len * c.model.num_experts_per_tok  # steps x layers x assignments
  dropped = sum(v * routed / 4 for r in recs for v in r["dropped_fraction"].values())
  summary = [m for m in caplog.messages if "routed assignments" in m and "over this run" in m]
  assert summary and f"dropped {round(dropped)} of {routed}" in summary[0], summary
  assert np.isfinite([r["loss"] for r in recs]).all()
