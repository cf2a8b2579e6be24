"""Which accelerator the computation being traced will run on.

Backend-dependent choices (attention kernel, grouped-matmul kernel, Pallas backend) follow the
devices of the mesh in context (`jax.set_mesh`, which `sharding.activation_rules` enters), not
the host's default backend: compiling for a TPU topology from a CPU host
(`python -m moe_jax.aot`) must pick the TPU paths. Without a mesh in context, the default
device decides.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax


class Target(NamedTuple):
  platform: str  # 'cpu' | 'gpu' | 'tpu'
  device_kind: str  # e.g. 'TPU v5', 'NVIDIA H100 80GB HBM3', 'cpu'
  compute_capability: Optional[str] = None  # GPUs only, e.g. '9.0'


def _normalize(platform: str) -> str:
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def current(mesh=None) -> Target:
  """The target of `mesh` (a Mesh or AbstractMesh), else of the mesh in context, else the default device."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    if isinstance(mesh, jax.sharding.Mesh):
      return of_device(mesh.devices.flat[0])
    abstract = mesh.abstract_device  # AbstractMesh: set by jax.set_mesh, also inside shard_map
    if abstract is not None:
      return Target(_normalize(abstract.platform), str(abstract.device_kind))
  return of_device(jax.devices()[0])


def of_device(device) -> Target:
  cc = getattr(device, "compute_capability", None)
  return Target(_normalize(device.platform), str(device.device_kind), str(cc) if cc is not None else None)


def platform(mesh=None) -> str:
  """'cpu', 'gpu' or 'tpu' for the computation being traced (see current)."""
  return current(mesh).platform
