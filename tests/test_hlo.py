"""moe_jax/hlo.py's reading of compiled programs: collective forms, group sizes, wire bytes, trip counts.

The main rules are checked on small programs compiled by libtpu for real TPU topologies
(compile-only devices, nothing runs), whose answers are known from their shapes; the rarer
textual forms (a loop's start and step, the mesh group form with a device order) on short
HLO snippets in the form libtpu prints them.
"""

import functools
import os

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from moe_jax import aot, hlo, sharding  # noqa: E402

BF16 = 2


@functools.lru_cache(maxsize=None)
def _mesh(topology: str) -> Mesh:
  devices = aot.parse_topology(topology).devices()
  return Mesh(np.array(devices).reshape(2, len(devices) // 2), ("a", "b"))


def _shard_map(topology, fn, shape, in_spec, out_spec, dtype=jnp.bfloat16):
  mesh = _mesh(topology)
  arg = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, in_spec))
  f = jax.shard_map(fn, mesh=mesh, in_specs=(in_spec,), out_specs=out_spec, check_vma=False)
  return hlo.summarize(jax.jit(f).lower(arg).compile().as_text())


def _only(summary, kind):
  assert set(summary.collectives) == {kind}, summary.collectives
  (item,) = [i for i in summary.items if i["kind"] == kind]
  return summary.collectives[kind], item


def test_fsdp_weight_on_a_whole_slice_is_gathered_and_reduced_by_all_reduces():
  """GSPMD, one matmul whose [1024, 2048] weight is cut 64 ways over all of v5p-128 (64 chips): the
  forward gathers it as dynamic-update-slice + all-reduce, the gradient reduce-scatters as
  all-reduce + dynamic-slice; each is told apart and costs a ring all-reduce on the wire."""
  mesh = _mesh("v5p-128")
  cut = NamedSharding(mesh, P(("a", "b")))
  x = jax.ShapeDtypeStruct((64 * 8, 1024), jnp.bfloat16, sharding=cut)
  w = jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16, sharding=cut)
  grad = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=1)
  s = hlo.summarize(jax.jit(grad, out_shardings=cut).lower(x, w).compile().as_text())
  buffer = 1024 * 2048 * BF16
  assert set(s.collectives) == {"all-gather-as-all-reduce", "reduce-scatter-as-all-reduce"}, s.collectives
  for kind in s.collectives:
    assert s.collectives[kind]["count"] == 1 and s.collectives[kind]["bytes"] == buffer
    assert s.collectives[kind]["wire"] == pytest.approx(2 * 63 / 64 * buffer)
  assert {i["group"] for i in s.items} == {64}
  assert s.wire_bytes == pytest.approx(4 * 63 / 64 * buffer)


def test_sub_group_reduce_scatter_is_a_reduce_scatter():
  """psum_scatter over 4 of v5p-16's 8 chips compiles to a kCustom fusion calling
  %all-reduce-scatter (an all-reduce inside): one reduce-scatter, no all-reduce; over 32 of
  v5p-128's 64 chips to a native reduce-scatter. Wire: (n-1)/n of the buffer."""
  scatter = lambda x: jax.lax.psum_scatter(x, "b", scatter_dimension=0, tiled=True)  # noqa: E731
  s = _shard_map("v5p-16", scatter, (1024, 4096), P(), P(("a", "b")))
  assert "all-reduce" not in s.collectives and s.collectives["reduce-scatter"]["count"] == 1, s.collectives
  (item,) = [i for i in s.items if i["kind"] == "reduce-scatter"]
  assert item["group"] == 4
  assert 1024 * 4096 * BF16 <= item["bytes"] <= 1.2 * 1024 * 4096 * BF16  # the fusion pads its buffer
  assert item["wire"] == pytest.approx(3 / 4 * item["bytes"])
  total, item = _only(_shard_map("v5p-128", scatter, (1024, 4096), P(), P(("a", "b"))), "reduce-scatter")
  assert total["bytes"] == 1024 * 4096 * BF16 and item["group"] == 32
  assert total["wire"] == pytest.approx(31 / 32 * 1024 * 4096 * BF16)


