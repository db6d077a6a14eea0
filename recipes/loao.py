"""Leave-one-area-out: how well a recipe generalises to Dubai areas it has never seen.

    python recipes/loao.py recipes/dubai-n.yaml --out runs/loao [--epochs 20] [--tta d4] [key=value ...]
    python recipes/loao.py recipes/dubai-n-all.yaml --then recipes/dubai-n-all-finetune.yaml --out runs/loao
    python recipes/loao.py recipes/dubai-n.yaml --out runs/loao --jobs 3 --dubai DIR   # folds side by side

For each of the six Dubai areas (tile_1, 2, 4, 5, 7, 8) a model is trained
with the recipe on the other five and evaluated on the left-out one through
the predict engine (the last checkpoint: no area is used to pick one, so
nothing leaks). Prints a markdown table of each fold's mIoU, pixel
accuracy and per-class IoU, their mean, and writes ``loao.json``. Extra
``key=value`` arguments override the recipe, as with ``geoseg train``.
With ``--scale-norm`` every area is first resampled to a common scale:
the Dubai images carry no ground resolution, so each area's is estimated
from the median side of its buildings in the masks (the square root of the
median building area, in pixels), and each area is resampled by
``REFERENCE_BUILDING / side`` (within 0.5-2), for training and, as
``predict --gsd`` would run a georeferenced scene, for evaluation. The
left-out area's factor comes from its own masks: a stand-in for the ground
resolution a georeferenced scene carries, so such a study measures the model
with the scale known. Runs that finished are reused, so an interrupted study continues, and
``--tta flips|d4`` evaluates a finished study's models again with test-time
augmentation (``geoseg val --tta``) without training them again. With
``--then RECIPE`` each fold's model is fine-tuned by a second recipe (from
the first's last weights, on the same five areas) and that is what is
scored; the first stage's runs are reused from an earlier study in ``--out``.
``--jobs N`` trains N folds at once (on a GPU machine; on a CPU give each
its share of the cores with ``OMP_NUM_THREADS``), each fold's training output
then in ``AREA/train.log``; ``--dubai DIR`` reads the dataset from elsewhere
than the shared data beside the repository (a copy brought to another machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

AREAS = ["tile_1", "tile_2", "tile_4", "tile_5", "tile_7", "tile_8"]
DUBAI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dubai"
NAMES = {0: "building", 1: "land", 2: "road", 3: "vegetation", 4: "water"}


REFERENCE_BUILDING = 40.0  # px: about the median over the six areas (22 to 81 px)


def area_scales(dubai: Path) -> dict[str, float]:
    """Per-area resampling factors that bring the median building side to REFERENCE_BUILDING pixels."""
    import numpy as np
    import rasterio.features
    from shapely.geometry import shape

    from geoseg.train.data import read_image

    out = {}
    for area in AREAS:
        areas: list[float] = []
        for mask_file in sorted((dubai / "masks").glob(f"{area}_*.png")):
            building = (read_image(mask_file)[0] == 0).astype(np.uint8)
            for geom, _ in rasterio.features.shapes(building, mask=building > 0, connectivity=4):
                if (a := shape(geom).area) >= 20:  # a building, not a stray pixel of the mask
                    areas.append(a)
        side = float(np.sqrt(np.median(areas)))
        out[f"{area}_*"] = round(min(2.0, max(0.5, REFERENCE_BUILDING / side)), 3)
    return out


def fold_dataset(area: str, folder: Path, scales: dict[str, float] | None = None, dubai: Path = DUBAI) -> Path:
    spec = {"path": str(dubai), "train": [f"images/{a}_*.jpg" for a in AREAS if a != area],
            "test": f"images/{area}_*.jpg", "masks_dir": "masks", "names": NAMES, "label_mapping": {5: 255},
            "channels": 3, **({"scales": scales} if scales else {})}
    path = folder / f"without-{area}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def study_tag(then: Path | None, tta: str) -> str:
    """What tells a study's files apart: its second recipe and its test-time augmentation."""
    return ("" if then is None else f"-then-{then.stem}") + ("" if tta == "none" else f"-tta-{tta}")


def train_once(recipe: Path, data: Path, run: Path, args: list[str], log: Path | None = None) -> Path:
    """The last weights of ``recipe`` trained on ``data`` into ``run`` (reused when already there);
    the training's output goes to ``log`` when given."""
    weights = run / "weights" / "last.safetensors"
    if not weights.exists():
        cmd = [sys.executable, "-m", "geoseg", "train", str(recipe), f"data.dataset={data}", f"train.output={run}",
               "train.val_every=0", *args]
        with open(log, "a") if log else contextlib.nullcontext() as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT if f else None)
        if done.returncode:
            sys.exit(f"training {run} failed" + (f"; see {log}" if log else ""))
    return weights


