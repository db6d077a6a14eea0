"""``geoseg predict``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import PartialRunError
from ..io.staging import Staging
from ..workflow.predict import default_output
from .main import one_line_errors
from .options import output_options, runtime_option


def _command(flag: str) -> str:
    """This command line again, with ``flag`` instead of --resume/--restart."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--restart")]
    return shlex.join(["geoseg", *args, flag])


def _bands(value: str | None) -> list[int | str] | None:
    """``3,2,1`` or ``red,green,blue`` (names are matched to the raster's band names)."""
    if not value:
        return None
    parts = [b.strip() for b in value.split(",")]
    if any(not b for b in parts):
        raise click.BadParameter(f"{value!r} is not a comma-separated list of band numbers or names")
    return [int(b) if b.lstrip("-").isdigit() else b for b in parts]


@click.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [default: ./<SRC stem>_geoseg].")
@click.option("-m", "--model", "model", help="Built-in model name, .onnx or .safetensors path.")
@click.option("--card", type=click.Path(dir_okay=False, path_type=Path),
              help="Model card YAML [default: beside the model, same stem].")
@click.option("--tile-size", type=int, help="Tile side in pixels [default: the card's tile_size].")
@click.option("--overlap", type=int, help="Overlap between tiles in pixels [default: tile/8].")
@click.option("--blend", default="hann", show_default=True,
              help="Blending window: hann, triangular, gaussian or mean.")
@click.option("--margin", type=int,
              help="Outer tile pixels given almost no weight [default: overlap/4].")
@click.option("--batch-size", type=int, help="Tiles per forward pass [default: sized to the device].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--streams", type=click.IntRange(min=1),
              help="Forward passes run at once; on CPU each gets cores/streams threads [default on CPU: "
                   "calibrated per model and machine for scenes of 64+ tiles, else 2].")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp16", "bf16", "fp32"]), help="Autocast type on a GPU (auto: fp16).")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "blocks", "device"]),
              help="device: device-resident blocks and batches across blocks (auto: for torch models on a GPU).")
@runtime_option
@click.option("--scheduler", help="dask.distributed scheduler address [default: local threads].")
@click.option("--workers", "num_workers", type=int,
              help="Local block threads [default: CPU count + 1] and polygonizing processes [default: CPU count].")
@click.option("--bands", "bands",
              help="Bands by number (3,2,1) or name (red,green,blue) [default: the model's bands by name, "
                   "else all but alpha].")
@click.option("--gsd", default="auto", show_default=True,
              help="Run the model at its ground resolution: auto (when the scene's differs by > 1.25x), off, "
                   "or metres.")
@click.option("--tta", default="none", show_default=True, type=click.Choice(["none", "flips", "d4"]),
              help="Average the logits over flips or all 8 dihedral transforms of each tile.")
@output_options
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--resume/--restart", default=None,
              help="Continue an interrupted run into the same output from its finished blocks, or start over.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@one_line_errors
def predict(src: Path, output: Path | None, model: str | None, card: Path | None, bands: str | None,
            no_polygons: bool, quiet: bool, **options: Any) -> None:
    """Segment SRC (any GDAL raster, any size) into a class COG and friends."""
    from ..workflow.predict import predict as run
    from .report import predict_summary, progress_bar

    if model is None:
        from ..models.loading import default_model

        model = default_model()
    try:
        with progress_bar(quiet, "Predicting") as update:
            result = run(src, output, model=model, card=card, bands=_bands(bands), polygons=not no_polygons,
                         progress=update, **options)
    except PartialRunError as e:
        raise PartialRunError(f"{str(e).split(';')[0]}; continue it with: {_command('--resume')}  "
                              "(or start over with --restart)") from None
    except KeyboardInterrupt:
        out = output or default_output(src)
        if Staging(Path(out)).exists():
            click.echo(f"Interrupted; the finished blocks are kept. Continue with: {_command('--resume')}",
                       err=True)
            sys.exit(130)
        raise
    if not quiet:
        predict_summary(result)
