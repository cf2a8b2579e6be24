"""Scoring checkpoints: language modelling, multiple choice, generation, lm-evaluation-harness.

Tasks are given as KIND:PATH, comma-separated (`lm:val.txt,mc:arc.jsonl,gen:qa.jsonl`):
  lm   a text file (tokenized as one stream), or a token directory written by
       `python -m moe_jax.data prepare` (its val split; DIR/train.bin picks a split)
       -> loss (nats/token), perplexity, bits_per_byte (decoded UTF-8 bytes). The stream
       is cut into windows of max_len + 1 tokens that overlap by one, so every token but
       the first is predicted once, with the context since its window's start. A MoE model
       also gets maxvio (MaxVio_global: each layer's expert counts summed over the whole
       text, (max - mean) / mean, averaged over layers) and maxvio/<layer>; with --output,
       an expert-load heat map (layers x experts) is written beside the JSON report.
       A directory prepared with --format=chat|prompt_completion scores only the tokens its
       loss mask marks (the masked loss training reports); prepare chat JSONL first (a
       .jsonl given to lm is read as plain text).
  mc   JSONL {"context": str, "choices": [str, ...], "gold": int | str} -> acc (argmax of
       summed log p(choice | context)) and acc_norm (the same divided by the choice's length
       in characters), as lm-evaluation-harness computes them.
  gen  JSONL {"prompt": str, "answer": str | [str, ...], "stop": [str, ...] optional} ->
       exact_match after normalization (lowercase, no punctuation or articles, single
       spaces); generation stops at EOS or the first stop sequence (default "\\n").
The report (`run`) lists one row per (task, metric) with the model, checkpoint step and
number of examples, printed as a table and written as JSON.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import traverse_util

from moe_jax import data, scoring
from moe_jax.data import load_tokenizer
from moe_jax.errors import UserError
from moe_jax.loading import for_eval, load_model, make_mesh  # noqa: F401  (evaluate's public names)
from moe_jax.scoring import split_context  # noqa: F401

TASK_KINDS = ("lm", "mc", "gen")


# --- inputs -------------------------------------------------------------------------
def parse_tasks(spec: str) -> list[tuple[str, str]]:
  """'lm:a.txt,mc:b.jsonl' -> [('lm', 'a.txt'), ('mc', 'b.jsonl')]."""
  tasks = []
  for item in filter(None, (s.strip() for s in (spec or "").split(","))):
    kind, sep, path = item.partition(":")
    if not sep or kind not in TASK_KINDS or not path:
      raise UserError(f"task {item!r} is not KIND:PATH with KIND one of {', '.join(TASK_KINDS)}")
    if not os.path.exists(path):
      raise UserError(f"task {item!r}: no such file {path}")
    tasks.append((kind, path))
  return tasks


def read_jsonl(path: str, fields: Sequence[str]) -> list[tuple[int, dict]]:
  """(line number, record) for every non-blank line; names the line of any malformed record."""
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
      if not isinstance(rec, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
      missing = [k for k in fields if k not in rec]
      if missing:
        raise UserError(f"{path}:{lineno}: missing field(s) {missing}; expected {list(fields)}")
      out.append((lineno, rec))
  if not out:
    raise UserError(f"{path}: no examples")
  return out


def normalize_answer(text: str) -> str:
  """SQuAD-style: lowercase, drop punctuation and articles, collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def with_prefix(tok, ctx: list[int], where: str) -> list[int]:
  """An empty context is conditioned on the tokenizer's BOS/EOS token (as lm-eval does)."""
  if ctx:
    return ctx
  if tok.eos_id is None:
    raise UserError(f"{where}: empty context and the tokenizer has no EOS token to start from")
  return [tok.eos_id]


