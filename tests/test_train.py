"""Metrics against hand-computed confusion matrices; recipes; a short real training run."""

import csv

import numpy as np
import pytest

from geoseg.config import from_dict, load_recipe
from geoseg.errors import ConfigError
from geoseg.train.metrics import ConfusionMatrix
from geoseg.train.recipe import Recipe

from .conftest import REPO, shared


def test_confusion_matrix_by_hand():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 255]])
    cm = ConfusionMatrix(4)
    cm.update(pred, truth)
    # rows = truth 0..3, columns = pred 0..3 + nodata
    expected = np.array([
        [1, 1, 0, 0, 1],  # truth 0: pred 0, pred 1, nodata
        [0, 2, 0, 0, 0],  # truth 1
        [1, 0, 1, 0, 0],  # truth 2 (the ignored pixel is not counted)
        [0, 0, 0, 0, 0],  # truth 3 absent
    ])
    assert np.array_equal(cm.matrix, expected)
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / (3 + 2 - 1))
    assert iou[1] == pytest.approx(2 / (2 + 3 - 2))
    assert iou[2] == pytest.approx(1 / (2 + 1 - 1))
    assert np.isnan(iou[3])  # absent from truth and prediction
    assert cm.miou() == pytest.approx(np.mean([1 / 4, 2 / 3, 1 / 2]))  # classes present in truth only
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)


def test_class_predicted_but_absent_from_truth_is_not_averaged():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1]))
    assert cm.iou()[2] == 0.0
    assert cm.miou() == pytest.approx(np.mean([1 / 2, 1.0]))


def test_recipe_unknown_keys_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe key 'train.epoch'"):
        from_dict(Recipe, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="'data.augment.flip'"):
        from_dict(Recipe, {"data": {"augment": {"flip": True}}})
    with pytest.raises(ConfigError, match="'optim.lr' must be float"):
        from_dict(Recipe, {"optim": {"lr": "fast"}})
    r = load_recipe(Recipe, REPO / "recipes" / "dubai-n.yaml", ["train.epochs=3", "data.batch=2"])
    assert r.train.epochs == 3 and r.data.batch == 2 and r.model.architecture == "geoseg-n-sem"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_name_files_that_exist(path):
    r = load_recipe(Recipe, path, [])
    assert (path.parent / r.data.dataset).exists()
    for extra in r.data.extra_datasets:
        assert (path.parent / extra).exists()


@pytest.mark.slow
def test_short_real_training_lowers_the_loss(tmp_path):
    shared("data/dubai/images")
    from geoseg.train.loop import train

    r = load_recipe(Recipe, REPO / "recipes" / "dubai-n.yaml", [
        "train.epochs=4", "train.steps_per_epoch=6", "train.val_every=0", f"train.output={tmp_path}",
        "data.batch=4", "data.imgsz=128", "optim.warmup_steps=2", "optim.lr=0.004",
        "data.augment.scale_min=1.0", "data.augment.scale_max=1.0",
    ])
    summary = train(r, recipe_dir=REPO / "recipes", log=lambda s: None)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    losses = [float(x["loss"]) for x in rows]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (tmp_path / "weights" / "last.safetensors").exists() and (tmp_path / "curves.png").exists()
    assert summary["step"] == 24


def test_class_balanced_crops_show_rare_classes_more_often():
    from geoseg.train.data import balanced

    def sample(rng, size):  # class 3 in one crop of ten, in a corner
        mask = np.zeros((size, size), np.uint8)
        if rng.random() < 0.1:
            mask[:4, :4] = 3
        return np.zeros((3, size, size), np.float32), mask

    def share_with_3(fn):
        rng = np.random.default_rng(0)
        return np.mean([(fn(rng, 16)[1] == 3).any() for _ in range(3000)])

    assert balanced(sample, 5, 0.0) is sample
    plain, aimed = share_with_3(sample), share_with_3(balanced(sample, 4, 1.0))
    # A quarter of the crops aim at class 3 and find it in 1 - 0.9**8 of them; those aimed at class 0
    # avoid it (the crop with the most 0s has no 3 unless all eight do); classes 1, 2 are absent (first crop).
    assert plain == pytest.approx(0.1, abs=0.02)
    assert aimed == pytest.approx(0.25 * (1 - 0.9**8) + 0.5 * 0.1 + 0.25 * 0.1**8, abs=0.03)
    with pytest.raises(ConfigError, match="class_balance"):
        balanced(sample, 5, 1.5)
