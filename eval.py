"""Scores a checkpoint: python eval.py --workdir=W --tasks=lm:FILE,mc:FILE.jsonl,gen:FILE.jsonl.

Model (exactly one): --workdir (a train.py run, latest step), --checkpoint (a step
directory), --hf (a Hugging Face DeepSeek-V2/V3 directory) or --preset (random init).
Task syntax and metrics: moe_jax/evaluate.py. --lm_eval_tasks runs lm-evaluation-harness
tasks through the `moe_jax` adapter (pip install -e '.[eval]').
"""

import argparse
import codecs
import os
import signal
import sys


def _stopped_early(signum, frame):
  """Ctrl-C / SIGTERM before the evaluation starts (imports: moe_jax imports jax): exit at once.
  Python's default handler raises KeyboardInterrupt, which an import or jax's GC callback swallows."""
  del frame
  print("error: interrupted" if signum == signal.SIGINT else "error: terminated", file=sys.stderr, flush=True)
  os._exit(128 + signum)


if __name__ == "__main__":  # before the imports below
  for _s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_s, _stopped_early)
  from moe_jax import tpu_flags  # stdlib only; before jax starts the TPU backend
  tpu_flags.apply()  # weight gathers overlap compute (no effect off TPU)

from moe_jax import errors, interrupts  # noqa: E402
from moe_jax.errors import UserError  # noqa: E402


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="train.py workdir: its latest complete checkpoint")
  src.add_argument("--checkpoint", help="one checkpoint step directory (WORKDIR/checkpoints/STEP)")
  src.add_argument("--hf", help="Hugging Face DeepSeek-V2/V3 directory (config.json + safetensors)")
  src.add_argument("--preset", help="random untrained model of a moe_jax.config preset (chance level)")
  p.add_argument("--tasks", default="", help="KIND:PATH,...  with KIND lm | mc | gen")
  p.add_argument("--lm_eval_tasks", default="", help="lm-evaluation-harness task names, comma-separated")
  p.add_argument("--lm_eval_include", help="directory of extra lm-eval task YAMLs (local data)")
  p.add_argument("--lm_eval_limit", type=int, help="at most this many examples per lm-eval task")
  p.add_argument("--tokenizer", help="'byte' or PATH/tokenizer.json (default: the run's, the --hf dir's, byte)")
  p.add_argument("--output", help="write the JSON report here")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_len", type=int, help="context window in tokens (default: a train.py run's seq_len; "
                 "otherwise min(max_position_embeddings, 4096)); the report says which it used")
  p.add_argument("--mesh", help="data,fsdp,expert,tensor (default: the run's mesh, else all devices on data)")
  p.add_argument("--dtype", help="compute dtype for --hf / --preset (float32, bfloat16)")
  p.add_argument("--weights", default="auto", help="--hf only: fp8 keeps an FP8 checkpoint's e4m3 blocks and "
                 "128x128 scales and computes in FP8 (half bf16's memory); dense dequantizes to --dtype "
                 "(transformers' numbers); auto (default) keeps what the directory stores")
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--stop", action="append", help="stop sequence for gen tasks, repeatable, escapes "
                 "like \\n allowed (default: \\n)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--speculative", type=int, default=0, metavar="K",
                 help="generation drafts K tokens per step with the model's MTP module and verifies them in one "
                 "call (greedy: the same tokens); the report gives the acceptance rate per draft position")
  p.add_argument("--speculative_compare", action="store_true",
                 help="with --speculative: run every generation (gen tasks, lm-eval generate_until) again "
                 "without drafts and report both tokens/s")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--show_samples", type=int, default=0, metavar="N",
                 help="print the first N generations of each gen task (prompt, output, answer); also in --output")
  p.error = lambda msg: (print(f"error: {msg}", file=sys.stderr), sys.exit(2))
  args = p.parse_args(argv)
  if not (args.tasks or args.lm_eval_tasks):
    p.error("nothing to evaluate: give --tasks=KIND:PATH,... and/or --lm_eval_tasks=NAME,...")
  if args.weights not in ("auto", "fp8", "dense"):
    p.error(f"--weights={args.weights!r} is not one of auto, fp8, dense")
  if args.weights != "auto" and not args.hf:
    p.error(f"--weights={args.weights} applies to --hf only (a run's checkpoint is evaluated in its own dtype)")
  if args.speculative_compare and not args.speculative:
    p.error("--speculative_compare needs --speculative=K (K >= 1 draft tokens)")
  for name, ok, want in (("batch_size", args.batch_size > 0, "> 0"), ("max_len", (args.max_len or 1) > 0, "> 0"),
                         ("lm_eval_limit", (args.lm_eval_limit or 1) > 0, "> 0"),
                         ("max_new_tokens", args.max_new_tokens >= 0, ">= 0"),
                         ("show_samples", args.show_samples >= 0, ">= 0"),
                         ("speculative", args.speculative >= 0, ">= 0 (0: off)"),
                         ("temperature", args.temperature >= 0, ">= 0"), ("top_k", args.top_k >= 0, ">= 0"),
                         ("top_p", 0 < args.top_p <= 1, "in (0, 1]")):
    if not ok:
      p.error(f"--{name}={getattr(args, name)}: must be {want}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    mesh = [int(x) for x in args.mesh.split(",")] if args.mesh else None
  except ValueError:
    mesh = []
  if mesh is not None and len(mesh) != 4:
    return errors.report(f"--mesh={args.mesh}: expected four integers data,fsdp,expert,tensor")
  try:
    stop = [codecs.decode(s, "unicode_escape") for s in args.stop] if args.stop else ("\n",)
  except UnicodeDecodeError as e:
    return errors.report(f"--stop: {e.reason} in {e.object!r}; escapes like \\n and \\t are allowed")
  try:  # in a helper thread: Ctrl-C / SIGTERM exit 130 / 143 at once, during a compile too
    interrupts.run_command(_evaluate, args, mesh, stop)
  except UserError as e:
    return errors.report(str(e))
  except Exception as e:  # noqa: BLE001 - a file named, or a resource that ran out: one line; else a bug
    msg = errors.resource_error(e, errors.EVAL_MEMORY_HINT)
    if msg is None and isinstance(e, OSError) and e.filename is not None:
      msg = errors.os_error_message(e)
    if msg is None:
      raise
    return errors.report(msg)
  return 0


def _evaluate(args, mesh, stop):
  """Loads the model and scores the tasks (run by interrupts.run_command in a helper thread)."""
  from moe_jax import data, evaluate  # after flag parsing: importing jax takes a while
  if args.output:  # a path that cannot be written fails now, not after the evaluation
    errors.output_file(args.output, "--output")
  evaluate.check_tasks(args.tasks, stop)  # bad task files fail before a model is loaded
  if args.lm_eval_tasks:
    import moe_jax.lm_eval_adapter  # noqa: F401  (a missing optional extra fails here, early)
  tok = data.load_tokenizer(args.tokenizer or "byte")  # a bad --tokenizer fails before the model loads
  model, variables, info = evaluate.load_model(workdir=args.workdir, checkpoint=args.checkpoint, hf=args.hf,
                                               preset=args.preset, vocab_size=tok.vocab_size if args.preset
                                               else None, dtype=args.dtype,
                                               seed=args.seed, mesh_shape=mesh, weights=args.weights)
  max_len, max_len_from = args.max_len, None
  if not max_len and info.get("seq_len"):  # a train.py run: score at the context it trained at
    max_len, max_len_from = int(info["seq_len"]), "the run's seq_len"
  evaluate.run(model, variables, model_name=info["name"], step=info["step"], tasks=args.tasks,
               lm_eval_tasks=args.lm_eval_tasks, lm_eval_include=args.lm_eval_include,
               lm_eval_limit=args.lm_eval_limit, tokenizer=args.tokenizer or info["tokenizer"],
               output=args.output, batch_size=args.batch_size, max_len=max_len, mesh=info["mesh"],
               rules=info["rules"], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, seed=args.seed, progress=not args.no_progress, stop=stop,
               show_samples=args.show_samples, max_len_from=max_len_from, speculative=args.speculative,
               speculative_compare=args.speculative_compare)


if __name__ == "__main__":
  sys.exit(main())
