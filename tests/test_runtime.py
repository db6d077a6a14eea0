"""Torch checkpoints on ONNX Runtime: the cached export, the fallback, and what run.json says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import geoseg
from geoseg.errors import ConfigError, ModelCardError
from geoseg.models.backends import OnnxBackend, TorchBackend
from geoseg.models.onnx_runtime import cache_dir


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
    return cache_dir()


def test_checkpoint_runs_on_onnx_runtime_with_torch_logits(yolo_checkpoint, fresh_cache):
    onnx = geoseg.load_model(yolo_checkpoint, device="cpu").backend
    torch_ = geoseg.load_model(yolo_checkpoint, device="cpu", runtime="torch").backend
    assert isinstance(onnx, OnnxBackend) and isinstance(torch_, TorchBackend)
    assert [p.name for p in fresh_cache.glob("*.onnx")] == [onnx.path.name]
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 160)).astype(np.float32)  # not the traced size
    a, b = onnx(x), torch_(x)
    assert a.shape == b.shape == (2, 3, 96, 160)  # full resolution: the stride-8 head upsampled in the graph
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.999


def test_export_is_made_once_and_follows_the_weights(yolo_checkpoint, fresh_cache):
    first = geoseg.load_model(yolo_checkpoint, device="cpu").backend.path
    inode = first.stat().st_ino
    assert geoseg.load_model(yolo_checkpoint, device="cpu").backend.path == first
    assert first.stat().st_ino == inode  # a cache hit: not exported again (an export replaces the file)
    # retrained weights at the same path: a new export
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(yolo_checkpoint))
    key = next(k for k, v in state.items() if v.dtype == torch.float32 and v.ndim == 4)
    state[key] = state[key] * 0.5
    save_file(state, str(yolo_checkpoint))
    second = geoseg.load_model(yolo_checkpoint, device="cpu").backend.path
    assert second != first and second.exists()


def test_cache_hit_never_imports_torch(yolo_checkpoint, fresh_cache):
    geoseg.load_model(yolo_checkpoint, device="cpu")  # export once
    code = (
        "import sys, numpy as np\n"
        "from geoseg.models.loading import load_model\n"
        f"m = load_model({str(yolo_checkpoint)!r}, device='auto')\n"
        "from geoseg.engine.blend import accumulate\n"
        "y = m(np.zeros((1, 3, 64, 64), np.float32))\n"
        "acc = np.zeros((4, 64, 64), np.float32)\n"
        "accumulate(acc, y[0], np.ones((64, 64), np.float32), 0, 0)\n"
        "print(type(m).__name__, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "GEOSEG_CACHE": str(fresh_cache.parent)}
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        pytest.skip("a GPU is visible: auto runs torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["OnnxBackend", "False"]


def test_unwritable_cache_falls_back_to_torch_or_fails_when_onnx_is_asked(yolo_checkpoint, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GEOSEG_CACHE", str(blocker))  # cache folder under a file: cannot be made
    net = geoseg.load_model(yolo_checkpoint, device="cpu").backend
    assert isinstance(net, TorchBackend)
    assert "no ONNX export" in net.runtime_note and "ran in torch" in net.runtime_note
    with pytest.raises(ConfigError, match="--runtime torch"):
        geoseg.load_model(yolo_checkpoint, device="cpu", runtime="onnx")


def test_card_mismatch_is_reported_whatever_the_runtime(yolo_checkpoint, fresh_cache):
    from dataclasses import replace

    from geoseg.models.card import ModelCard

    bad = yolo_checkpoint.with_name("bad.yaml")
    replace(ModelCard.load(yolo_checkpoint.with_suffix(".yaml")), classes=("x", "y")).save(bad)
    with pytest.raises(ModelCardError, match="class"):
        geoseg.load_model(yolo_checkpoint, card=bad, device="cpu")


def test_predict_records_the_runtime_and_device_engine_keeps_torch(yolo_checkpoint, rgb_raster, tmp_path,
                                                                   fresh_cache):
    opts = dict(model=yolo_checkpoint, device="cpu", tile_size=128, polygons=False)
    geoseg.predict(rgb_raster, tmp_path / "a", **opts)
    rt = json.loads((tmp_path / "a" / "run.json").read_text())["options"]["runtime"]
    assert rt["name"] == "onnxruntime" and rt["export_of"] == str(yolo_checkpoint)
    geoseg.predict(rgb_raster, tmp_path / "b", runtime="torch", **opts)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["options"]["runtime"] == {"name": "torch"}
    geoseg.predict(rgb_raster, tmp_path / "c", engine="device", **opts)
    run = json.loads((tmp_path / "c" / "run.json").read_text())["options"]
    assert run["engine"] == "device" and run["runtime"]["name"] == "torch"
    import rasterio

    with rasterio.open(tmp_path / "a" / "classes.tif") as a, rasterio.open(tmp_path / "b" / "classes.tif") as b:
        agree = (a.read(1) == b.read(1)).mean()
    assert agree > 0.999  # the same model in two runtimes: float rounding may flip a near-tie


def test_numpy_accumulate_matches_torch(monkeypatch):
    from geoseg.engine.blend import accumulate

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 32, 32)).astype(np.float32)
    window = rng.random((32, 32)).astype(np.float32) + 0.1
    with_torch = np.ones((4, 50, 60), np.float32)
    accumulate(with_torch, logits, window, 5, 7)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    plain = np.ones((4, 50, 60), np.float32)
    accumulate(plain, logits, window, 5, 7)
    np.testing.assert_allclose(plain, with_torch, rtol=1e-6, atol=1e-6)
    assert plain[:, :5].sum() == 4 * 5 * 60  # outside the tile: untouched


def test_cache_keeps_the_most_recently_used_exports(tmp_path):
    import time

    from geoseg.models.onnx_runtime import prune

    files = []
    for k in range(5):
        f = tmp_path / f"m-{k}.onnx"
        f.write_bytes(b"x")
        os.utime(f, (time.time() - 100 + k, time.time() - 100 + k))
        files.append(f)
    os.utime(files[0])  # used just now
    (tmp_path / "notes.txt").write_text("not an export")
    stale, live = tmp_path / ".m-9.onnx.abc.tmp", tmp_path / ".m-8.onnx.def.tmp"  # partial exports
    for f in (stale, live):
        f.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 3600, time.time() - 2 * 3600))  # left by a killed process
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m-8.onnx.def.tmp", "m-0.onnx", "m-4.onnx", "notes.txt"]


def test_threads_loading_one_checkpoint_share_one_export(yolo_checkpoint, fresh_cache):
    """Worker threads that load the same checkpoint at once all get ONNX Runtime over one export."""
    from concurrent.futures import ThreadPoolExecutor

    from geoseg.models import loading

    spec = loading.ModelSpec(str(yolo_checkpoint), device="cpu")
    with ThreadPoolExecutor(4) as pool:
        direct = list(pool.map(lambda _: spec.load(), range(3)))  # each thread its own load
    loading._PROCESS_CACHE.pop(spec, None)
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(lambda _: loading.cached_model(spec), range(4)))
    loading._PROCESS_CACHE.pop(spec, None)
    assert all(isinstance(b, OnnxBackend) for b in direct + shared)
    assert len({b.path for b in direct + shared}) == 1
    assert len({id(b) for b in shared}) == 1  # one model per process and spec
    assert [p.name for p in fresh_cache.iterdir()] == [direct[0].path.name]  # no partial file left


def test_a_broken_cached_export_is_made_again(yolo_checkpoint, fresh_cache):
    path = geoseg.load_model(yolo_checkpoint, device="cpu").backend.path
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by whoever shares the cache, as usual
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])  # truncated (a full disk, say)
    again = geoseg.load_model(yolo_checkpoint, device="cpu").backend
    assert isinstance(again, OnnxBackend) and again.path == path and path.read_bytes() == whole


def test_gpu_batch_without_cuda_torch_comes_from_nvml_or_a_fixed_size(monkeypatch):
    """An ONNX model on onnxruntime-gpu beside a CPU build of torch: torch cannot say how much memory is free."""
    import sys
    import types

    import torch

    from geoseg.models.backends import UNKNOWN_GPU_BATCH, auto_batch_size

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert auto_batch_size("cuda", 512, 3) == UNKNOWN_GPU_BATCH

    class NVMLError(Exception):
        pass

    free = {0: 2 * 2**30, 1: 8 * 2**30, 2: 2 * 2**30, 3: 4 * 2**30}  # bytes free, by PCI bus order
    nvml = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 4,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(free=free[h]))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    per_tile = 512 * 512 * 6000
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert auto_batch_size("cuda:1", 512, 3) == (8 * 2**30 // 2) // per_tile  # the second visible: bus device 1
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    # CUDA's default order (fastest first) need not be the bus order: the least free of the visible devices
    assert auto_batch_size("cuda:1", 512, 3) == (4 * 2**30 // 2) // per_tile
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0e3a")
    assert auto_batch_size("cuda", 512, 3) == UNKNOWN_GPU_BATCH
