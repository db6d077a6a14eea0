"""Vectorizing benchmark: geoseg's block-wise polygons vs whole-raster polygonizing.

    python benchmarks/bench_vectorize.py [--dense] [SIZE ...]     (default: 8192 16384)

The class raster is a mosaic of the Dubai land-cover masks (real class maps,
5 classes + unlabeled as nodata), georeferenced in UTM at 0.5 m. With
``--dense`` it is a mosaic of a Landsat strata map instead: the NDVI of
``../shared/data/landsat/L7_ETMs.tif`` in five quantile classes, each
Landsat pixel 3 x 3 output pixels (about 95 pixels per polygon, 700k
polygons on 8192²), the kind of map where polygon count, not area, sets
the cost. The peer is
the usual recipe: read the whole raster, ``rasterio.features.shapes`` with a
mask, a GeoDataFrame, one ``to_file`` (GPKG). Each run is its own process;
peak RSS counts geoseg's worker processes too. Equal polygon counts show
that the block-wise merge rebuilt every region.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import OUT, SHARED, machine, need, run_measured, table

MASKS = SHARED / "data" / "dubai" / "masks"
LANDSAT = SHARED / "data" / "landsat" / "L7_ETMs.tif"


def strata_mosaic(size: int) -> Path:
    """A size x size mosaic of a five-class NDVI strata map of a Landsat scene (dense polygons)."""
    import numpy as np
    import rasterio
    from affine import Affine

    dst = OUT / f"strata-classes-{size}.tif"
    if dst.exists():
        return dst
    with rasterio.open(need(LANDSAT)) as ds:
        red, nir = ds.read(3).astype(np.float64), ds.read(4).astype(np.float64)
    ndvi = (nir - red) / (nir + red + 1e-6)
    strata = np.digitize(ndvi, np.quantile(ndvi, [0.2, 0.4, 0.6, 0.8])).astype(np.uint8)
    tile = np.kron(strata, np.ones((3, 3), np.uint8))
    reps = (-(-size // tile.shape[0]), -(-size // tile.shape[1]))
    mosaic = np.tile(tile, reps)[:size, :size]
    OUT.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                       crs="EPSG:32640", transform=Affine(10, 0, 300000, 0, -10, 2800000), nodata=255,
                       tiled=True, blockxsize=512, blockysize=512, compress="DEFLATE") as ds:
        ds.write(mosaic, 1)
    return dst


def class_mosaic(size: int) -> Path:
    """A size x size GeoTIFF mosaic of the real Dubai class masks (tiled, DEFLATE)."""
    import rasterio
    from affine import Affine

    dst = OUT / f"dubai-classes-{size}.tif"
    if dst.exists():
        return dst
    masks = [rasterio.open(p).read(1) for p in sorted(need(MASKS).glob("*.png"))]
    OUT.mkdir(parents=True, exist_ok=True)
    prof = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32640",
                transform=Affine(0.5, 0, 300000, 0, -0.5, 2800000), nodata=255, tiled=True,
                blockxsize=512, blockysize=512, compress="DEFLATE")
    k = 0
    with rasterio.open(dst, "w", **prof) as ds:
        r = 0
        while r < size:
            c, row_h = 0, 0
            while c < size:
                m = masks[k % len(masks)].copy()
                k += 1
                m[m == 5] = 255
                h, w = min(m.shape[0], size - r), min(m.shape[1], size - c)
                ds.write(m[:h, :w], 1, window=((r, r + h), (c, c + w)))
                c += w
                row_h = max(row_h, h)
            r += row_h
    return dst


PEER = """
import sys, geopandas as gpd, numpy as np, rasterio
from rasterio import features
from shapely.geometry import shape
with rasterio.open(sys.argv[1]) as ds:
    a, t, crs = ds.read(1), ds.transform, ds.crs
geoms, vals = [], []
for g, v in features.shapes(a, mask=a != 255, transform=t):
    geoms.append(shape(g)); vals.append(int(v))
gdf = gpd.GeoDataFrame({"class_id": np.array(vals, np.int32)}, geometry=geoms, crs=crs)
gdf.to_file(sys.argv[2], driver="GPKG", layer="landcover")
print(len(gdf))
"""


def _count(path: Path) -> int:
    import pyogrio

    return int(pyogrio.read_info(path, layer="landcover")["features"])


def main(sizes: list[int], dense: bool = False) -> None:
    print(f"machine: {machine()}\n")
    rows = []
    for size in sizes:
        src = strata_mosaic(size) if dense else class_mosaic(size)
        peer_out = OUT / f"peer-{size}.gpkg"
        peer_out.unlink(missing_ok=True)
        w_peer, rss_peer = run_measured([sys.executable, "-c", PEER, str(src), str(peer_out)])
        rows.append({"scene": f"{size}²", "method": "whole raster: shapes + GeoDataFrame + to_file",
                     "polygons": _count(peer_out), "s": w_peer, "speed-up": 1.0, "peak RSS MiB": rss_peer})
        for workers in (1, 2):
            out = OUT / f"geoseg-{size}-{workers}.gpkg"
            w, rss = run_measured([sys.executable, "-m", "geoseg", "vectorize", str(src), "-o", str(out),
                                   "--workers", str(workers), "--overwrite"])
            rows.append({"scene": f"{size}²", "method": f"geoseg vectorize, {workers} worker(s)",
                         "polygons": _count(out), "s": w, "speed-up": w_peer / w, "peak RSS MiB": rss})
    print(table(rows))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--dense"]
    main([int(s) for s in args] or [8192, 16384], dense="--dense" in sys.argv[1:])
