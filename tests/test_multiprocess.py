"""Two processes on localhost (CPU, gloo, 4 devices each) compute what one process with 8 does.

The worker (this file run as a script) joins a 2-process cluster through
sharding.initialize_distributed, builds the (data=2, fsdp=1, expert=2, tensor=2) mesh as
one data slice per process (make_mesh(..., dcn_data=2): create_hybrid_device_mesh with
processes as granules), feeds only its rows of the batch (process_rows +
global_batch), runs the expert-parallel step and gathers the results to process 0. It also
feeds a layout where each process holds scattered rows (as hosts do on a TPU pod).
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np

TIMEOUT_S = 300  # per worker, compile included; the coordinator itself gives up after 60 s


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}/").items()}
  return {prefix.rstrip("/"): np.asarray(tree)}


def test_two_processes_match_one(tmp_path):
  import jax
  import shard_util as su

  port, out = _free_port(), tmp_path / "result.npz"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  procs = [subprocess.Popen([sys.executable, __file__, str(pid), str(port), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  deadline = time.monotonic() + TIMEOUT_S
  logs = []
  try:
    cfg = su.tiny_config(moe_impl="ep")
    one_process, _ = su.run_on_mesh(cfg, (2, 1, 2, 2))  # while the workers start (cached if test_ep ran)
    for p in procs:
      logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"worker {pid} exited {p.returncode}:\n{log[-4000:]}"

  got = dict(np.load(out))
  want = _flat(jax.tree.map(np.asarray, one_process))
  assert set(got) == set(want)
  for name, value in want.items():
    assert su.max_rel_diff(got[name], value) <= 1e-5, name
  assert float(got["dropped"]) == 0


def _worker(process_id: int, port: int, out: str):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  from jax.experimental import multihost_utils
  from flax import linen as nn

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import shard_util as su
  from moe_jax import sharding
  from moe_jax import variables as model_variables

  assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60,
                                         heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
  assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
  mesh = sharding.make_mesh(1, 1, 2, 2, dcn_data=2)
  assert dict(mesh.shape) == dict(data=2, fsdp=1, expert=2, tensor=2)
  # The DCN axis is outermost: this process's devices are one data slice.
  assert {d.process_index for d in mesh.devices[process_id].flat} == {process_id}

  cfg = su.tiny_config(moe_impl="ep")
  shardings = nn.unbox(sharding.named_shardings(model_variables.abstract(cfg), mesh, sharding.DEFAULT_RULES))
  host = jax.tree.map(np.asarray, su.host_variables(cfg))  # same seed: the same values in both processes
  variables = jax.tree.map(lambda h, s: jax.make_array_from_callback(h.shape, s, lambda i: h[i]), host, shardings)
  rows = sharding.process_rows(mesh, su.BATCH)
  np.testing.assert_array_equal(rows, np.arange(4 * process_id, 4 * process_id + 4))
  tokens = sharding.global_batch({"tokens": su.tokens(cfg)[rows]}, mesh, rows, su.BATCH)["tokens"]
  assert tokens.shape == (su.BATCH, su.SEQ)
  with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    step = jax.jit(su.step_fn(su.Transformer(cfg)), in_shardings=(shardings, tokens.sharding))
    result = step(variables, tokens)
  result = multihost_utils.process_allgather(result, tiled=True)

  # Scattered rows, as on a TPU pod where a host's chips are not adjacent along the batch axis:
  # data=8 over devices interleaved by pairs, so process 0 holds rows [0, 1, 4, 5].
  mine = [d for d in jax.devices() if d.process_index == process_id]
  other = [d for d in jax.devices() if d.process_index != process_id]
  first, second = (mine, other) if process_id == 0 else (other, mine)
  order = first[:2] + second[:2] + first[2:] + second[2:]
  scattered = jax.sharding.Mesh(np.asarray(order).reshape(8, 1, 1, 1), sharding.MESH_AXES)
  rows = sharding.process_rows(scattered, 8)
  np.testing.assert_array_equal(rows, [0, 1, 4, 5] if process_id == 0 else [2, 3, 6, 7])
  want = su.tokens(cfg)[:8]
  got = sharding.global_batch({"tokens": want[rows]}, scattered, rows, 8)["tokens"]
  np.testing.assert_array_equal(multihost_utils.process_allgather(got, tiled=True), want)
  if process_id == 0:
    np.savez(out, **_flat(result))
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
