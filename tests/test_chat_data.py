"""Instruction data: prepare --format=chat|prompt_completion, the loss mask in training and eval, errors."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax import data, train
from moe_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "dé"}],
]


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def _docs(directory, split="train"):
  """[(ids, mask)] per document of a prepared split."""
  store = data.open_split(directory, split)
  bounds = list(store.doc_starts) + [len(store)]
  return [(np.asarray(store.tokens[a:b]), np.asarray(store.loss_mask[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def _loss_text(ids, mask, tok):
  return tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id])


def test_chat_plain_template_mask_bits(tmp_path):
  out = str(tmp_path / "out")
  meta = data.prepare([_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS])], "byte", out, 0.0,
                      format="chat")
  assert meta["loss_mask"] and meta["format"] == "chat" and meta["n_docs"]["train"] == 3
  tok = data.ByteTokenizer()
  docs = _docs(out)
  for (ids, mask), msgs in zip(docs, CHATS):
    assert tok.decode(ids) == "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs)
    assert ids[-1] == data.BYTE_EOS and mask[-1] == (msgs[-1]["role"] == "assistant")
    # Exactly the assistant contents and their closing newline carry loss, nothing else.
    assert _loss_text(ids, mask, tok) == "".join(m["content"] + "\n" for m in msgs if m["role"] == "assistant")
  assert meta["n_loss_tokens"]["train"] == sum(int(m.sum()) for _, m in docs)
  # Rows carry the mask beside the tokens, window for window.
  src = data.make_source(ml_collections.ConfigDict(dict(path=out, tokenizer="byte", val_fraction=0.0)), 16, 4, 0,
                         264)
  store = src.splits["train"]
  rows = src.rows("train", 0, range(4))
  starts = src.starts("train", 0)
  for r, s in enumerate(starts):
    np.testing.assert_array_equal(rows["loss_mask"][r], store.loss_mask[s:s + 17])
  assert data.batch_keys(ml_collections.ConfigDict(dict(path=out)))[-1] == "loss_mask"


def test_chat_tokenizer_template_and_prompt_completion(tmp_path):
  pytest.importorskip("transformers")
  tokdir = tmp_path / "tok"
  tokdir.mkdir()
  data.ByteTokenizer().save_hf(str(tokdir / "tokenizer.json"))
  template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  (tokdir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "B"}))
  out = str(tmp_path / "out")
  data.prepare([_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS])], str(tokdir / "tokenizer.json"), out,
               0.0, format="chat")
  tok = data.load_tokenizer(str(tokdir / "tokenizer.json"))
  for (ids, mask), msgs in zip(_docs(out), CHATS):
    whole = "B" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    assert tok.decode(ids) == whole and tok.eos_id not in ids.tolist()  # the template ends the turns
    # The generation prompt is the prompt's; the content and the template's closing text are the assistant's.
    assert _loss_text(ids, mask, tok) == "".join(f"{m['content']}<|im_end|>\n" for m in msgs
                                                 if m["role"] == "assistant")

  pc = [{"prompt": "Q: 1+1\nA:", "completion": " 2"}, {"prompt": "", "completion": "x"}]
  out2 = str(tmp_path / "pc")
  data.prepare([_jsonl(tmp_path / "pc.jsonl", pc)], "byte", out2, 0.0, format="prompt_completion")
  byte = data.ByteTokenizer()
  for (ids, mask), r in zip(_docs(out2), pc):
    assert byte.decode(ids) == r["prompt"] + r["completion"] and ids[-1] == data.BYTE_EOS
    assert _loss_text(ids, mask, byte) == r["completion"] and mask[-1] == 1 and mask[:len(r["prompt"])].sum() == 0


def test_prompt_targets_carry_no_loss():
  """Changing the targets at masked positions leaves the LM and MTP losses (and normalizers) unchanged;
  changing one unmasked target changes them. All-ones mask == no mask (plain text)."""
  rng = np.random.default_rng(0)
  b, s, v = 2, 12, 20
  tokens = rng.integers(0, v, (b, s + 1)).astype(np.int32)
  mask = (rng.random((b, s + 1)) < 0.5).astype(np.int32)
  mask[:, 3] = 1
  mask[:, 5] = 0
  batch = {"tokens": tokens, "segment_ids": np.zeros_like(tokens), "positions": np.tile(np.arange(s + 1), (b, 1)),
           "loss_mask": mask}
  logits = jnp.asarray(rng.normal(size=(b, s, v)), jnp.float32)

  def losses(bt):
    return [tuple(map(float, (train.cross_entropy(logits, *train.targets(bt, k))[0],
                              jnp.sum(train.targets(bt, k)[1])))) for k in (0, 1)]

  base = losses(batch)
  changed = dict(batch, tokens=np.where(mask == 0, (tokens + 7) % v, tokens))
  assert losses(changed) == base
  one = dict(batch, tokens=tokens.copy())
  one["tokens"][0, 3] = (tokens[0, 3] + 1) % v  # an unmasked target of the LM (pos 2) and the MTP depth 1 (pos 1)
  assert all(a[0] != c[0] for a, c in zip(losses(one), base))
  plain = {k: x for k, x in batch.items() if k != "loss_mask"}
  assert losses(dict(plain, loss_mask=np.ones_like(tokens))) == losses(plain)
  assert base[0][1] == mask[:, 1:].sum()  # the normalizer counts the masked targets only


def _tiny_config(path, steps):
  spec = importlib.util.spec_from_file_location("cfg_tiny", os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("test")
  c.data.path, c.steps, c.seq_len, c.batch_size = path, steps, 32, 8
  c.mesh.data, c.log_every, c.checkpoint_every, c.optim.warmup = 8, 1, steps, 5
  c.model.num_nextn_predict_layers = 1
  return c


def test_tiny_chat_set_fine_tunes_and_evaluates(tmp_path):
  """Masked loss falls over 30 steps of the tiny preset on a small chat set; eval's lm task scores only
  the assistant tokens (equal to the train step's masked validation loss)."""
  rng = np.random.default_rng(0)
  names = ["ada", "bob", "cy", "dee", "eve", "fay"]
  recs = [{"messages": [{"role": "user", "content": f"name {n}"}, {"role": "assistant", "content": n.upper()}]}
          for n in (names[i] for i in rng.integers(0, len(names), 200))]
  out = str(tmp_path / "chat")
  data.prepare([_jsonl(tmp_path / "c.jsonl", recs)], "byte", out, 0.1, format="chat")
  c = _tiny_config(out, 30)
  res = train.run(ml_collections.ConfigDict(c.to_dict()), str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    lm = [json.loads(line)["lm_loss"] for line in f if "lm_loss" in line]
  assert np.mean(lm[-5:]) < 0.5 * np.mean(lm[:5]), lm

  from moe_jax import evaluate, scoring
  from moe_jax.model import Transformer
  trainer = train.Trainer(ml_collections.ConfigDict(c.to_dict()))
  variables = {"params": res["state"].params, "router": res["state"].router}
  scorer = scoring.Scorer(Transformer(trainer.mcfg), jax.device_get(variables), batch_size=2, max_len=32,
                          progress=False)
  metrics, n = evaluate.eval_lm(scorer, data.ByteTokenizer(), out)
  meta = data.load_meta(out)
  val = data.open_split(out, "val")
  assert n == int(np.asarray(val.loss_mask[1:]).sum()) < meta["n_tokens"]["val"] // 2
  # The same windows through train's eval step: the mask makes the two agree.
  width = 32
  total, count = 0.0, 0.0
  step = jax.jit(train.make_eval_step(Transformer(trainer.mcfg)))
  toks, m = np.asarray(val.tokens).astype(np.int32), np.asarray(val.loss_mask).astype(np.int32)
  for s in range(0, len(toks) - 1, width):
    w, wm = toks[s:s + width + 1], m[s:s + width + 1]
    pad = width + 1 - len(w)
    bt = {"tokens": np.pad(w, (0, pad))[None], "loss_mask": np.pad(wm, (0, pad))[None],
          "segment_ids": np.pad(np.zeros_like(w), (0, pad), constant_values=1)[None],
          "positions": np.arange(width + 1, dtype=np.int32)[None]}
    out_step = step(variables["params"], variables["router"], bt)
    ce, _, k = out_step[0] if isinstance(out_step[0], tuple) else out_step
    total, count = total + float(ce), count + float(k)
  assert count == n and metrics["loss"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("lines,match", [
    ([{"messages": [{"role": "user", "content": "no answer"}]}], r"c\.jsonl:2: no assistant message"),
    (["{not json"], r"c\.jsonl:2: not a UTF-8 JSON object"),
    ([{"messages": [{"role": "user"}]}], r"c\.jsonl:2: messages\[0\] is not"),
    ([{"messages": "hi"}], r"c\.jsonl:2: needs a non-empty 'messages' list"),
])
def test_chat_errors_one_line_exit_2(tmp_path, capsys, lines, match):
  good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  path = tmp_path / "c.jsonl"
  path.write_text("\n".join([json.dumps(good)] + [x if isinstance(x, str) else json.dumps(x) for x in lines]) + "\n")
  with pytest.raises(UserError, match=match):
    data.prepare([str(path)], "byte", str(tmp_path / "o"), format="chat")
  assert data.main(["prepare", "--format=chat", "--input", str(path), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.count("error: ") == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]  # nothing half-written


def test_prompt_completion_errors(tmp_path):
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": ""}])
  with pytest.raises(UserError, match=r"p\.jsonl:1: needs a 'prompt' string and a non-empty 'completion'"):
    data.prepare([path], "byte", str(tmp_path / "o"), format="prompt_completion")
  (tmp_path / "t.txt").write_text("plain")
  with pytest.raises(UserError, match="reads JSONL"):
    data.prepare([str(tmp_path / "t.txt")], "byte", str(tmp_path / "o"), format="chat")
