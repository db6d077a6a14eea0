"""Georeferenced training data and scene evaluation on real orthophotos with vector labels."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.features import rasterize

from geoseg.config import load_recipe
from geoseg.errors import ConfigError
from geoseg.train.data import label_ids, load_dataset_spec, open_dataset
from geoseg.train.recipe import Recipe

from .conftest import REPO, shared

DATA = REPO / "recipes" / "data" / "nrcan-new-brunswick.yaml"
NAMES = ["building", "land", "road", "vegetation", "water"]
MAPPING = {"Building": 0, "Road": 2, "Vegetation": 3, "Hydro": 4}


def _full_labels(raster, gpkg):
    """The whole raster's labels, rasterized at once (the reference for the windowed path)."""
    gdf = pyogrio.read_dataframe(gpkg)
    with rasterio.open(raster) as ds:
        gdf = gdf.to_crs(ds.crs)
        shape, transform = ds.shape, ds.transform
    shapes = [(g, MAPPING[v]) for g, v in zip(gdf.geometry, gdf["Niveau_2"]) if v in MAPPING]
    return rasterize(shapes, out_shape=shape, transform=transform, fill=255, dtype="uint8")


def test_label_ids_by_mapping_by_name_and_by_id():
    assert label_ids(["Hydro", "Train", "Road"], {"Hydro": "water", "Road": 2}, NAMES) == [4, 255, 2]
    assert label_ids(["WATER", "Road", "Snow"], {}, NAMES) == [4, 2, 255]
    assert label_ids([3, "1"], {}, NAMES) == [3, 1]
    with pytest.raises(ConfigError, match="not a class"):
        label_ids(["Hydro"], {"Hydro": "lake"}, NAMES)


def test_geo_windows_match_whole_raster_labels():
    root = shared("data/nrcan/new_brunswick_aerial")
    spec = load_dataset_spec(DATA)
    ds = open_dataset(spec, "train")
    raster = ds.paths[0]
    full = _full_labels(raster, root / "BakerLake_2017_clipped.gpkg")
    assert set(np.unique(full)) >= {0, 2, 3, 4}
    h, w = full.shape
    for row, col in [(0, 0), (37, 11), (h - 64, w - 64)]:
        img, mask = ds.read_window(0, row, col, 64)
        assert img.shape == (3, 64, 64)
        np.testing.assert_array_equal(mask, full[row : row + 64, col : col + 64])
    # beyond the raster: boundless reads are ignore, never a guessed class
    _, mask = ds.read_window(0, h - 16, w - 16, 64)
    assert (mask[16:, :] == 255).all() and (mask[:, 16:] == 255).all()
    # per-band statistics over the split
    with rasterio.open(raster) as r:
        x = r.read().reshape(3, -1).astype(np.float64)
    mean, std = ds.band_stats()
    np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(std, x.std(axis=1), rtol=1e-6)


@pytest.mark.slow
def test_train_on_geo_data_and_evaluate_scene(tmp_path):
    root = shared("data/nrcan/new_brunswick_aerial")
    from geoseg.models.loading import load_model
    from geoseg.train.evaluate import evaluate_scene
    from geoseg.train.loop import train

    r = load_recipe(Recipe, REPO / "recipes" / "dubai-n.yaml", [
        "data.dataset=data/nrcan-new-brunswick.yaml", "train.epochs=2", "train.steps_per_epoch=2",
        "train.val_every=0", f"train.output={tmp_path}", "data.batch=2", "data.imgsz=128",
    ])
    train(r, recipe_dir=REPO / "recipes", log=lambda s: None)
    card = (tmp_path / "weights" / "last.yaml").read_text()
    net = load_model(tmp_path / "weights" / "last.safetensors", device="cpu")
    # the card carries the training rasters' band statistics (after input_scale)
    ds = open_dataset(load_dataset_spec(DATA), "train")
    mean, _ = ds.band_stats()
    np.testing.assert_allclose(net.card.mean, np.array(mean) / 255, rtol=1e-6)
    assert "23322E759967N_clipped_1m_2of2.tif" in card

    # scene mode: the streamed confusion matrix counts exactly the labelled pixels
    scene = root / "23322E759967N_clipped_1m_1of2.tif"
    cm = evaluate_scene(net, scene, root / "BakerLake_2017_clipped.gpkg", class_field="Niveau_2",
                        label_mapping={"Building": "building", "Road": "road", "Vegetation": "vegetation",
                                       "Hydro": "water"}, tile=128, overlap=32)
    truth = _full_labels(scene, root / "BakerLake_2017_clipped.gpkg")
    counts = np.bincount(truth[truth != 255], minlength=5)
    np.testing.assert_array_equal(cm.matrix.sum(axis=1), counts)
    summary = cm.summary(NAMES)
    assert 0.0 <= summary["miou"] <= 1.0
    json.dumps(summary)
