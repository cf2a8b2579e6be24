"""HLO module text -> computations, and how many times one step runs each (loop trip counts).

`parse` reads the text XLA prints (`compiled.as_text()`, an XLA dump's
*.after_optimizations.txt) into computations of instructions; `multipliers` gives every
computation the product of the trip counts of the loops around it. moe_jax/hlo.py sums FLOPs
and collectives with them.

The trip count of a loop comes from its induction variable: the condition compares a tuple
element with a constant (`compare(i, N)`, LT/LE/GT/GE/NE), the loop's initial tuple gives its
start, and the body's root adds a constant step to it (XLA's windowed-einsum loops start at
0 and step by 2, for example). A loop whose limit is data-dependent (the 'ep' exchange's
rounds, layers/ep.py: 1 when routing is balanced within its round factor) counts as if the
limit were 1: once when it starts at 0, never when it starts at 1 (the rounds after a first
round written out before the loop). Any other loop whose count cannot be read counts once.
Both are reported in `unknown_trip_counts`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
               "f8e5m2fnuz": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(\w+)\[([\d,]*)\]")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  type_text: str  # the result type, e.g. 'bf16[8,128]{1,0}' or a tuple '(s32[], ...)'
  operands: list[str]
  args: str  # the text inside the parentheses (a constant's value)
  attrs: str  # everything after the operand list


@dataclasses.dataclass
class Computation:
  name: str
  instructions: dict[str, Instruction]
  root: str | None = None


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text)
          if dt in DTYPE_BYTES]


def type_bytes(type_text: str) -> float:
  """Bytes of a (possibly tuple) HLO type."""
  return sum(DTYPE_BYTES[dt] * math.prod(shape) for dt, shape in arrays(type_text))


def _split_operands(text: str) -> tuple[str, str]:
  """'a, b), attrs' -> ('a, b', 'attrs'): the parenthesized operand list that opens the text."""
  depth = 1
  for i, ch in enumerate(text):
    depth += ch in "({["
    depth -= ch in ")}]"
    if depth == 0:
      return text[:i], text[i + 1:].lstrip(", ")
  return text, ""


def parse(text: str) -> tuple[dict[str, Computation], str]:
  """(computations by name, entry name) of an HLO module's text."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = Computation(m.group(2), {})
        comps[current.name] = current
        if m.group(1):
          entry = current.name
      continue
    if line.rstrip() == "}":  # (a custom call's backend config may span lines and start one with '}')
      current = None
      continue
    m = _INSTR.match(line)
    if not m:  # a continuation: a custom call's backend config may span lines
      if current.instructions:
        last = next(reversed(current.instructions.values()))
        last.attrs += " " + line.strip()
      continue
    name, rest = m.groups()
    if rest.startswith("("):  # a tuple type: up to its closing parenthesis
      inside, _ = _split_operands(rest[1:])
      type_end = len(inside) + 2
    else:  # an array type has no spaces
      type_end = rest.find(" ")
    op = _OPCODE.match(rest, type_end) if type_end > 0 else None
    if not op:
      continue
    opcode, type_text = op.group(1), rest[:type_end]
    operand_text, attrs = _split_operands(rest[op.end():])
    operands = re.findall(r"%([\w.\-]+)", operand_text)
    current.instructions[name] = Instruction(name, opcode, type_text, operands, operand_text, attrs)
    if line.lstrip().startswith("ROOT"):
      current.root = name
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _through(comp: Computation, name: str) -> Instruction | None:
  """The instruction behind `name`, looking through copies, bitcasts and converts."""
  ins = comp.instructions.get(name)
  while ins is not None and ins.opcode in ("copy", "bitcast", "convert", "reshape") and ins.operands:
    ins = comp.instructions.get(ins.operands[0])
  return ins


def _int_constant(ins: Instruction | None) -> int | None:
  if ins is not None and ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.args.strip()):
    return int(ins.args)
  return None


def _tuple_index(ins: Instruction | None) -> int | None:
  """k of `get-tuple-element(param), index=k`."""
  if ins is None or ins.opcode != "get-tuple-element":
    return None
  m = re.search(r"\bindex=(\d+)", ins.attrs)
  return int(m.group(1)) if m else None


