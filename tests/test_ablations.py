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


def test_smoke_run_writes_records_and_plot(tmp_path, monkeypatch):
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
  # --append: refusals (a finished arm x seed, other settings) write nothing; a new seed adds records after the old
  before = open(jsonl, "rb").read()
  with pytest.raises(UserError, match="already finished there: neither seed 1"):
    ablations.run_ablation("balancing", out, seeds=[1, 2], steps=3, eval_every=2, eval_batches=1,
                           overrides=overrides, arms=["neither"], append=True)
  with pytest.raises(UserError, match="steps is 3 there, 4 here"):
    ablations.run_ablation("balancing", out, seeds=[2], steps=4, eval_every=2, eval_batches=1,
                           overrides=overrides, arms=["neither"], append=True)
  with pytest.raises(UserError, match="eval_every is 2 there, 3 here"):
    ablations.run_ablation("balancing", out, seeds=[2], steps=3, eval_every=3, eval_batches=1,
                           overrides=overrides, arms=["neither"], append=True)
  assert open(jsonl, "rb").read() == before

  # the appended run's training is stood in for (its path is the one trained above): this checks the
  # file handling without a third compile, which would double this test's time on a loaded machine
  def fake_train_arm(trainer, arm, seed, log_every, write):
    for step in (2, 3):
      write({"kind": "eval", "arm": arm, "seed": seed, "step": step, "val_loss": 5.0 - step, "val_maxvio": 0.5,
             "val_maxvio_layers": {"layers_1": 0.5}})
    return {"kind": "final", "arm": arm, "seed": seed, "steps": 3, "val_loss": 2.0, "val_maxvio": 0.5,
            "params": trainer.num_params, "tokens": 3 * 8 * 16, "train_s": 0.0, "compile_s": 0.0, "step_s": 0.0,
            "kv_values_per_token_layer": 1, "kv_bytes_per_token_bf16": 4}
  monkeypatch.setattr(ablations, "train_arm", fake_train_arm)
  ablations.run_ablation("balancing", out, seeds=[2], steps=3, eval_every=2, eval_batches=1, log_every=1,
                         overrides=overrides, arms=["neither"], append=True, printer=lambda *_: None)
  after = open(jsonl, "rb").read()
  assert after.startswith(before)
  recs = [json.loads(line) for line in after.decode().splitlines()]
  machines = [r for r in recs if r["kind"] == "machine"]
  assert [m["append"] for m in machines] == [False, True] and machines[1]["seeds"] == [2]
  last = {r["arm"]: r for r in recs if r["kind"] == "summary"}  # the last summary of an arm is current
  assert last["neither"]["seeds"] == [0, 1, 2] and last["loss-free u=1e-2"]["seeds"] == [0, 1]
  table = ablations.markdown_table(jsonl).splitlines()
  assert table[2].startswith("| neither |") and table[2].split("|")[3].count(" / ") == 2  # three seeds
  assert table[3].split("|")[3].count(" / ") == 1
  assert " 2.0000 " in table[2].split("|")[3]  # the appended seed's final is in the table
  with pytest.raises(UserError, match="unknown arms"):
    ablations.run_ablation("mtp", out, seeds=[0], steps=1, eval_every=1, arms=["nope"])


def test_read_records_drops_a_killed_runs_torn_line_only(tmp_path):
  path = tmp_path / "balancing.jsonl"
  machine, final = '{"kind": "machine", "ablation": "balancing"}', '{"kind": "final", "arm": "neither", "seed": 0}'
  path.write_text(machine + "\n" + final + "\n" + '{"kind": "ru')  # killed mid-line
  assert [r["kind"] for r in ablations.read_records(str(path))] == ["machine", "final"]
  path.write_text(machine + "\n" + '{"kind": "ru\n' + machine + "\n" + final + "\n")  # then an --append run
  assert [r["kind"] for r in ablations.read_records(str(path))] == ["machine", "machine", "final"]
  path.write_text(machine + "\n" + '{"kind": "ru\n' + final + "\n")  # damage inside a run
  with pytest.raises(UserError, match="balancing.jsonl:2: a damaged line"):
    ablations.read_records(str(path))
  with pytest.raises(UserError, match="no such file"):
    ablations.markdown_table(str(tmp_path / "missing.jsonl"))
