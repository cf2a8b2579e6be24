"""libtpu flags that let the train step overlap its weight gathers with compute.

By default libtpu 0.0.42 schedules every all-gather of the FSDP weights as a synchronous op: the
chip waits for the wire before the layer's matmul can start (the optimized HLO of the V3 proxy
holds 119 plain all-gathers and no async collective; `python -m moe_jax.aot` reports it as
`async_collectives`). These flags turn them into async collective fusions that the scheduler
runs under the previous layer's compute; they are the ones MaxText passes for the same purpose
(its "collective fusion for all-gather" set). Measured in BENCHMARKS.md, "Pod communication".

They go in LIBTPU_INIT_ARGS, which libtpu reads once, when jax first starts the TPU backend, so
`apply()` runs at the top of train.py, eval.py and `moe_jax.aot`, before anything touches a device.
Other backends never read the variable. A flag the user already set there, to any value, wins.
libtpu aborts at start on a flag it does not know, so they are added only for the libtpu versions
they were checked with (VERIFIED); with any other libtpu, `aot`'s `async_collectives` says whether
the gathers overlap, and the flags can be given by hand.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping, Optional

ENV = "LIBTPU_INIT_ARGS"
OVERLAP_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)
VERIFIED = ("0.0.42",)  # libtpu version prefixes that compiled the V3 proxies with OVERLAP_FLAGS


def installed_libtpu() -> Optional[str]:
  """The installed libtpu package's version, or None (no TPU support installed)."""
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def apply(environ: Optional[MutableMapping[str, str]] = None, libtpu: Optional[str] = "installed") -> str:
  """Adds OVERLAP_FLAGS to $LIBTPU_INIT_ARGS, keeping every flag already there, when `libtpu` (default:
  the installed version) is one of VERIFIED; returns the variable's value."""
  environ = os.environ if environ is None else environ
  libtpu = installed_libtpu() if libtpu == "installed" else libtpu
  given = environ.get(ENV, "").split()
  if libtpu is None or not libtpu.startswith(VERIFIED):
    return " ".join(given)
  named = {flag.split("=", 1)[0] for flag in given}
  value = " ".join(given + [f for f in OVERLAP_FLAGS if f.split("=", 1)[0] not in named])
  environ[ENV] = value
  return value
