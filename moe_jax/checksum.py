"""Checksums of checkpointed arrays, computed on device from the global values.

One 64-bit digest per array (two 32-bit lanes). Every element's bits w_i (the array
bitcast to 8/16/32-bit words, widened to uint32; 64-bit types give two words) are mixed with
its flat index i and summed modulo 2**32:

    k_i = fmix(i ^ SEED);  a_i = fmix(k_i ^ w_i);  b_i = fmix(a_i ^ SEED2)
    digest = (sum_i a_i mod 2**32, sum_i b_i mod 2**32)        fmix: murmur3's finalizer

Integer addition modulo 2**32 is associative and commutative, so the digest does not depend
on how XLA splits the reduction: it is the same on any mesh, any sharding and any number of
hosts (a pod reduces its shards with one all-reduce inside the jit, and every process gets
the same replicated result). A checkpoint written on one mesh verifies on another. fmix is
a bijection, so a change to any single element always changes lane a; several changed
elements go unnoticed with probability about 2**-64. Flat indices wrap at 2**32 elements:
swapping two elements exactly 2**32 positions apart is the one change that is not seen.
This is a check against damage (bit rot, torn or overwritten files), not against an attacker.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

FORMAT = "moe_jax.checksum/1"
_SEED, _SEED2 = np.uint32(0x9E3779B9), np.uint32(0x5BD1E995)


def _fmix(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x):
  """x (any shape, any 8/16/32/64-bit dtype) -> its bits as uint32 [*x.shape] ([*x.shape, 2] for 64-bit)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
  """uint32 [*shape]: each element's row-major flat index modulo 2**32 (built per axis, so no
  int32 iota overflows on arrays of more than 2**31 elements)."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return idx


def _digest(x) -> jax.Array:
  """uint32 [2]: the two lanes of x's digest."""
  w = _words(x)
  k = _fmix(_flat_index(w.shape) ^ _SEED)
  a = _fmix(k ^ w)
  b = _fmix(a ^ _SEED2)
  return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


def _all_finite(x) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.ones((), jnp.bool_)
  return jnp.all(jnp.isfinite(x))


def _compute(leaves: list):
  """-> (uint32 [n, 2] digests, bool [n] all finite), one jit over the whole tree."""
  if not leaves:
    return jnp.zeros((0, 2), jnp.uint32), jnp.zeros((0,), jnp.bool_)
  return jnp.stack([_digest(x) for x in leaves]), jnp.stack([_all_finite(x) for x in leaves])


@functools.lru_cache(maxsize=8)
def _jitted(mesh):
  """_compute under jit; on a mesh its results are replicated there, so every host can read them."""
  return jax.jit(_compute) if mesh is None else jax.jit(_compute, out_shardings=NamedSharding(mesh, P()))


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaves_with_paths(tree) -> list[tuple[str, jax.Array]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(_path_str(p), x) for p, x in flat if hasattr(x, "dtype")]


def summarize(tree) -> tuple[dict[str, dict], list[str]]:
  """tree of arrays -> ({path: {digest (16 hex digits), dtype, shape}}, [paths holding NaN or inf]).

  Runs on the arrays where they are (every process of a multi-host run must call it, like any
  jit over global arrays); only two uint32 per array and one bool come back to the host.
  """
  named = leaves_with_paths(tree)
  arrays = [x for _, x in named]
  sharding = next((x.sharding for x in arrays if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  digests, finite = jax.device_get(_jitted(sharding.mesh if sharding is not None else None)(arrays))
  out, bad = {}, []
  for (path, x), d, ok in zip(named, np.asarray(digests), np.asarray(finite)):
    out[path] = {"digest": f"{int(d[0]):08x}{int(d[1]):08x}", "dtype": str(jnp.dtype(x.dtype)),
                 "shape": list(x.shape)}
    if not ok:
      bad.append(path)
  return out, bad


def mismatches(saved: dict[str, dict], actual: dict[str, dict]) -> Iterable[str]:
  """'path (saved D1, read D2)' for every array whose digest differs; arrays read back in another
  dtype than saved cannot be compared and are skipped; an array without a saved digest differs."""
  for path, a in actual.items():
    s = saved.get(path)
    if s is None:
      yield f"{path} (no checksum saved for it)"
    elif s["dtype"] == a["dtype"] and s["digest"] != a["digest"]:
      yield f"{path} (saved {s['digest']}, read {a['digest']})"
