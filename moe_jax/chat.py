"""Instruction data: chat and prompt/completion JSONL -> token ids and a loss mask.

`python -m moe_jax.data prepare --format=chat|prompt_completion` reads one example per
JSONL line:
  chat               {"messages": [{"role": "system"|"user"|"assistant"|..., "content": str}, ...]}
                     (at least one assistant message)
  prompt_completion  {"prompt": str, "completion": str}
and writes, beside the token ids, a loss mask (1: the token is a target that carries loss).

Chat rendering. A Hugging Face tokenizer with a chat template (`chat_template` in the
tokenizer_config.json beside tokenizer.json, or a chat_template.jinja file there) renders
the conversation with that template (transformers' `apply_chat_template`). For each
assistant message i the text splits at render(messages[:i], add_generation_prompt=True)
and render(messages[:i+1]): what lies between is the assistant's turn (its content and
whatever the template closes it with, e.g. DeepSeek's <｜end▁of▁sentence｜>) and carries
loss; the generation prompt (<｜Assistant｜>), system, user and tool text carry none. The
template must render every prefix of the conversation as a prefix of the whole (DeepSeek,
Llama and most others do); one that rewrites earlier turns is refused with the line
number. No EOS is appended: the template ends the turns.

Plain template (the byte tokenizer, or a tokenizer.json without a chat template):
  every message   "<|{role}|>\\n" + content + "\\n"
  then            EOS (when the tokenizer has one)
Loss: the content and the closing "\\n" of assistant messages, and the EOS when the last
message is the assistant's; the "<|{role}|>\\n" headers and all other messages carry none.

Prompt/completion (no template): prompt + completion + EOS; loss on the completion and the EOS.

Every piece (the text between two loss boundaries) is encoded on its own and the ids are
concatenated, so the prompt's ids are exactly what a generation request encodes, and the
mask never depends on a merge across a boundary.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

from moe_jax.errors import UserError, one_line

FORMATS = ("text", "chat", "prompt_completion")
ASSISTANT = "assistant"


def read_examples(path: str, fmt: str) -> Iterator[tuple[str, object]]:
  """(where, messages list | (prompt, completion)) per non-blank line; names the line of any bad record."""
  if not path.endswith((".jsonl", ".json")):
    raise UserError(f"--input {path}: --format={fmt} reads JSONL (one example per line, a .jsonl file)")
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        rec = json.loads(line)
        json.dumps(rec).encode("utf-8")  # undecodable bytes stay as surrogates until here
      except (json.JSONDecodeError, UnicodeError) as e:
        raise UserError(f"{where}: not a UTF-8 JSON object ({one_line(e)})") from None
      if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
      yield where, (_messages(rec, where) if fmt == "chat" else _prompt_completion(rec, where))


def _messages(rec: dict, where: str) -> list[dict]:
  msgs = rec.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise UserError(f"{where}: needs a non-empty 'messages' list of {{'role', 'content'}} objects")
  for j, m in enumerate(msgs):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
            and isinstance(m.get("content"), str)):
      raise UserError(f"{where}: messages[{j}] is not {{'role': str, 'content': str}} (got {json.dumps(m)[:80]})")
  if not any(m["role"] == ASSISTANT for m in msgs):
    raise UserError(f"{where}: no assistant message, so nothing would carry loss; add an assistant turn "
                    "or drop the line")
  return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _prompt_completion(rec: dict, where: str) -> tuple[str, str]:
  prompt, completion = rec.get("prompt"), rec.get("completion")
  if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
    raise UserError(f"{where}: needs a 'prompt' string and a non-empty 'completion' string")
  return prompt, completion


def find_chat_template(tokenizer_json: Optional[str]) -> Optional[str]:
  """The chat template stored beside a tokenizer.json (tokenizer_config.json or chat_template.jinja), or None."""
  if tokenizer_json is None:
    return None
  directory = os.path.dirname(os.path.abspath(tokenizer_json))
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  cfg = _tokenizer_config(directory)
  tmpl = cfg.get("chat_template")
  if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"), None)
  return tmpl if isinstance(tmpl, str) and tmpl else None


def _tokenizer_config(directory: str) -> dict:
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"{path}: not valid JSON; is the file complete?") from None
  return cfg if isinstance(cfg, dict) else {}


class Renderer:
  """Examples -> (ids, loss mask) with a tokenizer (moe_jax.data.load_tokenizer) and its chat template."""

  def __init__(self, tok, tokenizer_json: Optional[str]):
    self.tok = tok
    self.template = find_chat_template(tokenizer_json)
    self._hf = None
    if self.template is not None:
      try:
        from transformers import PreTrainedTokenizerFast
      except ImportError as e:
        raise UserError(f"{tokenizer_json}: its chat template needs the `transformers` package "
                        "(pip install transformers)") from e
      cfg = _tokenizer_config(os.path.dirname(os.path.abspath(tokenizer_json)))
      special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
                 if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
      self._hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, **special)

  @property
  def name(self) -> str:
    return "tokenizer chat template" if self.template is not None else "plain template (moe_jax.chat)"

  def _render(self, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    try:
      return self._hf.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                          add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises its own errors (raise_exception in templates)
      raise UserError(f"{where}: the tokenizer's chat template failed on this conversation ({one_line(e)})") from None

  def chat_pieces(self, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """(text, carries loss) pieces whose concatenation is the rendered conversation."""
    if self.template is None:
      pieces = []
      for m in messages:
        pieces += [(f"<|{m['role']}|>\n", False), (m["content"] + "\n", m["role"] == ASSISTANT)]
      return pieces
    pieces, done = [], ""
    for i, m in enumerate(messages):
      if m["role"] != ASSISTANT:
        continue
      prompt = self._render(messages[:i], where, generation_prompt=True) if i else ""
      turn = self._render(messages[:i + 1], where)
      if not prompt.startswith(done) or not turn.startswith(prompt):
        raise UserError(f"{where}: the chat template renders an earlier turn differently once later turns "
                        "follow, so the assistant's tokens cannot be told apart; use a template that appends turns")
      pieces += [(prompt[len(done):], False), (turn[len(prompt):], True)]
      done = turn
    whole = self._render(messages, where)
    if not whole.startswith(done):
      raise UserError(f"{where}: the chat template renders the assistant turns differently in the whole "
                      "conversation; use a template that appends turns")
    return pieces + [(whole[len(done):], False)]

  def encode(self, example, fmt: str, where: str) -> tuple[list[int], list[int]]:
    """-> (ids, loss mask) of one example; mask[j] = 1 when ids[j] is a target that carries loss."""
    if fmt == "chat":
      pieces = self.chat_pieces(example, where)
      end = [] if self.template is not None else [example[-1]["role"] == ASSISTANT]
    else:
      prompt, completion = example
      pieces, end = [(prompt, False), (completion, True)], [True]
    ids, mask = [], []
    for text, loss in pieces:
      piece = self.tok.encode(text) if text else []
      ids += piece
      mask += [int(loss)] * len(piece)
    if end and self.tok.eos_id is not None:
      ids.append(self.tok.eos_id)
      mask.append(int(end[0]))
    if not any(mask):
      raise UserError(f"{where}: the assistant/completion text encodes to no tokens; nothing would carry loss")
    return ids, mask
