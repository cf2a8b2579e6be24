"""Checkpoints: one orbax CheckpointManager per workdir, and the guards that keep runs apart.

Layout: WORKDIR/config.json (the run's config, written once), WORKDIR/checkpoints/<step>/
with two items: `state` (step, params, opt_state, router, rng) and `config` (JSON).
orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every item is
committed, so a process killed mid-save leaves only a tmp directory, which the next run
ignores (and removes): the latest *complete* checkpoint is what resumes.

Restores go into abstract trees (jax.ShapeDtypeStruct with a sharding), so a checkpoint
written on one mesh restores onto another. Shapes are compared with the checkpoint's
metadata first, and an incompatible checkpoint is refused with the differing shapes named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.errors import UserError
from moe_jax.model import Transformer

# Config fields that may change when a run resumes (cadence, layout, hooks); the rest must match.
RESUMABLE = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "mesh", "checkpoint",
             "nan_policy", "peak_flops", "debug", "data.path", "model.moe_impl", "model.remat_policy")
# Test hook: MOE_JAX_TEST_PAUSE_SAVE="STEP:MARKER" makes the save of STEP touch MARKER and then
# hang inside the commit (before the rename), so a test can kill -9 a process mid-save.
PAUSE_ENV = "MOE_JAX_TEST_PAUSE_SAVE"


class _ConfigHandler(ocp.JsonCheckpointHandler):
  """The `config` item: JSON, plus the mid-save pause hook used by tests."""

  async def _save_fn(self, x, directory):
    hook = os.environ.get(PAUSE_ENV)
    if hook and int(hook.split(":", 1)[0]) == x.get("step"):
      with open(hook.split(":", 1)[1], "w") as f:
        f.write(str(directory))
      time.sleep(600)  # the test kills the process meanwhile
    await super()._save_fn(x, directory)


@ocp.args.register_with_handler(_ConfigHandler, for_save=True)
@dataclasses.dataclass
class _ConfigSave(ocp.args.JsonSave):
  pass


@ocp.args.register_with_handler(_ConfigHandler, for_restore=True)
@dataclasses.dataclass
class _ConfigRestore(ocp.args.JsonRestore):
  pass


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _shapes(tree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {_path_str(p): tuple(v.shape) for p, v in flat if v is not None and hasattr(v, "shape")}


def shape_mismatches(saved_tree, target_tree) -> list[str]:
  """'path: checkpoint (a, b) vs this config (c, d)' for every leaf whose shape (or presence) differs."""
  saved, target = _shapes(saved_tree), _shapes(target_tree)
  out = []
  # Parameters first: the optimizer state only mirrors them.
  for k in sorted(set(saved) | set(target), key=lambda k: (not k.startswith(("params", "router")), k)):
    a, b = saved.get(k, "absent"), target.get(k, "absent")
    if a != b:
      out.append(f"{k}: checkpoint {a} vs this config {b}")
  return out


class Checkpointer:
  """The workdir's CheckpointManager: async saves, max_to_keep, restore into sharded abstract trees."""

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save)  # read_only: never saves (orbax's own flag only adds warnings)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        # The PyTree handler reads the same format and can restore a subset (restore_for_eval).
        item_handlers={"state": ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler(),
                       "config": _ConfigHandler("config.json")})
    self.read_only = read_only

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, config: dict):
    """Starts an async save of `state` (a dict of arrays) and the config at `step`."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=_ConfigSave({"step": step, "config": config})), force=True)

  def config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=_ConfigRestore()))["config"]["config"]

  def saved_tree(self, step: int):
    return self.manager.item_metadata(step)["state"]

  def restore(self, step: int, abstract_state: dict, partial: bool = False) -> dict:
    """Restores `state` into abstract_state (ShapeDtypeStructs with shardings); refuses other shapes."""
    saved = self.saved_tree(step)
    mismatch = shape_mismatches(saved if not partial else {k: saved[k] for k in abstract_state if k in saved},
                                abstract_state)
    if mismatch:
      raise UserError(f"checkpoint {self.directory}/{step} does not fit this config; differing shapes: "
                      + "; ".join(mismatch[:8]) + (f" (and {len(mismatch) - 8} more)" if len(mismatch) > 8 else ""))
    if partial or self.read_only:
      args = ocp.args.PyTreeRestore(item=abstract_state, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    else:
      args = ocp.args.StandardRestore(abstract_state)
    return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# --- workdir guard ------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_diff(old: dict, new: dict, ignore=RESUMABLE) -> list[str]:
  """'field: workdir X != this run Y' for fields that differ and may not change on resume."""
  a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
  skip = lambda k: any(k == p or k.startswith(p + ".") for p in ignore)  # noqa: E731
  return [f"{k}: workdir {a.get(k, '<absent>')!r} != this run {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_workdir(workdir: str, config: dict, abstract_state: dict):
  """Refuses a workdir that holds another run; writes WORKDIR/config.json for a new one.

  Another run = a config.json whose non-resumable fields differ (the message lists them and,
  when a checkpoint exists, the parameter shapes that differ), or a non-empty directory
  that is not a moe_jax workdir at all.
  """
  cfg_path = os.path.join(workdir, "config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      old = json.load(f)
    diff = config_diff(old, config)
    if diff:
      msg = f"workdir {workdir} holds a run of another config ({'; '.join(diff[:10])})"
      step = latest_step(workdir)
      if step is not None:
        shapes = shape_mismatches(Checkpointer(workdir, read_only=True).saved_tree(step), abstract_state)
        if shapes:
          msg += f"; its checkpoint {step} has other shapes: {'; '.join(shapes[:6])}"
      raise UserError(msg + "; use another --workdir, or delete this one to start over")
    return
  foreign = sorted(set(os.listdir(workdir)) - {"checkpoints", "metrics.jsonl", "expert_load.jsonl", "tb"}) \
      if os.path.isdir(workdir) else []
  if foreign or latest_step(workdir) is not None:
    raise UserError(f"workdir {workdir} is not empty ({', '.join(foreign[:5]) or 'checkpoints'}) and holds no "
                    "moe_jax config.json; refusing to overwrite it: pick a new --workdir")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(cfg_path, "w") as f:
      json.dump(config, f, indent=1, sort_keys=True)


# --- model helpers shared with training and evaluation ------------------------------------
def abstract_variables(model: Transformer, tokens_shape: tuple[int, int], mesh, rules) -> dict:
  """{'params', 'router'} as ShapeDtypeStructs carrying their target shardings; nothing allocated."""
  def init(key):
    v = model.init(key, jnp.zeros(tokens_shape, jnp.int32))
    return {c: v[c] for c in ("params", "router") if c in v}

  with sharding.activation_rules(mesh, rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = nn.unbox(sharding.named_shardings(boxed, mesh, rules))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)


def model_config(config) -> ModelConfig:
  """ModelConfig from the `model` ConfigDict (or dict); bad fields become a UserError."""
  d = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config["model"])
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise UserError(f"config.model: {e}") from None


def _resolve(path: str) -> tuple[str, Optional[int]]:
  """A workdir, its checkpoints/ directory or one step directory -> (workdir, step or None)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"no checkpoint at {path}: the path does not exist")
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    return os.path.dirname(os.path.dirname(path)), int(base)
  if base == "checkpoints":
    return os.path.dirname(path), None
  return path, None


