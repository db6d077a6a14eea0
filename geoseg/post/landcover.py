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
from ..io.vector import PolygonWriter, rasterize_on, vector_format, zones_layer
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
    listed = _listed(tags.get("class_names"))  # segment()'s attributes, as rioxarray writes them
    if "GEOSEG_CLASSES" in tags:
        names = json.loads(tags["GEOSEG_CLASSES"])
    elif listed:
        names = listed
    else:
        if count is None:
            count = max(_sample_values(ds), default=0) + 1
        names = [f"class_{i}" for i in range(count)]
    try:
        cmap = ds.colormap(1)
        palette = [tuple(cmap.get(i, (128, 128, 128, 255))[:3]) for i in range(len(names))]
    except ValueError:
        from ..models.card import DEFAULT_COLORS, _hex_to_rgb

        colors = _listed(tags.get("class_colors"))
        colors = colors if colors and len(colors) == len(names) else [DEFAULT_COLORS[i % 10] for i in range(len(names))]
        palette = [_hex_to_rgb(c, "raster") for c in colors]
    return ClassInfo(names, palette)  # type: ignore[arg-type]


def _listed(tag: str | None) -> list[str] | None:
    """A list of strings written as a tag (a Python or JSON list), else None."""
    import ast

    if not tag:
        return None
    try:
        value = ast.literal_eval(tag)
    except (ValueError, SyntaxError):
        return None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) and value else None


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
            f"{ds.dtypes[0]}; pass a classes.tif written by geoseg predict"
        )


def pixels_for_area(grid: Grid, min_area_m2: float) -> int:
    """Smallest region size in pixels that is at least ``min_area_m2`` (at the scene centre)."""
    mid = grid.height // 2
    pix = float(row_pixel_areas(grid, slice(mid, mid + 1))[0])
    return max(1, math.ceil(min_area_m2 / pix))


SIEVE_BLOCK = 1024  # side of sieve's blocks: its per-block arrays are several times the block's pixels
_FAIL = 256  # chain end: no region at or over the threshold reached, the region keeps its class
_CUT = 257  # chain ends from here up: a region cut by block edges, ``code - _CUT`` its index


@bounded_gdal_cache
def sieve(path: Path, min_area_m2: float, *, block: int = SIEVE_BLOCK) -> int:
    """Replace regions smaller than ``min_area_m2`` by their largest neighbour, in place.

    The result equals GDAL's sieve of the whole raster (``rasterio.features.sieve``,
    4-connected, nodata masked) whatever the threshold, but runs block by
    block: region sizes and neighbours are measured across blocks (see
    :class:`_BlockSieve`), so memory holds a block plus the regions cut by
    block edges. Nodata is never grown or merged into. Returns the size
    threshold in pixels.
    """
    with open_raster(path) as ds:
        _check_class_raster(ds, path)
        grid = Grid.from_rio(ds)
        colormap = ds.colormap(1) if ds.colorinterp[0].name == "palette" else None
        tags = ds.tags()
        nodata = int(ds.nodata) if ds.nodata is not None else NODATA
    size = pixels_for_area(grid, min_area_m2)
    if size <= 1:
        return size
    H, W = grid.shape
    read = _reader(path)
    writer = BlockWriter(path, grid, dtype="uint8", nodata=nodata, block=block, colormap=colormap,
                         tags=tags, description="class")
    try:
        if H <= block and W <= block and size < H * W:  # one block: GDAL itself
            from rasterio.features import sieve as gdal_sieve

            rows, cols = slice(0, H), slice(0, W)
            arr = read(rows, cols)
            writer.write(rows, cols, gdal_sieve(arr, size=size, mask=arr != nodata, connectivity=4))
        else:
            blocks = _BlockSieve(read, (H, W), block, size, nodata)
            for i, (rows, cols) in enumerate(blocks.windows):
                writer.write(rows, cols, blocks.sieved(i))
        aux = path.with_name(path.name + ".aux.xml")
        names = json.loads(tags["GEOSEG_CLASSES"]) if "GEOSEG_CLASSES" in tags else None
        writer.finish(category_names=names if aux.exists() or names else None)
    except BaseException:
        writer.abort()
        raise
    return size


