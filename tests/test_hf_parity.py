"""moe_jax against transformers' DeepseekV2/V3ForCausalLM, and Hugging Face checkpoints in and out.

Each case builds a tiny random HF model (weights scaled so routing is not tied), saves it with
transformers' own save_pretrained (the released per-expert key layout), loads it with
moe_jax.hf.load_pretrained and compares logits (fp32, max |diff| <= 1e-4) and the experts each
token was routed to. Then back: moe_jax.hf.save_pretrained -> transformers' from_pretrained.
"""

import json
import math
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from moe_jax import config as mcfg
from moe_jax import hf
from moe_jax.layers import Router
from moe_jax.model import Transformer

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=160, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1, rope_theta=10000.0,
            attn_implementation="eager")
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
# name: (architecture, HF config changes, moe_jax config overrides on load)
CASES = {
    "v3_groups_yarn": ("v3", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
                                  rope_scaling=YARN, rope_interleave=True), {}),
    "v3_no_q_lora_halves_scan": ("v3", dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                                            norm_topk_prob=False), {"scan_layers": True}),
    "v2_greedy_yarn": ("v2", dict(q_lora_rank=None, topk_method="greedy", rope_scaling=YARN), {}),
    "v2_group_limited": ("v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    routed_scaling_factor=16.0), {}),
}
TOKENS = np.random.RandomState(0).randint(0, BASE["vocab_size"], (2, 40))


def build_hf(arch: str, changes: dict, seed: int = 0):
  """A random HF model: std-0.1 weights, norm scales around 1, router logits O(1), negative V3 biases."""
  torch.manual_seed(seed)
  kw = {**BASE, **changes}
  model = (DeepseekV3ForCausalLM(DeepseekV3Config(**kw)) if arch == "v3"
           else DeepseekV2ForCausalLM(DeepseekV2Config(**kw)))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith("mlp.gate.weight"):
        p.normal_(0, 0.3)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(-0.3 * torch.rand_like(b))
  return model.eval()


def hf_forward(model, tokens):
  """-> (logits [B, S, V], per MoE layer the chosen experts [B*S, X]) from a hook on each router."""
  chosen = []
  hooks = [m.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].numpy()))
           for name, m in model.named_modules() if name.endswith("mlp.gate")]
  with torch.no_grad():
    logits = model(torch.tensor(tokens)).logits.numpy()
  for h in hooks:
    h.remove()
  return logits, chosen


def jax_forward(model, variables, tokens):
  """-> (logits, per MoE layer the chosen experts [B*S, X]) captured from each Router's output."""
  def run(v, t):
    return model.apply(v, t, capture_intermediates=lambda mdl, _: isinstance(mdl, Router), mutable=["intermediates"])
  logits, state = jax.jit(run)(variables, jnp.asarray(tokens, jnp.int32))
  flat = traverse_util.flatten_dict(state["intermediates"])
  chosen = []
  for path in sorted(p for p in flat if p[-1] == "__call__"):
    idx = np.asarray(flat[path][0][1])
    idx = idx.reshape((-1,) + idx.shape[-3:]) if model.cfg.scan_layers else idx[None]  # scan stacks layers
    chosen += [i.reshape(-1, i.shape[-1]) for i in idx]
  return np.asarray(logits), chosen


def random_variables(model, seed):
  """Random values for the model's abstract variables (nothing to compile): weights N(0, 0.1^2),
  norm scales near 1, negative router biases."""
  rng = np.random.RandomState(seed)

  def value(path, shape):
    if path[-1] == "scale":
      return 1 + 0.2 * rng.randn(*shape)
    return -0.3 * rng.rand(*shape) if path[0] == "router" else 0.1 * rng.randn(*shape)
  flat = hf.abstract_variables(model)
  return traverse_util.unflatten_dict({p: value(p, s.shape).astype(np.float32) for p, s in flat.items()})


