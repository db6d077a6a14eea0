"""The stages of a ``predict`` run, each writing into the staging folder.

inference (class COG, confidence) -> sieve -> polygons -> stats -> quicklook.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.blocks import BlockOut, class_histogram
from ..engine.schedule import stream_blocks
from ..errors import ConfigError
from ..geometry.units import NODATA
from ..io.raster import BlockWriter, class_tags
from ..io.staging import Journal
from ..io.styles import hex_color, paletted_raster_qml, write_text_atomic
from ..models.backends import available_cores, torch_threads_kept
from .plan import Plan, block_threads, probe_scheduler


@dataclass
class Counts:
    """What inference did: pixels per class (last = nodata), tiles, blocks, host/device bytes."""

    histogram: np.ndarray
    tiles_run: int = 0
    tiles_skipped: int = 0
    blocks: int = 0
    transfers: dict[str, Any] = field(default_factory=dict)
    cog_s: float = 0.0  # closing the working GeoTIFFs and writing the COGs
    # seconds spent storing finished blocks, summed over the threads that store them
    writes_s: dict[str, float] = field(default_factory=lambda: {"journal": 0.0, "rasters": 0.0, "overviews": 0.0})


def connect(scheduler: Any) -> tuple[Any, Any]:
    """(scheduler for stream_blocks, client to close or None)."""
    if scheduler in (None, "threads", "local"):
        return "threads", None
    if scheduler == "sync":
        return "sync", None
    if isinstance(scheduler, str):
        from distributed import Client

        probe_scheduler(scheduler)
        try:
            return (c := Client(scheduler, timeout="20s")), c
        except (OSError, TimeoutError, ValueError) as e:
            raise ConfigError(f"cannot reach dask scheduler {scheduler}: {str(e).splitlines()[0]}; "
                              "is it running?") from None
    return scheduler, None  # a distributed.Client the caller owns


def inference(plan: Plan, staging: Path, progress: Callable[[int, int], None] | None,
              journal: Journal | None = None, scheduler: Any = "threads") -> Counts:
    """Run every block and write ``classes.tif`` (and ``confidence.tif``) as COGs into ``staging``.

    With a ``journal``, each finished block is also saved there, and blocks
    it already holds (a resumed run) are written from it instead of run.
    """
    mc, layout, d, source = plan.net.card, plan.layout, plan.decimation, plan.source
    palette = mc.palette()
    # a block of the decimated grid covers (block * d)² scene pixels: it is written in pieces of at most
    # PIECE² pixels, so memory does not grow with d (pieces start on multiples of unit, the writers' block)
    piece, unit = scene_piece(layout.block * d) if d > 1 else (layout.block, layout.block)
    writers = {"classes": BlockWriter(
        staging / "classes.tif", plan.grid, dtype="uint8", nodata=NODATA, block=unit,
        colormap={i: (*rgb, 255) for i, rgb in enumerate(palette)} | {NODATA: (0, 0, 0, 0)},
        tags=class_tags(list(mc.classes), [hex_color(p) for p in palette]), description="class")}
    if plan.outputs.confidence:
        try:
            writers["confidence"] = BlockWriter(
                staging / "confidence.tif", plan.grid, dtype="float32", nodata=-1.0, block=unit,
                description="confidence (max softmax)", resampling="average")
        except BaseException:
            writers["classes"].abort()
            raise
    total = layout.blocks[0] * layout.blocks[1]
    counts = Counts(np.zeros(mc.num_classes + 1, np.int64))
    lock = threading.Lock()

    def sink(ij: tuple[int, int], blk: BlockOut, saved: bool = False) -> None:
        t0 = time.perf_counter()
        if journal is not None and not saved:
            journal.save(ij, blk.classes, blk.confidence)
        journal_s = time.perf_counter() - t0
        rows, cols = layout.block_slices(*ij)
        t1 = time.perf_counter()
        ovr = 0.0
        pieces = _on_scene_grid(plan, source, rows, cols, blk, piece) if d > 1 else [(rows, cols, blk)]
        hist = np.zeros_like(blk.histogram)
        for r, c, part in pieces:
            ovr += writers["classes"].write(r, c, part.classes)
            if part.confidence is not None:
                ovr += writers["confidence"].write(r, c, part.confidence)
            hist += part.histogram
        t2 = time.perf_counter()
        with lock:
            counts.writes_s["journal"] += journal_s
            counts.writes_s["rasters"] += t2 - t1 - ovr
            counts.writes_s["overviews"] += ovr
            counts.tiles_run += blk.tiles_run
            counts.tiles_skipped += blk.tiles_skipped
            counts.histogram += hist
            counts.blocks += 1
            if progress:
                progress(counts.blocks, total)

    done = journal.done() if journal is not None else frozenset()
    try:
        for ij in sorted(done):
            sink(ij, _saved_block(journal, ij, plan), saved=True)
        with torch_threads_kept():
            if plan.engine == "device":
                from ..engine.device import run_on_device

                io = max(2, min(8, available_cores() // 2))  # reader and writer threads each
                counts.transfers = run_on_device(source, plan.runner, layout, plan.opts, sink, readers=io,
                                                 prefetch=2 * io, writers=io, done=done).as_dict()
            else:
                stream_blocks(source, plan.model_ref, layout, plan.opts, sink, scheduler=scheduler,
                              num_workers=block_threads(plan.compute, plan.net), done=done)
        t = time.perf_counter()
        writers["classes"].finish(category_names=list(mc.classes))
        if "confidence" in writers:
            writers["confidence"].finish()
        counts.cog_s = time.perf_counter() - t
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    write_text_atomic(staging / "classes.qml", paletted_raster_qml(list(mc.classes), palette))
    return counts


#: The largest side of a piece of the scene's own grid written at once for a decimated block.
PIECE = 2048


def scene_piece(side: int) -> tuple[int, int]:
    """How a block of ``side`` scene pixels is written: ``(piece, unit)``.

    Pieces of ``piece`` x ``piece`` pixels (at most :data:`PIECE`, and a
    multiple of the largest power of two up to 512 that divides ``side``)
    are cut from the block's corner; the last row and column of pieces are
    shorter where ``piece`` does not divide ``side``. Every piece then starts
    on a multiple of ``unit`` (which divides ``piece`` and ``side``), the
    block size the class raster's writer and overview pyramid are given.
    """
    if side <= PIECE or side % 16:
        return side, side
    a = math.gcd(side, 512, PIECE)
    piece = PIECE // a * a
    return piece, math.gcd(piece, side)


def _on_scene_grid(plan: Plan, source: Any, rows: slice, cols: slice, blk: BlockOut,
                   piece: int) -> Iterator[tuple[slice, slice, BlockOut]]:
    """A block of the decimated working grid as the scene pixels it covers (each cell d x d pixels),
    in pieces of at most ``piece`` x ``piece`` scene pixels cut from the block's corner (:func:`scene_piece`)."""
    d = plan.decimation
    h, w = plan.grid.shape
    k = plan.net.card.num_classes
    r0, r1 = rows.start * d, min(rows.stop * d, h)
    c0, c1 = cols.start * d, min(cols.stop * d, w)
    for pr in range(r0, r1, piece):
        for pc in range(c0, c1, piece):
            r, c = slice(pr, min(pr + piece, r1)), slice(pc, min(pc + piece, c1))
            # the working-grid cells under this piece, each repeated d x d and cut to the piece
            wr = slice((pr - r0) // d, -(-(r.stop - r0) // d))
            wc = slice((pc - c0) // d, -(-(c.stop - c0) // d))
            cut = (slice((pr - r0) % d, (pr - r0) % d + r.stop - r.start),
                   slice((pc - c0) % d, (pc - c0) % d + c.stop - c.start))
            classes = np.repeat(np.repeat(blk.classes[wr, wc], d, axis=0), d, axis=1)[cut]
            conf = None if blk.confidence is None else \
                np.repeat(np.repeat(blk.confidence[wr, wc], d, axis=0), d, axis=1)[cut]
            mask = source.native_mask(r, c)
            if mask is not None:  # the scene's own nodata, at full resolution
                classes[~mask] = NODATA
                if conf is not None:
                    conf[~mask] = -1.0
            # the block's tile counts are the block's (see sink); a piece carries only its histogram
            yield r, c, BlockOut(classes, conf, class_histogram(classes, k), 0, 0)


def _saved_block(journal: Any, ij: tuple[int, int], plan: Plan) -> BlockOut:
    classes = journal.load(ij)
    conf = journal.load(ij, "confidence") if plan.outputs.confidence else None
    k = plan.net.card.num_classes
    tiles = len(plan.layout.block_tiles(*ij))  # run before the interruption (nodata tiles counted as run)
    return BlockOut(classes, conf, class_histogram(classes, k), tiles, 0)


def post(plan: Plan, staging: Path, journal: Journal | None = None,
         scheduler: Any = "threads") -> tuple[dict[str, Any], Any]:
    """Sieve, polygons and area statistics from the staged ``classes.tif``.

    With a ``journal``, sieve and polygons are recorded as steps, and steps
    an interrupted run finished are not done again.
    """
    from ..post.landcover import area_stats, sieve, vectorize, write_stats

    o = plan.outputs
    state = (journal.read_state() or {}) if journal is not None else {}
    vec: dict[str, Any] = dict(state.get("vectorize", {}))
    steps = set(state.get("steps", []))
    classes = staging / "classes.tif"
    if o.min_area and "sieve" not in steps:
        vec["sieve_pixels"] = sieve(classes, o.min_area)
        if journal is not None:
            journal.step_done("sieve", vectorize=vec)
    if o.polygons and "polygons" not in steps:
        executor = None if isinstance(scheduler, str) else scheduler.get_executor()  # on a cluster: its workers
        vec.update(vectorize(classes, staging / "polygons", fmt=o.vector_format, simplify=o.simplify,
                             overwrite=True, num_workers=plan.compute.num_workers, executor=executor))
        vec["path"] = str(plan.out / Path(vec["path"]).name)
        if journal is not None:
            journal.step_done("polygons", vectorize=vec)
    areas = area_stats(classes, zones=o.zones, zone_field=o.zone_field)
    write_stats(areas, staging, source=plan.given)
    return vec, areas


def quicklook(plan: Plan, staging: Path) -> None:
    from ..io.quicklook import display_bands, write_quicklook

    mc = plan.net.card
    write_quicklook(plan.src, display_bands(plan.bands, mc.bands or []), staging / "classes.tif",
                    staging / "quicklook.png", list(mc.classes), mc.palette())
