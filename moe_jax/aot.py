"""Compile the real train step for a TPU topology from any host, and say what a pod would run.

  python -m moe_jax.aot --config=configs/deepseek_v3.py --topology=v5p-512 --mesh=1,8,32,1 \\
      [--num_slices=N --dcn=d,f,e,t] [--layers=N] [--seq=S] [--batch=B] [--set model.moe_gmm=pallas ...]

libtpu compiles for a TPU topology without a TPU (`jax.experimental.topologies`): the devices
are compile-only, so nothing is materialized. The tool builds the same Trainer train.py builds
(mesh, rules, shardings, donation), lowers its train step on abstract inputs, compiles it, and
prints one JSON line:
  topology, chips, hosts, mesh; compiled, compile_s; per-chip argument / output / temp / peak
  (and host_temp: pinned host memory) bytes against the chip's HBM (fits); compiled matmul FLOPs
  per step (scanned loops counted their full trip count, moe_jax/hlo.py) and XLA's cost_analysis
  figure, against the model FLOPs of moe_jax/flops.py; per collective kind the count and bytes per
  step per chip, and their total against the layout's ideal (ideal_collectives), in buffer bytes
  and in wire bytes under the ring model (wire_gb, ideal_wire_gb, wire_ratio; the compiler's disguised gathers and
  reduce-scatters split out, moe_jax/hlo.py), the weight-sized all-reduces over a whole slice
  that remain (whole_slice_all_reduces), how the schedule overlaps collectives with compute
  (async_collectives; train.py's libtpu flags, moe_jax/tpu_flags.py, apply here too), the axes
  the non-expert weights are cut over (non_expert_weights_over: sharding.layout_rules); and the
  data layout: every host's batch rows (each must be non-empty, all rows fed).

Topology names as Cloud TPU spells them: v5p-N (N TensorCores, N/2 chips: v5p-512 is 256 chips,
4x8x8), v5e-N and v6e-N (N chips), v4-N (N TensorCores), or libtpu's form "v5:4x4x4".
Errors (bad topology, mesh, config, a step that does not compile): one line, exit 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

from moe_jax.errors import UserError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Family:
  libtpu: str  # libtpu's name prefix
  cores_per_chip: int  # TensorCores per chip: Cloud TPU counts these in v4-N / v5p-N
  dims: int  # torus dimensions
  hbm_bytes: int  # per chip
  chip_config: Optional[str] = None  # 'megacore': one device per chip (both cores)


FAMILIES = {
    "v4": Family("v4", 2, 3, 32 * GiB, "megacore"),
    "v5p": Family("v5", 2, 3, 95 * GiB, "megacore"),
    "v5e": Family("v5e", 1, 2, 16 * GiB),
    "v6e": Family("v6e", 1, 2, 32 * GiB),
}
LIBTPU_NAMES = {f.libtpu: name for name, f in FAMILIES.items()}
CHIPS_PER_HOST = 4  # multi-host v4/v5p/v5e/v6e slices: 2x2 chips per host


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as the user typed it
  family: str
  shape: tuple[int, ...]  # chips along each torus axis
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{FAMILIES[self.family].libtpu}:{'x'.join(map(str, self.shape))}"

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host along x, y, z: 2x2 on a pod; single-host v5e/v6e slices hold up to 8 (2x4)."""
    chips = math.prod(self.shape)
    if FAMILIES[self.family].dims == 2 and chips <= 8:
      return (self.shape[0], self.shape[1], 1)
    if chips < CHIPS_PER_HOST:
      return tuple(self.shape) + (1,) * (3 - len(self.shape))
    return (2, 2, 1)

  def devices(self):
    # Compile-only use of libtpu: several processes (a test runner's workers, another compile)
    # may load it at once; without this the second one fails on libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    fam = FAMILIES[self.family]
    kw = {"chip_config_name": fam.chip_config} if fam.chip_config else {}
    try:
      return topologies.get_topology_desc(self.libtpu_name, "tpu", chips_per_host_bounds=self.host_bounds,
                                          num_slices=self.num_slices, **kw).devices
    except Exception as e:  # libtpu's refusal of a shape
      raise UserError(f"--topology={self.name}: libtpu cannot build {self.libtpu_name} "
                      f"({str(e).splitlines()[0][:200]})") from None


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's slice shape for a chip count: below a full 2x..x2 cube the first axes fill first
  (v5p-8: 2x2x1, v4-8: 2x2x1); from there double the smallest axis, last first (v5p-512: 4x8x8)."""
  if chips < 1 or chips & (chips - 1):
    raise UserError(f"{chips} chips: slices of a power-of-two chip count only (or give libtpu's form, e.g. v5:4x4x6)")
  shape = [1] * dims
  while math.prod(shape) < chips:
    if chips < 2 ** dims:
      i = shape.index(1)
    else:
      i = max(range(dims), key=lambda k: (-shape[k], k))
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v5p-512' | 'v5e-16' | 'v6e-256' | 'v4-64' | 'v5:4x4x4' -> Topology."""
  known = ", ".join(f"{k}-N" for k in FAMILIES) + ", or libtpu's form like v5:4x4x4 / v6e:4x4"
  if num_slices < 1:
    raise UserError(f"--num_slices={num_slices} must be >= 1")
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip())
  if m:
    family, n = m.group(1), int(m.group(2))
    if family not in FAMILIES:
      raise UserError(f"--topology={name}: unknown TPU family {family!r}; use {known}")
    fam = FAMILIES[family]
    if n % fam.cores_per_chip:
      raise UserError(f"--topology={name}: {family}-N counts TensorCores ({fam.cores_per_chip} per chip); "
                      f"N must be a multiple of {fam.cores_per_chip}")
    return Topology(name, family, default_shape(n // fam.cores_per_chip, fam.dims), num_slices)
  m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name.strip())
  if m and m.group(1) in LIBTPU_NAMES:
    family = LIBTPU_NAMES[m.group(1)]
    shape = tuple(int(v) for v in m.group(2).split("x"))
    if len(shape) != FAMILIES[family].dims or min(shape) < 1:
      raise UserError(f"--topology={name}: {family} is a {FAMILIES[family].dims}-D torus, e.g. "
                      f"{FAMILIES[family].libtpu}:{'x'.join(['4'] * FAMILIES[family].dims)}")
    return Topology(name, family, shape, num_slices)
  raise UserError(f"--topology={name!r} is not a TPU topology name; use {known}")


# --- the config -----------------------------------------------------------------------------
def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config, assignments: Sequence[str]):
  """`field.sub=value` strings onto a ConfigDict (values parsed as Python literals, else strings)."""
  for item in assignments:
    key, eq, text = item.partition("=")
    if not eq:
      raise UserError(f"--set {item!r}: expected field=value, e.g. model.moe_gmm=pallas")
    *parents, leaf = key.strip().split(".")
    node = config
    for p in parents:
      if p not in node:
        raise UserError(f"--set {item!r}: the config has no field {key!r}")
      node = node[p]
    if leaf not in node:
      raise UserError(f"--set {item!r}: the config has no field {key!r} (fields here: {sorted(node.keys())})")
    value = _value(text)
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise UserError(f"--set {item!r}: {e}") from None
  return config


