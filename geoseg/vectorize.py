"""Class raster -> land-cover polygons, block by block, merged exactly across block edges.

Each block is polygonized on its own (``rasterio.features.shapes`` with a
mask, in pixel coordinates offset to the block's origin, so every vertex is
an exact integer). A polygon that does not touch an internal block edge is
final: it is moved to the raster's CRS, measured and encoded as WKB in the
task, and goes straight to the writer. A polygon that touches an internal
edge is a *piece*; for every internal edge the task also records which piece
owns each pixel along it. At the end, pieces of the same class that own the
same pixel pair across an edge are joined (union-find), each group is
unioned (integer, axis-aligned coordinates: the overlay is exact) and split
into its connected polygons, holes kept. The result equals whole-raster
polygonization; memory is bounded by the block size and the pieces.

Blocks run in this process for one worker, in a pool of worker processes
otherwise (polygonizing holds the GIL, so threads would not scale).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine

BLOCK_BYTES = 64 * 2**20  # class pixels per task when the block shape is chosen automatically


@dataclass(frozen=True)
class Measure:
    """Area (m²) and perimeter (m): planar for projected CRSs (units converted), geodesic otherwise."""

    factor: float = 1.0  # metres per CRS unit (projected CRSs)
    geodesic_wkt: str | None = None  # a geographic CRS: measure on its ellipsoid

    @classmethod
    def for_crs(cls, crs: Any) -> Measure:
        if crs is None:
            return cls()
        if crs.is_projected:
            return cls(factor=float(crs.linear_units_factor[1]))
        return cls(geodesic_wkt=crs.to_wkt())

    def __call__(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.geodesic_wkt is None:
            return shapely.area(geoms) * self.factor**2, shapely.length(geoms) * self.factor
        from pyproj import CRS

        geod = CRS.from_wkt(self.geodesic_wkt).get_geod()
        ap = [geod.geometry_area_perimeter(g) for g in geoms]  # type: ignore[union-attr]
        return np.abs([a for a, _ in ap]).astype(np.float64), np.array([p for _, p in ap], np.float64)


@dataclass
class Batch:
    """Polygons ready to write: WKB in the raster's CRS, class ids, area (m²), perimeter (m)."""

    wkb: np.ndarray
    ids: np.ndarray
    area: np.ndarray
    perimeter: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class BlockResult:
    """One block: its final polygons, and the pieces cut by internal block edges."""

    row0: int
    col0: int
    final: Batch
    pieces: np.ndarray  # shapely polygons, pixel coordinates
    piece_ids: np.ndarray
    sides: dict[str, np.ndarray] = field(default_factory=dict)  # "top"/"bottom"/"left"/"right" -> piece per pixel


def shapes_to_polygons(shapes: Iterator[tuple[dict[str, Any], float]], *,
                       chunk_vertices: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """GeoJSON-like polygons (as ``rasterio.features.shapes`` yields them) -> shapely array, values.

    Rings are gathered into one coordinate array and the polygons built in
    one call per chunk of about ``chunk_vertices`` vertices — several times
    faster than ``shape()`` per polygon, and the Python coordinate lists
    never hold more than one chunk.
    """
    parts: list[np.ndarray] = []
    values: list[float] = []
    coords: list[Any] = []
    ring_sizes: list[int] = []
    ring_counts: list[int] = []

    def flush() -> None:
        n = sum(ring_sizes)
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable(coords))
        xy = np.fromiter(flat, dtype=np.float64, count=2 * n).reshape(n, 2)
        ring_off = np.concatenate([[0], np.cumsum(ring_sizes)])
        poly_off = np.concatenate([[0], np.cumsum(ring_counts)])
        parts.append(shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (ring_off, poly_off)))
        coords.clear()
        ring_sizes.clear()
        ring_counts.clear()

    pending = 0
    for geom, value in shapes:
        rings = geom["coordinates"]
        ring_counts.append(len(rings))
        for ring in rings:
            ring_sizes.append(len(ring))
            coords.append(ring)
            pending += len(ring)
        values.append(value)
        if pending >= chunk_vertices:
            flush()
            pending = 0
    if ring_counts:
        flush()
    if not values:
        return np.array([], dtype=object), np.array([], np.int64)
    polys = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return polys, np.asarray(values).astype(np.int64)


