"""Class raster -> land-cover polygons, block by block, merged exactly across block edges.

Each block is polygonized on its own (``rasterio.features.shapes`` with a
mask, in pixel coordinates offset to the block's origin, so every vertex is
an exact integer). A polygon that does not touch an internal block edge is
final: it is moved to the raster's CRS, measured and encoded as WKB in the
task, and goes straight to the writer. A polygon that touches an internal
edge is a *piece*; for every internal edge the task also records which piece
owns each pixel along it. Rows of blocks are then joined in order: pieces of
the same class that own the same pixel pair across an edge are joined
(union-find), and a region with no piece on the bottom edge of the rows
joined so far is complete — its pieces are unioned (integer, axis-aligned
coordinates: the overlay is exact), split into connected polygons (holes
kept) and written. The result equals whole-raster polygonization. Pieces of
an open region that are not on the current edge will not change again: they
go to a temporary file (WKB) until their region is complete, so memory holds
the blocks in flight and the pieces along one row edge, not the regions that
run through the whole raster.

Blocks run in this process for one worker, in a pool of worker processes
otherwise (polygonizing holds the GIL, so threads would not scale)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import shapely
from affine import Affine

from ..geometry.units import NODATA, Measure
from ..io.vector import Batch
from .runner import Runner

BLOCK_BYTES = 16 * 2**20  # class pixels per task when the block shape is chosen automatically
STRIP_READ_CACHE_BYTES = 2 * 2**20  # GDAL block cache of a polygonizing worker
UNION_TASK_VERTICES = 500_000  # vertices of pieces per union task sent to a worker


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
                     transform: Affine, measure: Measure | None, *, nodata: int = NODATA,
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

    # each block of the file is read once, by one strip: a cache would only keep pages the worker no longer needs
    with rasterio.Env(GDAL_CACHEMAX=STRIP_READ_CACHE_BYTES), rasterio.open(path) as ds:
        classes = ds.read(1, window=Window(c0, r0, w, h))
    return polygonize_block(classes, r0, c0, grid_shape, transform, measure, nodata=nodata)


class _Stored(NamedTuple):
    """A piece in the spill file: where its WKB is and how many vertices it has."""

    offset: int
    size: int
    vertices: int


class _Spill:
    """An append-only temporary file of piece WKB, read back when a region is complete."""

    def __init__(self) -> None:
        import os
        import tempfile

        _reclaim_spills(tempfile.gettempdir())
        fd, self.path = tempfile.mkstemp(prefix=f"geoseg-pieces-{os.getpid()}-", suffix=".wkb")
        self.file = os.fdopen(fd, "wb")
        self.end = 0

    def put(self, piece: Any) -> _Stored:
        data = shapely.to_wkb(piece)
        self.file.write(data)
        self.end += len(data)
        return _Stored(self.end - len(data), len(data), int(shapely.get_num_coordinates(piece)))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        import os

        self.file.close()
        os.unlink(self.path)


def _reclaim_spills(folder: str) -> None:
    """Remove the spill files of runs that were killed (their process is gone)."""
    import os
    from pathlib import Path

    for f in Path(folder).glob("geoseg-pieces-*-*.wkb"):
        pid = f.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


def _vertices(piece: Any) -> int:
    return piece.vertices if isinstance(piece, _Stored) else int(shapely.get_num_coordinates(piece))


def _union_groups(groups: list[list[Any]], ids: list[int], spill_path: str, transform: Affine,
                  measure: Measure | None) -> Batch:
    """Union each group of pieces (pixel coordinates) and split it into its connected polygons.

    A piece is a polygon or a :class:`_Stored` record read back from ``spill_path``.
    """
    parts, part_ids = [], []
    with open(spill_path, "rb") as f:
        for members, cid in zip(groups, ids):
            geoms = np.array([_load(f, m) for m in members], dtype=object)
            merged = geoms[0] if len(geoms) == 1 else shapely.coverage_union_all(geoms)
            del geoms
            for part in shapely.get_parts(merged):
                if not part.is_empty:
                    parts.append(part)
                    part_ids.append(cid)
    return _batch(np.array(parts, dtype=object), np.array(part_ids, np.int64), transform, measure)


def _load(f: Any, piece: Any) -> Any:
    if not isinstance(piece, _Stored):
        return piece
    f.seek(piece.offset)
    return shapely.from_wkb(f.read(piece.size))


def block_shape(grid_shape: tuple[int, int], num_workers: int) -> tuple[int, int]:
    """Full-width strips of at most BLOCK_BYTES pixels, at least one per worker.

    Strips leave only horizontal internal edges, so fewer regions are cut.
    """
    H, W = grid_shape
    rows = max(256, BLOCK_BYTES // max(W, 1))
    if num_workers > 1:
        rows = min(rows, math.ceil(H / num_workers))
    return min(rows, H), W


def polygonize_raster(path: str | Path, grid_shape: tuple[int, int], transform: Affine, measure: Measure | None, *,
                      sink: Callable[[Batch], None], nodata: int = NODATA, block: int | None = None,
                      num_workers: int | None = None, executor: Any = None) -> int:
    """Polygonize a uint8 class raster by blocks; ``sink`` receives batches of finished polygons.

    ``block`` is a square block side in pixels (default: full-width strips,
    see :func:`block_shape`). ``measure`` None leaves area and perimeter at 0
    (for callers that change the polygons before writing them). With an
    ``executor`` (a dask.distributed ``client.get_executor()``), blocks run on
    its workers, which must see ``path``. Returns the number of polygons
    emitted.
    """
    import os

    H, W = grid_shape
    workers = max(1, num_workers or os.cpu_count() or 1)
    bh, bw = (block, block) if block else block_shape(grid_shape, workers)
    origins = [(r0, c0) for r0 in range(0, H, bh) for c0 in range(0, W, bw)]
    if len(origins) == 1 and executor is None:
        workers = 1  # a single block gains nothing from worker processes
    args = [(str(path), r0, c0, min(bh, H - r0), min(bw, W - c0), grid_shape, transform, measure, nodata)
            for r0, c0 in origins]
    runner = Runner(workers, executor)
    spill = _Spill()
    merger = _Merger(W, spill)
    per_row = len(range(0, W, bw))
    rows: dict[int, list[BlockResult]] = {}
    next_row = 0
    count = 0
    unions: list[Any] = []  # unions of complete regions running in the workers

    def emit(batch: Batch) -> None:
        nonlocal count
        if len(batch):
            sink(batch)
            count += len(batch)

    try:
        for res in runner.map(_read_and_polygonize, args):
            emit(res.final)
            res.final = Batch(*(np.empty(0),) * 4)
            rows.setdefault(res.row0, []).append(res)
            # rows of blocks are joined in order, as soon as each is complete
            while next_row in rows and len(rows[next_row]) == per_row:
                groups, ids = merger.add_row(rows.pop(next_row), last=next_row + bh >= H)
                next_row += bh
                spill.flush()
                if runner.pool is None:
                    emit(_union_groups(groups, ids, spill.path, transform, measure))
                    continue
                # tasks of bounded size: a worker never holds more than one of them
                for part in _pack([sum(_vertices(p) for p in g) for g in groups], UNION_TASK_VERTICES):
                    unions.append(runner.pool.submit(_union_groups, [groups[g] for g in part],
                                                     [ids[g] for g in part], spill.path, transform, measure))
                del groups
            while unions and unions[0].done():
                emit(unions.pop(0).result())
        for fut in unions:
            emit(fut.result())
    finally:
        runner.close()
        spill.close()
    return count


def _pack(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indexes of ``sizes`` in parts of at most ``budget`` total (an item over it alone)."""
    parts: list[list[int]] = []
    load = budget
    for i, n in enumerate(sizes):
        if load + n > budget:
            parts.append([])
            load = 0
        parts[-1].append(i)
        load += n
    return parts