_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE"}


def trip_count(cond: Computation, body: Computation, init: Instruction | None,
               caller: Computation, dynamic_limit: int | None = None) -> int | None:
  """Iterations of a while loop: (limit - start) / step for `compare(i, limit)` on its induction
  variable i (a tuple element), start from the initial tuple, step from the body's `add`.
  dynamic_limit: the limit to assume when it is not a constant (None: the count is unknown)."""
  root = cond.instructions.get(cond.root or "")
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  m = re.search(r"direction=(\w+)", root.attrs)
  direction = m.group(1) if m else None
  lhs, rhs = (_through(cond, o) for o in root.operands)
  if _int_constant(lhs) is not None:  # constant on the left: limit OP i
    lhs, rhs, direction = rhs, lhs, _FLIP.get(direction)
  k, limit = _tuple_index(lhs), _int_constant(rhs)
  limit = dynamic_limit if limit is None else limit
  if k is None or limit is None or direction is None:
    return None
  # start: element k of the tuple the loop starts from
  start = None
  if init is not None and init.opcode == "tuple" and k < len(init.operands):
    start = _int_constant(_through(caller, init.operands[k]))
  # step: the body's root tuple, element k = add(element k, step)
  step = None
  body_root = body.instructions.get(body.root or "")
  if body_root is not None and body_root.opcode == "tuple" and k < len(body_root.operands):
    upd = _through(body, body_root.operands[k])
    if upd is not None and upd.opcode in ("add", "subtract") and len(upd.operands) == 2:
      a, b = (_through(body, o) for o in upd.operands)
      if _tuple_index(a) == k:
        step = _int_constant(b)
      elif _tuple_index(b) == k and upd.opcode == "add":
        step = _int_constant(a)
      if step is not None and upd.opcode == "subtract":
        step = -step
  if start is None or not step:
    return None
  span = limit - start
  if direction in ("LT", "GT"):
    n = -(-span // step) if (step > 0) == (direction == "LT") else 0
  elif direction in ("LE", "GE"):
    n = span // step + 1 if (step > 0) == (direction == "LE") else 0
  else:  # NE: exact landing only
    n = span // step if span % step == 0 else None
  return max(n, 0) if n is not None else None


def multipliers(comps: dict[str, Computation], entry: str) -> tuple[dict[str, float], list[str]]:
  """{computation: times one run of the entry runs it}, and the loops whose trip count is unknown."""
  edges = defaultdict(list)  # caller -> [(callee, factor)]
  unknown = []
  for comp in comps.values():
    for ins in comp.instructions.values():
      called = {}
      for kind, value in _CALLED.findall(ins.attrs):
        for callee in re.findall(r"%?([\w.\-]+)", value):
          called[callee] = kind
      trips = 1
      if ins.opcode == "while":
        cond = next((c for c, k in called.items() if k == "condition"), None)
        body = next((c for c, k in called.items() if k == "body"), None)
        init = comp.instructions.get(ins.operands[0]) if ins.operands else None
        args = (comps[cond], comps[body], _through(comp, init.name) if init else None, comp)
        trips = trip_count(*args) if cond in comps and body in comps else None
        if trips is None:
          unknown.append(ins.name)
          trips = trip_count(*args, dynamic_limit=1) if cond in comps and body in comps else None
          trips = 1 if trips is None else trips
      for callee, kind in called.items():
        if callee in comps:
          edges[comp.name].append((callee, trips if kind in ("body", "condition") else 1))
  mult = defaultdict(float)
  mult[entry] = 1.0
  order, seen = [], set()

  def visit(c):  # post-order DFS; the call graph is a DAG
    if c in seen:
      return
    seen.add(c)
    for callee, _ in edges[c]:
      visit(callee)
    order.append(c)

  visit(entry)
  for c in reversed(order):  # callers before callees
    for callee, factor in edges[c]:
      mult[callee] += mult[c] * factor
  return dict(mult), unknown


def shape_of(comp: Computation, name: str) -> tuple[int, ...] | None:
  ins = comp.instructions.get(name)
  found = arrays(ins.type_text) if ins else []
  return found[0][1] if len(found) == 1 else None
