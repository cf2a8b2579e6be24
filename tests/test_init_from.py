"""train.py --config.init_from: runs start from DeepSeek-V2/V3 weights and equal transformers at step 0.

The checkpoints are tiny random models built and saved by transformers (tests/test_hf_parity.py's
build_hf): V3 with one MTP depth (written as layer L, as DeepSeek ships it), in bf16 and in FP8
with 128x128 block scales, and a V2-Lite-shaped one in bf16. Each trains in process
(moe_jax.train.run) on the synthetic copy task, whose rows are plain causal sequences, so
transformers' loss on the same tokens is the reference: fp32 everywhere, step-0 lm_loss (and the
MTP loss) within 1e-4. The FP8 reference is transformers on the dequantized weights.
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from test_cli_errors import one_error
from test_hf_parity import YARN, build_hf, dequantize_ref, quantize_ref
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from moe_jax import convert, data, hf, init_from, train
from moe_jax.config import ModelConfig
from moe_jax.errors import UserError
from test_train import load_config

ROOT = pathlib.Path(__file__).parents[1]
L = 2  # main layers: one dense, one MoE (BASE's first_k_dense_replace=1)
ARCHS = {  # vocab 264 >= the byte tokenizer's 257 ids (convert --from_ckpt exports the run's tokenizer)
    "v3": dict(vocab_size=264, n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_scaling=YARN,
               rope_interleave=True),
    "v2": dict(vocab_size=264, q_lora_rank=None, topk_method="greedy", rope_scaling=YARN),  # V2-Lite-shaped
}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
BATCH, SEQ = 8, 16


# --- checkpoints -------------------------------------------------------------------------------
def _write(path: pathlib.Path, tensors: dict, config: dict) -> pathlib.Path:
  path.mkdir(parents=True)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(config))
  return path


def hf_checkpoint(arch: str, root: pathlib.Path, mtp: bool, **changes) -> tuple[dict, dict]:
  """(fp32 tensors in the released key layout, config.json) of a random transformers model.

  With mtp, transformers builds L+1 layers and layer L becomes MTP depth 1, plus the keys DeepSeek-V3
  ships beside it (enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding and head)."""
  model = build_hf(arch, {**ARCHS[arch], **changes, "num_hidden_layers": L + mtp})
  model.save_pretrained(root / "built")
  tensors = load_file(str(root / "built" / "model.safetensors"))
  config = json.loads((root / "built" / "config.json").read_text())
  shutil.rmtree(root / "built")
  config.update(num_hidden_layers=L, num_nextn_predict_layers=int(mtp))
  if mtp:
    d, rng, p = config["hidden_size"], np.random.RandomState(1), f"model.layers.{L}."
    for name in ("enorm", "hnorm", "shared_head.norm"):
      tensors[p + name + ".weight"] = (1 + 0.2 * rng.randn(d)).astype(np.float32)
    tensors[p + "eh_proj.weight"] = (0.1 * rng.randn(d, 2 * d)).astype(np.float32)
    tensors[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[p + "shared_head.head.weight"] = tensors["lm_head.weight"]
  return tensors, config


def bf16_and_fp8(tensors: dict, config: dict, root: pathlib.Path) -> dict:
  """{'bf16': (dir, fp32 reference dir), 'fp8': (...)}: released-style copies and what they hold, in fp32."""
  is_bias = lambda k: k.endswith("e_score_correction_bias")  # noqa: E731  (released checkpoints keep it fp32)
  bf16 = {k: v if is_bias(k) else v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  out = {"bf16": (_write(root / "bf16", bf16, config),
                  _write(root / "bf16_ref", {k: v.astype(np.float32) for k, v in bf16.items()}, config))}
  fp8, ref = {}, {}
  for k, v in bf16.items():
    if k.endswith("_proj.weight"):  # every projection, as DeepSeek-V3's release (ragged 128x128 edge blocks here)
      q, s = quantize_ref(v.astype(np.float32))
      fp8[k], fp8[k + "_scale_inv"], ref[k] = q, s, dequantize_ref(q, s)
    else:
      fp8[k], ref[k] = v, v.astype(np.float32)
  out["fp8"] = (_write(root / "fp8", fp8, {**config, "quantization_config": FP8_CONFIG}),
                _write(root / "fp8_ref", ref, config))
  return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("init_from")
  v3 = bf16_and_fp8(*hf_checkpoint("v3", root / "v3", mtp=True), root / "v3")
  v2 = bf16_and_fp8(*hf_checkpoint("v2", root / "v2", mtp=False), root / "v2")
  return {"v3_bf16": v3["bf16"], "v3_fp8": v3["fp8"], "v2_bf16": v2["bf16"]}


# --- transformers' side ----------------------------------------------------------------------
def copy_tokens(seed: int = 0) -> np.ndarray:
  """Step 0's batch [BATCH, SEQ + 1] as train.run sees it (one process: rows 0..BATCH-1 in order)."""
  return data.CopySource(SEQ, BATCH, seed).rows("train", 0, np.arange(BATCH))["tokens"]


