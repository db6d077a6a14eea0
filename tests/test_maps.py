"""Maps that are right: ground-resolution-aware prediction, TTA, bands by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

import geoseg
from geoseg.engine.adapters import TTA, AtGroundResolution, TestTimeAugmented, gsd_ratio, scene_gsd
from geoseg.errors import BandCountError
from geoseg.geometry.grid import Grid

from .conftest import shared, smooth_image, write_raster


@pytest.mark.parametrize("mode", ["d4", "flips"])
def test_tta_equals_the_average_of_manual_transforms(cnn_model, mode):
    """Exactness: the wrapper's logits are the mean of the model's logits on each transformed tile, undone."""
    backend = cnn_model.backend
    x = cnn_model.card.normalize(smooth_image((3, 64, 64), seed=11))[None]
    manual = []
    for k, flip in TTA[mode]:
        xt = np.rot90(x, k, axes=(2, 3))
        xt = xt[..., ::-1] if flip else xt
        y = backend(np.ascontiguousarray(xt))
        y = y[..., ::-1] if flip else y
        manual.append(np.rot90(y, -k, axes=(2, 3)))
    np.testing.assert_allclose(TestTimeAugmented(backend, mode)(x), np.mean(manual, axis=0), atol=1e-5)
    assert len(TTA["d4"]) == 8 and len(set(TTA["d4"])) == 8


@pytest.mark.slow
def test_tta_in_predict_blocks_and_device_engines_agree(tmp_path, yolo_checkpoint):
    path = write_raster(tmp_path / "s.tif", smooth_image((3, 300, 260), seed=12))
    outs = {}
    for engine in ("blocks", "device"):
        r = geoseg.predict(path, tmp_path / engine, model=yolo_checkpoint, device="cpu", tta="d4", engine=engine,
                           polygons=False, tile_size=64)
        with rasterio.open(r.output / "classes.tif") as ds:
            outs[engine] = ds.read(1)
        run = json.loads((r.output / "run.json").read_text())
        assert run["ground_resolution_and_tta"]["passes_per_tile"] == 8
    np.testing.assert_array_equal(outs["blocks"], outs["device"])


def test_scene_gsd_in_metres_for_projected_and_geographic_grids():
    from rasterio.crs import CRS

    utm = Grid((10, 10), Affine(0.5, 0, 500000, 0, -0.5, 0), CRS.from_epsg(32633))
    assert scene_gsd(utm) == pytest.approx(0.5)
    feet = Grid((10, 10), Affine(1, 0, 0, 0, -1, 0), CRS.from_epsg(2263))  # US survey feet
    assert scene_gsd(feet) == pytest.approx(0.3048, rel=1e-3)
    deg = 1e-5  # at 60° N a degree of longitude is half a degree of latitude
    geo = Grid((10, 10), Affine(deg, 0, 10, 0, -deg, 60 + 5 * deg), CRS.from_epsg(4326))
    assert scene_gsd(geo) == pytest.approx((deg * 0.5 + deg) / 2 * 111_320, rel=1e-3)
    assert gsd_ratio(0.5, utm, "auto") is None  # same resolution: nothing to do
    assert gsd_ratio(2.0, utm, "auto") == pytest.approx(4.0)
    assert gsd_ratio(2.0, utm, "off") is None
    assert gsd_ratio(None, utm, 1.0) == pytest.approx(2.0)


def test_resampled_tiles_see_the_model_resolution(cnn_model):
    """A scene 4x finer than the model, run at the model's GSD, equals the model on the 4x coarser scene."""
    backend = cnn_model.backend
    wrapped = AtGroundResolution(backend, 4.0, model_tile=64)
    assert wrapped.card.tile_size == 256 and wrapped.card.pad_multiple == 1
    coarse = cnn_model.card.normalize(smooth_image((3, 64, 64), seed=3))[None]
    fine = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)  # the same ground, 4x the pixels
    y = wrapped(np.ascontiguousarray(fine))
    assert y.shape == (1, 4, 256, 256)
    ref = backend(coarse)
    np.testing.assert_allclose(y[:, :, 1::4, 1::4][:, :, 8:-8, 8:-8], ref[:, :, 8:-8, 8:-8], atol=0.35)
    assert (y.argmax(1)[:, 2::4, 2::4] == ref.argmax(1)).mean() > 0.95