def read_lm_tokens(tok, path: str, with_mask: bool = False):
  """A prepared token directory (its val split), one of its DIR/SPLIT.bin files, or a text file -> ids;
  with_mask: (ids, loss mask list or None), the mask of an instruction set (prepare --format=chat)."""
  directory, split = path, "val"
  if path.endswith(".bin"):
    directory, split = os.path.dirname(path) or ".", os.path.basename(path)[:-len(".bin")]
  if os.path.isfile(os.path.join(directory, "meta.json")):
    meta = data.load_meta(directory)
    if not data.same_tokenizer(meta.get("tokenizer"), tok.name):  # a path, or an exported copy of it
      raise UserError(f"{path}: tokenized with {meta.get('tokenizer')!r}, but evaluating with tokenizer "
                      f"{tok.name!r}; pass --tokenizer={meta.get('tokenizer')}")
    store = data.open_split(directory, split, meta)
    ids = np.asarray(store.tokens).astype(np.int64).tolist()
    if not with_mask:
      return ids
    return ids, None if store.loss_mask is None else np.asarray(store.loss_mask).astype(np.int64).tolist()
  with open(path, "rb") as f:
    ids = tok.encode(f.read().decode("utf-8", errors="replace"))
  return (ids, None) if with_mask else ids


# --- tasks --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model",))
def _routes(variables, inputs_BL, *, model):
  """-> {router path: chosen experts [B, L, X] (or [layers, B, L, X] scanned)}: every Router's output,
  captured (not the sown counts, which would count padding too)."""
  from moe_jax.layers.router import Router
  _, mut = model.apply(variables, inputs_BL, mutable=["intermediates"],
                       capture_intermediates=lambda mdl, name: isinstance(mdl, Router) and name == "__call__")
  flat = traverse_util.flatten_dict(dict(mut["intermediates"]))
  return {"/".join(k[:-1]): v[0][1] for k, v in flat.items() if k[-1] == "__call__"}


