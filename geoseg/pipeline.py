"""Block -> tiles -> logits -> blend -> class block, eagerly or as a dask graph.

Two paths give the same answer (tested):

* :func:`predict_array` — the reference: one accumulator over a whole
  in-memory image. Used by ``Model.infer`` on small images.
* :func:`block_graph` — the streaming path: one dask task per output block
  runs that block's tiles and returns its accumulator split into the block's
  own part and the thin ``overlap``-wide strips that belong to the blocks
  below/right; a second task per block adds the strips it receives and
  resolves classes. Memory is bounded by the block and batch sizes, never by
  the scene.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from affine import Affine

from .blend import Blend, accumulate, make_window, resolve
from .grid import Grid, Layout
from .models.card import ModelCard

NODATA = 255


class Source(Protocol):
    def read(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]: ...


class Runnable(Protocol):
    card: ModelCard

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def default_overlap(tile: int) -> int:
    """Default overlap: 1/8 of the tile (64 px for 512-px tiles)."""
    return max(16, tile // 8)


def default_margin(overlap: int) -> int:
    """Default low-weight tile margin: a quarter of the overlap."""
    return overlap // 4


@dataclass(frozen=True)
class RunOptions:
    """Options of one prediction, resolved and validated."""

    tile: int
    overlap: int
    blend: Blend = "hann"
    batch_size: int = 4
    confidence: bool = False
    margin: int | None = None  # None: default_margin(overlap)

    def window(self) -> np.ndarray:
        """The (tile, tile) blending window these options describe (made once, shared: do not modify)."""
        w = self.__dict__.get("_window")
        if w is None:
            m = default_margin(self.overlap) if self.margin is None else self.margin
            w = make_window(self.blend, self.tile, m)
            object.__setattr__(self, "_window", w)
        return w


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
    """
    todo = [(r, c) for r, c in origins if tile_mask[r : r + tile, c : c + tile].any()]
    all_valid = bool(valid.all())
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        xb = model.card.normalize(np.stack([data[:, r : r + tile, c : c + tile] for r, c in batch]))
        if not all_valid:
            vb = np.stack([valid[r : r + tile, c : c + tile] for r, c in batch])
            np.copyto(xb, np.float32(0.0), where=~vb[:, None])
        logits = model(xb)
        for (r, c), lg in zip(batch, logits):
            accumulate(acc, lg, window, r, c)
    return len(todo), len(origins) - len(todo)


def _histogram(classes: np.ndarray, k: int) -> np.ndarray:
    h = np.bincount(classes.ravel(), minlength=256)
    return np.concatenate([h[:k], h[NODATA : NODATA + 1]]).astype(np.int64)


def predict_array(
    image: np.ndarray,
    model: Runnable,
    opts: RunOptions,
    *,
    valid: np.ndarray | None = None,
    pad_multiple: int | None = None,
) -> BlockOut:
    """Eager reference path: tile, run and blend a whole (C, H, W) image in memory."""
    from .io.raster import ArraySource

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
    return BlockOut(classes, conf, _histogram(classes, card.num_classes), run, skipped)


# --------------------------------------------------------------------------- streaming

Sink = Callable[[tuple[int, int], BlockOut], Any]
Strips = tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]


def process_block(source: Source, model_ref: Any, layout: Layout, opts: RunOptions, i: int, j: int,
                  from_top: np.ndarray | None, from_left: np.ndarray | None,
                  from_corner: np.ndarray | None, sink: Sink | None = None) -> tuple[Any, Strips]:
    """Run block (i, j)'s tiles, add the strips its upper/left neighbours sent, resolve it.

    Returns ``(out, (bottom, right, corner))``: ``out`` is the block's
    :class:`BlockOut` (or None when ``sink`` consumed it here) and the strips
    are this block's overhang for blocks (i + 1, j), (i, j + 1) and
    (i + 1, j + 1), or None past the raster's edge. Each strip is
    ``(K + 1, overlap, ·)`` float32: weighted logits and weights.
    """
    model = _resolve_model(model_ref)
    rows, cols = layout.block_extent(i, j)
    data, ok = source.read(rows, cols)
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
    out = BlockOut(classes, conf, _histogram(classes, model.card.num_classes), run, skipped)
    if sink is not None:
        sink((i, j), out)
        return None, (bottom, right, corner)
    return out, (bottom, right, corner)


def _resolve_model(ref: Any) -> Runnable:
    from .models.loading import ModelSpec, cached_model

    return cached_model(ref) if isinstance(ref, ModelSpec) else ref


