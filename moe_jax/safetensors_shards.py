"""Per-process reading of safetensors checkpoints: only the byte ranges this process's devices hold.

A safetensors file is a JSON header plus raw row-major tensors at known offsets, so any box of
a tensor is a set of byte ranges: a range of rows is one contiguous range, a range of columns
is one short range per row. For one variable of ours (e.g. stacked experts [E, D, F]) a device
shard is a box; `Source` says which HF tensor fills each slot of its leading stack axes
(layers, experts) and how the slot's axes map onto the tensor's rows and columns (`AxisMap`:
the transpose [out, in] -> [in, out] and the head splits). `ShardReader.fill` turns a box into
the HF rows and columns it needs, reads them (`RangeReader.block`) and lays them out as ours;
`build_array` does that once per distinct box among the process's devices (a shard replicated
on several local devices is read once; boxes that tile one larger box are read as that box,
in longer ranges) and assembles the global jax.Array.

Host memory: the boxes of one variable that this process holds, plus one read chunk. Reads:
ranges adjacent in the file are merged; ranges further apart than `max_gap` bytes are read
separately (the default, 0, reads exactly the bytes the devices hold: what matters when many
hosts load from shared storage), a merged range is read in chunks of at most `chunk` bytes.
FP8 weights are dequantized per box with only the 128x128 scale blocks that cover it.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

CHUNK_BYTES = 64 << 20  # one read buffer: the most one read call asks for
PROGRESS_BYTES = 4 << 20
MAX_GAP_BYTES = 0  # ranges further apart than this are read separately (the gap is not read)
TILE_BOXES = True  # local boxes that tile one box are read as it (tests turn it off to check each box)
Box = tuple[tuple[int, int], ...]  # (start, stop) per axis


@dataclasses.dataclass(frozen=True)
class AxisMap:
  """Where element [i_0, i_1, ...] of one slot of our array sits in a 2-D (or 1-D) HF tensor:
  row = offset + sum(i_d * stride for d, stride in rows), col = sum(i_d * stride for d, stride in cols).

  E.g. torch Linear [O, I] -> ours [I, O]: rows=((1, 1),), cols=((0, 1),).
  """

  rows: tuple[tuple[int, int], ...]
  cols: tuple[tuple[int, int], ...] = ()
  offset: int = 0

  def hf_indices(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """-> (HF rows, HF cols) of a box of the slot, each in our axis order (increasing here)."""
    return self.offset + _flat(self.rows, box), _flat(self.cols, box)

  def to_ours(self, block: np.ndarray, box: Box) -> np.ndarray:
    """HF block [rows, cols] (or [rows]) as hf_indices(box) listed them -> our box's array."""
    dims = [d for d, _ in self.rows] + [d for d, _ in self.cols]
    block = block.reshape([box[d][1] - box[d][0] for d in dims])
    return block.transpose([dims.index(d) for d in range(len(box))])


