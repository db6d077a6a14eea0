"""Peak memory of ``geoseg.segment`` stored lazily, by scene size; prints a markdown table.

    python benchmarks/bench_lazy.py [--sizes 2048 16384] [--store raster|zarr]

Each size is a VRT mosaic of the drone orthophoto in ``data/scenes`` opened
with rioxarray (dask chunks of 2048²), segmented with geoseg-n-sem (seeded
random weights: memory does not depend on training) and stored with
``.rio.to_raster(..., tiled=True, lock=...)`` or ``to_zarr`` in a fresh
process; the figure is the peak RSS of that process tree (PSS summed over
the tree, or ru_maxrss, whichever is larger). Target: 16384² within 1.3x of
2048².
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, mosaic_vrt, run_measured, table

SCENE = REPO / "data" / "scenes" / "field-ortho.tif"

CHILD = f"""
import sys, threading
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import rioxarray
import geoseg
from bench_predict import yolo_checkpoint
vrt, out, store = sys.argv[1:4]
model = geoseg.load_model(str(yolo_checkpoint()), device="cpu")
x = rioxarray.open_rasterio(vrt, chunks={{"band": -1, "x": int(sys.argv[4]), "y": int(sys.argv[4])}})
classes = geoseg.segment(x, model)
if store == "zarr":
    classes.to_dataset(name="classes").to_zarr(out, mode="w")
else:
    classes.rio.to_raster(out, tiled=True, lock=threading.Lock(), compress="deflate")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--store", choices=["raster", "zarr"], default="raster")
    ap.add_argument("--chunk", type=int, default=2048, help="the input's dask chunk side")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            vrt = mosaic_vrt(SCENE, Path(tmp) / f"m{size}.vrt", size, [1, 2, 3])
            out = Path(tmp) / (f"c{size}.zarr" if args.store == "zarr" else f"c{size}.tif")
            wall, peak = run_measured([sys.executable, "-c", CHILD, str(vrt), str(out), args.store, str(args.chunk)])
            rows.append({"scene": f"{size}²", "store": args.store, "wall s": wall, "MPix/s": size * size / 1e6 / wall,
                         "peak RSS MiB": peak})
    base = rows[0]["peak RSS MiB"]
    for r in rows:
        r["vs smallest"] = r["peak RSS MiB"] / base
    print(f"\n{machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
