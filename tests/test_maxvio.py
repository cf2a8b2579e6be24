"""MaxVio (Wang et al. 2024): hand-made counts, the validation (global) figure, eval's report and heat map."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from moe_jax import config as model_config
from moe_jax import data, evaluate, scoring, train
from moe_jax.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arg="test"):
  spec = importlib.util.spec_from_file_location("cfg_tiny", os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_maxvio_on_hand_made_counts():
  loads = {"layers_1": np.array([10.0, 2, 4, 4]),   # mean 5, max 10: (10 - 5) / 5 = 1
           "layers_2": np.array([5.0, 5, 5, 5]),    # balanced: 0
           "moe_layers/0": np.array([0.0, 0, 8, 0]),  # all on one of 4 experts: E - 1 = 3
           "mtp_0/block": np.array([40.0, 0, 0, 0])}  # per layer, but not in the mean (no MTP in eval)
  per_layer, mean = train.maxvio(loads)
  assert per_layer == pytest.approx({"layers_1": 1.0, "layers_2": 0.0, "moe_layers/0": 3.0, "mtp_0/block": 3.0})
  assert mean == pytest.approx((1.0 + 0.0 + 3.0) / 3)
  assert train.maxvio({"layers_1": np.zeros(4)}) == ({"layers_1": 0.0}, 0.0)  # nothing routed: not NaN
  assert train.maxvio({}) == ({}, 0.0)
  # scanned stacks: [L, E] counts become one named layer each
  assert train.maxvio(train.layer_loads({"moe_layers/moe/router": np.array([[3.0, 1], [2, 2]])}))[0] == {
      "moe_layers/0": 0.5, "moe_layers/1": 0.0}


def test_validation_maxvio_is_global_over_the_eval_batches():
  c = tiny_config()
  c.batch_size = 8  # the 8 forced host devices take a row each
  trainer = train.Trainer(c)
  state = trainer.init_state(0)
  source = data.make_source(c.data, c.seq_len, c.batch_size, c.seed, trainer.mcfg.vocab_size)
  out = trainer.evaluate(state, source, 3)
  # the same three batches by hand: counts summed first, then MaxVio (not the mean of per-batch MaxVio)
  summed, per_batch = 0, []
  for i in range(3):
    _, counts = trainer._eval_fn(state.params, state.router, trainer.batch(source, "val", i))
    (c_E,) = [np.asarray(v) for v in counts.values()]
    summed = summed + c_E
    per_batch.append((c_E.max() - c_E.mean()) / c_E.mean())
  want = (summed.max() - summed.mean()) / summed.mean()
  assert set(out["val_maxvio_layers"]) == {"layers_1"}  # the main model's one MoE layer
  assert out["val_maxvio"] == pytest.approx(want, rel=1e-6)
  assert out["val_maxvio"] <= np.mean(per_batch) + 1e-6  # summing evens out: global <= mean per batch
  assert summed.sum() == 3 * c.batch_size * c.seq_len * trainer.mcfg.num_experts_per_tok  # every token counted


def test_eval_report_counts_every_token_once_and_draws_the_heat_map(tmp_path):
  cfg = model_config.tiny(vocab_size=264, max_position_embeddings=64)
  model = Transformer(cfg)
  variables = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))
  scorer = scoring.Scorer(model, {k: variables[k] for k in ("params", "router")}, batch_size=2, max_len=16,
                          progress=False)
  tok = data.ByteTokenizer()
  text = tmp_path / "val.txt"
  text.write_text("the quick brown fox jumps over the lazy dog. " * 2)  # 90 bytes: 6 windows, last one short
  loads = {}
  metrics, n = evaluate.eval_lm(scorer, tok, str(text), loads)
  assert n == 89 and set(loads) == {"layers_1"}
  assert loads["layers_1"].sum() == 89 * cfg.num_experts_per_tok  # padding (rows and columns) not counted
  per_layer, mean = train.maxvio(loads)
  assert metrics["maxvio"] == pytest.approx(mean) and metrics["maxvio/layers_1"] == pytest.approx(per_layer["layers_1"])
  pytest.importorskip("matplotlib")
  out = tmp_path / "report.json"
  report = evaluate.run(model, variables, model_name="tiny", tasks=f"lm:{text}", output=str(out), batch_size=2,
                        max_len=16, progress=False, printer=lambda *_: None)
  assert any(r["metric"] == "maxvio" for r in report["results"])
  assert json.loads(out.read_text())["expert_load"]["lm:val.txt"]["layers_1"] == pytest.approx(
      (loads["layers_1"] / loads["layers_1"].sum()).tolist())
  png = tmp_path / "report_expert_load_lm_val.txt.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