def _ce(logits: torch.Tensor, targets: np.ndarray) -> float:
  return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).long().flatten()))


def reference(ref_dir: pathlib.Path, tokens: np.ndarray) -> dict:
  """transformers (fp32, eager) on ref_dir: logits of tokens[:, :-1], the LM loss and, for V3, MTP depth 1's loss."""
  from transformers.modeling_layers import MtpModel
  cfg = json.loads((ref_dir / "config.json").read_text())
  cls = DeepseekV3ForCausalLM if cfg["model_type"] == "deepseek_v3" else DeepseekV2ForCausalLM
  main = cls.from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="eager").eval()
  ids = torch.tensor(tokens[:, :-1]).long()
  with torch.no_grad():
    h = main.model(ids).last_hidden_state  # after the final norm: our MTP's input too
    logits = main.lm_head(h)
    out = {"logits": logits.numpy(), "lm_loss": _ce(logits, tokens[:, 1:])}
    if cfg.get("num_nextn_predict_layers"):
      main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]  # where MtpModel finds depth 1
      mtp = MtpModel.from_pretrained(main)
      pos = torch.arange(ids.shape[1] - 1)[None].expand(ids.shape[0], -1)
      # depth 1 at position i: the embedding of token i+1 and h_i, predicting token i+2
      h1 = mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=ids[:, 1:])
      out["mtp_loss"] = _ce(mtp._project_to_logits(h1), tokens[:, 2:])
  return out


def hf_logits(hf_dir: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
  cfg = json.loads((hf_dir / "config.json").read_text())
  cls = DeepseekV3ForCausalLM if cfg["model_type"] == "deepseek_v3" else DeepseekV2ForCausalLM
  model = cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.tensor(tokens[:, :-1]).long()).logits.numpy()


# --- our side ----------------------------------------------------------------------------------
def config_for(init, steps=1, lr=1e-9, **model):
  """configs/tiny.py:test on the copy task; the tiny preset's widths differ from the checkpoints' on purpose."""
  c = load_config("tiny", "test")
  c.init_from = str(init)
  c.data.path = "synthetic:copy"
  c.seq_len, c.batch_size, c.steps = SEQ, BATCH, steps
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, steps
  c.checkpoint.async_save = False
  c.optim.lr, c.optim.warmup, c.optim.bias_update_speed = lr, 2, 0.0
  for k, v in model.items():
    c.model[k] = v
  return c


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_field_split_covers_every_model_field():
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  ckpt, cfg = set(init_from.CHECKPOINT_FIELDS), set(init_from.CONFIG_FIELDS)
  assert not ckpt & cfg and ckpt | cfg == fields, (fields - ckpt - cfg, ckpt & cfg)


# --- step 0 equals transformers; the exported run equals the original --------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["v3_bf16", "v3_fp8", "v2_bf16"])
def test_step0_loss_and_export_equal_transformers(ckpts, name, tmp_path):
  src, ref_dir = ckpts[name]
  tokens = copy_tokens()
  ref = reference(ref_dir, tokens)
  workdir = tmp_path / "run"
  train.run(config_for(src), str(workdir))  # lr 1e-9, no bias update: the exported weights are the loaded ones

  records = metrics(workdir)
  kind = "hf_fp8" if name.endswith("fp8") else "hf"
  assert records[0] == {"step": 0, "init_from": str(src), "init_from_kind": kind}
  first = records[1]
  assert first["step"] == 1 and abs(first["lm_loss"] - ref["lm_loss"]) <= 1e-4, (first["lm_loss"], ref["lm_loss"])
  if "mtp_loss" in ref:
    assert abs(first["mtp_loss"] - ref["mtp_loss"]) <= 1e-4, (first["mtp_loss"], ref["mtp_loss"])

  saved = json.loads((workdir / "config.json").read_text())
  want = hf.config_from_dir(src)
  assert saved["init_from"] == str(src) and saved["init_from_kind"] == kind
  assert {f: saved["model"][f] for f in init_from.CHECKPOINT_FIELDS} == {
      f: want.to_dict()[f] for f in init_from.CHECKPOINT_FIELDS}
  assert saved["model"]["num_nextn_predict_layers"] == (1 if name.startswith("v3") else 0)
  assert saved["model"]["aux_loss_alpha"] == 1e-4  # a training field: the preset's, not the checkpoint's

  out = tmp_path / "exported"
  assert convert.main(["--from_ckpt", str(workdir), "--to_hf", str(out)]) == 0
  np.testing.assert_allclose(hf_logits(out, tokens), ref["logits"], atol=1e-4, rtol=0)


