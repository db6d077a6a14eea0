"""Turn a trained checkpoint into a built-in model: fp16 weights + a card with held-out scores.

    python recipes/package_model.py runs/dubai-n/weights/best.safetensors \\
        --data recipes/data/dubai.yaml --split test --gsd 0.5 \\
        --gsd-note "..." --out geoseg/weights

The held-out split is evaluated through the predict engine (the same path
``geoseg val`` takes); its mIoU, pixel accuracy and per-class IoU go into
the card under ``metrics``, where ``geoseg models`` shows them. The colours
are a conventional land-cover palette.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

LANDCOVER_COLORS = {"building": "#e31a1c", "land": "#d9b77a", "road": "#8c8c8c",
                    "vegetation": "#33a02c", "water": "#1f78b4"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--gsd", type=float, required=True, help="metres per pixel of the training imagery")
    ap.add_argument("--gsd-note", default="", help="how the GSD was measured or estimated")
    ap.add_argument("--out", type=Path, default=Path("geoseg/weights"))
    ap.add_argument("--tile-size", type=int, default=512)
    args = ap.parse_args()

    from geoseg.models.checkpoint import save_model
    from geoseg.models.loading import load_model
    from geoseg.train.data import load_dataset_spec
    from geoseg.train.evaluate import evaluate_dataset

    net = load_model(args.checkpoint, device="cpu")
    card = net.card
    names = list(card.classes)
    summary = evaluate_dataset(net, load_dataset_spec(args.data), args.split, tile=args.tile_size).summary(names)
    metrics = {"dataset": str(args.data), "split": args.split, "miou": round(summary["miou"], 4),
               "pixel_accuracy": round(summary["pixel_accuracy"], 4),
               "iou": {n: (None if v is None else round(v, 4)) for n, v in summary["iou"].items()}}
    extra = dict(card.extra)
    extra["metrics"] = metrics
    extra["gsd_note"] = args.gsd_note
    if isinstance(extra.get("provenance"), dict):  # the dataset by its YAML, not a local path
        extra["provenance"] = dict(extra["provenance"], dataset=str(args.data))
    current = ["#{:02x}{:02x}{:02x}".format(*rgb) for rgb in card.palette()]
    colors = tuple(LANDCOVER_COLORS.get(n, c) for n, c in zip(names, current))
    recipe = extra.get("provenance", {}).get("recipe", {})
    extras = recipe.get("data", {}).get("extra_datasets") or []
    also = f", with {', '.join(Path(x).stem for x in extras)} mixed in" if extras else ""
    description = (f"{card.architecture} land cover ({', '.join(names)}) trained on the Dubai aerial "
                   f"imagery of MBRSC / Humans in the Loop (CC0){also}; held out: the {args.split} split "
                   f"of {args.data.name}")
    card = dataclasses.replace(card, gsd=args.gsd, colors=colors, tile_size=args.tile_size, license="Apache-2.0",
                               description=description, extra=extra)
    path = save_model(net.module, card, args.out / f"{card.name}.safetensors", half=True)
    print(f"{path}: mIoU {metrics['miou']:.4f}, pixel accuracy {metrics['pixel_accuracy']:.4f}")
    for n, v in metrics["iou"].items():
        print(f"  {n:12s} {'-' if v is None else f'{v:.4f}'}")


if __name__ == "__main__":
    main()
