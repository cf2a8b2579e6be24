"""ModelConfig.from_hf reads a config.json as transformers does, field by field (issue 23).

Each test drops one field from a complete config.json whose values all differ from the
defaults, builds transformers' DeepseekV2Config / DeepseekV3Config from the same dict, and
compares every field (and the rotary frequencies, YaRN attention factor and softmax scale the
two compute from them). Fields transformers cannot run without must be refused, naming them.
"""

import copy
import math

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale  # noqa: E402

from moe_jax.config import HF_DEFAULTS, ModelConfig  # noqa: E402
from moe_jax.layers.rope import inv_frequencies  # noqa: E402

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
        "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.7}
# Every value differs from both transformers defaults, and each default alone still gives a valid model.
_COMMON = dict(vocab_size=1000, hidden_size=128, intermediate_size=96, moe_intermediate_size=24,
               num_hidden_layers=4, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=32, n_shared_experts=3,
               num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=16.0,
               first_k_dense_replace=1, max_position_embeddings=512, rope_theta=5000.0, rms_norm_eps=1e-5,
               initializer_range=0.01, tie_word_embeddings=True, rope_scaling=YARN)
BASE = {
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                        norm_topk_prob=False, num_nextn_predict_layers=0, rope_interleave=False),
    "deepseek_v2": dict(_COMMON, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
                        topk_method="group_limited_greedy"),
}
# our field -> transformers attribute, where the names differ
THEIR_NAME = {"num_nextn_predict_layers": "num_mtp_layers"}
SAME = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
        "routed_scaling_factor", "first_k_dense_replace", "max_position_embeddings", "rms_norm_eps",
        "initializer_range", "tie_word_embeddings"]
ONLY = {"deepseek_v3": ["norm_topk_prob", "rope_interleave", "num_nextn_predict_layers"],
        "deepseek_v2": ["topk_method"]}
# The fields transformers has no usable default for (None) in these bases.
REQUIRED = {"deepseek_v3": [], "deepseek_v2": ["num_experts_per_tok", "n_group", "topk_group"]}


def _theirs(d):
  cls = transformers.DeepseekV3Config if d["model_type"] == "deepseek_v3" else transformers.DeepseekV2Config
  return cls.from_dict(copy.deepcopy(d))


def _differences(ours: ModelConfig, theirs, arch: str) -> list[str]:
  out = []
  for name in SAME + ONLY[arch]:
    want = getattr(theirs, THEIR_NAME.get(name, name))
    if name in ("n_group", "topk_group") and want is None:
      want = 1  # transformers' V2 leaves the groups unset; only greedy (one group) runs so
      assert ours.topk_method == "greedy"
    if getattr(ours, name) != want:
      out.append(f"{name}: ours {getattr(ours, name)!r}, transformers {want!r}")
  rope = theirs.rope_parameters
  if rope["rope_theta"] != ours.rope_theta:
    out.append(f"rope_theta: ours {ours.rope_theta}, transformers {rope['rope_theta']}")
  if (rope["rope_type"] == "yarn") != (ours.rope_scaling is not None):
    out.append(f"rope type: ours {ours.rope_scaling}, transformers {rope['rope_type']}")
  if rope["rope_type"] == "yarn":
    inv, factor = inv_frequencies(ours)
    their_inv, their_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    if not np.allclose(inv, their_inv.numpy(), rtol=1e-6) or not math.isclose(factor, their_factor, rel_tol=1e-6):
      out.append(f"yarn: ours {inv}, {factor}; transformers {their_inv.numpy()}, {their_factor}")
    scale = yarn_apply_mscale(rope, (theirs.qk_nope_head_dim + theirs.qk_rope_head_dim) ** -0.5)
    if not math.isclose(ours.softmax_scale, scale, rel_tol=1e-6):
      out.append(f"softmax scale: ours {ours.softmax_scale}, transformers {scale}")
  return out


def _cases():
  for arch, base in BASE.items():
    for field in sorted(set(base) - {"model_type", "architectures"}):
      if field not in REQUIRED[arch]:
        yield pytest.param(arch, field, id=f"{arch}-{field}")
    for key in sorted(set(YARN) - {"type", "factor"}):
      yield pytest.param(arch, f"rope_scaling.{key}", id=f"{arch}-rope_scaling.{key}")


def _without(d: dict, field: str) -> dict:
  d = copy.deepcopy(d)
  if field.startswith("rope_scaling."):
    del d["rope_scaling"][field.split(".", 1)[1]]
  else:
    del d[field]
  return d


def test_the_bases_agree():
  for arch, base in BASE.items():
    assert _differences(ModelConfig.from_hf(copy.deepcopy(base)), _theirs(base), arch) == [], arch


@pytest.mark.parametrize("arch,field", list(_cases()))
def test_absent_field_defaults_as_transformers(arch, field):
  d = _without(BASE[arch], field)
  ours, theirs = ModelConfig.from_hf(copy.deepcopy(d)), _theirs(d)
  assert _differences(ours, theirs, arch) == []
  if not field.startswith("rope_scaling.") and field in HF_DEFAULTS[arch]:  # the field did change
    assert getattr(ours, field) != BASE[arch][field] or field == "topk_method"


@pytest.mark.parametrize("arch,field", [(a, f) for a, fs in REQUIRED.items() for f in fs])
def test_fields_transformers_cannot_default_are_required(arch, field):
  d = _without(BASE[arch], field)
  assert getattr(_theirs(d), field) is None  # transformers builds a config that cannot route
  with pytest.raises(ValueError, match=rf"lacks {field}\b.*add it") as e:
    ModelConfig.from_hf(d)
  assert "\n" not in str(e.value)


def test_yarn_without_factor_is_refused_as_transformers_does():
  d = _without(BASE["deepseek_v3"], "rope_scaling.factor")
  with pytest.raises(KeyError, match="factor"):
    _theirs(d)
  with pytest.raises(ValueError, match=r"lacks rope_scaling\.factor"):
    ModelConfig.from_hf(d)


def test_greedy_v2_needs_no_groups():
  d = _without(_without(_without(BASE["deepseek_v2"], "topk_method"), "n_group"), "topk_group")
  ours = ModelConfig.from_hf(copy.deepcopy(d))
  assert (ours.topk_method, ours.n_group, ours.topk_group) == ("greedy", 1, 1)
  assert _differences(ours, _theirs(d), "deepseek_v2") == []


def test_issue_23_routed_scaling_factor():
  """A V3 config.json without routed_scaling_factor loaded with 1.0; transformers uses 2.5."""
  d = _without(BASE["deepseek_v3"], "routed_scaling_factor")
  assert ModelConfig.from_hf(d).routed_scaling_factor == 2.5 == _theirs(d).routed_scaling_factor
