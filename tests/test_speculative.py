"""Speculative decoding with the MTP module: greedy equals plain greedy token for token, sampling
keeps the model's distribution (and a wrong acceptance rule is caught), stale cache slots of
rejected drafts never reach an accepted token's logits, and a model without MTP is refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scistats

from moe_jax import config as mcfg
from moe_jax import speculative
from moe_jax.errors import UserError
from moe_jax.generate import continuations, filter_logits, generate, init_cache
from moe_jax.model import Transformer
from test_generate import random_variables

# A 6-token vocabulary so that the random MTP module's drafts are accepted now and then
# (every path of the acceptance is exercised); weights of 0.2 keep greedy choices off near-ties.
VOCAB = 6


def _setup(dtype, depths=1):
  model = Transformer(mcfg.tiny(vocab_size=VOCAB, initializer_range=0.2, max_position_embeddings=64, dtype=dtype,
                                num_nextn_predict_layers=depths))
  return model, random_variables(model, 3)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def greedy_case(request):
  return _greedy_reference(*_setup(request.param))


def _greedy_reference(model, variables):
  """Batch 4, ragged prompts, a stop token that cuts some rows: the plain greedy reference."""
  prompt = np.array(jax.random.randint(jax.random.key(5), (4, 6), 0, VOCAB))
  lengths = np.array([6, 2, 1, 4])
  for b, n in enumerate(lengths):
    prompt[b, n:] = 0
  free = np.asarray(generate(model, variables, prompt, 14, prompt_lengths=lengths))
  stop = int(free[1, lengths[1] + 9])  # row 1's 10th new token: rows stop at different steps
  ref = np.asarray(generate(model, variables, prompt, 14, prompt_lengths=lengths, stop_tokens=(stop,)))
  return model, variables, prompt, lengths, stop, ref


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_plain_greedy(greedy_case, k):
  model, variables, prompt, lengths, stop, ref = greedy_case
  out, st = speculative.generate_speculative(model, variables, prompt, 14, k, prompt_lengths=lengths,
                                             stop_tokens=(stop,))
  np.testing.assert_array_equal(np.asarray(out), ref)
  assert any(r[lengths[b]:].tolist().count(stop) for b, r in enumerate(ref))  # the stop token cut a row
  assert st["accept_rate"][0] > 0  # drafts were accepted: the multi-token commit path ran
  assert 1.0 < st["tokens_per_step"] <= k + 1
  assert st["verify_steps"] < st["new_tokens"]  # fewer main-model steps than tokens


def test_generate_flag_matches(greedy_case):
  model, variables, prompt, lengths, stop, ref = greedy_case
  out = generate(model, variables, prompt, 14, prompt_lengths=lengths, stop_tokens=(stop,), speculative=2)
  np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.fixture(scope="module")
def two_depths():
  """num_nextn_predict_layers=2, fp32. The plain greedy reference runs on the one-depth model with
  the same trunk weights (plain decoding never reads MTP), so its compiled programs are shared."""
  model, variables = _setup("float32", depths=2)
  one = {k: {n: w for n, w in v.items() if n != "mtp_1"} for k, v in variables.items()}
  return (model, variables) + _greedy_reference(_setup("float32")[0], one)[2:]


@functools.lru_cache(maxsize=None)
def _reference_drafter(model, k):
  """Teacher-forced drafts without a cache: seq [R, T] = committed tokens up to x_P at P [R], then the
  drafts. Depth d (0-based) at position P-1 reads token P+d and predicts token P+d+1 (draft d+1);
  with fewer depths D than k the last depth is reused: at P+r it reads its own output at P+r-1
  and draft D+r, and predicts draft D+r+1. -> jitted (variables, seq, P) -> logits [R, k, V]."""
  depths = min(model.cfg.num_nextn_predict_layers, k)

  def run(m, seq, p):
    r_, t = seq.shape
    rows, pos = jnp.arange(r_), jnp.broadcast_to(jnp.arange(t), (r_, t))
    ahead = lambda s: jnp.concatenate([seq[:, s:], jnp.zeros((r_, s), seq.dtype)], 1)  # noqa: E731 (token i+s at i)
    h, out = m.trunk(seq, pos), []
    for d in range(depths):
      h_in = h
      h, normed = m.mtp[d](m.embed_tokens(ahead(d + 1)), h_in, pos)
      out.append(m.logits(normed[rows, p - 1][:, None])[:, 0])
    chain = h[rows, p - 1]
    for r in range(k - depths):  # the last depth on its own output at P..P+r
      h_in = h_in.at[rows, p + r].set(chain)
      h, normed = m.mtp[depths - 1](m.embed_tokens(ahead(depths)), h_in, pos)
      chain = h[rows, p + r]
      out.append(m.logits(normed[rows, p + r][:, None])[:, 0])
    return jnp.stack(out, 1)
  return jax.jit(lambda v, s, p: model.apply(v, s, p, method=run))


K_MAX, ROWS = 3, 64


@pytest.mark.parametrize("k", [1, 2, 3])
def test_two_depths_greedy_and_drafts(two_depths, k, monkeypatch):
  """2 MTP depths, K = 1, 2, 3: the tokens equal plain greedy's, and every verify step's drafts are
  what the depths predict without a cache (depth d drafts token P+d+1; the last depth reused past 2)."""
  model, variables, prompt, lengths, stop, ref = two_depths
  verified = []  # (tokens [B, K+1] = x_P and its drafts, positions [B, K+1]) per verify call, in order
  real = speculative._apply

  def recording(model_, variables_, cache, method, *args, **kw):
    if method == "verify":
      jax.debug.callback(lambda t, p: verified.append((np.asarray(t), np.asarray(p))), args[0], args[1],
                         ordered=True)
    return real(model_, variables_, cache, method, *args, **kw)
  monkeypatch.setattr(speculative, "_apply", recording)
  speculative._generate.clear_cache()
  try:
    out, st = speculative.generate_speculative(model, variables, prompt, 14, k, prompt_lengths=lengths,
                                               stop_tokens=(stop,))
  finally:
    speculative._generate.clear_cache()
  np.testing.assert_array_equal(np.asarray(out), ref)
  assert st["accept_rate"][0] > 0 and 1.0 < st["tokens_per_step"] <= k + 1

  # The first verify at each (row, P) with x_P committed: later ones repeat a finished row.
  last = [lengths[b] + len(c) - 1 for b, c in enumerate(continuations(ref, lengths, 14, (stop,)))]
  seen, seqs, ps, drafts = set(), [], [], []
  width = prompt.shape[1] + 14 + K_MAX + 1
  for tokens, positions in verified:
    for b in range(len(prompt)):
      p = int(positions[b, 0])
      if p > last[b] or (b, p) in seen:
        continue
      seen.add((b, p))
      assert tokens[b, 0] == ref[b, p]
      seqs.append(np.pad(np.concatenate([ref[b, :p + 1], tokens[b, 1:]]), (0, width - p - 1 - k)))
      ps.append(p)
      drafts.append(tokens[b, 1:])
  assert 2 * len(prompt) < len(seqs) <= ROWS  # the prefill's drafts and the loop's
  # One program for every K: the drafts of K < 3 are the first K of K = 3 (depth 0, depth 1, reuse),
  # the rows padded to ROWS (copies of the first).
  seqs, ps = np.stack(seqs + seqs[:1] * (ROWS - len(seqs))), np.array(ps + ps[:1] * (ROWS - len(ps)), np.int32)
  logits = np.asarray(_reference_drafter(model, K_MAX)(variables, seqs, ps))[:len(drafts), :k]  # [R, K, V]
  drafts = np.stack(drafts)
  got = np.take_along_axis(logits, drafts[..., None], -1)[..., 0]
  # Each draft is the reference's argmax (up to fp32 rounding between cached and uncached attention).
  np.testing.assert_array_less(logits.max(-1) - got, 1e-4)


def _exact_joint(model, variables, prompt, temperature, top_k):
  """P[a, b, c] of the first three new tokens under the model's filtered distribution (teacher forcing)."""
  forward = jax.jit(model.apply)  # op by op, these three calls took minutes on a loaded CPU

  def dist(tokens, col):
    logits = forward(variables, jnp.asarray(tokens))[:, col]
    return np.asarray(jax.nn.softmax(filter_logits(logits, temperature, top_k), -1), np.float64)
  p_a = dist(prompt[None], -1)[0]  # [V]
  ab = np.array([[a, b] for a in range(VOCAB) for b in range(VOCAB)])
  seqs = np.concatenate([np.repeat(prompt[None], len(ab), 0), ab], 1)  # [V*V, L+2]
  p_b = dist(seqs[::VOCAB, :-1], -1)  # [V] given a
  p_c = dist(seqs, -1).reshape(VOCAB, VOCAB, VOCAB)  # given a, b
  return p_a[:, None, None] * p_b[:, :, None] * p_c


