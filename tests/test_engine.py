"""The lazy dask/xarray core and the device-resident engine give predict's classes."""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import replace

import dask
import dask.array as da
import numpy as np
import pytest
import rasterio

import geoseg
from geoseg.engine.blocks import predict_array
from geoseg.engine.device import run_on_device
from geoseg.engine.options import Tiling, resolve
from geoseg.geometry.grid import Grid
from geoseg.io.raster import RasterSource
from geoseg.models.loading import ModelSpec

from .conftest import REPO, smooth_image, write_raster


class CountingBackend:
    """Wraps a backend and counts the tiles that go through it."""

    def __init__(self, backend):
        self.inner = backend
        self.card = backend.card
        self.device = backend.device
        self.tiles = 0
        self._lock = threading.Lock()

    def __call__(self, x):
        with self._lock:
            self.tiles += len(x)
        return self.inner(x)

    def forward_tensor(self, x):
        with self._lock:
            self.tiles += len(x)
        return self.inner.forward_tensor(x)


def _image_with_nodata(shape=(3, 333, 401), seed=4):
    img = smooth_image(shape, seed=seed)
    valid = np.ones(shape[1:], bool)
    valid[:40, :90] = False  # a corner of nodata: some tiles skipped, some half valid
    valid[200:230, 300:] = False
    return img, valid


