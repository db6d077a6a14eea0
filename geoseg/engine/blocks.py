"""Block -> tiles -> logits -> blend -> class block: the one block function every path runs.

* :func:`predict_array` — the reference: one accumulator over a whole
  in-memory image (``infer`` on small images).
* :func:`compute_block` — one output block of a :class:`~geoseg.geometry.grid.Layout`:
  runs the tiles the block owns, adds the strips its upper and left
  neighbours sent, resolves its classes and returns its own overhang as
  strips for the blocks below and to the right. The dask graphs of
  :mod:`geoseg.engine.schedule` (files) and :mod:`geoseg.engine.lazy`
  (xarray / dask arrays) are made of this function; each tile runs once and
  memory is bounded by the block and batch sizes, never by the scene.

Both give the same classes as each other (tested), and the same as
:mod:`geoseg.engine.device`, which runs the same steps on a GPU.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from affine import Affine

from ..geometry.grid import Grid, Layout
from ..geometry.units import NODATA
from ..io.raster import ArraySource
from ..models.card import ModelCard
from .blend import accumulate, resolve
from .options import RunOptions


class Source(Protocol):
    def read(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]: ...


class Runnable(Protocol):
    card: ModelCard

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class BlockOut:
    """What a finished block hands to the writer (plus counters for the summary)."""

    classes: np.ndarray  # (h, w) uint8, NODATA where invalid
    confidence: np.ndarray | None  # (h, w) float32, -1 where invalid
    histogram: np.ndarray  # (K + 1,) int64 pixel counts per class, last = nodata
    tiles_run: int
    tiles_skipped: int


def _run_tiles(model: Runnable, data: np.ndarray, valid: np.ndarray, tile_mask: np.ndarray,
               origins: list[tuple[int, int]], acc: np.ndarray, window: np.ndarray, tile: int,
               batch_size: int) -> tuple[int, int]:
    """Run the tiles at local ``origins`` of raw ``data`` (C, H, W) through ``model`` into ``acc``.

    Tiles are normalised batch by batch (raw values are stacked, so the
    float32 input is written once); pixels where ``valid`` is False become 0,
    the band mean after normalisation. A tile whose in-raster pixels are all
    invalid (``tile_mask``) is skipped. Returns (tiles run, tiles skipped).

    With a model of several streams, a block's batches run on all of them
    (see :func:`_in_parallel`), so the blocks at the ends of the wavefront,
    which run alone, still use every core. Logits are accumulated in batch
    order, so the result does not depend on it.
    """
    todo = [(r, c) for r, c in origins if tile_mask[r : r + tile, c : c + tile].any()]
    all_valid = bool(valid.all())

    def forward(batch: list[tuple[int, int]]) -> np.ndarray:
        xb = model.card.normalize(np.stack([data[:, r : r + tile, c : c + tile] for r, c in batch]))
        if not all_valid:
            vb = np.stack([valid[r : r + tile, c : c + tile] for r, c in batch])
            np.copyto(xb, np.float32(0.0), where=~vb[:, None])
        return model(xb)

    batches = [todo[k : k + batch_size] for k in range(0, len(todo), batch_size)]
    for batch, logits in zip(batches, _in_parallel(forward, batches, int(getattr(model, "streams", 1)))):
        for (r, c), lg in zip(batch, logits):
            accumulate(acc, lg, window, r, c)
    return len(todo), len(origins) - len(todo)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _in_parallel(func: Callable[[Any], Any], items: list[Any], streams: int) -> Iterator[Any]:
    """``map(func, items)``, at most ``streams + 1`` at a time on a shared thread pool, results in order.

    The model's own stream slots bound the forward passes that run at once;
    the extra item in flight is being normalised meanwhile. ``func`` must not
    itself wait on this pool (it runs forward passes only), or a full pool
    could wait on itself.
    """
    global _POOL
    if streams <= 1 or len(items) <= 1:
        yield from map(func, items)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < 2 * streams:  # noqa: SLF001 - grows with the widest model
            if _POOL is not None:
                _POOL.shutdown(wait=False)  # its running items finish; new ones go to the wider pool
            _POOL = ThreadPoolExecutor(2 * streams, thread_name_prefix="geoseg-batch")
        pool = _POOL
    pending: deque[Future[Any]] = deque()
    todo = iter(items)
    try:
        for item in itertools.islice(todo, streams + 1):
            pending.append(pool.submit(func, item))
        while pending:
            out = pending.popleft().result()
            for item in itertools.islice(todo, 1):
                pending.append(pool.submit(func, item))
            yield out
    finally:  # a failed batch (or a consumer that stops): the queued ones do not run
        for f in pending:
            f.cancel()


def class_histogram(classes: np.ndarray, k: int) -> np.ndarray:
    """(K + 1,) int64 pixel counts of a uint8 class block: classes 0..K-1, then nodata."""
    return fold_histogram(np.bincount(classes.ravel(), minlength=256), k)


def fold_histogram(counts: np.ndarray, k: int) -> np.ndarray:
    """256 counts, one per uint8 value -> (K + 1,) int64: classes 0..K-1, then nodata."""
    return np.concatenate([counts[:k], counts[NODATA : NODATA + 1]]).astype(np.int64)


def predict_array(
    image: np.ndarray,
    model: Runnable,
    opts: RunOptions,
    *,
    valid: np.ndarray | None = None,
    pad_multiple: int | None = None,
) -> BlockOut:
    """Eager reference path: tile, run and blend a whole (C, H, W) image in memory."""
    card = model.card
    c, h, w = image.shape
    layout = Layout.create(Grid((h, w), Affine.identity()), tile=opts.tile, overlap=opts.overlap,
                           pad_multiple=pad_multiple or card.pad_multiple)
    opts = replace(opts, tile=layout.tile, overlap=layout.overlap)
    nr, nc = layout.tiles
    s, t = layout.stride, layout.tile
    src = ArraySource(image, valid)
    data, ok = src.read(slice(0, (nr - 1) * s + t), slice(0, (nc - 1) * s + t))
    inside = np.zeros(ok.shape, bool)
    inside[:h, :w] = True
    acc = np.zeros((card.num_classes + 1, *ok.shape), np.float32)
    origins = [(r * s, q * s) for r in range(nr) for q in range(nc)]
    run, skipped = _run_tiles(model, data, ok, ok & inside, origins, acc, opts.window(), t, opts.batch_size)
    v = ok[:h, :w]
    classes, conf = resolve(acc[:, :h, :w], v, nodata=NODATA, confidence=opts.confidence)
    return BlockOut(classes, conf, class_histogram(classes, card.num_classes), run, skipped)


Sink = Callable[[tuple[int, int], BlockOut], Any]
Strips = tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]


def process_block(source: Source, model_ref: Any, layout: Layout, opts: RunOptions, i: int, j: int,
                  from_top: np.ndarray | None, from_left: np.ndarray | None,
                  from_corner: np.ndarray | None, sink: Sink | None = None) -> tuple[Any, Strips]:
    """Read block (i, j)'s extent from ``source``, then :func:`compute_block`.

    With ``sink``, the block is handed to ``sink(ij, out)`` here and ``out``
    is returned as None (so a task result holds only the strips).
    """
    rows, cols = layout.block_extent(i, j)
    data, ok = source.read(rows, cols)
    out, strips = compute_block(data, ok, model_ref, layout, opts, i, j, from_top, from_left, from_corner)
    if sink is not None:
        sink((i, j), out)
        return None, strips
    return out, strips


def compute_block(data: np.ndarray, ok: np.ndarray, model_ref: Any, layout: Layout, opts: RunOptions,
                  i: int, j: int, from_top: np.ndarray | None, from_left: np.ndarray | None,
                  from_corner: np.ndarray | None) -> tuple[BlockOut, Strips]:
    """Run block (i, j)'s tiles, add the strips its upper/left neighbours sent, resolve it.

    ``data`` (C, h, w) raw values and ``ok`` (h, w) validity cover the
    block's extent (:meth:`Layout.block_extent`, reflected past the edges).
    Returns ``(out, (bottom, right, corner))``: the block's
    :class:`BlockOut` and its overhang for blocks (i + 1, j), (i, j + 1) and
    (i + 1, j + 1), or None past the raster's edge. Each strip is
    ``(K + 1, overlap, ·)`` float32: weighted logits and weights.
    """
    model = as_runnable(model_ref)
    rows, cols = layout.block_extent(i, j)
    h, w = layout.grid.shape
    in_r = np.arange(rows.start, rows.stop) < h
    in_c = np.arange(cols.start, cols.stop) < w
    inside = in_r[:, None] & in_c[None, :]
    acc = np.zeros((model.card.num_classes + 1, *ok.shape), np.float32)
    origins = [(r - rows.start, c - cols.start) for r, c in layout.block_tiles(i, j)]
    run, skipped = _run_tiles(model, data, ok, ok & inside, origins, acc, opts.window(), layout.tile,
                              opts.batch_size)
    del data
    for strip in (from_top, from_left, from_corner):
        if strip is not None:
            acc[:, : strip.shape[1], : strip.shape[2]] += strip
    br, bc = layout.block_slices(i, j)
    bh, bw = br.stop - br.start, bc.stop - bc.start
    # The overhang is clipped to the raster; nothing beyond it is ever written.
    eh, ew = min(acc.shape[1], h - rows.start), min(acc.shape[2], w - cols.start)
    bottom = acc[:, bh:eh, :bw].copy() if eh > bh else None
    right = acc[:, :bh, bw:ew].copy() if ew > bw else None
    corner = acc[:, bh:eh, bw:ew].copy() if eh > bh and ew > bw else None
    classes, conf = resolve(acc[:, :bh, :bw], ok[:bh, :bw], nodata=NODATA, confidence=opts.confidence)
    out = BlockOut(classes, conf, class_histogram(classes, model.card.num_classes), run, skipped)
    return out, (bottom, right, corner)


def as_runnable(ref: Any) -> Runnable:
    """The backend behind ``ref``: a loaded backend, a :class:`geoseg.Model`, or a
    :class:`~geoseg.models.loading.ModelSpec` (loaded once per process, for cluster workers)."""
    from ..models.loading import ModelSpec, cached_model
    from .adapters import AdaptedSpec

    if isinstance(ref, ModelSpec):
        return cached_model(ref)
    if isinstance(ref, AdaptedSpec):
        return ref.load()
    return getattr(ref, "backend", ref)


