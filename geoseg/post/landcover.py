"""From a class raster to polygons and area statistics, block by block.

Usable on any uint8 class raster (``geoseg vectorize``, ``geoseg stats``),
and run by ``geoseg predict`` on its own ``classes.tif``.
"""

from __future__ import annotations

import csv
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from ..errors import ConfigError, OutputExistsError
from ..geometry.grid import Grid
from ..geometry.units import NODATA, metres_to_crs_units
from ..io.raster import BlockWriter, bounded_gdal_cache, open_raster
from ..io.styles import categorized_polygons_qml, write_text_atomic
from ..io.vector import PolygonWriter, vector_format
from .areas import AreaTable, row_pixel_areas
from .polygons import Batch, polygonize_raster

BLOCK = 2048  # a multiple of the COG's 512-px tiles


@dataclass(frozen=True)
class ClassInfo:
    names: list[str]
    palette: list[tuple[int, int, int]]


def class_info(ds: Any, *, count: int | None = None) -> ClassInfo:
    """Class names and colours of a class raster: geoseg's tags, else GDAL's colour table.

    Untagged rasters get ``class_<id>`` names for ids ``0 .. count - 1``
    (``count`` default: found by scanning the raster).
    """
    tags = ds.tags()
    if "GEOSEG_CLASSES" in tags:
        names = json.loads(tags["GEOSEG_CLASSES"])
    else:
        if count is None:
            count = max(_sample_values(ds), default=0) + 1
        names = [f"class_{i}" for i in range(count)]
    try:
        cmap = ds.colormap(1)
        palette = [tuple(cmap.get(i, (128, 128, 128, 255))[:3]) for i in range(len(names))]
    except ValueError:
        from ..models.card import DEFAULT_COLORS, _hex_to_rgb

        palette = [_hex_to_rgb(DEFAULT_COLORS[i % 10], "raster") for i in range(len(names))]
    return ClassInfo(names, palette)  # type: ignore[arg-type]


