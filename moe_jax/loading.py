"""Evaluation's model sources: a train.py run, one checkpoint step, a Hugging Face directory or a
random preset -> (model, variables placed on a mesh, info). Used by eval.py (moe_jax.evaluate)
and the lm-evaluation-harness adapter (moe_jax.lm_eval_adapter); it imports neither.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax

from moe_jax import data, sharding
from moe_jax import variables as model_variables
from moe_jax.errors import UserError


WEIGHTS = ("auto", "fp8", "dense")  # eval.py --weights (for --hf)


# --- sources -----------------------------------------------------------------------
def make_mesh(shape: Optional[Sequence[int]] = None, config=None):
  """-> (mesh, rules): `shape` (data, fsdp, expert, tensor), else the training config's mesh
  when it fits this machine's devices, else every device on 'data'."""
  overrides = ()
  if config is not None and "mesh" in config:
    overrides = [tuple(r) for r in config.mesh.get("rules", ())]
    if shape is None:
      m = config.mesh
      try:
        mesh = sharding.make_mesh(m.data, m.fsdp, m.expert, m.tensor)
        return mesh, sharding.mesh_rules(mesh, overrides)
      except ValueError:  # trained on another machine: fall back to data parallelism
        pass
  try:
    mesh = sharding.make_mesh(*(shape or (-1,)))
    return mesh, sharding.mesh_rules(mesh, overrides)
  except ValueError as e:
    raise UserError(f"--mesh={','.join(map(str, shape or ()))}: {e}") from None


def _run_config(path: str):
  """The run's WORKDIR/config.json (for its mesh and rules) from a workdir or step path, or None."""
  import ml_collections
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, "config.json")) and os.path.isdir(os.path.join(candidate, "checkpoints")):
      with open(os.path.join(candidate, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))
  return None


def load_model(*, workdir: Optional[str] = None, checkpoint: Optional[str] = None, hf: Optional[str] = None,
               preset: Optional[str] = None, vocab_size: Optional[int] = None, dtype: Optional[str] = None,
               seed: int = 0, mesh_shape: Optional[Sequence[int]] = None, weights: str = "auto"):
  """Exactly one source -> (model, variables {'params', 'router'}, info {name, step, mesh, rules}).

  workdir: a train.py run (latest checkpoint); checkpoint: one step directory; hf: a
  Hugging Face DeepSeek-V2/V3 directory; preset: a randomly initialized ModelConfig preset
  (vocab_size overrides its vocabulary), for chance-level baselines. Variables are placed
  on the mesh (make_mesh) with the training shardings.
  weights (hf only): 'fp8' keeps an FP8 checkpoint's e4m3 blocks and 128x128 scales and computes
  in FP8 (half the memory of bf16: how a released V3 fits a serving slice), 'dense' dequantizes
  them to `dtype` (transformers' numbers), 'auto' keeps what the directory stores.
  """
  if weights not in WEIGHTS:
    raise UserError(f"--weights={weights!r} is not one of {', '.join(WEIGHTS)}")
  if weights != "auto" and not hf:
    raise UserError(f"--weights={weights} applies to --hf only (a run's checkpoint is evaluated in its own dtype)")
  given = {k: v for k, v in dict(workdir=workdir, checkpoint=checkpoint, hf=hf, preset=preset).items() if v}
  if len(given) != 1:
    raise UserError(f"give exactly one of --workdir, --checkpoint, --hf, --preset (got {sorted(given) or 'none'})")
  if workdir or checkpoint:
    path = workdir or checkpoint
    if not os.path.exists(path):
      raise UserError(f"no checkpoint at {path}: the path does not exist")
    from moe_jax import checkpoint as ckpt_lib
    mesh, rules = make_mesh(mesh_shape, _run_config(path))
    config, model, variables, step = ckpt_lib.restore_for_eval(path, mesh=mesh, rules=rules)
    tokenizer = config.get("data", {}).get("tokenizer", "byte") if config is not None else "byte"
    # the context the run trained at: eval.py's default --max_len (a longer window scores positions it never saw)
    seq_len = config.get("seq_len") if config is not None else None
    return for_eval(model), variables, {"name": os.path.abspath(path), "step": step, "mesh": mesh, "rules": rules,
                                        "tokenizer": tokenizer, "seq_len": seq_len}
  mesh, rules = make_mesh(mesh_shape)
  if hf:
    if not os.path.isfile(os.path.join(hf, "config.json")):
      raise UserError(f"--hf={hf}: not a Hugging Face model directory (no config.json)")
    from moe_jax import hf as hf_lib
    from moe_jax.model import Transformer
    stores_fp8 = hf_lib.stores_fp8(hf)
    if weights == "fp8" and not stores_fp8:
      raise UserError(f"--weights=fp8: {hf} stores no FP8 weights (config.json has no FP8 quantization_config); "
                      "use --weights=dense or auto")
    load_kw = {"dtype": dtype} if dtype else {}
    load_kw["keep_fp8"] = weights == "fp8" or (weights == "auto" and stores_fp8)
    try:  # placed as scoring.place would: each process reads only what its devices hold
      abstract = model_variables.abstract_sharded(Transformer(hf_lib.pretrained_config(hf, **load_kw)),
                                                  (sharding.data_parallel_size(mesh, rules), 1), mesh, rules)
      model, variables = hf_lib.load_pretrained(hf, shardings=jax.tree.map(lambda a: a.sharding, abstract), **load_kw)
    except ValueError as e:  # config/tensor mismatches, named by hf.py
      raise UserError(f"--hf={hf}: {e}") from None
    name, step = os.path.abspath(hf), None
    tokenizer = data.tokenizer_of_dir(hf)  # an exported byte-level run's tokenizer.json is read as 'byte'
  else:
    from moe_jax.config import PRESETS
    from moe_jax.model import Transformer
    if preset not in PRESETS:
      raise UserError(f"--preset={preset!r} is not one of {sorted(PRESETS)}")
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    if dtype:
      overrides["dtype"] = dtype
    try:
      model = Transformer(PRESETS[preset](**overrides))
    except (TypeError, ValueError) as e:  # --dtype, or a tokenizer vocabulary the preset cannot take
      raise UserError(f"--preset={preset}: {e}") from None
    variables, _ = model_variables.init_sharded(model, jax.random.key(seed), (sharding.data_parallel_size(mesh, rules), 1),
                                           mesh, rules)
    return for_eval(model), variables, {"name": f"{preset} (random init, seed {seed})", "step": 0, "mesh": mesh,
                                        "rules": rules, "tokenizer": "byte"}
  return for_eval(model), variables, {"name": name, "step": step, "mesh": mesh, "rules": rules,
                                      "tokenizer": tokenizer}


def for_eval(model):
  """The same weights with a dropless MoE: a capacity would make a score depend on the other
  rows of its batch (dropped tokens), so evaluation swaps 'capacity' for 'ragged' and runs 'ep'
  without a capacity (config.dropless), whatever the training setting."""
  from moe_jax.config import dropless
  cfg = dropless(model.cfg)
  return model if cfg == model.cfg else type(model)(cfg)