def sizes(text: str, what: str) -> tuple[int, int, int, int]:
  try:
    vals = tuple(int(v) for v in text.split(","))
  except ValueError:
    vals = ()
  if len(vals) != 4:
    raise UserError(f"--{what}={text!r}: give 4 integers data,fsdp,expert,tensor (-1 fills), e.g. 1,8,32,1")
  return vals


# --- the data layout -------------------------------------------------------------------------
def data_layout(mesh, global_batch: int, rules) -> dict[str, Any]:
  """Every process's batch rows on this mesh; fails when a process has none or a row is unfed."""
  import numpy as np
  from moe_jax import sharding
  processes = sorted({d.process_index for d in mesh.devices.flat})
  fed = np.zeros(global_batch, bool)
  per_process = {}
  for p in processes:
    rows = sharding.process_rows(mesh, global_batch, rules, p)
    fed[rows] = True
    per_process[p] = rows
  if not fed.all():
    raise UserError(f"data layout: batch rows {np.flatnonzero(~fed)[:8].tolist()} are fed by no process")
  counts = sorted({len(r) for r in per_process.values()})
  contiguous = all(r[-1] - r[0] + 1 == len(r) for r in per_process.values())
  return {"hosts": len(processes), "rows_per_host": counts if len(counts) > 1 else counts[0],
          "contiguous": contiguous, "host0_rows": per_process[processes[0]][:8].tolist()}