def _side_owners(pieces: np.ndarray, row0: int, col0: int, h: int, w: int,
                 internal: dict[str, bool]) -> dict[str, np.ndarray]:
    """For each internal side of the block, the index of the piece owning each pixel along it (-1: none).

    A piece owns a pixel on the block's side exactly where its exterior ring
    runs along that side (nothing lies beyond the block).
    """
    xy, idx = shapely.get_coordinates(shapely.get_exterior_ring(pieces), return_index=True)
    same = idx[:-1] == idx[1:]
    p, q, k = xy[:-1][same], xy[1:][same], idx[:-1][same]
    lines = {"top": (1, row0, 0, col0, w), "bottom": (1, row0 + h, 0, col0, w),
             "left": (0, col0, 1, row0, h), "right": (0, col0 + w, 1, row0, h)}
    out = {}
    for side, (axis, at, along, origin, n) in lines.items():
        if not internal[side]:
            continue
        on = (p[:, axis] == at) & (q[:, axis] == at)
        a = np.minimum(p[on, along], q[on, along]).astype(np.int64) - origin
        b = np.maximum(p[on, along], q[on, along]).astype(np.int64) - origin
        lengths = b - a
        owner = np.full(n, -1, np.int64)
        if lengths.size:
            start = np.repeat(a - np.cumsum(lengths) + lengths, lengths)
            owner[start + np.arange(lengths.sum())] = np.repeat(k[on], lengths)
        out[side] = owner
    return out