def test_whole_slice_reduce_scatter_is_an_all_reduce_in_disguise():
  s = _shard_map("v5p-16", lambda x: jax.lax.psum_scatter(x, ("a", "b"), scatter_dimension=0, tiled=True),
                 (1024, 4096), P(), P(("a", "b")))
  total, item = _only(s, "reduce-scatter-as-all-reduce")
  assert total["bytes"] == 1024 * 4096 * BF16 and item["group"] == 8
  assert total["wire"] == pytest.approx(2 * 7 / 8 * 1024 * 4096 * BF16)


def test_all_reduce_and_all_to_all_wire_bytes():
  total, item = _only(_shard_map("v5p-16", lambda x: jax.lax.psum(x, ("a", "b")), (1024, 4096), P(), P()),
                      "all-reduce")
  assert item["group"] == 8 and total["wire"] == pytest.approx(2 * 7 / 8 * 1024 * 4096 * BF16)
  total, item = _only(_shard_map("v5p-16", lambda x: jax.lax.all_to_all(x, "b", 0, 0, tiled=True),
                                 (1024, 4096), P(), P()), "all-to-all")
  assert item["group"] == 4 and total["wire"] == pytest.approx(3 / 4 * 1024 * 4096 * BF16)
  total, item = _only(_shard_map("v5p-16", lambda x: jax.lax.all_gather(x, "b", axis=0, tiled=True),
                                 (1024, 4096), P(("a", "b")), P("a")), "all-gather")
  assert item["group"] == 4 and total["bytes"] == 512 * 4096 * BF16
  assert total["wire"] == pytest.approx(3 / 4 * 512 * 4096 * BF16)


def test_scan_counts_its_trips_from_the_compiled_loop():
  mesh = _mesh("v5p-16")
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
  step = lambda c, _: (jnp.tanh(c @ c), None)  # noqa: E731
  for length in (3, 7):
    s = hlo.summarize(jax.jit(lambda x: jax.lax.scan(step, x, None, length=length)[0]).lower(x).compile().as_text())
    assert s.flops == length * 2 * 256 ** 3 and not s.unknown_trip_counts


