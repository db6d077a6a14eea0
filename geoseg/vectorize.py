"""Class raster -> land-cover polygons, block by block, merged exactly across block edges.

Each block is polygonized on its own (``rasterio.features.shapes`` with a
mask, in pixel coordinates offset to the block's origin, so every vertex is
an exact integer). A polygon that does not touch an internal block edge is
final and goes straight to the writer. The pieces that touch an internal
edge are kept; at the end the pieces of each class are unioned (shared edges
are bit-identical, so the union is exact) and split back into connected
polygons, holes kept. The result equals whole-raster polygonization, with
memory bounded by the block size and the edge-touching pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from shapely.geometry import shape

from .grid import Grid


@dataclass
class Pieces:
    """Polygons (pixel coordinates) of one block: final ones and edge-touching ones."""

    final: list[tuple[shapely.Polygon, int]]
    edge: list[tuple[shapely.Polygon, int]]


def polygonize_block(classes: np.ndarray, row0: int, col0: int, grid_shape: tuple[int, int], *,
                     nodata: int = 255, connectivity: int = 4) -> Pieces:
    """Polygons of one (h, w) uint8 block whose top-left pixel is (row0, col0) in the grid."""
    h, w = classes.shape
    H, W = grid_shape
    mask = classes != nodata
    final, edge = [], []
    if not mask.any():
        return Pieces(final, edge)
    t = Affine.translation(col0, row0)
    internal = (col0 > 0, row0 > 0, col0 + w < W, row0 + h < H)  # left, top, right, bottom
    for geom, value in features.shapes(classes, mask=mask, connectivity=connectivity, transform=t):
        poly = shape(geom)
        minx, miny, maxx, maxy = poly.bounds
        touches = ((internal[0] and minx == col0) or (internal[1] and miny == row0)
                   or (internal[2] and maxx == col0 + w) or (internal[3] and maxy == row0 + h))
        (edge if touches else final).append((poly, int(value)))
    return Pieces(final, edge)


def merge_edge_pieces(pieces: list[tuple[shapely.Polygon, int]]) -> Iterator[tuple[shapely.Polygon, int]]:
    """Merge the edge-touching pieces that form one region; yield the regions.

    Two pieces belong together when they have the same class and share a
    boundary segment of positive length (4-connectivity: a shared corner
    point does not join them). Pieces are grouped with union-find over the
    pairs an STRtree finds, and each group is unioned on its own; pixel
    coordinates are integers, so a fixed-precision overlay on the unit grid
    is exact.
    """
    if not pieces:
        return
    geoms = np.array([p for p, _ in pieces], dtype=object)
    cls = np.array([v for _, v in pieces])
    left, right = shapely.STRtree(geoms).query(geoms, predicate="touches")
    keep = (left < right) & (cls[left] == cls[right])
    left, right = left[keep], right[keep]
    shares_edge = shapely.relate_pattern(geoms[left], geoms[right], "****1****")
    parent = np.arange(len(geoms))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(left[shares_edge], right[shares_edge]):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for k in range(len(geoms)):
        groups.setdefault(find(k), []).append(k)
    for members in groups.values():
        if len(members) == 1:
            yield geoms[members[0]], int(cls[members[0]])
            continue
        merged = shapely.union_all(geoms[members], grid_size=1.0)
        for part in shapely.get_parts(merged):
            if not part.is_empty:
                yield part, int(cls[members[0]])


def to_crs_coords(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Pixel-coordinate geometries -> the grid's CRS (affine applied to every vertex)."""
    a, b, c, d, e, f = transform[:6]

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([a * x + b * y + c, d * x + e * y + f])

    return shapely.transform(geoms, apply)


def polygonize_blocks(read: Callable[[slice, slice], np.ndarray], grid: Grid, block: int, *,
                      sink: Callable[[list[tuple[shapely.Polygon, int]]], None], nodata: int = 255,
                      scheduler: str = "threads", num_workers: int | None = None) -> int:
    """Polygonize a class raster by ``block``-pixel blocks through dask.

    ``read(rows, cols)`` returns the class block; ``sink(polys)`` receives
    batches of final polygons in pixel coordinates (from worker threads; it
    must be thread-safe). Returns the number of polygons emitted.
    """
    import threading

    import dask

    H, W = grid.shape
    edges: list[tuple[shapely.Polygon, int]] = []
    lock = threading.Lock()
    count = [0]

    def run(r0: int, c0: int) -> None:
        rows, cols = slice(r0, min(r0 + block, H)), slice(c0, min(c0 + block, W))
        p = polygonize_block(read(rows, cols), r0, c0, grid.shape, nodata=nodata)
        if p.final:
            sink(p.final)
        with lock:
            edges.extend(p.edge)
            count[0] += len(p.final)

    tasks = [dask.delayed(run, pure=False)(r0, c0) for r0 in range(0, H, block) for c0 in range(0, W, block)]
    dask.compute(tasks, scheduler=scheduler, num_workers=num_workers)
    merged = list(merge_edge_pieces(edges))
    edges.clear()
    if merged:
        sink(merged)
    return count[0] + len(merged)