def to_crs_coords(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Pixel-coordinate geometries -> the grid's CRS (affine applied to every vertex)."""
    a, b, c, d, e, f = transform[:6]

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([a * x + b * y + c, d * x + e * y + f])

    return shapely.transform(geoms, apply)


def _batch(polys: np.ndarray, ids: np.ndarray, transform: Affine, measure: Measure | None) -> Batch:
    geoms = to_crs_coords(polys, transform)
    area, perimeter = measure(geoms) if measure is not None else (np.zeros(len(geoms)), np.zeros(len(geoms)))
    return Batch(shapely.to_wkb(geoms), ids.astype(np.int32), area, perimeter)


def polygonize_block(classes: np.ndarray, row0: int, col0: int, grid_shape: tuple[int, int],
                     transform: Affine, measure: Measure | None, *, nodata: int = 255,
                     connectivity: int = 4) -> BlockResult:
    """Polygonize one (h, w) uint8 block whose top-left pixel is (row0, col0) in the grid."""
    import warnings

    from rasterio import features
    from rasterio.errors import NotGeoreferencedWarning

    h, w = classes.shape
    H, W = grid_shape
    internal = {"left": col0 > 0, "top": row0 > 0, "right": col0 + w < W, "bottom": row0 + h < H}
    mask = classes != nodata
    with warnings.catch_warnings():  # pixel coordinates on purpose
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        polys, values = shapes_to_polygons(features.shapes(
            classes, mask=mask, connectivity=connectivity, transform=Affine.translation(col0, row0)))
    if len(polys):
        minx, miny, maxx, maxy = shapely.bounds(polys).T
        cut = ((internal["left"] & (minx == col0)) | (internal["top"] & (miny == row0))
               | (internal["right"] & (maxx == col0 + w)) | (internal["bottom"] & (maxy == row0 + h)))
    else:
        cut = np.zeros(0, bool)
    pieces = polys[cut]
    sides = _side_owners(pieces, row0, col0, h, w, internal) if len(pieces) else {}
    return BlockResult(row0, col0, _batch(polys[~cut], values[~cut], transform, measure),
                       pieces, values[cut], sides)


def _read_and_polygonize(path: str, r0: int, c0: int, h: int, w: int, grid_shape: tuple[int, int],
                         transform: Affine, measure: Measure | None, nodata: int) -> BlockResult:
    import rasterio
    from rasterio.windows import Window

    from .io.raster import GDAL_CACHE_BYTES

    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(path) as ds:
        classes = ds.read(1, window=Window(c0, r0, w, h))
    return polygonize_block(classes, r0, c0, grid_shape, transform, measure, nodata=nodata)


def _union_groups(groups: list[np.ndarray], ids: list[int], transform: Affine, measure: Measure | None) -> Batch:
    """Union each group of pieces (pixel coordinates) and split it into its connected polygons."""
    parts, part_ids = [], []
    for members, cid in zip(groups, ids):
        merged = members[0] if len(members) == 1 else shapely.coverage_union_all(members)
        for part in shapely.get_parts(merged):
            if not part.is_empty:
                parts.append(part)
                part_ids.append(cid)
    return _batch(np.array(parts, dtype=object), np.array(part_ids, np.int64), transform, measure)


def block_shape(grid_shape: tuple[int, int], num_workers: int) -> tuple[int, int]:
    """Full-width strips of at most BLOCK_BYTES pixels, at least one per worker.

    Strips leave only horizontal internal edges, so fewer regions are cut.
    """
    H, W = grid_shape
    rows = max(256, BLOCK_BYTES // max(W, 1))
    if num_workers > 1:
        rows = min(rows, math.ceil(H / num_workers))
    return min(rows, H), W


class _Runner:
    """Runs tasks in this process (one worker) or in a pool of worker processes.

    Results are yielded as tasks finish, with at most two tasks per worker in
    flight, so the caller writes while the workers polygonize and memory stays
    bounded.
    """

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.pool: Any = None
        if num_workers > 1:
            import multiprocessing
            import sys
            from concurrent.futures import ProcessPoolExecutor

            # fork on Linux: the children only read and polygonize, and unlike spawn or
            # forkserver it does not re-run the caller's script (no __main__ guard needed)
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
            self.pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx)

    def map(self, func: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        if self.pool is None:
            for a in args:
                yield func(*a)
            return
        import warnings
        from concurrent.futures import FIRST_COMPLETED, wait

        pending: set[Any] = set()
        todo = iter(args)
        with warnings.catch_warnings():  # Python >= 3.12 warns about fork beside threads
            warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
            while True:
                for a in itertools.islice(todo, 2 * self.num_workers - len(pending)):
                    pending.add(self.pool.submit(func, *a))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def polygonize_raster(path: str | Path, grid_shape: tuple[int, int], transform: Affine, measure: Measure | None, *,
                      sink: Callable[[Batch], None], nodata: int = 255, block: int | None = None,
                      num_workers: int | None = None) -> int:
    """Polygonize a uint8 class raster by blocks; ``sink`` receives batches of finished polygons.

    ``block`` is a square block side in pixels (default: full-width strips,
    see :func:`block_shape`). ``measure`` None leaves area and perimeter at 0
    (for callers that change the polygons before writing them). Returns the
    number of polygons emitted.
    """
    import os

    H, W = grid_shape
    workers = max(1, num_workers or os.cpu_count() or 1)
    bh, bw = (block, block) if block else block_shape(grid_shape, workers)
    origins = [(r0, c0) for r0 in range(0, H, bh) for c0 in range(0, W, bw)]
    if len(origins) == 1:
        workers = 1  # a single block gains nothing from worker processes
    args = [(str(path), r0, c0, min(bh, H - r0), min(bw, W - c0), grid_shape, transform, measure, nodata)
            for r0, c0 in origins]
    runner = _Runner(workers)
    count = 0
    held: dict[tuple[int, int], BlockResult] = {}
    try:
        for res in runner.map(_read_and_polygonize, args):
            if len(res.final):
                sink(res.final)
                count += len(res.final)
            res.final = Batch(*(np.empty(0),) * 4)
            if len(res.pieces):
                held[(res.row0, res.col0)] = res
        groups, ids = _join_pieces(held, bh, bw)
        held.clear()
        # biggest groups first, spread over the workers
        order = sorted(range(len(groups)), key=lambda g: -sum(shapely.get_num_coordinates(groups[g])))
        chunks = [order[k::workers] for k in range(workers)]
        for batch in runner.map(_union_groups, [([groups[g] for g in c], [ids[g] for g in c], transform, measure)
                                                for c in chunks if c]):
            if len(batch):
                sink(batch)
                count += len(batch)
    finally:
        runner.close()
    return count


def _join_pieces(held: dict[tuple[int, int], BlockResult], bh: int, bw: int) -> tuple[list[np.ndarray], list[int]]:
    """Group the pieces that form one region: same class, owning facing pixels across a block edge."""
    keys = sorted(held)
    offset, total = {}, 0
    for key in keys:
        offset[key] = total
        total += len(held[key].pieces)
    if total == 0:
        return [], []
    geoms = np.concatenate([held[k].pieces for k in keys])
    cls = np.concatenate([held[k].piece_ids for k in keys])
    pairs = []
    cuts: dict[int, list[tuple[int, float, np.ndarray]]] = {}  # piece -> (axis, line, breakpoints)
    for (r0, c0) in keys:
        a = held[(r0, c0)]
        for side, other, facing in (("bottom", (r0 + bh, c0), "top"), ("right", (r0, c0 + bw), "left")):
            b = held.get(other)
            if b is None or side not in a.sides or facing not in b.sides:
                continue
            pa, pb = a.sides[side], b.sides[facing]
            both = (pa >= 0) & (pb >= 0)
            ga, gb = pa[both] + offset[(r0, c0)], pb[both] + offset[other]
            same = cls[ga] == cls[gb]
            pairs.append(np.unique(np.stack([ga[same], gb[same]], axis=1), axis=0))
            # where the owners change along the edge; each side needs the other's as vertices
            axis, line, origin = (1, r0 + bh, c0) if side == "bottom" else (0, c0 + bw, r0)
            for mine, theirs, off in ((pa, pb, offset[(r0, c0)]), (pb, pa, offset[other])):
                bps = (np.flatnonzero(np.diff(theirs)) + 1 + origin).astype(np.float64)
                for g in np.unique(mine[mine >= 0]) + off:
                    cuts.setdefault(int(g), []).append((axis, float(line), bps))
    parent = np.arange(total)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for ga, gb in (np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64)):
        ra, rb = find(int(ga)), find(int(gb))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for k in range(total):
        members.setdefault(find(k), []).append(k)
    groups = []
    for m in members.values():
        group = geoms[m]
        if len(m) > 1:
            group = np.array([_insert_breakpoints(geoms[k], cuts.get(k, [])) for k in m], dtype=object)
        groups.append(group)
    return groups, [int(cls[m[0]]) for m in members.values()]


def _insert_breakpoints(poly: shapely.Polygon, cuts: list[tuple[int, float, np.ndarray]]) -> shapely.Polygon:
    """Add vertices where the exterior runs along a block edge and the facing side's owner changes.

    Then every segment a piece shares with a piece across the edge has the
    same vertices on both sides, which is what a coverage union needs.
    """
    xy = shapely.get_coordinates(poly.exterior)
    p, q = xy[:-1], xy[1:]
    at, pts = [], []
    for axis, line, bps in cuts:
        along = 1 - axis
        for i in np.flatnonzero((p[:, axis] == line) & (q[:, axis] == line)):
            a, b = p[i, along], q[i, along]
            inside = bps[(bps > min(a, b)) & (bps < max(a, b))]
            if inside.size == 0:
                continue
            if b < a:
                inside = inside[::-1]
            new = np.empty((inside.size, 2))
            new[:, along], new[:, axis] = inside, line
            at.append(np.full(inside.size, i + 1))
            pts.append(new)
    if not pts:
        return poly
    xy = np.insert(xy, np.concatenate(at), np.concatenate(pts), axis=0)
    return shapely.Polygon(xy, [r.coords for r in poly.interiors])