def _sample_values(ds: Any) -> list[int]:
    """Distinct class ids (from the smallest overview, or the full raster if it has none)."""
    ovr = ds.overviews(1)
    f = ovr[-1] if ovr else 1
    arr = ds.read(1, out_shape=(max(1, ds.height // f), max(1, ds.width // f)))
    present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    return [int(v) for v in present if v != (ds.nodata if ds.nodata is not None else NODATA)]


def _reader(path: Path) -> Any:
    local = threading.local()

    def read(rows: slice, cols: slice) -> np.ndarray:
        ds = getattr(local, "ds", None)
        if ds is None:
            ds = local.ds = rasterio.open(path)
        win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        return ds.read(1, window=win)

    return read


def _check_class_raster(ds: Any, path: Path) -> None:
    if ds.count != 1 or ds.dtypes[0] != "uint8":
        raise ConfigError(
            f"{path} is not a class raster: expected 1 uint8 band, got {ds.count} band(s) of "
            f"{ds.dtypes[0]}"
        )


def pixels_for_area(grid: Grid, min_area_m2: float) -> int:
    """Smallest region size in pixels that is at least ``min_area_m2`` (at the scene centre)."""
    mid = grid.height // 2
    pix = float(row_pixel_areas(grid, slice(mid, mid + 1))[0])
    return max(1, math.ceil(min_area_m2 / pix))


@bounded_gdal_cache
def sieve(path: Path, min_area_m2: float, *, halo: int = 1024) -> int:
    """Replace regions smaller than ``min_area_m2`` by their largest neighbour, in place.

    Block-wise with a halo: a region of n pixels spans at most n pixels, so
    with ``halo >= n`` every small region is seen whole by the block that
    owns it. Nodata is never grown or merged into. Returns the size
    threshold in pixels.
    """
    from rasterio.features import sieve as gdal_sieve

    with open_raster(path) as ds:
        _check_class_raster(ds, path)
        grid = Grid.from_rio(ds)
        colormap = ds.colormap(1) if ds.colorinterp[0].name == "palette" else None
        tags = ds.tags()
        nodata = int(ds.nodata) if ds.nodata is not None else NODATA
    size = pixels_for_area(grid, min_area_m2)
    if size <= 1:
        return size
    h = min(halo, size)
    read = _reader(path)
    writer = BlockWriter(path, grid, dtype="uint8", nodata=nodata, block=BLOCK, colormap=colormap,
                         tags=tags, description="class")
    H, W = grid.shape
    try:
        for r0 in range(0, H, BLOCK):
            for c0 in range(0, W, BLOCK):
                rr = slice(max(0, r0 - h), min(H, r0 + BLOCK + h))
                cc = slice(max(0, c0 - h), min(W, c0 + BLOCK + h))
                arr = read(rr, cc)
                valid = arr != nodata
                out = gdal_sieve(arr, size=size, mask=valid, connectivity=4)
                out[~valid] = nodata
                br, bc = slice(r0, min(r0 + BLOCK, H)), slice(c0, min(c0 + BLOCK, W))
                writer.write(br, bc, out[br.start - rr.start : br.stop - rr.start,
                                         bc.start - cc.start : bc.stop - cc.start])
        aux = path.with_name(path.name + ".aux.xml")
        names = json.loads(tags["GEOSEG_CLASSES"]) if "GEOSEG_CLASSES" in tags else None
        writer.finish(resampling="mode", category_names=names if aux.exists() or names else None)
    except BaseException:
        writer.abort()
        raise
    return size


@bounded_gdal_cache
def vectorize(src: str | Path, output: str | Path, *, fmt: str = "gpkg", simplify: float | None = None,
              overwrite: bool = False, block: int | None = None, num_workers: int | None = None) -> dict[str, Any]:
    """Polygons of a class raster (merged across blocks) to ``output`` with a QGIS style.

    ``simplify`` is a tolerance in metres applied to the whole coverage
    (shared edges stay shared: no gaps, no overlaps); it needs every polygon
    in memory at once, unlike plain vectorizing.
    """
    src = Path(src)
    _, suffix = vector_format(fmt)
    out = Path(output).with_suffix(suffix)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite or choose another output")
    with open_raster(src) as ds:
        _check_class_raster(ds, src)
        grid = Grid.from_rio(ds)
        tagged = "GEOSEG_CLASSES" in ds.tags()
        info = class_info(ds, count=None if tagged else 0)  # untagged: names follow the ids found
        nodata = int(ds.nodata) if ds.nodata is not None else NODATA
    writer = PolygonWriter(out, grid.crs, info.names, fmt)
    held: list[Batch] = []
    sink = held.append if simplify else writer.write_batch  # coverage simplification needs the whole coverage
    try:
        # simplified polygons are measured when written, not before
        n = polygonize_raster(src, grid.shape, grid.transform, None if simplify else writer.measure,
                              sink=sink, nodata=nodata,
                              block=block, num_workers=num_workers)
        if simplify and held:
            import shapely

            geoms = shapely.from_wkb(np.concatenate([b.wkb for b in held]))
            ids = np.concatenate([b.ids for b in held])
            held.clear()
            geoms = shapely.coverage_simplify(geoms, metres_to_crs_units(grid.crs, simplify), simplify_boundary=True)
            writer.write(geoms, ids)
        if not tagged:
            with open_raster(src) as ds:
                info = class_info(ds, count=writer.max_id + 1)
        qml = categorized_polygons_qml(info.names, info.palette)
        path = writer.finish(style_qml=qml)
        write_text_atomic(path.with_suffix(".qml"), qml)
    except BaseException:
        writer.abort()
        raise
    return {"path": str(path), "polygons": n, "simplify_m": simplify}


@bounded_gdal_cache
def area_stats(src: str | Path, *, zones: str | Path | None = None, zone_field: str | None = None,
               block: int = BLOCK) -> AreaTable:
    """Per-class (and per-zone) areas, exact from the class raster and its transform."""
    src = Path(src)
    with open_raster(src) as ds:
        _check_class_raster(ds, src)
        grid = Grid.from_rio(ds)
        info = class_info(ds)
        nodata = int(ds.nodata) if ds.nodata is not None else NODATA
    table = AreaTable(info.names, nodata=nodata)
    zone_shapes, zone_ids = _zones(zones, zone_field, grid) if zones else (None, None)
    read = _reader(src)
    H, W = grid.shape
    for r0 in range(0, H, block):
        rows = slice(r0, min(r0 + block, H))
        areas = row_pixel_areas(grid, rows)
        for c0 in range(0, W, block):
            cols = slice(c0, min(c0 + block, W))
            arr = read(rows, cols)
            zmap = None
            if zone_shapes is not None:
                from rasterio.features import rasterize

                sub = grid[rows, cols]
                zmap = rasterize(zone_shapes, out_shape=sub.shape, transform=sub.transform, fill=0,
                                 dtype="int32") if zone_shapes else np.zeros(sub.shape, np.int32)
            table.add_block(arr, areas, zmap, zone_ids)
    return table


def _zones(path: str | Path, field: str | None, grid: Grid) -> tuple[list[Any], list[Any]]:
    import pyogrio

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"zones file {p} does not exist")
    gdf = pyogrio.read_dataframe(p)
    if grid.crs is not None and gdf.crs is not None and gdf.crs != grid.crs:
        gdf = gdf.to_crs(grid.crs)
    if field is not None and field not in gdf.columns:
        raise ConfigError(f"{p.name} has no field {field!r}; fields: {', '.join(gdf.columns[:-1])}")
    ids = list(gdf[field]) if field else list(range(len(gdf)))
    shapes = [(g, i + 1) for i, g in enumerate(gdf.geometry) if g is not None]
    return shapes, ids


def write_stats(table: AreaTable, directory: Path, *, source: str = "") -> tuple[Path, Path]:
    """``stats.csv`` (one row per class, plus per-zone rows when zones were given) and ``stats.json``."""
    rows = table.rows()
    csv_path, json_path = directory / "stats.csv", directory / "stats.json"
    tmp = csv_path.with_name(".stats.csv.part")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["zone", *rows[0].keys()])
        w.writeheader()
        for r in rows:
            w.writerow({"zone": "", **r})
        for r in table.zone_rows():
            w.writerow({**r, "pixels": ""})
    tmp.replace(csv_path)
    total = float(table.area_m2.sum())
    doc = {"source": source, "valid_area_m2": total, "valid_area_ha": total / 1e4,
           "valid_pixels": int(table.pixels.sum()), "classes": rows}
    if table.zone_area_m2:
        doc["zones"] = table.zone_rows()
    write_text_atomic(json_path, json.dumps(doc, indent=2, default=str))
    return csv_path, json_path
