"""``geoseg batch`` with 1 vs 2 local worker processes (one thread each); prints a markdown table.

    python benchmarks/bench_batch.py                  # 16 crops of data/scenes/field-ortho.tif, 420 x 300 px
    python benchmarks/bench_batch.py --scenes 64 --size 600

Each scene is a crop of the real drone orthophoto shipped in the repo, at
its own ground resolution (``--gsd off``, 256-px tiles); polygons are left
out so the figures are about scheduling and inference. For each worker
count the table gives the wall time of the whole command (cluster start and
job outputs included), the time of the scene phase alone (first scene
submitted to last scene finished, from ``batch.json``), its speed-up over
one worker, and the client process's peak RSS (``VmHWM``: the workers are
other processes and are not counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import rasterio
from common import OUT, REPO, machine, table
from rasterio.windows import Window

ORTHO = REPO / "data" / "scenes" / "field-ortho.tif"
GEOSEG = Path(sys.executable).with_name("geoseg")


def make_scenes(n: int, size: int, folder: Path) -> Path:
    """``n`` crops of the orthophoto (size x ~0.7 size px), each moved to a place of its own; a .txt list."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(ORTHO) as ds:
        w, h = min(size, ds.width), min(int(size * 0.7), ds.height)
        for k in range(n):
            c0 = (k * 97) % (ds.width - w + 1)
            r0 = (k * 61) % (ds.height - h + 1)
            win = Window(c0, r0, w, h)
            t = ds.window_transform(win)
            prof = {**ds.profile, "width": w, "height": h,  # side by side, apart: a mosaic of distinct scenes
                    "transform": rasterio.Affine(t.a, t.b, t.c + k * 2 * w * t.a, t.d, t.e, t.f)}
            path = folder / f"s{k:03d}.tif"
            with rasterio.open(path, "w", **prof) as out:
                out.write(ds.read(window=win))
            paths.append(path)
    listing = folder / "scenes.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    return listing


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(listing: Path, out: Path, workers: int) -> dict[str, object]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh job: a rerun would skip the scenes already done
    cmd = [str(GEOSEG), "batch", str(listing), "-o", str(out), "--workers", str(workers),
           "--threads-per-worker", "1", "--device", "cpu", "--gsd", "off", "--tile-size", "256",
           "--no-polygons", "--overwrite", "-q"]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while p.poll() is None:
        peak = max(peak, peak_rss_mib(p.pid) or 0.0)
        time.sleep(0.05)
    wall = time.perf_counter() - t
    _, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"batch failed: {' '.join(cmd)}\n{err[-2000:]}")
    scenes = json.loads((out / "batch.json").read_text())["scenes"]
    first = min(datetime.fromisoformat(s["timings"]["submitted"]) for s in scenes)
    last = max(datetime.fromisoformat(s["timings"]["finished"]) for s in scenes)
    mpix = sum(s["pixels"] for s in scenes) / 1e6
    phase = (last - first).total_seconds()
    return {"workers": workers, "scenes": len(scenes), "MPix": mpix, "wall s": wall, "scene phase s": phase,
            "MPix/s": mpix / phase, "client peak RSS MiB": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--size", type=int, default=420, help="scene width in pixels (height: 0.7 x)")
    args = ap.parse_args()
    root = OUT / "batch"
    listing = make_scenes(args.scenes, args.size, root / "scenes")
    rows = [run(listing, root / f"out-{n}", n) for n in (1, 2)]
    for r in rows:
        r["speed-up"] = rows[0]["scene phase s"] / r["scene phase s"]
    print(f"geoseg batch, {args.scenes} scenes of {args.size} px, geoseg-landcover-n on CPU; {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