def expert_loads(scorer: scoring.Scorer, windows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
  """{layer (run_log.layer_loads names): tokens routed to each expert [E]} over the input tokens of
  `windows` (each window's last token is only a target), padding excluded; {} for a dense model."""
  from moe_jax.run_log import layer_loads
  cfg = scorer.model.cfg
  if getattr(cfg, "num_moe_layers", 0) == 0:  # dense (MTP blocks do not run in scoring)
    return {}
  totals: dict[str, np.ndarray] = {}
  for idx in scorer._batches([len(w) - 1 for w in windows], "expert load"):
    width = scoring.bucket(max(len(windows[i]) - 1 for i in idx), scorer.max_len)
    inputs = np.full((scorer.batch_size, width), scorer.pad_id, np.int32)
    mask = np.zeros((scorer.batch_size, width), bool)
    for row, i in enumerate(idx):
      n = len(windows[i]) - 1
      inputs[row, :n], mask[row, :n] = windows[i][:-1], True
    with scorer._context():
      routes = jax.device_get(_routes(scorer.variables, scorer._put(inputs), model=scorer.model))
    for path, chosen in routes.items():
      chosen = np.asarray(chosen)  # [..., B, L, X]
      lead = chosen.shape[:-3]
      flat = chosen.reshape(-1, *chosen.shape[-3:])
      counts = np.stack([np.bincount(f[mask].reshape(-1), minlength=cfg.n_routed_experts) for f in flat])
      counts = counts.reshape(*lead, cfg.n_routed_experts) if lead else counts[0]
      totals[path] = totals.get(path, 0) + counts
  return layer_loads(totals)


def eval_lm(scorer: scoring.Scorer, tok, path: str, loads: Optional[dict] = None) -> tuple[dict[str, float], int]:
  """-> ({loss, perplexity, bits_per_byte[, maxvio, maxvio/<layer>]}, number of predicted tokens).

  A MoE model's expert loads over the text (expert_loads) go into `loads` when given; MaxVio_global
  is run_log.maxvio of them."""
  # An instruction set (prepare --format=chat|prompt_completion) scores only the tokens its loss mask
  # marks, as training counts them; the windows still run over the whole stream (prompts are context).
  tokens, mask = read_lm_tokens(tok, path, with_mask=True)
  if len(tokens) < 2:
    raise UserError(f"{path}: needs at least 2 tokens to score, has {len(tokens)}")
  if max(tokens) >= scorer.model.cfg.vocab_size:
    raise UserError(f"{path}: token id {max(tokens)} >= the model's vocab_size {scorer.model.cfg.vocab_size}")
  width = scorer.max_len
  windows = [tokens[s:s + width + 1] for s in range(0, len(tokens) - 1, width)]
  requests = [(w[:1], w[1:]) for w in windows]
  if mask is None:
    total = sum(ll for ll, _ in scorer.loglikelihood(requests, desc=f"lm {os.path.basename(path)}"))
    n = len(tokens) - 1
    n_bytes = len(tok.decode(tokens[1:]).encode("utf-8"))
  else:
    if not any(mask[1:]):
      raise UserError(f"{path}: its loss mask marks no token to score")
    scored = scorer.loglikelihood(requests, desc=f"lm {os.path.basename(path)}", token_logprobs=True)
    total = sum(lp for s, (_, _, lps) in zip(range(0, len(tokens) - 1, width), scored)
                for lp, m in zip(lps, mask[s + 1:s + 1 + width]) if m)
    n = int(sum(mask[1:]))
    n_bytes = len(tok.decode([t for t, m in zip(tokens[1:], mask[1:]) if m]).encode("utf-8"))
  loss = -total / n
  out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": -total / math.log(2) / max(n_bytes, 1)}
  counts = expert_loads(scorer, windows)
  if counts:
    from moe_jax.run_log import maxvio
    per_layer, mean = maxvio(counts)
    out["maxvio"] = mean
    out.update({f"maxvio/{k}": v for k, v in per_layer.items()})
    if loads is not None:
      loads.update(counts)
  return out, n


def mc_records(path: str) -> list[tuple[str, str, list[str], int]]:
  """Validated multiple-choice records: (where, context, choices, gold index)."""
  out = []
  for lineno, rec in read_jsonl(path, ("context", "choices", "gold")):
    where = f"{path}:{lineno}"
    choices, gold = rec["choices"], rec["gold"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
      raise UserError(f"{where}: 'choices' must be a non-empty list of non-empty strings, got {choices!r}")
    if isinstance(gold, str) and gold in choices:
      gold = choices.index(gold)
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
      raise UserError(f"{where}: 'gold' must index the {len(choices)} choices (or equal one), got {rec['gold']!r}")
    out.append((where, str(rec["context"]), choices, gold))
  return out


def gen_records(path: str, stop: Sequence[str] = ("\n",)) -> list[tuple[str, str, list[str], list[str]]]:
  """Validated generation records: (where, prompt, accepted answers, stop sequences)."""
  out = []
  for lineno, rec in read_jsonl(path, ("prompt", "answer")):
    where = f"{path}:{lineno}"
    answer = rec["answer"] if isinstance(rec["answer"], list) else [rec["answer"]]
    if not answer or not all(isinstance(a, (str, int, float)) for a in answer):
      raise UserError(f"{where}: 'answer' must be a string or a non-empty list of strings, got {rec['answer']!r}")
    ex_stop = rec.get("stop", list(stop))
    if not isinstance(ex_stop, list) or not all(isinstance(x, str) and x for x in ex_stop):
      raise UserError(f"{where}: 'stop' must be a list of non-empty strings, got {ex_stop!r}")
    out.append((where, str(rec["prompt"]), [str(a) for a in answer], ex_stop))
  return out


def check_tasks(spec: str, stop: Sequence[str] = ("\n",)) -> list[tuple[str, str]]:
  """Parses the task list and validates every JSONL record, before any model is loaded."""
  tasks = parse_tasks(spec)
  for kind, path in tasks:
    if kind == "mc":
      mc_records(path)
    elif kind == "gen":
      gen_records(path, stop)
  return tasks


def eval_mc(scorer: scoring.Scorer, tok, path: str) -> tuple[dict[str, float], int]:
  """-> ({acc, acc_norm}, number of examples)."""
  examples, requests = [], []
  for where, context, choices, gold in mc_records(path):
    first = len(requests)
    for choice in choices:
      ctx, cont = split_context(tok, context, choice)
      ctx = with_prefix(tok, ctx, where)
      if not cont:
        raise UserError(f"{where}: choice {choice!r} encodes to no tokens")
      if len(ctx) + len(cont) - 1 > scorer.max_len:
        raise UserError(f"{where}: context + choice is {len(ctx) + len(cont)} tokens; a window of "
                        f"--max_len={scorer.max_len} scores at most {scorer.max_len + 1}")
      requests.append((ctx, cont))
    examples.append((first, choices, gold))
  scores = scorer.loglikelihood(requests, desc=f"mc {os.path.basename(path)}")
  acc = acc_norm = 0
  for first, choices, gold in examples:
    ll = np.array([s for s, _ in scores[first:first + len(choices)]])
    acc += int(np.argmax(ll) == gold)
    acc_norm += int(np.argmax(ll / np.array([len(c) for c in choices])) == gold)
  return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}, len(examples)


def eval_gen(scorer: scoring.Scorer, tok, path: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = ("\n",), seed: int = 0,
             samples: Optional[list] = None) -> tuple[dict[str, float], int]:
  """-> ({exact_match}, number of examples); appends {where, prompt, output, answer, correct}
  per example to `samples` when given (the text after stop sequences, before normalization)."""
  records = gen_records(path, stop)
  room = scorer.max_len - max_new_tokens
  prompts = []
  for where, prompt, _, _ in records:
    ids = with_prefix(tok, tok.encode(prompt), where)
    if len(ids) > room:
      raise UserError(f"{where}: prompt is {len(ids)} tokens; with --max_new_tokens={max_new_tokens} a window of "
                      f"--max_len={scorer.max_len} leaves room for {room}")
    prompts.append(ids)
  # Decoding ends early at EOS and at one-token stop sequences that every example shares (a
  # batch stops together); each example's own stop sequences then cut its text.
  shared = set.intersection(*(set(r[3]) for r in records))
  stop_ids = ({tok.eos_id} - {None}) | {ids[0] for ids in map(tok.encode, shared) if len(ids) == 1}
  outs = scorer.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_tokens=sorted(stop_ids), seed=seed, desc=f"gen {os.path.basename(path)}")
  hits = 0
  for ids, (where, prompt, answer, ex_stop) in zip(outs, records):
    text = tok.decode([t for t in ids if t != tok.eos_id])
    for s in ex_stop:
      text = text.split(s)[0]
    correct = normalize_answer(text) in {normalize_answer(a) for a in answer}
    hits += int(correct)
    if samples is not None:
      samples.append({"where": where, "prompt": prompt, "output": text, "answer": answer, "correct": correct})
  return {"exact_match": hits / len(prompts)}, len(prompts)


