"""Reading released weights per host: bytes, GB/s and peak RSS per process, sharded vs unsharded.

Builds a random DeepSeek-V3-layout checkpoint (moe_jax.hf.save_pretrained: per-expert keys,
several files) in bf16 and in FP8 (e4m3 + 128x128 weight_scale_inv, DeepSeek's block scaling),
then loads each with hf.load_pretrained(dtype=bfloat16) in fresh processes:
  1proc_unsharded   one process, no shardings: every tensor whole (what every host read before)
  1proc_sharded     one process, 8 CPU devices, mesh fsdp=2 x expert=4: each distinct box once
  2proc_unsharded   two processes (jax.distributed on localhost, 4 devices each), no shardings
  2proc_sharded     two processes, the same mesh with expert=4 across them (dcn_expert=2):
                    each process reads only the boxes its devices hold
and a plain sequential read of every tensor (SafetensorsReader.read) as the storage reference.
Per process: bytes_read (counted by the reader), its fraction of the checkpoint's bytes,
seconds of the load (reads, layout, dequantization, device transfers; tracing excluded) and
GB/s = bytes_read / those seconds, read_seconds / read_gb_per_s: the read calls alone, peak RSS
(VmHWM) and RSS before the load. The files were just written: reads come from the page cache.

  python benchmarks/hf_read.py              # ~390 MB bf16 + ~200 MB FP8 checkpoint
  python benchmarks/hf_read.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # ModelConfig fields: ~185M parameters (~370 MB bf16), and a smoke size
    "full": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                 num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384,
                 kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
                 n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=0),
    "smoke": dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
                  kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, num_nextn_predict_layers=0),
}
MESH = dict(data=1, fsdp=2, expert=2, tensor=1, dcn_expert=2)  # expert=4: 2 per process x 2 processes


def build(size: str, directory: str) -> dict[str, str]:
  """-> {'bf16': dir, 'fp8': dir} with random weights (N(0, 0.02), norms 1)."""
  import ml_dtypes
  import numpy as np
  from flax import traverse_util
  from safetensors.numpy import save_file

  from moe_jax import config, hf
  from moe_jax.model import Transformer
  cfg = config.tiny(**SIZES[size])
  rng = np.random.default_rng(0)
  flat = {p: (np.ones(s.shape, np.float32) if p[-1] == "scale" else
              (0.02 * rng.standard_normal(s.shape, np.float32)))
          for p, s in hf.abstract_variables(Transformer(cfg)).items()}
  flat = {p: (v * 0 - 0.1 if p[0] == "router" else v) for p, v in flat.items()}
  bf16 = os.path.join(directory, "bf16")
  hf.save_pretrained(cfg, traverse_util.unflatten_dict(flat), bf16, dtype="bfloat16",
                     max_shard_bytes=(100 if size == "full" else 1) << 20)  # several files
  del flat
  fp8 = os.path.join(directory, "fp8")
  os.makedirs(fp8)
  index = json.load(open(os.path.join(bf16, "model.safetensors.index.json")))
  reader = hf.SafetensorsReader(bf16)
  for name in sorted(set(index["weight_map"].values())):
    out = {}
    for key in [k for k, f in index["weight_map"].items() if f == name]:
      w = reader.read(key)
      if key.endswith(("_proj.weight", "_mqa.weight")):
        o, i = w.shape
        ro, ri = -(-o // 128), -(-i // 128)
        padded = np.zeros((ro * 128, ri * 128), np.float32)
        padded[:o, :i] = w
        blocks = padded.reshape(ro, 128, ri, 128)
        scale = np.abs(blocks).max(axis=(1, 3)) / 448.0
        out[key] = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:o, :i].astype(ml_dtypes.float8_e4m3fn)
        out[key + "_scale_inv"] = scale.astype(np.float32)
        index["weight_map"][key + "_scale_inv"] = name
      else:
        out[key] = w
    save_file(out, os.path.join(fp8, name), metadata={"format": "pt"})
  json.dump(index, open(os.path.join(fp8, "model.safetensors.index.json"), "w"))
  hf_cfg = json.load(open(os.path.join(bf16, "config.json")))
  hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                   "activation_scheme": "dynamic"}
  json.dump(hf_cfg, open(os.path.join(fp8, "config.json"), "w"))
  return {"bf16": bf16, "fp8": fp8}


def _rss_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def worker(path: str, sharded: bool, processes: int, process_id: int, port: int, out: str):
  """One process's load; writes its figures as JSON to `out`."""
  import jax
  from flax import linen as nn

  from moe_jax import hf, sharding
  from moe_jax import variables as model_variables
  if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.initialize_distributed(f"127.0.0.1:{port}", processes, process_id, initialization_timeout=120)
  shardings = None
  if sharded:
    if processes > 1:
      mesh = sharding.make_mesh(MESH["data"], MESH["fsdp"], MESH["expert"], MESH["tensor"], dcn_expert=MESH["dcn_expert"])
    else:  # the same mesh shape on 8 local devices
      mesh = sharding.make_mesh(MESH["data"], MESH["fsdp"], MESH["expert"] * MESH["dcn_expert"], MESH["tensor"])
    cfg = hf.pretrained_config(path, dtype="bfloat16")
    shardings = nn.unbox(sharding.named_shardings(model_variables.abstract(cfg), mesh, sharding.DEFAULT_RULES))
  rss_before = _rss_mib("VmRSS")
  start = time.perf_counter()
  _, variables = hf.load_pretrained(path, dtype="bfloat16", shardings=shardings)
  jax.block_until_ready(variables)
  wall = time.perf_counter() - start
  stats = hf.last_load_stats()
  report = {**stats, "wall_s": wall, "rss_before_mib": rss_before, "peak_rss_mib": _rss_mib("VmHWM")}
  with open(out, "w") as f:
    json.dump(report, f)
  if processes > 1:
    jax.distributed.shutdown()