def tree_equal(a, b) -> bool:
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  return fa.keys() == fb.keys() and all(
      np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
  arch, changes, overrides = CASES[request.param]
  hf_model = build_hf(arch, changes)
  path = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(path)
  ref, ref_chosen = hf_forward(hf_model, TOKENS)
  model, variables = hf.load_pretrained(path, **overrides)
  logits, chosen = jax_forward(model, variables, TOKENS)
  return types.SimpleNamespace(name=request.param, arch=arch, hf_model=hf_model, path=path, overrides=overrides,
                               ref=ref, ref_chosen=ref_chosen, model=model, variables=variables, logits=logits,
                               chosen=chosen)


def test_logits_equal_transformers(case):
  assert case.logits.shape == (*TOKENS.shape, BASE["vocab_size"])
  assert np.abs(case.logits - case.ref).max() <= 1e-4


def test_same_experts_chosen(case):
  cfg = case.model.cfg
  assert len(case.chosen) == len(case.ref_chosen) == cfg.num_moe_layers == 2
  for ours, theirs in zip(case.chosen, case.ref_chosen):
    np.testing.assert_array_equal(np.sort(ours, -1), np.sort(theirs, -1))
  if cfg.group_limited:  # the case really exercises group limiting: tokens stay within topk_group groups
    groups = np.concatenate(case.chosen) // cfg.experts_per_group
    assert max(len(set(g)) for g in groups) <= cfg.topk_group


def test_saved_checkpoint_loads_in_transformers(case, tmp_path):
  hf.save_pretrained(case.model, case.variables, tmp_path, max_shard_bytes=100_000)  # several shards
  assert (tmp_path / "model.safetensors.index.json").exists()
  cls = DeepseekV3ForCausalLM if case.arch == "v3" else DeepseekV2ForCausalLM
  reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
  logits, chosen = hf_forward(reloaded, TOKENS)
  assert np.abs(logits - case.logits).max() <= 1e-4
  for a, b in zip(chosen, case.ref_chosen):
    np.testing.assert_array_equal(a, b)
  # and back into moe_jax: exactly the same variables
  _, again = hf.load_pretrained(tmp_path, **case.overrides)
  assert tree_equal(again, case.variables)


def test_mtp_layer_round_trip_and_equals_transformers_mtp(tmp_path):
  """An MTP model saved as layer L (+ embed/head copies) loads back exactly; transformers' MtpModel agrees."""
  from transformers.modeling_layers import MtpModel
  cfg = mcfg.tiny(initializer_range=0.1)
  model = Transformer(cfg)
  tokens = jnp.asarray(TOKENS % cfg.vocab_size, jnp.int32)
  variables = random_variables(model, seed=1)
  logits, mtp = jax.jit(lambda v, t: model.apply(v, t, return_mtp=True))(variables, tokens)

  hf.save_pretrained(model, variables, tmp_path, max_shard_bytes=200_000)
  loaded_model, loaded = hf.load_pretrained(tmp_path)
  assert loaded_model.cfg.num_nextn_predict_layers == 1
  assert tree_equal(loaded, variables)
  _, no_mtp = hf.load_pretrained(tmp_path, num_nextn_predict_layers=0)  # MTP keys skipped on request
  assert "mtp_0" not in no_mtp["params"]

  main = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  # transformers finds MTP keys by this pattern (layer 61 for the real model); ours sit at layer L.
  main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_hidden_layers}\..*"]
  ids = torch.tensor(np.asarray(tokens))
  with torch.no_grad():
    h = main.model(ids).last_hidden_state  # after the final norm, as our MTP input
    assert np.abs(main.lm_head(h).numpy() - np.asarray(logits)).max() <= 1e-4
    mtp_model = MtpModel.from_pretrained(main)
    pos = torch.arange(ids.shape[1] - 1)[None].expand(ids.shape[0], -1)
    # depth 1 at position i: the embedding of token i+1 and h_i, as moe_jax's MTP
    h1 = mtp_model.forward_layer(0, h[:, :-1], pos, None, input_ids=ids[:, 1:])
    ref = mtp_model._project_to_logits(h1).numpy()
  assert np.abs(ref - np.asarray(mtp)[0, :, :-1]).max() <= 1e-4


