"""The land-cover model shipped inside the package: offline use, every output, golden logits.

Regenerate the golden file after retraining on purpose:

    python tests/test_builtin_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio

from geoseg.models.card import ModelCard
from geoseg.models.loading import builtin_models, default_model, load_model

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "data" / "scenes" / "field-ortho.tif"
GOLDEN = Path(__file__).with_name("golden") / "geoseg-landcover-n.npz"
NAME = "geoseg-landcover-n"


def golden_input() -> np.ndarray:
    """A fixed 3 x 64 x 96 crop of the sample scene (soil, crop rows and the field edge)."""
    with rasterio.open(SCENE) as ds:
        return ds.read((1, 2, 3), window=((448, 512), (176, 272)))


def golden_logits() -> np.ndarray:
    net = load_model(NAME, device="cpu")
    x = net.card.normalize(golden_input())[None]
    return net(x)


def test_default_model_is_builtin_and_described():
    assert default_model() == NAME
    card = ModelCard.load(builtin_models()[NAME])
    assert card.classes == ("building", "land", "road", "vegetation", "water")
    assert card.bands == ("red", "green", "blue")
    assert card.gsd and card.extra["gsd_note"]
    m = card.extra["metrics"]
    assert 0 < m["miou"] <= 1 and set(m["iou"]) == set(card.classes)
    weights = builtin_models()[NAME].with_suffix(".safetensors")
    assert weights.stat().st_size < 8 * 2**20  # fp16, a few MB
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert "F32" not in dtypes and "F16" in dtypes


def test_golden_logits():
    want = np.load(GOLDEN)
    got = golden_logits()
    assert got.shape == want["logits"].shape
    np.testing.assert_allclose(got, want["logits"], rtol=0, atol=1e-3 * float(np.abs(want["logits"]).max()))
    assert (got.argmax(1) == want["logits"].argmax(1)).mean() > 0.999


def test_predict_sample_scene_offline(tmp_path, monkeypatch):
    # no network: anything that tries a socket fails
    import socket

    from click.testing import CliRunner

    from geoseg.cli.main import cli

    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    out = tmp_path / "field"
    r = CliRunner().invoke(cli, ["predict", str(SCENE), "-o", str(out), "--quicklook", "-q", "--workers", "1"])
    assert r.exit_code == 0, r.output
    for name in ("classes.tif", "classes.qml", "polygons.gpkg", "polygons.qml", "stats.csv", "stats.json",
                 "run.json", "quicklook.png"):
        assert (out / name).stat().st_size > 0, name
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["model"] == NAME
    with rasterio.open(out / "classes.tif") as ds, rasterio.open(SCENE) as src:
        assert ds.crs == src.crs and ds.transform == src.transform
        cls = ds.read(1)
    # A 2 cm scene and a 0.8 m model: run at the model's ground resolution (--gsd auto, the
    # default), the crop rows on the right are vegetation and nothing in the field is water
    # (at 2 cm the model called 16 % of it water).
    assert run["ground_resolution_and_tta"]["ratio"] is not None
    left, right = cls[:, :150], cls[:, 500:]
    assert (right == 3).mean() > 0.9
    assert (cls == 4).mean() < 0.01
    assert (left == 1).mean() > 0.5 and not (left == 4).any()  # bare soil: mostly land, never water
    r = CliRunner().invoke(cli, ["predict", str(SCENE), "-o", str(tmp_path / "off"), "-q", "--gsd", "off",
                                 "--no-polygons"])
    assert r.exit_code == 0, r.output
    with rasterio.open(tmp_path / "off" / "classes.tif") as ds:
        off = ds.read(1)
    assert (off[:, :200] == 1).mean() > 0.6  # at 2 cm the soil texture reads as land ...
    assert (off == 4).mean() > 0.05  # ... and crop shadows as water


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, input=golden_input(), logits=golden_logits())
    print(f"wrote {GOLDEN}")
