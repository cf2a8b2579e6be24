"""Token data: tokenizers, memory-mapped token files, packing and a stateless sampler.

On disk (`python -m moe_jax.data prepare --input FILES --tokenizer byte|tokenizer.json --out DIR`):
  DIR/train.bin, DIR/val.bin     token ids, uint16 (vocab <= 65536) or uint32, np.memmap
  DIR/train.docs.npy, val.docs.npy  int64 start offset of every document
  DIR/meta.json                  dtype, vocab_size, max_token_id, eos_id, tokenizer, n_tokens
  DIR/train.mask.bin, val.mask.bin  (--format=chat|prompt_completion) uint8 loss mask, one per
                                 token (1: the token is a target that carries loss); meta.json
                                 then records format and loss_mask: true
A text file is one document; a JSONL file holds one document per line (its `text` field).
--format=chat / prompt_completion read instruction JSONL (moe_jax/chat.py: the templates and
which tokens carry loss); each example is one document. Plain text has no mask file: every
target carries loss.
DIR must be new or empty (`--overwrite` replaces a prepared dataset); opening a split checks
its size against meta.json and scans its ids against the vocabulary once, in chunks.
Without a path, the embedded corpus is the running Python's standard library (*.py files
in sorted order, byte tokenizer), so `python train.py` needs no download.

Packing: a row is a window of S+1 consecutive tokens that may span documents; its
segment_ids [S+1] number the documents inside the window and positions [S+1] restart at 0
at every document start, so attention stays within a document and rope sees in-document
positions. Targets that cross a document boundary are masked in the loss; with a loss mask,
rows also carry loss_mask [S+1] (the mask of each token as a target).

Sampling is stateless: the global batch at a step is a function of (seed, step) only, and
each process materializes just the rows its devices hold (a function of (seed, step,
process index)), so resuming needs only the step and a host never reads another's slice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import sysconfig
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from absl import logging

from moe_jax import chat, interrupts
from moe_jax.errors import ArgumentParser, UserError, main_guard, one_line, output_dir

BYTE_EOS = 256
BYTE_VOCAB = 257  # 256 bytes + end-of-document
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>", "<|end_of_text|>")


# --- tokenizers -----------------------------------------------------------------------
class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; 256 ends a document."""

  name = "byte"
  vocab_size = BYTE_VOCAB
  eos_id = BYTE_EOS

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  eos_token = "<|endoftext|>"

  def save_hf(self, path: str):
    """The same ids as a Hugging Face tokenizer.json (for transformers): a byte-level BPE without
    merges whose vocabulary maps each byte's GPT-2 character to the byte's value, EOS = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tk = Tokenizer(models.BPE({c: b for b, c in _gpt2_byte_chars().items()}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([self.eos_token])
    assert tk.token_to_id(self.eos_token) == BYTE_EOS
    tk.save(path)


def _gpt2_byte_chars() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which tokenizers' ByteLevel pre-tokenizer applies."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


BYTE_MARK = "moe_jax_tokenizer"  # tokenizer_config.json key: 'byte' when tokenizer.json is save_hf's


def tokenizer_of_dir(directory: str) -> str:
  """The tokenizer spec of a Hugging Face directory: 'byte' when moe_jax.convert exported a byte-level
  run (its tokenizer.json only mirrors the bytes for transformers), DIR/tokenizer.json, else 'byte'."""
  cfg_path, tok_path = os.path.join(directory, "tokenizer_config.json"), os.path.join(directory, "tokenizer.json")
  if os.path.isfile(cfg_path):
    try:
      with open(cfg_path) as f:
        if json.load(f).get(BYTE_MARK) == "byte":
          return "byte"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
      raise UserError(f"{cfg_path}: not a JSON object; is the file complete?") from None
  return tok_path if os.path.isfile(tok_path) else "byte"


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` package)."""

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer
    except ImportError as e:
      raise UserError("a tokenizer.json needs the `tokenizers` package: pip install tokenizers") from e
    self.name = path
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for unparsable or foreign JSON
      raise UserError(f"tokenizer {path}: not a Hugging Face tokenizer.json ({one_line(e)})") from None
    self.vocab_size = self._tok.get_vocab_size()
    ids = [self._tok.token_to_id(n) for n in _EOS_NAMES]
    self.eos_id = next((i for i in ids if i is not None), None)

  @property
  def eos_token(self) -> Optional[str]:
    return None if self.eos_id is None else self._tok.id_to_token(self.eos_id)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def tokenizer_path(spec: Optional[str]) -> Optional[str]:
  """The tokenizer.json a spec names (a file, or a directory holding tokenizer.json); None for 'byte'."""
  if spec in ("byte", "", None):
    return None
  if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "tokenizer.json")):
    return tokenizer_path(tokenizer_of_dir(spec))
  if not os.path.isfile(spec):
    raise UserError(f"tokenizer {spec!r}: no such file (use 'byte' or a path to tokenizer.json)")
  return spec