# --- the ideal communication of the layout ---------------------------------------------------
def ideal_collectives(trainer, config) -> dict[str, float]:
  """Bytes per chip per step that the layout itself requires, in hlo.summarize's units (a
  collective's larger buffer: the gathered weight of an all-gather, the full input of a
  reduce-scatter, the buffer of an all-to-all or all-reduce):
    gather   every trained weight cut over the batch's (data-parallel) axes, all-gathered once,
             in the compute dtype (an expert stack's E dimension over 'expert' is expert
             parallelism, not gathered)
    reduce   its gradient reduce-scattered once, in the compute dtype; a weight replicated over a
             data-parallel axis instead has its gradient all-reduced there (the local shard)
    a2a      expert parallelism: per MoE layer the dispatch and the combine forward and their
             transposes backward, each the chip's tokens x top-k x hidden (no padding, no rounds)
  Recomputation under remat, dropless rounds and fp32 reductions are what the compiled program
  adds on top; the ratio compiled / ideal says how much.
  The same in wire bytes per chip under the ring model (hlo.wire_factor), keys 'wire_*': a
  gather or reduce-scatter over g chips sends (g-1)/g of the full buffer, the all-reduce of a
  shard replicated r times 2(r-1)/r of the shard, an all-to-all over e chips (e-1)/e.
  """
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from moe_jax import sharding, variables
  mcfg, sizes = trainer.mcfg, dict(trainer.mesh.shape)
  data_axes = sharding.batch_axes(trainer.rules)
  act = jnp.dtype(mcfg.compute_dtype).itemsize
  boxed = variables.abstract(mcfg)["params"]
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  gather = reduce = wire_gather = wire_reduce = 0.0
  moe_layers = 0
  for leaf, logical in zip(jax.tree.leaves(nn.unbox(boxed)), specs):
    dims = [sharding.spec_axes(a) for a in nn.logical_to_mesh_axes(tuple(logical), trainer.rules)]
    cut = math.prod(sizes[a] for axes in dims for a in axes)
    gathered = math.prod(sizes[a] for name, axes in zip(logical, dims) if name != "exp" for a in axes if a in data_axes)
    replicas = math.prod(sizes[a] for a in data_axes if not any(a in axes for axes in dims))
    if gathered > 1:  # this chip's slice gathered over the data-parallel axes, and its gradient scattered back
      gather += leaf.size / cut * gathered * act
      reduce += leaf.size / cut * gathered * act
      wire_gather += leaf.size / cut * (gathered - 1) * act
      wire_reduce += leaf.size / cut * (gathered - 1) * act
    if replicas > 1:
      reduce += leaf.size / cut * act
      wire_reduce += leaf.size / cut * act * 2 * (replicas - 1) / replicas
    if "exp" in logical:  # a routed-expert stack (gate, up or down)
      moe_layers += leaf.shape[list(logical).index("layers")] if "layers" in logical else 1
  moe_layers //= 3
  tokens = config.batch_size * config.seq_len / math.prod(sizes[a] for a in data_axes)
  a2a = 4 * moe_layers * tokens * mcfg.num_experts_per_tok * mcfg.hidden_size * act if sizes["expert"] > 1 else 0.0
  wire_a2a = a2a * (sizes["expert"] - 1) / sizes["expert"]
  return {"gather": gather, "reduce": reduce, "a2a": a2a, "total": gather + reduce + a2a,
          "wire_gather": wire_gather, "wire_reduce": wire_reduce, "wire_a2a": wire_a2a,
          "wire_total": wire_gather + wire_reduce + wire_a2a}


def whole_slice_all_reduces(summary, slice_chips: int, min_bytes: float = 2 ** 20) -> dict[str, Any]:
  """The all-reduces (in any form) over a whole slice of weight or gradient size (>= 1 MiB): the
  layout's gathers and reductions should run over sub-groups instead (the TPU compiler keeps a
  sub-group reduce-scatter or all-gather true, and turns a whole-slice one into all-reduces)."""
  found = [i for i in summary.items if "all-reduce" in i["kind"] and not i["kind"].startswith("dcn-")
           and (i["group"] or 0) >= slice_chips and i["bytes"] >= min_bytes]
  found.sort(key=lambda d: -d["bytes"] * d["times"])
  return {"count": int(sum(i["times"] for i in found)), "gb": round(sum(i["bytes"] * i["times"] for i in found) / 1e9, 3),
          "largest": [{"kind": i["kind"], "gb": round(i["bytes"] / 1e9, 3), "times": i["times"], "op": i["op"]}
                      for i in found[:6]]}


