"""The same job on a real dask.distributed cluster (scheduler + worker processes on 127.0.0.1)."""

import json

import numpy as np
import pytest
import rasterio

import geoseg

from .conftest import smooth_image, write_raster


@pytest.mark.slow
def test_cluster_result_equals_local_result(tmp_path, yolo_checkpoint, monkeypatch):
    import dask
    from distributed import Client, LocalCluster

    from geoseg.geometry.grid import Layout

    # Blocks of about 256 px (a block target of 256 instead of 1024): a wavefront of 20 blocks in
    # bands of rows (each band one submission, its last strips carried to the next), whose
    # anti-diagonals hold up to four blocks that can run at the same time. dask first queues
    # a block on the worker holding its inputs; the other, idle worker then steals it, as blocks
    # take far longer than moving their strips (64-px tiles, each run four times with --tta flips,
    # make sure of that). The layout is made here and shipped with the tasks.
    create = Layout.create.__func__
    monkeypatch.setattr(Layout, "create", classmethod(
        lambda cls, grid, **kw: create(cls, grid, **{**kw, "block_target": 256})))
    scene = write_raster(tmp_path / "scene.tif", smooth_image((3, 960, 1440), seed=9))
    local = geoseg.predict(scene, tmp_path / "local", model=yolo_checkpoint, device="cpu", tile_size=64,
                           tta="flips", confidence=True)
    with dask.config.set({"distributed.scheduler.work-stealing-interval": "10ms"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as cluster, Client(cluster) as client:
        client.get_task_stream()  # the scheduler records every task from now on
        remote = geoseg.predict(scene, tmp_path / "cluster", model=str(yolo_checkpoint), device="cpu",
                                scheduler=cluster.scheduler_address, confidence=True, tile_size=64, tta="flips")
        stream = client.get_task_stream()
        blocks = [t for t in stream if str(t["key"]).startswith("geoseg-block-")]
        polygon_tasks = [t for t in stream if "polygonize" in str(t["key"])]
        models = client.run(lambda: len(__import__("geoseg.models.loading", fromlist=["x"])._PROCESS_CACHE))
        workers = set(client.scheduler_info()["workers"])
    assert len(blocks) == json.loads((remote.output / "run.json").read_text())["counts"]["blocks"] >= 20
    assert len(workers) == 2 and {t["worker"] for t in blocks} == workers, "both workers ran blocks"
    assert sorted(models.values()) == [1, 1], "each worker loaded the model from its path, once"
    assert polygon_tasks and {t["worker"] for t in polygon_tasks} <= workers, "polygons ran on the cluster too"
    assert (remote.output / "polygons.gpkg").exists()
    # Worker processes run torch with one thread (dask sets OMP_NUM_THREADS=1), this process with
    # all cores: convolutions then round differently in the last bits, which can flip near-ties of
    # this untrained model. Everything else must be identical.
    with rasterio.open(local.output / "classes.tif") as a, rasterio.open(remote.output / "classes.tif") as b:
        assert a.profile == b.profile
        assert (a.read() == b.read()).mean() > 0.999
    with rasterio.open(local.output / "confidence.tif") as a, rasterio.open(remote.output / "confidence.tif") as b:
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-4)
    assert remote.tiles_run == local.tiles_run


@pytest.mark.slow
def test_segment_on_a_cluster_at_the_model_gsd_with_tta(tmp_path):
    """The lazy engine's graph, resampled (d x d cells) and test-time augmented, unpickled by worker processes."""
    rioxarray = pytest.importorskip("rioxarray")
    from distributed import Client, LocalCluster

    from geoseg.models.loading import ModelSpec

    from .conftest import REPO

    ortho = REPO / "data" / "scenes" / "field-ortho.tif"
    weights = REPO / "geoseg" / "weights" / "geoseg-landcover-n.safetensors"
    spec = ModelSpec(str(weights), str(weights.with_suffix(".yaml")), device="cpu")
    res = geoseg.predict(ortho, tmp_path / "p", model="geoseg-landcover-n", device="cpu", polygons=False, tta="flips")
    with rasterio.open(res.output / "classes.tif") as ds:
        expected = ds.read(1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster):
        y = rioxarray.open_rasterio(ortho, chunks={"band": -1, "x": 512, "y": 512})
        got = geoseg.segment(y.sel(band=[1, 2, 3]), spec, mask=y.sel(band=4) > 0, tta="flips").compute().values
    assert (got == expected).mean() > 0.999  # near-ties of the flips' sums may round either way