# --- the run ------------------------------------------------------------------------
def run(model, variables, *, model_name: str, step: Optional[int] = None, tasks: str = "",
        lm_eval_tasks: str = "", lm_eval_include: Optional[str] = None, lm_eval_limit: Optional[int] = None,
        tokenizer: str = "byte", output: Optional[str] = None, batch_size: int = 8,
        max_len: Optional[int] = None, mesh=None, rules=None, max_new_tokens: int = 32,
        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = ("\n",),
        seed: int = 0, progress: bool = True, show_samples: int = 0, printer=print,
        max_len_from: Optional[str] = None, speculative: int = 0,
        speculative_compare: bool = False) -> dict[str, Any]:
  """Scores `tasks` (module docstring) and lm-eval tasks -> report dict; writes JSON to `output`.
  show_samples: print (and report under 'samples') the first N generations of each gen task.
  max_len_from: where max_len came from, for the report (default: "--max_len" when given, else
  min(max_position_embeddings, scoring.DEFAULT_MAX_LEN)).
  speculative=K: generation (gen tasks and lm-eval generate_until) drafts K tokens per step with
  the MTP module; the report's 'speculative' entry pools the draft counters and new tokens/s (in
  all and per source), and with speculative_compare every generation runs again without drafts in
  the same process for the plain tokens/s."""
  task_list = parse_tasks(tasks)
  harness = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
  if not task_list and not harness:
    raise UserError("nothing to evaluate: give --tasks=KIND:PATH,... and/or --lm_eval_tasks=NAME,...")
  tok = load_tokenizer(tokenizer)
  if tok.vocab_size > model.cfg.vocab_size:
    raise UserError(f"tokenizer {tokenizer!r} has {tok.vocab_size} ids but the model's vocab_size is "
                    f"{model.cfg.vocab_size}")
  scorer = scoring.Scorer(model, variables, batch_size=batch_size, max_len=max_len, mesh=mesh, rules=rules,
                          pad_id=0, progress=progress, speculative=speculative)
  rows, samples, heatmaps = [], [], []
  for kind, path in task_list:
    start = time.time()
    if kind == "lm":
      loads: dict = {}
      metrics, n = eval_lm(scorer, tok, path, loads)
      if loads:
        heatmaps.append((f"{kind}:{os.path.basename(path)}", loads))
    elif kind == "mc":
      metrics, n = eval_mc(scorer, tok, path)
    else:
      generated = []
      metrics, n = eval_gen(scorer, tok, path, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop=stop, seed=seed, samples=generated)
      samples += [dict(task=f"{kind}:{os.path.basename(path)}", **g) for g in generated[:show_samples]]
    name = f"{kind}:{os.path.basename(path)}"
    rows += [dict(task=name, metric=m, value=v, n=n, seconds=round(time.time() - start, 2))
             for m, v in metrics.items()]
  if harness:
    from moe_jax import lm_eval_adapter
    rows += lm_eval_adapter.evaluate_tasks(scorer, tok, harness, include_path=lm_eval_include, limit=lm_eval_limit,
                                           max_new_tokens=max_new_tokens)
  spec_report = None
  if speculative:
    spec_report = _speculative_report(scorer, speculative_compare, printer)
  if max_len_from is None:
    max_len_from = "--max_len" if max_len else f"min(max_position_embeddings, {scoring.DEFAULT_MAX_LEN})"
  if max_len and scorer.max_len < max_len:
    max_len_from += f", capped at max_position_embeddings={model.cfg.max_position_embeddings}"
  report = dict(model=model_name, checkpoint_step=step, tokenizer=tokenizer, max_len=scorer.max_len,
                max_len_from=max_len_from, weights=("fp8 (e4m3, 128x128 scales)" if getattr(model.cfg, "fp8", False)
                                                else getattr(model.cfg, "param_dtype", None)),
                batch_size=scorer.batch_size, devices=jax.device_count(), jax_version=jax.__version__,
                results=rows)
  if samples:
    report["samples"] = samples
  if spec_report:
    report["speculative"] = spec_report
  if heatmaps:  # each expert's share of its layer's routed tokens, per lm task
    report["expert_load"] = {name: {k: (v / max(v.sum(), 1)).tolist() for k, v in loads.items()}
                             for name, loads in heatmaps}
  printer(format_table(report))
  if samples:
    printer(format_samples(samples))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(report, f, indent=2)
    for name, loads in heatmaps:
      png = f"{os.path.splitext(output)[0]}_expert_load_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
      try:
        from moe_jax import plot
        plot.load_heatmap(loads, png, f"{model_name} step {step}, {name}")
        printer(f"expert-load heat map: {png}")
      except UserError as e:  # matplotlib missing: the numbers are in the report already
        printer(f"no expert-load heat map: {e}")
  return report


