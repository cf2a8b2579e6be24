"""Hugging Face DeepSeek-V2/V3 directory <-> orbax checkpoints (ours, and train.py's).

  python -m moe_jax.convert --hf HF_DIR --out CKPT_DIR [--dtype bfloat16] [--scan_layers]
  python -m moe_jax.convert --from_ckpt SRC --to_hf HF_DIR [--dtype bfloat16] [--tokenizer PATH] [--no_mtp]

SRC is a CKPT_DIR written by --hf/--out (model_config.json + variables/, an orbax
StandardCheckpointer), or a train.py run: its workdir (latest complete step), its
checkpoints/ directory or one step directory (WORKDIR/checkpoints/STEP). A run trained with
a tokenizer.json (config data.tokenizer) exports it beside the weights, with a
tokenizer_config.json, so transformers' AutoTokenizer and `eval.py --hf=HF_DIR` use the
tokenizer the model was trained with; --tokenizer names it when the path in the run's
config does not resolve from here. A byte-level run gets a tokenizer.json with the same ids
(UTF-8 bytes, EOS 256) for transformers, marked so that eval.py keeps reading it byte-level.

Output directories must be new or empty; they are written into a temporary directory
beside them and renamed when complete, with the usual file modes (umask). Bad input prints
one line `error: ...` and exits with status 2; Ctrl-C exits 130 and SIGTERM 143, the temporary
directory removed (one a kill -9 left is removed by the next convert to the same output).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from moe_jax import errors, interrupts
from moe_jax.errors import UserError

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def _existing_dir(path: str | Path, what: str) -> Path:
  p = Path(path)
  if not p.is_dir():
    raise UserError(f"{what} {p} does not exist or is not a directory")
  return p.resolve()


def _empty_output(path: str | Path, flag: str = "output") -> Path:
  p = Path(errors.output_dir(str(path), flag))
  if p.exists() and any(p.iterdir()):
    raise UserError(f"{flag} {p} exists and is not empty; refusing to overwrite it: pick a new directory")
  return p


class _Staging:
  """A temporary directory beside `out`, renamed onto it when the block completes without error;
  removed on an error, a Ctrl-C or SIGTERM (interrupts.run_command), or, after a kill -9, by the
  next convert to the same output (interrupts.make_staging)."""

  def __init__(self, out: Path):
    self.out = out

  def __enter__(self) -> Path:
    self.tmp = Path(interrupts.make_staging(str(self.out), "convert"))
    return self.tmp

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
      if self.out.exists():
        self.out.rmdir()  # empty (checked before the work started)
      os.replace(self.tmp, self.out)
    else:
      shutil.rmtree(self.tmp, ignore_errors=True)
    interrupts.staging_done(str(self.tmp))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def hf_to_ckpt(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32", **config_overrides) -> Path:
  """Loads a Hugging Face directory (moe_jax.hf.load_pretrained) and writes an orbax checkpoint."""
  from flax import linen as nn

  from moe_jax import hf, sharding
  from moe_jax import variables as model_variables
  src, out = _existing_dir(hf_dir, "Hugging Face directory"), _empty_output(out_dir, "--out")
  # Every device on 'fsdp': each process reads only its devices' part of every tensor, and no
  # device needs a whole one. A width that the device count does not divide: replicated.
  boxed = model_variables.abstract(hf.pretrained_config(src, dtype=dtype, **config_overrides))
  mesh = sharding.make_mesh(1, -1)
  try:
    sharding.check_divisible(boxed, sharding.DEFAULT_RULES, dict(mesh.shape))
  except ValueError:
    mesh = sharding.make_mesh(-1)
  shardings = nn.unbox(sharding.named_shardings(boxed, mesh, sharding.DEFAULT_RULES))
  model, variables = hf.load_pretrained(src, dtype=dtype, shardings=shardings, **config_overrides)
  with _Staging(out) as tmp:
    write_checkpoint(tmp, model.cfg, variables)
  return out


CHECKSUMS_FILE = "checksums.json"  # moe_jax.checksum digests of the variables, verified by restore()


def write_checkpoint(directory: Path, cfg, variables):
  """CONFIG_FILE, VARIABLES_DIR/ and CHECKSUMS_FILE into `directory` (a staging directory: the
  rename that publishes it commits all three at once)."""
  import orbax.checkpoint as ocp

  from moe_jax import checksum
  sums, _ = checksum.summarize(variables)
  (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / VARIABLES_DIR, variables)
  (directory / CHECKSUMS_FILE).write_text(json.dumps({"format": checksum.FORMAT, "arrays": sums}))


def _is_convert_checkpoint(path: Path) -> bool:
  return (path / CONFIG_FILE).exists() or (path / VARIABLES_DIR).is_dir()


def restore(ckpt_dir: str | Path) -> tuple[Any, dict[str, Any]]:
  """An orbax checkpoint written by hf_to_ckpt -> (Transformer, {'params', 'router'})."""
  import jax
  import orbax.checkpoint as ocp
  from flax import traverse_util

  from moe_jax import hf
  from moe_jax.config import ModelConfig
  from moe_jax.model import Transformer
  src = _existing_dir(ckpt_dir, "checkpoint")
  if not (src / CONFIG_FILE).exists() or not (src / VARIABLES_DIR).is_dir():
    raise UserError(f"{src} is not a moe_jax.convert checkpoint (needs {CONFIG_FILE} and {VARIABLES_DIR}/)")
  try:
    cfg = ModelConfig.from_dict(hf.read_json(src / CONFIG_FILE))
  except (TypeError, ValueError) as e:
    raise UserError(f"{src / CONFIG_FILE}: {errors.one_line(e)}") from None
  model = Transformer(cfg)
  abstract = traverse_util.unflatten_dict(hf.abstract_variables(model))
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(src / VARIABLES_DIR, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                                                 abstract))
  verify(src, variables)
  return model, variables


def verify(src: Path, variables):
  """UserError when the variables read back differ from the checksums saved with them, or hold NaN/inf."""
  from moe_jax import checksum, hf
  sums, bad = checksum.summarize(variables)
  if bad:
    raise UserError(f"checkpoint {src} is damaged: non-finite parameters (NaN or inf in {', '.join(bad[:4])})")
  if not (src / CHECKSUMS_FILE).is_file():  # written before checksums existed
    print(f"warning: {src} has no {CHECKSUMS_FILE} (written before moe_jax verified checkpoints): its values cannot "
          "be verified", file=sys.stderr)
    return
  wrong = list(checksum.mismatches(hf.read_json(src / CHECKSUMS_FILE)["arrays"], sums))
  if wrong:
    raise UserError(f"checkpoint {src} is damaged: checksum mismatch in {len(wrong)} array(s): {', '.join(wrong[:3])}")


def run_tokenizer(path: str | Path) -> str:
  """The tokenizer a train.py run was trained with ('byte' or a tokenizer.json path), from
  WORKDIR/config.json (data.tokenizer may not change when a run resumes)."""
  from moe_jax import checkpoint
  workdir, _ = checkpoint._resolve(str(path))
  cfg_path = Path(workdir) / "config.json"
  if not cfg_path.is_file():
    raise UserError(f"{path} is neither a moe_jax.convert checkpoint ({CONFIG_FILE}) nor a train.py run "
                    f"({cfg_path} is missing)")
  from moe_jax import hf
  return (hf.read_json(cfg_path).get("data") or {}).get("tokenizer") or "byte"


def _tokenizer_for_export(run_tok: Optional[str], override: Optional[str]):
  """-> the tokenizer to export (ByteTokenizer, HFTokenizer) or None when unknown (a --hf/--out
  checkpoint without --tokenizer); checked before any weight is read."""
  from moe_jax import data
  spec = override or run_tok
  if spec is None:
    return None
  if not override and spec != "byte" and not os.path.exists(spec):
    raise UserError(f"the run's tokenizer {spec!r} (config data.tokenizer, a path relative to where train.py ran) "
                    f"is not found from {os.getcwd()}; pass --tokenizer=PATH to that tokenizer.json")
  return data.load_tokenizer(spec)


def tokenizer_config(tok, cfg) -> dict[str, Any]:
  """tokenizer_config.json for transformers' AutoTokenizer: the fast tokenizer over tokenizer.json,
  adding no special tokens (moe_jax.data encodes without them; EOS ends each training document)."""
  from moe_jax import data
  out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings,
         "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
  if tok.eos_token is not None:
    out["eos_token"] = tok.eos_token
  if isinstance(tok, data.ByteTokenizer):
    out[data.BYTE_MARK] = "byte"  # eval.py --hf reads this directory byte-level, as it was trained
  return out


def _write_tokenizer(tok, cfg, directory: Path):
  from moe_jax import data
  if isinstance(tok, data.ByteTokenizer):
    try:
      tok.save_hf(str(directory / "tokenizer.json"))
    except ImportError:
      print("note: the `tokenizers` package is missing: no tokenizer.json written (the run is byte-level)",
            file=sys.stderr)
      return
  else:
    shutil.copyfile(tok.name, directory / "tokenizer.json")
  (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, cfg), indent=2))
  if tok.eos_id is not None:  # generation stops where training documents ended
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = tok.eos_id
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def ckpt_to_hf(ckpt_dir: str | Path, hf_dir: str | Path, dtype: Optional[str] = None,
               tokenizer: Optional[str] = None, mtp: bool = True) -> Path:
  """A convert checkpoint or a train.py run/step -> a Hugging Face directory (+ its tokenizer).

  mtp=False leaves the MTP layer out (transformers does not run it; see the README).
  Returns the output directory.
  """
  from moe_jax import hf
  out = _empty_output(hf_dir, "--to_hf")
  src = Path(ckpt_dir)
  if not src.exists():
    raise UserError(f"--from_ckpt {src}: no such directory")
  if _is_convert_checkpoint(src):
    tok = _tokenizer_for_export(None, tokenizer)
    model, variables = restore(src)
  else:
    from moe_jax import checkpoint
    run_tok = run_tokenizer(src)
    tok = _tokenizer_for_export(run_tok, tokenizer)  # a missing tokenizer fails before the restore
    config, model, variables, step = checkpoint.restore_for_eval(str(src))
    print(f"restored step {step} of {checkpoint._resolve(str(src))[0]}", file=sys.stderr)
  cfg = model.cfg
  if tok is not None and tok.vocab_size > cfg.vocab_size:
    raise UserError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
  if not mtp:
    cfg = cfg.replace(num_nextn_predict_layers=0)
  with _Staging(out) as tmp:
    hf.save_pretrained(cfg, variables, tmp, dtype=dtype)
    if tok is not None:
      _write_tokenizer(tok, cfg, tmp)
  return out


@errors.main_guard
def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = errors.ArgumentParser(prog="python -m moe_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--hf", help="Hugging Face DeepSeek-V2/V3 directory to convert")
  parser.add_argument("--out", help="new orbax checkpoint directory (with --hf)")
  parser.add_argument("--from_ckpt", help="a --hf/--out checkpoint, or a train.py workdir / checkpoints / step dir")
  parser.add_argument("--to_hf", help="new Hugging Face directory (with --from_ckpt)")
  parser.add_argument("--dtype", default=None, help="parameter dtype: float32 (default on load) or bfloat16")
  parser.add_argument("--scan_layers", action="store_true", help="store layers stacked (nn.scan layout)")
  parser.add_argument("--tokenizer", help="tokenizer.json to export with --to_hf (default: the run's)")
  parser.add_argument("--no_mtp", action="store_true", help="--to_hf without the MTP layer")
  args = parser.parse_args(argv)
  given = [a for a in (args.hf, args.out, args.from_ckpt, args.to_hf) if a]
  if len(given) != 2 or not (args.hf and args.out or args.from_ckpt and args.to_hf):
    parser.error("give either --hf DIR --out CKPT_DIR or --from_ckpt CKPT_DIR --to_hf DIR")
  if args.hf and (args.tokenizer or args.no_mtp):
    parser.error("--tokenizer and --no_mtp go with --from_ckpt/--to_hf")
  if args.dtype is not None and args.dtype not in ("float32", "bfloat16", "float16"):
    parser.error(f"--dtype={args.dtype}: give float32, bfloat16 or float16")
  # Ctrl-C / SIGTERM: exit 130 / 143 at once, the staging directory removed (interrupts.run_command)
  if args.hf:
    out = interrupts.run_command(hf_to_ckpt, args.hf, args.out, dtype=args.dtype or "float32",
                                 scan_layers=args.scan_layers)
  else:
    out = interrupts.run_command(ckpt_to_hf, args.from_ckpt, args.to_hf, dtype=args.dtype, tokenizer=args.tokenizer,
                                 mtp=not args.no_mtp)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
