"""Reading a raster on a coarser grid: every ``d`` × ``d`` scene pixels averaged into one.

Used when the model's ground resolution is much coarser than the scene's
(a 2 cm drone mosaic and a model trained at 0.8 m): the engine then works
on this decimated grid, and the classes it produces are written back on
the scene's own grid (each working pixel covers ``d`` × ``d`` scene pixels,
and the scene's own nodata mask is applied at full resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.windows import Window

from ..geometry.grid import Grid, reflect_index
from .raster import RasterSource


def decimated_grid(grid: Grid, d: int) -> Grid:
    """The grid of ``d`` × ``d`` cells over ``grid`` (the last row and column may be partial)."""
    return Grid((math.ceil(grid.height / d), math.ceil(grid.width / d)), grid.transform * Affine.scale(d), grid.crs)


@dataclass
class DecimatedSource(RasterSource):
    """A :class:`RasterSource` read on :func:`decimated_grid` (GDAL's average resampling)."""

    decimation: int = 1

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "decimation": self.decimation}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.decimation = state["decimation"]

    def read(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        ds = self._ds()
        d = self.decimation
        h, w = math.ceil(ds.height / d), math.ceil(ds.width / d)
        ridx = reflect_index(np.arange(rows.start, rows.stop), h)
        cidx = reflect_index(np.arange(cols.start, cols.stop), w)
        r0, r1 = int(ridx.min()), int(ridx.max()) + 1
        c0, c1 = int(cidx.min()), int(cidx.max()) + 1
        win = Window(c0 * d, r0 * d, min(c1 * d, ds.width) - c0 * d, min(r1 * d, ds.height) - r0 * d)
        shape = (r1 - r0, c1 - c0)
        data = ds.read(list(self.bands), window=win, out_shape=(len(self.bands), *shape),
                       resampling=Resampling.average)
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        if all(f == [MaskFlags.all_valid] for f in flags):
            valid = np.ones(shape, dtype=bool)
        else:
            valid = ds.dataset_mask(window=win, out_shape=shape, resampling=Resampling.mode) > 0
        if data.dtype.kind == "f":
            valid &= np.isfinite(data).all(axis=0)
        return data[:, ridx - r0][:, :, cidx - c0], valid[ridx - r0][:, cidx - c0]

    def native_mask(self, rows: slice, cols: slice) -> np.ndarray | None:
        """Validity (h, w) of a window of the scene's own grid, or None where every pixel is valid."""
        ds = self._ds()
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        if all(f == [MaskFlags.all_valid] for f in flags):
            return None
        win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        return ds.dataset_mask(window=win) > 0
