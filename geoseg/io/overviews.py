"""COG overviews built while the blocks stream, instead of in a pass over the finished raster.

GDAL's ``MODE`` overviews over a whole class raster cost about three times
as long as compressing it, in one thread, after inference has ended. Here
each block is reduced 2 x 2 at a time as it is written (on whichever thread
writes it), into one working GeoTIFF per level; the COG is then copied from
a VRT that names those files as its overviews, so GDAL only compresses.

Levels follow GDAL's ``OVERVIEWS=AUTO`` rule (halve until the level fits in
one COG tile). A block's window on level ``L`` is its level-0 window / 2^L,
so blocks must start on multiples of 2^L; :func:`levels_for` returns 0 when
they do not, and the caller falls back to GDAL's overviews.
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


def levels_for(shape: tuple[int, int], block: int) -> int:
    """How many 2x levels a COG of ``shape`` gets (GDAL's AUTO rule); 0 where ``block`` is not aligned."""
    h, w = shape
    n = 0
    while max(-(-h // 2**n), -(-w // 2**n)) > COG_TILE:
        n += 1
    return n if n and block % 2**n == 0 else 0


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
        self.paths = [base.with_name(f"{base.name}.ovr{n}.tif") for n in range(1, levels + 1)]
        self._locks = [threading.Lock() for _ in self.paths]
        self._ds = []
        h, w, t = profile["height"], profile["width"], profile["transform"]
        for n, path in enumerate(self.paths, 1):
            f = 2**n
            tile = max(16, min(512, block // f // 16 * 16))
            self._ds.append(rasterio.open(path, "w", **{
                **profile, "height": -(-h // f), "width": -(-w // f), "transform": t @ Affine.scale(f),
                "blockxsize": tile, "blockysize": tile}))

    def write(self, rows: slice, cols: slice, block: np.ndarray) -> None:
        """Reduce a level-0 block (starting on a multiple of 2^levels) into every level."""
        r, c = rows.start, cols.start
        for n, (ds, lock) in enumerate(zip(self._ds, self._locks), 1):
            block = self.reduce(block, self.nodata)
            f = 2**n
            with lock:
                ds.write(block, 1, window=Window(c // f, r // f, block.shape[1], block.shape[0]))

    def close(self) -> None:
        for ds in self._ds:
            if not ds.closed:
                ds.close()

    def remove(self) -> None:
        self.close()
        for p in self.paths:
            p.unlink(missing_ok=True)

    def as_vrt(self, level0: Path, vrt: Path) -> Path:
        """A VRT of ``level0`` (its colours, tags and nodata kept) whose overviews are the level files."""
        self.close()
        rasterio.shutil.copy(level0, vrt, driver="VRT")
        ovr = "".join(f'<Overview><SourceFilename relativeToVRT="0">{escape(str(p))}</SourceFilename>'
                      "<SourceBand>1</SourceBand></Overview>" for p in self.paths)
        xml = vrt.read_text()
        xml, n = re.subn(r"(\s*)</VRTRasterBand>", lambda m: ovr + m.group(0), xml, count=1)
        if n != 1:  # pragma: no cover - GDAL always writes one band element here
            raise RuntimeError("unexpected VRT layout; cannot attach overviews")
        vrt.write_text(xml)
        return vrt