def test_v2_save_rejects_nonzero_bias(tmp_path):
  """transformers' V2 router has no correction bias: a non-zero one cannot be saved silently."""
  cfg = mcfg.tiny(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                  num_nextn_predict_layers=0)
  model = Transformer(cfg)
  shapes = hf.abstract_variables(model)
  zeros = traverse_util.unflatten_dict({k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()})
  biased = jax.tree.map(lambda b: b + 0.5, zeros["router"])
  with pytest.raises(ValueError, match="e_score_correction_bias is non-zero"):
    hf.save_pretrained(model, {"params": zeros["params"], "router": biased}, tmp_path / "a")
  hf.save_pretrained(model, zeros, tmp_path / "b")
  assert json.loads((tmp_path / "b" / "config.json").read_text())["architectures"] == ["DeepseekV2ForCausalLM"]


# --- errors ---------------------------------------------------------------------------
KEY = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("v3_ckpt")
  build_hf("v3", CASES["v3_groups_yarn"][1]).save_pretrained(path)
  return path


def rewrite(src, dst, edit=None, edit_config=None):
  """Copies a single-file checkpoint, letting `edit` change the tensors dict and `edit_config` the config."""
  from safetensors.numpy import save_file
  reader = hf.SafetensorsReader(src)
  tensors = {k: reader.read(k) for k in reader.keys()}
  config = json.loads((src / "config.json").read_text())
  if edit:
    edit(tensors)
  if edit_config:
    edit_config(config)
  dst.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  (dst / "config.json").write_text(json.dumps(config))
  return dst


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(KEY), r"missing tensors 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'.*\(24, 64\)"),
    (lambda t: t.update({"model.layers.1.mlp.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected tensors 'model\.layers\.1\.mlp\.extra\.weight'"),
    (lambda t: t.update({KEY: np.zeros((64, 24), np.float32)}),
     r"tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' has shape \(64, 24\), expected \(24, 64\)"),
], ids=["missing", "unexpected", "misshaped"])
def test_bad_tensor_names_the_key(v3_dir, tmp_path, edit, message):
  with pytest.raises(ValueError, match=message):
    hf.load_pretrained(rewrite(v3_dir, tmp_path, edit))


def test_unsupported_architecture_lists_supported(v3_dir, tmp_path):
  def llama(c):
    c.update(model_type="llama", architectures=["LlamaForCausalLM"])
  with pytest.raises(ValueError, match=r"unsupported architecture.*supported: deepseek_v2 \(DeepseekV2ForCausalLM\), "
                                       r"deepseek_v3 \(DeepseekV3ForCausalLM\)"):
    hf.load_pretrained(rewrite(v3_dir, tmp_path, edit_config=llama))
  with pytest.raises(ValueError, match="no config.json"):
    hf.load_pretrained(tmp_path / "nowhere")


