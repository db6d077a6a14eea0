"""Per-class areas from a class raster and its grid (pure: arrays + grid in, numbers out).

Projected CRSs: every pixel has the same area, ``|det(transform)|`` in CRS
units², converted to m² with the CRS's linear unit (US survey feet, feet,
metres …). Geographic CRSs: a pixel's area depends on its latitude, so each
row's pixel area is computed geodesically on the CRS's ellipsoid (pyproj
``Geod``) and counts are accumulated per row. Either way the class areas sum
exactly to the valid (non-nodata) area.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..geometry.grid import Grid
from ..geometry.units import NODATA, metres_per_unit


def row_pixel_areas(grid: Grid, rows: slice) -> np.ndarray:
    """Area in m² of one pixel in each row of ``rows`` (float64, shape (n,))."""
    crs = grid.crs
    n = rows.stop - rows.start
    if crs is None:
        raise ConfigError("the raster has no CRS, so pixel areas are unknown; assign one with gdal_edit")
    a, b, c, d, e, f = grid.transform[:6]
    if crs.is_projected:
        k = metres_per_unit(crs)
        return np.full(n, abs(a * e - b * d) * k * k)
    if b or d:
        raise ConfigError("geodesic areas need a north-up grid (no rotation); warp the raster first")
    from pyproj import CRS, Geod

    geod = Geod(ellps="WGS84") if crs.to_epsg() == 4326 else CRS.from_user_input(crs.to_wkt()).get_geod()
    assert geod is not None  # a geographic CRS always has an ellipsoid
    r = np.arange(rows.start, rows.stop, dtype=np.float64)
    lat_top = f + e * r
    lat_bot = f + e * (r + 1)
    x0, x1 = c, c + a  # any column: area does not depend on longitude
    out = np.empty(n)
    for i, (t, btm) in enumerate(zip(lat_top, lat_bot)):
        area, _ = geod.polygon_area_perimeter([x0, x1, x1, x0], [t, t, btm, btm])
        out[i] = abs(area)
    return out


@dataclass
class AreaTable:
    """Pixels and m² per class (and per zone when zones are given)."""

    classes: list[str]
    pixels: np.ndarray = field(init=False)
    area_m2: np.ndarray = field(init=False)
    zone_area_m2: dict[Any, np.ndarray] = field(default_factory=dict)
    zone_pixels: dict[Any, np.ndarray] = field(default_factory=dict)
    nodata: int = NODATA

    def __post_init__(self) -> None:
        k = len(self.classes)
        self.pixels = np.zeros(k, np.int64)
        self.area_m2 = np.zeros(k, np.float64)

    def add_block(self, classes: np.ndarray, row_areas: np.ndarray,
                  zones: np.ndarray | None = None, zone_ids: list[Any] | None = None) -> None:
        """Accumulate an (h, w) class block whose rows have pixel areas ``row_areas``."""
        k = len(self.classes)
        if k <= 32 and zones is None:
            # per class: pixels per row, times the row's pixel area (10x a weighted bincount)
            for c in range(k):
                per_row = np.count_nonzero(classes == c, axis=1)
                self.pixels[c] += int(per_row.sum())
                self.area_m2[c] += float(per_row @ row_areas)
            return
        valid = classes < k
        cls = np.where(valid, classes, 0).astype(np.int64)
        weights = np.broadcast_to(row_areas[:, None], classes.shape)
        self.pixels += np.bincount(cls[valid], minlength=k)[:k]
        self.area_m2 += np.bincount(cls[valid], weights=weights[valid], minlength=k)[:k]
        if zones is not None and zone_ids is not None:
            inz = valid & (zones > 0)
            z = zones[inz].astype(np.int64) - 1
            flat = np.bincount(z * k + cls[inz], weights=weights[inz], minlength=len(zone_ids) * k)
            count = np.bincount(z * k + cls[inz], minlength=len(zone_ids) * k)
            for zi, zid in enumerate(zone_ids):
                part = flat[zi * k : (zi + 1) * k]
                if part.any():
                    self.zone_area_m2[zid] = self.zone_area_m2.get(zid, np.zeros(k)) + part
                    self.zone_pixels[zid] = (self.zone_pixels.get(zid, np.zeros(k, np.int64))
                                             + count[zi * k : (zi + 1) * k])

    def rows(self) -> list[dict[str, Any]]:
        total = self.area_m2.sum()
        return [
            {"class_id": i, "class_name": n, "pixels": int(p), "area_m2": float(a),
             "area_ha": float(a) / 1e4, "percent": 100.0 * float(a) / total if total else 0.0}
            for i, (n, p, a) in enumerate(zip(self.classes, self.pixels, self.area_m2))
        ]

    def zone_rows(self) -> list[dict[str, Any]]:
        out = []
        for zid, areas in self.zone_area_m2.items():
            tot = areas.sum()
            pixels = self.zone_pixels[zid]
            for i, (n, a) in enumerate(zip(self.classes, areas)):
                out.append({"zone": zid, "class_id": i, "class_name": n, "pixels": int(pixels[i]),
                            "area_m2": float(a),
                            "area_ha": float(a) / 1e4, "percent": 100.0 * a / tot if tot else 0.0})
        return out
