"""Units: the class-raster nodata value, metres per CRS unit, and polygon measures.

Pure: a CRS is duck-typed (``is_projected``, ``linear_units_factor``,
``to_wkt()``), as rasterio's and pyproj's both provide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

#: Class id that marks "no data" in every class raster geoseg reads or writes.
NODATA = 255

#: Metres per degree of latitude (mean); used to turn a length in metres into
#: degrees for a geographic CRS, where longitude degrees shrink with latitude.
METRES_PER_DEGREE = 111_320.0


def metres_per_unit(crs: Any) -> float:
    """Metres per linear unit of a projected CRS (1.0 for metres, 0.3048 for feet, …)."""
    try:
        return float(crs.linear_units_factor[1])
    except Exception as e:  # rasterio raises CRSError for unusual units
        raise ConfigError(f"cannot tell the linear unit of {crs}: {e}") from None


def metres_to_crs_units(crs: Any, metres: float) -> float:
    """A length in metres as CRS units (degrees of latitude for a geographic CRS; as-is without a CRS)."""
    if crs is None:
        return metres
    if crs.is_projected:
        return metres / metres_per_unit(crs)
    return metres / METRES_PER_DEGREE


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
            return cls(factor=metres_per_unit(crs))
        return cls(geodesic_wkt=crs.to_wkt())

    def __call__(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import shapely

        if self.geodesic_wkt is None:
            return shapely.area(geoms) * self.factor**2, shapely.length(geoms) * self.factor
        from pyproj import CRS

        geod = CRS.from_wkt(self.geodesic_wkt).get_geod()
        ap = [geod.geometry_area_perimeter(g) for g in geoms]  # type: ignore[union-attr]
        return np.abs([a for a, _ in ap]).astype(np.float64), np.array([p for _, p in ap], np.float64)
