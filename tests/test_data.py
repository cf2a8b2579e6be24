"""moe_jax.data: prepare round trip, packing, the stateless sampler, and its errors."""

import json
import os

import ml_collections
import numpy as np
import pytest

from moe_jax import data
from moe_jax.errors import UserError

DOCS = ["def f(x):\n  return x + 1\n", "héllo wörld ✓", "a", "import os\nprint(os.sep)\n", "last one"]


def _write_inputs(tmp_path):
  text = tmp_path / "one.txt"
  text.write_text(DOCS[0], encoding="utf-8")
  jsonl = tmp_path / "rest.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS[1:])) + "\n",
                   encoding="utf-8")
  return [str(text), str(jsonl)]


def _docs(store: data.TokenStore) -> list[np.ndarray]:
  bounds = list(store.doc_starts) + [len(store)]
  return [np.asarray(store.tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def test_prepare_round_trip_byte(tmp_path):
  out = tmp_path / "tok"
  meta = data.prepare(_write_inputs(tmp_path), "byte", str(out), val_fraction=0.5)
  assert meta["dtype"] == "uint16" and meta["vocab_size"] == data.BYTE_VOCAB and meta["eos_id"] == data.BYTE_EOS
  assert meta["n_docs"] == {"train": 3, "val": 2}  # every 2nd document is held out
  assert json.loads((out / "meta.json").read_text()) == meta
  tok = data.ByteTokenizer()
  train, val = data.open_split(str(out), "train"), data.open_split(str(out), "val")
  assert isinstance(train.tokens, np.memmap)
  got = [tok.decode(d) for d in _docs(train)] + [tok.decode(d) for d in _docs(val)]
  assert got == [DOCS[0], DOCS[2], DOCS[4], DOCS[1], DOCS[3]]
  assert all(d[-1] == data.BYTE_EOS for d in _docs(train) + _docs(val))
  assert meta["max_token_id"] == data.BYTE_EOS and meta["n_tokens"]["train"] == len(train)


def test_prepare_hf_tokenizer_and_single_document_val(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the cat sat on mat".split())}}
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tk.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "a.txt").write_text("the cat sat on the mat " * 20)
  meta = data.prepare([str(tmp_path / "a.txt")], str(tmp_path / "tokenizer.json"), str(tmp_path / "out"), 0.1)
  assert meta["vocab_size"] == 7 and meta["eos_id"] == 1
  # One document: the val split is the tail of the token stream.
  assert meta["n_tokens"]["val"] == int(np.ceil(121 * 0.1)) and meta["n_tokens"]["train"] == 121 - 13
  train = data.open_split(str(tmp_path / "out"), "train")
  assert list(train.tokens[:4]) == [2, 3, 4, 5]


def test_prepare_errors(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(UserError, match="empty"):
    data.prepare([str(tmp_path / "empty.txt")], "byte", str(tmp_path / "o1"))
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(UserError, match="bad.jsonl:2"):
    data.prepare([str(tmp_path / "bad.jsonl")], "byte", str(tmp_path / "o2"))
  with pytest.raises(UserError, match="no such file"):
    data.prepare([str(tmp_path / "missing.txt")], "byte", str(tmp_path / "o3"))
  assert data.main(["prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o4")]) == 2
  with pytest.raises(UserError, match=r"val_fraction=0.9"):
    data.prepare([str(tmp_path / "bad.jsonl")], "byte", str(tmp_path / "o5"), val_fraction=0.9)
  assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "empty.txt"]  # nothing half-written left behind


def _error(capsys) -> str:
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.count("error: ") == 1 and err.startswith("error: "), err
  return err


def test_prepare_refuses_to_overwrite(tmp_path, capsys):
  """A second prepare into the same --out keeps the first dataset (issue 14: 124k tokens became 1)."""
  (tmp_path / "big.txt").write_text("some text " * 500)
  (tmp_path / "small.txt").write_text("x")
  out = str(tmp_path / "tok")
  prepare = ["prepare", "--out", out, "--val_fraction", "0.1", "--input"]
  assert data.main(prepare + [str(tmp_path / "big.txt")]) == 0
  capsys.readouterr()
  before = {f: (tmp_path / "tok" / f).read_bytes() for f in data.PREPARED_FILES}
  assert data.main(prepare + [str(tmp_path / "small.txt")]) == 2
  assert "is a prepared token directory; refusing to overwrite it" in _error(capsys)
  assert {f: (tmp_path / "tok" / f).read_bytes() for f in data.PREPARED_FILES} == before
  assert data.main(prepare + [str(tmp_path / "small.txt"), "--overwrite"]) == 0
  assert data.load_meta(out)["n_tokens"] == {"train": 2, "val": 0}
  assert sorted(os.listdir(tmp_path / "tok")) == sorted(data.PREPARED_FILES)  # no temporary directory left
  capsys.readouterr()
  # --overwrite never replaces a directory prepare did not write, nor a file.
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("precious")
  assert data.main(["prepare", "--input", str(tmp_path / "small.txt"), "--out", str(tmp_path / "mine"),
                    "--overwrite"]) == 2
  assert "files prepare did not write (notes.txt)" in _error(capsys)
  assert data.main(["prepare", "--input", str(tmp_path / "small.txt"), "--out", str(tmp_path / "small.txt")]) == 2
  assert "is a file, not a directory" in _error(capsys)
  assert (tmp_path / "small.txt").read_text() == "x"


def test_bad_tokenizer_and_flags_are_one_line(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("abc")
  (tmp_path / "tok.json").write_text("not json")
  out = ["--out", str(tmp_path / "o")]
  assert data.main(["prepare", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok.json")]
                   + out) == 2
  assert "tok.json: not a Hugging Face tokenizer.json" in _error(capsys)
  assert data.main(["prepare", "--input", str(tmp_path / "a.txt"), "--val_fraction=x"] + out) == 2
  assert "--val_fraction: invalid float value: 'x'" in _error(capsys)
  assert data.main(["prepare"] + out) == 2
  assert "required: --input" in _error(capsys)
  assert not (tmp_path / "o").exists()


def test_damaged_token_files_are_named(tmp_path):
  (tmp_path / "a.txt").write_text("some text " * 50)
  out = tmp_path / "tok"
  data.prepare([str(tmp_path / "a.txt")], "byte", str(out))
  cfg = _cfg(str(out))
  (out / "train.bin").write_bytes(b"")  # emptied ("mmap length is greater than file size" before)
  with pytest.raises(UserError, match=r"train.bin: 0 bytes, but meta.json's 495 uint16 tokens need 990"):
    data.make_source(cfg, 16, 4, 0, 264)
  data.prepare([str(tmp_path / "a.txt")], "byte", str(out), overwrite=True)
  tokens = np.fromfile(out / "train.bin", np.uint16)
  tokens[7] = 300  # an id the byte vocabulary (257) does not have
  tokens.tofile(out / "train.bin")
  with pytest.raises(UserError, match=r"train.bin: token id 300 >= vocab_size 257 of its meta.json"):
    data.make_source(cfg, 16, 4, 0, 512)
  data.prepare([str(tmp_path / "a.txt")], "byte", str(out), overwrite=True)
  (out / "meta.json").write_text("{")
  with pytest.raises(UserError, match=r"meta.json: not valid JSON"):
    data.make_source(cfg, 16, 4, 0, 264)


def test_id_scan_is_chunked(monkeypatch):
  monkeypatch.setattr(data, "_SCAN_CHUNK", 7)
  tokens = np.zeros(100, np.uint16)
  tokens[99] = 5
  assert data.max_token_id(tokens) == 5 and data.max_token_id(tokens[:99]) == 0
  assert data.max_token_id(tokens[:0]) == -1


def test_packing_segments_and_positions():
  store = data.TokenStore(np.arange(20, dtype=np.uint16), np.array([0, 5, 7, 15]))
  w = store.windows(np.array([3, 14]), 6)
  np.testing.assert_array_equal(w["tokens"][0], [3, 4, 5, 6, 7, 8])
  np.testing.assert_array_equal(w["segment_ids"][0], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(w["positions"][0], [3, 4, 0, 1, 0, 1])
  np.testing.assert_array_equal(w["segment_ids"][1], [0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(w["positions"][1], [7, 0, 1, 2, 3, 4])


def test_sampler_is_stateless_and_sliced():
  store = data.TokenStore(np.arange(1000, dtype=np.uint16) % 250, np.array([0, 400]))
  src = data.Source(store, store, seq_len=16, batch_size=8, seed=3, meta={})
  full = src.rows("train", 5, range(8))
  again = data.Source(store, store, 16, 8, 3, {}).rows("train", 5, range(8))
  for k in full:
    np.testing.assert_array_equal(full[k], again[k])
  # A process that holds rows 4..7 reads exactly those rows of the global batch.
  part = src.rows("train", 5, range(4, 8))
  np.testing.assert_array_equal(part["tokens"], full["tokens"][4:])
  assert not np.array_equal(src.rows("train", 6, range(8))["tokens"], full["tokens"])
  assert not np.array_equal(data.Source(store, store, 16, 8, 4, {}).rows("train", 5, range(8))["tokens"],
                            full["tokens"])
  assert not np.array_equal(src.rows("val", 5, range(8))["tokens"], full["tokens"])


def test_copy_source_layout():
  src = data.CopySource(seq_len=8, batch_size=2, seed=0, n_symbols=5)
  t = src.rows("train", 0, [0, 1])["tokens"]
  assert t.shape == (2, 9)
  np.testing.assert_array_equal(t[:, :4], t[:, 5:])
  assert (t[:, 4] == src.sep).all() and t.max() <= src.sep


def test_embedded_corpus():
  train, val, meta = data.embedded_corpus(0.01)
  assert len(train) > 1_000_000 and len(val) > 10_000
  assert meta["vocab_size"] == 257 and int(train.tokens[:100_000].max()) <= data.BYTE_EOS
  assert train.tokens[train.doc_starts[1] - 1] == data.BYTE_EOS
  first = next(data.stdlib_documents())
  np.testing.assert_array_equal(train.tokens[:len(first)], np.frombuffer(first, np.uint8))


def _cfg(path):
  return ml_collections.ConfigDict(dict(path=path, tokenizer="byte", val_fraction=0.01))


def test_make_source_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    data.make_source(_cfg(str(tmp_path / "nope")), 16, 4, 0, 264)
  os.makedirs(tmp_path / "hollow")
  with pytest.raises(UserError, match="no meta.json"):
    data.make_source(_cfg(str(tmp_path / "hollow")), 16, 4, 0, 264)
  (tmp_path / "a.txt").write_text("some text " * 50)
  data.prepare([str(tmp_path / "a.txt")], "byte", str(tmp_path / "tok"))
  with pytest.raises(UserError, match=r"token id 256 >= model.vocab_size 200"):
    data.make_source(_cfg(str(tmp_path / "tok")), 16, 4, 0, 200)
  with pytest.raises(UserError, match="fewer than seq_len"):
    data.make_source(_cfg(str(tmp_path / "tok")), 4096, 4, 0, 264)
  src = data.make_source(_cfg(str(tmp_path / "tok")), 16, 4, 0, 264)
  assert src.rows("train", 0, range(4))["tokens"].shape == (4, 17)


def test_interrupted_overwrite_keeps_the_old_dataset(tmp_path, monkeypatch, capsys):
  """Ctrl-C in the middle of `prepare --overwrite`: status 130, the previous dataset intact, no debris."""
  (tmp_path / "a.txt").write_text("first " * 100)
  (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
  out = tmp_path / "tok"
  data.prepare([str(tmp_path / "a.txt")], "byte", str(out))
  before = {f: (out / f).read_bytes() for f in data.PREPARED_FILES}
  calls = []

  def encode(self, text):
    calls.append(text)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return list(text.encode())
  monkeypatch.setattr(data.ByteTokenizer, "encode", encode)
  assert data.main(["prepare", "--input", str(tmp_path / "b.jsonl"), "--out", str(out), "--overwrite"]) == 130
  assert capsys.readouterr().err == "error: interrupted\n"
  assert {f: (out / f).read_bytes() for f in data.PREPARED_FILES} == before
  assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.jsonl", "tok"]



def test_byte_tokenizer_exports_the_same_ids(tmp_path):
  """A byte-level run's export: transformers' tokenizer gives the byte ids, eval keeps reading bytes."""
  pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  from moe_jax import convert
  from moe_jax.config import tiny
  (tmp_path / "config.json").write_text("{}")
  convert._write_tokenizer(data.ByteTokenizer(), tiny(vocab_size=264), tmp_path)
  byte, exported = data.ByteTokenizer(), data.HFTokenizer(str(tmp_path / "tokenizer.json"))
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in DOCS + [" lead\tand\r\n", "\x00\x7f\u00ff", "日本語 🎉"]:
    assert exported.encode(text) == hf_tok(text)["input_ids"] == byte.encode(text), text
    assert exported.decode(byte.encode(text)) == text
  assert exported.vocab_size == len(hf_tok) == data.BYTE_VOCAB
  assert exported.eos_id == hf_tok.eos_token_id == data.BYTE_EOS
  assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == data.BYTE_EOS
  assert data.tokenizer_of_dir(str(tmp_path)) == "byte" and data.load_tokenizer(str(tmp_path)).name == "byte"
  assert data.same_tokenizer("byte", str(tmp_path)) and not data.same_tokenizer(str(tmp_path / "tokenizer.json"), "byte")