def test_tiling_options_under_gsd_are_checked_in_the_units_given(cnn_model):
    """--overlap and --margin are in the model's pixels when the scene is resampled: errors speak of those."""
    from dataclasses import replace
    from types import SimpleNamespace

    from geoseg.engine.adapters import at_ratio
    from geoseg.engine.options import Tiling, check_tiling, max_overlap, resolve
    from geoseg.errors import ConfigError

    assert max_overlap(512, 32) == 256 and max_overlap(512) == 256 and max_overlap(96, 32) == 32
    check_tiling(512, 256, 255, 32)
    with pytest.raises(ConfigError, match="at most 256; use --overlap 256 or less"):
        at_ratio(cnn_model.backend, 3.637, Tiling(512, 600))
    with pytest.raises(ConfigError, match="margin 1000 .* half the tile \\(512 px\\); use --margin 255"):
        at_ratio(cnn_model.backend, 3.637, Tiling(512, None, margin=1000))
    for ratio in (1.2987, 1.3, 3.637, 0.61):  # the largest values the user may give stay valid once scaled
        runner, tiled = at_ratio(cnn_model.backend, ratio, Tiling(512, 256, margin=255))
        check_tiling(tiled.tile, tiled.overlap, tiled.margin)
        assert tiled.tile == runner.native_tile
    # each scene tile is resampled to the model's tile: no pad_multiple applies to the overlap
    card32 = replace(cnn_model.card, pad_multiple=32)
    wrapped = SimpleNamespace(card=card32)
    at_ratio(wrapped, 2.0, Tiling(160, 70))  # 80 is half the tile; the stride need not be a multiple of 32
    runner, small = at_ratio(wrapped, 2.0, Tiling(32))  # no overlap given: the engine's default, within the tile
    layout, _ = resolve(runner.card, (300, 300), small, batch_size=1)
    assert layout.tile == 64 and layout.overlap == 16
    layout, _ = resolve(replace(card32, tile_size=32), (300, 300), Tiling(), batch_size=1)
    assert layout.overlap == 0  # a 32-px tile of a stride-32 model takes no overlap: the default says so


def _dubai_crop():
    img_path = shared("data/dubai/images/tile_8_image_part_005.jpg")
    mask_path = shared("data/dubai/masks/tile_8_image_part_005.png")
    r0, c0, s = 300, 500, 480
    with rasterio.open(img_path) as ds:
        img = ds.read()[:, r0 : r0 + s, c0 : c0 + s]
    with rasterio.open(mask_path) as ds:
        mask = ds.read(1)[r0 : r0 + s, c0 : c0 + s]
    return img, np.where(mask == 5, 255, mask)


def _resample(img, f):
    import torch
    from torch.nn import functional as F

    n = int(round(img.shape[1] * f))
    t = torch.from_numpy(img.astype(np.float32))[None]
    out = F.interpolate(t, size=(n, n), mode="bilinear", antialias=f < 1, align_corners=False)[0]
    return out.round().clamp(0, 255).numpy().astype(np.uint8)


