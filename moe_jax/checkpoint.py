"""Checkpoints: one orbax CheckpointManager per workdir, and the guards that keep runs apart.

Layout: WORKDIR/config.json (the run's config, written once), WORKDIR/checkpoints/<step>/
with two items: `state` (step, params, opt_state, router, rng) and `config` (JSON).
orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every item is
committed, so a process killed mid-save leaves only a tmp directory, which the next run
ignores (and removes): the latest *complete* checkpoint is what resumes. A complete step
whose files were damaged afterwards (truncated, deleted) fails to restore: resume and eval
fall back to the newest intact step with one warning naming the damaged one, and training
moves it aside to `<step>.damaged` so that step can be saved again.

Restores go into abstract trees (jax.ShapeDtypeStruct with a sharding), so a checkpoint
written on one mesh restores onto another. Shapes are compared with the checkpoint's
metadata first, and an incompatible checkpoint is refused with the differing shapes named.

Integrity: every step carries a third item, `checksums` (moe_jax/checksum.py: a 64-bit digest
of every saved array, computed on device from the values being saved), written inside the
same atomic commit. Every restore recomputes the digests of what it read and compares; a
mismatch, or parameters holding NaN/inf, is damage like a truncated file (fallback, one
warning, `<step>.damaged`). Steps written before checksums existed restore with one warning.
A save refuses parameters that hold NaN/inf (NonFinite): such a step would rotate good ones out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any, Callable, Optional, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from moe_jax import checksum, orbax_noise, sharding
from moe_jax import variables as model_variables
from moe_jax.config import ModelConfig
from moe_jax.errors import UserError
from moe_jax.model import Transformer

# Config fields that may change when a run resumes (cadence, layout, hooks); the rest must match.
RESUMABLE = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "mesh", "checkpoint",
             "nan_policy", "peak_flops", "debug", "data.path", "model.moe_impl", "model.remat_policy",
             "model.capacity_factor", "model.ep_round_factor",
             # how the same products are computed (kernels), not what is computed
             "model.moe_gmm", "model.attention_impl", "model.fp8_kernel")
# Test hook: MOE_JAX_TEST_PAUSE_SAVE="STEP:MARKER" makes the save of STEP touch MARKER and then
# hang inside the commit (before the rename), so a test can kill -9 a process mid-save.
PAUSE_ENV = "MOE_JAX_TEST_PAUSE_SAVE"
# Entries of a workdir besides config.json that a run itself creates (anything else: not ours).
RUN_FILES = {"checkpoints", "metrics.jsonl", "expert_load.jsonl", "tb", "train.lock"}
# The state subtrees that must be finite to save or restore (the model's variables).
MODEL_ITEMS = ("params", "router")


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


# --- damaged checkpoints ------------------------------------------------------------------
T = TypeVar("T")


class Damaged(RuntimeError):
  """A complete checkpoint step whose files cannot be read back (truncated, deleted, corrupt)."""


class NonFinite(RuntimeError):
  """A save refused: the parameters hold NaN or inf (the message names the step and the arrays)."""


_warned_unverified = False


def check_max_to_keep(value) -> Optional[int]:
  """checkpoint.max_to_keep: None (keep every step) or an int >= 1; 0 or less would delete every step."""
  if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
    return value
  raise UserError(f"checkpoint.max_to_keep={value!r} must be >= 1 (or None: keep every step); "
                  "0 or less would delete every checkpoint, the newest included")


def damage_reason(e: BaseException) -> str:
  """A short cause: the array that could not be read and the storage layer's own words."""
  msg = str(e)
  array = re.findall(r"'path': '([^'/][^']*)/'", msg)  # TensorStore spec: the array's key
  cause = e.__cause__ or e.__context__
  first = (str(cause) if cause is not None and array else msg).strip().splitlines() or [type(e).__name__]
  text = first[0].split(" [source locations=")[0]
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"cannot read {array[-1]}: {text}" if array else text