# --- FP8 and bf16 checkpoints ---------------------------------------------------------
def quantize_ref(w):
  """[O, I] fp32 -> (e4m3 [O, I], scale_inv [ceil(O/128), ceil(I/128)]), DeepSeek's 128x128 block scaling."""
  rows, cols = math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)
  q, scale = np.zeros(w.shape, ml_dtypes.float8_e4m3fn), np.zeros((rows, cols), np.float32)
  for r in range(rows):
    for c in range(cols):
      block = np.s_[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
      scale[r, c] = np.abs(w[block]).max() / 448.0
      q[block] = (w[block] / scale[r, c]).astype(ml_dtypes.float8_e4m3fn)
  return q, scale


def dequantize_ref(q, scale):
  out = np.zeros(q.shape, np.float32)
  for r in range(scale.shape[0]):
    for c in range(scale.shape[1]):
      block = np.s_[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
      out[block] = q[block].astype(np.float32) * scale[r, c]
  return out


def test_dequantize_fp8_ragged_blocks():
  w = np.random.RandomState(0).randn(300, 200).astype(np.float32)
  q, scale = quantize_ref(w)
  np.testing.assert_array_equal(hf.dequantize_fp8(q, scale), dequantize_ref(q, scale))
  assert np.abs(hf.dequantize_fp8(q, scale) - w).max() < 0.1 * np.abs(w).max()
  with pytest.raises(ValueError, match="FP8 scale shape"):
    hf.dequantize_fp8(q, scale[:, :1])


def test_fp8_checkpoint_dequantized_on_load(v3_dir, tmp_path):
  quantized = {}

  def to_fp8(t):
    for k in [k for k in t if k.endswith("_proj.weight")]:
      q, s = quantize_ref(t[k].astype(np.float32))
      t[k], t[k + "_scale_inv"] = q, s
      quantized[k] = (q, s)

  def fp8_config(c):
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                "activation_scheme": "dynamic"}

  fp8_dir = rewrite(v3_dir, tmp_path / "fp8", to_fp8, fp8_config)
  assert {v[0].shape for v in quantized.values()} >= {(160, 64), (64, 160), (128, 32)}  # ragged and exact blocks
  ref_dir = rewrite(v3_dir, tmp_path / "ref", lambda t: t.update({k: dequantize_ref(*v) for k, v in quantized.items()}))
  _, from_fp8 = hf.load_pretrained(fp8_dir)
  _, from_ref = hf.load_pretrained(ref_dir)
  assert tree_equal(from_fp8, from_ref)
  _, original = hf.load_pretrained(v3_dir)
  assert not tree_equal(from_fp8, original)  # the weights really went through e4m3

  def bad_scale(t):
    to_fp8(t)
    t[KEY + "_scale_inv"] = np.ones((2, 2), np.float32)
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight_scale_inv' has shape"):
    hf.load_pretrained(rewrite(v3_dir, tmp_path / "bad", bad_scale, fp8_config))


def test_bf16_checkpoint_loads_in_any_dtype(v3_dir, tmp_path):
  def to_bf16(t):
    for k in t:
      if not k.endswith("e_score_correction_bias"):  # released checkpoints keep the bias fp32
        t[k] = t[k].astype(ml_dtypes.bfloat16)
  bf16_dir = rewrite(v3_dir, tmp_path, to_bf16)
  _, f32 = hf.load_pretrained(v3_dir)
  _, from_bf16 = hf.load_pretrained(bf16_dir)
  rounded = {"params": jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                                    f32["params"]), "router": f32["router"]}
  assert tree_equal(from_bf16, rounded)
  model, as_bf16 = hf.load_pretrained(bf16_dir, dtype="bfloat16")
  assert model.cfg.compute_dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(as_bf16["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(as_bf16["router"]))


def test_load_places_each_tensor_with_its_sharding(v3_dir):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("expert",))
  experts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  _, variables = hf.load_pretrained(v3_dir, shardings={"params": {"layers_1": {"moe": {"gate": experts}}}})
  gate = variables["params"]["layers_1"]["moe"]["gate"]
  assert gate.sharding == experts and gate.addressable_shards[0].data.shape == (1, 64, 24)


# --- python -m moe_jax.convert ---------------------------------------------------------
def test_convert_cli_round_trip(v3_dir, tmp_path, capsys):
  from moe_jax import convert
  ckpt, back = tmp_path / "ckpt", tmp_path / "hf"
  assert convert.main(["--hf", str(v3_dir), "--out", str(ckpt)]) == 0
  assert convert.main(["--hf", str(v3_dir), "--out", str(ckpt)]) == 2  # never overwrites
  assert "exists and is not empty" in capsys.readouterr().err
  assert convert.main(["--from_ckpt", str(ckpt), "--to_hf", str(back)]) == 0
  _, original = hf.load_pretrained(v3_dir)
  _, converted = hf.load_pretrained(back)
  assert tree_equal(converted, original)


def test_convert_cli_missing_dir_is_one_line(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "moe_jax.convert", "--hf", str(tmp_path / "nope"), "--out",
                         str(tmp_path / "out")], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: Hugging Face directory {tmp_path / 'nope'} does not exist "
                                              "or is not a directory"]
  assert not (tmp_path / "out").exists()
