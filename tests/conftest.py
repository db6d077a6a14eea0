"""Shared fixtures: tiny real-CRS rasters, small real models, the shared data folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
UKIS = SHARED / "models" / "ukis-csmask" / "model_6b_l1c.onnx"
REPO = Path(__file__).resolve().parents[1]
UKIS_CARD = REPO / "data" / "cards" / "ukis-csmask-6b-l1c.yaml"
SYSTEM_PYTHON = "/usr/bin/python3"


def shared(rel: str) -> Path:
    """A file under ../shared, or skip the test where the shared folder is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} is not available (needs the shared data folder beside the repo)")
    return p


def system_gdal_python() -> str | None:
    """Debian's python3 with GDAL's Python utilities, if installed."""
    if not Path(SYSTEM_PYTHON).exists():
        return None
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import osgeo_utils"], capture_output=True)
    return SYSTEM_PYTHON if r.returncode == 0 else None


def write_raster(path: Path, data: np.ndarray, *, crs: str = "EPSG:32633",
                 transform: Affine | None = None, nodata: float | None = None,
                 **profile) -> Path:
    """Write a (C, H, W) array as a GeoTIFF with a real CRS."""
    c, h, w = data.shape
    transform = transform or Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5400000.0)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype,
                       crs=crs, transform=transform, nodata=nodata, **profile) as ds:
        ds.write(data)
    return path


def smooth_image(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Spatially correlated uint8 imagery (box-blurred noise): edges and regions, not flat."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    x = rng.random((c, h + 16, w + 16))
    k = np.ones(9) / 9
    for axis in (1, 2):
        x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, x)
    x = x[:, 8 : 8 + h, 8 : 8 + w]
    x = (x - x.min()) / (x.max() - x.min())
    return (x * 255).astype(np.uint8)


@pytest.fixture
def rgb_raster(tmp_path: Path) -> Path:
    return write_raster(tmp_path / "scene.tif", smooth_image((3, 300, 420)))


def small_cnn(in_channels: int = 3, num_classes: int = 4, seed: int = 0):
    """A real, seeded convolutional net (receptive field 13 px) predicting at stride 2."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, num_classes, 3, padding=1),
    ).eval()


@pytest.fixture
def cnn_model():
    import geoseg
    from geoseg.models.card import ModelCard

    card = ModelCard(name="small-cnn", classes=("a", "b", "c", "d"), in_channels=3,
                     input_scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                     tile_size=64, pad_multiple=2)
    return geoseg.load_model(small_cnn(), card=card, device="cpu")


@pytest.fixture
def yolo_checkpoint(tmp_path: Path) -> Path:
    """An untrained geoseg-n-sem saved as safetensors + card (loads without pickle)."""
    import torch
    from safetensors.torch import save_file

    from geoseg.models.card import ModelCard
    from geoseg.models.registry import create_model

    torch.manual_seed(1)
    m = create_model("geoseg-n-sem", num_classes=3, in_channels=3)
    path = tmp_path / "yolo-n.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    ModelCard(name="yolo-n-test", classes=("x", "y", "z"), in_channels=3, input_scale=1 / 255,
              mean=(0.5,) * 3, std=(0.25,) * 3, tile_size=128, pad_multiple=32,
              architecture="geoseg-n-sem").save(path.with_suffix(".yaml"))
    return path


def has_qgis() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, env=env)
    return r.returncode == 0


def which(cmd: str) -> str | None:
    return shutil.which(cmd)


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory):
    """Stream calibrations made by tests stay out of the user's cache."""
    os.environ["GEOSEG_CACHE"] = str(tmp_path_factory.mktemp("geoseg-cache"))
    yield
