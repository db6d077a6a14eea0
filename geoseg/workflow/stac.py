"""The outputs of a batch job: its manifest, and over all its finished scenes a mosaic, tables and a STAC catalog.

* ``batch.json`` — the manifest (:class:`Manifest`), rewritten as scenes finish.
* ``mosaic.vrt`` — a GDAL VRT over every scene's ``classes.tif`` (one per
  CRS: ``mosaic-EPSG_xxxx.vrt`` when the scenes differ in CRS), at the
  finest resolution among them; where scenes overlap, the later scene's
  valid pixels win.
* ``stats.csv`` / ``stats.parquet`` — one row per (scene, class), and per
  (scene, zone, class) when zones were given.
* ``polygons.parquet`` — every scene's polygons in one GeoParquet layer with
  a ``scene`` column, written one scene at a time; in the scenes' CRS when
  they share one, else in EPSG:4326.
* ``catalog.json`` — a STAC ItemCollection, one Item per scene (see
  :func:`scene_item`).

The others are written at the end from the scenes' own output folders, one
scene at a time, so memory does not grow with the number of scenes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from ..geometry.units import NODATA
from ..io.styles import write_text_atomic
from ..models.card import ModelCard
from .sources import local_path

CLASSIFICATION = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
MLM = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
VECTOR_TYPES = {".gpkg": "application/geopackage+sqlite3", ".geojson": "application/geo+json",
                ".parquet": "application/vnd.apache.parquet", ".fgb": "application/vnd.flatgeobuf"}
STATS_COLUMNS = ("scene", "zone", "class_id", "class_name", "pixels", "area_m2", "area_ha", "percent")


def now() -> str:
    """The time in UTC, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Manifest:
    """``batch.json``: the job and its scenes, rewritten atomically (at most once a second while running)."""

    def __init__(self, path: Path, header: dict[str, Any], entries: dict[str, dict[str, Any]]):
        self.path, self.header, self.entries = path, header, entries
        self._last = 0.0
        self._dirty = False

    @staticmethod
    def previous(path: Path) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(path.read_text())
            return {s["id"]: s for s in doc.get("scenes", [])}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def write(self, force: bool = False) -> None:
        self._dirty = True
        if force or time.monotonic() - self._last >= 1.0:
            scenes = list(self.entries.values())
            counts = {k: sum(1 for s in scenes if s["status"] == k) for k in ("done", "failed", "running")}
            doc = {**self.header, "updated": now(), "counts": {"scenes": len(scenes), **counts},
                   "scenes": scenes}
            write_text_atomic(self.path, json.dumps(doc, indent=1, default=str))
            self._last, self._dirty = time.monotonic(), False

    def flush(self) -> None:
        if self._dirty:
            self.write()


@dataclass(frozen=True)
class Finished:
    """A scene whose outputs are complete, as the job outputs read it."""

    id: str
    dir: Path
    source: str
    href: str
    datetime: str | None = None  # from its STAC item
    finished: str | None = None  # when its outputs were made (ISO 8601)


@dataclass(frozen=True)
class Footprint:
    crs: Any
    transform: Any
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        xs = (t.c, t.c + t.a * self.width)
        ys = (t.f, t.f + t.e * self.height)
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def north_up(self) -> bool:
        t = self.transform
        return t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0


def verified(out: Path, href: str, model: str, names: Sequence[str]) -> bool:
    """A scene's outputs are complete: run.json of this input and model, every file, a readable classes.tif."""
    import rasterio

    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return False
    if run.get("input") != href or (run.get("options") or {}).get("model") != model:
        return False
    if not all((out / n).exists() for n in names):
        return False
    try:
        with rasterio.open(out / "classes.tif") as ds:
            return ds.count == 1 and ds.dtypes[0] == "uint8"
    except Exception:  # any GDAL failure means: not usable
        return False


def footprint(classes: Path) -> Footprint:
    import rasterio

    with rasterio.open(classes) as ds:
        return Footprint(ds.crs, ds.transform, ds.width, ds.height)


