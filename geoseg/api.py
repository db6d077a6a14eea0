"""``geoseg.predict``: a raster of any size in, a class COG (and friends) out."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BandCountError, ConfigError, OutputExistsError
from .grid import Grid, Layout
from .io.raster import BlockWriter, RasterSource, bounded_gdal_cache, class_tags, data_bands, open_raster
from .io.styles import paletted_raster_qml, write_text_atomic
from .models.backends import Backend, auto_batch_size, available_cores, torch_threads_kept
from .models.loading import ModelSpec, load_model
from .pipeline import (
    NODATA,
    BlockOut,
    RunOptions,
    default_margin,
    default_overlap,
    stream_blocks,
)

OUTPUT_NAMES = ("classes.tif", "classes.tif.aux.xml", "classes.qml", "confidence.tif", "run.json")


@dataclass
class PredictResult:
    """Paths written and what happened, as also recorded in ``run.json``."""

    output: Path
    files: dict[str, Path]
    classes: list[str]
    histogram: np.ndarray  # pixels per class, last entry = nodata
    tiles_run: int
    tiles_skipped: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    areas: Any = None  # stats.AreaTable of the final class raster

    @property
    def pixels(self) -> int:
        return int(self.histogram.sum())


def default_output(src: str | Path) -> Path:
    """``<stem>_geoseg`` in the current directory."""
    return Path.cwd() / f"{Path(str(src)).stem}_geoseg"


def _check_outputs(out: Path, names: Sequence[str], overwrite: bool) -> None:
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out / existing[0]} already exists; pass --overwrite or choose another --output"
        )


def block_threads(net: Backend) -> int:
    """Local threads working on blocks: one more than can compute at once.

    While a thread reads, blends or resolves a block, the spare one keeps
    every stream (and core) busy with a forward pass.
    """
    return max(available_cores(), net.streams) + 1


def _scheduler(scheduler: Any) -> tuple[Any, Any]:
    """(scheduler for stream_blocks, client to close or None)."""
    if scheduler in (None, "threads", "local"):
        return "threads", None
    if scheduler == "sync":
        return "sync", None
    if isinstance(scheduler, str):
        from distributed import Client

        try:
            return (c := Client(scheduler, timeout="20s")), c
        except OSError as e:
            raise ConfigError(f"cannot reach dask scheduler {scheduler}: {e}; is it running?") from None
    return scheduler, None  # a distributed.Client the caller owns


@bounded_gdal_cache
def predict(
    src: str | Path,
    output: str | Path | None = None,
    *,
    model: Any,
    card: str | Path | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    blend: Any = "hann",
    margin: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    streams: int | None = None,
    scheduler: Any = None,
    num_workers: int | None = None,
    bands: Sequence[int] | None = None,
    confidence: bool = False,
    polygons: bool = True,
    min_area: float | None = None,
    simplify: float | None = None,
    vector_format: str = "gpkg",
    zones: str | Path | None = None,
    zone_field: str | None = None,
    quicklook: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PredictResult:
    """Segment a raster of any size into ``output`` (default ``<stem>_geoseg``).

    Writes ``classes.tif`` (COG, uint8, nodata 255, palette, class names,
    mode overviews), ``classes.qml``, ``confidence.tif`` when ``confidence``
    (max softmax, float32, nodata -1) and ``run.json``. ``model`` is a name,
    a path or a loaded model (see :func:`geoseg.load_model`); ``bands`` are
    1-based band indexes (default: every band that is not alpha).
    ``streams`` is how many forward passes run at once (see
    :func:`geoseg.load_model`; ignored for an already loaded model).
    ``scheduler`` is ``None``/``"threads"`` (local threads), ``"sync"``, a
    ``tcp://`` address or a ``distributed.Client``. ``progress(done, total)``
    is called once per finished block.

    Then, from ``classes.tif``: with ``min_area`` (m²) small regions are
    sieved away first; ``polygons`` writes ``polygons.gpkg`` (or
    ``vector_format``) with ``polygons.qml``, coverage-simplified by
    ``simplify`` metres if given; ``stats.csv`` / ``stats.json`` give the
    area of each class (and per zone with ``zones``). ``quicklook`` draws
    the classes over the image in ``quicklook.png``.
    """
    t0 = time.perf_counter()
    out = Path(output) if output is not None else default_output(src)
    from .io.vector import vector_format as _vf

    names = ["classes.tif", "classes.qml", "stats.csv", "stats.json", "run.json"]
    names += ["confidence.tif"] if confidence else []
    names += ["quicklook.png"] if quicklook else []
    names += [f"polygons{_vf(vector_format)[1]}", "polygons.qml"] if polygons else []
    _check_outputs(out, names, overwrite)

    with open_raster(src) as ds:
        grid = Grid.from_rio(ds)
        use = list(bands) if bands else data_bands(ds)
        bad = [b for b in use if b < 1 or b > ds.count]
        if bad:
            raise ConfigError(f"band {bad[0]} does not exist; {src} has bands 1..{ds.count}")

    net = model if isinstance(model, Backend) else load_model(model, card=card, device=device, streams=streams)
    mc = net.card
    if len(use) != mc.in_channels:
        expect = f" ({', '.join(mc.bands)})" if mc.bands else ""
        fix = (f"choose {mc.in_channels} with --bands, e.g. --bands "
               f"{','.join(str(b) for b in range(1, mc.in_channels + 1))}"
               if len(use) > mc.in_channels else "use a raster with the bands the model was trained on")
        raise BandCountError(
            f"{src} has {len(use)} data bands but model {mc.name!r} expects {mc.in_channels}{expect}; {fix}"
        )
    tile = tile_size or mc.tile_size
    if mc.fixed_size and tile != mc.tile_size:
        raise ConfigError(f"model {mc.name!r} only accepts {mc.tile_size}-px tiles; drop --tile-size")
    ov = default_overlap(tile) if overlap is None else overlap
    layout = Layout.create(grid, tile=tile, overlap=ov, pad_multiple=mc.pad_multiple)
    bs = batch_size or auto_batch_size(net.device, layout.tile, mc.in_channels)
    opts = RunOptions(layout.tile, layout.overlap, blend, bs, confidence, margin)
    opts.window()  # validate the blend and margin before any work

    sched, client = _scheduler(scheduler)
    model_ref: Any = net
    if not isinstance(sched, str):
        spec = getattr(net, "spec", None)
        if spec is None:
            raise ConfigError("a model passed as an object cannot be sent to a cluster; pass its path")
        model_ref = ModelSpec(spec.model, spec.card, device, streams)
    source = RasterSource(str(Path(src).resolve()) if Path(str(src)).exists() else str(src), tuple(use))

    out.mkdir(parents=True, exist_ok=True)
    palette = mc.palette()
    colors = ["#{:02x}{:02x}{:02x}".format(*p) for p in palette]
    writers = {
        "classes": BlockWriter(
            out / "classes.tif", grid, dtype="uint8", nodata=NODATA, block=layout.block,
            colormap={i: (*rgb, 255) for i, rgb in enumerate(palette)} | {NODATA: (0, 0, 0, 0)},
            tags=class_tags(list(mc.classes), colors),
            description="class",
        )
    }
    if confidence:
        writers["confidence"] = BlockWriter(
            out / "confidence.tif", grid, dtype="float32", nodata=-1.0, block=layout.block,
            description="confidence (max softmax)",
        )
    total = layout.blocks[0] * layout.blocks[1]
    state: dict[str, Any] = {"done": 0, "run": 0, "skipped": 0, "hist": np.zeros(mc.num_classes + 1, np.int64)}

    lock = threading.Lock()

    def sink(ij: tuple[int, int], blk: BlockOut) -> None:
        rows, cols = layout.block_slices(*ij)
        writers["classes"].write(rows, cols, blk.classes)
        if blk.confidence is not None:
            writers["confidence"].write(rows, cols, blk.confidence)
        with lock:
            _count(state, blk, total, progress)

    t_setup = time.perf_counter()

    try:
        with torch_threads_kept():
            stream_blocks(source, model_ref, layout, opts, sink, scheduler=sched,
                          num_workers=num_workers or block_threads(net))
        t_infer = time.perf_counter()
        writers["classes"].finish(resampling="mode", category_names=list(mc.classes))
        if "confidence" in writers:
            writers["confidence"].finish(resampling="average")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if client is not None:
            client.close()
    write_text_atomic(out / "classes.qml", paletted_raster_qml(list(mc.classes), palette))
    t_cog = time.perf_counter()
    from .landcover import area_stats, sieve, vectorize, write_stats

    vec: dict[str, Any] = {}
    if min_area:
        vec["sieve_pixels"] = sieve(out / "classes.tif", min_area)
    if polygons:
        vec.update(vectorize(out / "classes.tif", out / "polygons", fmt=vector_format,
                             simplify=simplify, overwrite=True, num_workers=num_workers))
    t_vec = time.perf_counter()
    areas = area_stats(out / "classes.tif", zones=zones, zone_field=zone_field)
    write_stats(areas, out, source=str(src))
    if quicklook:
        from .quicklook import display_bands, write_quicklook

        write_quicklook(src, display_bands(use, mc.bands or []), out / "classes.tif", out / "quicklook.png",
                        list(mc.classes), palette)
    t_end = time.perf_counter()
    timings = {
        "setup_s": t_setup - t0,
        "inference_s": t_infer - t_setup,
        "cog_s": t_cog - t_infer,
        "vectorize_s": t_vec - t_cog,
        "stats_s": t_end - t_vec,
        "total_s": t_end - t0,
    }
    files = {n: out / n for n in names}
    result = PredictResult(out, files, list(mc.classes), state["hist"], state["run"],
                           state["skipped"], t_end - t0, timings, areas)
    run = {
        "input": str(src),
        "output": str(out),
        "grid": {"shape": list(grid.shape), "transform": list(grid.transform)[:6],
                 "crs": grid.crs.to_string() if grid.crs else None},
        "options": {
            "model": getattr(getattr(net, "spec", None), "model", mc.name), "card": str(card) if card else None,
            "tile_size": layout.tile, "overlap": layout.overlap, "stride": layout.stride,
            "block_size": layout.block, "blend": blend if isinstance(blend, str) else repr(blend),
            "margin": default_margin(layout.overlap) if margin is None else margin,
            "batch_size": bs, "device": net.device, "streams": net.streams,
            "threads_per_stream": net.threads, "bands": use, "confidence": confidence,
            "scheduler": sched if isinstance(sched, str) else str(scheduler),
            "polygons": polygons, "min_area_m2": min_area, "simplify_m": simplify,
            "vector_format": vector_format, "zones": str(zones) if zones else None,
            "quicklook": quicklook,
        },
        "vectorize": vec,
        "model_card": mc.to_dict(),
        "counts": {"pixels": result.pixels, "nodata_pixels": int(state["hist"][-1]),
                   "tiles_run": state["run"], "tiles_skipped_nodata": state["skipped"],
                   "blocks": total,
                   "class_pixels": dict(zip(mc.classes, map(int, state["hist"][:-1])))},
        "timings": timings,
        "versions": _versions(),
    }
    write_text_atomic(out / "run.json", json.dumps(run, indent=2))
    return result


def _count(state: dict[str, Any], blk: BlockOut, total: int,
           progress: Callable[[int, int], None] | None) -> None:
    state["run"] += blk.tiles_run
    state["skipped"] += blk.tiles_skipped
    state["hist"] += blk.histogram
    state["done"] += 1
    if progress:
        progress(state["done"], total)


def _versions() -> dict[str, str]:
    import dask
    import rasterio

    from . import __version__

    v = {"geoseg": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__, "dask": dask.__version__}
    for mod in ("torch", "onnxruntime"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover - both are dependencies
            pass
    v["cpus"] = str(os.cpu_count())
    return v
