"""`--config.init_from=PATH`: start a run from released or trained weights instead of random ones.

PATH is one of (`detect` tells them apart from their files, reading no tensor):
  hf        a Hugging Face DeepSeek-V2/V3 directory, bf16 or fp32 (config.json + safetensors)
  hf_fp8    the same with e4m3 weights and 128x128 `weight_scale_inv` blocks (DeepSeek-V3's release)
  convert   a `python -m moe_jax.convert --hf` checkpoint (model_config.json + variables/)
  workdir   another train.py run: its workdir (newest intact step), checkpoints/ or one step directory

What the run takes from PATH and what from its own config (one place: the two tuples below):
  CHECKPOINT_FIELDS  what the weights are: shapes (layers, widths, heads, experts, groups, vocab,
                     MTP depth), routing and rope. Taken from PATH whatever the preset says; one
                     log line lists the preset values replaced. An explicit `--config.model.X`
                     that contradicts PATH is a UserError naming X and both values.
  CONFIG_FIELDS      how to compute and train them (dtypes, dispatch, scan, remat, attention,
                     FP8, the balance loss): the run's config.
Loaded: params (in model.param_dtype; FP8 blocks dequantized per block, then re-quantized
on the fly when model.fp8=True, as a random-init FP8 run), the router's correction bias and
the MTP depths. Fresh: the optimizer state, the step (0) and the rng.

Everything that can be checked from config files and headers is checked before the weights
are read and before anything compiles: a missing or foreign PATH, a contradicting flag, a
vocabulary smaller than the tokenizer's or the data's largest id. A run resuming from its
own checkpoints never reads PATH again (its shape fields come from WORKDIR/config.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from moe_jax import checkpoint, data, variables
from moe_jax.config import ModelConfig, RopeScaling
from moe_jax.errors import UserError, one_line

KINDS = ("hf", "hf_fp8", "convert", "workdir")

# ModelConfig fields that describe the checkpoint's weights: shapes and the function they compute.
CHECKPOINT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "topk_method",
    "scoring_func", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace", "moe_layer_freq",
    "num_nextn_predict_layers", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_interleave",
    "rms_norm_eps", "tie_word_embeddings", "attention_type", "num_key_value_heads",
    "initializer_range",  # unused by loaded weights; kept so that an export writes the source's value
)
# ModelConfig fields that follow the run's config: compute layout, precision and the training objective.
CONFIG_FIELDS = (
    "dtype", "param_dtype", "moe_impl", "capacity_factor", "ep_round_factor", "moe_gmm", "scan_layers",
    "remat_policy", "attention_impl", "fp8", "fp8_kernel", "aux_loss_alpha", "balance_loss",
)


@dataclasses.dataclass(frozen=True)
class Origin:
  """Where a run starts: PATH as given, its kind and the source's model config (checkpoint fields)."""

  path: str
  kind: str
  model: ModelConfig
  resumed: bool = False  # the workdir already has checkpoints: PATH is not read again


# --- what PATH is ----------------------------------------------------------------------------
def _fail(path: str, msg: str):
  """config.init_from errors name the flag once and the path once."""
  raise UserError(f"config.init_from: {msg}" if str(path) in msg else f"config.init_from={path}: {msg}")


def _is_workdir(p: str) -> bool:
  base, parent = os.path.basename(p), os.path.basename(os.path.dirname(p))
  return (os.path.isdir(os.path.join(p, "checkpoints")) or base == "checkpoints"
          or (base.isdigit() and parent == "checkpoints"))


