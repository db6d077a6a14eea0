"""Vector outputs: polygons as GeoPackage 1.2 (with an embedded QGIS style) and other formats."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from ..errors import ConfigError
from ..geometry.units import Measure

FORMATS = {  # --vector-format -> (GDAL driver, suffix)
    "gpkg": ("GPKG", ".gpkg"),
    "geojson": ("GeoJSON", ".geojson"),
    "parquet": ("Parquet", ".parquet"),  # GeoParquet through geopandas + pyarrow
    "fgb": ("FlatGeobuf", ".fgb"),
}
LAYER = "landcover"


@dataclass
class Batch:
    """Polygons ready to write: WKB in the raster's CRS, class ids, area (m²), perimeter (m)."""

    wkb: np.ndarray
    ids: np.ndarray
    area: np.ndarray
    perimeter: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def vector_format(name: str) -> tuple[str, str]:
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown vector format {name!r}; choose one of: {', '.join(FORMATS)}") from None


class PolygonWriter:
    """Appends polygon batches to one layer; thread-safe; hidden name until :meth:`finish`.

    Fields: ``class_id``, ``class_name``, ``area_m2``, ``perimeter_m``.
    Areas and perimeters are planar in m for projected CRSs (units
    converted) and geodesic for geographic CRSs.
    """

    def __init__(self, final: Path, crs: Any, classes: list[str], fmt: str = "gpkg"):
        self.driver, suffix = vector_format(fmt)
        self.final = Path(final).with_suffix(suffix)
        self.work = self.final.with_name(f".{self.final.stem}.part{suffix}")
        self.crs = crs
        self.classes = list(classes)
        self.max_id = -1  # the largest class id written
        self._lock = threading.Lock()
        self._first = True
        self._batches: list[Any] = []  # GeoParquet is written once, at finish
        self.count = 0
        self.work.unlink(missing_ok=True)
        self.measure = Measure.for_crs(crs)

    def write(self, geoms: np.ndarray, ids: np.ndarray) -> None:
        """Append polygons (shapely, in the layer's CRS) with their class ids."""
        if len(geoms) == 0:
            return
        area, perimeter = self.measure(geoms)
        self.write_batch(Batch(shapely.to_wkb(geoms), ids.astype(np.int32), area, perimeter))

    def write_batch(self, batch: Batch) -> None:
        """Append polygons already encoded and measured (WKB, class ids, m², m)."""
        if len(batch) == 0:
            return
        ids = batch.ids.astype(np.int32)
        top = int(ids.max())
        names = self.classes + [f"class_{i}" for i in range(len(self.classes), top + 1)]
        fields = {"class_id": ids, "class_name": np.array(names, dtype=object)[ids],
                  "area_m2": batch.area.astype(np.float64), "perimeter_m": batch.perimeter.astype(np.float64)}
        with self._lock:
            if self.driver == "Parquet":
                self._batches.append(_frame(shapely.from_wkb(batch.wkb), fields, self.crs))
            else:
                _write(self.work, batch.wkb, fields, self.crs, self.driver, not self._first)
            self._first = False
            self.count += len(batch)
            self.max_id = max(self.max_id, top)

    def finish(self, style_qml: str | None = None) -> Path:
        if self.driver == "Parquet":
            self._write_parquet()
        elif self._first:  # nothing was written: still publish an empty, valid layer
            _write(self.work, np.array([], dtype=object), {
                "class_id": np.array([], np.int32), "class_name": np.array([], object),
                "area_m2": np.array([]), "perimeter_m": np.array([])}, self.crs, self.driver, False)
        if style_qml and self.driver == "GPKG":
            embed_qgis_style(self.work, LAYER, style_qml)
        self.work.replace(self.final)
        return self.final

    def _write_parquet(self) -> None:
        import geopandas as gpd
        import pandas as pd

        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("GeoParquet output needs pyarrow: pip install pyarrow") from None
        empty = {"class_id": np.array([], np.int32), "class_name": np.array([], object),
                 "area_m2": np.array([]), "perimeter_m": np.array([])}
        frames = self._batches or [_frame(np.array([], dtype=object), empty, self.crs)]
        gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=self.crs).to_parquet(self.work)
        self._batches.clear()

    def abort(self) -> None:
        self.work.unlink(missing_ok=True)


