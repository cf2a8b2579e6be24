"""Reading a compiled program's optimized HLO: per-step FLOPs and collectives, loops counted.

XLA's `cost_analysis()` counts a while loop's body once, and a scanned layer stack (or the
gradient-accumulation scan) is a while loop, so its FLOPs are per layer, not per step. Here
every computation gets a multiplier: how many times one step runs it (the product of the
trip counts of the loops around it), and matmuls and collectives are summed with it.

  FLOPs: `dot` (2 * output elements * contracted size) and `convolution` (TPU lowers most
  matmuls to it; taps on padding or dilation holes not counted), plus Pallas kernels (custom
  calls) by the `cost_estimate` they carry (splash attention, megablox). Elementwise work is
  not counted.
  Collectives: count, buffer bytes and wire bytes per kind. Buffer bytes are the larger of the
  operand and the result per chip (all-gather: the gathered result; reduce-scatter: the full
  input; all-reduce, all-to-all, collective-permute: the buffer itself). Wire bytes are what
  one chip sends under the ring model over a group of n: all-reduce 2(n-1)/n x buffer,
  all-gather, reduce-scatter and all-to-all (n-1)/n x buffer, collective-permute and DCN
  transfers the buffer. Async pairs count once (the -start).
  Forms the TPU compiler gives collectives, each under its own kind:
    reduce-scatter                a native reduce-scatter, or a `kind=kCustom` fusion calling an
                                  `%all-reduce-scatter` computation (all-reduce + dynamic-slice
                                  inside, one fused collective; its padded buffer is counted)
    all-gather-as-all-reduce      an all-reduce whose input is a dynamic-update-slice (a shard
                                  written into zeros): a gather in disguise, at all-reduce wire cost
    reduce-scatter-as-all-reduce  an all-reduce whose every use dynamic-slices it: a
                                  reduce-scatter in disguise, at all-reduce wire cost
    all-reduce                    the rest
  A tuple all-reduce (XLA's combiner packs several into one) is split by operand, each piece
  under its own kind.
  Cross-slice (DCN) transfers, which TPU multi-slice programs express as send/recv with a
  `_xla_megascale_transfer_type`, are counted under 'dcn-' + the transfer's kind.
  Group sizes are read from `replica_groups={{..},..}`, the iota form `[groups,size]<=[..]`, the
  mesh form `mesh['x'=4,'y'=8]{'y'}` (with or without `device_ids=(..)`) and `{}` (all devices).

Parsing the text and the loops' trip counts: moe_jax/hlo_text.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

from moe_jax.hlo_text import (DTYPE_BYTES, Computation, Instruction, arrays, multipliers, parse,
                              shape_of, type_bytes)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def matmul_flops(comp: Computation, ins: Instruction) -> float:
  """FLOPs of one dot / convolution instruction (0 when its operand shapes are not known)."""
  out = arrays(ins.type_text)
  if len(out) != 1 or len(ins.operands) < 2:
    return 0.0
  out_elems = math.prod(out[0][1])
  lhs, rhs = shape_of(comp, ins.operands[0]), shape_of(comp, ins.operands[1])
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


def group_size(attrs: str, devices: int | None = None) -> int | None:
  """Chips in one replica group of a collective (None when the attributes do not say)."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # iota form [groups,size]<=[...]
  if m:
    return int(m.group(2))
  # mesh form: sizes, an optional device order, the grouped axes:
  #   mesh['axis_0'=64,'axis_1'=1] {'axis_0'}   mesh['x'=8,'y'=4], device_ids=([2,16]T(1,0)) {'x'}
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)) if a in sizes)
  if re.search(r"replica_groups=\{\}", attrs):  # one group of every device
    return devices
  return None


def wire_factor(kind: str, n: int | None) -> float:
  """Bytes one chip sends per buffer byte under the ring model, for a group of n chips."""
  if kind.startswith("dcn-") or kind == "collective-permute":
    return 1.0  # the transfer is the buffer
  share = (n - 1) / n if n else 1.0  # an unknown group: the large-group limit
  if kind in ("all-reduce", "all-gather-as-all-reduce", "reduce-scatter-as-all-reduce"):
    return 2.0 * share  # reduce-scatter then all-gather
  return share  # all-gather, reduce-scatter, all-to-all, ragged-all-to-all