def run_fold(recipe: Path, area: str, out: Path, epochs: int | None, overrides: list[str],
             tta: str = "none", scales: dict[str, float] | None = None, then: Path | None = None,
             dubai: Path = DUBAI, quiet: bool = False) -> dict:
    folder = out / area
    folder.mkdir(parents=True, exist_ok=True)
    data = fold_dataset(area, folder, scales, dubai)
    tag = study_tag(then, tta)
    result = folder / f"metrics{tag}.json"
    if result.exists():
        return json.loads(result.read_text())
    log = folder / "train.log" if quiet else None
    weights = train_once(recipe, data, folder / "run", [*overrides, *([f"train.epochs={epochs}"] if epochs else [])],
                         log)
    if then is not None:
        weights = train_once(then, data, folder / f"then-{then.stem}", [f"model.init={weights}"], log)
    subprocess.run([sys.executable, "-m", "geoseg", "val", "--model", str(weights), "--data", str(data),
                    "--split", "test", "--tta", tta, "-o", str(folder / f"val{tag}")], check=True,
                   stdout=subprocess.DEVNULL)
    metrics = json.loads((folder / f"val{tag}" / "metrics.json").read_text())
    result.write_text(json.dumps(metrics, indent=2))
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("runs/loao"))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--areas", nargs="+", default=AREAS)
    ap.add_argument("--scale-norm", action="store_true",
                    help="resample each area to a common scale, estimated from its building sizes")
    ap.add_argument("--then", type=Path, help="a second recipe that fine-tunes each fold's model")
    ap.add_argument("--tta", choices=["none", "flips", "d4"], default="none",
                    help="evaluate with test-time augmentation (geoseg val --tta)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="folds run at once (each fold's training output then goes to AREA/train.log)")
    ap.add_argument("--dubai", type=Path, default=DUBAI, help="the Dubai dataset (images/ and masks/)")
    args = ap.parse_intermixed_args()  # key=value overrides before or after the options
    # "--areas tile_1 key=value": argparse gives the override to --areas; it belongs with the others
    args.overrides += [a for a in args.areas if "=" in a]
    args.areas = [a for a in args.areas if "=" not in a]
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        ap.error(f"unknown area {unknown[0]!r}; the areas are {', '.join(AREAS)}")
    if not (args.dubai / "masks").exists():
        sys.exit(f"{args.dubai} is missing: the study needs the Dubai data (the shared data beside the repository, "
                 "or --dubai DIR)")
    if args.jobs < 1:
        ap.error("--jobs must be 1 or more")
    scales = None
    if args.scale_norm:
        scales = area_scales(args.dubai.resolve())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scales.json").write_text(json.dumps(scales, indent=2))
        print("resampling factors:", scales)
    then = args.then.resolve() if args.then else None

    def fold(area: str) -> dict:
        return run_fold(args.recipe.resolve(), area, args.out.resolve(), args.epochs, args.overrides, args.tta,
                        scales, then, args.dubai.resolve(), quiet=args.jobs > 1)

    with ThreadPoolExecutor(args.jobs) as pool:  # each fold is a process of its own: threads only wait
        folds = dict(zip(args.areas, pool.map(fold, args.areas)))
    names = list(NAMES.values())
    header = "| left out | mIoU | pixel acc. | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    for area, m in folds.items():
        iou = [m["iou"].get(n) for n in names]
        lines.append(f"| {area} | {m['miou']:.3f} | {m['pixel_accuracy']:.3f} | "
                     + " | ".join("-" if v is None else f"{v:.3f}" for v in iou) + " |")
    mean = {k: sum(m[k] for m in folds.values()) / len(folds) for k in ("miou", "pixel_accuracy")}
    per = [[m["iou"].get(n) for m in folds.values()] for n in names]
    per_mean = [sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals)) for vals in per]
    lines.append(f"| **mean** | **{mean['miou']:.3f}** | {mean['pixel_accuracy']:.3f} | "
                 + " | ".join(f"{v:.3f}" for v in per_mean) + " |")
    print("\n".join(lines))
    summary = args.out / f"loao{study_tag(then, args.tta)}.json"
    summary.write_text(json.dumps({"folds": folds, "mean": mean, "class_mean": dict(zip(names, per_mean))},
                                  indent=2))


if __name__ == "__main__":
    main()