def _reference(model, img, valid, tile, overlap, confidence=False):
    card = model.card
    _, opts = resolve(card, img.shape[1:], Tiling(tile, overlap), batch_size=3, confidence=confidence)
    return predict_array(img, model, opts, valid=valid)


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_device_engine_on_cpu_tensors_equals_predict_array(cnn_model, batch_size):
    img, valid = _image_with_nodata()
    ref = _reference(cnn_model.backend, img, valid, 64, 16, confidence=True)
    from affine import Affine

    from geoseg.engine.options import RunOptions
    from geoseg.geometry.grid import Layout

    layout = Layout.create(Grid(img.shape[1:], Affine.identity()), tile=64, overlap=16,
                           pad_multiple=cnn_model.card.pad_multiple, block_target=96)
    assert layout.blocks[0] * layout.blocks[1] > 4
    opts = RunOptions(layout.tile, layout.overlap, "hann", batch_size, True)
    out = np.full(img.shape[1:], 254, np.uint8)
    conf = np.zeros(img.shape[1:], np.float32)
    seen, run = [], [0]
    src = _ArraySourceWithMask(img, valid)
    counting = CountingBackend(cnn_model.backend)

    def sink(ij, blk):
        rows, cols = layout.block_slices(*ij)
        out[rows, cols] = blk.classes
        conf[rows, cols] = blk.confidence
        seen.append(ij)
        run[0] += blk.tiles_run

    stats = run_on_device(src, counting, layout, opts, sink, readers=2, prefetch=3)
    assert sorted(seen) == sorted(layout.iter_blocks())  # every block once
    np.testing.assert_array_equal(out, ref.classes)
    np.testing.assert_allclose(conf, ref.confidence, atol=1e-5)
    assert run[0] == ref.tiles_run == counting.tiles == stats.tiles
    # batches span blocks: every forward pass but the last is full
    assert stats.batches == -(-stats.tiles // batch_size)
    # bytes: raw uint8 input + bool mask in; uint8 classes + float32 confidence + a 256-bin int64 histogram
    # + a 1-byte flag out
    h2d = sum(3 * _extent(layout, ij) + _extent(layout, ij) for ij in layout.iter_blocks())
    d2h = sum(5 * _size(layout, ij) + 1 + 2048 for ij in layout.iter_blocks())
    assert (stats.h2d_bytes, stats.d2h_bytes) == (h2d, d2h)


def _extent(layout, ij):
    r, c = layout.block_extent(*ij)
    return (r.stop - r.start) * (c.stop - c.start)


def _size(layout, ij):
    r, c = layout.block_slices(*ij)
    return (r.stop - r.start) * (c.stop - c.start)


class _ArraySourceWithMask:
    def __init__(self, img, valid):
        from geoseg.io.raster import ArraySource

        self.src = ArraySource(img, valid)

    def read(self, rows, cols):
        return self.src.read(rows, cols)


def test_predict_device_engine_equals_blocks_engine_and_records_transfers(tmp_path, yolo_checkpoint, monkeypatch):
    monkeypatch.setattr("geoseg.workflow.plan.DEVICE_BLOCK", 256)  # several blocks on a small scene
    path = write_raster(tmp_path / "s.tif", smooth_image((3, 700, 650), seed=8))
    a = geoseg.predict(path, tmp_path / "a", model=yolo_checkpoint, device="cpu", engine="blocks",
                       polygons=False, tile_size=128, batch_size=3)
    b = geoseg.predict(path, tmp_path / "b", model=yolo_checkpoint, device="cpu", engine="device",
                       polygons=False, tile_size=128, batch_size=3)
    with rasterio.open(a.output / "classes.tif") as x, rasterio.open(b.output / "classes.tif") as y:
        np.testing.assert_array_equal(x.read(1), y.read(1))
    run = json.loads((b.output / "run.json").read_text())
    assert run["options"]["engine"] == "device"
    t = run["transfers"]
    assert t["tiles"] == run["counts"]["tiles_run"] == a.tiles_run
    assert t["d2h_bytes"] == 700 * 650 + 2049 * run["counts"]["blocks"]
    assert run["counts"]["blocks"] > 4
    assert set(t["seconds"]) == {"capture", "read_wait", "load", "forward", "finish", "write_wait", "writers_busy"}
    assert "transfers" not in json.loads((a.output / "run.json").read_text())


def test_device_engine_refuses_onnx_models(tmp_path, rgb_raster):
    from geoseg.errors import ConfigError
    from geoseg.models.card import ModelCard

    pytest.importorskip("onnx")
    from geoseg.train.export import export_model

    from .conftest import small_cnn

    card = ModelCard(name="cnn", classes=("a", "b", "c", "d"), in_channels=3, tile_size=64, pad_multiple=2)
    onnx_path = export_model(geoseg.load_model(small_cnn(), card=card, device="cpu"), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="--engine device needs a torch model"):
        geoseg.predict(rgb_raster, tmp_path / "o", model=onnx_path, engine="device", device="cpu")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- segment


def test_segment_is_lazy_and_runs_each_tile_once(cnn_model):
    img, valid = _image_with_nodata((3, 300, 280), seed=5)
    img = img.astype(np.float32)
    img[:, ~valid] = np.nan  # NaN is nodata, declared or not
    counting = CountingBackend(cnn_model.backend)
    classes, conf = geoseg.segment(da.from_array(img, chunks=(3, 100, 90)), counting, tile_size=64, overlap=16,
                                   confidence=True)
    assert counting.tiles == 0  # nothing ran yet
    assert classes.dtype == np.uint8 and classes.shape == (300, 280)
    c, f = dask.compute(classes, conf, scheduler="threads")
    ref = _reference(cnn_model.backend, np.nan_to_num(img), valid, 64, 16, confidence=True)
    assert counting.tiles == ref.tiles_run  # every tile once, for both outputs
    np.testing.assert_array_equal(c, ref.classes)
    np.testing.assert_allclose(f, ref.confidence, atol=1e-5)
    assert (c[~valid] == 255).all()


def test_segment_dask_equals_numpy_and_sync(cnn_model):
    img = smooth_image((3, 257, 311), seed=6)
    lazy = geoseg.segment(img, cnn_model, tile_size=64, overlap=16)
    a = lazy.compute(scheduler="sync")
    b = lazy.compute(scheduler="threads")
    ref = _reference(cnn_model.backend, img, None, 64, 16)
    np.testing.assert_array_equal(a, ref.classes)
    np.testing.assert_array_equal(b, ref.classes)


def test_segment_takes_any_chunking_and_a_mask(cnn_model, monkeypatch):
    # Block windows are cut from the input's chunks inside the block tasks:
    # chunks split across bands, uneven chunks smaller and larger than the
    # blocks, and a mask chunked another way or made from the same graph must
    # all give the classes of one in-memory array, with many blocks in flight.
    monkeypatch.setattr("geoseg.engine.lazy.lookahead", lambda: 1)
    monkeypatch.setattr("geoseg.engine.lazy.resolve", functools.partial(resolve, block_target=96))
    img = smooth_image((4, 257, 311), seed=8)
    img[3] = np.where(np.random.default_rng(8).random((257, 311)) > 0.1, 200, 0)
    mask = img[3] > 0
    lazy = da.from_array(img, chunks=((2, 2), (50, 100, 107), (7, 200, 104)))
    ref = _reference(cnn_model.backend, img[:3], mask, 64, 16)
    for m in (da.from_array(mask, chunks=(33, 290)), lazy[3] > 0):
        got = geoseg.segment(lazy, cnn_model, bands=[1, 2, 3], tile_size=64, overlap=16, mask=m)
        assert len(got.chunks[0]) > 2 and len(got.chunks[1]) > 2
        np.testing.assert_array_equal(got.compute(scheduler="threads"), ref.classes)
    assert (ref.classes[~mask] == 255).all()


def test_segment_parts_of_the_result_compute_alone(cnn_model, monkeypatch):
    # A window of the result, or one output of the pair, keeps what it needs when dask culls the graph.
    monkeypatch.setattr("geoseg.engine.lazy.resolve", functools.partial(resolve, block_target=96))
    img = smooth_image((3, 300, 280), seed=10)
    x = da.from_array(img, chunks=(3, 100, 90))
    ref = _reference(cnn_model.backend, img, None, 64, 16, confidence=True)
    classes = geoseg.segment(x, cnn_model, tile_size=64, overlap=16)
    np.testing.assert_array_equal(classes[-50:, -70:].compute(), ref.classes[-50:, -70:])
    c, f = geoseg.segment(x, cnn_model, tile_size=64, overlap=16, confidence=True)
    np.testing.assert_array_equal(c.compute(), ref.classes)
    np.testing.assert_allclose(f[100:150].compute(), ref.confidence[100:150], atol=1e-5)


def test_segment_on_a_persisted_cluster_input(yolo_checkpoint):
    # Persisted chunks are futures, not tasks: they are taken as they are, not copied or gated.
    distributed = pytest.importorskip("distributed")
    model = geoseg.load_model(str(yolo_checkpoint), device="cpu")
    img = smooth_image((3, 200, 210), seed=11)
    ref = _reference(model.backend, img, None, 64, 16)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        x = client.persist(da.from_array(img, chunks=(3, 64, 64)))
        spec = ModelSpec(str(yolo_checkpoint), device="cpu")  # what a cluster's workers load
        got = geoseg.segment(x, spec, tile_size=64, overlap=16).compute()
    np.testing.assert_array_equal(got, ref.classes)


class _Reads:
    """An array-like that counts the reads of each dask chunk of it."""

    def __init__(self, img):
        self.img, self.shape, self.dtype, self.ndim = img, img.shape, img.dtype, img.ndim
        self.count: dict = {}
        self._lock = threading.Lock()

    def __getitem__(self, idx):
        key = tuple((i.start, i.stop) for i in idx)
        if any(a == b for a, b in key):
            return self.img[idx]  # dask asking for an empty piece, to learn the type
        with self._lock:
            self.count[key] = self.count.get(key, 0) + 1
        return self.img[idx]


def test_segment_reads_follow_the_blocks(cnn_model, monkeypatch):
    # Idle workers would read every chunk of a lazy input ahead of the block
    # wavefront; reads wait for the sweep instead, so the input chunks held at
    # any moment are a few, not the scene, and no chunk is read more than
    # twice (a strip of it again for the blocks above it).
    monkeypatch.setattr("geoseg.engine.lazy.lookahead", lambda: 2)
    monkeypatch.setattr("geoseg.engine.lazy.resolve", functools.partial(resolve, block_target=200))  # 5 x 5 blocks
    img = smooth_image((3, 960, 960), seed=9)
    reads = _Reads(img)
    x = da.from_array(reads, chunks=(3, 120, 120), asarray=False)  # 64 chunks
    lazy = geoseg.segment(x, cnn_model, tile_size=64, overlap=16)
    held = []

    def watch(key, result, dsk, state, id):
        held.append(sum(1 for k in state["cache"] if isinstance(k, tuple) and len(k) == 4))  # (name, band, row, col)

    with dask.callbacks.Callback(posttask=watch):
        got = lazy.compute(scheduler="threads", num_workers=2)
    ref = _reference(cnn_model.backend, img, None, 64, 16)
    np.testing.assert_array_equal(got, ref.classes)
    assert len(reads.count) == 64 and max(reads.count.values()) <= 2
    assert max(held) <= 16, max(held)


def test_segment_at_a_coarser_model_gsd_reads_validity_after_the_blocks(cnn_model):
    # A model 100x coarser than the array: segment averages 4 x 4 cells first and puts nodata back on
    # the array's grid from its full-resolution validity, whose reads wait for the blocks too.
    pytest.importorskip("rioxarray")  # .rio accessors
    import xarray as xr
    from affine import Affine

    from .conftest import small_cnn

    card = replace(cnn_model.card, gsd=1.0)
    model = geoseg.load_model(small_cnn(), card=card, device="cpu")
    img = smooth_image((3, 960, 960), seed=3)
    img[:, :100, :130] = 0
    x = xr.DataArray(da.from_array(img, chunks=(3, 120, 120)), dims=("band", "y", "x"),
                     coords={"y": 5e6 - 0.01 * (np.arange(960) + 0.5), "x": 5e5 + 0.01 * (np.arange(960) + 0.5)})
    x = x.rio.write_crs("EPSG:32633").rio.write_transform(Affine(0.01, 0, 5e5, 0, -0.01, 5e6)).rio.write_nodata(0)
    held = []

    def watch(key, result, dsk, state, id):
        held.append(sum(1 for k in state["cache"] if isinstance(k, tuple) and "valid_mask" in str(k[0])))

    with dask.callbacks.Callback(posttask=watch):
        got = geoseg.segment(x, model).compute(scheduler="threads", num_workers=2).values
    assert (got[:100, :130] == 255).all() and (got[100:, 130:] != 255).all()
    assert max(held) <= 8, max(held)  # of 64 chunks


def test_segment_dataarray_keeps_grid_and_stores_with_rioxarray(tmp_path, cnn_model):
    rioxarray = pytest.importorskip("rioxarray")
    path = write_raster(tmp_path / "s.tif", smooth_image((3, 290, 300), seed=7), nodata=0)
    x = rioxarray.open_rasterio(path, chunks={"band": -1, "x": 128, "y": 128})
    out = geoseg.segment(x, cnn_model, tile_size=64, overlap=16)
    assert out.dims == ("y", "x") and out.attrs["class_names"] == list(cnn_model.card.classes)
    assert out.rio.crs == x.rio.crs and out.rio.transform() == x.rio.transform()
    assert out.rio.nodata == 255
    out.rio.to_raster(tmp_path / "lazy.tif", tiled=True, lock=threading.Lock())
    # vectorize and stats read the class names segment wrote, into a folder they make
    from geoseg.post.landcover import area_stats, vectorize

    v = vectorize(tmp_path / "lazy.tif", tmp_path / "new" / "polygons")
    import pyogrio

    names = set(pyogrio.read_dataframe(v["path"], layer="landcover")["class_name"])
    assert names and names <= set(cnn_model.card.classes)
    assert area_stats(tmp_path / "lazy.tif").classes == list(cnn_model.card.classes)
    res = geoseg.predict(path, tmp_path / "p", model=cnn_model, tile_size=64, overlap=16, polygons=False)
    with rasterio.open(tmp_path / "lazy.tif") as a, rasterio.open(res.output / "classes.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert a.transform == b.transform and a.crs == b.crs
        expected = b.read(1)
    zarr = pytest.importorskip("zarr")
    ds = geoseg.segment(x, cnn_model, tile_size=64, overlap=16, confidence=True)
    ds.to_zarr(tmp_path / "c.zarr", mode="w")  # classes and confidence in one pass over the tiles
    assert zarr is not None
    import xarray as xr

    back = xr.open_zarr(tmp_path / "c.zarr")
    np.testing.assert_array_equal(back["classes"].values, expected)
    assert float(back["confidence"].max()) <= 1.0


def test_infer_takes_and_returns_dataarrays(tmp_path, cnn_model):
    rioxarray = pytest.importorskip("rioxarray")
    path = write_raster(tmp_path / "s.tif", smooth_image((3, 120, 130), seed=9))
    x = rioxarray.open_rasterio(path)
    classes, conf = cnn_model.infer(x)
    ref_c, ref_f = cnn_model.infer(x.values)
    np.testing.assert_array_equal(classes.values, ref_c)
    assert classes.rio.crs == x.rio.crs and (classes.x.values == x.x.values).all()
    assert conf.shape == classes.shape


def test_infer_hints_at_channel_order_and_value_range(cnn_model):
    from geoseg.errors import BandCountError

    img = smooth_image((3, 40, 50))
    with pytest.raises(BandCountError, match=r"looks like \(H, W, C\)"):
        cnn_model.infer(img.transpose(1, 2, 0))


def _real_scene(rel):
    from .conftest import shared

    return shared(rel)


@pytest.mark.slow
def test_segment_on_real_rasters_equals_predict(tmp_path):
    """rioxarray-opened real rasters: a nodata-valued one and an alpha-masked one."""
    rioxarray = pytest.importorskip("rioxarray")
    model = geoseg.load_model("geoseg-landcover-n", device="cpu")
    rgb = _real_scene("data/rasterio/RGB.byte.tif")  # nodata 0
    x = rioxarray.open_rasterio(rgb, chunks={"x": 512, "y": 512})
    lazy = geoseg.segment(x, model)
    res = geoseg.predict(rgb, tmp_path / "p", model=model, polygons=False)
    with rasterio.open(res.output / "classes.tif") as ds:
        np.testing.assert_array_equal(lazy.values, ds.read(1))
        assert lazy.rio.transform() == ds.transform and lazy.rio.crs == ds.crs
    ortho = REPO / "data" / "scenes" / "field-ortho.tif"  # RGBA: alpha is the mask
    y = rioxarray.open_rasterio(ortho, chunks={"x": 512, "y": 512})
    lazy = geoseg.segment(y.sel(band=[1, 2, 3]), model, mask=y.sel(band=4) > 0, gsd="off")
    res = geoseg.predict(ortho, tmp_path / "q", model=model, polygons=False, gsd="off")
    with rasterio.open(res.output / "classes.tif") as ds:
        np.testing.assert_array_equal(lazy.values, ds.read(1))
    # at the model's ground resolution (40x coarser: d x d cells, then resampled tiles) both agree too
    lazy = geoseg.segment(y.sel(band=[1, 2, 3]), model, mask=y.sel(band=4) > 0)
    res = geoseg.predict(ortho, tmp_path / "r", model=model, polygons=False)
    with rasterio.open(res.output / "classes.tif") as ds:
        np.testing.assert_array_equal(lazy.values, ds.read(1))
        # infer on the file runs at the model's ground resolution too: the same map
        np.testing.assert_array_equal(model.infer(ortho)[0], ds.read(1))
    with rasterio.open(tmp_path / "q" / "classes.tif") as ds:
        np.testing.assert_array_equal(model.infer(ortho, gsd="off")[0], ds.read(1))


@pytest.mark.parametrize("d", [4, 7])
def test_decimated_reads_average_each_cell_and_its_valid_pixels(tmp_path, d):
    """Cells of d x d pixels, the last row and column partial (1003 x 871 px): each the mean of its valid pixels."""
    data = np.maximum(smooth_image((3, 1003, 871), seed=4), 1)  # 0 only where nodata (GDAL's is per band)
    data[:, :45, :] = 0  # nodata rows, ending inside a row of cells
    data[:, 500:, 860:] = 0  # and a strip ending inside the partial last column of cells
    path = write_raster(tmp_path / "n.tif", data, nodata=0)
    h, w = -(-1003 // d), -(-871 // d)
    got, ok = RasterSource(str(path), (1, 2, 3), decimation=d).read(slice(0, h), slice(0, w))
    f = np.where((data != 0).any(axis=0), data.astype(np.float64), np.nan)
    f = np.pad(f, ((0, 0), (0, h * d - 1003), (0, w * d - 871)), constant_values=np.nan)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        ref = np.nanmean(f.reshape(3, h, d, w, d), axis=(2, 4))
    np.testing.assert_array_equal(ok, np.isfinite(ref[0]))
    assert np.abs(got[:, ok] - ref[:, ok]).max() <= 0.5  # GDAL rounds the mean to the raster's integer type
    # a window inside the raster reads the same cells
    part, ok2 = RasterSource(str(path), (1, 2, 3), decimation=d).read(slice(3, h), slice(5, w))
    np.testing.assert_array_equal(part, got[:, 3:, 5:])
    np.testing.assert_array_equal(ok2, ok[3:, 5:])


def test_raster_source_and_dask_source_agree_on_nodata(tmp_path):
    from geoseg.engine.lazy import valid_mask

    data = smooth_image((3, 50, 60), seed=1)
    data[:, :10, :10] = 0
    data[0, 20:30, 20:30] = 0  # one band at nodata only: still valid (GDAL's dataset mask)
    path = write_raster(tmp_path / "n.tif", data, nodata=0)
    _, ok = RasterSource(str(path), (1, 2, 3)).read(slice(0, 50), slice(0, 60))
    np.testing.assert_array_equal(ok, valid_mask(data, 0))


def test_device_engine_resumes_to_the_same_classes(tmp_path, yolo_checkpoint, monkeypatch):
    """Interrupted after two blocks, resumed: frontier blocks run again for their strips only."""
    monkeypatch.setattr("geoseg.workflow.plan.DEVICE_BLOCK", 256)
    data = smooth_image((3, 1100, 1000), seed=14)
    data[:, 600:, :300] = 0  # a nodata corner: blocks with nothing to run
    path = write_raster(tmp_path / "s.tif", data, nodata=0)
    opts = dict(model=yolo_checkpoint, device="cpu", engine="device", tile_size=64, polygons=False, batch_size=8)

    def boom(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        geoseg.predict(path, tmp_path / "x", progress=boom, **opts)
    resumed = geoseg.predict(path, tmp_path / "x", resume=True, **opts)
    full = geoseg.predict(path, tmp_path / "y", **opts)
    assert (resumed.output / "classes.tif").read_bytes() == (full.output / "classes.tif").read_bytes()


def test_run_options_travel_without_their_window():
    """Cluster tasks carry the options: the blending window (megabytes at large tiles) is made again there."""
    import pickle

    from geoseg.engine.options import RunOptions

    opts = RunOptions(1862, 232, "hann", 4, False, None)
    window = opts.window()
    data = pickle.dumps(opts)
    assert len(data) < 2000 < window.nbytes
    back = pickle.loads(data)
    assert back == opts and np.array_equal(back.window(), window)


def test_segment_takes_band_names_and_says_what_a_2d_array_lacks(cnn_model):
    import xarray as xr

    img = smooth_image((4, 96, 96), seed=2)
    x = xr.DataArray(img, dims=("band", "y", "x"), attrs={"long_name": ("blue", "green", "red", "nir")})
    by_name = geoseg.segment(x, cnn_model, bands=["red", "green", "blue"], tile_size=64, overlap=16).values
    by_index = geoseg.segment(x, cnn_model, bands=[3, 2, 1], tile_size=64, overlap=16).values
    np.testing.assert_array_equal(by_name, by_index)
    with pytest.raises(geoseg.GeosegError, match="no band named 'swir'"):
        geoseg.segment(x, cnn_model, bands=["swir", "green", "blue"])
    with pytest.raises(geoseg.GeosegError, match="the input has 1 bands but model"):
        geoseg.segment(img[0], cnn_model)  # a 2-D array is one band
