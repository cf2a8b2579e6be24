"""Generation with the MLA latent cache: teacher forcing, transformers' greedy generate, ragged
batches, sampling filters, stop tokens and the size of the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from moe_jax import hf
from moe_jax import config as mcfg
from moe_jax.generate import continuations, generate, init_cache, sample_logits
from moe_jax.model import Transformer

transformers.logging.set_verbosity_error()

# Larger weights than the default 0.02 make logits peaked, so greedy choices are not near-ties.
CFG = mcfg.tiny(initializer_range=0.2, max_position_embeddings=128)


def random_variables(model, seed: int):
  """Normal(0, initializer_range) weights, unit norm scales, zero router biases, shaped by
  eval_shape: compiling model.init costs ~10 s of CPU (a threefry loop per parameter)."""
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(s.shape, s.dtype)
    if name == "e_score_correction_bias":
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.normal(0.0, model.cfg.initializer_range, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, {k: shapes[k] for k in ("params", "router")})


@pytest.fixture(scope="module")
def setup():
  """Model, variables, a [3, 7] prompt and its greedy 16-token generation (shapes shared by the
  tests below so that most calls reuse one compiled program)."""
  model = Transformer(CFG)
  variables = random_variables(model, 1)
  prompt = np.asarray(jax.random.randint(jax.random.key(2), (3, 7), 1, CFG.vocab_size))
  return model, variables, prompt, np.asarray(generate(model, variables, prompt, 16))


def test_greedy_equals_teacher_forced_argmax(setup):
  model, variables, prompt, out = setup
  assert out.shape == (3, 7 + 16)
  np.testing.assert_array_equal(out[:, :7], prompt)
  argmax = jnp.argmax(jax.jit(model.apply)(variables, out[:, :-1]), axis=-1)
  np.testing.assert_array_equal(out[:, 7:], argmax[:, 6:])


def test_ragged_batch_equals_each_prompt_alone(setup):
  model, variables, full, out_full = setup
  lengths = np.array([7, 3, 1])
  prompt = full.copy()
  for b, n in enumerate(lengths):
    prompt[b, n:] = 0  # right padding
  out = np.asarray(generate(model, variables, prompt, 16, prompt_lengths=lengths, pad_id=0))
  np.testing.assert_array_equal(out[0], out_full[0])  # the full-length row is unchanged
  for b, n in enumerate(lengths):
    alone = out_full[b] if n == 7 else np.asarray(generate(model, variables, prompt[b:b + 1, :n], 16))[0]
    np.testing.assert_array_equal(out[b, :n + 16], alone)  # left-aligned: its prompt, then its 16 tokens
    assert (out[b, n + 16:] == 0).all()  # then padding


def test_stop_tokens_pad_the_rest(setup):
  model, variables, prompt, free = setup
  stop = int(free[0, 7 + 3])  # the 4th new token of row 0
  out = np.asarray(generate(model, variables, prompt, 16, stop_tokens=(stop,), pad_id=0))
  for b in range(3):
    j = next((j for j in range(16) if free[b, 7 + j] == stop), None)
    if j is None:
      np.testing.assert_array_equal(out[b], free[b])
    else:  # identical up to and including the first stop token, pad after it
      np.testing.assert_array_equal(out[b, :8 + j], free[b, :8 + j])
      assert (out[b, 8 + j:] == 0).all()
      assert continuations(out, [7] * 3, 16, (stop,))[b] == free[b, 7:8 + j].tolist()
    assert b or j <= 3


def test_cache_holds_kv_lora_plus_rope_values_per_token_per_layer():
  for cfg in (CFG, CFG.replace(scan_layers=True)):
    cache = init_cache(Transformer(cfg), 2, 24)
    leaves = jax.tree.leaves(cache)
    per_token = sum(x.size for x in leaves) / (2 * 24 * cfg.num_hidden_layers)
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert sorted({x.shape[-1] for x in leaves}) == sorted({cfg.kv_lora_rank, cfg.qk_rope_head_dim})


def test_sampling_respects_top_k_and_top_p():
  probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
  logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
  draw = lambda **kw: np.asarray(sample_logits(logits, jax.random.key(0), temperature=1.0, **kw))  # noqa: E731
  freq = lambda d, n: np.bincount(d, minlength=n) / d.size  # noqa: E731

  all_ = freq(draw(), 5)
  np.testing.assert_allclose(all_, probs, atol=0.025)
  top2 = freq(draw(top_k=2), 5)
  assert top2[2:].sum() == 0
  np.testing.assert_allclose(top2[:2], probs[:2] / probs[:2].sum(), atol=0.025)
  # top_p=0.7: mass before token 2 is 0.65 < 0.7, before token 3 it is 0.85 -> keep tokens 0..2.
  nucleus = freq(draw(top_p=0.7), 5)
  assert nucleus[3:].sum() == 0
  np.testing.assert_allclose(nucleus[:3], probs[:3] / probs[:3].sum(), atol=0.025)
  # top_p below the top token's mass keeps only it.
  assert (draw(top_p=0.3) == 0).all()
  # Low temperature sharpens toward the argmax; temperature 0 is the argmax.
  assert freq(np.asarray(sample_logits(logits, jax.random.key(1), temperature=0.25)), 5)[0] > 0.75
  assert (np.asarray(sample_logits(logits, None)) == 0).all()


def test_sampled_generation_is_deterministic_per_rng(setup):
  model, variables, prompt, _ = setup
  kw = dict(temperature=1.0, top_k=20)
  a = generate(model, variables, prompt, 16, rng=jax.random.key(5), **kw)
  b = generate(model, variables, prompt, 16, rng=jax.random.key(5), **kw)
  c = generate(model, variables, prompt, 16, rng=jax.random.key(6), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match="rng"):
    generate(model, variables, prompt, 16, temperature=1.0)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(model, variables, prompt, 200)
  with pytest.raises(ValueError, match="prompt_lengths"):
    generate(model, variables, prompt, 16, prompt_lengths=[7, 8, 1])


HF_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
               first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.15,
               attn_implementation="eager")
HF_CASES = {
    "v3": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(q_lora_rank=32, n_group=4, topk_group=2,
                                                         routed_scaling_factor=2.5)),
    "v2": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(q_lora_rank=None, topk_method="greedy")),
}


@pytest.mark.parametrize("arch", list(HF_CASES))
def test_greedy_equals_transformers_generate(arch, tmp_path):
  config_cls, model_cls, changes = HF_CASES[arch]
  torch.manual_seed(0)
  ref = model_cls(config_cls(**HF_BASE, **changes)).eval()
  with torch.no_grad():  # router logits O(1), so expert choices are not near-ties
    for name, p in ref.named_parameters():
      if name.endswith("mlp.gate.weight"):
        p.normal_(0, 0.3)
  ref.save_pretrained(tmp_path)
  prompt = np.random.RandomState(0).randint(0, HF_BASE["vocab_size"], (2, 6))
  with torch.no_grad():
    expected = ref.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0).numpy()
  model, variables = hf.load_pretrained(tmp_path)
  out = np.asarray(generate(model, variables, prompt, 32))
  assert expected.shape == out.shape == (2, 6 + 32)
  np.testing.assert_array_equal(out, expected)
