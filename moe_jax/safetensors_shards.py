"""Per-process reading of safetensors checkpoints: only the byte ranges this process's devices hold.

A safetensors file is a JSON header plus raw row-major tensors at known offsets
(SafetensorsReader parses the headers), so any box of a tensor is a set of byte ranges: a
range of rows is one contiguous range, a range of columns is one short range per row. For one variable of ours (e.g. stacked experts [E, D, F]) a device
shard is a box; `Source` says which HF tensor fills each slot of its leading stack axes
(layers, experts) and how the slot's axes map onto the tensor's rows and columns (`AxisMap`:
the transpose [out, in] -> [in, out] and the head splits). `ShardReader.fill` turns a box into
the HF rows and columns it needs, reads them (`RangeReader.block`) and lays them out as ours;
`build_array` does that once per distinct box among the process's devices (a shard replicated
on several local devices is read once; adjacent boxes are read as one larger box, in longer
ranges) and assembles the global jax.Array.

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
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from moe_jax.errors import UserError

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CHUNK_BYTES = 64 << 20  # one read buffer: the most one read call asks for
PROGRESS_BYTES = 4 << 20
MAX_GAP_BYTES = 0  # ranges further apart than this are read separately (the gap is not read)
MERGE_BOXES = True  # adjacent local boxes are read as one (tests turn it off to check each box)
Box = tuple[tuple[int, int], ...]  # (start, stop) per axis


# --- the files ---------------------------------------------------------------------
class SafetensorsReader:
  """Tensors of a (sharded) safetensors checkpoint, read one at a time at their header offsets.

  safetensors' numpy backend cannot return float8 tensors, and its torch backend would make
  torch a load-time dependency; the format is a JSON header plus raw little-endian bytes, so
  reading exactly one tensor's bytes works for every dtype and never maps a whole file.
  """

  def __init__(self, directory: str | os.PathLike):
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise UserError(f"{index}: no 'weight_map' object; is the download complete?")
      files = sorted(set(weight_map.values()))
    elif (d / "model.safetensors").exists():
      files = ["model.safetensors"]
    else:
      raise UserError(f"{d}: no model.safetensors or model.safetensors.index.json")
    self.entries: dict[str, tuple[Path, int, int, str, tuple[int, ...]]] = {}
    for name in files:
      f = d / name
      if not f.is_file():
        raise UserError(f"{f}: missing, but {index.name} lists it; is the download complete?")
      for key, entry in _read_header(f).items():
        self.entries[key] = (f, *entry)

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self.entries[key][4]

  def dtype(self, key: str) -> str:
    """The safetensors dtype name (F32, BF16, F8_E4M3, ...)."""
    return self.entries[key][3]

  def read(self, key: str) -> np.ndarray:
    path, offset, nbytes, dtype, shape = self.entries[key]
    if dtype not in ST_DTYPES:
      raise UserError(f"tensor {key!r}: unsupported safetensors dtype {dtype}")
    with open(path, "rb") as fh:
      fh.seek(offset)
      return np.frombuffer(fh.read(nbytes), dtype=ST_DTYPES[dtype]).reshape(shape)


def read_json(path: Path) -> dict:
  """A JSON object from `path`; a file that does not parse is named (truncated downloads are common)."""
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e}); is the file complete?") from None
  if not isinstance(value, dict):
    raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _read_header(f: Path) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
  """key -> (offset, nbytes, dtype, shape) from a safetensors header, checked against the file size."""
  size = f.stat().st_size
  damaged = f"{f}: not a complete safetensors file"
  with open(f, "rb") as fh:
    n = int.from_bytes(fh.read(8), "little")
    if size < 8 or 8 + n > size:
      raise UserError(f"{damaged} ({size} bytes, header claims {n}); is the download complete?")
    try:
      header = json.loads(fh.read(n))
      out = {}
      for key, meta in header.items():
        if key != "__metadata__":
          begin, end = meta["data_offsets"]
          out[key] = (8 + n + begin, end - begin, meta["dtype"], tuple(meta["shape"]))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
      raise UserError(f"{damaged} (unreadable header: {e})") from None
  for key, (_, nbytes, dtype, shape) in out.items():
    if dtype in ST_DTYPES and nbytes != math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize:
      raise UserError(f"{damaged}: tensor {key!r} {dtype}{list(shape)} spans {nbytes} bytes")
  end = max((off + nb for off, nb, _, _ in out.values()), default=8 + n)
  if end > size:
    raise UserError(f"{damaged}: its tensors need {end} bytes, the file has {size} (truncated?)")
  return out


# --- boxes of tensors ------------------------------------------------------------
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
  """What one process read: bytes (gaps included), read calls, seconds of the whole load (reads,
  layout, dequantization, device transfers) and of the read calls alone, the checkpoint's tensor
  bytes (all files, for the fraction) and the bytes its boxes need (the progress bar's total)."""

  bytes_read: int = 0
  reads: int = 0
  seconds: float = 0.0
  read_seconds: float = 0.0
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
    start = time.perf_counter()
    f.seek(offset)
    done = 0
    while done < len(out):
      n = f.readinto(out[done:])
      if not n:
        raise OSError(f"{path}: ends before byte {offset + len(out)} (truncated while loading?)")
      done += n
    self.stats.read_seconds += time.perf_counter() - start
    self.stats.bytes_read += len(out)
    self.stats.reads += 1
    self._unreported += len(out)
    if self.progress and self._unreported >= PROGRESS_BYTES:  # per-row reads: not one bar update each
      self.progress(self._unreported)
      self._unreported = 0

  def block(self, entry, rows: np.ndarray, cols: np.ndarray, np_dtype) -> np.ndarray:
    """entry (path, offset, nbytes, dtype, shape) of a 2-D [R, C] or 1-D [R] tensor -> its
    [rows][:, cols] ([rows] for 1-D) without reading anything else (up to max_gap). rows and
    cols are strictly increasing (AxisMap.hf_indices lists them so)."""
    path, base, _, _, shape = entry
    if np.any(np.diff(rows) <= 0) or (len(shape) == 2 and np.any(np.diff(cols) <= 0)):
      raise ValueError("RangeReader.block: rows and cols must be strictly increasing")
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
      block = _to_f32(block) * scale[np.ix_(np.searchsorted(ur, rb), np.searchsorted(uc, cb))]
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


_FP8_TO_F32 = {t: np.arange(256, dtype=np.uint8).view(t).astype(np.float32)
               for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


def _to_f32(x: np.ndarray) -> np.ndarray:
  """astype(float32), by table for the 256 float8 values (the same bits, several times faster)."""
  table = _FP8_TO_F32.get(x.dtype.type)
  return table[x.view(np.uint8)] if table is not None else x.astype(np.float32)


def merge_boxes(boxes: list[Box]) -> list[Box]:
  """Disjoint boxes -> fewer disjoint boxes with the same union: two that touch along one axis
  and agree on the others become one (read as one: longer ranges, fewer reads)."""
  boxes = list(boxes)
  merged = True
  while merged:
    merged = False
    for i, j in itertools.combinations(range(len(boxes)), 2):
      a, b = boxes[i], boxes[j]
      differ = [d for d in range(len(a)) if a[d] != b[d]]
      if len(differ) == 1 and (a[differ[0]][1] == b[differ[0]][0] or b[differ[0]][1] == a[differ[0]][0]):
        d = differ[0]
        boxes[i] = a[:d] + ((min(a[d][0], b[d][0]), max(a[d][1], b[d][1])),) + a[d + 1:]
        del boxes[j]
        merged = True
        break
  return boxes


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
  data = {}
  for big in merge_boxes(boxes) if MERGE_BOXES else boxes:  # each read once, the devices' boxes cut from it
    value = reader.fill(source, big)
    for b in boxes:
      if all(s >= bs and e <= be for (s, e), (bs, be) in zip(b, big)):
        data[b] = value[tuple(slice(s - bs, e - bs) for (s, e), (bs, _) in zip(b, big))]
  return jax.make_array_from_callback(source.shape, sharding, lambda index: data[box_of(index, source.shape)])


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