_LOOP = """HloModule m, num_partitions=8

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %step = s32[] constant(STEP)
  %next = s32[] OP(%i, %step)
  %x = f32[4] get-tuple-element(%p), index=1
  %ag = f32[8] all-gather(%x), replica_groups=GROUPS, dimensions={0}
  %y = f32[4] slice(%ag), slice={[0:4]}
  ROOT %t = (s32[], f32[4]) tuple(%next, %y)
}

%cond (q: (s32[], f32[4])) -> pred[] {
  %q = (s32[], f32[4]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(LIMIT)
  ROOT %lt = pred[] compare(%j, %n), direction=DIR
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %zero = s32[] constant(START)
  %c = s32[] copy(%zero)
  %init = (s32[], f32[4]) tuple(%c, %a)
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4] get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("start,step,op,limit,direction,trips", [
    (0, 1, "add", 8, "LT", 8),
    (0, 2, "add", 8, "LT", 4),  # a windowed-einsum loop: two shards a trip
    (1, 2, "add", 8, "LT", 4),  # 1, 3, 5, 7
    (1, 2, "add", 7, "LT", 3),
    (0, 2, "add", 8, "LE", 5),
    (10, 3, "subtract", 0, "GT", 4),  # 10, 7, 4, 1
    (0, 3, "add", 9, "NE", 3),
    (5, 1, "add", 2, "LT", 0),
])
def test_trip_count_reads_start_and_step(start, step, op, limit, direction, trips):
  text = (_LOOP.replace("STEP", str(step)).replace("OP", op).replace("LIMIT", str(limit))
          .replace("DIR", direction).replace("START", str(start)).replace("GROUPS", "{{0,1},{2,3},{4,5},{6,7}}"))
  s = hlo.summarize(text)
  assert not s.unknown_trip_counts
  assert s.collectives.get("all-gather", {"count": 0})["count"] == trips


@pytest.mark.parametrize("groups,size", [
    ("{{0,1},{2,3},{4,5},{6,7}}", 2),
    ("[2,4]<=[8]", 4),
    ("mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", 4),
    ("mesh['x'=2,'y'=4], device_ids=([4,2]T(1,0)) {'x','y'}", 8),
    ("mesh['x'=2,'y'=4], device_ids=([4,2]T(1,0)) {'y'}", 4),
    ("{}", 8),  # every device: num_partitions
])
def test_group_sizes_in_every_form(groups, size):
  text = (_LOOP.replace("STEP", "1").replace("OP", "add").replace("LIMIT", "1").replace("DIR", "LT")
          .replace("START", "0").replace("GROUPS", groups))
  (item,) = hlo.summarize(text).items
  assert item["group"] == size
  assert item["wire"] == pytest.approx((size - 1) / size * 8 * 4)


def test_unreadable_loop_counts_once_and_is_reported():
  text = (_LOOP.replace("STEP", "1").replace("OP", "multiply").replace("LIMIT", "8").replace("DIR", "LT")
          .replace("START", "1").replace("GROUPS", "{{0,1}}"))
  s = hlo.summarize(text)
  assert s.unknown_trip_counts == ["w"] and s.collectives["all-gather"]["count"] == 1


@pytest.mark.parametrize("start,trips", [(0, 1), (1, 0)])
def test_data_dependent_limit_counts_as_one_round(start, trips):
  """The 'ep' exchange's rounds loop: its limit is computed (pmax of the routing); it counts as 1 round,
  so a loop over the rounds after a first one written out (start 1) counts 0 times. Reported either way."""
  text = (_LOOP.replace("%n = s32[] constant(LIMIT)", "%n = s32[] convert(%j)").replace("STEP", "1")
          .replace("OP", "add").replace("DIR", "LT").replace("START", str(start)).replace("GROUPS", "{{0,1}}"))
  s = hlo.summarize(text)
  assert s.unknown_trip_counts == ["w"]
  assert s.collectives.get("all-gather", {"count": 0})["count"] == trips


def _head_reductions(text: str, d: int, v: int) -> int:
  """Gradient reductions of the output head in an optimized module: operands of an all-reduce or
  reduce-scatter (CPU combines them into one tuple all-reduce) of shape [D, V] (or [V, D]) made
  by a matmul (the embedding's [V, D] gradient is a scatter-add)."""
  comps, _ = hlo.parse(text)
  found = 0
  for comp in comps.values():
    for ins in comp.instructions.values():
      if ins.opcode.removesuffix("-start") in ("all-reduce", "reduce-scatter"):
        for o in ins.operands:
          shape = hlo.shape_of(comp, o)
          found += (shape is not None and sorted(shape) == sorted((d, v))
                    and "dot_general" in comp.instructions[o].attrs)
  return found


def test_head_and_mtp_head_reduce_one_summed_gradient():
  """DeepSeek-V3's MTP depth shares the output head: the train step reduces its [D, V] gradient
  once (one summed dot), not once per depth. Pure data parallelism over 8 CPU devices, where
  the head is replicated and its gradient all-reduced: 1 reduction with the MTP depth on. A
  control with two separate head matmuls compiles to 2, so the count can tell them apart."""
  from moe_jax import train as train_lib
  from moe_jax.config import tiny
  cpu = jax.devices("cpu")
  config = train_lib.base_config(tiny(num_nextn_predict_layers=1, vocab_size=384, num_hidden_layers=1), "tiny")
  config.mesh.update(data=8, fsdp=1, expert=1, tensor=1)
  config.batch_size = 8
  trainer = train_lib.Trainer(config, devices=cpu)
  d, v = trainer.mcfg.hidden_size, trainer.mcfg.vocab_size
  assert _head_reductions(trainer.step_fn.as_text(), d, v) == 1
  mesh = Mesh(np.array(cpu[:8]), ("data",))
  h = jax.ShapeDtypeStruct((8, 16, d), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  w = jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=NamedSharding(mesh, P()))
  two = jax.grad(lambda h, g, w: jnp.sum(jnp.tanh(h @ w)) + jnp.sum(jnp.tanh(g @ w)), argnums=2)
  assert _head_reductions(jax.jit(two).lower(h, h, w).compile().as_text(), d, v) == 2


def test_embedding_lookup_stays_inside_the_groups_that_shard_its_table():
  """The table [vocab, embed] with embed cut over `expert` (4) and copied over `fsdp` (2), tokens on
  fsdp x expert (8 CPU devices): the lookup's collectives are the all-to-all of its rows inside
  `expert` and the all-reduce of the gradient's shard over `fsdp`; none spans all 8 devices (a
  lookup in the tokens' layout gathers its fp32 cotangent over all 8 to scatter-add a whole table)."""
  from moe_jax import train as train_lib
  from moe_jax.config import tiny
  config = train_lib.base_config(tiny(num_nextn_predict_layers=1, vocab_size=8192, num_hidden_layers=1), "tiny")
  config.mesh.update(data=1, fsdp=2, expert=4, tensor=1)
  # the TPU layout (sharding.layout_rules) on these CPU devices
  config.mesh.rules = [r for r in sharding.layout_rules(dict(config.mesh), "tpu") if r[0] in sharding.ZERO_NAMES]
  assert config.mesh.rules[0] == ("embed", "expert")
  config.batch_size = 8
  trainer = train_lib.Trainer(config, devices=jax.devices("cpu"))
  s = hlo.summarize(trainer.step_fn.as_text())
  lookup = [(i["kind"], i["group"]) for i in s.items if "embed_tokens" in i["op"]]
  assert ("all-to-all", 4) in lookup and ("all-reduce", 2) in lookup, lookup
  assert all(group < 8 for _, group in lookup), lookup


def test_head_gradient_is_a_reduce_scatter_then_an_all_reduce_of_the_shard():
  """The head [D, V] with D cut over `expert` (4) and copied over `fsdp` (2) (the TPU layout), tokens
  on fsdp x expert: its gradient is reduce-scattered over the 4 and only the 1/4 shard is all-reduced
  over the 2 (model.head_matmul). GSPMD alone all-reduced the whole [D, V] over the 4, then sliced."""
  from moe_jax import train as train_lib
  from moe_jax.config import tiny
  config = train_lib.base_config(tiny(num_nextn_predict_layers=1, vocab_size=384, num_hidden_layers=1), "tiny")
  config.mesh.update(data=1, fsdp=2, expert=4, tensor=1)
  config.mesh.rules = [r for r in sharding.layout_rules(dict(config.mesh), "tpu") if r[0] in sharding.ZERO_NAMES]
  config.batch_size = 8
  trainer = train_lib.Trainer(config, devices=jax.devices("cpu"))
  d, v = trainer.mcfg.hidden_size, trainer.mcfg.vocab_size
  s = hlo.summarize(trainer.step_fn.as_text())
  head = [(i["kind"], i["group"], i["bytes"]) for i in s.items if "kbsd,dv->kbsv" in i["op"] or "reduce_scatter" in i["op"]
          and i["bytes"] == d * v * 4]
  assert ("reduce-scatter", 4, d * v * 4) in head, head  # fp32 (tiny computes in fp32)
  assert not [h for h in head if "all-reduce" in h[0] and h[2] >= d * v * 4], head
  shard = [i for i in s.items if i["kind"] == "all-reduce" and i["group"] == 2 and i["bytes"] >= d * v * 4 // 4]
  assert shard, [(i["kind"], i["group"], i["bytes"], i["op"][-60:]) for i in s.items]


def test_head_gradient_in_pieces_equals_the_one_device_gradient(monkeypatch):
  """model.head_matmul on fsdp 2 x expert 4 (TPU layout) with the reduce-scatter cut into 3 column
  pieces (SCATTER_PIECE_BYTES lowered) gives the one-device gradients within 1e-5, in 3 reduce-scatters."""
  from moe_jax import model
  from moe_jax.config import tiny
  cfg = tiny(vocab_size=384)  # fp32; 3 tiles of 128 columns
  mesh = sharding.make_mesh(1, 2, 4, 1)
  rules = sharding.layout_rules(dict(mesh.shape), "tpu")
  x = jax.random.normal(jax.random.key(0), (2, 8, 4, cfg.hidden_size))
  w = jax.random.normal(jax.random.key(1), (cfg.hidden_size, cfg.vocab_size)) * 0.1
  loss = lambda x, w: jnp.sum(jnp.tanh(model.head_matmul(x, w, cfg)) ** 2)  # noqa: E731
  ref = jax.grad(loss, argnums=(0, 1))(x, w)
  monkeypatch.setattr(model, "SCATTER_PIECE_BYTES", 4096)
  with sharding.activation_rules(mesh, rules):
    x_s = jax.device_put(x, NamedSharding(mesh, P(None, ("data", "fsdp", "expert"))))
    w_s = jax.device_put(w, NamedSharding(mesh, P("expert", None)))
    step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x_s, w_s).compile()
    got = step(x_s, w_s)
  for a, b in zip(got, ref):  # within 1e-5 of the largest entry (fp32, another summation order)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
  scatters = [i for i in hlo.summarize(step.as_text()).items if i["kind"] == "reduce-scatter" and i["group"] == 4]
  assert len(scatters) == 3, scatters


# libtpu's async collective fusion (moe_jax/tpu_flags.py): one all-gather (channel 7) cloned into the
# start's and the done's fused computations; a matmul scheduled between them; one plain all-gather.
_ASYNC = """HloModule m, num_partitions=4

%gather_start (x: f32[2,8]) -> f32[8,8] {
  %x = f32[2,8] parameter(0)
  ROOT %ag = f32[8,8] all-gather(%x), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
}

%gather_done (y: f32[2,8]) -> f32[8,8] {
  %y = f32[2,8] parameter(0)
  ROOT %ag2 = f32[8,8] all-gather(%y), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
}

ENTRY %main (a: f32[2,8], b: f32[8,8]) -> (f32[8,8], f32[8,8], f32[8,8]) {
  %a = f32[2,8] parameter(0)
  %b = f32[8,8] parameter(1)
  %async-collective-start.1 = f32[8,8] fusion(%a), kind=kCustom, calls=%gather_start
  %mm = f32[8,8] dot(%b, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %async-collective-done = f32[8,8] fusion(%a), kind=kCustom, calls=%gather_done
  %plain = f32[8,8] all-gather(%a), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %out = (f32[8,8], f32[8,8], f32[8,8]) tuple(%async-collective-done, %mm, %plain)
}
"""


def test_async_collective_fusion_counts_each_gather_once_and_reports_overlap():
  s = hlo.summarize(_ASYNC)
  assert s.collectives["all-gather"]["count"] == 2  # the cloned one once, the plain one once
  assert s.collectives["all-gather"]["bytes"] == 2 * 8 * 8 * 4
  assert hlo.async_collectives(_ASYNC) == {"async": 1, "overlapped": 1, "sync_gathers": 1}
  no_compute = _ASYNC.replace("%mm = f32[8,8] dot(%b, %b)", "%mm = f32[8,8] copy(%b)").replace(
      ", lhs_contracting_dims={1}, rhs_contracting_dims={0}", "")
  assert hlo.async_collectives(no_compute) == {"async": 1, "overlapped": 0, "sync_gathers": 1}


_TUPLE = """HloModule m, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

ENTRY %main (a: f32[2,8], g: f32[8,8], n: f32[8], i: s32[]) -> (f32[8,8], f32[2,8], f32[8]) {
  %a = f32[2,8] parameter(0)
  %g = f32[8,8] parameter(1)
  %n = f32[8] parameter(2)
  %i = s32[] parameter(3)
  %z = f32[8,8] broadcast(f32[] constant(0)), dimensions={}
  %dus = f32[8,8] dynamic-update-slice(%z, %a, %i, %i)
  %c = f32[8,8] copy(%dus)
  %ar = (f32[8,8], f32[8,8], f32[8]) all-reduce(%c, %g, %n), replica_groups={{0,1,2,3}}, to_apply=%add
  %gathered = f32[8,8] get-tuple-element(%ar), index=0
  %reduced = f32[8,8] get-tuple-element(%ar), index=1
  %mine = f32[2,8] dynamic-slice(%reduced, %i, %i), dynamic_slice_sizes={2,8}
  %whole = f32[8] get-tuple-element(%ar), index=2
  ROOT %out = (f32[8,8], f32[2,8], f32[8]) tuple(%gathered, %mine, %whole)
}
"""


def test_a_combined_all_reduce_is_split_by_operand():
  """XLA's combiner packs a gather in disguise, a reduce-scatter in disguise and a true
  all-reduce into one tuple all-reduce: each operand is counted under its own kind."""
  s = hlo.summarize(_TUPLE)
  assert {k: (v["count"], v["bytes"]) for k, v in s.collectives.items()} == {
      "all-gather-as-all-reduce": (1, 256), "reduce-scatter-as-all-reduce": (1, 256), "all-reduce": (1, 32)}
  assert s.wire_bytes == pytest.approx(2 * 3 / 4 * (256 + 256 + 32))