def write_job_outputs(root: Path, scenes: Sequence[Finished], card: ModelCard, *, model: dict[str, Any],
                      vector_suffix: str | None) -> dict[str, Path]:
    """Every job output over ``scenes``; outputs of an earlier run that no longer apply are removed."""
    feet = [footprint(s.dir / "classes.tif") for s in scenes]
    out: dict[str, Path] = {}
    for p in write_mosaics(root, scenes, feet, card):
        out[p.name] = p
    out.update(write_stats(root, scenes))
    poly = write_polygons(root, scenes, feet, vector_suffix) if vector_suffix else None
    if poly is not None:
        out[poly.name] = poly
    else:
        (root / "polygons.parquet").unlink(missing_ok=True)
    out["catalog.json"] = write_catalog(root, scenes, feet, card, model=model, vector_suffix=vector_suffix)
    return out


# --- mosaic -----------------------------------------------------------------------------------------------------


def _crs_tag(crs: Any) -> str:
    epsg = crs.to_epsg() if crs is not None else None
    if epsg:
        return f"EPSG_{epsg}"
    import hashlib

    return "CRS_" + hashlib.sha1(str(crs.to_wkt() if crs else "none").encode()).hexdigest()[:8]


def write_mosaics(root: Path, scenes: Sequence[Finished], feet: Sequence[Footprint], card: ModelCard) -> list[Path]:
    """``mosaic.vrt`` (one CRS) or ``mosaic-EPSG_xxxx.vrt`` per CRS over the scenes' class rasters."""
    groups: dict[str, list[tuple[Finished, Footprint]]] = {}
    for s, f in zip(scenes, feet):
        if f.north_up and f.crs is not None:
            groups.setdefault(_crs_tag(f.crs), []).append((s, f))
    names = {tag: "mosaic.vrt" if len(groups) == 1 else f"mosaic-{tag}.vrt" for tag in groups}
    for old in root.glob("mosaic*.vrt"):
        if old.name not in names.values():
            old.unlink()
    out = []
    for tag, members in groups.items():
        path = root / names[tag]
        write_text_atomic(path, mosaic_vrt(root, members, card))
        out.append(path)
    return out


def _num(v: float) -> str:
    return str(int(round(v))) if abs(v - round(v)) < 1e-6 else f"{v:.10f}"


def mosaic_vrt(root: Path, members: Sequence[tuple[Finished, Footprint]], card: ModelCard) -> str:
    """The XML of a paletted class VRT over ``members`` (all in one CRS, north up), sources relative to it."""
    rx = min(f.transform.a for _, f in members)
    ry = min(-f.transform.e for _, f in members)
    left = min(f.bounds[0] for _, f in members)
    bottom = min(f.bounds[1] for _, f in members)
    right = max(f.bounds[2] for _, f in members)
    top = max(f.bounds[3] for _, f in members)
    width, height = math.ceil((right - left) / rx - 1e-6), math.ceil((top - bottom) / ry - 1e-6)
    palette = card.palette()
    entries = [f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="255"/>' for r, g, b in palette]
    entries += ['<Entry c1="0" c2="0" c3="0" c4="0"/>'] * (256 - len(entries))
    cats = "".join(f"<Category>{escape(n)}</Category>" for n in card.classes)
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f"  <SRS>{escape(members[0][1].crs.to_wkt())}</SRS>",
             f"  <GeoTransform>{left!r}, {rx!r}, 0, {top!r}, 0, {-ry!r}</GeoTransform>",
             '  <VRTRasterBand dataType="Byte" band="1">',
             "    <Description>class</Description>",
             f"    <NoDataValue>{NODATA}</NoDataValue>",
             "    <ColorInterp>Palette</ColorInterp>",
             f"    <CategoryNames>{cats}</CategoryNames>",
             "    <ColorTable>" + "".join(entries) + "</ColorTable>"]
    for s, f in members:
        x0, _, _, y1 = f.bounds
        rel = os.path.relpath(s.dir / "classes.tif", root)
        lines.append(
            "    <ComplexSource>"
            f'<SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename><SourceBand>1</SourceBand>'
            f'<SourceProperties RasterXSize="{f.width}" RasterYSize="{f.height}" DataType="Byte"/>'
            f'<SrcRect xOff="0" yOff="0" xSize="{f.width}" ySize="{f.height}"/>'
            f'<DstRect xOff="{_num((x0 - left) / rx)}" yOff="{_num((top - y1) / ry)}" '
            f'xSize="{_num(f.width * f.transform.a / rx)}" ySize="{_num(-f.height * f.transform.e / ry)}"/>'
            f"<NODATA>{NODATA}</NODATA></ComplexSource>")
    lines += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    return "\n".join(lines)


