"""Real models on real imagery from ../shared (skipped where it is absent)."""

import json
import subprocess

import numpy as np
import pytest
import rasterio

import geoseg

from .conftest import UKIS_CARD, shared, system_gdal_python


def validate_cog(path) -> None:
    py = system_gdal_python()
    if py is None:
        pytest.skip("GDAL's Python utilities (Debian python3-gdal) are not installed")
    r = subprocess.run([py, "-m", "osgeo_utils.samples.validate_cloud_optimized_geotiff", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "is a valid cloud optimized GeoTIFF" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_ukis_csmask_onnx_on_landsat(tmp_path):
    onnx = shared("models/ukis-csmask/model_6b_l1c.onnx")
    scene = shared("data/landsat/L7_ETMs.tif")
    res = geoseg.predict(scene, tmp_path / "out", model=onnx, card=UKIS_CARD, confidence=True,
                         device="cpu")
    with rasterio.open(res.output / "classes.tif") as ds, rasterio.open(scene) as src:
        classes = ds.read(1)
        assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape
        assert ds.nodata == 255 and ds.colorinterp[0].name == "palette"
    assert set(np.unique(classes)) <= {0, 1, 2}
    # a 349 x 352 scene in 256-px fixed tiles: 2 x 2 tiles, reflected past the far edges
    assert res.tiles_run == 4 and res.tiles_skipped == 0
    run = json.loads((res.output / "run.json").read_text())
    assert run["options"]["tile_size"] == 256
    # The model must agree with itself run on one whole tile without our pipeline.
    model = geoseg.load_model(onnx, card=UKIS_CARD, device="cpu")
    with rasterio.open(scene) as src:
        raw = src.read(window=((40, 296), (40, 296)))
    direct = model(model.card.normalize(raw)[None])[0].argmax(0)
    assert (classes[40 + 64 : 296 - 64, 40 + 64 : 296 - 64] == direct[64:-64, 64:-64]).mean() > 0.97
    validate_cog(res.output / "classes.tif")
    validate_cog(res.output / "confidence.tif")


@pytest.mark.slow
def test_alpha_band_is_a_mask_not_data(tmp_path, yolo_checkpoint):
    drone = shared("data/rasterio/RGBA.byte.tif")  # Landsat RGB + alpha, 0 outside the scene
    res = geoseg.predict(drone, tmp_path / "d", model=yolo_checkpoint, device="cpu")
    with rasterio.open(drone) as src, rasterio.open(res.output / "classes.tif") as ds:
        alpha_invalid = src.dataset_mask() == 0
        classes = ds.read(1)
    assert alpha_invalid.any()
    assert (classes[alpha_invalid] == 255).all() and (classes[~alpha_invalid] != 255).all()
    assert res.tiles_skipped > 0
