"""hf.load_pretrained with shardings: each process reads only the boxes its devices hold.

Tiny random DeepSeek-V3/V2 models from transformers, saved over several safetensors files, in
fp32, bf16 and FP8 (128x128 blocks; widths 256/320 so shards cut blocks and edge blocks are
ragged). Loaded with shardings on the 8 forced CPU devices, every variable is bit-equal to
the unsharded load and has the sharding asked for. A 2-process run (this file as the worker)
checks that each process reads at most 60% of the checkpoint and gets the same values.
"""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh
from safetensors.numpy import save_file

from moe_jax import hf, sharding
from moe_jax import safetensors_shards as shards
from moe_jax import variables as model_variables

BASE = dict(vocab_size=256, hidden_size=256, intermediate_size=320, moe_intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1, n_group=1, topk_group=1,
            attn_implementation="eager")
MESHES = {"fsdp4_expert2": (1, 4, 2, 1), "expert8": (1, 1, 8, 1), "data2_tensor4": (2, 1, 1, 4)}


def quantize(w: np.ndarray):
  """[O, I] fp32 -> (e4m3 [O, I], scale_inv [ceil(O/128), ceil(I/128)]): DeepSeek's 128x128 block scaling."""
  o, i = w.shape
  ro, ri = -(-o // 128), -(-i // 128)
  padded = np.zeros((ro * 128, ri * 128), np.float32)
  padded[:o, :i] = w
  blocks = padded.reshape(ro, 128, ri, 128)
  scale = np.abs(blocks).max(axis=(1, 3)) / 448.0
  q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:o, :i].astype(ml_dtypes.float8_e4m3fn)
  return q, scale.astype(np.float32)