# --- stats ------------------------------------------------------------------------------------------------------


def _stat_rows(scene: Finished) -> Iterable[dict[str, Any]]:
    with open(scene.dir / "stats.csv", newline="") as f:
        for r in csv.DictReader(f):
            yield {"scene": scene.id, "zone": r.get("zone") or None, "class_id": int(r["class_id"]),
                   "class_name": r["class_name"], "pixels": int(r["pixels"]) if r.get("pixels") else None,
                   "area_m2": float(r["area_m2"]), "area_ha": float(r["area_ha"]), "percent": float(r["percent"])}


def write_stats(root: Path, scenes: Sequence[Finished], *, rows_per_group: int = 65536) -> dict[str, Path]:
    """``stats.csv`` and ``stats.parquet``: the scenes' ``stats.csv`` rows, each with its scene id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("scene", pa.string()), ("zone", pa.string()), ("class_id", pa.int32()),
                        ("class_name", pa.string()), ("pixels", pa.int64()), ("area_m2", pa.float64()),
                        ("area_ha", pa.float64()), ("percent", pa.float64())])
    csv_path, pq_path = root / "stats.csv", root / "stats.parquet"
    csv_tmp, pq_tmp = root / ".stats.csv.part", root / ".stats.parquet.part"
    held: list[dict[str, Any]] = []
    with open(csv_tmp, "w", newline="") as f, pq.ParquetWriter(pq_tmp, schema) as pw:
        w = csv.DictWriter(f, fieldnames=list(STATS_COLUMNS))
        w.writeheader()
        for s in scenes:
            for r in _stat_rows(s):
                w.writerow({k: "" if v is None else v for k, v in r.items()})
                held.append(r)
            if len(held) >= rows_per_group:
                pw.write_table(pa.Table.from_pylist(held, schema=schema))
                held.clear()
        pw.write_table(pa.Table.from_pylist(held, schema=schema))
    os.replace(csv_tmp, csv_path)
    os.replace(pq_tmp, pq_path)
    return {"stats.csv": csv_path, "stats.parquet": pq_path}


# --- polygons ---------------------------------------------------------------------------------------------------


def _read_polygons(path: Path) -> Any:
    import geopandas as gpd
    import pyogrio

    if path.suffix == ".parquet":
        return gpd.read_parquet(path)
    layers = [name for name, geom in pyogrio.list_layers(path) if geom]  # not GeoPackage's layer_styles table
    return pyogrio.read_dataframe(path, layer=layers[0] if layers else 0)


def write_polygons(root: Path, scenes: Sequence[Finished], feet: Sequence[Footprint],
                   suffix: str) -> Path | None:
    """``polygons.parquet`` (GeoParquet 1.0, WKB): every scene's polygons with a ``scene`` column.

    Written one scene at a time (a row group each). The CRS is the scenes'
    when they share one, else EPSG:4326 (each scene's polygons reprojected).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely
    from pyproj import CRS

    have = [(s, f) for s, f in zip(scenes, feet) if (s.dir / f"polygons{suffix}").exists()]
    if not have:
        return None
    crss = {CRS.from_user_input(f.crs) for _, f in have}
    target = crss.pop() if len(crss) == 1 else CRS.from_epsg(4326)
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon", "MultiPolygon"],
                                    "crs": target.to_json_dict()}}}
    schema = pa.schema([("scene", pa.string()), ("class_id", pa.int32()), ("class_name", pa.string()),
                        ("area_m2", pa.float64()), ("perimeter_m", pa.float64()), ("geometry", pa.binary())],
                       metadata={"geo": json.dumps(geo)})
    final, tmp = root / "polygons.parquet", root / ".polygons.parquet.part"
    with pq.ParquetWriter(tmp, schema) as writer:
        for s, _ in have:
            df = _read_polygons(s.dir / f"polygons{suffix}")
            if df.crs is not None and CRS.from_user_input(df.crs) != target:
                df = df.to_crs(target)
            n = len(df)
            writer.write_table(pa.table({
                "scene": pa.array([s.id] * n, pa.string()),
                "class_id": pa.array(df["class_id"].to_numpy(), pa.int32()),
                "class_name": pa.array(df["class_name"].astype(str).to_list(), pa.string()),
                "area_m2": pa.array(df["area_m2"].to_numpy(), pa.float64()),
                "perimeter_m": pa.array(df["perimeter_m"].to_numpy(), pa.float64()),
                "geometry": pa.array(shapely.to_wkb(df.geometry.values), pa.binary())}, schema=schema))
            del df
    os.replace(tmp, final)
    return final


