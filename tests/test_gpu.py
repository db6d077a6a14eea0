"""The device-resident engine on a real CUDA GPU (skipped without one).

Run by hand where a GPU is present: ``pytest -m gpu``. On a GPU the forward
pass differs from the CPU's in the last bits (other convolution kernels,
fp16 autocast), so these tests compare classes by agreement, and bit-exact
only where the arithmetic is the same (fp32, batches of different sizes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine

import geoseg
from geoseg.engine.device import run_on_device
from geoseg.engine.options import RunOptions
from geoseg.geometry.grid import Grid, Layout

from .conftest import small_cnn, smooth_image, write_raster
from .test_engine import CountingBackend, _ArraySourceWithMask, _image_with_nodata, _reference, _size

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32 in fp32 convolutions, so fp32 on the GPU is close to the CPU's."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _cuda_model(cnn_model, precision="fp32"):
    return geoseg.load_model(small_cnn(), card=cnn_model.card, device="cuda", precision=precision)


def _run(model, img, valid, batch_size, confidence=True, graph=None):
    layout = Layout.create(Grid(img.shape[1:], Affine.identity()), tile=64, overlap=16,
                           pad_multiple=model.card.pad_multiple, block_target=96)
    opts = RunOptions(layout.tile, layout.overlap, "hann", batch_size, confidence)
    out = np.full(img.shape[1:], 254, np.uint8)
    conf = np.zeros(img.shape[1:], np.float32)
    counting = CountingBackend(model.backend)

    def sink(ij, blk):
        rows, cols = layout.block_slices(*ij)
        out[rows, cols] = blk.classes
        if confidence:
            conf[rows, cols] = blk.confidence

    stats = run_on_device(_ArraySourceWithMask(img, valid), counting, layout, opts, sink, graph=graph)
    return out, conf, stats, layout


def test_cuda_fp32_equals_cpu_predict_array(cnn_model):
    img, valid = _image_with_nodata()
    ref = _reference(cnn_model.backend, img, valid, 64, 16, confidence=True)
    out, conf, stats, layout = _run(_cuda_model(cnn_model), img, valid, 16)
    assert (out == ref.classes).mean() > 0.9999
    np.testing.assert_allclose(conf, ref.confidence, atol=1e-4)
    assert stats.tiles == ref.tiles_run
    # one batch shape on CUDA: the last batch is padded, and padding never reaches the map
    assert stats.padded_tiles == stats.batches * 16 - stats.tiles
    assert stats.d2h_bytes == sum(5 * _size(layout, ij) + 2049 for ij in layout.iter_blocks())


def test_cuda_batches_across_blocks_change_no_pixel(cnn_model):
    img, valid = _image_with_nodata(seed=9)
    model = _cuda_model(cnn_model)
    torch.backends.cudnn.deterministic = True
    try:
        a = _run(model, img, valid, 1)[:2]
        b = _run(model, img, valid, 7)[:2]
    finally:
        torch.backends.cudnn.deterministic = False
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replay_equals_eager(cnn_model, precision):
    img, valid = _image_with_nodata(seed=5)
    model = _cuda_model(cnn_model, precision)
    eager = _run(model, img, valid, 16, graph=False)
    graphed = _run(model, img, valid, 16, graph=True)
    assert graphed[2].cuda_graph and not eager[2].cuda_graph
    np.testing.assert_array_equal(graphed[0], eager[0])
    np.testing.assert_allclose(graphed[1], eager[1], atol=1e-6)


class _Uncapturable(torch.nn.Module):
    """A model with a data-dependent op (boolean-mask indexing syncs with the host): no CUDA graph."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, x):
        y = self.net(x)
        return y + 0 * y[y > 1e30].sum()


def test_uncapturable_model_falls_back_to_eager_with_the_same_classes(cnn_model):
    img, valid = _image_with_nodata(seed=6)
    model = geoseg.load_model(_Uncapturable(), card=cnn_model.card, device="cuda", precision="fp32")
    graphed = _run(model, img, valid, 16)  # capture attempted, fails, eager from then on
    eager = _run(model, img, valid, 16, graph=False)
    assert not graphed[2].cuda_graph
    np.testing.assert_array_equal(graphed[0], eager[0])
    np.testing.assert_allclose(graphed[1], eager[1], atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graph_on_the_second_gpu_equals_eager(cnn_model):
    img, valid = _image_with_nodata(seed=7)
    model = geoseg.load_model(small_cnn(), card=cnn_model.card, device="cuda:1", precision="fp32")
    graphed, eager = _run(model, img, valid, 16), _run(model, img, valid, 16, graph=False)
    assert graphed[2].cuda_graph
    np.testing.assert_array_equal(graphed[0], eager[0])


def test_cuda_fp16_agrees_with_fp32(cnn_model):
    img, valid = _image_with_nodata(seed=2)
    a = _run(_cuda_model(cnn_model, "fp32"), img, valid, 16, confidence=False)[0]
    b = _run(_cuda_model(cnn_model, "fp16"), img, valid, 16, confidence=False)[0]
    assert (a == b).mean() > 0.995
    assert (b[~valid] == 255).all()


def test_predict_on_cuda_picks_the_device_engine(tmp_path, yolo_checkpoint, monkeypatch):
    monkeypatch.setattr("geoseg.workflow.plan.DEVICE_BLOCK", 256)  # several blocks on a small scene
    path = write_raster(tmp_path / "s.tif", smooth_image((3, 900, 780), seed=8))
    cpu = geoseg.predict(path, tmp_path / "cpu", model=yolo_checkpoint, device="cpu", engine="blocks",
                         polygons=False, tile_size=128, tta="d4")
    gpu = geoseg.predict(path, tmp_path / "gpu", model=yolo_checkpoint, device="cuda", polygons=False,
                         tile_size=128, precision="fp32", tta="d4")
    run = json.loads((gpu.output / "run.json").read_text())
    assert run["options"]["engine"] == "device"
    assert run["transfers"]["d2h_bytes"] == 900 * 780 + 2049 * run["counts"]["blocks"]
    assert run["transfers"]["cuda_graph"]
    assert run["transfers"]["tiles"] == run["counts"]["tiles_run"]
    with rasterio.open(cpu.output / "classes.tif") as a, rasterio.open(gpu.output / "classes.tif") as b:
        x, y = a.read(1), b.read(1)
    assert (x == y).mean() > 0.99


def test_builtin_model_on_cuda_fp16_agrees_with_cpu():
    img = smooth_image((3, 700, 700), seed=3)
    cpu, _ = geoseg.infer(img, geoseg.load_model("geoseg-landcover-n", device="cpu"))
    gpu, _ = geoseg.infer(img, geoseg.load_model("geoseg-landcover-n", device="cuda", precision="fp16"))
    assert (cpu == gpu).mean() > 0.99