def detect(path: str) -> Origin:
  """PATH -> Origin from config files and safetensors headers alone (no tensor is read)."""
  from moe_jax import convert, hf
  p = os.path.abspath(path)
  if not os.path.exists(p):
    _fail(path, "no such directory; give a Hugging Face DeepSeek-V2/V3 directory, a `convert --hf` checkpoint "
          "or a train.py workdir")
  if not os.path.isdir(p):
    _fail(path, "is a file; give a directory")
  try:
    if _is_workdir(p):
      workdir, _ = checkpoint._resolve(p)
      cfg_path = os.path.join(workdir, "config.json")
      if not os.path.isfile(cfg_path):
        _fail(path, f"{cfg_path} is missing, so the run's model config is unknown")
      saved = hf.read_json(Path(cfg_path))
      return Origin(path, "workdir", checkpoint.model_config(ml_collections.ConfigDict(saved)))
    if os.path.isfile(os.path.join(p, convert.CONFIG_FILE)) or os.path.isdir(os.path.join(p, convert.VARIABLES_DIR)):
      if not os.path.isdir(os.path.join(p, convert.VARIABLES_DIR)):
        _fail(path, f"a convert checkpoint needs {convert.CONFIG_FILE} and {convert.VARIABLES_DIR}/")
      try:
        model = ModelConfig.from_dict(hf.read_json(Path(p) / convert.CONFIG_FILE))
      except (TypeError, ValueError) as e:
        _fail(path, f"{convert.CONFIG_FILE}: {one_line(e)}")
      return Origin(path, "convert", model)
    if not os.path.isfile(os.path.join(p, "config.json")):
      _fail(path, "neither a Hugging Face DeepSeek-V2/V3 directory (config.json + safetensors), a `convert --hf` "
            f"checkpoint ({convert.CONFIG_FILE} + {convert.VARIABLES_DIR}/) nor a train.py workdir (checkpoints/)")
    model = hf.config_from_dir(p)
    reader = hf.SafetensorsReader(p)
    fp8 = any(reader.dtype(k).startswith("F8") for k in reader.keys())
    return Origin(path, "hf_fp8" if fp8 else "hf", model)
  except UserError as e:
    if str(e).startswith("config.init_from"):
      raise
    _fail(path, str(e))


# --- the run's config --------------------------------------------------------------------------
def _norm(field: str, value: Any) -> Any:
  """A model field's value in one form, so that preset, flag and checkpoint values compare."""
  if hasattr(value, "to_dict"):  # a ConfigDict
    value = value.to_dict()
  if field == "rope_scaling" and isinstance(value, dict):
    return RopeScaling(**{k: v for k, v in value.items() if k not in ("type", "rope_type")})
  if field == "q_lora_rank" and not value:
    return None
  return value


def _show(value: Any) -> str:
  if isinstance(value, RopeScaling):
    return "yarn(" + ", ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(value).items()) + ")"
  return repr(value)


def _saved_config(workdir: Optional[str]) -> Optional[dict]:
  """WORKDIR/config.json when the workdir already holds a checkpoint (the run resumes), else None."""
  if not workdir:
    return None
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path) or checkpoint.latest_step(workdir) is None:
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None  # check_workdir names the damaged file


def origin_of(config, workdir: Optional[str] = None) -> Optional[Origin]:
  """The run's Origin (None without init_from). A workdir that already holds checkpoints of a run
  started from the same PATH resumes: its saved config gives the shape fields and PATH is not read."""
  path = config.get("init_from", "")
  if not path:
    return None
  saved = _saved_config(workdir)
  if saved and saved.get("init_from") == path and saved.get("init_from_kind") in KINDS:
    model = checkpoint.model_config(ml_collections.ConfigDict(saved))
    return Origin(path, saved["init_from_kind"], model, resumed=True)
  return detect(path)


def check_explicit(config, explicit: Iterable[str], workdir: Optional[str] = None):
  """UserError when a model field given on the command line (`--config.model.X`) contradicts init_from's checkpoint."""
  origin = origin_of(config, workdir)
  if origin is None:
    return
  for field in sorted(set(explicit) & set(CHECKPOINT_FIELDS)):
    given, have = _norm(field, config.model[field]), _norm(field, getattr(origin.model, field))
    if given != have:
      raise UserError(f"--config.model.{field}={_show(given)} contradicts config.init_from={origin.path}, whose "
                      f"checkpoint has {field}={_show(have)}; drop the flag (the checkpoint sets the model's shape)")