def latest_step(workdir: str) -> Optional[int]:
  """The latest complete checkpoint step under WORKDIR/checkpoints, or None."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  return Checkpointer(workdir, read_only=True).latest_step()


def restore_for_eval(path: str, mesh=None, rules=None):
  """Restores a trained model for evaluation without its optimizer state.

  path: a workdir (its latest step), its checkpoints/ directory, or a step directory.
  mesh: target mesh (default: every device on 'data'); rules: default the config's.
  Returns (config ConfigDict, Transformer, variables {'params', 'router'} sharded on mesh, step).
  """
  workdir, step = _resolve(path)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"no checkpoint at {path}: expected a workdir with checkpoints/ or a step directory")
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.manager.all_steps():
    raise UserError(f"no complete checkpoint at {path} (complete steps: {list(ckpt.manager.all_steps())})")
  config = ml_collections.ConfigDict(ckpt.config(step))
  model = Transformer(model_config(config))
  mesh = mesh if mesh is not None else sharding.make_mesh(data=-1)
  rules = rules if rules is not None else sharding.merge_rules([tuple(r) for r in config.mesh.rules])
  abstract = abstract_variables(model, (sharding.data_parallel_size(mesh, rules), 8), mesh, rules)
  variables = ckpt.restore(step, abstract, partial=True)
  ckpt.close()
  return config, model, variables, step