def _on_native(c, f, s):
    if f > 1:
        k = int(f)
        return c[k // 2 :: k, k // 2 :: k][:s, :s]
    k = int(round(1 / f))
    c = np.repeat(np.repeat(c, k, 0), k, 1)[:s, :s]
    return np.pad(c, ((0, s - c.shape[0]), (0, s - c.shape[1])), mode="edge")


@pytest.mark.slow
def test_gsd_auto_keeps_the_map_at_other_ground_resolutions(tmp_path):
    """A labelled Dubai crop at 0.8 m, a 6x finer and a 3x coarser copy: --gsd auto vs off."""
    from geoseg.train.metrics import ConfusionMatrix

    img, mask = _dubai_crop()
    s = img.shape[1]
    model = geoseg.load_model("geoseg-landcover-n", device="cpu")
    scores, maps = {}, {}
    for label, f in (("native", 1), ("fine", 6), ("coarse", 1 / 3)):
        gsd = 0.8 / f
        path = write_raster(tmp_path / f"{label}.tif", img if f == 1 else _resample(img, f), crs="EPSG:32640",
                            transform=Affine(gsd, 0, 500000, 0, -gsd, 2780000))
        for setting in ("off", "auto"):
            out = geoseg.predict(path, tmp_path / f"{label}-{setting}", model=model, gsd=setting, polygons=False)
            with rasterio.open(out.output / "classes.tif") as ds:
                c = _on_native(ds.read(1), f, s)
            cm = ConfusionMatrix(5)
            cm.update(c, mask)
            scores[label, setting], maps[label, setting] = cm.miou(), c
    assert scores["native", "auto"] == scores["native", "off"]  # at its own GSD nothing changes
    assert scores["fine", "auto"] >= scores["native", "auto"] - 0.03
    assert scores["fine", "off"] < scores["native", "off"] - 0.05  # the failure --gsd auto fixes
    assert scores["coarse", "auto"] > scores["coarse", "off"]

    def agreement(setting):
        a, b, c = (maps[k, setting] for k in ("native", "fine", "coarse"))
        return np.mean([(a == b).mean(), (a == c).mean(), (b == c).mean()])

    print("mIoU (off, auto):", {k: (round(scores[k, "off"], 3), round(scores[k, "auto"], 3))
                                 for k in ("native", "fine", "coarse")},
          f"agreement off {agreement('off'):.2f}, auto {agreement('auto'):.2f}")  # docs/predict.md, with -s
    assert agreement("auto") >= agreement("off")


def test_bands_by_name_pick_3_2_1(tmp_path, yolo_checkpoint):
    data = smooth_image((5, 80, 90), seed=13)
    path = tmp_path / "bgrn.tif"
    write_raster(path, data)
    with rasterio.open(path, "r+") as ds:
        for i, name in enumerate(("blue", "green", "red", "nir", "swir16"), 1):
            ds.set_band_description(i, name)
    r = geoseg.predict(path, tmp_path / "a", model=yolo_checkpoint, device="cpu", polygons=False,
                       bands=["red", "green", "blue"])
    assert json.loads((r.output / "run.json").read_text())["options"]["bands"] == [3, 2, 1]
    # the card names red, green, blue: matched without --bands
    from geoseg.models.card import ModelCard

    card = ModelCard.load(yolo_checkpoint.with_suffix(".yaml"))
    named = tmp_path / "named.yaml"
    ModelCard.from_dict({**card.to_dict(), "bands": ["red", "green", "blue"]}).save(named)
    r = geoseg.predict(path, tmp_path / "b", model=yolo_checkpoint, card=named, device="cpu", polygons=False)
    assert json.loads((r.output / "run.json").read_text())["options"]["bands"] == [3, 2, 1]


def test_band_hints_are_only_as_sure_as_the_names(tmp_path, yolo_checkpoint):
    from geoseg.models.card import ModelCard

    card = ModelCard.load(yolo_checkpoint.with_suffix(".yaml"))
    named = tmp_path / "named.yaml"
    ModelCard.from_dict({**card.to_dict(), "bands": ["red", "green", "blue"]}).save(named)
    described = write_raster(tmp_path / "d.tif", smooth_image((5, 40, 40)))
    with rasterio.open(described, "r+") as ds:
        for i, name in enumerate(("blue", "green", "red", "nir", "swir16"), 1):
            ds.set_band_description(i, name)
    # names match partly: the hint would be a guess
    with rasterio.open(described, "r+") as ds:
        ds.set_band_description(3, "rededge")
    with pytest.raises(BandCountError, match="do not all match"):
        geoseg.predict(described, tmp_path / "x", model=yolo_checkpoint, card=named, device="cpu")
    anonymous = write_raster(tmp_path / "a.tif", smooth_image((6, 40, 40)))
    with pytest.raises(BandCountError, match="names no bands, so the order is unknown"):
        geoseg.predict(anonymous, tmp_path / "y", model=yolo_checkpoint, card=named, device="cpu")
    from geoseg.io.bands import band_mismatch

    err = band_mismatch("s.tif", [1, 2, 3, 4, 5], ["blue", "green", "red", "nir", "swir16"],
                        ModelCard.load(named))
    assert "--bands 3,2,1" in str(err)


def test_coarse_model_gsd_writes_the_scene_in_bounded_pieces(tmp_path, monkeypatch):
    """At a model GSD 40x coarser than the scene, each block is written in pieces: same map, any piece size."""
    from geoseg.workflow.stages import scene_piece

    ortho = Path(__file__).resolve().parents[1] / "data" / "scenes" / "field-ortho.tif"  # RGBA, alpha mask
    whole = geoseg.predict(ortho, tmp_path / "whole", model="geoseg-landcover-n", device="cpu", polygons=False,
                           confidence=True)
    monkeypatch.setattr("geoseg.workflow.stages.PIECE", 64)
    pieces = geoseg.predict(ortho, tmp_path / "pieces", model="geoseg-landcover-n", device="cpu", polygons=False,
                            confidence=True)
    run = json.loads((pieces.output / "run.json").read_text())
    d, block = run["ground_resolution_and_tta"]["decimation"], run["layout"]["block_size"]
    assert d > 1 and scene_piece(block * d)[0] <= 64 < block * d  # really in pieces
    # the record speaks of the scene and of the options as given; the layout is on the d x d cells
    gr = run["ground_resolution_and_tta"]
    assert gr["scene_gsd_m"] == pytest.approx(0.02, rel=0.05) and gr["run_gsd_m"] == pytest.approx(0.8)
    assert gr["ratio"] == pytest.approx(0.8 / gr["scene_gsd_m"]) and gr["native_tile"] == round(512 * gr["ratio"])
    assert (run["options"]["tile_size"], run["options"]["overlap"], run["options"]["margin"]) == (512, 64, 16)
    assert run["layout"]["pixel"] == f"{d}x{d} cells" and abs(run["layout"]["tile"] - gr["native_tile"] / d) <= 1
    for name in ("classes.tif", "confidence.tif"):
        with rasterio.open(whole.output / name) as a, rasterio.open(pieces.output / name) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1))
            assert a.overviews(1) == b.overviews(1)
            np.testing.assert_array_equal(a.read(1, out_shape=(a.height // 4, a.width // 4)),
                                          b.read(1, out_shape=(b.height // 4, b.width // 4)))
    assert run["counts"] == json.loads((whole.output / "run.json").read_text())["counts"]
    with rasterio.open(ortho) as ds:
        alpha = ds.read(4)
    with rasterio.open(pieces.output / "classes.tif") as ds:
        assert ((ds.read(1) == 255) == (alpha == 0)).all()  # the scene's own nodata, at full resolution


def test_scene_piece_tiles_the_block():
    from geoseg.workflow.stages import PIECE, scene_piece

    for side in (143440, 11264, 12288, 5360, 2048, 1000, 4112, 16 * 131, 16 * 1031):
        piece, unit = scene_piece(side)
        assert piece <= PIECE or piece == side
        assert piece % unit == 0 and side % unit == 0 and (unit % 16 == 0 or unit == side)
        if side > PIECE:  # pieces stay large whatever the side's factors
            assert piece > PIECE // 2
    assert scene_piece(16384) == (2048, 2048)
    assert scene_piece(16 * 131) == (2048, 16)


@pytest.mark.parametrize(("n_in", "n_out"), [(1862, 512), (512, 1862), (169, 512), (512, 169), (513, 512), (640, 333)])
def test_resize_through_onnx_runtime_equals_torch(n_in, n_out):
    import torch
    from torch.nn import functional as F

    from geoseg.engine.resize import resize

    x = np.random.default_rng(n_in).standard_normal((2, 3, n_in, n_in + 5)).astype(np.float32)
    for antialias in (False, True):
        for size in [(n_out, n_out + 1), (n_out + 7, n_out)]:
            ours = resize(x, size, antialias=antialias, threads=2)
            ref = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False,
                                antialias=antialias).numpy()
            np.testing.assert_allclose(ours, ref, atol=1e-3)  # float32 rounding of the coordinates


def test_adapters_around_onnx_runtime_stay_in_numpy_and_equal_torch(yolo_checkpoint, tmp_path, monkeypatch):
    """--gsd and --tta around a model on ONNX Runtime: no torch tensors, the logits torch's wrappers give."""
    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
    on_ort = geoseg.load_model(yolo_checkpoint, device="cpu").backend
    on_torch = geoseg.load_model(yolo_checkpoint, device="cpu", runtime="torch").backend
    rng = np.random.default_rng(5)
    for ratio in (2.5, 0.6):  # a finer scene (tiles shrunk to the model's) and a coarser one (enlarged)
        wrapped = [TestTimeAugmented(AtGroundResolution(b, ratio, model_tile=128), "flips") for b in (on_ort, on_torch)]
        assert wrapped[0].numpy and not wrapped[1].numpy
        n = wrapped[0].card.tile_size
        x = rng.standard_normal((2, 3, n, n)).astype(np.float32)
        a, b = wrapped[0](x), wrapped[1](x)
        assert a.shape == b.shape == (2, 3, n, n)
        np.testing.assert_allclose(a, b, atol=2e-3)
        assert (a.argmax(1) == b.argmax(1)).mean() > 0.99


def test_gsd_auto_on_the_cpu_never_imports_torch(tmp_path):
    """The built-in model at its own GSD on a 2 cm scene: resampling included, no torch in the process."""
    import subprocess
    import sys

    ortho = Path(__file__).resolve().parents[1] / "data" / "scenes" / "field-ortho.tif"
    code = ("import sys, geoseg\n"
            f"r = geoseg.predict({str(ortho)!r}, {str(tmp_path / 'out')!r}, model='geoseg-landcover-n', "
            "device='cpu', polygons=False, tta='flips')\n"
            "import json; run = json.loads((r.output / 'run.json').read_text())\n"
            "assert run['ground_resolution_and_tta']['ratio'] is not None, run['ground_resolution_and_tta']\n"
            "print('torch' in sys.modules)\n")
    env = {**os.environ, "GEOSEG_CACHE": str(tmp_path / "cache")}
    # the first run exports the checkpoint (torch is needed then); the second one runs from the cache
    first = code.replace(str(tmp_path / "out"), str(tmp_path / "first"))
    subprocess.run([sys.executable, "-c", first], check=True, env=env, capture_output=True)
    done = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "False"


def test_evaluation_with_tta_scores_the_augmented_maps(cnn_model, tmp_path):
    """`geoseg val --tta`: the confusion matrix of the maps predict would write with the same --tta."""
    import yaml

    from geoseg.engine.blocks import predict_array
    from geoseg.engine.options import Tiling, resolve
    from geoseg.train.data import load_dataset_spec
    from geoseg.train.evaluate import evaluate_dataset
    from geoseg.train.metrics import ConfusionMatrix

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    images = [smooth_image((3, 90, 110), seed=s) for s in (1, 2)]
    for k, img in enumerate(images):
        write_raster(tmp_path / "images" / f"a{k}.tif", img)
        with rasterio.open(tmp_path / "masks" / f"a{k}.png", "w", driver="PNG", width=110, height=90, count=1,
                           dtype="uint8") as ds:
            ds.write((img[0] // 64).astype(np.uint8), 1)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"path": ".", "val": "images", "names": ["a", "b", "c", "d"]}))
    spec = load_dataset_spec(tmp_path / "d.yaml")
    backend = cnn_model.backend
    matrices = []
    for tta in ("none", "flips"):
        runner = backend if tta == "none" else TestTimeAugmented(backend, tta)
        ref = ConfusionMatrix(4)
        for img in images:
            _, opts = resolve(backend.card, img.shape[1:], Tiling(None, None, "hann", None), batch_size=4)
            ref.update(predict_array(img, runner, opts).classes, (img[0] // 64).astype(np.uint8))
        np.testing.assert_array_equal(evaluate_dataset(cnn_model, spec, "val", tta=tta).matrix, ref.matrix)
        matrices.append(ref.matrix)
    assert (matrices[0] != matrices[1]).any()  # the augmented maps differ: the option is not a no-op


def test_dataset_scales_resample_for_training_and_evaluate_as_gsd_does(cnn_model, tmp_path):
    """`scales` in a dataset YAML: images resampled for training, evaluated as `predict --gsd` runs them."""
    import yaml

    from geoseg.engine.blocks import predict_array
    from geoseg.engine.options import Tiling, resolve
    from geoseg.errors import ConfigError
    from geoseg.train.data import MaskDataset, load_dataset_spec
    from geoseg.train.evaluate import evaluate_dataset
    from geoseg.train.metrics import ConfusionMatrix

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = smooth_image((3, 90, 110), seed=4)
    mask = (img[0] // 64).astype(np.uint8)
    write_raster(tmp_path / "images" / "a0.tif", img)
    with rasterio.open(tmp_path / "masks" / "a0.png", "w", driver="PNG", width=110, height=90, count=1,
                       dtype="uint8") as ds:
        ds.write(mask, 1)
    spec = {"path": ".", "val": "images", "names": ["a", "b", "c", "d"], "scales": {"a*": 2.0}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(spec))
    data = load_dataset_spec(tmp_path / "d.yaml")
    big, big_mask = MaskDataset(data, "val").items[0]
    assert big.shape == (3, 180, 220) and big.dtype == np.uint8
    np.testing.assert_array_equal(big_mask, np.repeat(np.repeat(mask, 2, 0), 2, 1))  # nearest, exactly

    backend = cnn_model.backend
    runner = AtGroundResolution(backend, 0.5, model_tile=backend.card.tile_size)  # the image is 2x coarser
    _, opts = resolve(runner.card, img.shape[1:], Tiling(tile=runner.native_tile), batch_size=4)
    ref = ConfusionMatrix(4)
    ref.update(predict_array(img, runner, opts).classes, mask)
    np.testing.assert_array_equal(evaluate_dataset(cnn_model, data, "val").matrix, ref.matrix)

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "scales": {"a*": 0}}))
    with pytest.raises(ConfigError, match="scales"):
        load_dataset_spec(tmp_path / "bad.yaml")