def load_tokenizer(spec: str):
  """'byte', a path to a Hugging Face tokenizer.json, or a directory that holds one."""
  path = tokenizer_path(spec)
  return ByteTokenizer() if path is None else HFTokenizer(path)


def same_tokenizer(a: Optional[str], b: Optional[str]) -> bool:
  """Whether two tokenizer specs name the same tokenizer: equal specs, or files with equal bytes
  (a run's tokenizer.json and the copy `moe_jax.convert` writes beside exported weights)."""
  a, b = a or "byte", b or "byte"
  if a == b:
    return True
  try:
    pa, pb = tokenizer_path(a), tokenizer_path(b)
  except UserError:
    return False
  if pa is None or pb is None:  # byte-level: 'byte', or a byte-level export's directory
    return pa is pb
  with open(pa, "rb") as fa, open(pb, "rb") as fb:
    return fa.read() == fb.read()


# --- token stores ---------------------------------------------------------------------
@dataclasses.dataclass
class TokenStore:
  """One split: a flat token array (memmap) and the start offset of each document."""

  tokens: np.ndarray  # [N] uint16 | uint32
  doc_starts: np.ndarray  # [n_docs] int64, doc_starts[0] == 0
  max_id: Optional[int] = None  # the largest id, when a scan has read the whole split
  loss_mask: Optional[np.ndarray] = None  # [N] uint8 (instruction data), None: every token carries loss

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def windows(self, starts: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """Rows of `length` tokens from each start -> tokens, segment_ids, positions (+ loss_mask when the
    store has one) [R, length] int32."""
    offs = starts[:, None] + np.arange(length)[None, :]
    doc = np.searchsorted(self.doc_starts, offs, side="right") - 1
    out = {"tokens": self.tokens[offs].astype(np.int32),
           "segment_ids": (doc - doc[:, :1]).astype(np.int32),
           "positions": (offs - self.doc_starts[doc]).astype(np.int32)}
    if self.loss_mask is not None:
      out["loss_mask"] = self.loss_mask[offs].astype(np.int32)
    return out


BATCH_KEYS = ("tokens", "segment_ids", "positions")


def batch_keys(data_cfg) -> tuple[str, ...]:
  """The keys of the configured data's rows: BATCH_KEYS, plus loss_mask for a prepared instruction set."""
  path = data_cfg.get("path", "")
  if path in ("", "synthetic:copy") or not os.path.isfile(os.path.join(path, "meta.json")):
    return BATCH_KEYS
  return BATCH_KEYS + (("loss_mask",) if load_meta(path).get("loss_mask") else ())


def _dtype_for(vocab_size: int):
  return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def _val_doc(i: int, val_fraction: float) -> bool:
  """Every k-th document (k = 1/val_fraction) is held out; deterministic, spread over the corpus."""
  if val_fraction <= 0:
    return False
  k = max(2, round(1.0 / val_fraction))
  return i % k == k - 1


def stdlib_documents() -> Iterator[bytes]:
  """The running Python's standard library *.py files, in sorted path order (no site-packages)."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
    paths += [os.path.join(d, f) for f in files if f.endswith(".py")]
  for p in sorted(paths, key=lambda p: os.path.relpath(p, root)):
    with open(p, "rb") as f:
      data = f.read()
    if data:
      yield data


def embedded_corpus(val_fraction: float) -> tuple[TokenStore, TokenStore, dict]:
  """Byte-tokenized standard library, split by document, held in memory (~30M tokens)."""
  if not 0 <= val_fraction <= 0.5:
    raise UserError(f"data.val_fraction={val_fraction}: give a fraction in [0, 0.5]")
  parts = {"train": [], "val": []}
  for i, doc in enumerate(stdlib_documents()):
    arr = np.frombuffer(doc, np.uint8).astype(np.uint16)
    parts["val" if _val_doc(i, val_fraction) else "train"].append(np.append(arr, BYTE_EOS).astype(np.uint16))
  if not parts["train"]:
    raise UserError(f"the embedded corpus is empty: no *.py files under {sysconfig.get_paths()['stdlib']}")
  stores = {}
  for split, docs in parts.items():
    lens = np.array([len(d) for d in docs], np.int64)
    stores[split] = TokenStore(np.concatenate(docs) if docs else np.zeros(0, np.uint16),
                               np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64))
  meta = {"dtype": "uint16", "vocab_size": BYTE_VOCAB, "max_token_id": BYTE_EOS, "eos_id": BYTE_EOS,
          "tokenizer": "byte"}
  return stores["train"], stores["val"], meta


META_KEYS = ("dtype", "vocab_size", "max_token_id", "tokenizer", "n_tokens")
_SCAN_CHUNK = 1 << 26  # tokens per chunk of the id scan (128 MiB of uint16)


def load_meta(path: str) -> dict:
  meta_path = os.path.join(path, "meta.json")
  if os.path.isfile(path):
    raise UserError(f"data.path {path!r} is a file; give the directory `python -m moe_jax.data prepare --out` wrote")
  if not os.path.isdir(path):
    raise UserError(f"data.path {path!r} does not exist (prepare it with `python -m moe_jax.data prepare`)")
  if not os.path.isfile(meta_path):
    raise UserError(f"data.path {path!r} has no meta.json; it is not a prepared token directory")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{meta_path}: not valid JSON ({e}); prepare the directory again") from None
  missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
  if missing:
    raise UserError(f"{meta_path}: missing {missing}; prepare the directory again")
  if meta["dtype"] not in ("uint16", "uint32"):
    raise UserError(f"{meta_path}: dtype {meta['dtype']!r} is not uint16 or uint32")
  return meta


def max_token_id(tokens: np.ndarray) -> int:
  """The largest id in a token array, read in chunks (a memmap is never loaded whole); -1 if empty."""
  out = -1
  for start in range(0, len(tokens), _SCAN_CHUNK):
    out = max(out, int(tokens[start:start + _SCAN_CHUNK].max()))
  return out


def open_split(path: str, split: str, meta: Optional[dict] = None, check_ids: bool = True) -> TokenStore:
  """Memory-maps DIR/{split}.bin with its document offsets.

  The file's size must match meta's token count, and (check_ids) every id must be below
  meta's vocab_size: one chunked pass over the file, so a damaged or foreign file is named
  here instead of turning into NaN losses mid-run.
  """
  meta = meta or load_meta(path)
  bin_path = os.path.join(path, f"{split}.bin")
  docs_path = os.path.join(path, f"{split}.docs.npy")
  n = int(meta["n_tokens"].get(split, 0))
  if n == 0:
    return TokenStore(np.zeros(0, meta["dtype"]), np.zeros(1, np.int64))
  if not os.path.isfile(bin_path):
    raise UserError(f"{bin_path}: missing, but meta.json counts {n} {split} tokens; prepare the directory again")
  want, have = n * np.dtype(meta["dtype"]).itemsize, os.path.getsize(bin_path)
  if have != want:
    raise UserError(f"{bin_path}: {have} bytes, but meta.json's {n} {meta['dtype']} tokens need {want} "
                    "(truncated or replaced); prepare the directory again")
  tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(n,))
  try:
    doc_starts = np.load(docs_path)
  except (OSError, ValueError, EOFError) as e:
    raise UserError(f"{docs_path}: unreadable ({one_line(e)}); prepare the directory again") from None
  if (doc_starts.ndim != 1 or not len(doc_starts) or doc_starts[0] != 0 or doc_starts[-1] >= n
      or np.any(np.diff(doc_starts) <= 0)):
    raise UserError(f"{docs_path}: document offsets are not increasing from 0 below {n}; prepare the directory again")
  mask = _open_mask(path, split, n) if meta.get("loss_mask") else None
  if check_ids:
    top = max_token_id(tokens)
    if top >= meta["vocab_size"]:
      raise UserError(f"{bin_path}: token id {top} >= vocab_size {meta['vocab_size']} of its meta.json "
                      f"(tokenizer {meta['tokenizer']!r}): the file is not this tokenizer's; prepare it again")
    return TokenStore(tokens, doc_starts.astype(np.int64), top, mask)
  return TokenStore(tokens, doc_starts.astype(np.int64), loss_mask=mask)


def _open_mask(path: str, split: str, n: int) -> np.ndarray:
  """DIR/{split}.mask.bin: n uint8 (memmap), as meta.json's loss_mask promises."""
  mask_path = os.path.join(path, f"{split}.mask.bin")
  if not os.path.isfile(mask_path) or os.path.getsize(mask_path) != n:
    have = f"{os.path.getsize(mask_path)} bytes" if os.path.isfile(mask_path) else "missing"
    raise UserError(f"{mask_path}: {have}, but meta.json's loss_mask needs one byte per token ({n}); "
                    "prepare the directory again")
  return np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(n,))


