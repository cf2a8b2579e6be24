"""ModelConfig: the architecture, with DeepSeek / Hugging Face field names, validated.

Every field that exists in a DeepSeek-V2/V3 `config.json` keeps its name here, so a
config moves between the two without a translation table. The few fields that are ours
(dtypes, dispatch implementation, scan/remat, balance losses) sit at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
MOE_IMPLS = ("dense", "ragged", "capacity", "ep")
CAPACITY_FACTOR = 1.25  # moe_impl='capacity' when capacity_factor is 0 (GShard's usual)
BALANCE_LOSSES = ("sequence", "expert")
REMAT_POLICIES = ("none", "full", "ep_rows", "gathered", "gathered_offload", "dots",
                  "dots_no_batch")  # model.REMAT_POLICIES
ATTENTION_IMPLS = ("auto", "einsum", "dot_product", "splash", "pallas_gpu")  # layers/attention.py
MOE_GMMS = ("auto", "tiled", "ragged_dot", "pallas")  # layers/gmm.py
FP8_KERNELS = ("auto", "xla", "pallas")  # layers/fp8.py
ATTENTION_TYPES = ("mla", "gqa")  # layers/mla.py | layers/gqa.py (MHA / GQA / MQA, for ablations)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """YaRN rope scaling, as DeepSeek's `rope_scaling` dict (type 'yarn')."""

  factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0

  def to_hf(self) -> dict[str, Any]:
    return {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(self)}