def _chi2_pvalue(samples_N3, joint):
  """Pearson chi-square of the (token 2, token 3) pairs against the exact marginal; cells with
  expectation < 5 pooled into one."""
  n = len(samples_N3)
  expected = joint.sum(0).reshape(-1) * n
  observed = np.bincount(samples_N3[:, 1] * VOCAB + samples_N3[:, 2], minlength=VOCAB * VOCAB)
  small = expected < 5
  e = np.append(expected[~small], expected[small].sum())
  o = np.append(observed[~small], observed[small].sum())
  keep = e > 0
  return scistats.chisquare(o[keep], e[keep] * o[keep].sum() / e[keep].sum()).pvalue


@pytest.fixture(scope="module")
def sampling_case():
  # Smaller weights than the greedy case: flatter distributions, so that drafts are both accepted
  # and rejected.
  model = Transformer(mcfg.tiny(vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=64))
  variables = random_variables(model, 4)
  prompt = np.array([1, 4, 2], np.int32)
  temperature, top_k = 0.9, 5
  return model, variables, prompt, temperature, top_k, _exact_joint(model, variables, prompt, temperature, top_k)


N_DRAWS = 6000  # rows of one batch: each row is one independent draw of 3 tokens


def _draw(case, k=None):
  model, variables, prompt, temperature, top_k, _ = case
  batch = np.repeat(prompt[None], N_DRAWS, 0)
  kw = dict(temperature=temperature, top_k=top_k, rng=jax.random.key(11))
  if k is None:
    return np.asarray(generate(model, variables, batch, 3, **kw))[:, 3:]
  out, st = speculative.generate_speculative(model, variables, batch, 3, k, **kw)
  return np.asarray(out)[:, 3:], st