_KERNEL_FLOPS = re.compile(r'"cost_estimate"\s*:\s*\{[^}]*"flops"\s*:\s*"?(\d+)')
_SHAPE_OPS = ("copy", "bitcast", "convert", "reshape", "transpose", "copy-start", "copy-done")


def _users(comp: Computation) -> dict[str, list[Instruction]]:
  users = defaultdict(list)
  for ins in comp.instructions.values():
    for o in ins.operands:
      users[o].append(ins)
  return users


def _fused(comps: dict[str, Computation], ins: Instruction) -> Computation | None:
  m = re.search(r"\bcalls=%?([\w.\-]+)", ins.attrs)
  return comps.get(m.group(1)) if m and ins.opcode == "fusion" else None


def _fusion_bodies(comps: dict[str, Computation]) -> set[str]:
  """Names of the computations that fusions call."""
  return {f.name for c in comps.values() for i in c.instructions.values() if (f := _fused(comps, i)) is not None}


def _made_by_dus(comps, comp: Computation, name: str) -> bool:
  """Whether `name` is a dynamic-update-slice (a shard written into a buffer), or a fusion rooted at one."""
  ins = comp.instructions.get(name)
  while ins is not None and ins.opcode in _SHAPE_OPS and ins.operands:
    ins = comp.instructions.get(ins.operands[0])
  if ins is None:
    return False
  if ins.opcode == "dynamic-update-slice":
    return True
  fused = _fused(comps, ins)
  return fused is not None and _made_by_dus(comps, fused, fused.root or "")


def _only_sliced(comps, comp: Computation, users, name: str, depth: int = 0) -> bool:
  """Whether every use of `name` takes a dynamic-slice of it (directly, through shape ops, or in a
  fusion that dynamic-slices the matching parameter)."""
  uses = users.get(name, [])
  if not uses or depth > 8:
    return False
  for u in uses:
    if u.opcode == "dynamic-slice" and u.operands[0] == name:
      continue
    if u.opcode in _SHAPE_OPS + ("get-tuple-element", "all-reduce-done"):
      if _only_sliced(comps, comp, users, u.name, depth + 1):
        continue
      return False
    fused = _fused(comps, u)
    if fused is None:
      return False
    params = {int(i.args): i.name for i in fused.instructions.values() if i.opcode == "parameter"}
    positions = [k for k, o in enumerate(u.operands) if o == name]
    if not all(k in params and _only_sliced(comps, fused, _users(fused), params[k], depth + 1) for k in positions):
      return False
  return True


def _tuple_users_sliced(comps, comp: Computation, users, name: str, index: int) -> bool:
  """Whether every use of element `index` of a tuple-shaped collective `name` dynamic-slices it."""
  outs = [name] + [u.name for u in users.get(name, []) if u.opcode == "all-reduce-done"]
  gtes = [u for o in outs for u in users.get(o, [])
          if u.opcode == "get-tuple-element" and re.search(rf"\bindex={index}\b", u.attrs)]
  return bool(gtes) and all(_only_sliced(comps, comp, users, g.name) for g in gtes)


def _all_reduce_pieces(comps, comp: Computation, users, ins: Instruction) -> list[tuple[str, float]]:
  """(kind, buffer bytes) of each operand of an all-reduce: the combiner packs several into one
  tuple all-reduce, gathers in disguise beside gradient reductions."""
  if len(ins.operands) <= 1:
    nbytes = max([type_bytes(ins.type_text)] + [type_bytes(comp.instructions[o].type_text) for o in ins.operands
                                                 if o in comp.instructions])
    if ins.operands and _made_by_dus(comps, comp, ins.operands[0]):
      return [("all-gather-as-all-reduce", nbytes)]
    if _only_sliced(comps, comp, users, ins.name):
      return [("reduce-scatter-as-all-reduce", nbytes)]
    return [("all-reduce", nbytes)]
  pieces = []
  for k, o in enumerate(ins.operands):
    nbytes = type_bytes(comp.instructions[o].type_text) if o in comp.instructions else 0.0
    if _made_by_dus(comps, comp, o):
      pieces.append(("all-gather-as-all-reduce", nbytes))
    elif _tuple_users_sliced(comps, comp, users, ins.name, k):
      pieces.append(("reduce-scatter-as-all-reduce", nbytes))
    else:
      pieces.append(("all-reduce", nbytes))
  return pieces