class StripStore:
    """Strips waiting for their one consumer block (thread-safe; each is taken exactly once).

    Keys are ``(i, j, k)`` for block (i, j)'s bottom (k=0), right (1) and
    corner (2) strip. A strip lives from the task that makes it to the task
    that takes it, so at most about one row of blocks' strips is held.
    """

    def __init__(self) -> None:
        self._strips: dict[tuple[int, int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def put(self, i: int, j: int, strips: Strips) -> None:
        with self._lock:
            for k, s in enumerate(strips):
                if s is not None:
                    self._strips[i, j, k] = s

    def take(self, i: int, j: int, k: int) -> np.ndarray | None:
        with self._lock:
            return self._strips.pop((i, j, k), None)

    def __len__(self) -> int:
        return len(self._strips)


def _block_in_process(store: StripStore, source: Source, model_ref: Any, layout: Layout,
                      opts: RunOptions, i: int, j: int, sink: Sink, *after: None) -> None:
    """One block on the local scheduler: strips come from and go to ``store``.

    ``after`` are the neighbour tasks this one must follow (their results are None).
    """
    _, strips = process_block(source, model_ref, layout, opts, i, j, store.take(i - 1, j, 0),
                              store.take(i, j - 1, 1), store.take(i - 1, j - 1, 2), sink)
    store.put(i, j, strips)


def stream_blocks(source: Source, model_ref: Any, layout: Layout, opts: RunOptions, sink: Sink, *,
                  scheduler: Any = "threads", num_workers: int | None = None,
                  band_tasks: int = 32) -> None:
    """Compute every block through dask and hand each to ``sink(ij, block)`` once.

    Block (i, j) is one task that follows blocks (i - 1, j), (i, j - 1) and
    (i - 1, j - 1), whose strips it adds, so blocks run as a wavefront and no
    accumulator outlives its task.

    ``scheduler`` is a dask local scheduler name (``threads``, ``sync``) or a
    ``distributed.Client``. Locally the sink runs inside each task and strips
    pass through a :class:`StripStore`, each freed the moment it is used. On
    a cluster, strips travel as task results and class blocks stream back to
    this process, which runs the sink; the graph goes out in bands of block
    rows (at least ``band_tasks`` blocks each) with only the last row's strips
    carried over, so memory does not depend on how the cluster orders it.
    """
    import dask

    if isinstance(scheduler, str):
        # A plain task graph: nothing to tokenize, so the first block starts at once.
        from dask.local import get_sync
        from dask.threaded import get as get_threaded

        store = StripStore()
        dsk: dict[str, tuple[Any, ...]] = {}
        for i, j in layout.iter_blocks():
            after = [f"geoseg-block-{a}-{b}" for a, b in ((i - 1, j), (i, j - 1), (i - 1, j - 1))
                     if a >= 0 and b >= 0]
            dsk[f"geoseg-block-{i}-{j}"] = (_block_in_process, store, source, model_ref, layout, opts, i, j,
                                            sink, *after)
        if scheduler == "sync":
            get_sync(dsk, list(dsk))
        elif scheduler == "threads":
            get_threaded(dsk, list(dsk), num_workers=num_workers)
        else:
            raise ValueError(f"unknown local scheduler {scheduler!r}; use 'threads' or 'sync'")
        return

    nbi, nbj = layout.blocks
    band = max(2, -(-band_tasks // nbj))
    carry: list[tuple[Any, Any]] | None = None  # (bottom, corner) of the row above the band
    for i0 in range(0, nbi, band):
        i1 = min(i0 + band, nbi)
        tasks: dict[tuple[int, int], Any] = {}
        for i in range(i0, i1):
            for j in range(nbj):
                if i == i0:
                    top = carry[j][0] if carry else None
                    corner = carry[j - 1][1] if carry and j > 0 else None
                else:
                    top = tasks[i - 1, j][1][0]
                    corner = tasks[i - 1, j - 1][1][2] if j > 0 else None
                left = tasks[i, j - 1][1][1] if j > 0 else None
                tasks[i, j] = dask.delayed(process_block, pure=False, nout=2)(
                    source, model_ref, layout, opts, i, j, top, left, corner, None,
                    dask_key_name=f"geoseg-block-{i}-{j}",
                )
        last = [(tasks[i1 - 1, j][1][0], tasks[i1 - 1, j][1][2]) for j in range(nbj)]
        carry = _run_band_on_cluster(scheduler, tasks, last, sink)


def _run_band_on_cluster(client: Any, tasks: dict[tuple[int, int], Any], last: list[Any],
                         sink: Sink) -> list[tuple[Any, Any]]:
    from distributed import as_completed

    keys = list(tasks)
    futures = client.compute([tasks[k][0] for k in keys])
    strip_futures = client.compute(last)
    index = {f.key: k for f, k in zip(futures, keys)}
    for fut, blk in as_completed(futures, with_results=True):
        sink(index[fut.key], blk)
        fut.release()
    return [tuple(x) for x in client.gather(strip_futures)]