def _breakpoints(owner: np.ndarray, origin: int) -> np.ndarray:
    """Positions along an edge where the owning piece changes."""
    return (np.flatnonzero(np.diff(owner)) + 1 + origin).astype(np.float64)


def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


class _Merger:
    """Joins pieces row of blocks by row and emits each region as soon as it is complete.

    Open regions are those with a piece on the bottom edge of the last row
    joined: the next row may extend them. For each open region it keeps its
    pieces so far, and along that edge which piece owns each pixel (the
    *seam*). A row's pieces are joined to open regions across the seam and
    to each other across the row's vertical block edges (same class, facing
    pixels); every region left without a piece on the new bottom edge is
    unioned and emitted. Pieces of an open region that are off the new
    edge go to the spill file, so memory holds the pieces along the current
    row edge, not the regions that cross it.
    """

    def __init__(self, width: int, spill: _Spill):
        self.spill = spill
        self.members: list[list[Any]] = []  # open region -> its pieces (pixel coordinates, or spilled)
        self.cls: list[int] = []  # open region -> class id
        self.seam = np.full(width, -1, np.int64)  # seam piece owning each pixel along the edge
        self.seam_at: list[tuple[int, int]] = []  # seam piece -> (open region, index in its members)

    def add_row(self, row: list[BlockResult], *, last: bool) -> tuple[list[list[Any]], list[int]]:
        """Join one row of blocks; return the regions it completes (their pieces) and their classes."""
        row = sorted(row, key=lambda r: r.col0)
        r0, width = row[0].row0, len(self.seam)
        offs = np.cumsum([0] + [len(b.pieces) for b in row])
        n_open, n_new = len(self.members), int(offs[-1])
        pieces = list(itertools.chain.from_iterable(b.pieces for b in row))
        cls = np.concatenate([b.piece_ids for b in row]).astype(np.int64) if n_new else np.empty(0, np.int64)
        top, bottom = np.full(width, -1, np.int64), np.full(width, -1, np.int64)
        for b, off in zip(row, offs):
            for side, full in (("top", top), ("bottom", bottom)):
                if side in b.sides:
                    own = b.sides[side]
                    full[b.col0 : b.col0 + len(own)] = np.where(own >= 0, own + off, -1)
        # nodes: open regions 0..n_open-1, then this row's pieces
        pairs: list[np.ndarray] = []
        cuts: dict[int, list[tuple[int, float, np.ndarray]]] = {}  # node -> breakpoints to insert
        seam_cuts: dict[int, np.ndarray] = {}  # seam piece -> breakpoints along the seam
        both = (self.seam >= 0) & (top >= 0)
        if both.any():
            sp, npc = self.seam[both], top[both]
            region = np.array([self.seam_at[k][0] for k in sp], np.int64)
            same = np.asarray(self.cls, np.int64)[region] == cls[npc]
            pairs.append(np.stack([region[same], n_open + npc[same]], axis=1))
            below, above = _breakpoints(top, 0), _breakpoints(self.seam, 0)
            for k in np.unique(sp[same]):
                seam_cuts[int(k)] = below
            for k in np.unique(npc[same]):
                cuts.setdefault(n_open + int(k), []).append((1, float(r0), above))
        for a, b, oa, ob in zip(row[:-1], row[1:], offs[:-1], offs[1:-1]):  # across vertical block edges
            if "right" not in a.sides or "left" not in b.sides:
                continue
            pa, pb = a.sides["right"], b.sides["left"]
            on = (pa >= 0) & (pb >= 0)
            ga, gb = pa[on] + oa, pb[on] + ob
            same = cls[ga] == cls[gb]
            pairs.append(np.stack([n_open + ga[same], n_open + gb[same]], axis=1))
            for mine, theirs, off in ((ga[same], pb, n_open), (gb[same], pa, n_open)):
                bps = _breakpoints(theirs, r0)
                for k in np.unique(mine):
                    cuts.setdefault(off + int(k), []).append((0, float(b.col0), bps))
        regions = _union_nodes(n_open + n_new, pairs)
        for k, bps in seam_cuts.items():  # open pieces along the seam get the row's vertices
            g, m = self.seam_at[k]
            self.members[g][m] = _insert_breakpoints(self.members[g][m], [(1, float(r0), bps)])
        on_bottom = np.zeros(n_new, bool)
        if not last:
            on_bottom[bottom[bottom >= 0]] = True
        closed, closed_cls, seam_at = self._regroup(regions, pieces, cls, cuts, on_bottom)
        # the new seam: this row's bottom edge, numbered by open piece
        order = sorted(seam_at)
        renum = np.full(n_new + 1, -1, np.int64)
        renum[order] = np.arange(len(order))
        self.seam = renum[bottom] if not last else np.full(width, -1, np.int64)
        self.seam_at = [seam_at[p] for p in order]
        return closed, closed_cls

    def _regroup(self, regions: dict[int, list[int]], pieces: list[Any], cls: np.ndarray, cuts: dict[int, Any],
                 on_bottom: np.ndarray) -> tuple[list[list[Any]], list[int], dict[int, tuple[int, int]]]:
        """Keep regions on the new bottom edge open; return the others (complete), their classes, and
        for each piece on the new edge its (open region, index in that region's members)."""
        n_open = len(self.members)
        members: list[list[Any]] = []
        region_cls: list[int] = []
        seam_at: dict[int, tuple[int, int]] = {}
        closed: list[list[Any]] = []
        closed_cls: list[int] = []
        for nodes in regions.values():
            geoms: list[Any] = []
            opened: list[tuple[int, int]] = []  # (piece, index in geoms) of pieces on the new bottom edge
            for k in nodes:
                if k < n_open:
                    geoms.extend(self.members[k])
                    continue
                p = k - n_open
                g = pieces[p]
                if len(nodes) > 1 and k in cuts:
                    g = _insert_breakpoints(g, cuts[k])
                if on_bottom[p]:
                    opened.append((p, len(geoms)))
                geoms.append(g)
            c = self.cls[nodes[0]] if nodes[0] < n_open else int(cls[nodes[0] - n_open])
            if opened:
                seam_at.update({p: (len(members), m) for p, m in opened})
                # pieces off the new edge will not change again: to the spill file
                keep = {m for _, m in opened}
                geoms = [g if m in keep or isinstance(g, _Stored) else self.spill.put(g) for m, g in enumerate(geoms)]
                members.append(geoms)
                region_cls.append(c)
            else:
                closed.append(geoms)
                closed_cls.append(c)
        self.members, self.cls = members, region_cls
        return closed, closed_cls, seam_at


def _union_nodes(n: int, pairs: list[np.ndarray]) -> dict[int, list[int]]:
    """Nodes ``0 .. n-1`` joined by ``pairs`` (union-find): root -> its nodes, in node order."""
    parent = np.arange(n)
    for x, y in (np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64)):
        rx, ry = _find(parent, int(x)), _find(parent, int(y))
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    regions: dict[int, list[int]] = {}
    for k in range(n):
        regions.setdefault(_find(parent, k), []).append(k)
    return regions


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
