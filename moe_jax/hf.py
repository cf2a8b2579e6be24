"""Hugging Face DeepSeek-V2/V3 checkpoints <-> moe_jax variables: the key map, load (per host) and save.

torch Linear weights are [out, in]; ours are [in, out] with the heads split out
(shape letters of moe_jax/layers/common.py; L = num_hidden_layers, p = model.layers.{i}.):
  model.embed_tokens.weight [V, D]         -> params/embed [V, D]
  lm_head.weight [V, D]                    -> params/head [D, V]
  model.norm.weight                        -> params/final_norm/scale
  p.input_layernorm / post_attention_layernorm     -> layers_{i}/attn_norm, ffn_norm
  p.self_attn.q_a_proj [Q, D], q_a_layernorm       -> attn/q_a [D, Q], attn/q_norm
  p.self_attn.q_b_proj [H*(N+R), Q]                -> attn/q_b [Q, H, N+R]   (q_proj [H*(N+R), D] -> attn/q)
  p.self_attn.kv_a_proj_with_mqa [K+R, D], kv_a_layernorm -> attn/kv_a [D, K+R], attn/kv_norm
  p.self_attn.kv_b_proj [H*(N+V), K]               -> attn/k_b [K, H, N] and attn/v_b [K, H, V]
                                                      (per head: N key rows, then V value rows)
  p.self_attn.o_proj [D, H*V]                      -> attn/o [H, V, D]
  p.mlp.{gate,up,down}_proj                        -> mlp/{gate,up,down}   (dense layers)
  p.mlp.gate.weight [E, D]                         -> moe/router/kernel [D, E]
  p.mlp.gate.e_score_correction_bias [E] (V3)      -> router/.../moe/router/e_score_correction_bias
  p.mlp.experts.{e}.{gate,up}_proj [F, D]          -> moe/{gate,up}[e] [D, F]  (down_proj [D, F] -> moe/down[e])
  p.mlp.shared_experts.{gate,up,down}_proj         -> moe/shared/{gate,up,down}
MTP depth k (V3): model.layers.{L+k}.{enorm, hnorm, eh_proj [D, 2D], shared_head.norm} and the
block keys -> mtp_{k}/{enorm, hnorm, eh_proj [2D, D], head_norm, block/...}; its embed_tokens and
shared_head.head are copies of the shared embedding and head (shape-checked on load, written on save).
With scan_layers=True the same tensors fill slot i of dense_layers/... or moe_layers/... instead.
FP8 checkpoints: an e4m3 `X.weight` with `X.weight_scale_inv` (one fp32 scale per 128x128 block)
is dequantized on load (per box, as `dequantize_fp8` does), or with keep_fp8 kept as it is:
e4m3 params plus their transposed block scales in the `fp8_scales` collection (Fp8Weight).
Reading (only the boxes a process's devices hold) is safetensors_shards.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from moe_jax import safetensors_shards as shards
from moe_jax.config import HF_DEFAULTS, ModelConfig
from moe_jax.errors import UserError
from moe_jax.model import Transformer
from moe_jax.safetensors_shards import ST_DTYPES as _ST_DTYPES
from moe_jax.safetensors_shards import SafetensorsReader, read_json  # noqa: F401 (hf.SafetensorsReader, hf.read_json)

SUPPORTED = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
FP8_BLOCK = (128, 128)
Path_ = tuple[str, ...]


# --- reading and writing safetensors ------------------------------------------------
def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
  os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; other files here get the usual mode


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# --- FP8 ------------------------------------------------------------------------------
def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = FP8_BLOCK) -> np.ndarray:
  """e4m3 weight [O, I] x per-block scale [ceil(O/b0), ceil(I/b1)] -> fp32 [O, I].

  Block (r, c) of the weight is multiplied by scale_inv[r, c] (DeepSeek's `weight_dequant`);
  edge blocks are ragged when O or I is not a multiple of the block size.
  """
  o, i = w.shape
  b0, b1 = block
  want = (math.ceil(o / b0), math.ceil(i / b1))
  if tuple(scale_inv.shape) != want:
    raise UserError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {w.shape} in "
                    f"{b0}x{b1} blocks (want {want})")
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, axis=0), b1, axis=1)[:o, :i]
  return w.astype(np.float32) * scale


# --- the key map ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor <-> one or more (our variable path, index into it) slots.

  kind: copy (same layout) | linear (ours [I, *O] = torch [prod O, I].T) | linear2 (ours [H, V, D]
  = torch [D, H*V].T, two input axes) | kv_b (one torch tensor -> k_b and v_b).
  alias: a copy of another variable (MTP embed/head): shape-checked on load, written on save.
  """

  key: str
  kind: str
  parts: tuple[tuple[Path_, tuple[int, ...]], ...]
  alias: bool = False

  def hf_shape(self, slot_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    s = slot_shapes[0]
    if self.kind == "copy":
      return s
    if self.kind == "kv_b":
      (k, h, n), (_, _, v) = slot_shapes
      return (h * (n + v), k)
    n_in = 2 if self.kind == "linear2" else 1
    return (math.prod(s[n_in:]), math.prod(s[:n_in]))

  def to_ours(self, w: np.ndarray, slot_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    if self.kind == "copy":
      return [w]
    if self.kind == "kv_b":
      (k, h, n), _ = slot_shapes
      w = w.reshape(h, -1, k)
      return [w[:, :n].transpose(2, 0, 1), w[:, n:].transpose(2, 0, 1)]
    return [w.T.reshape(slot_shapes[0])]

  def to_ours_fp8(self, q: np.ndarray, scale_inv: np.ndarray, slot_shapes) -> Optional[list[tuple[np.ndarray, ...]]]:
    """(e4m3 weight, 128x128 weight_scale_inv) -> [(q, block scales)] per slot as fp8.Fp8Weight holds
    them; None where the blocks do not map onto the slots (see scales_to_ours)."""
    scales = self.scales_to_ours(scale_inv, slot_shapes)
    return None if scales is None else list(zip(self.to_ours(q, slot_shapes), scales))

  def scales_to_ours(self, scale_inv: np.ndarray, slot_shapes) -> Optional[list[np.ndarray]]:
    """128x128 weight_scale_inv -> the block scales of each slot (fp8.Fp8Weight's layout); None where
    the blocks do not map onto the slots (kv_b whose per-head key and value rows straddle a block:
    N or V not a multiple of 128 and more than one block of rows)."""
    if self.kind in ("linear", "linear2"):
      return [scale_inv.T]
    if self.kind != "kv_b":
      return None
    (_, h, n), (_, _, v) = slot_shapes
    b = FP8_BLOCK[0]
    if scale_inv.shape[0] == 1:
      return [scale_inv.T, scale_inv.T]
    if n % b or v % b:
      return None
    s = scale_inv.reshape(h, (n + v) // b, -1).transpose(2, 0, 1)  # [K/128, H, (N+V)/128]
    return [sc.reshape(sc.shape[0], -1) for sc in (s[:, :, :n // b], s[:, :, n // b:])]

  def axis_maps(self, slot_shapes: list[tuple[int, ...]]) -> list[shards.AxisMap]:
    """Per slot: where each element of ours sits in the HF tensor (to_ours as index arithmetic,
    so a process reads only the rows and columns of the boxes it holds)."""
    s = slot_shapes[0]
    if self.kind == "copy":
      return [shards.AxisMap(rows=((0, 1),), cols=((1, 1),) if len(s) == 2 else ())]
    if self.kind == "kv_b":
      (_, _, n), (_, _, v) = slot_shapes
      rows = ((1, n + v), (2, 1))  # head h, row j of its key (j < N) or value (N + j) rows
      return [shards.AxisMap(rows, ((0, 1),)), shards.AxisMap(rows, ((0, 1),), offset=n)]
    n_in = 2 if self.kind == "linear2" else 1  # ours [*in, *out] = torch [prod out, prod in].T
    stride = lambda d, end: math.prod(s[d + 1:end])  # noqa: E731
    return [shards.AxisMap(rows=tuple((d, stride(d, len(s))) for d in range(n_in, len(s))),
                           cols=tuple((d, stride(d, n_in)) for d in range(n_in)))]

  def to_hf(self, slots: list[np.ndarray]) -> np.ndarray:
    if self.kind == "copy":
      return slots[0]
    if self.kind == "kv_b":
      k_b, v_b = slots
      return np.concatenate([k_b.transpose(1, 2, 0), v_b.transpose(1, 2, 0)], axis=1).reshape(-1, k_b.shape[0])
    n_in = 2 if self.kind == "linear2" else 1
    s = slots[0]
    return s.reshape(math.prod(s.shape[:n_in]), -1).T


def _block_rules(cfg: ModelConfig, p: str, target: Path_, idx: tuple[int, ...], moe: bool, v3: bool) -> list[Rule]:
  def r(key, kind, *names, index=idx, col="params"):
    return Rule(p + key, kind, tuple(((col, *target, *n.split("/")), index) for n in names))

  rules = [r("input_layernorm.weight", "copy", "attn_norm/scale"),
           r("post_attention_layernorm.weight", "copy", "ffn_norm/scale")]
  a = "self_attn."
  if cfg.q_lora_rank:
    rules += [r(a + "q_a_proj.weight", "linear", "attn/q_a"),
              r(a + "q_a_layernorm.weight", "copy", "attn/q_norm/scale"), r(a + "q_b_proj.weight", "linear", "attn/q_b")]
  else:
    rules.append(r(a + "q_proj.weight", "linear", "attn/q"))
  rules += [r(a + "kv_a_proj_with_mqa.weight", "linear", "attn/kv_a"),
            r(a + "kv_a_layernorm.weight", "copy", "attn/kv_norm/scale"),
            r(a + "kv_b_proj.weight", "kv_b", "attn/k_b", "attn/v_b"), r(a + "o_proj.weight", "linear2", "attn/o")]
  if not moe:
    return rules + [r(f"mlp.{w}_proj.weight", "linear", f"mlp/{w}") for w in ("gate", "up", "down")]
  rules.append(r("mlp.gate.weight", "linear", "moe/router/kernel"))
  if v3:
    rules.append(r("mlp.gate.e_score_correction_bias", "copy", "moe/router/e_score_correction_bias", col="router"))
  for w in ("gate", "up", "down"):  # one stacked [E, ...] tensor completes before the next starts
    rules += [r(f"mlp.experts.{e}.{w}_proj.weight", "linear", f"moe/{w}", index=idx + (e,))
              for e in range(cfg.n_routed_experts)]
  if cfg.n_shared_experts:
    rules += [r(f"mlp.shared_experts.{w}_proj.weight", "linear", f"moe/shared/{w}") for w in ("gate", "up", "down")]
  return rules


def hf_rules(cfg: ModelConfig, v3: bool) -> list[Rule]:
  """The full key map for `cfg`, in checkpoint order (embed, layers, MTP, norm, head)."""
  head = (("params", "embed"), ()) if cfg.tie_word_embeddings else (("params", "head"), ())
  head_kind = "copy" if cfg.tie_word_embeddings else "linear"
  rules = [Rule("model.embed_tokens.weight", "copy", ((("params", "embed"), ()),))]
  k = cfg.first_k_dense_replace
  for i in range(cfg.num_hidden_layers):
    moe = cfg.is_moe_layer(i)
    if cfg.scan_layers:  # slot i of the dense stack or slot i - k of the MoE stack
      target, idx = (("moe_layers",), (i - k,)) if moe else (("dense_layers",), (i,))
    else:
      target, idx = (f"layers_{i}",), ()
    rules += _block_rules(cfg, f"model.layers.{i}.", target, idx, moe, v3)
  for d in range(cfg.num_nextn_predict_layers):
    p, m = f"model.layers.{cfg.num_hidden_layers + d}.", f"mtp_{d}"
    rules += _block_rules(cfg, p, (m, "block"), (), cfg.is_moe_layer(cfg.num_hidden_layers), v3)
    rules += [Rule(p + "enorm.weight", "copy", ((("params", m, "enorm", "scale"), ()),)),
              Rule(p + "hnorm.weight", "copy", ((("params", m, "hnorm", "scale"), ()),)),
              Rule(p + "eh_proj.weight", "linear", ((("params", m, "eh_proj"), ()),)),
              Rule(p + "shared_head.norm.weight", "copy", ((("params", m, "head_norm", "scale"), ()),)),
              Rule(p + "embed_tokens.weight", "copy", ((("params", "embed"), ()),), alias=True),
              Rule(p + "shared_head.head.weight", head_kind, (head,), alias=True)]
  rules.append(Rule("model.norm.weight", "copy", ((("params", "final_norm", "scale"), ()),)))
  if not cfg.tie_word_embeddings:
    rules.append(Rule("lm_head.weight", "linear", (head,)))
  return rules


def abstract_variables(model: Transformer) -> dict[Path_, jax.ShapeDtypeStruct]:
  """Flat {(collection, *path): ShapeDtypeStruct} of the model's params and router state."""
  return dict(_abstract_of(model.cfg))


@functools.lru_cache(maxsize=8)  # tracing init takes seconds; a load after config_from_dir asks again
def _abstract_of(cfg: ModelConfig) -> dict[Path_, jax.ShapeDtypeStruct]:
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)))
  return traverse_util.flatten_dict({c: shapes[c] for c in ("params", "router") if c in shapes})


def _slot_shape(shapes, path: Path_, index: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shapes[path].shape[len(index):])


# --- config ---------------------------------------------------------------------------
def _arch(hf: dict[str, Any]) -> str:
  arch = hf.get("model_type")
  if arch in SUPPORTED:
    return arch
  for name, cls in SUPPORTED.items():
    if cls in (hf.get("architectures") or []):
      return name
  raise UserError(f"unsupported architecture model_type={arch!r} architectures={hf.get('architectures')}; "
                  f"supported: {', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")


def _num_layers(hf: dict[str, Any]) -> int:
  """num_hidden_layers, or transformers' default when config.json leaves it out (as ModelConfig.from_hf)."""
  return hf.get("num_hidden_layers") or HF_DEFAULTS[_arch(hf)]["num_hidden_layers"]


def _mtp_depths(keys, num_layers: int) -> int:
  depth = 0
  while f"model.layers.{num_layers + depth}.eh_proj.weight" in keys:
    depth += 1
  return depth


def _ignorable(key: str, cfg: ModelConfig, depths_present: int) -> bool:
  """Keys that carry nothing we load: rotary buffers, MTP depths present but not requested."""
  if key.endswith("rotary_emb.inv_freq"):
    return True
  parts = key.split(".")
  if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
    first_skipped = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return first_skipped <= int(parts[2]) < cfg.num_hidden_layers + depths_present
  return False


def _list(keys, limit=5) -> str:
  keys = sorted(keys)
  more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(repr(k) for k in keys[:limit]) + more


# --- load -----------------------------------------------------------------------------
def _open(path: Path, **config_overrides) -> tuple[ModelConfig, dict[str, Any], SafetensorsReader]:
  """(ModelConfig, config.json dict, reader) of a Hugging Face directory; headers only, no tensor read."""
  if not (path / "config.json").exists():
    raise UserError(f"{path}: no config.json (expected a Hugging Face DeepSeek-V2/V3 directory)")
  hf = read_json(path / "config.json")
  if "model_type" not in hf and (path / "checkpoints").is_dir():
    raise UserError(f"{path} is a train.py workdir, not a Hugging Face directory: evaluate it with --workdir, or "
                    "export it with `python -m moe_jax.convert --from_ckpt`")
  v3 = _arch(hf) == "deepseek_v3"
  reader = SafetensorsReader(path)
  try:
    depths = _mtp_depths(set(reader.keys()), _num_layers(hf)) if v3 else 0
    cfg = ModelConfig.from_hf(hf, **{"num_nextn_predict_layers": depths, **config_overrides})
  except KeyError as e:
    raise UserError(f"{path / 'config.json'}: missing field {e}") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"{path / 'config.json'}: {e}") from None
  return cfg, hf, reader


def config_from_dir(path: str | os.PathLike, **config_overrides) -> ModelConfig:
  """The ModelConfig that load_pretrained(path, ...) would build, from config.json and the
  safetensors headers alone (num_nextn_predict_layers: the MTP depths present)."""
  return _open(Path(path), **config_overrides)[0]


def stores_fp8(path: str | os.PathLike) -> bool:
  """Does config.json declare FP8 weights (quantization_config.quant_method 'fp8', as the released V3)?"""
  with open(Path(path) / "config.json") as f:
    quant = json.load(f).get("quantization_config") or {}
  return quant.get("quant_method") == "fp8"


def pretrained_config(path: str | os.PathLike, dtype: str = "float32", keep_fp8: bool = False,
                      **config_overrides) -> ModelConfig:
  """The ModelConfig load_pretrained(path, dtype, keep_fp8=keep_fp8, **config_overrides) builds,
  from the headers alone: callers build the shardings to load with from it."""
  return config_from_dir(path, **{"dtype": dtype, "param_dtype": dtype, "fp8": keep_fp8, **config_overrides})


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", shardings: Optional[Any] = None,
                    keep_fp8: bool = False, **config_overrides) -> tuple[Transformer, dict[str, Any]]:
  """A Hugging Face DeepSeek-V2/V3 directory -> (Transformer, {'params', 'router'}).

  Reads config.json, checks every tensor's name, shape and dtype from the safetensors headers,
  then reads the tensors into our variables (safetensors_shards.py). `dtype` is the compute and
  parameter dtype (pass param_dtype to keep weights in another one); config_overrides go to
  ModelConfig (moe_impl, scan_layers, ...). num_nextn_predict_layers defaults to the MTP depths
  present in the checkpoint.
  `shardings`: optional pytree like the variables of jax.sharding.Sharding (variables without
  one are whole arrays on the default device). Each process then reads only the byte ranges of
  the boxes its addressable devices hold, once per distinct box, and the variables are global
  arrays with those shardings: host memory holds one variable's local boxes plus one read chunk.
  last_load_stats() gives the bytes this process read.
  keep_fp8: FP8 tensors stay e4m3, their 128x128 scales go to variables['fp8_scales'] (same
  paths; sharded like the stack axes of their variable unless shardings['fp8_scales'] says),
  and the model computes in FP8 (fp8=True unless overridden); where the blocks do not fit our
  layout (see Rule.scales_to_ours) or the router would get them, the tensor is dequantized.
  """
  path = Path(path)
  overrides = {"dtype": dtype, "param_dtype": dtype, "fp8": keep_fp8, **config_overrides}
  cfg, hf, reader = _open(path, **overrides)
  v3 = _arch(hf) == "deepseek_v3"
  keys = set(reader.keys())
  depths = _mtp_depths(keys, _num_layers(hf)) if v3 else 0
  model = Transformer(cfg)
  shapes = abstract_variables(model)
  rules = hf_rules(cfg, v3)
  block = tuple((hf.get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK)

  # Everything that can be checked from the headers is checked before any tensor is read.
  by_key = {r.key: r for r in rules}
  fp8 = {k for k in keys if reader.dtype(k).startswith("F8") and f"{k}_scale_inv" in keys}
  missing = sorted(k for k in by_key if k not in keys)
  if missing:
    first = by_key[missing[0]]
    raise UserError(f"{path}: missing tensors {_list(missing)}; {missing[0]!r} should have shape "
                    f"{first.hf_shape([_slot_shape(shapes, *pt) for pt in first.parts])}")
  unexpected = [k for k in keys if k not in by_key and k.removesuffix("_scale_inv") not in fp8
                and not _ignorable(k, cfg, depths)]
  if unexpected:
    raise UserError(f"{path}: unexpected tensors {_list(unexpected)} (not part of this {SUPPORTED[_arch(hf)]} "
                    f"config: {cfg.num_hidden_layers} layers, {cfg.num_nextn_predict_layers} MTP)")
  for rule in rules:
    want = rule.hf_shape([_slot_shape(shapes, *pt) for pt in rule.parts])
    if reader.shape(rule.key) != want:
      raise UserError(f"tensor {rule.key!r} has shape {reader.shape(rule.key)}, expected {want} "
                      f"(for {'/'.join(rule.parts[0][0])})")
    if reader.dtype(rule.key).startswith("F8") and rule.key not in fp8:
      raise UserError(f"tensor {rule.key!r} is {reader.dtype(rule.key)} but {rule.key}_scale_inv is missing")
    if rule.key in fp8:
      want = tuple(math.ceil(n / b) for n, b in zip(want, block))
      if reader.shape(f"{rule.key}_scale_inv") != want:
        raise UserError(f"tensor {rule.key + '_scale_inv'!r} has shape {reader.shape(rule.key + '_scale_inv')}, "
                        f"expected {want} ({block[0]}x{block[1]} blocks of {rule.key!r})")

  flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  sources = _sources(reader, rules, shapes, fp8, keep_fp8 and block == FP8_BLOCK, block)
  for p in sources:
    if p[0] == "fp8_scales" and p not in flat_shardings:
      flat_shardings[p] = _scale_sharding(flat_shardings.get(("params", *p[1:])), sources[p].stack)
  checkpoint_bytes = sum(e[2] for e in reader.entries.values())
  out, stats = shards.load(reader.entries, _ST_DTYPES, sources, flat_shardings, checkpoint_bytes)
  _LAST_STATS.clear()
  _LAST_STATS.update(dataclasses.asdict(stats))
  for p, s in shapes.items():
    if p not in out:  # V2 has no correction bias: it stays zero
      assert p[0] == "router", p
      sh = flat_shardings.get(p)
      zeros = np.zeros(s.shape, s.dtype)
      out[p] = jnp.asarray(zeros) if sh is None else jax.make_array_from_callback(s.shape, sh, lambda i: zeros[i])
  variables = traverse_util.unflatten_dict(out)
  kept_scales = {"fp8_scales": variables["fp8_scales"]} if "fp8_scales" in variables else {}
  return model, {"params": variables["params"], "router": variables.get("router", {}), **kept_scales}


_LAST_STATS: dict[str, Any] = {}


def last_load_stats() -> dict[str, Any]:
  """This process's figures for its latest load_pretrained: bytes_read (gaps included), reads
  (read calls), seconds, checkpoint_bytes (every tensor of the checkpoint) and planned_bytes
  (the bytes its devices' boxes cover)."""
  return dict(_LAST_STATS)


def _sources(reader: SafetensorsReader, rules: list[Rule], shapes, fp8: set[str], keep_fp8: bool,
             block: tuple[int, int]) -> dict[Path_, shards.Source]:
  """{variable path: Source}, in checkpoint order. An FP8 variable stays e4m3 (with a
  ("fp8_scales", ...) Source of its block scales) when keep_fp8 and all its tensors' blocks map
  onto our layout and it is not the router's; otherwise FP8 tensors are dequantized per box."""
  slots: dict[Path_, dict[tuple[int, ...], tuple[Rule, int, list]]] = {}
  for rule in rules:
    if not rule.alias:
      slot_shapes = [_slot_shape(shapes, *pt) for pt in rule.parts]
      for n, (p, index) in enumerate(rule.parts):
        slots.setdefault(p, {})[index] = (rule, n, slot_shapes)

  def scales(rule: Rule, slot_shapes) -> Optional[list[np.ndarray]]:
    if not keep_fp8 or rule.key not in fp8 or "router" in rule.parts[0][0]:
      return None
    return rule.scales_to_ours(np.zeros(reader.shape(rule.key + "_scale_inv"), np.float32), slot_shapes)

  sources: dict[Path_, shards.Source] = {}
  for p, by_index in slots.items():
    stack = len(next(iter(by_index)))
    kept = all(scales(rule, ss) is not None for rule, _, ss in by_index.values())
    if kept:
      rule, n, ss = next(iter(by_index.values()))
      scale_shape = shapes[p].shape[:stack] + scales(rule, ss)[n].shape
      convert = lambda s, rule, n, ss: rule.scales_to_ours(s.astype(np.float32), ss)[n]  # noqa: E731
      sources[("fp8_scales", *p[1:])] = shards.Source(scale_shape, np.float32, stack, {
          i: shards.Slot(rule.key + "_scale_inv", convert=functools.partial(convert, rule=rule, n=n, ss=ss))
          for i, (rule, n, ss) in by_index.items()})
    dtype = _ST_DTYPES[reader.dtype(next(iter(by_index.values()))[0].key)] if kept else shapes[p].dtype
    sources[p] = shards.Source(tuple(shapes[p].shape), dtype, stack, {
        i: shards.Slot(rule.key, rule.axis_maps(ss)[n],
                       scale_key=rule.key + "_scale_inv" if rule.key in fp8 and not kept else None, block=block)
        for i, (rule, n, ss) in by_index.items()})
  return dict(sorted(sources.items(), key=lambda kv: kv[0][0] == "fp8_scales"))


def _scale_sharding(param_sharding, stack: int):
  """Block scales of a kept FP8 variable: sharded as its stack axes (layers, experts), whole per slot."""
  if not isinstance(param_sharding, jax.sharding.NamedSharding):
    return param_sharding
  spec = tuple(param_sharding.spec) + (None,) * stack
  return jax.sharding.NamedSharding(param_sharding.mesh, jax.sharding.PartitionSpec(*spec[:stack], None, None))


# --- save -----------------------------------------------------------------------------
def _check_expressible(cfg: ModelConfig) -> None:
  """Raises where transformers' DeepSeek modules would compute something else than ours."""
  v3 = cfg.scoring_func == "sigmoid"
  if cfg.num_moe_layers and cfg.moe_layer_freq != 1:
    raise UserError("ModelConfig.moe_layer_freq: transformers puts an MoE in every layer after "
                    f"first_k_dense_replace; moe_layer_freq={cfg.moe_layer_freq} cannot be saved")
  if v3 and cfg.n_group > 1 and cfg.topk_method == "greedy":
    raise UserError("ModelConfig.topk_method: transformers' DeepSeek-V3 always routes group-limited; "
                    "greedy with n_group > 1 cannot be saved (use noaux_tc or n_group=1)")
  if not v3 and cfg.norm_topk_prob:
    raise UserError("ModelConfig.norm_topk_prob: transformers' DeepSeek-V2 (softmax) ignores it; cannot save True")
  if not v3 and cfg.num_nextn_predict_layers:
    raise UserError("ModelConfig.num_nextn_predict_layers: DeepSeek-V2 (softmax) has no MTP layers in transformers")
  if not v3 and cfg.n_group > 1 and cfg.topk_method == "noaux_tc":
    raise UserError("ModelConfig.topk_method: DeepSeek-V2 (softmax) routes greedy or group_limited_greedy")


def save_pretrained(model: Transformer | ModelConfig, variables: dict[str, Any], path: str | os.PathLike,
                    dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json + safetensors shards in the released per-expert key layout.

  sigmoid scoring saves as DeepseekV3ForCausalLM (router biases included), softmax as
  DeepseekV2ForCausalLM (whose router has no bias: a non-zero bias raises). `dtype` defaults
  to cfg.param_dtype; the router bias stays fp32. Refuses a directory that holds safetensors.
  """
  cfg = model.cfg if isinstance(model, Transformer) else model
  _check_expressible(cfg)
  v3 = cfg.scoring_func == "sigmoid"
  dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  flat = traverse_util.flatten_dict(nn.unbox({c: variables[c] for c in ("params", "router") if c in variables}))
  if not v3:
    for p, v in flat.items():
      if p[0] == "router" and np.any(np.asarray(v) != 0):
        raise UserError(f"{'/'.join(p)} is non-zero, but DeepSeek-V2 (softmax routing) has no correction bias "
                        "in transformers; save as sigmoid (V3) or zero it")
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if any(path.glob("*.safetensors")):
    raise UserError(f"{path} already holds safetensors files; save into an empty directory")

  def slot(p: Path_, index) -> np.ndarray:
    if p not in flat:
      if p[0] == "router":  # variables without router state: zero biases
        return np.zeros((cfg.n_routed_experts,), np.float32)
      raise UserError(f"variables lack {'/'.join(p)} (config {cfg.num_hidden_layers} layers, "
                      f"scan_layers={cfg.scan_layers}, {cfg.num_nextn_predict_layers} MTP)")
    return np.asarray(flat[p][index] if index else flat[p])

  shards, current, size, weight_map = [], {}, 0, {}

  def flush():
    nonlocal current, size
    if current:
      name = f"shard-{len(shards)}.tmp"
      _write_safetensors(path / name, current)
      shards.append((name, list(current)))
      current, size = {}, 0

  total = 0
  for rule in hf_rules(cfg, v3):
    w = rule.to_hf([slot(p, index) for p, index in rule.parts])
    w = w.astype(np.float32 if rule.parts[0][0][0] == "router" else dtype)
    if size and size + w.nbytes > max_shard_bytes:
      flush()
    current[rule.key] = w
    size += w.nbytes
    total += w.nbytes
  flush()
  if len(shards) == 1:
    os.replace(path / shards[0][0], path / "model.safetensors")
  else:
    for n, (tmp, keys) in enumerate(shards, start=1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      os.replace(path / tmp, path / name)
      weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  hf = cfg.to_hf("deepseek_v3" if v3 else "deepseek_v2")
  if not v3 and hf["topk_method"] == "noaux_tc":  # n_group == 1 (checked): plain top-k
    hf["topk_method"] = "greedy"
  hf.update(torch_dtype=dtype.name, dtype=dtype.name)
  (path / "config.json").write_text(json.dumps(hf, indent=2))