def save_checkpoint(arch: str, form: str, path, seed: int = 0):
  """A random transformers model saved as `form` (f32, bf16, fp8) over three safetensors files."""
  import torch  # here: the 2-process workers import this file and need neither
  import transformers
  transformers.logging.set_verbosity_error()
  path.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(seed)
  kw = dict(BASE, **({"num_nextn_predict_layers": 1} if arch == "v3" else {}))
  model = (transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw)) if arch == "v3"
           else transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**kw)))
  model.save_pretrained(path / "saved")  # transformers writes the released per-expert key layout
  reader = hf.SafetensorsReader(path / "saved")
  tensors = {k: reader.read(k).copy() for k in reader.keys()}
  shutil.rmtree(path / "saved")
  if arch == "v3":  # an MTP layer (transformers does not build one): a copy of the last layer's block
    last, mtp = f"model.layers.{BASE['num_hidden_layers'] - 1}.", f"model.layers.{BASE['num_hidden_layers']}."
    rng = np.random.RandomState(seed)
    for k in [k for k in tensors if k.startswith(last)]:
      tensors[mtp + k[len(last):]] = tensors[k] + 0.01 * rng.randn(*tensors[k].shape).astype(np.float32)
    d = BASE["hidden_size"]
    tensors.update({mtp + "enorm.weight": 1 + 0.1 * rng.randn(d), mtp + "hnorm.weight": 1 + 0.1 * rng.randn(d),
                    mtp + "eh_proj.weight": 0.1 * rng.randn(d, 2 * d), mtp + "shared_head.norm.weight": np.ones(d),
                    mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"],
                    mtp + "shared_head.head.weight": tensors["lm_head.weight"]})
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  hf_cfg = model.config.to_dict()
  if form == "bf16":
    tensors = {k: v if k.endswith("correction_bias") else v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  if form == "fp8":
    for k in [k for k in tensors if k.endswith(("_proj.weight", "_mqa.weight"))]:
      tensors[k], tensors[k + "_scale_inv"] = quantize(tensors[k])
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"}
  if arch == "v3":
    hf_cfg["num_nextn_predict_layers"] = 1
  keys, weight_map = sorted(tensors), {}
  for n, part in enumerate(np.array_split(np.arange(len(keys)), 3)):
    name = f"model-{n + 1:05d}-of-00003.safetensors"
    save_file({keys[i]: np.ascontiguousarray(tensors[keys[i]]) for i in part}, str(path / name),
              metadata={"format": "pt"})
    weight_map.update({keys[i]: name for i in part})
  (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  (path / "config.json").write_text(json.dumps(hf_cfg))
  return path


def shardings_for(path, mesh, **load_kw):
  """The training shardings (DEFAULT_RULES) of the model load_pretrained(path, **load_kw) builds."""
  dtype = load_kw.pop("dtype", "float32")
  cfg = hf.config_from_dir(path, dtype=dtype, param_dtype=dtype, fp8=load_kw.pop("keep_fp8", False), **load_kw)
  return nn.unbox(sharding.named_shardings(abstract(cfg), mesh, sharding.DEFAULT_RULES))


@functools.lru_cache(maxsize=None)
def abstract(cfg):  # tracing init takes seconds: once per config, not per mesh
  return model_variables.abstract(cfg)


def flat(variables):
  return traverse_util.flatten_dict(variables)


class _Checkpoints(dict):
  """name ('v3_fp8', ...) -> directory, each built on first use."""

  def __init__(self, root):
    super().__init__()
    self.root = root

  def __missing__(self, name):
    arch, form = name.split("_")
    self[name] = save_checkpoint(arch, form, self.root / name)
    return self[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  return _Checkpoints(tmp_path_factory.mktemp("hf_sharded"))


# (checkpoint, load_pretrained keywords, meshes)
CASES = {
    "v3_f32": ("v3_f32", {}, list(MESHES)),
    "v3_bf16_scan": ("v3_bf16", {"dtype": "bfloat16", "scan_layers": True}, ["fsdp4_expert2", "data2_tensor4"]),
    "v3_fp8_dequantized": ("v3_fp8", {}, ["fsdp4_expert2", "expert8"]),
    "v3_fp8_dequantized_scan": ("v3_fp8", {"scan_layers": True}, ["expert8"]),
    "v3_fp8_kept": ("v3_fp8", {"keep_fp8": True}, ["fsdp4_expert2"]),
    "v3_fp8_kept_scan": ("v3_fp8", {"keep_fp8": True, "scan_layers": True}, ["fsdp4_expert2", "data2_tensor4"]),
    "v2_bf16": ("v2_bf16", {}, ["fsdp4_expert2"]),
}
_UNSHARDED = {}  # case -> (variables, stats) of the load without shardings, shared by the meshes


@pytest.mark.parametrize("case, mesh_name", [(c, m) for c, (_, _, meshes) in CASES.items() for m in meshes])
def test_sharded_load_equals_unsharded(checkpoints, case, mesh_name, monkeypatch):
  """Each device box read on its own (in one process the boxes tile the whole array, which
  would otherwise be read at once): every box maps back to the HF rows/cols it holds."""
  monkeypatch.setattr(shards, "MERGE_BOXES", False)
  ckpt, kw, _ = CASES[case]
  path = checkpoints[ckpt]
  if case not in _UNSHARDED:
    _UNSHARDED[case] = hf.load_pretrained(path, **kw)[1], hf.last_load_stats()
  whole, whole_stats = _UNSHARDED[case]
  mesh = sharding.make_mesh(*MESHES[mesh_name])
  want_shardings = shardings_for(path, mesh, **kw)
  model, got = hf.load_pretrained(path, shardings=want_shardings, **kw)
  stats = hf.last_load_stats()
  want_shardings = flat(want_shardings)
  assert model.cfg.scan_layers == kw.get("scan_layers", False)
  got, whole = flat(got), flat(whole)
  assert got.keys() == whole.keys()
  assert any(k[0] == "fp8_scales" for k in got) == bool(kw.get("keep_fp8"))
  for p, x in got.items():
    assert x.dtype == whole[p].dtype, p
    np.testing.assert_array_equal(np.asarray(x), np.asarray(whole[p]), err_msg=str(p))
    if p in want_shardings:
      assert x.sharding == want_shardings[p], p
    else:  # FP8 block scales: sharded as the stack axes of their e4m3 variable, whole per slot
      assert p[0] == "fp8_scales", p
      stack = x.ndim - 2
      assert tuple(x.sharding.spec)[stack:] == (None, None), p
      assert tuple(x.sharding.spec)[:stack] == tuple(want_shardings[("params", *p[1:])].spec)[:stack], p
  # Every tensor byte read once: replicated boxes (data=2) are not read twice; MTP copies of the
  # embedding and head are never read. The unsharded load reads the same bytes.
  if "fp8" not in ckpt:  # (per-box FP8 scale blocks may be read more than once)
    assert stats["bytes_read"] == stats["planned_bytes"] == whole_stats["bytes_read"]
  assert stats["bytes_read"] <= stats["checkpoint_bytes"]
  assert stats["bytes_read"] >= 0.9 * whole_stats["bytes_read"]


def test_merge_boxes():
  a, b, c = ((0, 2), (0, 4)), ((2, 4), (0, 4)), ((4, 6), (4, 8))
  assert shards.merge_boxes([a, b]) == [((0, 4), (0, 4))]
  assert sorted(shards.merge_boxes([c, a, b])) == [((0, 4), (0, 4)), c]  # c touches no box along one axis
  quarters = [((r, r + 2), (k, k + 2)) for r in (0, 2) for k in (0, 2)]
  assert shards.merge_boxes(quarters) == [((0, 4), (0, 4))]


def test_boxes_tiling_one_box_are_read_at_once(checkpoints):
  """One process holding every box of a variable reads it as the unsharded load does."""
  path = checkpoints["v3_f32"]
  _, whole = hf.load_pretrained(path)
  whole_stats = hf.last_load_stats()
  _, got = hf.load_pretrained(path, shardings=shardings_for(path, sharding.make_mesh(*MESHES["fsdp4_expert2"])))
  stats = hf.last_load_stats()
  assert (stats["reads"], stats["bytes_read"]) == (whole_stats["reads"], whole_stats["bytes_read"])
  for p, x in flat(got).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat(whole)[p]))


def test_kept_fp8_blocks_are_the_checkpoints(checkpoints):
  """keep_fp8 with shardings: the e4m3 values and scales are the file's (dequantized: the dequantized load)."""
  from moe_jax.layers import fp8
  path = checkpoints["v3_fp8"]
  mesh = sharding.make_mesh(*MESHES["fsdp4_expert2"])
  _, kept = hf.load_pretrained(path, keep_fp8=True, shardings=shardings_for(path, mesh, keep_fp8=True))
  _, deq = hf.load_pretrained(path)
  params, scales = flat(kept["params"]), flat(kept["fp8_scales"])
  # kv_b [H*(N+V), K] with N = V = 32: a block of rows straddles heads, so it is dequantized
  assert {p[-1] for p in scales} == {"q_a", "q_b", "kv_a", "o", "gate", "up", "down", "eh_proj"}
  for p in [p for p in params if p[-1] in ("k_b", "v_b")]:
    np.testing.assert_array_equal(np.asarray(params[p]), np.asarray(flat(deq["params"])[p]))
  for p, scale in scales.items():
    assert params[p].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(fp8.Fp8Weight(params[p], scale).dequantize()),
                                  np.asarray(flat(deq["params"])[p]))