def resolve(config, workdir: Optional[str] = None) -> tuple[Any, Optional[Origin]]:
  """(the run's config with the checkpoint's fields, Origin); (config, None) without init_from.

  The returned ConfigDict is a copy: model.CHECKPOINT_FIELDS from the checkpoint, the rest as
  given, and `init_from_kind` recording the kind. One log line lists the preset values replaced.
  """
  origin = origin_of(config, workdir)
  if origin is None:
    return config, None
  theirs = origin.model.to_dict()
  replaced = [f"{f} {_show(_norm(f, config.model[f]))} -> {_show(_norm(f, theirs[f]))}"
              for f in CHECKPOINT_FIELDS if _norm(f, config.model[f]) != _norm(f, theirs[f])]
  d = config.to_dict()
  d["model"] = {**d["model"], **{f: theirs[f] for f in CHECKPOINT_FIELDS}}
  d["init_from_kind"] = origin.kind
  out = ml_collections.ConfigDict(d)
  if config.is_locked:
    out.lock()
  if replaced and not origin.resumed and jax.process_index() == 0:
    logging.info("init_from %s (%s): the checkpoint's model fields replace the config's: %s", origin.path,
                 origin.kind, "; ".join(replaced))
  check_vocab(out, origin)
  return out, origin


def _data_max_id(data_cfg) -> int:
  """The largest token id the configured data holds, from its meta (no scan)."""
  if data_cfg.path == "synthetic:copy":
    return data.CopySource(1, 1, 0).meta["max_token_id"]
  if not data_cfg.path:
    return data.BYTE_EOS
  return int(data.load_meta(data_cfg.path)["max_token_id"])


def check_vocab(config, origin: Origin):
  """The checkpoint's vocabulary must hold the tokenizer's ids and the data's largest id."""
  vocab = origin.model.vocab_size
  if config.data.path != "synthetic:copy":  # the copy task has its own ids, whatever data.tokenizer says
    tok = data.load_tokenizer(config.data.get("tokenizer", "byte") or "byte")
    if tok.vocab_size > vocab:
      raise UserError(f"config.init_from={origin.path} has vocab_size {vocab}, smaller than data.tokenizer "
                      f"{config.data.tokenizer!r} ({tok.vocab_size} ids); use the checkpoint's tokenizer")
  top = _data_max_id(config.data)
  if top >= vocab:
    raise UserError(f"config.init_from={origin.path} has vocab_size {vocab}, but data.path "
                    f"{config.data.path or '(embedded corpus)'!r} holds token id {top}; prepare the data with the "
                    "checkpoint's tokenizer")


# --- the weights -------------------------------------------------------------------------------
def _scanned_to_layers(tree: dict, cfg: ModelConfig) -> dict:
  """{dense_layers, moe_layers: [n, ...] stacks} -> {layers_i}; other entries unchanged."""
  out = {k: v for k, v in tree.items() if k not in ("dense_layers", "moe_layers")}
  k = cfg.first_k_dense_replace
  for name, first in (("dense_layers", 0), ("moe_layers", k)):
    if name in tree:
      n = jax.tree.leaves(tree[name])[0].shape[0]
      out.update({f"layers_{first + j}": jax.tree.map(lambda x, j=j: x[j], tree[name]) for j in range(n)})
  return out


def _layers_to_scanned(tree: dict, cfg: ModelConfig) -> dict:
  """{layers_i} -> {dense_layers, moe_layers: [n, ...] stacks} (scan needs moe_layer_freq 1: dense, then MoE)."""
  out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
  k = cfg.first_k_dense_replace
  for name, idx in (("dense_layers", range(k)), ("moe_layers", range(k, cfg.num_hidden_layers))):
    present = [tree[f"layers_{i}"] for i in idx if f"layers_{i}" in tree]
    if present:
      out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *present)
  return out


