"""Outputs open in real QGIS (3.22, Debian) styled and named, with no clicks."""

import json
import os
import subprocess
from pathlib import Path

import pytest

import geoseg

from .conftest import SYSTEM_PYTHON, has_qgis, smooth_image, write_raster

pytestmark = [pytest.mark.qgis, pytest.mark.slow,
              pytest.mark.skipif(not has_qgis(), reason="QGIS (Debian python3-qgis) is not installed")]
PROBE = Path(__file__).with_name("qgis_probe.py")


def test_predict_outputs_open_styled_in_qgis(tmp_path, yolo_checkpoint):
    scene = write_raster(tmp_path / "scene.tif", smooth_image((3, 260, 300), seed=2), crs="EPSG:2953")
    res = geoseg.predict(scene, tmp_path / "out", model=yolo_checkpoint, device="cpu")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    r = subprocess.run([SYSTEM_PYTHON, str(PROBE), str(res.output / "classes.tif"),
                        str(res.output / "polygons.gpkg")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    card = geoseg.load_model(yolo_checkpoint, device="cpu").card
    colors = ["#{:02x}{:02x}{:02x}".format(*c) for c in card.palette()]
    raster = info["raster"]
    assert raster["valid"] and raster["crs"] == "EPSG:2953"
    assert raster["renderer"] == "paletted"
    assert [(v, label, c) for v, label, c in raster["classes"]] == [
        (i, n, colors[i]) for i, n in enumerate(card.classes)]
    vector = info["vector"]
    assert vector["valid"] and vector["crs"] == "EPSG:2953" and vector["features"] > 0
    assert vector["renderer"] == "categorizedSymbol" and vector["attr"] == "class_name"
    assert [(v, label) for v, label, _ in vector["categories"]] == [(n, n) for n in card.classes]
    assert [c for _, _, c in vector["categories"]] == colors
    assert vector["fields"][-4:] == ["class_id", "class_name", "area_m2", "perimeter_m"]
