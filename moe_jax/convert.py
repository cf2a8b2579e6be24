"""Hugging Face DeepSeek-V2/V3 directory <-> orbax checkpoint of {'params', 'router'}.

  python -m moe_jax.convert --hf HF_DIR --out CKPT_DIR [--dtype bfloat16] [--scan_layers]
  python -m moe_jax.convert --from_ckpt CKPT_DIR --to_hf HF_DIR [--dtype bfloat16]

CKPT_DIR holds model_config.json (ModelConfig.to_dict()) and variables/ (orbax
StandardCheckpointer). Output directories must be new or empty. Bad input prints one line
`error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from moe_jax.errors import UserError

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def _existing_dir(path: str | Path, what: str) -> Path:
  p = Path(path)
  if not p.is_dir():
    raise UserError(f"{what} {p} does not exist or is not a directory")
  return p.resolve()


def _empty_output(path: str | Path) -> Path:
  p = Path(path)
  if p.exists() and (not p.is_dir() or any(p.iterdir())):
    raise UserError(f"output {p} exists and is not empty; refusing to overwrite it")
  return p.resolve()


def hf_to_ckpt(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32", **config_overrides) -> Path:
  """Loads a Hugging Face directory (moe_jax.hf.load_pretrained) and writes an orbax checkpoint."""
  import orbax.checkpoint as ocp

  from moe_jax import hf
  src, out = _existing_dir(hf_dir, "Hugging Face directory"), _empty_output(out_dir)
  model, variables = hf.load_pretrained(src, dtype=dtype, **config_overrides)
  out.mkdir(parents=True, exist_ok=True)
  (out / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / VARIABLES_DIR, variables)
  return out


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
  model = Transformer(ModelConfig.from_dict(json.loads((src / CONFIG_FILE).read_text())))
  abstract = traverse_util.unflatten_dict(hf.abstract_variables(model))
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(src / VARIABLES_DIR, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                                                 abstract))
  return model, variables


def ckpt_to_hf(ckpt_dir: str | Path, hf_dir: str | Path, dtype: Optional[str] = None) -> Path:
  """Restores an hf_to_ckpt checkpoint and writes a Hugging Face directory (moe_jax.hf.save_pretrained)."""
  from moe_jax import hf
  out = _empty_output(hf_dir)
  model, variables = restore(ckpt_dir)
  hf.save_pretrained(model, variables, out, dtype=dtype)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--hf", help="Hugging Face DeepSeek-V2/V3 directory to convert")
  parser.add_argument("--out", help="new orbax checkpoint directory (with --hf)")
  parser.add_argument("--from_ckpt", help="orbax checkpoint directory written by --hf/--out")
  parser.add_argument("--to_hf", help="new Hugging Face directory (with --from_ckpt)")
  parser.add_argument("--dtype", default=None, help="parameter dtype: float32 (default on load) or bfloat16")
  parser.add_argument("--scan_layers", action="store_true", help="store layers stacked (nn.scan layout)")
  args = parser.parse_args(argv)
  given = [a for a in (args.hf, args.out, args.from_ckpt, args.to_hf) if a]
  if len(given) != 2 or not (args.hf and args.out or args.from_ckpt and args.to_hf):
    parser.error("give either --hf DIR --out CKPT_DIR or --from_ckpt CKPT_DIR --to_hf DIR")
  try:
    if args.hf:
      out = hf_to_ckpt(args.hf, args.out, dtype=args.dtype or "float32", scan_layers=args.scan_layers)
    else:
      out = ckpt_to_hf(args.from_ckpt, args.to_hf, dtype=args.dtype)
  except (ValueError, OSError) as e:  # UserError, a bad checkpoint or config, an unreadable file
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
