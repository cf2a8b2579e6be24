"""Scoring with hand-checked numbers, the lm-evaluation-harness adapter, and eval.py's errors.

Most numbers come from a bigram model whose log-probabilities are set by hand: after 'a' the
next byte is 'b' with p = 1/2 and after 'b' it is 'a' with p = 1/2 (every other byte 1/512);
after any other byte all 257 ids are equally likely (1/257).
"""

import collections
import importlib.util
import json
import math
import os
import pathlib

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before lm_eval/datasets are imported: local data only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from moe_jax import evaluate, scoring  # noqa: E402
from moe_jax.data import ByteTokenizer  # noqa: E402
from moe_jax.errors import UserError  # noqa: E402

LN2, LN257, LN512 = math.log(2), math.log(257), math.log(512)
Cfg = collections.namedtuple("Cfg", "vocab_size max_position_embeddings moe_impl capacity_factor", defaults=(0.0,))


def bigram_table() -> np.ndarray:
  table = np.full((257, 257), -LN257, np.float32)
  for prev, nxt in ((ord("a"), ord("b")), (ord("b"), ord("a"))):
    table[prev] = -LN512
    table[prev, nxt] = -LN2
  return table


class Bigram(nn.Module):
  """logits[b, s] = table[tokens[b, s]]: log-probabilities set by hand (context-free)."""

  cfg: Cfg

  @nn.compact
  def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None, decode=False, absorb=True):
    if decode:  # generate() reads a cache collection; a bigram needs none, so an empty placeholder
      self.variable("cache", "unused", jnp.zeros, (1,))
    return self.param("table", lambda _: jnp.asarray(bigram_table()))[tokens_BS]