# --- STAC -------------------------------------------------------------------------------------------------------


def _class_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or "class"


def classification_classes(card: ModelCard) -> list[dict[str, Any]]:
    """``classification:classes`` (classification extension v2) for the card's classes and nodata."""
    from ..io.styles import hex_color

    out: list[dict[str, Any]] = [
        {"value": i, "name": _class_name(n), "title": n, "color_hint": hex_color(rgb)[1:].upper()}
        for i, (n, rgb) in enumerate(zip(card.classes, card.palette()))]
    out.append({"value": NODATA, "name": "nodata", "title": "no data", "nodata": True})
    return out


def mlm_fields(card: ModelCard, model: dict[str, Any]) -> dict[str, Any]:
    """STAC MLM extension (v1.4) fields of the model, from its card."""
    tile, k, c = card.tile_size, card.num_classes, card.in_channels
    name = re.sub(r"[^a-zA-Z0-9_.-]+", "-", card.name).strip("-.") or "model"
    inp: dict[str, Any] = {
        "name": "image", "bands": list(card.bands) if card.bands else [f"band_{i + 1}" for i in range(c)],
        "input": {"shape": [-1, c, tile, tile], "dim_order": ["batch", "channel", "height", "width"],
                  "data_type": "float32"},
        "resize_type": None, "pre_processing_function": None}
    if card.mean is not None and card.std is not None:  # (raw * scale - mean) / std as a z-score of raw values
        inp["value_scaling"] = [{"type": "z-score", "mean": m / card.input_scale, "stddev": s / card.input_scale}
                                for m, s in zip(card.mean, card.std)]
    classes = classification_classes(card)[:-1]
    return {
        "mlm:name": name if name[0].isalpha() else f"m-{name}",
        "mlm:architecture": card.architecture or model.get("format", "unknown"),
        "mlm:tasks": ["semantic-segmentation"],
        "mlm:framework": "ONNX" if model.get("format") == "onnx" else "PyTorch",
        "mlm:input": [inp],
        "mlm:output": [{"name": "classes", "tasks": ["semantic-segmentation"],
                        "result": {"shape": [-1, k, tile, tile], "dim_order": ["batch", "class", "height", "width"],
                                   "data_type": "float32"},
                        "classification:classes": classes, "post_processing_function": None}],
    }