class Checkpointer:
  """The workdir's CheckpointManager: async saves, max_to_keep, restore into sharded abstract trees,
  and the newest *intact* step for resume and eval (restore_intact)."""

  # A checkpoints/ removal still under way: how often a save restarts, and the steps are reread.
  _SAVE_ATTEMPTS = 3
  _REREADS, _REREAD_WAIT_S = 40, 0.25

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    max_to_keep = check_max_to_keep(max_to_keep)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save)  # read_only: never saves (orbax's own flag only adds warnings)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        # The PyTree handler reads the same format and can restore a subset (restore_for_eval).
        item_handlers={"state": ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler(),
                       "config": _ConfigHandler("config.json"),
                       "checksums": ocp.JsonCheckpointHandler("checksums.json")})
    self.read_only = read_only
    self._held = None  # an open descriptor of checkpoints/ (see _hold_directory)
    self._warned_removal = None  # the step whose save last warned that checkpoints/ was removed
    self._hold_directory()
    if not read_only:
      orbax_noise.silence_abandoned_writes()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, config: dict):
    """Starts an async save of `state` (a dict of arrays), its checksums and the config at `step`.

    NonFinite (nothing written) when the parameters hold NaN or inf. Every process calls it (the
    checksums are one jit over the global arrays). A checkpoints/ directory removed since the
    last save is recreated, with one warning.
    """
    if step in self.manager.all_steps():
      return
    sums, bad = checksum.summarize(state)
    bad = [p for p in bad if p.startswith(MODEL_ITEMS)]
    if bad:
      raise NonFinite(f"the parameters at step {step} hold NaN or inf ({', '.join(bad[:4])}"
                      f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}); not saving them, so no good "
                      f"checkpoint is rotated out (newest kept: step {self.latest_step()})")
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=_ConfigSave({"step": step, "config": config, "checksums": checksum.FORMAT}),
        checksums=ocp.args.JsonSave({"format": checksum.FORMAT, "arrays": sums}))
    failed = None
    for attempt in range(self._SAVE_ATTEMPTS):
      self._settle(step, failed)
      self._hold_directory()
      try:
        self.manager.save(step, args=args, force=True)
        return
      except Exception as e:  # noqa: BLE001  (a removal racing the save's own first writes: start it again)
        if attempt + 1 == self._SAVE_ATTEMPTS or not self._removed_under_save(e):
          raise
        failed = e

  def _settle(self, step: int, failed: Optional[BaseException] = None):
    """Waits for the save in flight. When someone removed checkpoints/ during the run (before or
    during that save, or during the start of this one: `failed`), says so in one warning and
    recreates it rather than fail inside orbax."""
    lost = ""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (re-raised unless the directory went away under the save)
      if not self._removed_under_save(e):
        raise
      lost = f"; the save in flight failed: {damage_reason(e)}"
    if failed is not None:
      lost = lost or f"; starting the save of step {step} failed: {damage_reason(failed)}"
    if not self._directory_replaced() and not lost:
      return
    if self._warned_removal != step:  # one warning per removal, however many tries its save takes
      self._warned_removal = step
      logging.warning("%s was removed during the run (the checkpoints in it are gone%s); recreating it to save "
                      "step %d", self.directory, lost, step)  # (or emptied: orbax may have recreated parts of it)
    self._recreate()

  def _recreate(self):
    """Recreates checkpoints/ and rereads which steps it holds. A removal can still be under way
    (`rm -rf` of many GB takes a while), so a step that vanishes while it is read is read again."""
    for attempt in range(self._REREADS):
      try:
        if jax.process_index() == 0:
          os.makedirs(self.directory, exist_ok=True)
          for name in os.listdir(self.directory):  # what the failed save left (orbax recreates parts of its path)
            if ".orbax-checkpoint-tmp" in name:
              shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self.manager.reload()
        return
      except FileNotFoundError:
        if attempt + 1 == self._REREADS:
          raise
        time.sleep(self._REREAD_WAIT_S)

  def _hold_directory(self):
    """Keeps checkpoints/ open: while we hold it its inode cannot be reused, so a directory removed
    and recreated (by hand, or by tensorstore writing the rest of a save into its old path) is
    told apart from the one the save in flight started in."""
    if self._held is not None:
      os.close(self._held)
    try:
      self._held = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
      self._held = None

  def _directory_replaced(self) -> bool:
    """Was checkpoints/ removed (and maybe recreated) since _hold_directory, or emptied of steps we
    saved? `rm -rf checkpoints` racing a save in flight can fail to remove the directory itself
    (the writer adds entries to it, so its final rmdir meets ENOTEMPTY): it keeps its inode but
    has lost the steps."""
    try:
      now = os.stat(self.directory)
    except FileNotFoundError:
      return True
    if self._steps_gone():
      return True
    if self._held is None:
      return False
    held = os.fstat(self._held)
    return held.st_nlink == 0 or (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino)

  def _steps_gone(self) -> list[int]:
    """Steps the manager lists (as of its last read) whose directories are no longer there."""
    return [s for s in self.manager.all_steps() if not os.path.isdir(os.path.join(self.directory, str(s)))]

  # How orbax and tensorstore say that files of the save in flight vanished under it.
  _VANISHED = ("NOT_FOUND", "No ArrayMetadata found", "missing .zarray", "Metadata file does not exist")

  def _removed_under_save(self, e: BaseException) -> bool:
    """Did a save fail because checkpoints/, or files of the save in it, were removed under it?
    (`rm -rf checkpoints` racing the writer often leaves the directory with half a save in it.)
    Anything else (a full disk, a permission) is re-raised: training must not go on unsaved."""
    if self._directory_replaced():
      return True
    seen = set()
    while e is not None and id(e) not in seen:
      seen.add(id(e))
      if isinstance(e, FileNotFoundError):  # the save writes only under checkpoints/ (and a removal racing
        return True                        # orbax's own rmtree of an old step names a bare file name)
      if self.directory in str(e) and any(sign in str(e) for sign in self._VANISHED):
        return True
      e = e.__cause__ or e.__context__
    return False

  def config(self, step: int) -> dict:
    return self._config_item(step)["config"]

  def _config_item(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=_ConfigRestore()))["config"]

  def verify(self, step: int, restored: dict):
    """Recomputes the digests of the arrays read back from `step` and compares them with the saved
    ones; Damaged on a mismatch or NaN/inf parameters. The checksums speak first: damaged bytes
    often decode to NaN, and "checksum mismatch" names the cause whatever values they decode to.
    Steps without checksums: one warning per process."""
    global _warned_unverified
    sums, bad = checksum.summarize(restored)
    bad = [p for p in bad if p.startswith(MODEL_ITEMS)]
    non_finite = f"non-finite parameters (NaN or inf in {', '.join(bad[:4])})"
    if not self._config_item(step).get("checksums"):  # written before checksums existed
      if bad:
        raise Damaged(non_finite)
      if not _warned_unverified:
        _warned_unverified = True
        logging.warning("checkpoint step %d in %s has no checksums (written before moe_jax verified checkpoints): "
                        "its values cannot be verified", step, self.directory)
      return
    saved = self.manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"]
    wrong = list(checksum.mismatches(saved["arrays"], sums))
    if wrong:
      raise Damaged(f"checksum mismatch in {len(wrong)} array(s): {', '.join(wrong[:3])}")
    if bad:  # saved that way (save refuses NaN parameters; a checkpoint from elsewhere may not)
      raise Damaged(non_finite)

  def saved_tree(self, step: int):
    """The saved state's tree of array metadata; Damaged when its metadata cannot be read."""
    if not os.path.isfile(os.path.join(self.directory, str(step), "state", "_METADATA")):
      raise Damaged("state/_METADATA is missing")  # (orbax would warn, then answer None)
    saved = self.manager.item_metadata(step)["state"]
    if saved is None:
      raise Damaged("state/_METADATA is missing or unreadable")
    return saved

  def restore(self, step: int, abstract_state: dict, partial: bool = False) -> dict:
    """Restores `state` into abstract_state (ShapeDtypeStructs with shardings); refuses other shapes
    (UserError) and raises Damaged when what was read fails verify (checksums, NaN/inf parameters)."""
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
    restored = self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    self.verify(step, restored)
    return restored

  def restore_intact(self, load: Callable[[int], T]) -> tuple[Optional[int], Optional[T]]:
    """(step, load(step)) for the newest step whose load succeeds; (None, None) without steps.

    A load that fails with anything but a UserError (a config that does not fit is the
    user's to fix, not damage) marks its step damaged: one warning names the damaged steps
    and the step used instead, and a writable Checkpointer moves them aside to
    `<step>.damaged` so training can save those steps again. Every step damaged: UserError.
    """
    damaged = []
    orbax_noise.silence_read_noise()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        result = load(step)
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001  (any failure to read a step back is damage)
        damaged.append((step, damage_reason(e)))
        continue
      if damaged:
        logging.warning("%s; using step %d instead%s", self._describe(damaged), step, self._set_aside(damaged))
      return step, result
    if damaged:
      raise UserError(f"no intact checkpoint in {self.directory}: {self._describe(damaged)}; delete the damaged "
                      "step directories (or the whole workdir) to start over")
    return None, None

  def _describe(self, damaged: list[tuple[int, str]]) -> str:
    return "; ".join(f"checkpoint step {s} in {self.directory} is damaged ({why})" for s, why in damaged)

  def _set_aside(self, damaged: list[tuple[int, str]]) -> str:
    """Renames damaged steps to <step>.damaged (kept for inspection); '' when read-only."""
    if self.read_only:
      return ""
    names = []
    if jax.process_index() == 0:
      for step, _ in damaged:
        base = dest = os.path.join(self.directory, f"{step}.damaged")
        n = 1
        while os.path.exists(dest):
          dest, n = f"{base}.{n}", n + 1
        os.rename(os.path.join(self.directory, str(step)), dest)
        names.append(os.path.basename(dest))
    self.manager.reload()
    return f" (moved aside: {', '.join(names)})" if names else ""

  def wait(self):
    """Waits for the save in flight; UserError (one line) when checkpoints/ was removed under it."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      if not self._removed_under_save(e):
        raise
      raise UserError(f"{self.directory} was removed while a checkpoint was being saved: that step is lost "
                      f"({damage_reason(e)}); checkpoints still there: {self.manager.all_steps() or 'none'}") from None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
      if self._held is not None:
        os.close(self._held)
        self._held = None


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
  """'field: workdir X != this run Y' for fields that differ and may not change on resume.

  A field the workdir's config lacks (written before moe_jax had it) counts as its default:
  new fields arrive with the default that keeps the old behavior, so such runs resume.
  """
  a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
  defaults = _default_config()
  a = {**{k: defaults[k] for k in b if k not in a and k in defaults}, **a}
  skip = lambda k: any(k == p or k.startswith(p + ".") for p in ignore)  # noqa: E731
  return [f"{k}: workdir {a.get(k, '<absent>')!r} != this run {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k, "<absent>") != b.get(k, "<absent>")]


def _default_config() -> dict:
  """Every training and model field with its default, flattened ('model.fp8_kernel': 'auto')."""
  from moe_jax.train import base_config  # train imports this module
  return _flat(json.loads(json.dumps(base_config(ModelConfig(), "").to_dict())))


def foreign_entries(workdir: str) -> list[str]:
  """The entries of workdir that no run creates (sorted; [] when it does not exist)."""
  if not os.path.isdir(workdir):
    return []
  return sorted(n for n in os.listdir(workdir) if n not in RUN_FILES and n != "config.json"
                and not n.startswith(("metrics.jsonl.", "expert_load.jsonl.")))  # .damaged-<n>, .tmp


def check_workdir(workdir: str, config: dict, abstract_state: dict):
  """Refuses a workdir that holds another run; writes WORKDIR/config.json for a new one.

  Another run = a config.json whose non-resumable fields differ (the message lists them and,
  when a checkpoint exists, the parameter shapes that differ), or a non-empty directory
  that is not a moe_jax workdir at all.
  """
  cfg_path = os.path.join(workdir, "config.json")
  if os.path.isfile(cfg_path):
    try:
      with open(cfg_path) as f:
        old = json.load(f)
    except json.JSONDecodeError as e:  # not ours to repair: the run's identity lives in it
      raise UserError(f"{cfg_path}: not valid JSON ({e}); a copy of the run's config is the 'config' field of "
                      "checkpoints/<step>/config/config.json; or pick another --workdir") from None
    diff = config_diff(old, config)
    if diff:
      msg = f"workdir {workdir} holds a run of another config ({'; '.join(diff[:10])})"
      step = latest_step(workdir)
      if step is not None:
        try:
          shapes = shape_mismatches(Checkpointer(workdir, read_only=True).saved_tree(step), abstract_state)
        except Damaged:  # the config difference alone is the message
          shapes = []
        if shapes:
          msg += f"; its checkpoint {step} has other shapes: {'; '.join(shapes[:6])}"
      raise UserError(msg + "; use another --workdir, or delete this one to start over")
    return
  foreign = foreign_entries(workdir)
  if foreign or latest_step(workdir) is not None:
    raise UserError(f"workdir {workdir} is not empty ({', '.join(foreign[:5]) or 'checkpoints'}) and holds no "
                    "moe_jax config.json; refusing to overwrite it: pick a new --workdir")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(cfg_path, "w") as f:
      json.dump(config, f, indent=1, sort_keys=True)


# --- model helpers shared with training and evaluation ------------------------------------
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
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()  # no manager left running into interpreter shutdown


def restore_for_eval(path: str, mesh=None, rules=None):
  """Restores a trained model for evaluation without its optimizer state.

  path: a workdir (its newest intact step: a damaged newer one is named in a warning and
  skipped), its checkpoints/ directory, or one step directory (damaged: UserError).
  mesh: target mesh (default: every device on 'data'); rules: default the config's.
  Returns (config ConfigDict, Transformer, variables {'params', 'router'} sharded on mesh, step);
  `model.apply(variables, tokens)` works as is, under jit or eagerly.
  """
  workdir, step = _resolve(path)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"no checkpoint at {path}: expected a workdir with checkpoints/ or a step directory")
  mesh = mesh if mesh is not None else sharding.make_mesh(data=-1)
  ckpt = Checkpointer(workdir, read_only=True)

  def load(step: int):
    config = ml_collections.ConfigDict(ckpt.config(step))
    model = Transformer(model_config(config))
    r = rules if rules is not None else sharding.mesh_rules(mesh, config.mesh.rules)
    abstract = model_variables.abstract_sharded(model, (sharding.data_parallel_size(mesh, r), 8), mesh, r)
    return config, model, ckpt.restore(step, abstract, partial=True)

  try:
    steps = sorted(ckpt.manager.all_steps())
    if step is None:
      step, loaded = ckpt.restore_intact(load)
      if step is None:
        raise UserError(f"no complete checkpoint at {path} (no finished step in {ckpt.directory})")
    elif step not in steps:
      raise UserError(f"no complete checkpoint at {path} (complete steps: {steps})")
    else:
      orbax_noise.silence_read_noise()
      try:
        loaded = load(step)
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001  (any failure to read the step back is damage)
        raise UserError(f"checkpoint {path} is damaged ({damage_reason(e)}); --workdir={workdir} evaluates the "
                        "newest intact step instead") from None
  finally:
    ckpt.close()
  config, model, variables = loaded
  return config, model, variables, step
