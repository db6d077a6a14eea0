"""Predict-engine benchmarks; prints markdown tables for docs/benchmarks.md.

    python benchmarks/bench_predict.py overhead   # (a) end-to-end vs model-only throughput
    python benchmarks/bench_predict.py efficiency # whole predict process vs the best model-only config, 4k^2
    python benchmarks/bench_predict.py memory     # (b) peak RSS, 2k^2 vs 16k^2 real-imagery mosaics
    python benchmarks/bench_predict.py ukis       # (c) vs ukis-csmask's own tiled inference, 8k^2

Needs ../shared (real imagery, the ukis-csmask ONNX model); (c) needs
``pip install ukis-csmask``. Figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from common import OUT, REPO, SHARED, machine, mosaic_vrt, need, run_measured, table

DRONE = SHARED / "data" / "drone" / "dummy_fotomap_small.tif"
LANDSAT = SHARED / "data" / "landsat" / "L7_ETMs.tif"
UKIS = SHARED / "models" / "ukis-csmask" / "model_6b_l1c.onnx"
UKIS_CARD = REPO / "data" / "cards" / "ukis-csmask-6b-l1c.yaml"
OVERHEAD_SIZE = 8192
SIZES = (2048, 16384)  # memory: the smallest and the largest scene


def yolo_checkpoint() -> Path:
    """geoseg-n-sem with seeded random weights (speed and memory do not depend on training)."""
    import torch
    from safetensors.torch import save_file

    from geoseg.models.card import ModelCard
    from geoseg.models.registry import create_model

    path = OUT / "geoseg-n-sem-bench.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        m = create_model("geoseg-n-sem", num_classes=5, in_channels=3)
        OUT.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
        ModelCard(name="geoseg-n-sem-bench", classes=("a", "b", "c", "d", "e"), in_channels=3,
                  input_scale=1 / 255, mean=(0.5,) * 3, std=(0.25,) * 3, tile_size=512,
                  pad_multiple=32, architecture="geoseg-n-sem").save(path.with_suffix(".yaml"))
    return path


def model_only(model, batches: list[np.ndarray], streams: int) -> float:
    """Seconds for the forward passes alone over ``batches``, ``streams`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    t = time.perf_counter()
    with ThreadPoolExecutor(streams) as ex:
        list(ex.map(model, batches))
    return time.perf_counter() - t


def overhead() -> None:
    """(a) Wall time of geoseg.predict vs the model's forward passes alone on the same tiles.

    Two model-only references: the backend run as predict runs it (its CPU
    streams in parallel, each on cores/streams threads) — the strict one,
    which isolates the engine's overhead — and torch/ONNX Runtime's default
    (one forward at a time on every core), which is what a plain loop over
    the tiles gets.
    """
    import geoseg
    from geoseg.geometry.grid import Grid, Layout
    from geoseg.io.raster import RasterSource

    rows = []
    cases = [
        ("geoseg-n-sem (torch), RGB drone mosaic", need(DRONE), [1, 2, 3], yolo_checkpoint(), None, 512, 64),
        ("ukis-csmask U-Net (ONNX), Landsat mosaic", need(LANDSAT), None, need(UKIS), UKIS_CARD, 256, 64),
    ]
    for label, src, bands, model_path, card, tile, overlap in cases:
        with rasterio.open(src) as ds:
            nb = bands or list(ds.indexes)
        scene = mosaic_vrt(src, OUT / f"overhead-{src.stem}-{OVERHEAD_SIZE}.vrt", OVERHEAD_SIZE, nb)
        bs = 4
        model = geoseg.load_model(model_path, card=card, device="cpu")
        single = geoseg.load_model(model_path, card=card, device="cpu", streams=1)
        # The same tiles, already in memory, normalised and batched.
        with rasterio.open(scene) as ds:
            grid = Grid.from_rio(ds)
        layout = Layout.create(grid, tile=tile, overlap=overlap, pad_multiple=model.card.pad_multiple)
        source = RasterSource(str(scene), tuple(nb))
        # Batched as predict batches them: each block's tiles, bs at a time.
        batches = []
        for i, j in layout.iter_blocks():
            rr, cc = layout.block_extent(i, j)
            data, _ = source.read(rr, cc)
            x = model.card.normalize(data)
            tiles = [x[:, r - rr.start : r - rr.start + tile, c - cc.start : c - cc.start + tile]
                     for r, c in layout.block_tiles(i, j)]
            batches += [np.stack(tiles[k : k + bs]) for k in range(0, len(tiles), bs)]
        # the engine only: polygons and area statistics are benchmarked on their own
        kw = dict(model=model, tile_size=tile, overlap=overlap, batch_size=bs, overwrite=True, polygons=False)
        geoseg.predict(scene, OUT / "warmup", **kw)  # warm caches and threads
        # interleaved, so drift on this shared machine hits all three alike
        res = geoseg.predict(scene, OUT / "overhead", **kw)
        fwd = model_only(model, batches, model.streams)
        fwd_default = model_only(single, batches, 1)
        infer = res.timings["inference_s"]
        e2e = infer + res.timings["cog_s"] + res.timings["setup_s"]
        mpix = res.pixels / 1e6
        rows.append({
            f"model, scene ({OVERHEAD_SIZE}²)": label, "tiles": sum(len(b) for b in batches),
            "model-only s (1 stream)": fwd_default, f"model-only s ({model.streams} streams)": fwd,
            "predict s (tiles→blocks)": infer, "predict s (incl. COG)": e2e, "MPix/s": mpix / e2e,
            "ratio (blocks)": fwd / infer, "ratio (incl. COG)": fwd / e2e,
            "ratio vs 1 stream (incl. COG)": fwd_default / e2e,
        })
        assert rows[-1]["tiles"] == res.tiles_run
        del batches
    print(table(rows))


def efficiency(rounds: int = 2) -> None:
    """The whole ``geoseg predict`` process, default options, vs the best model-only throughput.

    4096² mosaics; the reference is the faster of the runtime's default
    threading (one forward at a time on every core) and one single-threaded
    stream per core, over the same tiles already in memory: ONNX Runtime
    for an ONNX model; torch (the reference the target names) and ONNX
    Runtime (what predict runs on CPU) for a torch checkpoint. predict runs
    once first so its one-time stream calibration is cached, as on any
    machine after the first run. The references and the predict runs are
    interleaved over ``rounds`` rounds and each keeps its best, so drift on
    a shared machine hits them alike; predict's memory is not sampled while
    it is timed (see :func:`common.run_measured`).
    """
    import geoseg
    from geoseg.geometry.grid import Grid, Layout
    from geoseg.io.raster import RasterSource
    from geoseg.models.backends import available_cores

    size, cores, rows = 4096, available_cores(), []
    cases = [
        ("ukis-csmask U-Net (ONNX), Landsat", need(LANDSAT), None, need(UKIS), UKIS_CARD, 256, 64),
        ("geoseg-n-sem (torch), drone RGB", need(DRONE), [1, 2, 3], yolo_checkpoint(), None, 512, 64),
    ]
    for label, src, bands, model_path, card, tile, overlap in cases:
        with rasterio.open(src) as ds:
            nb = bands or list(ds.indexes)
        scene = mosaic_vrt(src, OUT / f"eff-{src.stem}-{size}.vrt", size, nb)
        cmd = [sys.executable, "-m", "geoseg", "predict", str(scene), "-o", str(OUT / "eff"), "--model",
               str(model_path), *(["--card", str(card)] if card else []), "--tile-size", str(tile), "--overlap",
               str(overlap), "--bands", ",".join(map(str, nb)), "--device", "cpu", "--overwrite", "-q"]
        run_measured(cmd, sample=False)  # calibrates once (cached)
        m = geoseg.load_model(model_path, card=card, device="cpu")
        with rasterio.open(scene) as ds:
            grid = Grid.from_rio(ds)
        layout = Layout.create(grid, tile=tile, overlap=overlap, pad_multiple=m.card.pad_multiple)
        source, batches = RasterSource(str(scene), tuple(nb)), []
        for i, j in layout.iter_blocks():
            rr, cc = layout.block_extent(i, j)
            x = m.card.normalize(source.read(rr, cc)[0])
            tiles = [x[:, r - rr.start : r - rr.start + tile, c - cc.start : c - cc.start + tile]
                     for r, c in layout.block_tiles(i, j)]
            batches += [np.stack(tiles[k : k + 4]) for k in range(0, len(tiles), 4)]
        del m
        ntiles = sum(len(b) for b in batches)
        # a torch checkpoint is measured in torch (the reference) and in ONNX Runtime (what predict runs)
        runtimes = ("onnx",) if model_path.suffix == ".onnx" else ("torch", "onnx")
        ref = {(rt, n): 0.0 for rt in runtimes for n in (1, cores)}
        walls = {"default outputs": (np.inf, 0.0), "no polygons": (np.inf, 0.0)}
        for _ in range(rounds):
            for rt, n in ref:
                m = geoseg.load_model(model_path, card=card, device="cpu", streams=n, runtime=rt)
                m(batches[0])  # warm up
                ref[rt, n] = max(ref[rt, n], ntiles / model_only(m, batches, n))
                del m  # no idle runtime threads of this process beside the predict runs
                gc.collect()
            for extra, what in (([], "default outputs"), (["--no-polygons"], "no polygons")):
                wall, rss = run_measured([*cmd, *extra], sample=False)
                walls[what] = min(walls[what], (wall, rss))
        best = {rt: max(ref[rt, 1], ref[rt, cores]) for rt in runtimes}
        for what, (wall, rss) in walls.items():
            row = {"model, 4096² mosaic": label, "predict": what, "tiles": ntiles}
            for rt in ("torch", "onnx"):
                row[f"{rt} model-only tiles/s (1 / {cores} streams)"] = (
                    f"{ref[rt, 1]:.1f} / {ref[rt, cores]:.1f}" if rt in best else "")
            rows.append({**row, "predict wall s": wall, "predict tiles/s (whole process)": ntiles / wall,
                         "ratio vs best torch": ntiles / wall / best["torch"] if "torch" in best else "",
                         "ratio vs best ONNX Runtime": ntiles / wall / best["onnx"],
                         "peak RSS MiB (largest process)": rss})
        del batches
    print(table(rows))


def memory() -> None:
    """(b) Peak RSS of `geoseg predict` on 2k² and 16k² mosaics of a real orthophoto.

    "engine": tiles -> blended blocks -> classes.tif COG (``--no-polygons``),
    with seeded random geoseg-n-sem weights. "full": every default output
    (polygons, statistics) with the built-in land-cover model, whose map of
    real imagery is realistic (random weights give a salt-and-pepper map that
    no one would vectorize).
    """
    from geoseg.models.loading import builtin_models

    runs = [("engine", ["--model", str(yolo_checkpoint()), "--no-polygons"])]
    if "geoseg-landcover-n" in builtin_models():
        runs.append(("full", ["--model", "geoseg-landcover-n"]))  # default options: the model at its own GSD
        # --gsd off: the map of the 2 cm mosaic at 2 cm, so that polygons are as dense as they get
        runs.append(("full, --gsd off", ["--model", "geoseg-landcover-n", "--gsd", "off"]))
    rows = []
    for label, extra in runs:
        first = None
        for size in SIZES:
            scene = mosaic_vrt(need(DRONE), OUT / f"drone-{size}.vrt", size, [1, 2, 3])
            wall, rss = run_measured([sys.executable, "-m", "geoseg", "predict", str(scene), "-o",
                                      str(OUT / f"mem-{label}-{size}"), *extra, "--device", "cpu",
                                      "--overwrite", "-q"])
            row = {"outputs": label, "scene": f"{size}² ({size * size / 1e6:.0f} MPix)", "wall s": wall,
                   "MPix/s": size * size / 1e6 / wall, "peak RSS MiB": rss}
            rows.append(row)
            first = first or row
        rows.append({"outputs": label, "scene": "ratio largest / smallest",
                     "wall s": rows[-1]["wall s"] / first["wall s"], "MPix/s": "",
                     "peak RSS MiB": rows[-1]["peak RSS MiB"] / first["peak RSS MiB"]})
    print(table(rows))


def ukis() -> None:
    """(c) The same ONNX model: ukis-csmask's tiled inference vs geoseg predict, 8k² Landsat mosaic."""
    size, overlap_px, batch = 8192, 64, 4
    scene = mosaic_vrt(need(LANDSAT), OUT / f"landsat-{size}.vrt", size, [1, 2, 3, 4, 5, 6])
    peer_out = OUT / "ukis-classes.npy"
    w_peer, rss_peer = run_measured([sys.executable, str(Path(__file__).with_name("ukis_peer.py")),
                                     str(scene), str(peer_out), str(overlap_px / 256), str(batch)])
    w_ours, rss_ours = run_measured([sys.executable, "-m", "geoseg", "predict", str(scene), "-o",
                                     str(OUT / "ukis-geoseg"), "--model", str(need(UKIS)), "--card",
                                     str(UKIS_CARD), "--overlap", str(overlap_px), "--batch-size",
                                     str(batch), "--device", "cpu", "--overwrite", "-q"])
    with rasterio.open(OUT / "ukis-geoseg" / "classes.tif") as ds:
        ours = ds.read(1)
    peer = np.load(peer_out)
    agree = float((ours == peer).mean())
    mpix = size * size / 1e6
    rows = [
        {"tool": "ukis-csmask 1.0.0 (tile 256, overlap 64, batch 4)", "wall s": w_peer,
         "MPix/s": mpix / w_peer, "peak RSS MiB": rss_peer},
        {"tool": "geoseg predict (tile 256, overlap 64, batch 4)", "wall s": w_ours,
         "MPix/s": mpix / w_ours, "peak RSS MiB": rss_ours},
        {"tool": "geoseg / ukis", "wall s": w_ours / w_peer, "MPix/s": w_peer / w_ours,
         "peak RSS MiB": rss_ours / rss_peer},
    ]
    print(table(rows))
    print(f"\npixel agreement: {100 * agree:.3f} % of {ours.size:,} pixels")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["overhead", "efficiency", "memory", "ukis", "all"])
    which = ap.parse_args().which
    print(f"machine: {machine()}\n")
    for name, fn in (("overhead", overhead), ("efficiency", efficiency), ("memory", memory), ("ukis", ukis)):
        if which in (name, "all"):
            print(f"## {name}\n")
            fn()
            print()