def _flat(terms, box: Box) -> np.ndarray:
  idx = np.zeros((), np.int64)
  for d, stride in terms:
    idx = np.add.outer(idx, np.arange(*box[d], dtype=np.int64) * stride)
  return idx.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor filling one slot of a variable: through `axes`, dequantized with the blocks
  of `scale_key` when given; or (axes None) the whole tensor through `convert` (small tensors:
  the FP8 block scales kept with keep_fp8), then cut to the box."""

  key: str
  axes: Optional[AxisMap] = None
  scale_key: Optional[str] = None
  block: tuple[int, int] = (128, 128)
  convert: Optional[Callable[[np.ndarray], np.ndarray]] = None


@dataclasses.dataclass(frozen=True)
class Source:
  """A variable of shape `shape` ([*stack, *slot]) whose slot at stack index i is slots[i]."""

  shape: tuple[int, ...]
  dtype: Any
  stack: int
  slots: dict[tuple[int, ...], Slot]


@dataclasses.dataclass
class LoadStats:
  """What one process read: bytes (gaps included), read calls, seconds, the checkpoint's tensor
  bytes (all files, for the fraction) and the bytes its boxes need (the progress bar's total)."""

  bytes_read: int = 0
  reads: int = 0
  seconds: float = 0.0
  checkpoint_bytes: int = 0
  planned_bytes: int = 0


class RangeReader:
  """Boxes of row-major tensors from their files, counting every byte read."""

  def __init__(self, max_gap: int = MAX_GAP_BYTES, chunk: int = CHUNK_BYTES, stats: Optional[LoadStats] = None,
               progress: Optional[Callable[[int], Any]] = None):
    self.max_gap, self.chunk = max_gap, chunk
    self.stats = stats if stats is not None else LoadStats()
    self.progress = progress
    self._files: dict[Any, io.FileIO] = {}
    self._unreported = 0

  def close(self):
    if self.progress and self._unreported:
      self.progress(self._unreported)
    self._unreported = 0
    for f in self._files.values():
      f.close()
    self._files.clear()

  def _read(self, path, offset: int, out: memoryview):
    f = self._files.get(path)
    if f is None:
      f = self._files[path] = open(path, "rb", buffering=0)
    f.seek(offset)
    done = 0
    while done < len(out):
      n = f.readinto(out[done:])
      if not n:
        raise OSError(f"{path}: ends before byte {offset + len(out)} (truncated while loading?)")
      done += n
    self.stats.bytes_read += len(out)
    self.stats.reads += 1
    self._unreported += len(out)
    if self.progress and self._unreported >= PROGRESS_BYTES:  # per-row reads: not one bar update each
      self.progress(self._unreported)
      self._unreported = 0

  def block(self, entry, rows: np.ndarray, cols: np.ndarray, np_dtype) -> np.ndarray:
    """entry (path, offset, nbytes, dtype, shape) of a 2-D [R, C] or 1-D [R] tensor -> its
    [rows][:, cols] ([rows] for 1-D) without reading anything else (up to max_gap)."""
    path, base, _, _, shape = entry
    isz = np.dtype(np_dtype).itemsize
    width = shape[1] if len(shape) == 2 else 1
    if len(shape) == 1:
      cols = np.zeros(1, np.int64)
    n_r, n_c = len(rows), len(cols)
    out = np.empty(n_r * n_c, np_dtype)
    if out.size == 0:
      return out.reshape((n_r, n_c) if len(shape) == 2 else (n_r,))
    # One range per (row, run of consecutive columns): file offset, length, place in `out` (elements).
    cuts = np.flatnonzero(np.diff(cols) != 1) + 1
    starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [n_c]])
    off = (rows[:, None] * width + cols[starts][None, :]).reshape(-1) * isz + base
    dest = (np.arange(n_r)[:, None] * n_c + starts[None, :]).reshape(-1)
    count = np.broadcast_to(stops - starts, (n_r, len(starts))).reshape(-1)
    # Ranges adjacent both in the file and in `out` are one range (whole rows: the whole box).
    joined = np.concatenate([[False], (off[1:] == off[:-1] + count[:-1] * isz) & (dest[1:] == dest[:-1] + count[:-1])])
    first = np.flatnonzero(~joined)
    off, dest, count = off[first], dest[first], np.add.reduceat(count, first)
    out_bytes = out.view(np.uint8)
    i = 0
    while i < len(off):
      start, end, j = int(off[i]), int(off[i] + count[i] * isz), i
      while (j + 1 < len(off) and off[j + 1] - end <= self.max_gap
             and off[j + 1] + count[j + 1] * isz - start <= self.chunk):
        j += 1
        end = int(off[j] + count[j] * isz)
      if j == i:  # one range: straight into `out`, chunk by chunk
        d = int(dest[i]) * isz
        for c in range(0, end - start, self.chunk):
          n = min(self.chunk, end - start - c)
          self._read(path, start + c, memoryview(out_bytes[d + c:d + c + n]))
      else:  # ranges with small gaps: one read, then each range out of the buffer
        buf = np.empty(end - start, np.uint8)
        self._read(path, start, memoryview(buf))
        for k in range(i, j + 1):
          a, n, d = int(off[k]) - start, int(count[k]) * isz, int(dest[k]) * isz
          out_bytes[d:d + n] = buf[a:a + n]
      i = j + 1
    return out.reshape((n_r, n_c) if len(shape) == 2 else (n_r,))