def _when(scene: Finished) -> tuple[datetime, str]:
    """The Item's datetime and where it came from: the STAC item, the input file's mtime, or processing time."""
    if scene.datetime:
        return datetime.fromisoformat(scene.datetime.replace("Z", "+00:00")), "stac-item"
    p = local_path(scene.href)
    if p is not None and p.exists():
        return datetime.fromtimestamp(p.stat().st_mtime, timezone.utc), "file-mtime"
    return _processed(scene), "processing-time"


def _processed(scene: Finished) -> datetime:
    if scene.finished:
        return datetime.fromisoformat(scene.finished.replace("Z", "+00:00"))
    return datetime.fromtimestamp((scene.dir / "run.json").stat().st_mtime, timezone.utc)


def _geometry(f: Footprint) -> dict[str, Any]:
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping

    x0, y0, x1, y1 = f.bounds
    outline = box(x0, y0, x1, y1).segmentize(max(x1 - x0, y1 - y0) / 4)  # edges may curve in EPSG:4326
    geom = dict(transform_geom(f.crs, "EPSG:4326", mapping(outline)))
    geom["coordinates"] = [[[round(x, 8), round(y, 8)] for x, y in ring] for ring in geom["coordinates"]]
    return geom


def scene_item(scene: Finished, f: Footprint, card: ModelCard, *, model: dict[str, Any], root: Path,
               vector_suffix: str | None) -> Any:
    """The STAC Item of one scene: footprint (EPSG:4326), datetime, assets, classes and the model (MLM)."""
    import pystac
    from shapely.geometry import shape

    geom = _geometry(f)
    when, source = _when(scene)
    props = {"geoseg:datetime_source": source, "geoseg:source": scene.source, "geoseg:input": scene.href,
             "created": _processed(scene).isoformat(), **mlm_fields(card, model)}
    item = pystac.Item(scene.id, geom, list(shape(geom).bounds), when, props,
                       stac_extensions=[CLASSIFICATION, MLM])
    rel = os.path.relpath(scene.dir, root)

    def add(key: str, name: str, media: str, roles: list[str], title: str, **extra: Any) -> None:
        if (scene.dir / name).exists():
            item.add_asset(key, pystac.Asset(f"./{rel}/{name}", title, media_type=media, roles=roles,
                                             extra_fields=extra or None))

    add("classes", "classes.tif", COG, ["data", "classification"], "Land-cover classes",
        **{"classification:classes": classification_classes(card)})
    add("confidence", "confidence.tif", COG, ["data", "quality"], "Confidence (max softmax)")
    if vector_suffix:
        add("polygons", f"polygons{vector_suffix}", VECTOR_TYPES.get(vector_suffix, "application/octet-stream"),
            ["data"], "Class polygons")
    add("stats", "stats.csv", "text/csv", ["metadata"], "Class areas")
    add("run", "run.json", "application/json", ["metadata"], "Run record")
    if model.get("href"):
        item.add_asset("model", pystac.Asset(model["href"], card.name, media_type=model.get("media_type"),
                                             roles=["mlm:model"],
                                             extra_fields={"mlm:artifact_type": model.get("format", "unknown")}))
    return item


def write_catalog(root: Path, scenes: Sequence[Finished], feet: Sequence[Footprint], card: ModelCard, *,
                  model: dict[str, Any], vector_suffix: str | None) -> Path:
    """``catalog.json``: a STAC ItemCollection, written one Item at a time."""
    final, tmp = root / "catalog.json", root / ".catalog.json.part"
    with open(tmp, "w") as out:
        out.write('{"type": "FeatureCollection", "features": [\n')
        for n, (s, f) in enumerate(zip(scenes, feet)):
            item = scene_item(s, f, card, model=model, root=root, vector_suffix=vector_suffix)
            out.write((",\n" if n else "") + json.dumps(item.to_dict(include_self_link=False,
                                                                     transform_hrefs=False)))
        out.write("\n]}\n")
    os.replace(tmp, final)
    return final
