"""Raster I/O: windowed reads with reflected edges, and COG class rasters out.

This is one of the two modules that touch files (the other is the CLI).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from ..errors import InputNotFoundError, NotARasterError
from ..geometry.grid import Grid, reflect_index
from .overviews import Pyramid, levels_for

F = TypeVar("F", bound=Callable[..., Any])

#: GDAL block cache, in bytes (rasterio hands GDAL_CACHEMAX to GDALSetCacheMax64,
#: so a bare 64 would mean 64 bytes: no cache at all). Big enough to keep the
#: blocks a read or write touches; small enough that memory does not follow the scene.
GDAL_CACHE_BYTES = 64 * 2**20


def bounded_gdal_cache(func: F) -> F:
    """Run ``func`` with GDAL's block cache capped at :data:`GDAL_CACHE_BYTES`.

    Everything here reads and writes by blocks itself; GDAL's default cache
    (5 % of RAM) would only grow with the scene.
    """
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def open_raster(path: str | Path) -> Any:
    """Open a raster for reading, with one-line errors for the common mistakes."""
    p = str(path)
    if "://" not in p and not p.startswith("/vsi") and not Path(p).exists():
        raise InputNotFoundError(f"input raster {p} does not exist; check the path")
    try:
        return rasterio.open(p)
    except RasterioIOError:
        raise NotARasterError(
            f"{p} is not a raster GDAL can read; pass a GeoTIFF, VRT or another GDAL raster"
        ) from None


def data_bands(ds: Any) -> list[int]:
    """1-based indexes of the bands that carry data (alpha bands are masks, not data)."""
    return [b for b, ci in zip(ds.indexes, ds.colorinterp) if ci != ColorInterp.alpha] or list(
        ds.indexes
    )


@dataclass
class RasterSource:
    """A picklable handle on a raster: path and the (1-based) bands to read.

    Each thread opens its own GDAL dataset the first time it reads, so the
    source can be shared by dask's threads and shipped to distributed
    workers as a plain path.

    With ``decimation`` d > 1 the source is read on the raster's grid
    coarsened by d (:meth:`Grid.coarsened`): each pixel is the average of the
    valid pixels of its d × d cell (GDAL's average resampling), valid where
    any of them is; :meth:`native_mask` gives validity at full resolution.
    """

    path: str
    bands: tuple[int, ...]
    decimation: int = 1
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "bands": self.bands, "decimation": self.decimation}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.bands = state["path"], state["bands"]
        self.decimation = state.get("decimation", 1)
        self._local = threading.local()

    def _ds(self) -> Any:
        ds = getattr(self._local, "ds", None)
        if ds is None:
            ds = self._local.ds = rasterio.open(self.path)
        return ds

    @property
    def grid(self) -> Grid:
        return Grid.from_rio(self._ds())

    def read(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Raw values (C, h, w) and validity (h, w) bool for a window.

        The window may reach past the raster's bottom and right edges; those
        pixels mirror the raster (``numpy.pad(mode="reflect")``). Validity
        combines nodata values, per-dataset masks and alpha (GDAL's dataset
        mask) with finiteness: a pixel with a NaN or infinite value in any
        band is invalid (a float raster often marks nodata with NaN without
        declaring it). A raster with none of those is valid everywhere.
        """
        ds = self._ds()
        d = self.decimation
        h, w = -(-ds.height // d), -(-ds.width // d)
        ridx = reflect_index(np.arange(rows.start, rows.stop), h)
        cidx = reflect_index(np.arange(cols.start, cols.stop), w)
        r0, r1 = int(ridx.min()), int(ridx.max()) + 1
        c0, c1 = int(cidx.min()), int(cidx.max()) + 1
        if d == 1:
            win = Window(c0, r0, c1 - c0, r1 - r0)
            data = ds.read(list(self.bands), window=win)
            valid = (np.ones(data.shape[1:], dtype=bool) if self._all_valid(ds) else ds.dataset_mask(window=win) > 0)
        else:
            data, valid = self._read_cells(ds, r0, r1, c0, c1)
        if data.dtype.kind in "fc":
            valid &= np.isfinite(data).all(axis=0)
        inside = rows.start >= 0 and rows.stop <= h and cols.start >= 0 and cols.stop <= w
        if not inside:
            data = data[:, ridx - r0][:, :, cidx - c0]
            valid = valid[ridx - r0][:, cidx - c0]
        return data, valid

    def _read_cells(self, ds: Any, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Cells [r0, r1) x [c0, c1) of the d-coarsened grid: the mean of each cell's valid pixels
        (GDAL's average honours nodata and masks; a band's own nodata value per band, and rounded to
        the raster's type) and whether it has any. A NaN that no declared nodata covers spreads
        over its cell, which then reads as invalid.

        The last row and column of cells may be partial (the raster's edge):
        they are read apart, so that GDAL averages exactly each cell's pixels
        rather than stretching the window over whole cells. (GDAL rounds the
        averaged mask: beyond d = 22, a cell with under d² / 510 valid pixels
        reads as invalid.)
        """
        d = self.decimation
        data = np.zeros((len(self.bands), r1 - r0, c1 - c0), dtype=ds.dtypes[self.bands[0] - 1])
        valid = np.ones(data.shape[1:], dtype=bool)
        masked = not self._all_valid(ds)
        whole_r, whole_c = ds.height // d, ds.width // d
        for ra, rb in ((r0, min(r1, whole_r)), (max(r0, whole_r), r1)):
            for ca, cb in ((c0, min(c1, whole_c)), (max(c0, whole_c), c1)):
                if ra >= rb or ca >= cb:
                    continue
                win = Window(ca * d, ra * d, min(cb * d, ds.width) - ca * d, min(rb * d, ds.height) - ra * d)
                at = np.s_[ra - r0 : rb - r0, ca - c0 : cb - c0]
                data[:, at[0], at[1]] = ds.read(list(self.bands), window=win,
                                                   out_shape=(len(self.bands), rb - ra, cb - ca),
                                                   resampling=Resampling.average)
                if masked:  # a cell is valid where any of its pixels is
                    valid[at] = ds.dataset_mask(window=win, out_shape=(rb - ra, cb - ca),
                                                resampling=Resampling.average) > 0
        return data, valid

    def _all_valid(self, ds: Any) -> bool:
        return all(ds.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in self.bands)

    def native_mask(self, rows: slice, cols: slice) -> np.ndarray | None:
        """Validity (h, w) of a window of the raster's own grid, or None where every pixel is valid."""
        ds = self._ds()
        if self._all_valid(ds):
            return None
        return ds.dataset_mask(window=Window(cols.start, rows.start, cols.stop - cols.start,
                                             rows.stop - rows.start)) > 0


@dataclass
class ArraySource:
    """An in-memory (C, H, W) image with the same ``read`` contract as :class:`RasterSource`."""

    data: np.ndarray
    valid: np.ndarray | None = None

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    def read(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.grid_shape
        ridx = reflect_index(np.arange(rows.start, rows.stop), h)
        cidx = reflect_index(np.arange(cols.start, cols.stop), w)
        data = self.data[:, ridx][:, :, cidx]
        if self.valid is None:
            return data, np.ones(data.shape[1:], dtype=bool)
        return data, self.valid[ridx][:, cidx]


def _tiff_block(block: int) -> int:
    """Largest GeoTIFF tile side (<= 512, multiple of 16) that divides ``block``."""
    for t in (512, 256, 128, 64, 32, 16):
        if block % t == 0:
            return t
    return 16


class BlockWriter:
    """Writes output blocks into a tiled GeoTIFF, then converts it to a COG.

    Blocks arrive in any order from any thread; a lock serialises GDAL's
    writes into the working file (and one lock per overview level those into
    the levels, see :mod:`geoseg.io.overviews`, which the writing thread
    reduces the block into outside the first lock). The working file is
    tiled so that every block covers whole TIFF tiles (no read-modify-write),
    and lives under a hidden temporary name until :meth:`finish` publishes
    the COG under its final name.
    """

    def __init__(self, final: Path, grid: Grid, *, dtype: str, nodata: float, block: int,
                 colormap: dict[int, tuple[int, int, int, int]] | None = None,
                 tags: dict[str, str] | None = None, description: str = "", resampling: str = "mode"):
        self.final = Path(final)
        self.work = self.final.with_name(f".{self.final.name}.part.tif")
        self.cog = self.final.with_name(f".{self.final.name}.cog.tif")
        self.grid = grid
        self.nodata = nodata
        self._lock = threading.Lock()
        t = _tiff_block(block)
        profile = dict(
            driver="GTiff", width=grid.width, height=grid.height, count=1, dtype=dtype,
            crs=grid.crs, transform=grid.transform, nodata=nodata, tiled=True,
            blockxsize=t, blockysize=t, compress="ZSTD", zstd_level=1, bigtiff="IF_SAFER",
        )
        self.resampling = resampling
        levels = levels_for(grid.shape)
        self._pyramid = Pyramid(self.work, profile, levels, block, resampling) if levels else None
        try:
            self._ds = rasterio.open(self.work, "w", **profile)
        except BaseException:
            if self._pyramid is not None:
                self._pyramid.remove()
            raise
        if colormap:
            self._ds.write_colormap(1, colormap)
        if tags:
            self._ds.update_tags(**tags)
        if description:
            self._ds.set_band_description(1, description)

    def write(self, rows: slice, cols: slice, block: np.ndarray) -> float:
        """Write a block (any thread) and reduce it into the overview levels; returns the seconds the latter took."""
        win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        with self._lock:
            if self._ds.closed:  # aborted meanwhile (another block failed): nothing to keep
                return 0.0
            self._ds.write(block, 1, window=win)
        if self._pyramid is None:
            return 0.0
        t = time.perf_counter()
        self._pyramid.write(rows, cols, block)  # on the writing thread, outside the lock
        return time.perf_counter() - t

    def finish(self, *, category_names: list[str] | None = None) -> None:
        """Close the working file and publish it as a COG with overviews."""
        self._ds.close()
        how = self.resampling.upper()
        try:
            src, overviews = self.work, "AUTO"
            if self._pyramid is not None:
                src, overviews = self._pyramid.as_vrt(self.work, _vrt(self.work)), "FORCE_USE_EXISTING"
            rasterio.shutil.copy(
                src, self.cog, driver="COG", COMPRESS="DEFLATE", LEVEL=6, BLOCKSIZE=512, OVERVIEWS=overviews,
                RESAMPLING=how, OVERVIEW_RESAMPLING=how, BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS",
            )
        finally:
            self._remove_work()
        if category_names:
            _write_category_names(self.cog, category_names)
            os.replace(_aux(self.cog), _aux(self.final))
        os.replace(self.cog, self.final)

    def abort(self) -> None:
        """Remove every temporary file; the final name is never touched. Blocks written later are dropped."""
        with self._lock:
            if not self._ds.closed:
                self._ds.close()
        self._remove_work()
        for p in (self.cog, _aux(self.cog)):
            p.unlink(missing_ok=True)

    def _remove_work(self) -> None:
        if self._pyramid is not None:
            self._pyramid.remove()
        for p in (self.work, _vrt(self.work)):
            p.unlink(missing_ok=True)


def _vrt(path: Path) -> Path:
    return path.with_name(path.name + ".vrt")


def _aux(path: Path) -> Path:
    return path.with_name(path.name + ".aux.xml")


def _write_category_names(path: Path, names: list[str]) -> None:
    """Class names as GDAL category names, in the PAM sidecar GDAL and QGIS read."""
    cats = "".join(f"      <Category>{escape(n)}</Category>\n" for n in names)
    _aux(path).write_text(
        "<PAMDataset>\n  <PAMRasterBand band=\"1\">\n    <CategoryNames>\n"
        f"{cats}    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n"
    )


def class_tags(classes: list[str], colors: list[str]) -> dict[str, str]:
    """Class names and colours embedded in the GeoTIFF (survive without sidecars)."""
    return {"GEOSEG_CLASSES": json.dumps(classes), "GEOSEG_COLORS": json.dumps(colors)}