# --- prepare ------------------------------------------------------------------------------
# Undecodable bytes (U+FFFD) and control characters other than whitespace, as a share of the characters,
# above which a text file is refused: random or compressed bytes give ~55%, even a dense Latin-1 text < 25%.
NOT_TEXT_FRACTION = 0.3
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def read_documents(paths: Sequence[str]) -> Iterator[str]:
  """Text files are one document each; .jsonl files one per line (the `text` field)."""
  for p in paths:
    if not os.path.isfile(p):
      raise UserError(f"--input {p!r}: {'a directory, not a file' if os.path.isdir(p) else 'no such file'}")
    if p.endswith((".jsonl", ".json")):
      with open(p, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
          if line.strip():
            try:
              text = json.loads(line)["text"]
              if not isinstance(text, str):
                raise TypeError(f"'text' is a {type(text).__name__}")
              text.encode("utf-8")  # undecodable bytes stay as surrogates until here
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeError) as e:
              raise UserError(f"{p}:{lineno}: not a UTF-8 JSON object with a 'text' string ({e})") from None
            yield text
    else:
      with open(p, encoding="utf-8", errors="replace") as f:
        text = f.read()
      bad = text.count("\ufffd") + len(_CONTROL.findall(text))
      if bad > NOT_TEXT_FRACTION * len(text):
        raise UserError(f"--input {p!r}: {bad / len(text):.0%} of it is not UTF-8 text (a binary or compressed file?); "
                        "give UTF-8 text files or .jsonl")
      yield text