# --- compile ---------------------------------------------------------------------------------
def compile_step(config, topology: Topology) -> dict[str, Any]:
  """Builds the Trainer on the topology's compile-only devices and compiles its train step."""
  from moe_jax import flops, hlo, sharding
  from moe_jax.train import Trainer

  devices = topology.devices()
  trainer = Trainer(config, devices=devices)  # config and mesh errors are UserErrors already
  mesh, mcfg = trainer.mesh, trainer.mcfg
  layout = data_layout(mesh, config.batch_size, trainer.rules)
  t0 = time.perf_counter()
  compiled = trainer.step_fn
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  summary = hlo.summarize(text)
  chips = len(devices)
  hbm = FAMILIES[topology.family].hbm_bytes
  # What the runtime allocates: the live arguments, the outputs not aliased to a donated argument,
  # and the temp block (one allocation holding every intermediate, as XLA's buffer assignment packed it).
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  tokens = config.batch_size * config.seq_len
  model_flops = flops.train_flops_per_token(mcfg, config.seq_len) * tokens / chips
  ideal = ideal_collectives(trainer, config)
  gb = lambda b: round(b / 1e9, 3)  # noqa: E731
  return {
      "topology": topology.name, "libtpu": topology.libtpu_name, "num_slices": topology.num_slices,
      "chips": chips, "device_kind": devices[0].device_kind, "hosts": layout["hosts"],
      "mesh": dict(mesh.shape), "non_expert_weights_over": list(sharding.embed_axes(trainer.rules)),
      "layers": mcfg.num_hidden_layers, "seq": config.seq_len, "batch": config.batch_size,
      "grad_accum": config.optim.grad_accum, "moe_impl": mcfg.moe_impl,
      "compiled": True, "compile_s": round(compile_s, 1),
      "argument_gb": gb(mem.argument_size_in_bytes), "output_gb": gb(mem.output_size_in_bytes),
      "alias_gb": gb(mem.alias_size_in_bytes), "temp_gb": gb(mem.temp_size_in_bytes), "peak_gb": gb(peak),
      "xla_peak_gb": gb(getattr(mem, "peak_memory_in_bytes", 0)),
      "host_temp_gb": gb(getattr(mem, "host_temp_size_in_bytes", 0)),  # pinned host (remat gathered_offload)
      "hbm_gb": gb(hbm), "fits": peak <= hbm,
      "compiled_flops": float(f"{summary.flops:.4g}"), "kernel_flops": float(f"{summary.kernel_flops:.4g}"),
      "xla_cost_flops": float(f"{cost.get('flops', 0.0):.4g}"),
      "model_flops": float(f"{model_flops:.4g}"),
      "flops_ratio": round(summary.flops / model_flops, 4) if model_flops else None,
      "collectives": {k: {"count": int(v["count"]), "gb": gb(v["bytes"]), "wire_gb": gb(v["wire"])}
                      for k, v in sorted(summary.collectives.items())},
      "ideal_collectives_gb": {k: gb(v) for k, v in ideal.items() if not k.startswith("wire_")},
      "collectives_ratio": round(sum(v["bytes"] for v in summary.collectives.values()) / ideal["total"], 3)
                           if ideal["total"] else None,
      "wire_gb": gb(summary.wire_bytes),
      "ideal_wire_gb": {k[len("wire_"):]: gb(v) for k, v in ideal.items() if k.startswith("wire_")},
      "wire_ratio": round(summary.wire_bytes / ideal["wire_total"], 3) if ideal["wire_total"] else None,
      "whole_slice_all_reduces": whole_slice_all_reduces(summary, math.prod(topology.shape)),
      "async_collectives": hlo.async_collectives(text),
      "largest_collectives": [dict(d, bytes=int(d["bytes"]), wire=int(d["wire"])) for d in summary.largest[:6]],
      "unknown_trip_counts": len(summary.unknown_trip_counts),
      "data": layout,
  }