class ShardReader:
  """Fills boxes of Sources from a SafetensorsReader's files (entries: key -> (path, offset,
  nbytes, dtype name, shape); np_dtypes: dtype name -> numpy dtype)."""

  def __init__(self, entries: dict, np_dtypes: dict, ranges: RangeReader):
    self.entries, self.np_dtypes, self.ranges = entries, np_dtypes, ranges

  def _block(self, key: str, rows, cols) -> np.ndarray:
    return self.ranges.block(self.entries[key], rows, cols, self.np_dtypes[self.entries[key][3]])

  def _whole(self, key: str) -> np.ndarray:
    shape = self.entries[key][4]
    rows = np.arange(shape[0])
    return self._block(key, rows, np.arange(shape[1]) if len(shape) == 2 else rows[:0])

  def slot(self, slot: Slot, box: Box) -> np.ndarray:
    """One slot's box, in the HF tensor's dtype (fp32 where dequantized)."""
    if slot.axes is None:
      return slot.convert(self._whole(slot.key))[tuple(slice(a, b) for a, b in box)]
    rows, cols = slot.axes.hf_indices(box)
    block = self._block(slot.key, rows, cols)
    if slot.scale_key is not None:  # only the scale blocks covering the box
      rb, cb = rows // slot.block[0], cols // slot.block[1]
      ur, uc = np.unique(rb), np.unique(cb)
      scale = self._block(slot.scale_key, ur, uc).astype(np.float32)
      block = block.astype(np.float32) * scale[np.ix_(np.searchsorted(ur, rb), np.searchsorted(uc, cb))]
    return slot.axes.to_ours(block, box)

  def fill(self, source: Source, box: Box) -> np.ndarray:
    """The variable's box: each stack index's slot box, in source.dtype."""
    out = np.empty([b - a for a, b in box], source.dtype)
    stack, rest = box[:source.stack], box[source.stack:]
    for index in itertools.product(*(range(a, b) for a, b in stack)):
      local = tuple(i - a for i, (a, _) in zip(index, stack))
      out[local] = self.slot(source.slots[index], rest).astype(source.dtype)
    return out

  def planned_bytes(self, source: Source, box: Box) -> int:
    """Bytes of the HF tensors that a box covers (what fill reads with max_gap=0, scales aside)."""
    slot_elems = math.prod(b - a for a, b in box[source.stack:])
    total = 0
    for index in itertools.product(*(range(a, b) for a, b in box[:source.stack])):
      key = source.slots[index].key
      elems = math.prod(self.entries[key][4]) if source.slots[index].axes is None else slot_elems
      total += elems * np.dtype(self.np_dtypes[self.entries[key][3]]).itemsize
    return total


def box_of(index: tuple, shape: tuple[int, ...]) -> Box:
  """A device index (tuple of slices, as Sharding.devices_indices_map gives) -> (start, stop) per axis."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def local_boxes(shape: tuple[int, ...], sharding: Optional[jax.sharding.Sharding]) -> list[Box]:
  """The distinct boxes this process's devices hold (one box, the whole array, without a sharding)."""
  if sharding is None:
    return [tuple((0, n) for n in shape)]
  return list(dict.fromkeys(box_of(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()))


def build_array(reader: ShardReader, source: Source, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
  """The global array: each distinct local box read once; without a sharding, jnp.asarray of the whole."""
  if sharding is None:
    return jnp.asarray(reader.fill(source, local_boxes(source.shape, None)[0]))
  boxes = local_boxes(source.shape, sharding)
  hull = tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(len(source.shape)))
  if TILE_BOXES and sum(_size(b) for b in boxes) == _size(hull):  # the boxes tile one box (distinct boxes are disjoint):
    whole = reader.fill(source, hull)  # read it at once, in longer ranges
    data = {b: whole[tuple(slice(s - h, e - h) for (s, e), (h, _) in zip(b, hull))] for b in boxes}
  else:
    data = {b: reader.fill(source, b) for b in boxes}
  return jax.make_array_from_callback(source.shape, sharding, lambda index: data[box_of(index, source.shape)])


def _size(box: Box) -> int:
  return math.prod(e - s for s, e in box)


def load(entries: dict, np_dtypes: dict, sources: dict, shardings: dict, checkpoint_bytes: int,
         max_gap: int = MAX_GAP_BYTES, chunk: int = CHUNK_BYTES) -> tuple[dict, LoadStats]:
  """{path: Source} -> ({path: jax.Array}, this process's LoadStats); a progress bar on process 0."""
  stats = LoadStats(checkpoint_bytes=checkpoint_bytes)
  start = time.perf_counter()
  ranges = RangeReader(max_gap, chunk, stats)
  reader = ShardReader(entries, np_dtypes, ranges)
  stats.planned_bytes = sum(reader.planned_bytes(src, box) for p, src in sources.items()
                            for box in local_boxes(src.shape, shardings.get(p)))
  bar = tqdm(total=stats.planned_bytes, unit="B", unit_scale=True, desc="read weights", leave=False,
             disable=jax.process_index() != 0)
  ranges.progress = bar.update
  try:
    out = {p: build_array(reader, src, shardings.get(p)) for p, src in sources.items()}
  finally:
    ranges.close()
    bar.close()
  stats.seconds = time.perf_counter() - start
  return out, stats