PREPARED_FILES = ("train.bin", "val.bin", "train.docs.npy", "val.docs.npy", "meta.json")
MASK_FILES = ("train.mask.bin", "val.mask.bin")  # instruction data only (--format=chat|prompt_completion)


def _check_out(out: str, overwrite: bool) -> str:
  """--out must be new, empty, or (with overwrite) a prepared token directory; never a file."""
  out = output_dir(out, "--out")
  if os.path.isdir(out) and os.listdir(out):
    prepared = os.path.isfile(os.path.join(out, "meta.json"))
    if not overwrite:
      what = "a prepared token directory" if prepared else "not empty"
      raise UserError(f"--out {out} is {what}; refusing to overwrite it: pick a new --out, or pass --overwrite "
                      "to replace a prepared dataset")
    foreign = sorted(set(os.listdir(out)) - set(PREPARED_FILES) - set(MASK_FILES))
    if not prepared or foreign:
      raise UserError(f"--out {out} holds files prepare did not write ({', '.join(foreign[:5]) or 'no meta.json'}); "
                      "--overwrite only replaces a prepared dataset: pick a new --out")
  return out


def prepare(inputs: Sequence[str], tokenizer: str, out: str, val_fraction: float = 0.01,
            overwrite: bool = False, format: str = "text") -> dict:
  """Tokenizes documents into DIR/{train,val}.bin (+ .docs.npy, meta.json); returns the metadata.

  format: 'text' (text files / JSONL `text`), or 'chat' / 'prompt_completion' instruction JSONL,
  which also writes DIR/{train,val}.mask.bin (moe_jax/chat.py).

  Everything is written into a temporary directory beside DIR and moved into place at the
  end, so a failure or Ctrl-C leaves DIR as it was. DIR must be new or empty; overwrite=True
  replaces a prepared dataset (and nothing else).
  """
  if not 0 <= val_fraction <= 0.5:
    raise UserError(f"--val_fraction={val_fraction}: give a fraction in [0, 0.5]")
  if format not in chat.FORMATS:
    raise UserError(f"--format={format!r} is not one of {', '.join(chat.FORMATS)}")
  for p in inputs:  # all of them, before --out is touched
    if not os.path.isfile(p):
      raise UserError(f"--input {p!r}: {'a directory, not a file' if os.path.isdir(p) else 'no such file'}")
  tok = load_tokenizer(tokenizer)
  out = _check_out(out, overwrite)
  tmp = interrupts.make_staging(out, "prepare")  # also removes what a kill -9 of an earlier prepare left
  try:
    meta = _write_splits(_examples(inputs, tok, tokenizer, format), inputs, tok, tokenizer, tmp, val_fraction,
                         format)
    os.makedirs(out, exist_ok=True)
    for name in MASK_FILES + PREPARED_FILES:  # meta.json last: until it lands, DIR is not taken for a dataset
      if os.path.exists(os.path.join(tmp, name)):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
      elif os.path.exists(os.path.join(out, name)):  # --overwrite of a chat set with plain text
        os.remove(os.path.join(out, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    interrupts.staging_done(tmp)
  return meta


def _examples(inputs: Sequence[str], tok, tokenizer: str, fmt: str) -> Iterator[tuple[list[int], Optional[list[int]]]]:
  """(ids, loss mask or None) per document; text documents end with EOS and have no mask."""
  if fmt == "text":
    for text in read_documents(inputs):
      ids = tok.encode(text)
      yield (ids + [tok.eos_id] if ids and tok.eos_id is not None else ids), None
    return
  renderer = chat.Renderer(tok, tokenizer_path(tokenizer))
  logging.info("prepare --format=%s: rendering with the %s", fmt, renderer.name)
  for p in inputs:
    for where, example in chat.read_examples(p, fmt):
      yield renderer.encode(example, fmt, where)


def _write_splits(examples, inputs: Sequence[str], tok, tokenizer: str, out: str, val_fraction: float,
                  fmt: str = "text") -> dict:
  dtype = _dtype_for(tok.vocab_size)
  masked = fmt != "text"
  files = {s: open(os.path.join(out, f"{s}.bin"), "wb") for s in ("train", "val")}
  masks = {s: open(os.path.join(out, f"{s}.mask.bin"), "wb") for s in ("train", "val")} if masked else {}
  starts = {"train": [], "val": []}
  count = {"train": 0, "val": 0}
  max_id = -1
  try:
    for i, (ids, mask) in enumerate(examples):
      if not ids:
        continue
      arr = np.asarray(ids, dtype=np.int64)
      max_id = max(max_id, int(arr.max()))
      split = "val" if _val_doc(i, val_fraction) else "train"
      starts[split].append(count[split])
      count[split] += len(arr)
      files[split].write(arr.astype(dtype).tobytes())
      if masked:
        masks[split].write(np.asarray(mask, np.uint8).tobytes())
  finally:
    for f in [*files.values(), *masks.values()]:
      f.close()
  if count["train"] == 0:
    raise UserError(f"no tokens in {list(inputs)}: the inputs are empty")
  if count["val"] == 0 and val_fraction > 0:
    _carve_val(out, dtype, starts, count, val_fraction, masked)
  for split in ("train", "val"):
    np.save(os.path.join(out, f"{split}.docs.npy"), np.asarray(starts[split] or [0], np.int64))
  meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "max_token_id": max_id,
          "eos_id": tok.eos_id, "tokenizer": tokenizer, "n_tokens": count,
          "n_docs": {s: len(v) for s, v in starts.items()}}
  if masked:
    meta.update(format=fmt, loss_mask=True, n_loss_tokens={
        s: int(np.fromfile(os.path.join(out, f"{s}.mask.bin"), np.uint8).sum()) for s in ("train", "val")})
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def _carve_val(out, dtype, starts, count, val_fraction, masked=False):
  """Too few documents for a held-out one: move the train stream's tail (and its mask) into val."""
  n = count["train"]
  k = max(2, int(np.ceil(n * val_fraction)))
  if k >= n:
    return
  for name, dt in [("", dtype)] + ([(".mask", np.uint8)] if masked else []):
    train_path = os.path.join(out, f"train{name}.bin")
    tail = np.fromfile(train_path, dtype=dt)[n - k:]
    tail.tofile(os.path.join(out, f"val{name}.bin"))
    with open(train_path, "r+b") as f:
      f.truncate((n - k) * np.dtype(dt).itemsize)
  starts["train"] = [s for s in starts["train"] if s < n - k]
  starts["val"] = [0]
  count["train"], count["val"] = n - k, k


# --- the training source ----------------------------------------------------------------
class Source:
  """Train/val rows for the loop: `rows(split, step, row_ids)` -> dict of [R, S+1] int32."""

  def __init__(self, train: TokenStore, val: TokenStore, seq_len: int, batch_size: int, seed: int, meta: dict):
    self.splits = {"train": train, "val": val}
    self.seq_len, self.batch_size, self.seed, self.meta = seq_len, batch_size, seed, meta

  def starts(self, split: str, step: int) -> np.ndarray:
    """Window starts of the whole global batch [B]: a function of (seed, split, step) only."""
    store = self.splits[split]
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    return rng.integers(0, len(store) - self.seq_len, size=self.batch_size)

  def rows(self, split: str, step: int, row_ids: Sequence[int]) -> dict[str, np.ndarray]:
    return self.splits[split].windows(self.starts(split, step)[np.asarray(row_ids)], self.seq_len + 1)


class CopySource:
  """Synthetic copy task for tests: row = [x_1..x_L, SEP, x_1..x_L] (+pad); tokens x in [1, n_symbols]."""

  def __init__(self, seq_len: int, batch_size: int, seed: int, n_symbols: int = 16):
    self.seq_len, self.batch_size, self.seed, self.n_symbols = seq_len, batch_size, seed, n_symbols
    self.half = seq_len // 2  # L: the copy target spans positions L+1 .. 2L of the S+1 window
    self.sep = n_symbols + 1
    self.meta = {"vocab_size": n_symbols + 2, "max_token_id": self.sep, "tokenizer": "synthetic:copy"}

  def rows(self, split: str, step: int, row_ids: Sequence[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    x = rng.integers(1, self.n_symbols + 1, size=(self.batch_size, self.half))[np.asarray(row_ids)]
    r, s1 = len(row_ids), self.seq_len + 1
    tokens = np.zeros((r, s1), np.int32)
    tokens[:, :self.half] = x
    tokens[:, self.half] = self.sep
    tokens[:, self.half + 1:2 * self.half + 1] = x
    return {"tokens": tokens, "segment_ids": np.zeros((r, s1), np.int32),
            "positions": np.broadcast_to(np.arange(s1, dtype=np.int32), (r, s1)).copy()}


def make_source(data_cfg, seq_len: int, batch_size: int, seed: int, vocab_size: int):
  """The configured data: '' (embedded corpus), 'synthetic:copy', or a prepared directory."""
  path = data_cfg.path
  if path == "synthetic:copy":
    src = CopySource(seq_len, batch_size, seed)
  elif path:
    meta = load_meta(path)
    train, val = open_split(path, "train", meta), open_split(path, "val", meta)
    if len(train) == 0:
      raise UserError(f"data.path {path!r}: the train split is empty")
    src = Source(train, _val_or_train(val, train, seq_len), seq_len, batch_size, seed, meta)
  else:
    if data_cfg.get("tokenizer", "byte") not in ("byte", "", None):  # it would be ignored, and eval would use it
      raise UserError(f"data.tokenizer={data_cfg.tokenizer!r} but data.path is empty: the embedded corpus is "
                      "byte-level; set data.tokenizer=byte, or data.path to a directory prepared with that tokenizer")
    train, val, meta = embedded_corpus(data_cfg.val_fraction)
    src = Source(train, _val_or_train(val, train, seq_len), seq_len, batch_size, seed, meta)
  stores = src.splits.values() if isinstance(src, Source) else ()
  top = max([src.meta["max_token_id"]] + [s.max_id for s in stores if s.max_id is not None])
  if top >= vocab_size:
    raise UserError(f"data: token id {top} >= model.vocab_size {vocab_size} "
                    f"(tokenizer {src.meta.get('tokenizer')!r}); raise model.vocab_size or re-tokenize")
  if isinstance(src, Source) and len(src.splits["train"]) <= seq_len:
    raise UserError(f"data: {len(src.splits['train'])} train tokens, fewer than seq_len + 1 = {seq_len + 1}")
  return src


def _val_or_train(val: TokenStore, train: TokenStore, seq_len: int) -> TokenStore:
  if len(val) > seq_len:
    return val
  logging.warning("data: the val split has %d tokens, fewer than seq_len + 1 = %d; val_loss is measured on the "
                  "train split", len(val), seq_len + 1)
  return train


@main_guard
def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = ArgumentParser(prog="python -m moe_jax.data", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("prepare", help="tokenize text/JSONL files into a token directory")
  p.add_argument("--input", nargs="+", required=True, help="text files (one document each) or .jsonl")
  p.add_argument("--format", default="text", choices=chat.FORMATS,
                 help="text: plain documents; chat: {'messages': [...]} JSONL; prompt_completion: "
                      "{'prompt', 'completion'} JSONL (loss on assistant/completion tokens only)")
  p.add_argument("--tokenizer", default="byte", help="'byte' or PATH/tokenizer.json")
  p.add_argument("--out", required=True, help="output directory: new or empty")
  p.add_argument("--overwrite", action="store_true", help="replace the prepared dataset already in --out")
  p.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out, in [0, 0.5]")
  args = parser.parse_args(argv)
  # Ctrl-C / SIGTERM: exit 130 / 143 at once, the staging directory removed
  meta = interrupts.run_command(prepare, args.input, args.tokenizer, args.out, args.val_fraction,
                                overwrite=args.overwrite, format=args.format)
  print(json.dumps(meta))
  return 0


if __name__ == "__main__":
  sys.exit(main())
