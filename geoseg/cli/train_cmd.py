"""``geoseg train``, ``geoseg val`` and ``geoseg export``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .main import one_line_errors


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue the run in the recipe's output folder.")
@one_line_errors
def train(recipe: Path, overrides: tuple[str, ...], resume: bool) -> None:
    """Train a model from RECIPE (YAML); override keys with key.path=value."""
    from ..config import load_recipe
    from ..train.loop import train as run
    from ..train.recipe import Recipe

    # paths given on the command line are where the user stands, not beside the recipe
    overrides = tuple(_from_cwd(o) for o in overrides)
    r = load_recipe(Recipe, recipe, list(overrides))
    summary = run(r, recipe_dir=recipe.resolve().parent, resume=resume, log=click.echo)
    click.echo(json.dumps(summary, indent=2))


#: recipe keys that hold paths: given on the command line, they are relative to where you stand
PATH_KEYS = ("train.output", "model.init", "data.dataset", "data.extra_datasets")


def _from_cwd(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep or key.strip() not in PATH_KEYS or not value.strip():
        return override
    if value.strip().startswith("["):  # a list of paths, in YAML
        import yaml

        items = yaml.safe_load(value)
        if isinstance(items, list):
            return f"{key}={json.dumps([_here(str(v)) for v in items])}"
        return override
    return f"{key}={_here(value)}"


def _here(path: str) -> str:
    return path if Path(path).is_absolute() or path in ("null", "~") else str(Path.cwd() / path)


@click.command()
@click.option("-m", "--model", required=True, help="Model name or path.")
@click.option("--card", type=click.Path(dir_okay=False, path_type=Path), help="Model card YAML.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), help="Dataset YAML.")
@click.option("--split", default="val", show_default=True, help="Dataset split to evaluate.")
@click.option("--scene", type=click.Path(dir_okay=False, path_type=Path), help="A raster to evaluate.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path),
              help="With --scene: label raster on the scene's grid, or vector labels.")
@click.option("--class-field", help="With vector --reference: the class attribute.")
@click.option("--label-map", help="With --reference: VALUE=CLASS pairs, e.g. Hydro=water,Train=255 "
              "[default: ids, or values matched to class names].")
@click.option("--tile-size", type=int)
@click.option("--overlap", type=int)
@click.option("--tta", default="none", show_default=True, type=click.Choice(["none", "flips", "d4"]),
              help="Test-time augmentation, as predict's: logits averaged over flips or all 8 dihedral transforms.")
@click.option("--device", default="auto", show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write metrics.json, confusion.csv and confusion.png here.")
@one_line_errors
def val(model: str, card: Path | None, data: Path | None, split: str, scene: Path | None,
        reference: Path | None, class_field: str | None, label_map: str | None, tile_size: int | None,
        overlap: int | None, tta: str, device: str, output: Path | None) -> None:
    """Per-class IoU, mIoU and pixel accuracy, measured through the predict engine."""
    from rich.console import Console
    from rich.table import Table

    from ..errors import ConfigError
    from ..models.loading import load_model
    from ..train.data import load_dataset_spec
    from ..train.evaluate import evaluate_dataset, evaluate_scene

    net = load_model(model, card=card, device=device)
    names = list(net.card.classes)
    if scene is not None:
        mapping: dict[str, str | int] = {}
        for pair in (label_map or "").split(","):
            if pair.strip():
                if "=" not in pair:
                    raise ConfigError(f"--label-map entry {pair!r} is not VALUE=CLASS; e.g. Hydro=water")
                k, v = pair.split("=", 1)
                mapping[k.strip()] = v.strip()
        cm = evaluate_scene(net, scene, reference, class_field=class_field, label_mapping=mapping,
                            tile=tile_size, overlap=overlap, tta=tta)
    elif data is not None:
        cm = evaluate_dataset(net, load_dataset_spec(data), split, tile=tile_size, overlap=overlap, tta=tta)
    else:
        raise ConfigError("nothing to evaluate; give --data D.yaml (with --split) or --scene S.tif --reference R")
    summary = cm.summary(names)
    table = Table(title=f"mIoU {summary['miou']:.4f}   pixel accuracy {summary['pixel_accuracy']:.4f}")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("in ground truth", justify="center")
    for n in names:
        v = summary["iou"][n]
        table.add_row(n, "-" if v is None else f"{v:.4f}", "yes" if n in summary["present"] else "no")
    Console().print(table)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps(summary, indent=2))
        cm.to_csv(output / "confusion.csv", names)
        cm.to_png(output / "confusion.png", names)


@click.command()
@click.option("-m", "--model", required=True, help="Model name or .safetensors path.")
@click.option("--card", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx",
              show_default=True, help="onnx (geoseg predict runs it) or torchscript (for torch.jit.load elsewhere).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@one_line_errors
def export(model: str, card: Path | None, fmt: str, output: Path) -> None:
    """Export logits [B, K, H, W] with dynamic batch and size, card beside it."""
    from ..models.loading import load_model
    from ..train.export import export_model

    path = export_model(load_model(model, card=card, device="cpu", runtime="torch"), output, fmt)
    click.echo(f"wrote {path} and {path.with_suffix('.yaml')}")