def _all_reduce_scatter_body(comps, ins: Instruction) -> Instruction | None:
  """The all-reduce inside a `kind=kCustom` fusion calling an `%all-reduce-scatter` computation."""
  fused = _fused(comps, ins)
  if fused is None or "kind=kCustom" not in ins.attrs or not fused.name.startswith("all-reduce-scatter"):
    return None
  return next((i for i in fused.instructions.values() if i.opcode in ("all-reduce", "all-reduce-start")), None)


@dataclasses.dataclass
class Summary:
  flops: float  # matmul FLOPs per step, per chip (Pallas kernels included)
  kernel_flops: float  # of which Pallas kernels (their cost estimates)
  collectives: dict[str, dict[str, float]]  # kind -> {'count', 'bytes', 'wire'} per step, per chip
  largest: list[dict]  # the biggest collectives: kind, bytes, wire, group size, times per step, op name
  unknown_trip_counts: list[str]
  items: list[dict] = dataclasses.field(default_factory=list)  # every collective, as in `largest`

  @property
  def wire_bytes(self) -> float:
    return sum(v["wire"] for v in self.collectives.values())


def _num_devices(text: str) -> int | None:
  m = re.search(r"num_partitions=(\d+)", text[:4000])
  r = re.search(r"replica_count=(\d+)", text[:4000])
  return int(m.group(1)) * (int(r.group(1)) if r else 1) if m else None


def summarize(text: str, top: int = 12) -> Summary:
  """Per-step matmul FLOPs and collectives of a compiled module's text (`compiled.as_text()`)."""
  comps, entry = parse(text)
  mult, unknown = multipliers(comps, entry)
  devices = _num_devices(text)
  flops = kernel_flops = 0.0
  totals: dict[str, dict[str, float]] = {}
  items = []
  # libtpu's async collective fusion (LIBTPU_INIT_ARGS, moe_jax/tpu_flags.py) clones one collective
  # into the fused computations of its start, continuations and done, under one channel id: a
  # collective inside a fusion body counts once per channel id.
  fused, seen_channels = _fusion_bodies(comps), set()
  inner = {_fused(comps, i).name for c in comps.values() for i in c.instructions.values()  # counted at the fusion
           if _all_reduce_scatter_body(comps, i) is not None}
  for comp in comps.values():
    times = mult.get(comp.name, 0.0)
    if not times or comp.name in inner:
      continue
    users = None
    for ins in comp.instructions.values():
      if ins.opcode in ("dot", "convolution"):
        flops += times * matmul_flops(comp, ins)
        continue
      if ins.opcode == "custom-call":
        m = _KERNEL_FLOPS.search(ins.attrs)
        if m:
          kernel_flops += times * float(m.group(1))
        continue
      kind, attrs = _collective_kind(ins), ins.attrs
      if kind is None and ins.opcode == "fusion":
        body = _all_reduce_scatter_body(comps, ins)
        if body is None:
          continue
        attrs = body.attrs
        pieces = [("reduce-scatter", type_bytes(body.type_text))]  # the (padded) buffer the fused collective reduces
      elif kind is None:
        continue
      elif kind == "all-reduce":
        users = users if users is not None else _users(comp)
        pieces = _all_reduce_pieces(comps, comp, users, ins)
      else:
        result = type_bytes(ins.type_text)
        if ins.opcode.endswith("-start"):  # async: the result tuple holds the operand(s) and the output
          result = max((DTYPE_BYTES[dt] * math.prod(s) for dt, s in arrays(ins.type_text)), default=0.0)
        operand = sum(type_bytes(comp.instructions[o].type_text) for o in ins.operands
                      if o in comp.instructions and comp.instructions[o].opcode != "after-all")
        pieces = [(kind, max(result, operand))]
      channel = re.search(r"channel_id=(\d+)", attrs) if comp.name in fused else None
      if channel:
        if channel.group(1) in seen_channels:
          continue
        seen_channels.add(channel.group(1))
      group = group_size(attrs, devices)
      name = re.search(r'op_name="([^"]*)"', ins.attrs)
      merged: dict[str, float] = {}
      for kind, nbytes in pieces:
        merged[kind] = merged.get(kind, 0.0) + nbytes
      for kind, nbytes in merged.items():  # one op counts once per kind it carries
        wire = nbytes * wire_factor(kind, group)
        t = totals.setdefault(kind, {"count": 0.0, "bytes": 0.0, "wire": 0.0})
        t["count"] += times
        t["bytes"] += times * nbytes
        t["wire"] += times * wire
        items.append({"kind": kind, "bytes": nbytes, "wire": wire, "times": times, "group": group,
                      "op": name.group(1)[-120:] if name else ins.name})
  items.sort(key=lambda d: -d["bytes"] * d["times"])
  return Summary(flops + kernel_flops, kernel_flops, totals, items[:top], unknown, items)


