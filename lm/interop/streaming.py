"""Our Orbax checkpoints, written and read one layer at a time.

Orbax saves a tree of arrays that already exist; a converted model would then be whole in memory
(on a CPU host, device memory is host memory, and a 70B model does not fit the HBM of a small
slice either). `StreamedArray` is a leaf that describes an array and produces it in pieces (one
layer of a stacked parameter, or a whole unstacked one); its Orbax type handler writes each piece
into the array's TensorStore in chunks of at most CHUNK_BYTES as it comes, so one piece is in
memory at a time. The result is an ordinary checkpoint: `checkpoints.load_model` restores it
straight onto any mesh's shardings, each process reading only its shards.

`ParamReader` is the reverse: it opens the stored arrays with TensorStore and reads a layer at a
time, so export never restores the whole model either.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import future
# Version-pinned internals (setup.py pins orbax-checkpoint): the spec builders the stock handlers
# use, so the streamed arrays are stored exactly as Orbax stores a numpy array.
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from lm import checkpoints

Pieces = Callable[[], Iterator[tuple[tuple[slice, ...], np.ndarray]]]


# Storage chunks are capped so TensorStore's per-write buffers stay small next to the one layer
# being written (a 70B w1 layer is 0.9 GB in fp32).
CHUNK_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """An array of `shape` and `dtype` that `pieces()` yields as (index, array) pieces.

  Each piece spans whole rows of `split_axis` chunks (`chunk_shape`), and is written a chunk
  row-block at a time.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  split_axis: int
  pieces: Pieces

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))


def _chunk_shape(shape: tuple[int, ...], axis: int, itemsize: int) -> tuple[int, ...]:
  """`shape` with 1 before `axis` and as many `axis` rows as fit in CHUNK_BYTES."""
  row_bytes = int(np.prod(shape[axis + 1:], dtype=np.int64)) * itemsize
  rows = max(1, min(shape[axis], CHUNK_BYTES // max(row_bytes, 1)))
  return (1,) * axis + (rows,) + tuple(shape[axis + 1:])


class _StreamedHandler(ocp.type_handlers.NumpyHandler):
  """Writes StreamedArrays piece by piece; stored as (and restored like) a numpy array."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _background_serialize(self, values, infos, args=None):
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.chunk_shape,
          dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(
              use_ocdbt=info.is_ocdbt_checkpoint))
      store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
      axis, step = value.split_axis, value.chunk_shape[value.split_axis]
      for index, piece in value.pieces():
        if piece.dtype != value.dtype:
          raise TypeError(f"{info.name}: piece dtype {piece.dtype} != {value.dtype}")
        offset = (index[axis].start or 0) if axis < len(index) else 0
        for start in range(0, piece.shape[axis], step):
          stop = min(start + step, piece.shape[axis])
          block = (slice(None),) * axis + (slice(start, stop),)
          target = tuple(index[:axis]) + (slice(offset + start, offset + stop),)
          # Awaited one at a time: the next piece is produced only once this one is on disk.
          await store[target].write(piece[block], can_reference_source_data_indefinitely=True)
        del piece  # before the next piece is produced, not after

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    return [future.CommitFutureAwaitingContractedSignals(
        self._background_serialize(values, infos, args), name="streamed_array")]


def stacked(shape: tuple[int, ...], dtype, layer: Callable[[int], np.ndarray]) -> StreamedArray:
  """A [L, ...] array whose layer i is `layer(i)` (shape[1:]), produced and stored per layer."""
  dtype = np.dtype(dtype)

  def pieces():
    for i in range(shape[0]):
      yield (slice(i, i + 1),), layer(i).astype(dtype, copy=False)[None]

  return StreamedArray(tuple(shape), dtype, _chunk_shape(shape, 1, dtype.itemsize), 1, pieces)


def whole(shape: tuple[int, ...], dtype, make: Callable[[], np.ndarray]) -> StreamedArray:
  """An array produced in one piece (the embedding, the output head, the final norm)."""
  dtype = np.dtype(dtype)
  return StreamedArray(tuple(shape), dtype, _chunk_shape(shape, 0, dtype.itemsize), 0,
                       lambda: iter([((), make().astype(dtype, copy=False))]))


def save(directory: str | os.PathLike, tree: Any, step: int = 0) -> None:
  """Writes `tree` (StreamedArrays) as the `params` item of DIR/checkpoints/<step>."""
  # A registry of our own, so the global one (used by every other save) is left alone.
  registry = ocp.type_handlers.create_type_handler_registry((StreamedArray, _StreamedHandler()))
  manager = ocp.CheckpointManager(
      epath.Path(directory) / checkpoints.CHECKPOINT_DIR,
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={"params": ocp.PyTreeCheckpointHandler(type_handler_registry=registry)})
  manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(tree)), force=True)
  manager.wait_until_finished()
  manager.close()


class ParamReader:
  """Reads single parameters, or single layers of stacked ones, from a model directory."""

  def __init__(self, directory: str | os.PathLike, step: int | None = None):
    manager = checkpoints.Manager(directory, async_save=False)
    step = manager.latest_step() if step is None else step
    manager.close()
    if step is None:
      raise FileNotFoundError(f"{directory}: no complete checkpoint under "
                              f"{checkpoints.CHECKPOINT_DIR}/")
    self.step = step
    self.items = epath.Path(directory) / checkpoints.CHECKPOINT_DIR / str(step) / "params"
    meta = json.loads((self.items / "_METADATA").read_text())
    self.use_ocdbt, self.use_zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3"))
    self.context = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
    self._open: dict[tuple[str, ...], Any] = {}

  def _store(self, path: tuple[str, ...]):
    if path not in self._open:
      info = ocp.type_handlers.ParamInfo(
          name=".".join(path), parent_dir=self.items, is_ocdbt_checkpoint=self.use_ocdbt,
          use_zarr3=self.use_zarr3, ts_context=self.context)
      spec = ts_utils.build_array_read_spec(info, use_ocdbt=self.use_ocdbt).json
      self._open[path] = ts.open(ts.Spec(spec), open=True, context=self.context).result()
    return self._open[path]

  def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(self._store(path).shape)

  def read(self, path: tuple[str, ...], layer: int | None = None) -> np.ndarray:
    """The whole parameter at `path`, or layer `layer` of a stacked one (shape[1:])."""
    store = self._store(path)
    return np.asarray(store.read().result() if layer is None else store[layer].read().result())
