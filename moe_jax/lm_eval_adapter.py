"""lm-evaluation-harness model `moe_jax` (needs the `eval` extra: pip install -e '.[eval]').

  python eval.py --workdir=W --lm_eval_tasks=hellaswag,arc_easy [--lm_eval_include=DIR]

or from Python, after `import moe_jax.lm_eval_adapter` (which registers the name):
  lm_eval.simple_evaluate(model="moe_jax", model_args="workdir=W,batch_size=16", tasks=[...])

Requests go through moe_jax.scoring.Scorer (batched, bucketed, jitted; the training mesh
when eval.py gives one). generate_until decodes speculatively when the Scorer has speculative=K
(eval.py --speculative=K, or model_args "...,speculative=K"): the MTP module drafts K tokens per
step, the model verifies them (greedy: the same text), and the Scorer's gen_log keeps the
acceptance per draft position (eval.py reports it). Tasks need their data locally: set HF_DATASETS_OFFLINE=1 and
point `--lm_eval_include` at a directory of task YAMLs whose `dataset_path: json` reads
local files (see tests/test_evaluate.py for one).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra is missing: one clear line from eval.py
  from moe_jax.errors import UserError
  raise UserError("--lm_eval_tasks needs lm-evaluation-harness: pip install -e '.[eval]'") from e

from moe_jax import loading, scoring
from moe_jax.data import load_tokenizer


@register_model("moe_jax")
class MoeJaxLM(LM):
  """loglikelihood, loglikelihood_rolling and generate_until over a moe_jax model.

  Either pass a ready `scorer` and `tok` (eval.py does), or a source as in
  loading.load_model (workdir=, checkpoint=, hf=, preset=) plus tokenizer, batch_size, max_length
  and speculative (K draft tokens for generate_until; 0 = off).
  """

  def __init__(self, scorer: Optional[scoring.Scorer] = None, tok=None, *, workdir=None, checkpoint=None, hf=None,
               preset=None, tokenizer: str = "byte", batch_size: int = 8, max_length: Optional[int] = None,
               max_gen_toks: int = 256, seed: int = 0, speculative: int = 0, **_ignored):
    super().__init__()
    if scorer is None:
      tok = load_tokenizer(tokenizer)
      model, variables, _ = loading.load_model(workdir=workdir, checkpoint=checkpoint, hf=hf, preset=preset,
                                                vocab_size=tok.vocab_size if preset else None)
      # lm-eval passes its own --batch_size (possibly "auto") along: any non-number keeps the default.
      batch_size = int(batch_size) if str(batch_size).isdigit() else 8
      scorer = scoring.Scorer(model, variables, batch_size=batch_size, max_len=int(max_length) if max_length else None,
                              speculative=int(speculative))
    self.scorer, self.tok = scorer, tok or load_tokenizer("byte")
    self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

  @property
  def prefix_token_id(self) -> int:
    if self.tok.eos_id is None:
      raise ValueError("this tokenizer has no EOS token to condition an empty context on")
    return self.tok.eos_id

  def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
    """Left-truncates so context + continuation fit the window (+1: the last token is not an input)."""
    keep = self.scorer.max_len + 1
    cont = cont[-keep + 1:] if len(cont) >= keep else cont
    return ctx[-(keep - len(cont)):], cont

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = []
    for req in requests:
      context, continuation = req.args
      ctx, cont = scoring.split_context(self.tok, context, continuation)
      pairs.append(self._fit(ctx or [self.prefix_token_id], cont))
    return self.scorer.loglikelihood(pairs, desc="lm-eval loglikelihood")

  def loglikelihood_rolling(self, requests) -> list[float]:
    pairs, owner = [], []
    for i, req in enumerate(requests):
      tokens = self.tok.encode(req.args[0])
      for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                              max_seq_len=self.scorer.max_len, context_len=1):
        pairs.append(make_disjoint_window(window))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self.scorer.loglikelihood(pairs, desc="lm-eval rolling")):
      totals[i] += ll
    return totals

  def generate_until(self, requests) -> list[str]:
    out: list[Any] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    settings = []
    for i, req in enumerate(requests):
      context, kwargs = req.args
      kwargs = dict(kwargs or {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
      key = (tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks)),
             float(kwargs.get("temperature", 1.0)) if sample else 0.0,
             int(kwargs.get("top_k") or 0) if sample else 0, float(kwargs.get("top_p") or 1.0) if sample else 1.0)
      settings.append(key)
      groups.setdefault(key, []).append(i)
    for (until, max_new, temperature, top_k, top_p), idx in groups.items():
      max_new = min(max_new, self.scorer.max_len - 1)
      room = self.scorer.max_len - max_new
      prompts = [(self.tok.encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in idx]
      stop_ids = {self.tok.eos_id} - {None}
      stop_ids |= {ids[0] for ids in map(self.tok.encode, until) if len(ids) == 1}
      new = self.scorer.generate(prompts, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                 stop_tokens=sorted(stop_ids), seed=self.seed, desc="lm-eval generate")
      for i, ids in zip(idx, new):
        text = self.tok.decode([t for t in ids if t != self.tok.eos_id])
        for s in until:
          text = text.split(s)[0]
        out[i] = text
    return out


def evaluate_tasks(scorer: scoring.Scorer, tok, tasks: Sequence[str], *, include_path: Optional[str] = None,
                   limit: Optional[int] = None, max_new_tokens: int = 256) -> list[dict[str, Any]]:
  """Runs harness tasks through MoeJaxLM -> report rows (task, metric, value, n, stderr)."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  from moe_jax.errors import UserError
  if include_path and not os.path.isdir(include_path):
    raise UserError(f"--lm_eval_include={include_path}: no such directory")
  manager = None
  if include_path:  # indexing the ~10k built-in tasks takes seconds: skip it when the local ones suffice
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if not all(t in manager.all_tasks for t in tasks):
      manager = None
  manager = manager or TaskManager(include_path=include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise UserError(f"unknown lm-eval task(s) {unknown}; add a directory of task YAMLs with --lm_eval_include")
  lm = MoeJaxLM(scorer, tok, max_gen_toks=max_new_tokens)
  results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                    log_samples=False, bootstrap_iters=1000)
  rows = []
  for task, metrics in results["results"].items():
    n = results.get("n-samples", {}).get(task, {}).get("effective")
    for key, value in metrics.items():
      metric, _, filter_name = key.partition(",")
      numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
      if metric.endswith("_stderr") or metric == "sample_len" or not numeric:
        continue
      stderr = metrics.get(f"{metric}_stderr,{filter_name}")
      rows.append(dict(task=f"lm_eval:{task}", metric=metric, value=float(value), n=n,
                       stderr=stderr if isinstance(stderr, (int, float)) else None))
  return rows