def test_range_reader_reads_only_the_box(tmp_path):
  """Rows and column runs of a row-major tensor, with gaps merged or not and small chunks."""
  w = np.arange(37 * 29, dtype=np.float32).reshape(37, 29)
  save_file({"w": w}, str(tmp_path / "model.safetensors"))
  entry = hf.SafetensorsReader(tmp_path).entries["w"]
  rows, cols = np.array([0, 1, 2, 5, 6, 30]), np.array([3, 4, 5, 9, 10, 28])
  for max_gap, chunk in ((0, 1 << 20), (0, 8), (64, 1 << 20), (64, 40), (10 ** 6, 1 << 20)):
    reader = shards.RangeReader(max_gap=max_gap, chunk=chunk)
    np.testing.assert_array_equal(reader.block(entry, rows, cols, np.float32), w[np.ix_(rows, cols)])
    if max_gap == 0:  # exactly the elements asked for
      assert reader.stats.bytes_read == rows.size * cols.size * 4
    else:
      assert reader.stats.bytes_read > rows.size * cols.size * 4
  reader = shards.RangeReader()
  np.testing.assert_array_equal(reader.block(entry, np.arange(10, 20), np.arange(29), np.float32), w[10:20])
  assert (reader.stats.reads, reader.stats.bytes_read) == (1, 10 * 29 * 4)  # whole rows: one read