@dataclass(frozen=True)
class _Chains:
    """One block's regions and their chains of largest neighbours, followed inside the block."""

    arr: np.ndarray  # the block's pixels
    lab: np.ndarray  # region label per pixel, -1 on nodata
    classes: np.ndarray  # class of each region
    sizes: np.ndarray  # size of each region (of the whole region for cut ones)
    end: np.ndarray  # where each region's chain ends: a class, _FAIL, or _CUT + whole region
    target: np.ndarray  # largest neighbour of each small region, -1: none (or not small)
    key: np.ndarray  # GDAL's scan key of the contact with it, in the block
    regions: np.ndarray  # whole-region index of the block's cut regions


class _BlockSieve:
    """GDAL's sieve of a whole raster (4-connected, nodata masked), computed block by block.

    GDAL's rule: a region (4-connected pixels of one class) under the
    threshold follows the chain of largest neighbours (ties: the neighbour
    met first in GDAL's row-major scan, which checks the pixel above before
    the pixel to the left) to the first region at or over the threshold and
    takes its class; a chain that loops, or a region without neighbours,
    leaves the region as it is. Nodata pixels belong to no region.

    A region touching its block's edge is *cut*. Three passes over the blocks:

    1. label each block's regions; join cut regions across block edges
       (union-find) into whole regions with their total sizes, and record the
       contacts between different regions across block edges;
    2. per block, with the sizes of whole regions: each small cut region's
       largest neighbour in the block and where the chain from that neighbour
       leaves the block (a class, a loop, or another cut region); with the
       contacts across edges this gives every small cut region's largest
       neighbour, and the chains between cut regions are followed to their ends;
    3. per block, every region's class (:meth:`sieved`).

    Memory: one block's arrays and a few numbers per cut region, whatever the
    threshold and however far a region runs. A block is labelled once per pass.
    """

    def __init__(self, read: Any, shape: tuple[int, int], block: int, size: int, nodata: int):
        self.read, self.size, self.nodata, self.width = read, size, nodata, shape[1]
        self.windows = [(slice(r0, min(r0 + block, shape[0])), slice(c0, min(c0 + block, shape[1])))
                        for r0 in range(0, shape[0], block) for c0 in range(0, shape[1], block)]
        self.cuts: list[np.ndarray] = []  # per block: the labels of its cut regions, sorted
        self.first: list[int] = []  # per block: the index of its first cut region among all blocks'
        self._measure()
        self._link()

    def _regions(self, i: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
        """Block ``i``: its pixels, region labels (-1: nodata), region count, sizes in it, classes."""
        arr = self.read(*self.windows[i])
        valid = arr != self.nodata
        lab, n = _label(arr, valid)
        inside = lab[valid]
        sizes = np.bincount(inside, minlength=n).astype(np.int64)
        classes = np.zeros(n, np.int64)
        classes[inside] = arr[valid]
        return arr, lab, n, sizes, classes

    def _measure(self) -> None:
        """Pass 1: whole regions from cut regions, their sizes and classes; contacts across edges."""
        W = self.width
        above, above_cls = np.full(W, -1, np.int64), np.zeros(W, np.int64)  # last row of the blocks above
        left = left_cls = np.zeros(0, np.int64)  # last column of the block to the left
        sizes: list[np.ndarray] = []
        classes: list[np.ndarray] = []
        joins: list[tuple[np.ndarray, ...]] = []  # cut regions of one class side by side across an edge
        contacts: list[tuple[np.ndarray, ...]] = []  # of different classes, with GDAL's scan key
        count = 0
        for i, (rows, cols) in enumerate(self.windows):
            arr, lab, n, sz, cl = self._regions(i)
            edge = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
            cut = np.unique(edge[edge >= 0])
            self.cuts.append(cut)
            self.first.append(count)
            sizes.append(sz[cut])
            classes.append(cl[cut])
            piece = np.full(n + 1, -1, np.int64)  # label -> cut region; label -1 (nodata) -> -1
            piece[cut] = count + np.arange(len(cut))
            count += len(cut)
            top, side = piece[lab[0]], piece[lab[:, 0]]
            if rows.start > 0:
                pos = rows.start * W + np.arange(cols.start, cols.stop)
                _seam(joins, contacts, top, arr[0], above[cols], above_cls[cols], pos * 2)
            if cols.start > 0:
                pos = np.arange(rows.start, rows.stop) * W + cols.start
                _seam(joins, contacts, side, arr[:, 0], left, left_cls, pos * 2 + 1)
            above[cols], above_cls[cols] = piece[lab[-1]], arr[-1]
            left, left_cls = piece[lab[:, -1]], arr[:, -1].astype(np.int64)
        ja, jb = (_cat([j[k] for j in joins]) for k in (0, 1))
        _, self.region = np.unique(_components(count, ja, jb), return_inverse=True)  # cut -> whole region
        n_regions = int(self.region.max()) + 1 if count else 0
        self.region_size = np.zeros(n_regions, np.int64)
        np.add.at(self.region_size, self.region, _cat(sizes))
        self.region_class = np.zeros(n_regions, np.int64)
        self.region_class[self.region] = _cat(classes)
        ca, cb, ck = (_cat([c[k] for c in contacts]) for k in (0, 1, 2))
        self.contacts = self.region[ca], self.region[cb], ck

    def _chains(self, i: int, cut_end: Any) -> _Chains:
        """Block ``i``'s chains of largest neighbours, followed inside the block to where they end.

        ``cut_end(regions)``: the end codes of cut regions (by whole-region index).
        """
        arr, lab, n, sizes, classes = self._regions(i)
        cut = self.cuts[i]
        regions = self.region[self.first[i] + np.arange(len(cut))]
        sizes[cut] = self.region_size[regions]
        small = sizes < self.size
        src, dst, key = _contacts(lab)
        keep = small[src]
        src, dst, key = src[keep], dst[keep], key[keep]
        pick = _first_largest(n, src, sizes[dst], key)
        has = pick >= 0
        target, first_key = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        target[has], first_key[has] = dst[pick[has]], key[pick[has]]
        end = classes.copy()  # regions at or over the threshold end chains with their class
        end[cut] = cut_end(regions)
        walk = small.copy()
        walk[cut] = False
        nxt = np.where(walk, np.where(has, target, n + _FAIL), n + end)
        return _Chains(arr, lab, classes, sizes, _follow(nxt, n), target, first_key, regions)

    def _link(self) -> None:
        """Pass 2: where the chain of every small whole region ends (``self.region_end``)."""
        W, n_regions = self.width, len(self.region_size)
        small = self.region_size < self.size
        cand: list[tuple[np.ndarray, ...]] = []  # (region, neighbour size, scan key, end code)
        for i, (rows, cols) in enumerate(self.windows):
            ch = self._chains(i, lambda r: _CUT + r)
            cut = self.cuts[i]
            ok = small[ch.regions] & (ch.target[cut] >= 0)
            t, k = ch.target[cut][ok], ch.key[cut][ok]
            pos, w = k >> 1, ch.lab.shape[1]
            key = ((rows.start + pos // w) * W + cols.start + pos % w) * 2 + (k & 1)
            cand.append((ch.regions[ok], ch.sizes[t], key, ch.end[t]))
        ra, rb, ck = self.contacts
        for a, b in ((ra, rb), (rb, ra)):  # a contact across a block edge counts for both regions
            cand.append((a, self.region_size[b], ck, _CUT + b))
        src, size, key, end = (_cat([c[k] for c in cand]) for k in range(4))
        keep = small[src]
        src, size, key, end = src[keep], size[keep], key[keep], end[keep]
        pick = _first_largest(n_regions, src, size, key)
        nxt = n_regions + self.region_class  # regions at or over the threshold: their class
        has = small & (pick >= 0)
        e = end[pick[has]]
        nxt[has] = np.where(e >= _CUT, e - _CUT, n_regions + e)
        nxt[small & (pick < 0)] = n_regions + _FAIL
        self.region_end = _follow(nxt, n_regions)

    def sieved(self, i: int) -> np.ndarray:
        """Pass 3: block ``i`` sieved."""
        ch = self._chains(i, lambda r: self.region_end[r])
        new = np.where(ch.end == _FAIL, ch.classes, ch.end).astype(ch.arr.dtype)
        inside = ch.lab >= 0
        out = ch.arr.copy()
        out[inside] = new[ch.lab[inside]]
        return out


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64)


def _seam(joins: list[Any], contacts: list[Any], here: np.ndarray, here_cls: np.ndarray, there: np.ndarray,
          there_cls: np.ndarray, key: np.ndarray) -> None:
    """Pixels along a block edge and their neighbours across it: same class joins, else a contact."""
    both = (here >= 0) & (there >= 0)
    same = both & (here_cls == there_cls)
    diff = both & ~same
    joins.append((here[same], there[same]))
    contacts.append((here[diff], there[diff], key[diff]))


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of nodes ``0 .. n-1`` joined by edges ``a[i]``-``b[i]``: each node's smallest."""
    root = np.arange(n)
    while True:
        ra, rb = root[a], root[b]
        apart = ra != rb
        if not apart.any():
            return root
        ra, rb = ra[apart], rb[apart]
        low = np.minimum(ra, rb)
        np.minimum.at(root, ra, low)  # roots hook onto smaller roots
        np.minimum.at(root, rb, low)
        while True:  # then every node points at its root
            up = root[root]
            if np.array_equal(up, root):
                break
            root = up


def _label(arr: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected regions of one class (GDAL's polygons): labels (-1 where not valid), count."""
    h, w = arr.shape
    flat, ok = arr.ravel(), valid.ravel()
    start = np.ones(h * w, bool)  # runs of one class along rows
    start[1:] = (flat[1:] != flat[:-1]) | (ok[1:] != ok[:-1])
    start[::w] = True
    run = (np.cumsum(start) - 1).reshape(h, w)
    starts = start.reshape(h, w)
    down = (arr[1:] == arr[:-1]) & valid[1:] & valid[:-1]  # pixel and the one below in one region
    link = down.copy()  # one link per pair of runs side by side
    link[:, 1:] &= ~down[:, :-1] | starts[:-1, 1:] | starts[1:, 1:]
    root = _components(int(run[-1, -1]) + 1, run[:-1][link], run[1:][link])
    region = np.full(len(root), -1, np.int64)
    keep = ok[start]
    uniq, region[keep] = np.unique(root[keep], return_inverse=True)
    return region[run], len(uniq)


def _contacts(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Touching pixels of different regions, both ways: region, neighbour, GDAL's scan order key."""
    w = lab.shape[1]
    m = (lab[1:] != lab[:-1]) & (lab[1:] >= 0) & (lab[:-1] >= 0)  # pixel and the one above
    y, x = np.nonzero(m)
    k_up = ((y + 1) * w + x) * 2
    a, b = lab[1:][m], lab[:-1][m]
    m = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] >= 0) & (lab[:, :-1] >= 0)  # pixel and the one left
    y, x = np.nonzero(m)
    k_left = (y * w + x + 1) * 2 + 1
    c, d = lab[:, 1:][m], lab[:, :-1][m]
    return np.concatenate([a, b, c, d]), np.concatenate([b, a, d, c]), np.concatenate([k_up, k_up, k_left, k_left])


def _first_largest(n: int, src: np.ndarray, size: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For regions ``0 .. n-1``: the index of the candidate (``src`` == region) with the largest
    ``size``, ties to the smallest ``key``; -1 where a region has none."""
    best = np.full(n, -1, np.int64)
    np.maximum.at(best, src, size)
    top = np.flatnonzero(size == best[src])
    first = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, src[top], key[top])
    hit = top[key[top] == first[src[top]]]
    pick = np.full(n, -1, np.int64)
    pick[src[hit]] = hit
    return pick


def _follow(nxt: np.ndarray, n: int) -> np.ndarray:
    """Follow chains of nodes ``0 .. n-1`` (``nxt[i] < n``: the next node; else ``n + end code``)
    to their end codes by pointer doubling; ``_FAIL`` for chains that loop."""
    cur = nxt.copy()
    for _ in range(n.bit_length() + 1):
        inner = np.flatnonzero(cur < n)
        if not len(inner):
            break
        step = cur[cur[inner]]
        step[step == inner] = n + _FAIL  # back where it started: a loop
        cur[inner] = step
    return np.where(cur < n, _FAIL, cur - n)


@bounded_gdal_cache
def vectorize(src: str | Path, output: str | Path, *, fmt: str = "gpkg", simplify: float | None = None,
              overwrite: bool = False, block: int | None = None, num_workers: int | None = None,
              executor: Any = None) -> dict[str, Any]:
    """Polygons of a class raster (merged across blocks) to ``output`` with a QGIS style.

    ``simplify`` is a tolerance in metres applied to the whole coverage
    (shared edges stay shared: no gaps, no overlaps); it needs every polygon
    in memory at once, unlike plain vectorizing.
    """
    src = Path(src)
    _, suffix = vector_format(fmt)
    out = Path(output).with_suffix(suffix)
    for existing in (out, out.with_suffix(".qml")):  # the QGIS style beside it is an output too
        if existing.exists() and not overwrite:
            raise OutputExistsError(f"{existing} already exists; pass --overwrite or choose another output")
    with open_raster(src) as ds:
        _check_class_raster(ds, src)
        grid = Grid.from_rio(ds)
        tagged = "GEOSEG_CLASSES" in ds.tags() or _listed(ds.tags().get("class_names")) is not None
        info = class_info(ds, count=None if tagged else 0)  # untagged: names follow the ids found
        nodata = int(ds.nodata) if ds.nodata is not None else NODATA
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the folder {out.parent} ({e.strerror or e}); choose another -o") from None
    writer = PolygonWriter(out, grid.crs, info.names, fmt)
    held: list[Batch] = []
    sink = held.append if simplify else writer.write_batch  # coverage simplification needs the whole coverage
    try:
        # simplified polygons are measured when written, not before
        n = polygonize_raster(src, grid.shape, grid.transform, None if simplify else writer.measure,
                              sink=sink, nodata=nodata,
                              block=block, num_workers=num_workers, executor=executor)
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
                zmap = rasterize_on(zone_shapes, grid[rows, cols], fill=0, dtype="int32")
            table.add_block(arr, areas, zmap, zone_ids)
    return table


def _zones(path: str | Path, field: str | None, grid: Grid) -> tuple[list[Any], list[Any]]:
    import pyogrio

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"zones file {p} does not exist; check --zones")
    gdf = pyogrio.read_dataframe(p, layer=zones_layer(p))
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
            w.writerow(r)
    tmp.replace(csv_path)
    total = float(table.area_m2.sum())
    doc = {"source": source, "valid_area_m2": total, "valid_area_ha": total / 1e4,
           "valid_pixels": int(table.pixels.sum()), "classes": rows}
    if table.zone_area_m2:
        doc["zones"] = table.zone_rows()
    write_text_atomic(json_path, json.dumps(doc, indent=2, default=str))
    return csv_path, json_path