_ASYNC_START = re.compile(r"^(async-collective-start|all-gather-start|all-reduce-start|reduce-scatter-start|"
                          r"collective-permute-start)")
_COMPUTE = ("fusion", "convolution", "dot", "custom-call")


def async_collectives(text: str) -> dict[str, float]:
  """How the schedule overlaps collectives with compute, per step (loop trips counted).

  'async': collective starts (libtpu's async collective fusions, `*-start` ops); 'overlapped':
  those with compute (a fusion, matmul or kernel) scheduled before the next collective done in
  the same computation (an optimized module is scheduled: its instruction order is the order they
  run); 'sync_gathers': all-gathers outside any async collective, which wait for the wire.
  """
  comps, entry = parse(text)
  mult, _ = multipliers(comps, entry)
  fused = _fusion_bodies(comps)
  out = {"async": 0.0, "overlapped": 0.0, "sync_gathers": 0.0}
  for comp in comps.values():
    times = mult.get(comp.name, 0.0)
    if not times:
      continue
    order = list(comp.instructions.values())
    for i, ins in enumerate(order):
      if ins.opcode == "all-gather" and comp.name not in fused:
        out["sync_gathers"] += times
      if not _ASYNC_START.match(ins.name) and not (ins.opcode.endswith("-start") and _ASYNC_START.match(ins.opcode)):
        continue
      out["async"] += times
      for later in order[i + 1:]:
        if later.opcode.endswith("-done") or later.name.startswith("async-collective-done"):
          break
        if later.opcode in _COMPUTE and not later.name.startswith("async-collective"):
          out["overlapped"] += times
          break
  return out


def main(argv=None) -> int:
  """python -m moe_jax.hlo DUMP.txt: the summary of an optimized module's text (an XLA dump's
  *.after_optimizations.txt) as one JSON line: FLOPs, collectives per kind (count, buffer and
  wire GB per chip per step), unknown trip counts, the largest collectives."""
  import json
  import sys
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 1:
    print("usage: python -m moe_jax.hlo MODULE.txt", file=sys.stderr)
    return 2
  try:
    text = open(args[0]).read()
  except OSError as e:
    print(f"error: {args[0]}: {e.strerror}", file=sys.stderr)
    return 2
  s = summarize(text)
  gb = lambda b: round(b / 1e9, 3)  # noqa: E731
  print(json.dumps({"flops": float(f"{s.flops:.4g}"), "kernel_flops": float(f"{s.kernel_flops:.4g}"),
                    "collectives": {k: {"count": int(v["count"]), "gb": gb(v["bytes"]), "wire_gb": gb(v["wire"])}
                                    for k, v in sorted(s.collectives.items())},
                    "wire_gb": gb(s.wire_bytes), "unknown_trip_counts": len(s.unknown_trip_counts),
                    "largest": [{"kind": i["kind"], "gb": gb(i["bytes"]), "times": i["times"], "group": i["group"],
                                 "op": i["op"][-80:]} for i in s.largest[:8]]}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