def test_eval_weights_fp8_or_dense(ckpts):
  """eval.py --hf --weights: dense gives transformers' logits; auto keeps a released FP8 directory in
  FP8 (e4m3 + scales), whose logits are the FP8 recipe's on the dequantized weights (re-quantizing
  a 128x128 block gives back its e4m3 values and scale); fp8 on a bf16 directory is refused."""
  from moe_jax import loading
  src, ref_dir = ckpts["v3_fp8"]
  tokens = jnp.asarray(copy_tokens()[:, :-1])
  dense_model, dense, _ = loading.load_model(hf=str(src), weights="dense", mesh_shape=(1, 2, 4, 1))
  kept_model, kept, _ = loading.load_model(hf=str(src), mesh_shape=(1, 2, 4, 1))  # auto
  assert not dense_model.cfg.fp8 and "fp8_scales" not in dense
  assert kept_model.cfg.fp8 and "fp8_scales" in kept
  np.testing.assert_allclose(jax.jit(dense_model.apply)(dense, tokens), reference(ref_dir, copy_tokens())["logits"],
                             atol=1e-4, rtol=0)
  recipe = type(dense_model)(dense_model.cfg.replace(fp8=True))
  want = np.asarray(jax.jit(recipe.apply)(dense, tokens))
  got = np.asarray(jax.jit(kept_model.apply)(kept, tokens))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(UserError, match="--weights=fp8: .* stores no FP8 weights"):
    loading.load_model(hf=str(ckpts["v3_bf16"][0]), weights="fp8")
  with pytest.raises(UserError, match="--weights=dense applies to --hf only"):
    loading.load_model(preset="tiny", weights="dense")


def test_plan_and_aot_build_the_checkpoint_shape(ckpts, tmp_path, capsys):
  """plan and aot size the model train.py would build from init_from (the checkpoint's shape
  fields, from headers only), not the preset's; aot's --layers cuts that model."""
  import argparse
  from flax import linen as nn
  from moe_jax import aot, plan
  from moe_jax.variables import abstract as abstract_variables
  src, _ = ckpts["v2_bf16"]
  want = hf.config_from_dir(src)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg_file = tmp_path / "from_v2.py"
  cfg_file.write_text(f"import sys\nsys.path.insert(0, {root!r})\nfrom configs.tiny import get_config as tiny\n\n"
                      f"def get_config(arg='test'):\n  c = tiny(arg)\n  c.init_from = {str(src)!r}\n  return c\n")
  assert plan.main([f"--config={cfg_file}", "--mesh=1,1,1,1", "--batch=1", "--seq=16"]) in (None, 0)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_variables(want))))
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total_params"] == params
  args = argparse.Namespace(config="configs/tiny.py:test", mesh=None, dcn=None, num_slices=1, layers=None, seq=None,
                            batch=None, set=[f"init_from={src}"])
  built = aot.build_config(args)
  assert {f: built.model.to_dict()[f] for f in init_from.CHECKPOINT_FIELDS} == {
      f: want.to_dict()[f] for f in init_from.CHECKPOINT_FIELDS}
  proxy = aot.build_config(argparse.Namespace(**{**vars(args), "layers": 1}))
  assert proxy.model.num_hidden_layers == 1 and proxy.model.hidden_size == want.hidden_size


