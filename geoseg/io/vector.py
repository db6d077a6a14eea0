"""Vector outputs: polygons as GeoPackage 1.2 (with an embedded QGIS style) and other formats."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from ..errors import ConfigError

FORMATS = {  # --vector-format -> (GDAL driver, suffix)
    "gpkg": ("GPKG", ".gpkg"),
    "geojson": ("GeoJSON", ".geojson"),
    "parquet": ("Parquet", ".parquet"),  # GeoParquet through geopandas + pyarrow
    "fgb": ("FlatGeobuf", ".fgb"),
}
LAYER = "landcover"


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
        self.classes = classes
        self._lock = threading.Lock()
        self._first = True
        self._batches: list[Any] = []  # GeoParquet is written once, at finish
        self.count = 0
        self.work.unlink(missing_ok=True)
        self._geod = None
        self._factor = 1.0
        if crs is not None and not crs.is_projected:
            from pyproj import CRS

            self._geod = CRS.from_user_input(crs.to_wkt()).get_geod()
        elif crs is not None:
            self._factor = float(crs.linear_units_factor[1])

    def measure(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._geod is None:
            return shapely.area(geoms) * self._factor**2, shapely.length(geoms) * self._factor
        ap = [self._geod.geometry_area_perimeter(g) for g in geoms]
        return np.abs([a for a, _ in ap]), np.array([p for _, p in ap])

    def write(self, geoms: np.ndarray, ids: np.ndarray) -> None:
        if len(geoms) == 0:
            return
        area, perim = self.measure(geoms)
        names = np.array(self.classes, dtype=object)[ids]
        fields = {"class_id": ids.astype(np.int32), "class_name": names,
                  "area_m2": area.astype(np.float64), "perimeter_m": perim.astype(np.float64)}
        with self._lock:
            if self.driver == "Parquet":
                self._batches.append(_frame(geoms, fields, self.crs))
                self._first = False
                self.count += len(geoms)
                return
            opts: dict[str, Any] = {}
            if self._first and self.driver == "GPKG":
                opts["dataset_options"] = {"VERSION": "1.2"}
            _write(self.work, geoms, fields, self.crs, self.driver, not self._first, opts)
            self._first = False
            self.count += len(geoms)

    def finish(self, style_qml: str | None = None) -> Path:
        if self.driver == "Parquet":
            self._write_parquet()
        elif self._first:  # nothing was written: still publish an empty, valid layer
            _write(self.work, np.array([], dtype=object), {
                "class_id": np.array([], np.int32), "class_name": np.array([], object),
                "area_m2": np.array([]), "perimeter_m": np.array([])}, self.crs, self.driver, False,
                {"dataset_options": {"VERSION": "1.2"}} if self.driver == "GPKG" else {})
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


def _write(path: Path, geoms: np.ndarray, fields: dict[str, np.ndarray], crs: Any, driver: str,
           append: bool, opts: dict[str, Any]) -> None:
    import pyogrio

    pyogrio.write_dataframe(_frame(geoms, fields, crs), path, layer=LAYER, driver=driver,
                            append=append, geometry_type="Polygon", **opts)


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