def _speculative_report(scorer, compare: bool, printer) -> dict[str, Any]:
  """Pooled draft counters and tokens/s of every generation so far (speculative.pool), in all and per
  source (each gen task, "lm-eval generate"); with compare, every generation call once more without
  drafts (the same prompts and settings, so the same batches, in the same process): tokens/s of both
  over the batches where neither compiled, and whether every output matched (greedy: it must)."""
  from moe_jax import speculative
  spec_log, calls = scorer.gen_log, scorer.gen_calls
  if not spec_log:
    printer("speculative: no generation ran (no gen task, no lm-eval generation)")
    return {}
  sources = list(dict.fromkeys(r["desc"] for r in spec_log))
  rep: dict[str, Any] = dict(drafts=speculative.pool(spec_log),
                             by_source={d: speculative.pool([r for r in spec_log if r["desc"] == d]) for d in sources})
  spec = rep["drafts"]

  def describe(p):
    return (f"accept rate per draft position {[round(a, 3) for a in p['accept_rate']]}, "
            f"{p['tokens_per_step']:.2f} tokens per verify step, {p['tokens_per_s']} new tokens/s")
  lines = [f"speculative K={spec['k']}: {describe(spec)}"]
  if len(sources) > 1:
    lines += [f"  {d}: {describe(p)}" for d, p in rep["by_source"].items()]
  if compare:
    scorer.speculative, scorer.gen_log, scorer.gen_calls = 0, [], []
    try:
      for prompts, max_new_tokens, kw in calls:
        scorer.generate(prompts, max_new_tokens, **kw)
      plain_log = scorer.gen_log
    finally:
      scorer.speculative, scorer.gen_log, scorer.gen_calls = spec["k"], spec_log, calls
    pairs = [(s, p) for s, p in zip(spec_log, plain_log) if not (s["compiled"] or p["compiled"])]
    rep["same_outputs"] = all(s["outputs"] == p["outputs"] for s, p in zip(spec_log, plain_log))

    def both(sp):
      cmp = dict(batches=len(sp), speculative_tokens_per_s=speculative.pool([s for s, _ in sp])["tokens_per_s"],
                 plain_tokens_per_s=speculative.pool([p for _, p in sp])["tokens_per_s"])
      if cmp["plain_tokens_per_s"] and cmp["speculative_tokens_per_s"]:
        cmp["speedup"] = round(cmp["speculative_tokens_per_s"] / cmp["plain_tokens_per_s"], 3)
      return cmp
    rep["compare"] = dict(both(pairs), by_source={d: both([(s, p) for s, p in pairs if s["desc"] == d])
                                                  for d in sources})
    cmp = rep["compare"]
    lines[0] += (f"; same batches without drafts ({len(pairs)} not compiling): {cmp['speculative_tokens_per_s']} vs "
                 f"{cmp['plain_tokens_per_s']} new tokens/s, speed-up {cmp.get('speedup')}x, "
                 f"same outputs: {rep['same_outputs']}")
    if len(sources) > 1:
      lines += [f"  {d} without drafts ({c['batches']} batches): {c['speculative_tokens_per_s']} vs "
                f"{c['plain_tokens_per_s']} new tokens/s, speed-up {c.get('speedup')}x"
                for d, c in cmp["by_source"].items()]
  printer("\n".join(lines))
  return rep


def format_samples(samples: list[dict[str, Any]]) -> str:
  """One block per generation: where it came from, the prompt, the output and the accepted answers."""
  out = []
  for s in samples:
    mark = "correct" if s["correct"] else "wrong"
    out.append(f"--- {s['task']} ({s['where']}, {mark})\nprompt: {s['prompt']!r}\noutput: {s['output']!r}\n"
               f"answer: {' | '.join(map(repr, s['answer']))}")
  return "\n".join(out)


def format_table(report: dict[str, Any]) -> str:
  """The results as an aligned text table, headed by the model and step."""
  head = f"model: {report['model']}   step: {report['checkpoint_step']}"
  if "max_len" in report:
    head += f"   context: {report['max_len']} tokens ({report.get('max_len_from') or 'max_len'})"
  rows = [("task", "metric", "value", "n")] + [
      (r["task"], r["metric"], f"{r['value']:.4f}" if isinstance(r["value"], float) else str(r["value"]), str(r["n"]))
      for r in report["results"]]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join([head] + lines)
