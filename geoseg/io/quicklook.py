"""A quicklook PNG: the class map over the image, with a legend of the classes present."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..geometry.units import NODATA
from .raster import bounded_gdal_cache
from .styles import hex_color

MAX_SIDE = 1200


def display_bands(use: Sequence[int], band_names: Sequence[str]) -> list[int]:
    """The 1-based bands to show: red, green, blue by the card's names, else the first three (or one)."""
    names = [n.lower() for n in band_names]
    if len(names) == len(use) and all(c in names for c in ("red", "green", "blue")):
        return [use[names.index(c)] for c in ("red", "green", "blue")]
    return list(use[:3]) if len(use) >= 3 else [use[0]]


def stretch(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-band 2-98 % percentile stretch to [0, 1] over the valid pixels."""
    out = np.zeros(img.shape, np.float32)
    for k in range(img.shape[0]):
        v = img[k][valid]
        if v.size == 0:
            continue
        lo, hi = np.percentile(v, (2, 98))
        out[k] = np.clip((img[k] - lo) / max(float(hi - lo), 1e-9), 0, 1)
    return out


@bounded_gdal_cache
def write_quicklook(src: str | Path, bands: Sequence[int], classes_tif: str | Path, out_png: str | Path,
                    names: Sequence[str], palette: Sequence[tuple[int, int, int]], *, nodata: int = NODATA,
                    alpha: float = 0.45, max_side: int = MAX_SIDE) -> Path:
    """Draw the classes over the image (both read at most ``max_side`` px wide, from overviews if any)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import rasterio
    from matplotlib.patches import Patch

    with rasterio.open(classes_tif) as ds:
        f = max(1.0, max(ds.height, ds.width) / max_side)
        shape = (max(1, round(ds.height / f)), max(1, round(ds.width / f)))
        cls = ds.read(1, out_shape=shape)  # nearest on the mode overviews
    with rasterio.open(src) as ds:
        img = ds.read(list(bands), out_shape=(len(bands), *shape), resampling=rasterio.enums.Resampling.average)
        valid = ds.read_masks(bands[0], out_shape=shape) > 0
    rgb = stretch(img.astype(np.float32), valid & (cls != nodata))
    rgb = np.repeat(rgb, 3, axis=0) if rgb.shape[0] == 1 else rgb
    rgb = np.moveaxis(rgb, 0, -1)
    lut = np.zeros((256, 3), np.float32)
    lut[: len(palette)] = np.asarray(palette, np.float32) / 255
    labelled = cls != nodata
    rgb[labelled] = (1 - alpha) * rgb[labelled] + alpha * lut[cls[labelled]]
    rgb[~valid] = 1.0

    present = [int(c) for c in np.unique(cls[labelled]) if c < len(names)]
    h, w = shape
    fig = plt.figure(figsize=(w / 100 + 2.2, max(h / 100, 2.5)), dpi=100)
    ax = fig.add_axes((0, 0, w / 100 / (w / 100 + 2.2), 1))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    fig.legend(handles=[Patch(color=hex_color(palette[c]), label=names[c]) for c in present],
               loc="center right", frameon=False, fontsize=10)
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.stem}.part.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
