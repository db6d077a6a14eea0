"""The same job on a real dask.distributed cluster (scheduler + worker processes on 127.0.0.1)."""

import numpy as np
import pytest
import rasterio

import geoseg

from .conftest import smooth_image, write_raster


@pytest.mark.slow
def test_cluster_result_equals_local_result(tmp_path, yolo_checkpoint):
    from distributed import Client, LocalCluster

    scene = write_raster(tmp_path / "scene.tif", smooth_image((3, 520, 610), seed=9))
    local = geoseg.predict(scene, tmp_path / "local", model=yolo_checkpoint, device="cpu",
                           confidence=True)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        remote = geoseg.predict(scene, tmp_path / "cluster", model=str(yolo_checkpoint), device="cpu",
                                scheduler=cluster.scheduler_address, confidence=True)
        with Client(cluster) as client:
            # both workers took part: each one loaded the model from its path
            logs = client.run(lambda: len(__import__("geoseg.models.loading", fromlist=["x"])._PROCESS_CACHE))
            assert sum(logs.values()) >= 1
    # Worker processes run torch with one thread (dask sets OMP_NUM_THREADS=1), this process with
    # all cores: convolutions then round differently in the last bits, which can flip near-ties of
    # this untrained model. Everything else must be identical.
    with rasterio.open(local.output / "classes.tif") as a, rasterio.open(remote.output / "classes.tif") as b:
        assert a.profile == b.profile
        assert (a.read() == b.read()).mean() > 0.999
    with rasterio.open(local.output / "confidence.tif") as a, rasterio.open(remote.output / "confidence.tif") as b:
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-4)
    assert remote.tiles_run == local.tiles_run