def _fail(field: str, msg: str):
  raise ValueError(f"ModelConfig.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # --- DeepSeek / Hugging Face fields -------------------------------------------------
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128  # dense (first_k_dense_replace) layers' MLP width
  moe_intermediate_size: int = 32  # one routed / shared expert's MLP width
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  q_lora_rank: Optional[int] = 32  # None or 0: direct query projection (V2-Lite)
  kv_lora_rank: int = 32
  qk_nope_head_dim: int = 16
  qk_rope_head_dim: int = 8
  v_head_dim: int = 16
  n_routed_experts: int = 8
  n_shared_experts: int = 1
  num_experts_per_tok: int = 2
  n_group: int = 1
  topk_group: int = 1
  topk_method: str = "noaux_tc"  # V3: noaux_tc; V2: greedy | group_limited_greedy
  scoring_func: str = "sigmoid"  # V3: sigmoid; V2: softmax
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  first_k_dense_replace: int = 1
  moe_layer_freq: int = 1
  num_nextn_predict_layers: int = 0  # multi-token prediction depth (V3: 1)
  aux_loss_alpha: float = 0.0  # balance-loss weight (V3 paper: 1e-4 sequence-wise)
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rope_interleave: bool = True  # True: rotary pairs (x0,x1),(x2,x3).. as DeepSeek ships
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  tie_word_embeddings: bool = False
  # --- moe_jax fields ---------------------------------------------------------------
  balance_loss: str = "sequence"  # V3 sequence-wise | V2 expert-level
  moe_impl: str = "ragged"  # dense (reference) | ragged (dropless) | capacity | ep
  # Expert capacity, as a multiple of the balanced load (T*X/E per expert, T*X/P per shard pair).
  # 0 (default): no capacity, nothing is dropped: 'ep' exchanges in rounds of ep_round_factor
  # (layers/ep.py) and 'capacity' uses CAPACITY_FACTOR. > 0: 'capacity' and 'ep' keep at most
  # that many per expert / shard pair and drop the rest, reported as dropped_fraction.
  capacity_factor: float = 0.0
  # 'ep' dropless rounds: slots per shard pair and round = ceil(T*X/P * ep_round_factor); the
  # all-to-all buffers are that multiple of the balanced size, more rounds run when routing is skewed.
  ep_round_factor: float = 1.25
  # grouped matmul for ragged/ep: auto | ragged_dot (XLA) | tiled (CPU) | pallas (Hopper GPU, TPU);
  # layers/gmm.py. FP8 grouped matmuls use XLA's ragged_dot_general on GPU/TPU whatever this says.
  moe_gmm: str = "auto"
  dtype: str = "float32"  # compute dtype (bfloat16 for training at scale)
  param_dtype: str = "float32"  # master weights
  scan_layers: bool = False  # nn.scan over the dense and the MoE stacks
  remat_policy: str = "none"  # see REMAT_POLICIES
  # expanded (training / prefill) attention, see ATTENTION_IMPLS and layers/attention.py: 'einsum'
  # (one einsum, fp32 softmax), 'dot_product' (jax.nn.dot_product_attention, cuDNN on GPU), 'splash'
  # (TPU Pallas), 'pallas_gpu' (Pallas flash on GPU); 'auto': splash on TPU, cuDNN or pallas_gpu on a
  # GPU in bf16/fp16, einsum elsewhere
  attention_impl: str = "auto"
  fp8: bool = False  # DeepSeek-V3 fine-grained FP8 projections and experts (layers/fp8.py)
  # the FP8 matmuls: "xla" (blocked dot_general, every backend), "pallas" (layers/fp8_pallas.py: one
  # fused kernel, scales applied in the K loop; Triton on a GPU, interpreted elsewhere), or "auto": the
  # fused kernel on a GPU with FP8 tensor cores (an H200's bench1b FP8 step: 3.0x faster than "xla"),
  # "xla" elsewhere (TPU, CPU)
  fp8_kernel: str = "auto"
  # 'mla' (DeepSeek) or 'gqa': plain attention with num_key_value_heads key/value heads (layers/gqa.py;
  # = num_attention_heads: MHA, 1: MQA), MLA's head dims; not a Hugging Face DeepSeek layout.
  attention_type: str = "mla"
  num_key_value_heads: int = 0  # 'gqa' only; 0: num_attention_heads (MHA)

  def __post_init__(self):
    if self.q_lora_rank == 0:
      object.__setattr__(self, "q_lora_rank", None)
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
    self.validate()

  # ---------------------------------------------------------------------------------
  def validate(self):
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "intermediate_size", "moe_intermediate_size"):
      if getattr(self, name) <= 0:
        _fail(name, f"must be positive, got {getattr(self, name)}")
    if self.q_lora_rank is not None and self.q_lora_rank < 0:
      _fail("q_lora_rank", f"must be None, 0 or positive, got {self.q_lora_rank}")
    if self.qk_rope_head_dim % 2:
      _fail("qk_rope_head_dim", f"rotary dims come in pairs; got odd {self.qk_rope_head_dim}, use an even number")
    if self.scoring_func not in SCORING_FUNCS:
      _fail("scoring_func", f"{self.scoring_func!r} is not one of {SCORING_FUNCS}")
    if self.topk_method not in TOPK_METHODS:
      _fail("topk_method", f"{self.topk_method!r} is not one of {TOPK_METHODS}")
    if self.moe_impl not in MOE_IMPLS:
      _fail("moe_impl", f"{self.moe_impl!r} is not one of {MOE_IMPLS}")
    if self.moe_gmm not in MOE_GMMS:
      _fail("moe_gmm", f"{self.moe_gmm!r} is not one of {MOE_GMMS}")
    if self.balance_loss not in BALANCE_LOSSES:
      _fail("balance_loss", f"{self.balance_loss!r} is not one of {BALANCE_LOSSES}")
    if self.remat_policy not in REMAT_POLICIES:
      _fail("remat_policy", f"{self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      _fail("attention_impl", f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if not isinstance(self.fp8, bool):
      _fail("fp8", f"must be True or False, got {self.fp8!r}")
    if self.fp8_kernel not in FP8_KERNELS:
      _fail("fp8_kernel", f"{self.fp8_kernel!r} is not one of {FP8_KERNELS}")
    if self.attention_type not in ATTENTION_TYPES:
      _fail("attention_type", f"{self.attention_type!r} is not one of {ATTENTION_TYPES}")
    if self.attention_type == "gqa" and self.num_key_value_heads == 0:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.attention_type == "gqa" and (self.num_key_value_heads < 1
                                         or self.num_attention_heads % self.num_key_value_heads):
      _fail("num_key_value_heads", f"{self.num_key_value_heads} must divide num_attention_heads="
            f"{self.num_attention_heads} (1: MQA, num_attention_heads: MHA)")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        _fail(name, f"{getattr(self, name)!r} is not a dtype name (use float32 or bfloat16)")
    if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
      _fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}], got {self.first_k_dense_replace}")
    if self.moe_layer_freq < 1:
      _fail("moe_layer_freq", f"must be >= 1, got {self.moe_layer_freq}")
    if self.num_nextn_predict_layers < 0:
      _fail("num_nextn_predict_layers", f"must be >= 0, got {self.num_nextn_predict_layers}")
    if self.capacity_factor < 0:
      _fail("capacity_factor", f"must be 0 (no capacity: dropless) or > 0, got {self.capacity_factor}")
    if self.ep_round_factor <= 0:
      _fail("ep_round_factor", f"must be > 0, got {self.ep_round_factor}")
    if self.aux_loss_alpha < 0:
      _fail("aux_loss_alpha", f"must be >= 0, got {self.aux_loss_alpha}")
    if self.num_moe_layers == 0:
      return
    e, g = self.n_routed_experts, self.n_group
    if e <= 0:
      _fail("n_routed_experts", f"must be positive when MoE layers exist, got {e}")
    if self.n_shared_experts < 0:
      _fail("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
    if g < 1 or e % g:
      _fail("n_group", f"n_routed_experts={e} is not divisible by n_group={g}; pick n_group from the divisors of {e}")
    if not 1 <= self.topk_group <= g:
      _fail("topk_group", f"must be in [1, n_group={g}], got {self.topk_group}")
    kept = self.experts_per_group * self.topk_group if self.group_limited else e
    if not 1 <= self.num_experts_per_tok <= kept:
      _fail("num_experts_per_tok", f"{self.num_experts_per_tok} experts per token but only {kept} experts are in the "
            f"kept groups (topk_group={self.topk_group} x {self.experts_per_group}); lower it or raise topk_group")
    if self.group_limited and self.scoring_func == "sigmoid" and self.experts_per_group < 2:
      _fail("n_group", f"sigmoid group scores sum each group's top-2 experts, so groups need >= 2 experts; "
            f"n_routed_experts / n_group = {self.experts_per_group}")
    if self.scan_layers and self.moe_layer_freq != 1:
      _fail("scan_layers", "scanning needs homogeneous MoE stacks; set moe_layer_freq=1 or scan_layers=False")

  # --- derived ----------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def experts_per_group(self) -> int:
    return self.n_routed_experts // max(self.n_group, 1)

  @property
  def group_limited(self) -> bool:
    """Node/group-limited routing is on (V3 noaux_tc or V2 group_limited_greedy, n_group > 1)."""
    return self.n_group > 1 and self.topk_method != "greedy"

  def is_moe_layer(self, i: int) -> bool:
    return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = self.qk_head_dim ** -0.5
    if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
      m = yarn_get_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
      scale *= m * m
    return scale

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if self.rope_scaling is not None:
      d["rope_scaling"] = self.rope_scaling.to_hf()  # with its type, so from_dict can read it back
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"ModelConfig: unknown fields {unknown}; known fields are {sorted(known)}")
    return cls(**d)

  # --- Hugging Face -----------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """Builds a ModelConfig from a DeepSeek-V2/V3 `config.json` dict.

    A field that is absent (or null) takes the default of transformers' DeepseekV2Config /
    DeepseekV3Config (HF_DEFAULTS), so a config.json means here what it means there. The few
    fields transformers cannot run without (HF_REQUIRED) are refused with one line naming them.
    Fields transformers does not have (topk_method and scoring_func of V3, which transformers
    fixes to noaux_tc/sigmoid; moe_layer_freq, seq_aux, aux_loss_alpha) keep DeepSeek's meaning.
    """
    arch = hf.get("model_type") or ""
    if arch not in ("deepseek_v2", "deepseek_v3"):
      archs = hf.get("architectures") or []
      if any("DeepseekV3" in a for a in archs):
        arch = "deepseek_v3"
      elif any("DeepseekV2" in a for a in archs):
        arch = "deepseek_v2"
      else:
        raise ValueError(f"unsupported architecture model_type={hf.get('model_type')!r} architectures={archs}; "
                         "supported: deepseek_v2 (DeepseekV2ForCausalLM), deepseek_v3 (DeepseekV3ForCausalLM)")
    v3 = arch == "deepseek_v3"
    defaults = HF_DEFAULTS[arch]

    def get(name: str) -> Any:
      value = hf.get(name)
      return defaults[name] if value is None else value

    topk_method = get("topk_method") if "topk_method" in defaults else (hf.get("topk_method") or "noaux_tc")
    required = [name for name in HF_REQUIRED[arch] if hf.get(name) is None]
    if topk_method == "group_limited_greedy":  # V2 leaves the groups unset (None): only greedy runs without them
      required += [name for name in ("n_group", "topk_group") if hf.get(name) is None]
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    scaled = (rope.get("rope_type") or rope.get("type")) not in (None, "default")
    if scaled and rope.get("factor") is None:
      required.append("rope_scaling.factor")
    if required:
      raise ValueError(f"{arch} config.json lacks {', '.join(required)}, which transformers' "
                       f"{'DeepseekV3Config' if v3 else 'DeepseekV2Config'} has no usable default for; add "
                       f"{'it' if len(required) == 1 else 'them'} to config.json")
    rope_theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0  # transformers: the rope dict's wins
    max_pos = get("max_position_embeddings")
    if scaled and rope.get("original_max_position_embeddings") is None:  # as transformers' standardize_rope_params
      rope = dict(rope, original_max_position_embeddings=max_pos)
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))  # transformers 5 names it num_mtp_layers
    out = dict(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        moe_intermediate_size=get("moe_intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        # null is meaningful here (no query compression, V2-Lite); only an absent field defaults
        q_lora_rank=hf["q_lora_rank"] if "q_lora_rank" in hf else defaults["q_lora_rank"],
        kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"),
        n_routed_experts=get("n_routed_experts"),
        n_shared_experts=get("n_shared_experts"),
        num_experts_per_tok=get("num_experts_per_tok"),
        # V2 greedy never reads the groups (transformers leaves them None): one group
        n_group=get("n_group") or 1,
        topk_group=get("topk_group") or 1,
        topk_method=topk_method,
        scoring_func=hf.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
        # transformers' V2 never normalizes (and the released V2 configs say false)
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if v3 else False,
        routed_scaling_factor=float(get("routed_scaling_factor")),
        first_k_dense_replace=get("first_k_dense_replace"),
        moe_layer_freq=hf.get("moe_layer_freq") or 1,
        num_nextn_predict_layers=(defaults["num_nextn_predict_layers"] if mtp is None else mtp) if v3 else 0,
        aux_loss_alpha=float(hf.get("aux_loss_alpha") or 0.0),
        max_position_embeddings=max_pos,
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling_from_dict(rope) if scaled else None,
        rope_interleave=bool(get("rope_interleave")) if v3 else True,
        rms_norm_eps=get("rms_norm_eps"),
        initializer_range=get("initializer_range"),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        balance_loss="sequence" if hf.get("seq_aux", True) else "expert",
    )
    out.update(overrides)
    return cls(**out)

  def to_hf(self, arch: Optional[str] = None) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for this architecture."""
    arch = arch or ("deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2")
    v3 = arch == "deepseek_v3"
    d = dict(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        model_type=arch,
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, moe_intermediate_size=self.moe_intermediate_size,
        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_attention_heads,
        q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
        qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
        v_head_dim=self.v_head_dim, n_routed_experts=self.n_routed_experts,
        n_shared_experts=self.n_shared_experts, num_experts_per_tok=self.num_experts_per_tok,
        n_group=self.n_group, topk_group=self.topk_group, topk_method=self.topk_method,
        scoring_func=self.scoring_func, norm_topk_prob=self.norm_topk_prob,
        routed_scaling_factor=self.routed_scaling_factor,
        first_k_dense_replace=self.first_k_dense_replace, moe_layer_freq=self.moe_layer_freq,
        aux_loss_alpha=self.aux_loss_alpha, seq_aux=self.balance_loss == "sequence",
        max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
        rope_scaling=self.rope_scaling.to_hf() if self.rope_scaling else None,
        rms_norm_eps=self.rms_norm_eps, initializer_range=self.initializer_range,
        tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
        attention_bias=False, torch_dtype="bfloat16" if self.param_dtype == "bfloat16" else "float32",
    )
    if v3:
      d.update(num_nextn_predict_layers=self.num_nextn_predict_layers, rope_interleave=self.rope_interleave)
    return d