def build_config(args):
  from moe_jax import plan
  try:
    config = plan.load_config(args.config)
  except FileNotFoundError:
    raise UserError(f"--config={args.config}: no such file") from None
  except ValueError as e:
    raise UserError(f"--config={args.config}: {e}") from None
  if args.mesh:
    config.mesh.update(dict(zip(("data", "fsdp", "expert", "tensor"), sizes(args.mesh, "mesh"))))
  if args.dcn:
    config.mesh.update(dict(zip(("dcn_data", "dcn_fsdp", "dcn_expert", "dcn_tensor"), sizes(args.dcn, "dcn"))))
  elif args.num_slices > 1 and math.prod(config.mesh[k] for k in ("dcn_data", "dcn_fsdp", "dcn_expert",
                                                                    "dcn_tensor")) == 1:
    config.mesh.dcn_data = args.num_slices  # slices as data-parallel replicas unless told otherwise
  if args.seq is not None:
    config.seq_len = args.seq
  if args.batch is not None:
    config.batch_size = args.batch
    config.batch_ramp = ()  # a ramp ends at the config's batch; compile the one batch asked for
  apply_overrides(config, args.set or [])
  if config.get("init_from"):  # the model train.py would build: the checkpoint's shape (headers only)
    from moe_jax import init_from
    config, _ = init_from.resolve(config)
  if args.layers is not None:  # a proxy of the (resolved) model: its first N layers
    if args.layers < 1:
      raise UserError(f"--layers={args.layers} must be >= 1")
    m = config.model
    m.num_hidden_layers = args.layers
    m.first_k_dense_replace = min(m.first_k_dense_replace, args.layers)
  return config


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m moe_jax.aot", description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="configs/x.py[:variant]")
  ap.add_argument("--topology", required=True, help="v5p-N, v5e-N, v6e-N, v4-N, or libtpu's form (v5:4x4x4)")
  ap.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (default 1)")
  ap.add_argument("--mesh", help="data,fsdp,expert,tensor within a slice (-1 fills; default: the config's)")
  ap.add_argument("--dcn", help="data,fsdp,expert,tensor across slices (default: the config's, or "
                  "num_slices on data)")
  ap.add_argument("--layers", type=int, help="a proxy with this many layers (first_k_dense_replace kept)")
  ap.add_argument("--seq", type=int, help="sequence length (default: the config's seq_len)")
  ap.add_argument("--batch", type=int, help="global batch in sequences (default: the config's batch_size)")
  ap.add_argument("--set", action="append", metavar="FIELD=VALUE", help="config override, repeatable")
  ap.add_argument("--traceback", action="store_true", help="show the full traceback when the step fails to build")
  ap.add_argument("--step", default="train", choices=("train", "eval", "generate"),
                  help="train (default) | eval: the scoring step | generate: prefill + one decode step "
                       "(moe_jax/aot_steps.py; --batch defaults to one sequence per data shard)")
  ap.add_argument("--speculative", type=int, default=0, metavar="K",
                  help="with --step=generate: the speculative programs instead (prefill of the main and MTP "
                       "caches, and one verify + accept + draft step for K draft tokens; needs MTP)")
  ap.add_argument("--weights", default="auto", choices=("auto", "fp8", "dense"),
                  help="eval/generate weights: fp8 = e4m3 + 128x128 scales, dense = the compute dtype; "
                       "auto = fp8 for DeepSeek-V3 (released in FP8), else dense")
  args = ap.parse_args(argv)
  from moe_jax import tpu_flags
  tpu_flags.apply()  # what train.py compiles with (read when libtpu first loads in this process)
  try:
    topology = parse_topology(args.topology, args.num_slices)
    config = build_config(args)
    try:
      if args.speculative and args.step != "generate":
        raise UserError(f"--speculative={args.speculative} compiles the speculative generate programs: use it "
                        f"with --step=generate, not --step={args.step}")
      if args.step == "train":
        result = compile_step(config, topology)
      else:
        from moe_jax import aot_steps
        result = aot_steps.compile_inference(config, topology, args.step, args.weights, batch=args.batch,
                                                 speculative=args.speculative)
    except UserError:
      raise
    except Exception as e:  # tracing or XLA refused this config: what and where, in one line
      if args.traceback:
        raise
      msg = " ".join(str(e).split())[:400]
      raise UserError(f"the {args.step} step does not build for {topology.name} (mesh {args.mesh or 'from the config'}): "
                      f"{type(e).__name__}: {msg} (--traceback shows where)") from None
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