@pytest.fixture(scope="module")
def bigram():
  model = Bigram(Cfg(257, 16, "dense"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return scoring.Scorer(model, variables, batch_size=4, progress=False), ByteTokenizer()


def write(path: pathlib.Path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_lm_loss_perplexity_and_bits_per_byte_by_hand(bigram, tmp_path):
  scorer, tok = bigram
  # 40 bytes, 39 predictions of p = 1/2, over windows of max_len=16 (each token scored once).
  (tmp_path / "ab.txt").write_text("ab" * 20)
  metrics, n = evaluate.eval_lm(scorer, tok, str(tmp_path / "ab.txt"))
  assert n == 39
  assert metrics["loss"] == pytest.approx(LN2, rel=1e-5)
  assert metrics["perplexity"] == pytest.approx(2.0, rel=1e-5)
  assert metrics["bits_per_byte"] == pytest.approx(1.0, rel=1e-5)
  # One more byte 'x' after 'b' (p = 1/512 = 2^-9): 39 + 9 = 48 bits over 40 bytes.
  (tmp_path / "abx.txt").write_text("ab" * 20 + "x")
  metrics, n = evaluate.eval_lm(scorer, tok, str(tmp_path / "abx.txt"))
  assert n == 40
  assert metrics["bits_per_byte"] == pytest.approx(48 / 40, rel=1e-5)
  assert metrics["loss"] == pytest.approx(48 * LN2 / 40, rel=1e-5)


def test_multiple_choice_by_hand(bigram, tmp_path):
  scorer, tok = bigram
  path = write(tmp_path / "mc.jsonl", [
      # ll: 'c' = -ln257; 'abab' = -ln257 - 3 ln2 -> acc picks 'c' (wrong), acc_norm (per char) 'abab' (right)
      {"context": "x", "choices": ["c", "abab"], "gold": 1},
      # ll: 'b' = -ln2; 'c' = -ln512 -> both right
      {"context": "a", "choices": ["b", "c"], "gold": 0},
      # gold given as the choice's text; 'zz' = -ln512 - ln257, 'a' = -ln2 -> both right
      {"context": "b", "choices": ["zz", "a"], "gold": "a"},
  ])
  metrics, n = evaluate.eval_mc(scorer, tok, path)
  assert n == 3
  assert metrics == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(1.0)}
  (ll, greedy), = scorer.loglikelihood([(tok.encode("x"), tok.encode("abab"))])
  assert ll == pytest.approx(-LN257 - 3 * LN2, rel=1e-6)
  (ll, greedy), = scorer.loglikelihood([(tok.encode("a"), tok.encode("ba"))])
  assert ll == pytest.approx(-2 * LN2, rel=1e-6) and greedy


def test_context_trailing_space_moves_to_the_continuation():
  tok = ByteTokenizer()
  assert evaluate.split_context(tok, "Q: 1 ", "two") == (tok.encode("Q: 1"), tok.encode(" two"))


def test_generation_exact_match_and_stop_sequences_by_hand(bigram, tmp_path):
  scorer, tok = bigram
  # Greedy from 'a' alternates b, a, b, ...; from 'x' every id ties and argmax takes id 0.
  path = write(tmp_path / "gen.jsonl", [
      {"prompt": "xa", "answer": "babababa"},  # no stop in the text: all 8 new bytes
      {"prompt": "a", "answer": "BAB", "stop": ["ab"]},  # 'bab|ab...' cut at 'ab' -> 'b'; wrong
      {"prompt": "b", "answer": ["zz", " A! "], "stop": ["b"]},  # 'a' (then 'b' stops); normalized ' A! ' == 'a'
      {"prompt": "q", "answer": "", "stop": ["\u0000"]},  # '\0' stops at once: '' == ''
  ])
  metrics, n = evaluate.eval_gen(scorer, tok, path, max_new_tokens=8)
  assert n == 4 and metrics["exact_match"] == pytest.approx(3 / 4)
  outs = scorer.generate([tok.encode("xa"), tok.encode("b")], 8, stop_tokens=[ord("b")])
  assert outs == [tok.encode("b"), tok.encode("ab")]  # cut after the stop token, per row

  # --show_samples: what the model generated, after stop sequences, with the verdict.
  lines = []
  report = evaluate.run(scorer.model, scorer.variables, model_name="bigram", tasks=f"gen:{path}", max_new_tokens=8,
                        progress=False, show_samples=2, printer=lines.append, tokenizer="byte")
  assert [(x["output"], x["correct"]) for x in report["samples"]] == [("babababa", True), ("b", False)]
  assert report["samples"][1]["where"].endswith("gen.jsonl:2") and report["samples"][1]["answer"] == ["BAB"]
  assert "output: 'babababa'" in lines[-1] and "(gen.jsonl:2, wrong)" not in lines[-1]  # where is the full path
  assert f"--- gen:gen.jsonl ({path}:2, wrong)" in lines[-1]


def test_normalize_answer():
  assert evaluate.normalize_answer("  The  Answer, is: 42! ") == "answer is 42"


def test_bad_records_name_their_line(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b"], "gold": 0}\n{"context": \n')
  with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
    evaluate.mc_records(str(tmp_path / "bad.jsonl"))
  path = write(tmp_path / "nochoice.jsonl", [{"context": "a", "choices": ["b"], "gold": 0},
                                             {"context": "a", "choices": [], "gold": 0}])
  with pytest.raises(UserError, match=r"nochoice.jsonl:2: 'choices' must be a non-empty list"):
    evaluate.mc_records(path)
  path = write(tmp_path / "gold.jsonl", [{"context": "a", "choices": ["b", "c"], "gold": 2}])
  with pytest.raises(UserError, match=r"gold.jsonl:1: 'gold' must index"):
    evaluate.mc_records(path)
  path = write(tmp_path / "gen.jsonl", [{"prompt": "a"}])
  with pytest.raises(UserError, match=r"gen.jsonl:1: missing field\(s\) \['answer'\]"):
    evaluate.gen_records(path)
  with pytest.raises(UserError, match="KIND:PATH"):
    evaluate.parse_tasks(f"qa:{path}")


def test_prompt_longer_than_the_context(bigram, tmp_path):
  scorer, tok = bigram  # max_len 16
  path = write(tmp_path / "long.jsonl", [{"prompt": "a" * 12, "answer": "b"}])
  with pytest.raises(UserError, match=r"long.jsonl:1: prompt is 12 tokens; .* leaves room for 8"):
    evaluate.eval_gen(scorer, tok, path, max_new_tokens=8)
  path = write(tmp_path / "longmc.jsonl", [{"context": "a" * 16, "choices": ["bb"], "gold": 0}])
  with pytest.raises(UserError, match=r"longmc.jsonl:1: context \+ choice is 18 tokens"):
    evaluate.eval_mc(scorer, tok, path)


def test_scores_and_generations_on_a_mesh_equal_single_device(bigram):
  """The batch is sharded over every (forced host) device; padding rows fill it to a multiple."""
  scorer, tok = bigram
  mesh, rules = evaluate.make_mesh()
  assert mesh.devices.size == jax.device_count()
  sharded = scoring.Scorer(scorer.model, scorer.variables, batch_size=3, mesh=mesh, rules=rules, progress=False)
  assert sharded.batch_size % jax.device_count() == 0
  requests = [(tok.encode("xa"), tok.encode("bab")), (tok.encode("q" * 9), tok.encode("z")), ([256], [97, 98])]
  np.testing.assert_allclose([s for s, _ in sharded.loglikelihood(requests)],
                             [s for s, _ in scorer.loglikelihood(requests)], rtol=1e-6)
  prompts = [tok.encode("xa"), tok.encode("b"), tok.encode("qqq")]
  assert sharded.generate(prompts, 5) == scorer.generate(prompts, 5)


# --- lm-evaluation-harness ------------------------------------------------------------------
def needs_lm_eval():
  pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")


class Req:
  def __init__(self, *args):
    self.args = args


def test_adapter_requests_by_hand(bigram):
  needs_lm_eval()
  from moe_jax.lm_eval_adapter import MoeJaxLM
  scorer, tok = bigram
  lm = MoeJaxLM(scorer, tok)
  (ll, greedy), = lm.loglikelihood([Req("a", "b")])
  assert ll == pytest.approx(-LN2, rel=1e-6) and greedy
  # Rolling: the first byte is conditioned on EOS (uniform), then 39 predictions of p = 1/2,
  # over disjoint windows of max_len = 16.
  total, = lm.loglikelihood_rolling([Req("ab" * 20)])
  assert total == pytest.approx(-LN257 - 39 * LN2, rel=1e-5)
  assert lm.generate_until([Req("xa", {"until": ["aba"], "max_gen_toks": 6}),
                            Req("b", {"until": ["\n"], "max_gen_toks": 3})]) == ["b", "aba"]


LOCAL_TASK = """task: moe_jax_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_json_task_offline(bigram, tmp_path):
  """A harness task reading a local JSONL (no network) runs through the adapter and agrees with mc:."""
  needs_lm_eval()
  scorer, tok = bigram
  records = [{"context": "x", "choices": ["c", "abab"], "gold": 1}, {"context": "a", "choices": ["b", "c"], "gold": 0},
             {"context": "b", "choices": ["zz", "a"], "gold": 1}]
  data = write(tmp_path / "local.jsonl", records)
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "local.yaml").write_text(LOCAL_TASK.format(data=data))
  report = evaluate.run(scorer.model, scorer.variables, model_name="bigram", tasks=f"mc:{data}",
                        lm_eval_tasks="moe_jax_local_mc", lm_eval_include=str(tmp_path / "tasks"),
                        batch_size=4, progress=False, output=str(tmp_path / "report.json"), printer=lambda s: None)
  got = {(r["task"], r["metric"]): (r["value"], r["n"]) for r in report["results"]}
  assert got[("lm_eval:moe_jax_local_mc", "acc")] == (pytest.approx(2 / 3), 3)
  assert got[("lm_eval:moe_jax_local_mc", "acc_norm")] == (pytest.approx(1.0), 3)
  assert got[("mc:local.jsonl", "acc")] == (pytest.approx(2 / 3), 3)
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["model"] == "bigram" and len(saved["results"]) == 4
  assert {"task", "metric", "value", "n"} <= set(saved["results"][0])


# --- eval.py ----------------------------------------------------------------------------------
def eval_main(argv, capsys):
  spec = importlib.util.spec_from_file_location("eval_cli", pathlib.Path(__file__).parents[1] / "eval.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  try:
    code = cli.main(argv)
  except SystemExit as e:  # argparse-level errors
    code = e.code
  return code, capsys.readouterr()


@pytest.mark.parametrize("case", ["missing_checkpoint", "malformed", "no_choices", "no_tasks"])
def test_cli_errors_are_one_line(case, tmp_path, capsys):
  good = write(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": "b"}])
  argv = {
      "missing_checkpoint": ["--workdir", str(tmp_path / "nope"), f"--tasks=gen:{good}"],
      "malformed": ["--preset", "tiny", f"--tasks=gen:{good},mc:{tmp_path / 'bad.jsonl'}"],
      "no_choices": ["--preset", "tiny", f"--tasks=mc:{tmp_path / 'empty.jsonl'}"],
      "no_tasks": ["--preset", "tiny"],
  }[case]
  (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b"], "gold": 0}\n\n{oops}\n')
  write(tmp_path / "empty.jsonl", [{"context": "a", "choices": [], "gold": 0}])
  code, out = eval_main(argv, capsys)
  assert code == 2
  lines = out.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.err
  expected = {"missing_checkpoint": "no checkpoint at", "malformed": "bad.jsonl:3: malformed JSON",
              "no_choices": "empty.jsonl:1: 'choices' must be a non-empty list",
              "no_tasks": "nothing to evaluate"}[case]
  assert expected in lines[0]