def _rope_scaling_from_dict(d: dict[str, Any]) -> RopeScaling:
  kind = d.get("rope_type") or d.get("type")
  if kind != "yarn":
    raise ValueError(f"ModelConfig.rope_scaling: only YaRN scaling is supported (DeepSeek-V2/V3), got type {kind!r}")
  fields = {f.name for f in dataclasses.fields(RopeScaling)}
  kw = {k: v for k, v in d.items() if k in fields and v is not None}
  # transformers reads an absent mscale / mscale_all_dim as unset (0): attention_factor from the factor
  # alone and no softmax-scale change; RopeScaling()'s own defaults are DeepSeek-V3's released values
  kw.setdefault("mscale", 0.0)
  kw.setdefault("mscale_all_dim", 0.0)
  return RopeScaling(**kw)


# transformers' defaults for an absent config.json field (DeepseekV2Config / DeepseekV3Config, 5.x);
# tests/test_hf_config_defaults.py holds each against a config transformers builds without it.
_HF_COMMON = dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(_HF_COMMON, vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                        moe_intermediate_size=1407, num_hidden_layers=32, num_attention_heads=32,
                        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=None, n_group=None,
                        topk_group=None, topk_method="greedy", routed_scaling_factor=1.0,
                        first_k_dense_replace=0, max_position_embeddings=2048),
    "deepseek_v3": dict(_HF_COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, first_k_dense_replace=3, max_position_embeddings=4096,
                        num_nextn_predict_layers=1, rope_interleave=True),
}
# fields whose transformers default (None) the model cannot run with; V2 group_limited_greedy also
# needs n_group and topk_group, and a YaRN rope_scaling its factor (checked in from_hf)
HF_REQUIRED = {"deepseek_v2": ("num_experts_per_tok",), "deepseek_v3": ()}


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  import math
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --- presets ------------------------------------------------------------------------
def dropless(cfg: ModelConfig) -> ModelConfig:
  """The same model with no capacity (evaluation, generation): a score must not depend on the
  other rows of its batch. 'capacity' -> 'ragged'; 'ep' keeps its all-to-all, in rounds."""
  if cfg.moe_impl == "capacity":
    return cfg.replace(moe_impl="ragged", capacity_factor=0.0)
  return cfg.replace(capacity_factor=0.0) if cfg.capacity_factor else cfg