def test_sampling_keeps_the_distribution(sampling_case):
  joint = sampling_case[-1]
  # The drafts' distribution differs from the model's: a rule that ignored p would show.
  assert _chi2_pvalue(_draw(sampling_case), joint) > 1e-3  # plain sampling passes the same test
  samples, st = _draw(sampling_case, k=2)
  assert 0.05 < st["accept_rate"][0] < 0.95  # both acceptance and rejection happen
  assert _chi2_pvalue(samples, joint) > 1e-3


def test_wrong_acceptance_rule_is_caught(sampling_case, monkeypatch):
  """Accepting every draft (the draft distribution's tokens) must fail the same test."""
  monkeypatch.setattr(speculative, "acceptance_probability", lambda p, q: jnp.ones_like(p))
  speculative._generate.clear_cache()
  try:
    samples, st = _draw(sampling_case, k=2)
  finally:
    speculative._generate.clear_cache()
  assert st["accept_rate"][0] == 1.0
  assert _chi2_pvalue(samples, sampling_case[-1]) < 1e-6


def test_rejected_slots_never_reach_accepted_logits():
  """Verify [x, wrong drafts] (stale slots P+1..P+K), then verify from P+1: the logits equal a
  teacher-forced forward's; and noise in every slot after P changes nothing at P..P+K."""
  model, variables = _setup("float32")
  seq = np.array([[3, 1, 4, 1, 5, 2, 0, 3]], np.int32)
  p, k = 4, 2
  ref = np.asarray(model.apply(variables, seq))  # [1, 8, V]

  @jax.jit
  def verify(cache, tokens, positions):
    out, mut = model.apply({**variables, "cache": cache}, tokens, positions, method="verify", mutable=["cache"])
    return out, mut["cache"]

  def call(cache, method, *args):
    if method == "verify":
      return verify(cache, *args)
    out, mut = model.apply({**variables, "cache": cache}, *args, method=method, mutable=["cache"])
    return out, mut["cache"]

  cache = init_cache(model, 1, 16)
  _, cache = call(cache, "trunk", seq[:, :p], jnp.arange(p)[None], None, True)
  wrong = np.array([[seq[0, p], (seq[0, p + 1] + 1) % VOCAB, (seq[0, p + 2] + 2) % VOCAB]], np.int32)
  _, stale = call(cache, "verify", wrong, p + jnp.arange(k + 1)[None])
  (logits, _), _ = call(stale, "verify", seq[:, p + 1:p + 2 + k], p + 1 + jnp.arange(k + 1)[None])
  np.testing.assert_allclose(np.asarray(logits), ref[:, p + 1:p + 2 + k], atol=1e-4, rtol=1e-4)

  noisy = jax.tree.map(lambda c: c.at[:, p:].set(jax.random.normal(jax.random.key(0), c[:, p:].shape)), cache)
  (clean, _), _ = call(cache, "verify", seq[:, p:p + 1 + k], p + jnp.arange(k + 1)[None])
  (dirty, _), _ = call(noisy, "verify", seq[:, p:p + 1 + k], p + jnp.arange(k + 1)[None])
  np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))


