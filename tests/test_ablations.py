"""benchmarks/ablations.py: the arms are what they claim (equal parameters / expert FLOPs), and a smoke
run of tiny arms writes the JSONL records and the PNG."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import ablations  # noqa: E402
from moe_jax import checkpoint  # noqa: E402
from moe_jax.errors import UserError  # noqa: E402


def test_attention_arms_have_equal_parameters():
  arms = ablations.arm_configs("attention", {}, 10, 5, 1)
  counts = {a: ablations.num_params(c) for a, c in arms.items()}
  mha = counts["MHA"]  # the largest; the others' dense MLP widens to match
  for arm, n in counts.items():
    assert abs(n - mha) <= 3 * 64 / 2, (arm, n, mha)  # within half a unit of MLP width
  kinds = {a: checkpoint.model_config(c) for a, c in arms.items()}
  assert [kinds[a].num_key_value_heads for a in ("MHA", "GQA-4", "MQA")] == [8, 4, 1]
  assert kinds["MLA"].attention_type == "mla" and kinds["MQA"].intermediate_size > kinds["MHA"].intermediate_size


def test_expert_arms_have_equal_activated_and_total_expert_width():
  for arm, c in ablations.arm_configs("experts", {}, 10, 5, 1).items():
    m = checkpoint.model_config(c)
    shared = m.n_shared_experts * m.moe_intermediate_size
    assert m.num_experts_per_tok * m.moe_intermediate_size + shared == 96, arm
    assert m.n_routed_experts * m.moe_intermediate_size + shared == 192, arm


def test_smoke_run_writes_records_and_plot(tmp_path):
  pytest.importorskip("matplotlib")
  out = str(tmp_path)
  # 2 layers (1 MoE), no MTP: two small compiles (one per arm, reused by the second seed)
  overrides = {"batch_size": 8, "seq_len": 16, "model.num_hidden_layers": 2, "model.num_nextn_predict_layers": 0}
  jsonl, png = ablations.run_ablation("balancing", out, seeds=[0, 1], steps=3, eval_every=2, eval_batches=1,
                                      log_every=1, overrides=overrides, arms=["loss-free u=1e-2", "neither"],
                                      printer=lambda *_: None)
  recs = [json.loads(line) for line in open(jsonl)]
  kinds = [r["kind"] for r in recs]
  assert kinds[0] == "machine" and kinds.count("final") == 4 and kinds.count("summary") == 2
  assert kinds.count("run") == 2 * 2 * 3 and kinds.count("eval") == 2 * 2 * 2  # evals at steps 2 and 3
  run = next(r for r in recs if r["kind"] == "run")
  assert {"arm", "seed", "step", "loss", "lm_loss", "maxvio", "maxvio_layers"} <= set(run)
  assert set(run["maxvio_layers"]) == {"layers_1"}
  ev = next(r for r in recs if r["kind"] == "eval")
  assert {"val_loss", "val_maxvio", "val_maxvio_layers"} <= set(ev) and ev["val_maxvio"] >= 0
  summary = [r for r in recs if r["kind"] == "summary"]
  assert [s["arm"] for s in summary] == ["neither", "loss-free u=1e-2"]  # the ablation's order
  for s in summary:
    assert s["seeds"] == [0, 1] and len(s["val_loss_all"]) == 2 and s["val_loss_std"] >= 0
    assert s["tokens"] == 3 * 8 * 16
  # two seeds of one arm: other data and init, so other losses
  finals = [r for r in recs if r["kind"] == "final" and r["arm"] == "neither"]
  assert finals[0]["val_loss"] != finals[1]["val_loss"]
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  table = ablations.markdown_table(jsonl).splitlines()
  assert len(table) == 2 + 2 and table[2].startswith("| neither |") and "+0.0000 ± 0.0000" in table[2]
  with pytest.raises(UserError, match="exists"):  # a saved result is never overwritten
    ablations.run_ablation("balancing", out, seeds=[0], steps=1, eval_every=1, overrides=overrides, arms=["neither"])
  with pytest.raises(UserError, match="unknown arms"):
    ablations.run_ablation("mtp", out, seeds=[0], steps=1, eval_every=1, arms=["nope"])