def tiny(**kw) -> ModelConfig:
  """CPU seconds: 2 layers (1 dense, 1 MoE), 8 experts in 4 groups, MTP on."""
  base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
              n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
              routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
              aux_loss_alpha=1e-4, max_position_embeddings=1024)
  base.update(kw)
  return ModelConfig(**base)


def small(**kw) -> ModelConfig:
  """Tens of millions of parameters, DeepSeek-V3-shaped: 6 layers, 32 experts, top-4."""
  base = dict(vocab_size=32768, hidden_size=384, intermediate_size=1024, moe_intermediate_size=192,
              num_hidden_layers=6, num_attention_heads=6, q_lora_rank=192, kv_lora_rank=128,
              qk_nope_head_dim=48, qk_rope_head_dim=32, v_head_dim=48, n_routed_experts=32,
              n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
              routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
              aux_loss_alpha=1e-4, max_position_embeddings=4096)
  base.update(kw)
  return ModelConfig(**base)


_V2_ROPE = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                       beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)


def deepseek_v2_lite(**kw) -> ModelConfig:
  """DeepSeek-V2-Lite (15.7B total, 2.4B active), the released config.json values."""
  base = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
              num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
              n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
              scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
              first_k_dense_replace=1, aux_loss_alpha=0.001, balance_loss="sequence",
              max_position_embeddings=163840, rope_scaling=_V2_ROPE)
  base.update(kw)
  return ModelConfig(**base)


def deepseek_v2(**kw) -> ModelConfig:
  """DeepSeek-V2 (236B total, 21B active), the released config.json values."""
  base = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
              num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
              n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
              topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
              routed_scaling_factor=16.0, first_k_dense_replace=1, aux_loss_alpha=0.003,
              max_position_embeddings=163840, rope_scaling=_V2_ROPE)
  base.update(kw)
  return ModelConfig(**base)


def deepseek_v3(**kw) -> ModelConfig:
  """DeepSeek-V3 / R1 (671B total, 37B active), the released config.json values."""
  base = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
              num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
              n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc",
              scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
              first_k_dense_replace=3, num_nextn_predict_layers=1, aux_loss_alpha=0.0001,
              max_position_embeddings=163840,
              rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
  base.update(kw)
  return ModelConfig(**base)


PRESETS = {"tiny": tiny, "small": small, "deepseek_v2_lite": deepseek_v2_lite,
           "deepseek_v2": deepseek_v2, "deepseek_v3": deepseek_v3}