# --- training moves on from the loaded weights ---------------------------------------------------
@pytest.mark.slow
def test_fp8_checkpoint_trains_in_fp8(ckpts, tmp_path):
  """model.fp8=True: master weights dequantized to fp32, re-quantized per 128x128 block by the FP8 recipe."""
  src, ref_dir = ckpts["v3_fp8"]
  ref = reference(ref_dir, copy_tokens())
  train.run(config_for(src, steps=10, lr=3e-3, fp8=True), str(tmp_path))
  losses = [r["lm_loss"] for r in metrics(tmp_path) if "lm_loss" in r]
  assert abs(losses[0] - ref["lm_loss"]) < 0.05  # e4m3 activations: close, not equal
  assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_v2_continues_from_a_run_step_and_restarts_resume(ckpts, tmp_path):
  """init_from a train.py step directory (kind 'workdir'), scan_layers on here and off there; the loss
  falls; a restart resumes from its own checkpoint, never from init_from again."""
  src, ref_dir = ckpts["v2_bf16"]
  first = tmp_path / "first"
  train.run(config_for(src), str(first))
  step_dir = first / "checkpoints" / "1"
  config = config_for(step_dir, steps=10, lr=3e-3, scan_layers=True)
  second = tmp_path / "second"
  train.run(config, str(second))
  records = metrics(second)
  assert records[0] == {"step": 0, "init_from": str(step_dir), "init_from_kind": "workdir", "init_from_step": 1}
  losses = [r["lm_loss"] for r in records if "lm_loss" in r]
  assert abs(losses[0] - reference(ref_dir, copy_tokens())["lm_loss"]) <= 1e-4  # lr 1e-9 for one step there
  assert losses[-1] < losses[0] - 0.5, losses

  shutil.rmtree(first)  # the source is gone: a restart must not need it
  config.steps = 12
  out = train.run(config, str(second))
  records = metrics(second)
  assert out["step"] == 12 and [r["step"] for r in records] == list(range(0, 13))
  assert records[11]["lm_loss"] < losses[0] - 0.5  # continued from step 10, not from the loaded weights


# --- what init_from reads, and its errors -------------------------------------------------------
def test_resolve_takes_shape_fields_from_the_checkpoint_with_one_notice(ckpts, caplog):
  src, _ = ckpts["v3_bf16"]
  config = config_for(src, dtype="float32", scan_layers=True)
  with caplog.at_level(logging.INFO, logger="absl"):
    resolved, origin = init_from.resolve(config)
  notices = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
  assert len(notices) == 1 and "intermediate_size 128 -> 160" in notices[0] and "vocab_size" not in notices[0]
  assert origin.kind == "hf" and resolved.init_from_kind == "hf"
  want = hf.config_from_dir(src)
  for f in init_from.CHECKPOINT_FIELDS:
    assert init_from._norm(f, resolved.model[f]) == init_from._norm(f, getattr(want, f)), f
  assert resolved.model.scan_layers is True and resolved.model.moe_impl == config.model.moe_impl
  assert config.model.intermediate_size == 128  # the caller's config is left as it was


def test_explicit_shape_flag_must_agree(ckpts):
  src, _ = ckpts["v3_bf16"]
  config = config_for(src)
  config.model.hidden_size = 96
  with pytest.raises(UserError, match=r"--config.model.hidden_size=96 contradicts .* has hidden_size=64"):
    init_from.check_explicit(config, ["hidden_size"])
  init_from.check_explicit(config, ["dtype", "scan_layers"])  # compute fields follow the config
  config.model.hidden_size = 64
  init_from.check_explicit(config, ["hidden_size"])  # agreeing is fine


@pytest.mark.slow
def test_convert_checkpoint_and_scan_layout_load_exactly(ckpts, tmp_path):
  """A `convert --hf --scan_layers` checkpoint into an unscanned run: the same variables as hf.load_pretrained."""
  src, _ = ckpts["v3_bf16"]
  ckpt = convert.hf_to_ckpt(src, tmp_path / "ckpt", scan_layers=True)
  assert init_from.detect(str(ckpt)).kind == "convert"
  resolved, origin = init_from.resolve(config_for(ckpt))
  trainer = train.Trainer(resolved)
  state, info = train._init_from_state(trainer, origin, seed=0)
  _, want = hf.load_pretrained(src)
  got = {"params": state.params, "router": state.router}
  flat_got, flat_want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  placed = traverse_util.flatten_dict({"params": trainer.state_sharding.params, "router": trainer.state_sharding.router})
  assert flat_got.keys() == flat_want.keys()
  for k in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]), err_msg=str(k))
    assert flat_got[k].sharding == placed[k], k
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # Adam's mu and nu: a fresh optimizer
  assert int(state.step) == 0 and moments and all(not np.any(np.asarray(x)) for x in moments)


