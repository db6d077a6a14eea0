"""COG overviews built while the blocks stream, instead of in a pass over the finished raster.

GDAL's ``MODE`` overviews over a whole class raster cost about three times
as long as compressing it, in one thread, after inference has ended. Here
each block is reduced 2 x 2 at a time as it is written (on whichever thread
writes it), into one working GeoTIFF per level; the COG is then copied from
a VRT that names those files as its overviews, so GDAL only compresses.

Levels follow GDAL's ``OVERVIEWS=AUTO`` rule (halve until the level fits in
one COG tile). A block's window on level ``L`` is its level-0 window / 2^L,
so a block only streams into the levels whose factor 2^L divides the block
side (:func:`streamable`); the deeper levels, a small fraction of the
pixels, are reduced from the last streamed one window by window when the
raster is finished (:meth:`Pyramid.complete`), with the same reduction.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window

COG_TILE = 512


COMPLETE_WINDOW = 4096  # level pixels per side read at once when completing the deeper levels


def levels_for(shape: tuple[int, int]) -> int:
    """How many 2x levels a COG of ``shape`` gets (GDAL's ``OVERVIEWS=AUTO`` rule)."""
    h, w = shape
    n = 0
    while max(-(-h // 2**n), -(-w // 2**n)) > COG_TILE:
        n += 1
    return n


def streamable(block: int, levels: int) -> int:
    """The levels that blocks of side ``block`` (starting on multiples of it) can be reduced into."""
    n = 0
    while n < levels and block % 2 ** (n + 1) == 0:
        n += 1
    return n


def mode2x2(x: np.ndarray, nodata: float) -> np.ndarray:
    """Most frequent value of each 2 x 2 cell, ignoring ``nodata`` (the first wins ties).

    An odd last row or column counts as padded with ``nodata``, so the
    result has GDAL's overview size ``ceil(h / 2) x ceil(w / 2)``.
    """
    q = _quads(x, nodata)
    valid = [p != nodata for p in q]
    eq = {(i, j): (q[i] == q[j]).view(np.uint8) for i in range(4) for j in range(i + 1, 4)}
    best, best_n = q[0].copy(), np.where(valid[0], 1 + eq[0, 1] + eq[0, 2] + eq[0, 3], 0)
    for i in range(1, 4):
        n = 1 + sum(eq[min(i, j), max(i, j)] for j in range(4) if j != i)
        n = np.where(valid[i], n, 0)
        better = n > best_n
        np.copyto(best, q[i], where=better)
        np.maximum(best_n, n, out=best_n)
    return best


def mean2x2(x: np.ndarray, nodata: float) -> np.ndarray:
    """Mean of each 2 x 2 cell over its valid pixels; ``nodata`` where it has none."""
    q = _quads(x, nodata)
    valid = [(p != nodata) for p in q]
    n = sum(v.astype(np.float32) for v in valid)
    total = sum(np.where(v, p, 0).astype(np.float32) for p, v in zip(q, valid))
    return np.where(n > 0, total / np.maximum(n, 1), nodata).astype(x.dtype)


def _quads(x: np.ndarray, nodata: float) -> list[np.ndarray]:
    h, w = x.shape
    if h % 2 or w % 2:
        x = np.pad(x, ((0, h % 2), (0, w % 2)), constant_values=nodata)
    return [x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]]


class Pyramid:
    """One working GeoTIFF per overview level, filled block by block as level 0 is written."""

    def __init__(self, base: Path, profile: dict[str, Any], levels: int, block: int, resampling: str):
        self.reduce = mode2x2 if resampling == "mode" else mean2x2
        self.nodata = profile["nodata"]
        self.streamed = streamable(block, levels)
        self.paths = [base.with_name(f"{base.name}.ovr{n}.tif") for n in range(1, levels + 1)]
        self._locks = [threading.Lock() for _ in self.paths]
        self._ds: list[Any] = []
        h, w, t = profile["height"], profile["width"], profile["transform"]
        try:
            for n, path in enumerate(self.paths, 1):
                f = 2**n
                side = block // f if n <= self.streamed else COMPLETE_WINDOW // 2
                tile = max(16, min(512, side // 16 * 16))
                self._ds.append(rasterio.open(path, "w", **{
                    **profile, "height": -(-h // f), "width": -(-w // f), "transform": t @ Affine.scale(f),
                    "blockxsize": tile, "blockysize": tile}))
        except BaseException:
            self.remove()
            raise

    def write(self, rows: slice, cols: slice, block: np.ndarray) -> None:
        """Reduce a level-0 block (starting on a multiple of its side) into the streamed levels."""
        r, c = rows.start, cols.start
        if r % 2**self.streamed or c % 2**self.streamed:
            raise ValueError(f"block at ({r}, {c}) does not start on a multiple of {2**self.streamed}")
        for n in range(1, self.streamed + 1):
            block = self.reduce(block, self.nodata)
            f = 2**n
            with self._locks[n - 1]:
                ds = self._ds[n - 1]
                if ds.closed:  # aborted meanwhile: the run is failing, nothing to keep
                    return
                ds.write(block, 1, window=Window(c // f, r // f, block.shape[1], block.shape[0]))

    def complete(self, level0: Path) -> None:
        """Reduce the levels below the streamed ones from the last streamed one (or ``level0``)."""
        self.close()
        for n in range(self.streamed + 1, len(self.paths) + 1):
            src_path = level0 if n == 1 else self.paths[n - 2]
            with rasterio.open(src_path) as src, rasterio.open(self.paths[n - 1], "r+") as dst:
                s = COMPLETE_WINDOW
                for r in range(0, src.height, s):
                    for c in range(0, src.width, s):
                        win = Window(c, r, min(s, src.width - c), min(s, src.height - r))
                        half = self.reduce(src.read(1, window=win), self.nodata)
                        dst.write(half, 1, window=Window(c // 2, r // 2, half.shape[1], half.shape[0]))

    def close(self) -> None:
        for ds, lock in zip(self._ds, self._locks):
            with lock:
                if not ds.closed:
                    ds.close()

    def remove(self) -> None:
        self.close()
        for p in self.paths:
            p.unlink(missing_ok=True)

    def as_vrt(self, level0: Path, vrt: Path) -> Path:
        """A VRT of ``level0`` (its colours, tags and nodata kept) whose overviews are the level files."""
        self.complete(level0)
        rasterio.shutil.copy(level0, vrt, driver="VRT")
        ovr = "".join(f'<Overview><SourceFilename relativeToVRT="0">{escape(str(p))}</SourceFilename>'
                      "<SourceBand>1</SourceBand></Overview>" for p in self.paths)
        xml = vrt.read_text()
        xml, n = re.subn(r"(\s*)</VRTRasterBand>", lambda m: ovr + m.group(0), xml, count=1)
        if n != 1:  # pragma: no cover - GDAL always writes one band element here
            raise RuntimeError("unexpected VRT layout; cannot attach overviews")
        vrt.write_text(xml)
        return vrt
