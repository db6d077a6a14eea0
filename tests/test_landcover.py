"""Polygons merged across blocks == whole-raster polygons; areas; formats; CLI."""

import csv
import json

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Geod
from rasterio import features
from shapely.geometry import shape

from geoseg.errors import ConfigError
from geoseg.post.landcover import area_stats, sieve, vectorize, write_stats

from .conftest import shared, smooth_image, write_raster

UTM = Affine(0.5, 0.0, 300000.0, 0.0, -0.5, 2800000.0)


def class_raster(tmp_path, *, nodata=True, crs="EPSG:32640", transform=UTM):
    """A real class raster: a Dubai mask (5 classes; 'unlabeled' as nodata) with a CRS."""
    try:
        src = shared("data/dubai/masks/tile_8_image_part_002.png")
        with rasterio.open(src) as ds:
            m = ds.read(1)
    except pytest.skip.Exception:
        m = (smooth_image((1, 500, 700))[0] // 52).astype(np.uint8)  # 5 levels of smooth noise
    m = m.copy()
    if nodata:
        m[m == 5] = 255
    else:
        m[m == 5] = 4
    path = tmp_path / "classes.tif"
    with rasterio.open(path, "w", driver="GTiff", width=m.shape[1], height=m.shape[0], count=1,
                       dtype="uint8", crs=crs, transform=transform, nodata=255) as ds:
        ds.write(m, 1)
        ds.update_tags(GEOSEG_CLASSES=json.dumps(["building", "land", "road", "vegetation", "water"]))
    return path, m


@pytest.mark.slow
@pytest.mark.parametrize("workers,task_vertices", [(1, None), (2, None), (2, 1)])
def test_blockwise_polygons_equal_whole_raster_polygons(tmp_path, monkeypatch, workers, task_vertices):
    # rows of blocks arrive out of order from two workers; regions are joined row by row, pieces
    # off the current edge read back from the spill file; task_vertices=1: one union task per region
    if task_vertices is not None:
        monkeypatch.setattr("geoseg.post.polygons.UNION_TASK_VERTICES", task_vertices)
    path, m = class_raster(tmp_path)
    res = vectorize(path, tmp_path / "poly", block=128, num_workers=workers)  # many blocks, many cut regions
    df = pyogrio.read_dataframe(res["path"], layer="landcover")
    whole = [(shape(g), int(v)) for g, v in features.shapes(m, mask=m != 255, transform=UTM)]
    assert len(df) == len(whole) == res["polygons"]
    assert df.geometry.is_valid.all()
    for c in range(5):
        ours = df[df.class_id == c].geometry.values
        ref = [g for g, v in whole if v == c]
        assert len(ours) == len(ref)
        assert shapely.union_all(ours).symmetric_difference(shapely.union_all(ref)).area == 0
    assert list(df.columns) == ["class_id", "class_name", "area_m2", "perimeter_m", "geometry"]
    assert set(df.class_name) <= {"building", "land", "road", "vegetation", "water"}
    np.testing.assert_allclose(df.area_m2, df.geometry.area)


def test_polygons_rasterize_back_to_the_class_raster(tmp_path):
    path, m = class_raster(tmp_path)
    df = pyogrio.read_dataframe(vectorize(path, tmp_path / "p", block=200)["path"], layer="landcover")
    back = features.rasterize(zip(df.geometry, df.class_id), out_shape=m.shape, transform=UTM, fill=255,
                              dtype="uint8")
    assert np.array_equal(back, m)


def test_coverage_simplification_leaves_no_gaps_or_overlaps(tmp_path):
    path, m = class_raster(tmp_path, nodata=False)  # a full coverage: no holes allowed after
    res = vectorize(path, tmp_path / "s", block=256, simplify=2.0)
    df = pyogrio.read_dataframe(res["path"], layer="landcover")
    raw = pyogrio.read_dataframe(vectorize(path, tmp_path / "r", block=256)["path"], layer="landcover")
    assert shapely.get_num_coordinates(df.geometry.values).sum() < shapely.get_num_coordinates(
        raw.geometry.values).sum()
    union = shapely.union_all(df.geometry.values)
    assert abs(df.geometry.area.sum() - union.area) < 1e-6 * union.area, "simplified polygons overlap"
    assert union.geom_type == "Polygon" and len(union.interiors) == 0, "simplification opened gaps"


@pytest.mark.parametrize("crs,transform,unit", [
    ("EPSG:32640", UTM, 1.0),
    ("EPSG:2277", Affine(1.5, 0, 2.3e6, 0, -1.5, 1.3e7), 0.3048006096012192),  # US survey feet
])
def test_projected_areas_sum_to_the_valid_area(tmp_path, crs, transform, unit):
    path, m = class_raster(tmp_path, crs=crs, transform=transform)
    table = area_stats(path, block=300)
    pix = abs(transform.a * transform.e) * unit**2
    assert table.pixels.sum() == (m != 255).sum()
    assert table.area_m2.sum() == pytest.approx((m != 255).sum() * pix, rel=1e-12)
    for c in range(5):
        assert table.area_m2[c] == pytest.approx((m == c).sum() * pix, rel=1e-12)
    rows = table.rows()
    assert sum(r["percent"] for r in rows) == pytest.approx(100.0)
    assert rows[0]["area_ha"] == pytest.approx(rows[0]["area_m2"] / 1e4)


def test_geodesic_areas_in_epsg4326(tmp_path):
    t = Affine(0.001, 0, 55.0, 0, -0.001, 25.3)  # ~100 m pixels near Dubai
    path, m = class_raster(tmp_path, crs="EPSG:4326", transform=t)
    table = area_stats(path, block=257)
    geod = Geod(ellps="WGS84")
    # every valid pixel's own geodesic area, summed, is the valid area
    h, w = m.shape
    lats = 25.3 - 0.001 * np.arange(h + 1)
    row_area = np.array([abs(geod.polygon_area_perimeter([55, 55.001, 55.001, 55],
                                                         [lats[r], lats[r], lats[r + 1], lats[r + 1]])[0])
                         for r in range(h)])
    expect = ((m != 255) * row_area[:, None]).sum()
    assert table.area_m2.sum() == pytest.approx(expect, rel=1e-9)
    # and the whole raster equals pyproj's geodesic area of its footprint polygon
    full = np.zeros_like(m)
    p2 = tmp_path / "full.tif"
    write_raster(p2, full[None], crs="EPSG:4326", transform=t)
    # the footprint's top and bottom edges follow parallels: densify them (a geodesic between two
    # far-apart corners would bulge towards the pole)
    xs = 55 + 0.001 * np.arange(w + 1)
    lon = np.concatenate([xs, xs[::-1]])
    lat = np.concatenate([np.full(w + 1, 25.3), np.full(w + 1, lats[-1])])
    poly_area = abs(geod.polygon_area_perimeter(lon, lat)[0])
    assert area_stats(p2).area_m2.sum() == pytest.approx(poly_area, rel=1e-6)


def test_zones_split_areas(tmp_path):
    path, m = class_raster(tmp_path)
    h, w = m.shape
    left = shapely.box(UTM.c, UTM.f - 0.5 * h, UTM.c + 0.5 * (w // 2), UTM.f)
    import geopandas as gpd

    zones = tmp_path / "zones.gpkg"
    gpd.GeoDataFrame({"name": ["west"]}, geometry=[left], crs="EPSG:32640").to_file(zones)
    table = area_stats(path, zones=zones, zone_field="name")
    west = table.zone_area_m2["west"]
    for c in range(5):
        assert west[c] == pytest.approx((m[:, : w // 2] == c).sum() * 0.25)
        assert table.zone_pixels["west"][c] == (m[:, : w // 2] == c).sum()
    csv_path, json_path = write_stats(table, tmp_path)
    rows = [r for r in csv.DictReader(csv_path.open()) if r["zone"] == "west"]
    assert [int(r["pixels"]) for r in rows] == [(m[:, : w // 2] == c).sum() for c in range(5)]
    assert json.loads(json_path.read_text())["zones"][0]["pixels"] == int(rows[0]["pixels"])


def test_zones_from_a_geoseg_geopackage_and_files_with_several_layers(tmp_path):
    """polygons.gpkg holds its QGIS style table beside the polygons: the polygons are the zones, quietly."""
    import warnings

    import geopandas as gpd

    path, m = class_raster(tmp_path)
    gpkg = vectorize(path, tmp_path / "v")["path"]
    assert len(pyogrio.list_layers(gpkg)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pyogrio warns when it has to pick a layer itself
        table = area_stats(path, zones=gpkg, zone_field="class_name")
    for c, name in enumerate(table.classes):
        if (m == c).any():  # a class's polygons cover exactly its pixels
            assert table.zone_pixels[name][c] == (m == c).sum()
    two = tmp_path / "two.gpkg"
    box = shapely.box(UTM.c, UTM.f - 1, UTM.c + 1, UTM.f)
    for layer in ("a", "b"):
        gpd.GeoDataFrame({"name": [layer]}, geometry=[box], crs="EPSG:32640").to_file(two, layer=layer)
    with pytest.raises(ConfigError, match="2 layers with geometries \\(a, b\\); copy the one"):
        area_stats(path, zones=two)


def test_sieve_removes_small_regions_consistently(tmp_path):
    path, m = class_raster(tmp_path)
    before = len(pyogrio.read_dataframe(vectorize(path, tmp_path / "a")["path"], layer="landcover"))
    size = sieve(path, min_area_m2=25.0)  # 0.25 m² pixels -> 100 px
    assert size == 100
    with rasterio.open(path) as ds:
        s = ds.read(1)
        assert json.loads(ds.tags()["GEOSEG_CLASSES"])[0] == "building"
    assert np.array_equal(s == 255, m == 255), "nodata is never grown or filled"
    df = pyogrio.read_dataframe(vectorize(path, tmp_path / "b", overwrite=True)["path"], layer="landcover")
    assert len(df) < before
    # raster and polygons agree after sieving
    back = features.rasterize(zip(df.geometry, df.class_id), out_shape=m.shape, transform=UTM, fill=255,
                              dtype="uint8")
    assert np.array_equal(back, s)


@pytest.mark.parametrize("fmt,suffix", [("geojson", ".geojson"), ("fgb", ".fgb"), ("parquet", ".parquet")])
def test_other_vector_formats(tmp_path, fmt, suffix):
    path, _ = class_raster(tmp_path)
    res = vectorize(path, tmp_path / "p", fmt=fmt)
    assert res["path"].endswith(suffix)
    if fmt == "parquet":
        import geopandas as gpd

        df = gpd.read_parquet(res["path"])
    else:
        df = pyogrio.read_dataframe(res["path"], layer="landcover")
    assert len(df) == res["polygons"] and df.crs.to_epsg() == 32640


def test_gpkg_is_version_1_2_with_a_default_style(tmp_path):
    import sqlite3

    path, _ = class_raster(tmp_path)
    gpkg = vectorize(path, tmp_path / "polygons")["path"]
    con = sqlite3.connect(gpkg)
    assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
    assert con.execute("PRAGMA user_version").fetchone()[0] == 10200
    name, qml, default = con.execute(
        "SELECT f_table_name, styleQML, useAsDefault FROM layer_styles").fetchone()
    assert name == "landcover" and default == 1 and 'attr="class_name"' in qml
    con.close()


def test_preloaded_modules_are_imported_and_a_missing_one_is_left_to_its_user():
    import sys

    from geoseg.io.preload import preload, wait_preloaded

    for name in ("xml.dom.minidom", "geoseg_no_such_module"):
        sys.modules.pop(name, None)
    preload("geoseg_no_such_module", "xml.dom.minidom")
    wait_preloaded()
    assert "geoseg_no_such_module" not in sys.modules
    assert "xml.dom.minidom" in sys.modules
