"""Parity: tiled == whole image, streaming (dask) == eager; nodata; georeferencing."""

import time

import numpy as np
import pytest
import rasterio
import torch
from torch.nn import functional as F

import geoseg
from geoseg.engine.blocks import predict_array
from geoseg.engine.options import RunOptions
from geoseg.engine.schedule import stream_blocks
from geoseg.geometry.grid import Grid, Layout
from geoseg.io.raster import RasterSource

from .conftest import shared, smooth_image, write_raster


def whole_image_logits(module, x: np.ndarray, multiple: int) -> np.ndarray:
    """Reference: the model over the whole (reflect-padded) image at once."""
    c, h, w = x.shape
    ph, pw = -h % multiple, -w % multiple
    xp = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect")
    with torch.inference_mode():
        y = module(torch.from_numpy(xp)[None])
        y = F.interpolate(y, size=xp.shape[1:], mode="bilinear", align_corners=False)
    return y[0, :, :h, :w].numpy()


def real_image() -> np.ndarray:
    """A 3-band real aerial clip when the shared data is here, else correlated noise."""
    try:
        path = shared("data/nrcan/new_brunswick_aerial/23322E759967N_clipped_1m_2of2.tif")
    except pytest.skip.Exception:
        return smooth_image((3, 300, 280))
    with rasterio.open(path) as ds:
        return ds.read([1, 2, 3])


@pytest.mark.parametrize("blend", ["hann", "gaussian", "triangular", "mean"])
def test_tiled_blended_equals_whole_image_inference(cnn_model, blend):
    image = real_image()
    ref = whole_image_logits(cnn_model.module, cnn_model.card.normalize(image), 2).argmax(0)
    # overlap 32 > the model's 13-px receptive field
    out = predict_array(image, cnn_model, RunOptions(tile=64, overlap=32, blend=blend))
    inner = (slice(16, -16), slice(16, -16))
    agree = (out.classes[inner] == ref[inner]).mean()
    assert agree >= 0.999, agree
    assert out.tiles_skipped == 0 and (out.classes != 255).all()


def stream(path, model, tile, overlap, *, confidence=True, scheduler="sync", block_target=2048):
    with rasterio.open(path) as ds:
        grid = Grid.from_rio(ds)
        bands = tuple(ds.indexes)
    layout = Layout.create(grid, tile=tile, overlap=overlap, pad_multiple=model.card.pad_multiple,
                           block_target=block_target)
    opts = RunOptions(layout.tile, layout.overlap, "hann", 3, confidence)
    classes = np.full(grid.shape, 254, np.uint8)
    conf = np.zeros(grid.shape, np.float32)
    counts = {"run": 0, "skipped": 0, "blocks": 0}

    def sink(ij, blk):
        r, c = layout.block_slices(*ij)
        classes[r, c] = blk.classes
        if blk.confidence is not None:
            conf[r, c] = blk.confidence
        counts["run"] += blk.tiles_run
        counts["skipped"] += blk.tiles_skipped
        counts["blocks"] += 1

    stream_blocks(RasterSource(str(path), bands), model, layout, opts, sink, scheduler=scheduler)
    return classes, conf, counts, layout


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_streaming_blocks_equal_the_eager_path(tmp_path, cnn_model, scheduler):
    image = smooth_image((3, 301, 419), seed=3)
    path = write_raster(tmp_path / "s.tif", image)
    # small blocks so that many block edges (and strips) cross the scene
    classes, conf, counts, layout = stream(path, cnn_model, 64, 16, scheduler=scheduler, block_target=96)
    assert layout.blocks[0] * layout.blocks[1] >= 9
    eager = predict_array(image, cnn_model, RunOptions(64, 16, "hann", 3, True))
    assert np.array_equal(classes, eager.classes)
    np.testing.assert_allclose(conf, eager.confidence, rtol=1e-5, atol=1e-6)
    assert counts["run"] == eager.tiles_run == layout.tiles[0] * layout.tiles[1]


def test_yolo_family_runs_through_the_engine(tmp_path, yolo_checkpoint):
    model = geoseg.load_model(yolo_checkpoint, device="cpu")
    image = smooth_image((3, 200, 170), seed=4)
    path = write_raster(tmp_path / "y.tif", image)
    classes, conf, _, _ = stream(path, model, 128, 32, block_target=96)
    eager = predict_array(image, model, RunOptions(128, 32, "hann", 3, True))
    assert np.array_equal(classes, eager.classes)
    assert ((conf >= 1 / 3 - 1e-6) & (conf <= 1 + 1e-6)).all()


