"""GPU benchmark: the model alone, then ``geoseg predict`` on the device-resident engine.

    python benchmarks/bench_gpu.py [--sizes 8192 16384] [--batch-size 64] [--precision fp16] [--engine blocks]

Needs only the package, torch with CUDA and a GPU (rasterio for reading;
no ../shared: the scene is a VRT mosaic of ``data/scenes/field-ortho.tif``).
Prints one markdown table:

* model-only tiles/s: the built-in model's forward passes on device-resident
  batches (the same precision and channels_last as predict), after warm-up;
* predict inference tiles/s (blocks only) and whole-run MPix/s (read to
  COG), each ``geoseg predict --no-polygons`` run in a fresh process;
* the child's peak RSS (``ru_maxrss``) and the bytes that crossed
  host <-> device per run (from ``run.json``).

Target on an H100/H200-class card: inference >= 0.5 x model-only tiles/s,
whole run >= 250 MPix/s at 16384².
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "data" / "scenes" / "field-ortho.tif"
sys.path.insert(0, str(Path(__file__).parent))


def model_only(batch: int, precision: str, device: str, seconds: float = 5.0) -> float:
    import torch

    import geoseg

    model = geoseg.load_model("geoseg-landcover-n", device=device, precision=precision).backend
    t = model.card.tile_size
    x = torch.rand(batch, model.card.in_channels, t, t, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(5):
            model.forward_tensor(x)
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.forward_tensor(x)
            n += batch
        sync()
    return n / (time.perf_counter() - t0)


def predict_run(vrt: Path, out: Path, batch: int, precision: str, device: str, engine: str) -> dict:
    cmd = [sys.executable, "-m", "geoseg", "predict", str(vrt), "-o", str(out), "--bands", "1,2,3",
           "--no-polygons", "--gsd", "off", "--device", device, "--engine", engine, "--batch-size", str(batch),
           "--precision", precision, "--overwrite", "-q"]
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"predict failed:\n{p.stderr[-3000:]}")
    rss = int(p.stderr.strip().splitlines()[-1].split()[-1]) / 1024
    run = json.loads((out / "run.json").read_text())
    return {"wall": wall, "rss": rss, "run": run}


def main() -> None:
    from common import mosaic_vrt

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--device", default="cuda", help="cpu only to check this script without a GPU")
    ap.add_argument("--engine", default="device", choices=["device", "blocks"],
                    help="blocks: the host-blending engine, for comparison")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA GPU")
    card_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU (script check only)"
    mo = model_only(args.batch_size, args.precision, args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            vrt = mosaic_vrt(SCENE, Path(tmp) / f"mosaic-{size}.vrt", size, [1, 2, 3])
            r = predict_run(vrt, Path(tmp) / f"out-{size}", args.batch_size, args.precision, args.device,
                            args.engine)
            run = r["run"]
            tiles = run["counts"]["tiles_run"]
            infer_s = run["timings"]["inference_s"]
            tr = run.get("transfers", {})
            rows.append({"size": f"{size}²", "model-only tiles/s": mo, "predict tiles/s": tiles / infer_s,
                         "ratio": tiles / infer_s / mo, "whole run MPix/s": size * size / 1e6 / r["wall"],
                         "in-process MPix/s": size * size / 1e6 / run["timings"]["total_s"],
                         "setup s": run["timings"]["setup_s"], "inference s": infer_s,
                         "COG s": run["timings"]["cog_s"], "wall s": r["wall"],
                         "peak RSS MiB": r["rss"], "H2D MiB": tr.get("h2d_bytes", 0) / 2**20,
                         "D2H MiB": tr.get("d2h_bytes", 0) / 2**20, "engine": run["options"]["engine"],
                         "blocks": run["counts"]["blocks"],
                         "phases s": {**tr.get("seconds", {}), **{f"{k} (writers)": v for k, v in
                                                                   run.get("block_writes_s", {}).items()}}})
    print(f"\n{card_name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.precision}, built-in geoseg-landcover-n, 512² tiles\n")
    phases = [(row["size"], row.pop("phases s")) for row in rows]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    for size, p in phases:  # the device engine's driver thread: where its time went
        if p:
            print(f"\n{size} driver phases (s): " + ", ".join(f"{k} {v:.3g}" for k, v in p.items()))


if __name__ == "__main__":
    main()