# Bad input: one error, before any weight is placed or anything compiles; the workdir stays as it was.
def _vocab16(root: pathlib.Path) -> pathlib.Path:
  if not (root / "v16").exists():
    tensors, config = hf_checkpoint("v2", root / "v16_build", mtp=False, vocab_size=16)
    _write(root / "v16", tensors, config)
  return root / "v16"


def _no_scale(root: pathlib.Path, fp8_dir: pathlib.Path) -> pathlib.Path:
  if not (root / "no_scale").exists():
    reader = hf.SafetensorsReader(fp8_dir)  # safetensors' numpy backend cannot read float8
    tensors = {k: reader.read(k) for k in reader.keys()}
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    _write(root / "no_scale", tensors, json.loads((fp8_dir / "config.json").read_text()))
  return root / "no_scale"


def _llama(root: pathlib.Path, bf16_dir: pathlib.Path) -> pathlib.Path:
  if not (root / "llama").exists():
    shutil.copytree(bf16_dir, root / "llama")
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (root / "llama" / "config.json").write_text(json.dumps(cfg))
  return root / "llama"


BAD = {  # name -> (init_from, built on first use; data config changes; the error's pattern)
    "missing": (lambda ckpts, root: root / "nope", {}, "config.init_from=.*nope: no such directory"),
    "not_deepseek": (lambda ckpts, root: _llama(root, ckpts["v3_bf16"][0]), {},
                     "unsupported architecture model_type='llama'"),
    "vocab_below_tokenizer": (lambda ckpts, root: _vocab16(root), {"path": ""},
                              r"vocab_size 16, smaller than data.tokenizer 'byte' \(257 ids\)"),
    "vocab_below_data": (lambda ckpts, root: _vocab16(root), {},
                         r"vocab_size 16, but data.path 'synthetic:copy' holds token id 17"),
    "fp8_without_scales": (lambda ckpts, root: _no_scale(root, ckpts["v3_fp8"][0]), {},
                           r"experts\.3\.up_proj\.weight' is F8_E4M3 but .*_scale_inv is missing"),
}


@pytest.fixture
def bad_root(tmp_path_factory):
  root = tmp_path_factory.getbasetemp() / "bad"
  root.mkdir(exist_ok=True)
  return root


@pytest.mark.parametrize("name", list(BAD))
def test_bad_init_from_leaves_the_workdir_untouched(ckpts, bad_root, tmp_path, name):
  build, changes, message = BAD[name]
  config = config_for(build(ckpts, bad_root))
  config.data.update(changes)
  for workdir in (tmp_path / "new", tmp_path / "existing"):
    if workdir.name == "existing":
      workdir.mkdir()
    with pytest.raises(UserError, match=message):
      train.run(config, str(workdir))
    if workdir.name == "new":
      assert not workdir.exists()
    else:  # no claim (config.json), checkpoint or record
      assert not {"config.json", "checkpoints", "metrics.jsonl"} & set(os.listdir(workdir)), os.listdir(workdir)


@pytest.mark.slow
def test_cli_errors_are_one_line_before_compiling(ckpts, bad_root, tmp_path):
  cases = {name: (build(ckpts, bad_root), {"path": "synthetic:copy", **changes}, [], message)
           for name, (build, changes, message) in BAD.items()}
  cases["explicit_shape"] = (ckpts["v3_bf16"][0], {"path": "synthetic:copy"}, ["--config.model.hidden_size=96"],
                             r"--config.model.hidden_size=96 contradicts .* has hidden_size=64")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  procs = {}
  for name, (init, data_cfg, flags, _) in cases.items():
    cmd = [sys.executable, "train.py", "--config=configs/tiny.py:test", f"--workdir={tmp_path / name}",
           f"--config.init_from={init}", "--config.batch_size=8",
           *[f"--config.data.{k}={v}" for k, v in data_cfg.items()], *flags]
    procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, err[-2000:])
    assert re.search(cases[name][3], one_error(err)), (name, one_error(err))
    assert "compiling the step" not in err, name
    assert not (tmp_path / name).exists(), name