def run_mode(path: str, sharded: bool, processes: int, tmp: str) -> list[dict]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}", "PYTHONPATH": ROOT}
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  outs = [os.path.join(tmp, f"report_{processes}_{int(sharded)}_{p}.json") for p in range(processes)]
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", path, str(int(sharded)), str(processes), str(p),
                             str(port), outs[p]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in range(processes)]
  logs = [p.communicate(timeout=1200)[0] for p in procs]
  for p, log in zip(procs, logs):
    if p.returncode != 0:
      raise SystemExit(f"worker failed ({p.returncode}):\n{log[-3000:]}")
  return [json.load(open(o)) for o in outs]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="a ~5 MB checkpoint: checks the plumbing only")
  p.add_argument("--dir", help="build the checkpoints here (default: a temporary directory, removed)")
  args = p.parse_args()
  from benchmarks import common
  common.emit("machine", **common.machine_info())
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    t0 = time.perf_counter()
    dirs = build("smoke" if args.smoke else "full", tmp)
    common.emit("hf_read_build", seconds=time.perf_counter() - t0, config="smoke" if args.smoke else "full",
                mesh=MESH)
    from moe_jax import hf
    for form, path in dirs.items():
      reader = hf.SafetensorsReader(path)
      total = sum(e[2] for e in reader.entries.values())
      start = time.perf_counter()
      for key in reader.keys():
        reader.read(key)
      seconds = time.perf_counter() - start
      common.emit("hf_read", checkpoint=form, mode="sequential_read_all", process=0, bytes_read=total,
                  fraction=1.0, seconds=seconds, gb_per_s=total / seconds / 1e9, checkpoint_bytes=total)
      for mode, sharded, processes in (("1proc_unsharded", False, 1), ("1proc_sharded", True, 1),
                                       ("2proc_unsharded", False, 2), ("2proc_sharded", True, 2)):
        for pid, r in enumerate(run_mode(path, sharded, processes, tmp)):
          common.emit("hf_read", checkpoint=form, mode=mode, process=pid, bytes_read=r["bytes_read"],
                      fraction=r["bytes_read"] / r["checkpoint_bytes"], seconds=r["seconds"],
                      gb_per_s=r["bytes_read"] / r["seconds"] / 1e9, read_seconds=r["read_seconds"],
                      read_gb_per_s=r["bytes_read"] / r["read_seconds"] / 1e9, reads=r["reads"],
                      checkpoint_bytes=r["checkpoint_bytes"], peak_rss_mib=r["peak_rss_mib"],
                      rss_before_mib=r["rss_before_mib"])


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    a = sys.argv[2:]
    worker(a[0], a[1] == "1", int(a[2]), int(a[3]), int(a[4]), a[5])
  else:
    main()
