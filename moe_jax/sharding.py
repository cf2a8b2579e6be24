"""Device mesh, the logical-axis rules table, and sharding helpers.

Modules name every parameter axis (moe_jax/layers); this table maps those names to the
mesh axes ('data', 'fsdp', 'expert', 'tensor'). Rules are tried in order and a mesh axis
is used at most once per array (flax's priority rule), so activations [batch, length,
embed] put batch on data x fsdp x expert and leave embed unsharded, while parameters put
embed on fsdp x expert (ZeRO-3 over every data-like axis). Outside the MoE layer `expert`
acts as one more data axis; routed-expert weights [exp, embed, exp_mlp] put exp on
`expert`, so their embed falls through to the second `embed` rule (fsdp alone).

Override in a config as a list of (logical_name, mesh_axes) pairs (`merge_rules`): a name
given there replaces every default rule of that name, e.g.
  rules = [("exp_mlp", None), ("embed", "fsdp")]   # no tensor parallel inside experts
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Ordered: earlier rules win a mesh axis.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("exp", "expert"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("exp_mlp", "tensor"),
    ("embed", ("fsdp", "expert")),  # non-expert weights: sharded over every data-like axis
    ("embed", "fsdp"),  # expert weights: 'expert' already holds their exp dimension
    ("q_lora", None),
    ("kv_lora", None),
    ("qk_head", None),
    ("v_head", None),
    ("length", None),
    ("layers", None),
)
LOGICAL_NAMES = frozenset(name for name, _ in DEFAULT_RULES)


def check_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
  """Validates a rules table: known logical names, known mesh axes."""
  out = []
  for entry in rules:
    if len(entry) != 2:
      raise ValueError(f"sharding rule {entry!r} must be a (logical_name, mesh_axes) pair")
    name, axes = entry
    if name not in LOGICAL_NAMES:
      raise ValueError(f"sharding rules: unknown logical name {name!r}; the modules declare {sorted(LOGICAL_NAMES)}")
    flat = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
    for a in flat:
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"sharding rules: {name!r} maps to unknown mesh axis {a!r}; mesh axes are {MESH_AXES}")
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def merge_rules(overrides: Optional[Iterable[tuple[str, Any]]]) -> tuple[tuple[str, Any], ...]:
  """Default rules with some names remapped (overrides replace all of that name's rules, in place)."""
  overrides = check_rules(list(overrides or ()))
  names = {name for name, _ in overrides}
  merged, placed = [], set()
  for name, axes in DEFAULT_RULES:
    if name not in names:
      merged.append((name, axes))
    elif name not in placed:  # the overrides of a name take its first default's place
      merged += [o for o in overrides if o[0] == name]
      placed.add(name)
  return check_rules(merged + [o for o in overrides if o[0] not in placed])


def mesh_shape(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
               num_devices: Optional[int] = None) -> tuple[int, int, int, int]:
  """Resolves at most one -1 so the product equals the device count; errors name the numbers."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {free}")
  for k, v in sizes.items():
    if v != -1 and v < 1:
      raise ValueError(f"mesh.{k}={v}: axis sizes must be >= 1 (or -1 to fill the remaining devices)")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known} "
                       f"({sizes}); change the sizes")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh: data*fsdp*expert*tensor = {'*'.join(str(sizes[a]) for a in MESH_AXES)} = "
                     f"{math.prod(sizes.values())} but there are {num_devices} devices; make the product equal "
                     f"the device count (or set one axis to -1)")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp', 'expert', 'tensor') mesh with Auto axis types over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, expert, tensor, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU / odd topologies: plain row-major order is fine
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_specs(abstract_variables) -> Any:
  """Tree of PartitionSpecs in logical names, from boxed (LogicallyPartitioned) variables."""
  return nn.get_partition_spec(abstract_variables)


def mesh_specs(abstract_variables, rules) -> Any:
  """Tree of PartitionSpecs in mesh axes."""
  return nn.logical_to_mesh(logical_specs(abstract_variables), rules)


def named_shardings(abstract_variables, mesh: Mesh, rules) -> Any:
  """Tree of NamedShardings for boxed variables (leaves: NamedSharding)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs(abstract_variables, rules),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, S, ...] input batch: B over data x fsdp x expert."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
  """Context in which the modules' `with_logical_constraint` calls take effect (trace under it)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def init_variables(model: nn.Module, rng: jax.Array, tokens_shape: tuple[int, int], mesh: Mesh, rules,
                   collections: Sequence[str] = ("params", "router")):
  """Parameters born sharded: eval_shape -> specs -> jit(init, out_shardings). Returns unboxed trees."""
  import jax.numpy as jnp

  def init(key):
    tokens = jnp.zeros(tokens_shape, jnp.int32)
    variables = model.init(key, tokens)
    return {c: variables[c] for c in collections if c in variables}

  with activation_rules(mesh, rules):
    abstract = jax.eval_shape(init, rng)
    shardings = named_shardings(abstract, mesh, rules)
    variables = jax.jit(init, out_shardings=shardings)(rng)
  return nn.unbox(variables), nn.unbox(shardings)