def test_scale_blocks_cover_only_the_box(checkpoints):
  """A box of an FP8 weight reads the weight's rows/cols and only the scale blocks covering them."""
  path = checkpoints["v3_fp8"]
  reader = hf.SafetensorsReader(path)
  key = "model.layers.0.mlp.gate_proj.weight"  # [320, 256]: 3 x 2 blocks, the last row of blocks ragged
  ranges = shards.RangeReader()
  slot = shards.Slot(key, shards.AxisMap(rows=((1, 1),), cols=((0, 1),)), scale_key=key + "_scale_inv")
  got = shards.ShardReader(reader.entries, hf._ST_DTYPES, ranges).slot(slot, ((64, 192), (240, 320)))
  want = hf.dequantize_fp8(reader.read(key), reader.read(key + "_scale_inv")).T[64:192, 240:320]
  np.testing.assert_array_equal(got, want)
  # the e4m3 box, and 2 x 2 scale blocks (HF rows 240..319: blocks 1, 2; cols 64..191: blocks 0, 1)
  assert ranges.stats.bytes_read == 128 * 80 + 2 * 2 * 4


# --- two processes --------------------------------------------------------------------
TIMEOUT_S = 240


def xor_mesh() -> Mesh:
  """(data 1, fsdp 2, expert 2, tensor 2) where device (f, e, t) is on process f XOR e: both fsdp
  and expert span the processes, each process holds half of every sharded weight."""
  by_process = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
  grid = np.empty((1, 2, 2, 2), object)
  for f in (0, 1):
    for e in (0, 1):
      for t in (0, 1):
        grid[0, f, e, t] = by_process[f ^ e][2 * f + t]  # on each process, f tells its two (f, e) apart
  return Mesh(grid, sharding.MESH_AXES)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_their_half(checkpoints, tmp_path):
  path = checkpoints["v3_fp8"]
  port = _free_port()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  procs = [subprocess.Popen([sys.executable, __file__, str(pid), str(port), str(path), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  deadline, logs = time.monotonic() + TIMEOUT_S, []
  try:
    _, deq = hf.load_pretrained(path)  # single process, while the workers run
    _, kept = hf.load_pretrained(path, keep_fp8=True)
    for p in procs:
      logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"worker {pid} exited {p.returncode}:\n{log[-4000:]}"
  whole = {"dequantized": flat(deq), "keep_fp8": flat(kept)}
  for pid in (0, 1):
    report = json.loads((tmp_path / f"stats_{pid}.json").read_text())
    print(f"process {pid}: peak RSS {report['peak_rss_mib']:.0f} MiB, " +
          ", ".join(f"{m}: read {s['bytes_read'] / s['checkpoint_bytes']:.1%} of {s['checkpoint_bytes']} bytes"
                    for m, s in report["loads"].items()))
    for mode, s in report["loads"].items():
      assert s["bytes_read"] <= 0.6 * s["checkpoint_bytes"], (pid, mode, s)
  for mode, want in whole.items():
    covered = {p: set() for p in want}
    for pid in (0, 1):
      with np.load(tmp_path / f"{mode}_{pid}.npz") as got:
        for i, name in enumerate(got["names"]):
          p, box = json.loads(str(name))
          p, box = tuple(p), tuple(map(tuple, box))
          expect = np.ascontiguousarray(np.asarray(want[p])[tuple(slice(a, b) for a, b in box)]).view(np.uint8)
          np.testing.assert_array_equal(got[f"a{i}"], expect, err_msg=f"{mode} {p} {box}")
          covered[p].add(box)
    for p, boxes in covered.items():  # the two processes' boxes make up every variable
      assert sum(int(np.prod([b - a for a, b in box])) for box in boxes) == np.asarray(want[p]).size, (mode, p)


def _worker(process_id: int, port: int, path: str, out: str):
  import resource
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60,
                                         heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
  assert jax.process_count() == 2 and jax.local_device_count() == 4
  mesh = xor_mesh()
  report = {"loads": {}}
  for mode, kw in (("dequantized", {}), ("keep_fp8", {"keep_fp8": True})):
    _, variables = hf.load_pretrained(path, shardings=shardings_for(path, mesh, **kw), **kw)
    report["loads"][mode] = hf.last_load_stats()
    arrays = {}  # name: [path, box] -> the shard's bytes (npz keeps no bfloat16 / float8)
    for p, x in flat(variables).items():
      for s in x.addressable_shards:
        box = shards.box_of(s.index, x.shape)
        name = json.dumps([list(p), [list(b) for b in box]])
        arrays.setdefault(name, np.ascontiguousarray(np.asarray(s.data)).view(np.uint8))
    names = list(arrays)
    np.savez(os.path.join(out, f"{mode}_{process_id}.npz"), names=np.array(names),
             **{f"a{i}": arrays[n] for i, n in enumerate(names)})
  report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  with open(os.path.join(out, f"stats_{process_id}.json"), "w") as f:
    json.dump(report, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
