"""``infer``: classes and confidence of an image that fits in memory."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from ..errors import BandCountError, ConfigError
from ..geometry.grid import Grid
from ..io.raster import data_bands, open_raster
from ..models.backends import torch_threads_kept
from .adapters import GroundResolutionWarning, adapt
from .blocks import as_runnable, predict_array
from .lazy import valid_mask
from .options import Tiling, resolve


def infer(model: Any, image: Any, *, tile_size: int | None = None, overlap: int | None = None,
          blend: Any = "hann", margin: int | None = None, batch_size: int = 4, gsd: str | float = "auto",
          tta: str = "none", bands: list[int] | None = None) -> tuple[Any, Any]:
    """Class map (H, W) uint8 and confidence (H, W) float32 for an in-memory image.

    ``image`` is a (C, H, W) array of raw values (scaled by the card), a
    (band, y, x) ``xarray.DataArray`` — then both results are DataArrays on
    its grid, see :func:`geoseg.segment` — or a path to a raster small
    enough to hold in memory; use :func:`geoseg.predict` for scenes of any
    size. Pixels marked nodata (GDAL's mask, or NaN) get class 255 and
    confidence -1. ``gsd`` and ``tta`` are predict's: a raster file or a
    georeferenced DataArray is run at the model's ground resolution, as
    ``geoseg predict`` runs it (same map); a bare array has no ground
    resolution and is run as it is. ``bands`` are 1-based indexes of the
    image's bands to use (default: all; for a file, all but alpha).
    """
    net = as_runnable(model)
    if _is_dataarray(image):
        return _infer_lazy(net, image, None, tile_size=tile_size, overlap=overlap, blend=blend, margin=margin,
                           batch_size=batch_size, gsd=gsd, tta=tta, bands=bands)
    valid = None
    if isinstance(image, (str, Path)):
        with open_raster(image) as src:
            arr = src.read(_pick(bands, src.count) or data_bands(src))
            valid = src.dataset_mask() > 0
            grid = Grid.from_rio(src)
    elif isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[None]
        arr = arr[[b - 1 for b in _pick(bands, arr.shape[0])]] if bands else arr
        grid = None
    else:
        raise ConfigError(f"infer takes a (C, H, W) array, a DataArray or a raster path, not {type(image).__name__}")
    card = net.card
    _check_layout(arr, card)
    _check_range(arr, card)
    if arr.dtype.kind == "f":
        finite = valid_mask(arr, None)
        valid = finite if valid is None else valid & finite
    asked = Tiling(tile_size, overlap, blend, margin, gsd, tta)
    runner, tiling, info = adapt(net, asked, grid or Grid(arr.shape[1:], Affine.identity(), None))
    if grid is not None and info["ratio"] is not None:
        # resampled to the model's ground resolution (after d x d cells where it is far coarser): as
        # predict reads it, which the lazy engine does for an in-memory array
        import rioxarray  # noqa: F401 - the .rio accessor
        import xarray as xr

        x = xr.DataArray(arr, dims=("band", "y", "x")).rio.write_crs(grid.crs).rio.write_transform(grid.transform)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GroundResolutionWarning)  # adapt() above has said it once
            classes, conf = _infer_lazy(net, x, valid, tile_size=tile_size, overlap=overlap, blend=blend,
                                        margin=margin, batch_size=batch_size, gsd=gsd, tta=tta)
        return classes.values, conf.values
    layout, opts = resolve(runner.card, arr.shape[1:], tiling, batch_size=batch_size, confidence=True)
    with torch_threads_kept():
        out = predict_array(arr, runner, opts, valid=valid)
    assert out.confidence is not None
    return out.classes, out.confidence


def _pick(bands: list[int] | None, count: int) -> list[int]:
    bad = [b for b in bands or [] if not 1 <= b <= count]
    if bad:
        raise ConfigError(f"band {bad[0]} does not exist; the image has bands 1..{count}")
    return list(bands or [])


def _infer_lazy(net: Any, x: Any, mask: Any, **options: Any) -> tuple[Any, Any]:
    from .lazy import segment

    ds = segment(x, net, mask=mask, confidence=True, **options)
    with torch_threads_kept():
        ds = ds.compute(scheduler="sync")
    return ds["classes"], ds["confidence"]


def _is_dataarray(x: Any) -> bool:
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a dependency
        return False
    return isinstance(x, xr.DataArray)


def _check_layout(arr: np.ndarray, card: Any) -> None:
    c = card.in_channels
    if arr.shape[0] == c:
        return
    if arr.ndim == 3 and arr.shape[-1] == c:
        raise BandCountError(
            f"image has shape {arr.shape}, which looks like (H, W, C); model {card.name!r} takes (C, H, W) "
            f"with C={c}: pass image.transpose(2, 0, 1)"
        )
    raise BandCountError(f"image has {arr.shape[0]} bands, model {card.name!r} expects {c}")


def _check_range(arr: np.ndarray, card: Any) -> None:
    """Warn when float input in [0, 1] meets a card that scales 0-255 values (a common slip)."""
    if arr.dtype.kind != "f" or card.input_scale >= 0.5 or arr.size == 0:
        return
    finite = arr[np.isfinite(arr)]
    if finite.size and float(finite.max()) <= 1.0:
        warnings.warn(
            f"the image's values are within 0..1 but model {card.name!r} scales its input by "
            f"{card.input_scale:g} (it expects raw values such as 0..255); multiply the image by "
            f"{1 / card.input_scale:g}",
            UserWarning, stacklevel=3,
        )