def _frame(geoms: np.ndarray, fields: dict[str, np.ndarray], crs: Any) -> Any:
    import geopandas as gpd

    return gpd.GeoDataFrame(fields, geometry=list(geoms), crs=crs)


def _write(path: Path, wkb: np.ndarray, fields: dict[str, np.ndarray], crs: Any, driver: str,
           append: bool) -> None:
    """Append WKB polygons and their fields through GDAL (GeoPackage 1.2, which QGIS 3.22 reads)."""
    from pyogrio.raw import write

    opts = {"dataset_options": {"VERSION": "1.2"}} if driver == "GPKG" and not append else {}
    write(path, np.asarray(wkb, dtype=object), list(fields.values()), list(fields), layer=LAYER,
          driver=driver, geometry_type="Polygon", crs=crs.to_wkt() if crs is not None else None,
          append=append, **opts)


def embed_qgis_style(gpkg: Path, layer: str, qml: str, name: str = "geoseg") -> None:
    """Store ``qml`` as the layer's default style in the GeoPackage's ``layer_styles`` table.

    That is the table QGIS reads (and writes) for styles saved in a
    GeoPackage; it is registered in ``gpkg_contents`` as an attributes table
    so the file stays a valid GeoPackage.
    """
    con = sqlite3.connect(gpkg)
    try:
        con.execute(
            """CREATE TABLE IF NOT EXISTS layer_styles (
                id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256),
                f_table_schema TEXT(256), f_table_name TEXT(256), f_geometry_column TEXT(256),
                styleName TEXT(30), styleQML TEXT, styleSLD TEXT, useAsDefault BOOLEAN,
                description TEXT, owner TEXT(30), ui TEXT(30),
                update_time DATETIME DEFAULT CURRENT_TIMESTAMP)"""
        )
        con.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description) "
            "VALUES ('layer_styles', 'attributes', 'layer_styles', 'QGIS layer styles')"
        )
        geom_col = con.execute(
            "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)
        ).fetchone()[0]
        con.execute("DELETE FROM layer_styles WHERE f_table_name = ?", (layer,))
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column,"
            " styleName, styleQML, styleSLD, useAsDefault, description, owner, ui, update_time) "
            "VALUES ('', '', ?, ?, ?, ?, '', 1, 'classes by name and colour', '', '',"
            " strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            (layer, geom_col, name, qml),
        )
        con.commit()
    finally:
        con.close()


def zones_layer(path: Path) -> str:
    """The layer of a zones file to read: its only layer with geometries (a GeoPackage that geoseg wrote
    holds its style table beside the polygons)."""
    import pyogrio

    layers = [str(name) for name, geom in pyogrio.list_layers(path) if geom]
    if len(layers) == 1:
        return layers[0]
    if not layers:
        raise ConfigError(f"zones file {path} has no layer with geometries; pass polygons to --zones")
    raise ConfigError(f"zones file {path} has {len(layers)} layers with geometries ({', '.join(layers)}); "
                      f"copy the one to use into a file of its own (ogr2ogr zones.gpkg {path} LAYER)")


def rasterize_on(shapes: list[Any], grid: Any, *, fill: int, dtype: str) -> np.ndarray:
    """``(geometry, value)`` pairs burnt into an array on ``grid`` (a :class:`~geoseg.geometry.grid.Grid`).

    Pixels whose centre falls in a geometry take its value (GDAL's default,
    not all-touched); the rest are ``fill``. No shapes: all ``fill``.
    """
    if not shapes:
        return np.full(grid.shape, fill, dtype)
    from rasterio.features import rasterize

    return rasterize(shapes, out_shape=grid.shape, transform=grid.transform, fill=fill, dtype=dtype)
