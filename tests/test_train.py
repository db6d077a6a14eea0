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


def test_command_line_paths_are_relative_to_where_you_stand(tmp_path, monkeypatch):
    import geoseg.cli.main  # noqa: F401 - the CLI package, whose commands import each other
    from geoseg.cli.train_cmd import _from_cwd

    monkeypatch.chdir(tmp_path)
    assert _from_cwd("data.dataset=ds/d.yaml") == f"data.dataset={tmp_path / 'ds' / 'd.yaml'}"
    assert _from_cwd("model.init=run1/weights/best.safetensors") == \
        f"model.init={tmp_path / 'run1' / 'weights' / 'best.safetensors'}"
    assert _from_cwd("train.output=myrun") == f"train.output={tmp_path / 'myrun'}"
    assert _from_cwd("data.extra_datasets=[a.yaml, /abs/b.yaml]") == \
        f'data.extra_datasets=["{tmp_path / "a.yaml"}", "/abs/b.yaml"]'
    for unchanged in ("train.epochs=3", "data.dataset=/abs/d.yaml", "model.init=null"):
        assert _from_cwd(unchanged) == unchanged
    r = load_recipe(Recipe, REPO / "recipes" / "dubai-n.yaml", [_from_cwd("data.extra_datasets=[x.yaml]")])
    assert r.data.extra_datasets == (str(tmp_path / "x.yaml"),)


def _tiny_dataset(root, *, bad_value=None):
    from PIL import Image

    for sub in ("images/train", "images/val", "masks/train", "masks/val"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for k in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"images/{split}/{k}.png")
            mask = (np.arange(64)[:, None] // 22 * np.ones(64, int)).astype(np.uint8)  # 0, 1, 2
            if bad_value is not None and split == "val":
                mask[0, 0] = bad_value
            Image.fromarray(mask).save(root / f"masks/{split}/{k}.png")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    return root / "data.yaml"


def test_training_refuses_bad_data_and_options_before_writing_anything(tmp_path):
    from geoseg.train.loop import train

    def recipe(data, *extra):
        return load_recipe(Recipe, REPO / "recipes" / "dubai-n.yaml", [
            f"data.dataset={data}", "train.epochs=1", "train.steps_per_epoch=2", "train.val_every=1",
            f"train.output={tmp_path / 'run'}", "data.batch=2", "data.imgsz=64", "data.colors=null",
            "optim.warmup_steps=1", "train.val_tile=128", *extra])

    bad = _tiny_dataset(tmp_path / "bad", bad_value=7)
    with pytest.raises(ConfigError, match=r"mask .*0\.png has class ids 7 outside 0\.\.2 \(255: ignored\)"):
        train(recipe(bad), log=lambda s: None)  # a validation mask, caught before the first epoch
    assert not (tmp_path / "run").exists()
    good = _tiny_dataset(tmp_path / "good")
    with pytest.raises(ConfigError, match="data.colors has 2 colours for the dataset's 3 classes"):
        train(recipe(good, "data.colors=[[1, 2, 3], [4, 5, 6]]"), log=lambda s: None)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        train(recipe(good), resume=True, log=lambda s: None)
    assert not (tmp_path / "run").exists()
    summary = train(recipe(good), log=lambda s: None)
    assert summary["step"] == 2 and summary["best_val_miou"] is not None
    said = []
    assert train(recipe(good), resume=True, log=said.append) == summary  # complete: nothing to do, summary kept
    assert "complete" in said[-1]
    from geoseg.train.data import load_dataset_spec, split_images

    d2 = tmp_path / "good" / "d2.yaml"
    d2.write_text("path: .\ntrain: images/train\nval: nothing/*.png\nnames: [a, b, c]\n")
    with pytest.raises(ConfigError, match=r"split 'val' has no images: .*/nothing/\*\.png matches none"):
        split_images(load_dataset_spec(d2), "val")
    listing = tmp_path / "good" / "val.txt"
    listing.write_text("images/val/0.png\nimages/val/nope.png\n")
    d2.write_text("path: .\ntrain: images/train\nval: val.txt\nnames: [a, b, c]\n")
    with pytest.raises(ConfigError, match=r"split 'val': .*nope\.png, listed in .*val\.txt, does not exist"):
        split_images(load_dataset_spec(d2), "val")
