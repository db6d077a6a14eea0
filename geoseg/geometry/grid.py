"""The pixel grid, and the model tiles and output blocks cut from it.

Everything here is pure arithmetic on integers and an affine transform; no
file is opened. Axis order is always (row, col); arrays are (C, H, W).

Tiling
------
Model tiles have side ``tile`` and start on a regular lattice with step
``stride = tile - overlap``::

    origins = 0, stride, 2 * stride, ...   n = max(1, ceil((H - tile) / stride) + 1)

so the last tile reaches or passes the far edge (the part beyond the raster
is filled by reflecting the raster, see :func:`reflect_index`). ``stride`` is
a multiple of the model's ``pad_multiple`` so that every tile samples the
scene in the same phase as whole-image inference would.

Blocks
------
Output blocks group ``tiles_per_block`` × ``tiles_per_block`` tiles, so a
block has side ``block = tiles_per_block * stride`` and owns exactly the
tiles whose origin falls inside it. A block's tiles cover its own pixels
plus an overhang of ``overlap`` pixels below and to the right, which is
handed to the neighbouring blocks: no tile is ever run twice, and nothing
but those thin strips has to outlive a block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine

from ..errors import ConfigError

#: GeoTIFF tiles must have sides that are multiples of 16.
_TIFF_TILE_QUANTUM = 16


@dataclass(frozen=True)
class Grid:
    """An immutable pixel grid: ``shape`` (rows, cols), ``transform``, ``crs``.

    Slicing returns the sub-grid with the matching transform, also for
    windows that reach past the edges::

        grid[100:612, 0:512]   # Grid((512, 512), transform shifted 100 rows down)
    """

    shape: tuple[int, int]
    transform: Affine
    crs: Any = None

    @classmethod
    def from_rio(cls, src: Any) -> Grid:
        """Build from anything with ``.shape``, ``.transform`` and ``.crs`` (duck-typed)."""
        return cls((int(src.shape[0]), int(src.shape[1])), src.transform, src.crs)

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units, both positive (rotation ignored)."""
        a, b, _, d, e, _ = self.transform[:6]
        return math.hypot(a, d), math.hypot(b, e)

    def coarsened(self, d: int) -> Grid:
        """The grid of d × d-pixel cells over this one (the last row and column of cells may be partial)."""
        return Grid((-(-self.height // d), -(-self.width // d)), self.transform * Affine.scale(d), self.crs)

    def __getitem__(self, roi: tuple[slice, slice]) -> Grid:
        rows, cols = roi
        r0, r1 = _bounds(rows, self.height)
        c0, c1 = _bounds(cols, self.width)
        return Grid((r1 - r0, c1 - c0), self.transform @ Affine.translation(c0, r0), self.crs)


def _bounds(s: slice, n: int) -> tuple[int, int]:
    if s.step not in (None, 1):
        raise ValueError("grid slices must have step 1")
    start = 0 if s.start is None else int(s.start)
    stop = n if s.stop is None else int(s.stop)
    return start, stop


def tile_origins(length: int, tile: int, stride: int) -> np.ndarray:
    """Origins of the tiles along one axis of ``length`` pixels.

    ``n = max(1, ceil((length - tile) / stride) + 1)``; the last tile ends at
    or past ``length`` so the final row/column is always covered.
    """
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((length - tile) / stride) + 1
    return np.arange(n, dtype=np.int64) * stride


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map indices (possibly outside ``[0, n)``) onto ``[0, n)`` by reflection.

    Same convention as ``numpy.pad(mode="reflect")`` (the edge pixel is not
    repeated), applied as often as needed, so a tile that reaches far past a
    small raster still gets a defined, mirror-image context. ``n == 1`` maps
    everything to 0.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


@dataclass(frozen=True)
class Layout:
    """Tiles and blocks over a grid. Build with :meth:`Layout.create`.

    Attributes are in pixels. ``tiles`` is the number of tiles per axis
    (rows, cols); ``blocks`` the number of output blocks per axis.
    """

    grid: Grid
    tile: int
    overlap: int
    tiles_per_block: int

    @classmethod
    def create(
        cls,
        grid: Grid,
        *,
        tile: int,
        overlap: int,
        pad_multiple: int = 1,
        block_target: int = 1024,
    ) -> Layout:
        """Choose a valid layout.

        ``tile`` must be a multiple of ``pad_multiple``; ``overlap`` is rounded
        up so that the stride is a multiple of ``pad_multiple``. The number of
        tiles per block is chosen so the block side is a multiple of 16 (a
        valid GeoTIFF tile), preferably of 512 (the COG's internal tile), and
        close to ``block_target``.
        """
        p = max(1, int(pad_multiple))
        if tile <= 0 or tile % p:
            raise ConfigError(
                f"tile size {tile} is not a positive multiple of the model's pad_multiple {p}; "
                f"use --tile-size {max(p, (tile // p) * p)}"
            )
        if overlap < 0:
            raise ConfigError(f"overlap must be >= 0, got {overlap}")
        stride = ((tile - overlap) // p) * p
        if stride <= 0 or tile - stride > stride:
            raise ConfigError(
                f"overlap {overlap} is too large for tile size {tile}: it can be at most "
                f"half the tile (after rounding the stride down to a multiple of {p}); "
                f"use --overlap {tile // 4}"
            )
        step = _TIFF_TILE_QUANTUM // math.gcd(stride, _TIFF_TILE_QUANTUM)
        candidates = list(range(step, max(step, 2 * block_target // stride) + step, step))
        near = [n for n in candidates if block_target / 2 <= n * stride <= 1.5 * block_target]
        # 512-aligned blocks fall on whole COG tiles, but not at any price: a block far from the
        # target leaves too few blocks for the wavefront to keep every worker busy
        aligned = [n for n in near if (n * stride) % 512 == 0 and abs(n * stride - block_target) <= block_target / 4]
        pool = aligned or candidates
        n = min(pool, key=lambda k: abs(k * stride - block_target))
        return cls(grid, tile, tile - stride, n)

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def block(self) -> int:
        """Side of an output block in pixels (a multiple of 16)."""
        return self.tiles_per_block * self.stride

    @property
    def tiles(self) -> tuple[int, int]:
        return (
            len(tile_origins(self.grid.height, self.tile, self.stride)),
            len(tile_origins(self.grid.width, self.tile, self.stride)),
        )

    @property
    def blocks(self) -> tuple[int, int]:
        nt = self.tiles
        return (-(-nt[0] // self.tiles_per_block), -(-nt[1] // self.tiles_per_block))

    def block_slices(self, i: int, j: int) -> tuple[slice, slice]:
        """The pixels block (i, j) writes.

        Blocks are ``block`` pixels wide except the last one of each axis,
        which runs to the grid's edge (it may be up to ``overlap`` wider when
        the tiles stop less than a block short of the edge).
        """
        b = self.block
        h, w = self.grid.shape
        nb = self.blocks
        r1 = h if i == nb[0] - 1 else (i + 1) * b
        c1 = w if j == nb[1] - 1 else (j + 1) * b
        return slice(i * b, r1), slice(j * b, c1)

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Block sizes per axis, as dask ``chunks``."""
        nb = self.blocks
        rows = tuple(self.block_slices(i, 0)[0].stop - self.block_slices(i, 0)[0].start for i in range(nb[0]))
        cols = tuple(self.block_slices(0, j)[1].stop - self.block_slices(0, j)[1].start for j in range(nb[1]))
        return rows, cols

    def block_tiles(self, i: int, j: int) -> list[tuple[int, int]]:
        """Global (row, col) origins of the tiles owned by block (i, j), row-major."""
        nr, nc = self.tiles
        k = self.tiles_per_block
        s = self.stride
        return [
            (r * s, c * s)
            for r in range(i * k, min((i + 1) * k, nr))
            for c in range(j * k, min((j + 1) * k, nc))
        ]

    def block_extent(self, i: int, j: int) -> tuple[slice, slice]:
        """Pixels covered by block (i, j)'s tiles: the block plus its overhang.

        May reach past the grid's far edges (that part is reflected input).
        """
        origins = self.block_tiles(i, j)
        r0, c0 = i * self.block, j * self.block
        r1 = max(r for r, _ in origins) + self.tile
        c1 = max(c for _, c in origins) + self.tile
        return slice(r0, r1), slice(c0, c1)

    def iter_blocks(self) -> Iterator[tuple[int, int]]:
        nb = self.blocks
        for i in range(nb[0]):
            for j in range(nb[1]):
                yield i, j