def test_model_without_mtp_is_refused():
  model = Transformer(mcfg.tiny(vocab_size=VOCAB, num_nextn_predict_layers=0))
  variables = random_variables(model, 0)
  with pytest.raises(UserError, match="MTP weights"):
    speculative.generate_speculative(model, variables, np.ones((1, 3), np.int32), 4, 1)
  with pytest.raises(UserError, match=">= 1"):
    speculative.generate_speculative(*_setup("float32"), np.ones((1, 3), np.int32), 4, 0)


def test_eval_report_gives_acceptance_and_both_speeds(tmp_path):
  """evaluate.run(speculative=2, speculative_compare=True) on a gen task: per-position acceptance,
  tokens per verify step, tokens/s of both over the same non-compiling batches, same outputs."""
  import json

  from moe_jax import evaluate
  model = Transformer(mcfg.tiny(vocab_size=257, initializer_range=0.2, max_position_embeddings=64))
  variables = random_variables(model, 5)
  path = tmp_path / "gen.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ("ab", "cd", "ef", "gh")))
  lines = []
  report = evaluate.run(model, variables, model_name="tiny", tasks=f"gen:{path}", max_new_tokens=6, batch_size=2,
                        max_len=32, progress=False, printer=lines.append, speculative=2, speculative_compare=True)
  spec = report["speculative"]
  assert spec["drafts"]["k"] == 2 and len(spec["drafts"]["accept_rate"]) == 2
  assert 1.0 <= spec["drafts"]["tokens_per_step"] <= 3.0
  assert spec["same_outputs"] is True  # greedy: drafts change the speed, never the tokens
  assert spec["compare"]["batches"] == 1  # two batches of one bucket: the first compiles
  assert spec["compare"]["speculative_tokens_per_s"] > 0 and spec["compare"]["plain_tokens_per_s"] > 0
  assert any(line.startswith("speculative K=2: accept rate per draft position") for line in lines)


LOCAL_GEN_TASK = """task: moe_jax_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_generation_is_speculative(tmp_path, monkeypatch):
  """--lm_eval_tasks with --speculative=2 --speculative_compare: a local generate_until task (no
  network) decodes through generate_speculative; the report gives its acceptance per draft position,
  tokens per verify step and both tokens/s, and the outputs match plain greedy's."""
  pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")
  import json

  from moe_jax import evaluate
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  model = Transformer(mcfg.tiny(vocab_size=257, initializer_range=0.2, max_position_embeddings=64))
  variables = random_variables(model, 5)
  data = tmp_path / "gen.jsonl"
  data.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ("ab", "cd", "ef", "gh")))
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "gen.yaml").write_text(LOCAL_GEN_TASK.format(data=data))
  calls = []
  real = speculative.generate_speculative
  monkeypatch.setattr(speculative, "generate_speculative", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
  lines = []
  report = evaluate.run(model, variables, model_name="tiny", lm_eval_tasks="moe_jax_local_gen",
                        lm_eval_include=str(tmp_path / "tasks"), batch_size=2, max_len=32, progress=False,
                        printer=lines.append, speculative=2, speculative_compare=True)
  assert calls == [2, 2]  # both batches of the lm-eval requests drafted 2 tokens
  spec = report["speculative"]
  lm = spec["by_source"]["lm-eval generate"]
  assert list(spec["by_source"]) == ["lm-eval generate"] and lm["k"] == 2 and len(lm["accept_rate"]) == 2
  assert lm["verify_steps"] > 0 and 1.0 <= lm["tokens_per_step"] <= 3.0 and lm["new_tokens"] > 0
  assert spec["same_outputs"] is True  # the plain rerun of the same requests gave the same tokens
  cmp = spec["compare"]["by_source"]["lm-eval generate"]
  assert cmp["batches"] >= 1 and cmp["speculative_tokens_per_s"] > 0  # 2 if an earlier test compiled them and cmp["plain_tokens_per_s"] > 0
  assert any(line.startswith("speculative K=2: accept rate per draft position") for line in lines)
  assert any(r["task"] == "lm_eval:moe_jax_local_gen" and r["metric"] == "exact_match" for r in report["results"])


def test_eval_cli_needs_k_for_compare(capsys):
  import eval as eval_cli
  with pytest.raises(SystemExit) as e:
    eval_cli.main(["--preset", "tiny", "--tasks=gen:x.jsonl", "--speculative_compare"])
  assert e.value.code == 2 and "--speculative_compare needs --speculative=K" in capsys.readouterr().err