def test_nodata_is_respected_and_empty_tiles_are_skipped(tmp_path, cnn_model):
    image = smooth_image((3, 256, 256), seed=5)
    image[:, :, :130] = 0  # left half is nodata: tiles entirely inside it never run
    image[:, 200:210, 200:210] = 0  # a hole inside valid data
    path = write_raster(tmp_path / "n.tif", image, nodata=0)
    classes, conf, counts, layout = stream(path, cnn_model, 64, 16, block_target=96)
    nod = (image == 0).all(axis=0)
    assert (classes[nod] == 255).all() and (conf[nod] == -1).all()
    assert (classes[~nod] < 4).all()
    assert counts["skipped"] > 0
    assert counts["run"] + counts["skipped"] == layout.tiles[0] * layout.tiles[1]
    eager = predict_array(image, cnn_model, RunOptions(64, 16, "hann", 3), valid=~nod)
    assert eager.tiles_skipped == counts["skipped"]
    assert np.array_equal(classes, eager.classes)


def test_predict_preserves_crs_and_transform_exactly(tmp_path, cnn_model):
    from affine import Affine

    t = Affine(0.123456789, 0.0, 612345.6789, 0.0, -0.123456789, 4567890.12345)
    # wider than the COG's 512-px tiles, so the COG gets overviews; sides divisible by 4
    path = write_raster(tmp_path / "g.tif", smooth_image((3, 136, 1040)), crs="EPSG:2953", transform=t)
    res = geoseg.predict(path, tmp_path / "out", model=cnn_model, confidence=True)
    for name in ("classes.tif", "confidence.tif"):
        with rasterio.open(res.output / name) as ds, rasterio.open(path) as src:
            assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape
    with rasterio.open(res.output / "classes.tif") as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.colormap(1)[0][:3] == tuple(int(cnn_model.card.palette()[0][i]) for i in range(3))
        assert ds.overviews(1) == [2, 4]
        assert ds.tags()["GEOSEG_CLASSES"] == '["a", "b", "c", "d"]'
        full = ds.read(1)
    with rasterio.open(res.output / "classes.tif", overview_level=0) as ovr:  # the 2x overview itself
        half = ovr.read(1)
    h, w = full.shape
    assert half.shape == (h // 2, w // 2)
    assert set(np.unique(half)) <= set(np.unique(full)) <= {0, 1, 2, 3}, "overviews hold class ids only"
    # mode resampling: where one class holds at least 3 of the 4 pixels below, the overview has it
    quads = full.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(h // 2, w // 2, 4)
    counts = np.stack([(quads == c).sum(axis=-1) for c in range(4)])
    majority = counts.max(axis=0) >= 3
    assert majority.mean() > 0.5 and (counts.max(axis=0) < 4).any()
    np.testing.assert_array_equal(half[majority], counts.argmax(axis=0)[majority])


def test_infer_matches_predict_for_in_memory_images(tmp_path, cnn_model):
    image = smooth_image((3, 120, 140), seed=6)
    classes, conf = cnn_model.infer(image)
    path = write_raster(tmp_path / "i.tif", image)
    res = geoseg.predict(path, tmp_path / "o", model=cnn_model)
    with rasterio.open(res.output / "classes.tif") as ds:
        assert np.array_equal(ds.read(1), classes)
    assert conf.shape == classes.shape and conf.dtype == np.float32
    c2, _ = cnn_model.infer(path)
    assert np.array_equal(c2, classes)
    res = geoseg.predict(path, tmp_path / "t", model=cnn_model, tta="flips", polygons=False)
    with rasterio.open(res.output / "classes.tif") as ds:
        flipped = ds.read(1)
    assert not np.array_equal(flipped, classes)  # the flips change the map, and infer applies them as predict does
    assert np.array_equal(cnn_model.infer(image, tta="flips")[0], flipped)
    assert np.array_equal(cnn_model.infer(path, tta="flips")[0], flipped)
    # --gsd METRES runs a model whose card names no ground resolution at that one, in infer as in predict
    res = geoseg.predict(path, tmp_path / "g", model=cnn_model, gsd=1.5, polygons=False)
    with rasterio.open(res.output / "classes.tif") as ds:
        coarse = ds.read(1)
    assert not np.array_equal(coarse, classes)
    assert np.array_equal(cnn_model.infer(path, gsd=1.5)[0], coarse)
    # bands picked from a larger image, as segment and predict pick them
    four = np.concatenate([image, image[:1]])
    assert np.array_equal(cnn_model.infer(four, bands=[1, 2, 3])[0], classes)
    assert np.array_equal(cnn_model.infer(write_raster(tmp_path / "4.tif", four), bands=[1, 2, 3])[0], classes)
    with pytest.raises(geoseg.GeosegError, match="band 5 does not exist"):
        cnn_model.infer(four, bands=[1, 2, 5])


def test_gdal_block_cache_is_capped_in_bytes_while_predicting(tmp_path, cnn_model, monkeypatch):
    # rasterio passes GDAL_CACHEMAX to GDALSetCacheMax64 in bytes: a cap of "64" would be
    # 64 bytes, and every read would decompress its source blocks again.
    from rasterio._env import get_gdal_config

    from geoseg.io.raster import GDAL_CACHE_BYTES

    seen = []
    read = RasterSource.read

    def spy(self, rows, cols):
        seen.append(get_gdal_config("GDAL_CACHEMAX"))
        return read(self, rows, cols)

    monkeypatch.setattr(RasterSource, "read", spy)
    path = write_raster(tmp_path / "c.tif", smooth_image((3, 96, 96)))
    geoseg.predict(path, tmp_path / "out", model=cnn_model, polygons=False)
    assert seen and set(seen) == {GDAL_CACHE_BYTES}
    assert 16 * 2**20 <= GDAL_CACHE_BYTES <= 256 * 2**20


def test_cpu_streams_run_forward_passes_side_by_side(tmp_path, cnn_model):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from geoseg.models.backends import available_cores, cpu_streams

    cores = available_cores()
    n, threads = cpu_streams(None, "cpu")
    assert n == min(2, cores) and threads == max(1, cores // n)
    assert cpu_streams(8, "cpu")[0] == min(8, cores)
    assert cpu_streams(None, "cuda:0") == (1, 0)

    path = write_raster(tmp_path / "s.tif", smooth_image((3, 200, 190), seed=2))
    x = cnn_model.card.normalize(smooth_image((3, 64, 64), seed=3))[None]
    outputs = {}
    for streams in (1, 2):
        net = geoseg.load_model(cnn_model.module, card=cnn_model.card, device="cpu", streams=streams).backend
        forward, active, peak, lock = net._forward, [0], [0], threading.Lock()

        def counted(x, forward=forward, active=active, peak=peak, lock=lock):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)  # long enough for the other threads to arrive
            try:
                return forward(x)
            finally:
                with lock:
                    active[0] -= 1

        net._forward = counted
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(net, [x] * 8))
        assert peak[0] == min(streams, cores)
        res = geoseg.predict(path, tmp_path / f"o{streams}", model=net, polygons=False)
        with rasterio.open(res.output / "classes.tif") as ds:
            outputs[streams] = ds.read(1)
    assert (outputs[1] == outputs[2]).mean() > 0.9999


def test_predict_puts_torch_thread_count_back(tmp_path, cnn_model):
    before = torch.get_num_threads()
    net = geoseg.load_model(cnn_model.module, card=cnn_model.card, device="cpu", streams=2)
    path = write_raster(tmp_path / "t.tif", smooth_image((3, 90, 80)))
    geoseg.predict(path, tmp_path / "o", model=net, polygons=False)
    net.infer(smooth_image((3, 70, 60)))
    assert torch.get_num_threads() == before


class _FailingSource(RasterSource):
    """Every block but those of the first column fails to read."""

    def read(self, rows, cols):
        if cols.start > 0:
            raise RuntimeError("the disk went away")
        return super().read(rows, cols)


@pytest.mark.slow
def test_a_failed_cluster_run_leaves_nothing_a_later_run_picks_up(tmp_path, yolo_checkpoint):
    """Two runs on one client: the second gets its own blocks, never those a failed first run left behind."""
    from distributed import Client, LocalCluster

    from geoseg.models.loading import ModelSpec

    spec = ModelSpec(str(yolo_checkpoint), device="cpu", runtime="torch")
    model = spec.load()
    image = smooth_image((3, 301, 419), seed=4)
    paths = (write_raster(tmp_path / "a.tif", smooth_image((3, 301, 419), seed=3)),
             write_raster(tmp_path / "b.tif", image))
    with rasterio.open(paths[1]) as ds:
        layout = Layout.create(Grid.from_rio(ds), tile=64, overlap=16, pad_multiple=32, block_target=96)
    opts = RunOptions(64, 16, "hann", 3, False)
    classes = np.full(layout.grid.shape, 254, np.uint8)

    def sink(ij, blk):
        classes[layout.block_slices(*ij)] = blk.classes

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(RuntimeError, match="disk went away"):
            stream_blocks(_FailingSource(str(paths[0]), (1, 2, 3)), spec, layout, opts, sink, scheduler=client)
        for _ in range(100):  # the failed run cancelled what it had submitted (the scheduler forgets soon after)
            if not client.run_on_scheduler(lambda dask_scheduler: [k for k in dask_scheduler.tasks
                                                                   if "geoseg-block" in str(k)]):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the failed run's blocks are still on the scheduler")
        classes[:] = 254
        stream_blocks(RasterSource(str(paths[1]), (1, 2, 3)), spec, layout, opts, sink, scheduler=client)
    assert np.array_equal(classes, predict_array(image, model, opts).classes)