def _relayout(values: dict, src: ModelConfig, abstract: dict) -> dict:
  """Variables in the source's layout and dtype -> the run's (abstract: ShapeDtypeStructs with shardings).

  One jit with out_shardings: restacking (scan_layers differs) and the cast to param_dtype run
  sharded, never on one host."""
  dst_scanned = "dense_layers" in abstract["params"] or "moe_layers" in abstract["params"]
  src_scanned = src.scan_layers

  def convert(values):
    out = {}
    for c, tree in values.items():
      if src_scanned and not dst_scanned:
        tree = _scanned_to_layers(tree, src)
      elif dst_scanned and not src_scanned:
        tree = _layers_to_scanned(tree, src)
      out[c] = tree
    return jax.tree.map(lambda x, a: x.astype(a.dtype), out, abstract)

  shapes = jax.eval_shape(lambda v: jax.tree.map(lambda x: x, v), values)
  try:
    want = jax.eval_shape(convert, shapes)
  except ValueError as e:  # tree structures differ: the source does not fit this model
    raise UserError(f"the init_from variables do not fit this model's layout ({one_line(e)})") from None
  bad = checkpoint.shape_mismatches(want, abstract)
  if bad:
    raise UserError("the init_from variables do not fit this model: " + "; ".join(bad[:6]))
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return jax.jit(convert, out_shardings=shardings, donate_argnums=0)(values)


def load_variables(origin: Origin, model_cfg: ModelConfig, abstract: dict, mesh, rules) -> tuple[dict, dict]:
  """-> ({'params', 'router'} placed with abstract's shardings and dtypes, a record of what was read).

  abstract: {'params', 'router'} ShapeDtypeStructs carrying the run's shardings."""
  from moe_jax import hf
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  info: dict[str, Any] = {}
  if origin.kind in ("hf", "hf_fp8"):
    # dtype: the compute dtype; the param_dtype override keeps master weights (FP8: dequantized) in param_dtype.
    overrides = {f: getattr(model_cfg, f) for f in CONFIG_FIELDS if f != "dtype"}
    try:
      model, values = hf.load_pretrained(origin.path, dtype=model_cfg.dtype, shardings=shardings, **overrides)
    except UserError as e:
      _fail(origin.path, str(e))
    if model.cfg != model_cfg:
      diff = [f.name for f in dataclasses.fields(model_cfg) if getattr(model.cfg, f.name) != getattr(model_cfg, f.name)]
      raise RuntimeError(f"hf.load_pretrained built another model config than init_from resolved (fields {diff})")
    values = {"params": values["params"], "router": values.get("router", {})}
    return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), values, abstract), info
  if origin.kind == "workdir":
    saved_cfg, src_model, values, step = checkpoint.restore_for_eval(origin.path, mesh=mesh, rules=rules)
    info["init_from_step"] = step
    src = src_model.cfg
  else:
    src, values = _restore_convert(origin.path, origin.model, mesh, rules)
  mismatch = [f for f in CHECKPOINT_FIELDS if _norm(f, getattr(src, f)) != _norm(f, getattr(model_cfg, f))]
  if mismatch:  # a workdir whose step config differs from WORKDIR/config.json
    _fail(origin.path, f"the restored checkpoint's {', '.join(mismatch)} differ from its config.json")
  values = {"params": values["params"], "router": values.get("router", {})}
  return _relayout(values, src, abstract), info


def _restore_convert(path: str, src: ModelConfig, mesh, rules) -> tuple[ModelConfig, dict]:
  """A `convert --hf` checkpoint restored straight into shardings on the run's mesh (its own layout/dtype)."""
  import orbax.checkpoint as ocp

  from moe_jax import convert
  from moe_jax.model import Transformer
  abstract = variables.abstract_sharded(Transformer(src), (1, 8), mesh, rules)
  target = os.path.join(os.path.abspath(path), convert.VARIABLES_DIR)
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(target)
    saved = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    bad = checkpoint.shape_mismatches({k: saved[k] for k in abstract if k in saved}, abstract)
    if bad:
      _fail(path, f"{convert.VARIABLES_DIR}/ does not match {convert.CONFIG_FILE}: " + "; ".join(bad[:6]))
    values = ckptr.restore(target, args=ocp.args.PyTreeRestore(
        item=abstract, partial_restore=True, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
  convert.verify(Path(path), values)  # its checksums.json; NaN/inf refused
  return src, values


def record(workdir: str, origin: Origin, info: dict):
  """metrics.jsonl's first record: where the run started (process 0 writes it)."""
  if jax.process_index() != 0:
    return
  rec = {"step": 0, "init_from": os.path.abspath(origin.path), "init_from_kind": origin.kind, **info}
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # a fresh start: earlier records never checkpointed
    f.write(json.dumps(rec) + "\n")
