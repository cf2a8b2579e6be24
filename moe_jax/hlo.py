"""Reading a compiled program's optimized HLO: per-step FLOPs and collectives, loops counted.

XLA's `cost_analysis()` counts a while loop's body once, and a scanned layer stack (or the
gradient-accumulation scan) is a while loop, so its FLOPs are per layer, not per step. Here
every computation gets a multiplier: how many times one step runs it (the product of the
trip counts of the loops around it), and matmuls and collectives are summed with it.

  FLOPs: `dot` (2 * output elements * contracted size) and `convolution` (TPU lowers most
  matmuls to it; taps on padding or dilation holes not counted), plus Pallas kernels (custom
  calls) by the `cost_estimate` they carry (splash attention, megablox). Elementwise work is
  not counted.
  Collectives: count and bytes per kind. Bytes are the larger of the operand and the result
  per chip (all-gather: the gathered result; reduce-scatter: the full input; all-reduce,
  all-to-all, collective-permute: the buffer itself). Async pairs count once (the -start).
  Cross-slice (DCN) transfers, which TPU multi-slice programs express as send/recv with a
  `_xla_megascale_transfer_type`, are counted under 'dcn-' + the transfer's kind.

The trip count of a loop comes from its condition (`compare(i, constant N), direction=LT`,
the form jax's scan and fori_loop take); a loop whose count cannot be read counts once and
is reported in `unknown_trip_counts`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "ragged-all-to-all")
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


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text)
          if dt in DTYPE_BYTES]


def type_bytes(type_text: str) -> float:
  """Bytes of a (possibly tuple) HLO type."""
  return sum(DTYPE_BYTES[dt] * math.prod(shape) for dt, shape in _arrays(type_text))


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


def _trip_count(cond: Computation) -> int | None:
  root = cond.instructions.get(cond.root or "")
  if root is None or root.opcode != "compare":
    return None
  for name in root.operands:
    ins = cond.instructions.get(name)
    if ins is not None and ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.args.strip()):
      n = int(ins.args)
      if "direction=LT" in root.attrs:
        return n
      if "direction=LE" in root.attrs:
        return n + 1
  return None


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
        trips = _trip_count(comps[cond]) if cond in comps else None
        if trips is None:
          unknown.append(ins.name)
          trips = 1
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


def _shape_of(comp: Computation, name: str) -> tuple[int, ...] | None:
  ins = comp.instructions.get(name)
  arrays = _arrays(ins.type_text) if ins else []
  return arrays[0][1] if len(arrays) == 1 else None


def matmul_flops(comp: Computation, ins: Instruction) -> float:
  """FLOPs of one dot / convolution instruction (0 when its operand shapes are not known)."""
  out = _arrays(ins.type_text)
  if len(out) != 1 or len(ins.operands) < 2:
    return 0.0
  out_elems = math.prod(out[0][1])
  lhs, rhs = _shape_of(comp, ins.operands[0]), _shape_of(comp, ins.operands[1])
  if ins.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    if lhs is None or not m:
      return 0.0
    contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
    return 2.0 * out_elems * contracted
  return conv_flops(out[0][1], lhs, rhs, ins.attrs)


def _window_taps(n: int, out: int, size: int, stride: int, lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
  """Window taps that land on real input (not padding, not a dilation hole), summed over outputs."""
  last = (n - 1) * lhs_dilate
  return sum(1 for o in range(out) for j in range(size)
             if 0 <= (p := o * stride + j * rhs_dilate - lo) <= last and p % lhs_dilate == 0)


def conv_flops(out_shape, lhs_shape, rhs_shape, attrs: str) -> float:
  """FLOPs of a convolution: 2 * (batch x output-feature elements) * input features * real taps.

  TPU programs express batched matmuls as convolutions with dilated, padded windows (a
  ragged_dot's weight gradient uses lhs_dilate = window size), so taps that fall on padding
  or dilation holes are not counted.
  """
  m = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)(?:,|$)", attrs)
  if lhs_shape is None or rhs_shape is None or not m:
    return 0.0
  lhs_l, rhs_l, out_l = m.groups()
  spatial = sorted({c for c in out_l if c.isdigit()})
  win = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(re.findall(r"(\w+)=(\S+)", win.group(1))) if win else {}

  def field(key, k, default):
    if key not in fields:
      return default
    parts = fields[key].split("x")
    return parts[k]

  taps = 1
  for k, c in enumerate(spatial):
    size = int(field("size", k, "1"))
    lo = int(field("pad", k, "0_0").split("_")[0])
    taps *= _window_taps(lhs_shape[lhs_l.index(c)], out_shape[out_l.index(c)], size, int(field("stride", k, "1")),
                         lo, int(field("lhs_dilate", k, "1")), int(field("rhs_dilate", k, "1")))
  non_spatial = math.prod(d for d, c in zip(out_shape, out_l) if not c.isdigit())
  return 2.0 * non_spatial * rhs_shape[rhs_l.index("i")] * taps


def _collective_kind(ins: Instruction) -> str | None:
  op = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") else ins.opcode
  if op in COLLECTIVES:
    return op
  if op == "send":
    m = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.attrs)
    if m:
      return "dcn-" + m.group(1).lower().replace("_", "-")
  return None


def _group_size(attrs: str) -> int | None:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # iota form [groups,size]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh form: sizes and grouped axes
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)) if a in sizes)
  return None


_KERNEL_FLOPS = re.compile(r'"cost_estimate"\s*:\s*\{[^}]*"flops"\s*:\s*"?(\d+)')


@dataclasses.dataclass
class Summary:
  flops: float  # matmul FLOPs per step, per chip (Pallas kernels included)
  kernel_flops: float  # of which Pallas kernels (their cost estimates)
  collectives: dict[str, dict[str, float]]  # kind -> {'count', 'bytes'} per step, per chip
  largest: list[dict]  # the biggest collectives: kind, bytes, group size, times per step, op name
  unknown_trip_counts: list[str]


def summarize(text: str, top: int = 12) -> Summary:
  """Per-step matmul FLOPs and collectives of a compiled module's text (`compiled.as_text()`)."""
  comps, entry = parse(text)
  mult, unknown = multipliers(comps, entry)
  flops = kernel_flops = 0.0
  totals: dict[str, dict[str, float]] = {}
  items = []
  for comp in comps.values():
    times = mult.get(comp.name, 0.0)
    if not times:
      continue
    for ins in comp.instructions.values():
      if ins.opcode in ("dot", "convolution"):
        flops += times * matmul_flops(comp, ins)
        continue
      if ins.opcode == "custom-call":
        m = _KERNEL_FLOPS.search(ins.attrs)
        if m:
          kernel_flops += times * float(m.group(1))
        continue
      kind = _collective_kind(ins)
      if kind is None:
        continue
      result = type_bytes(ins.type_text)
      if ins.opcode.endswith("-start"):  # async: the result tuple holds the operand(s) and the output
        arrays = _arrays(ins.type_text)
        result = max((DTYPE_BYTES[dt] * math.prod(s) for dt, s in arrays), default=0.0)
      operand = sum(type_bytes(comp.instructions[o].type_text) for o in ins.operands
                    if o in comp.instructions and comp.instructions[o].opcode != "after-all")
      nbytes = max(result, operand)
      t = totals.setdefault(kind, {"count": 0.0, "bytes": 0.0})
      t["count"] += times
      t["bytes"] += times * nbytes
      name = re.search(r'op_name="([^"]*)"', ins.attrs)
      items.append({"kind": kind, "bytes": nbytes, "times": times, "group": _group_size(ins.attrs),
                    "op": name.group(1)[-120:] if name else ins.name})
  items.sort(key=lambda d: -d["bytes"] * d["times"])
  return Summary(flops + kernel_flops, kernel_flops, totals, items[:top], unknown)
