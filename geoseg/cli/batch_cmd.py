"""``geoseg batch``: many scenes in one job on a dask.distributed cluster.

A command of its own rather than ``geoseg predict`` with many inputs: its
output is a folder of scene folders plus the job's own outputs (manifest,
mosaic, combined stats and polygons, STAC catalog), a failed scene does not
stop the others, and its exit status says whether every scene succeeded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .main import one_line_errors
from .options import output_options, runtime_option
from .predict_cmd import _bands


def _progress(quiet: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("Batch"), BarColumn(), TextColumn("{task.fields[scenes]} scenes"),
                    TextColumn("{task.fields[mpix]} MPix"), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=True, disable=quiet)


def _summary_table(result: Any, console: Any, limit: int = 25) -> None:
    from rich.table import Table

    rows = result.failed + [s for s in result.scenes if s["status"] == "done"]
    table = Table(title=f"Scenes ({len(result.scenes)})")
    for col in ("scene", "status", "attempts", "MPix", "s", "note"):
        table.add_column(col, justify="right" if col in ("attempts", "MPix", "s") else "left")
    for s in rows[:limit]:
        secs = (s.get("timings") or {}).get("seconds")
        note = s.get("error") or ("already complete" if s.get("reused") else
                                  "continued" if s.get("resumed") else "")
        table.add_row(s["id"], s["status"], str(s.get("attempts", 0)),
                      f"{(s.get('pixels') or 0) / 1e6:.2f}", f"{secs:.1f}" if secs else "-", note)
    if len(rows) > limit:
        table.add_row(f"… {len(rows) - limit} more", "", "", "", "", "see batch.json")
    console.print(table)


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", "root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Job folder: one folder per scene, batch.json, mosaic, stats, polygons, catalog.json.")
@click.option("-m", "--model", "model", help="Built-in model name, .onnx or .safetensors path.")
@click.option("--card", type=click.Path(dir_okay=False, path_type=Path),
              help="Model card YAML [default: beside the model, same stem].")
@click.option("--asset", help="STAC asset key to read [default: the asset with role 'data'].")
@click.option("--scheduler", help="dask scheduler address, e.g. tcp://host:8786 [default: a local cluster].")
@click.option("--workers", type=click.IntRange(min=1),
              help="Local worker processes [default: one per GPU with --device cuda, else cores/threads].")
@click.option("--threads-per-worker", default=1, show_default=True, type=click.IntRange(min=1),
              help="Scenes one local worker runs at once.")
@click.option("--retries", default=2, show_default=True, type=click.IntRange(min=0),
              help="Times a failed scene is tried again.")
@click.option("--large-scene", type=click.IntRange(min=1), default=16384 * 16384, show_default=True,
              help="Scenes with more pixels run from here, their blocks spread over the workers.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds without any worker after which the job stops.")
@click.option("--tile-size", type=int, help="Tile side in pixels [default: the card's tile_size].")
@click.option("--overlap", type=int, help="Overlap between tiles in pixels [default: tile/8].")
@click.option("--blend", default="hann", show_default=True, help="Blending window: hann, triangular, gaussian or mean.")
@click.option("--margin", type=int, help="Outer tile pixels given almost no weight [default: overlap/4].")
@click.option("--gsd", default="auto", show_default=True,
              help="Ground resolution to run the model at: auto (the card's gsd), off, or metres.")
@click.option("--tta", default="none", show_default=True, type=click.Choice(["none", "flips", "d4"]),
              help="Test-time augmentation: average over flips or all 8 dihedral transforms.")
@click.option("--batch-size", type=int, help="Tiles per forward pass [default: sized to the device].")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu or cuda (cuda: each task takes one GPU resource of its worker).")
@click.option("--streams", type=click.IntRange(min=1),
              help="Forward passes at once per worker [default: the node's cores shared among its workers].")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp16", "bf16", "fp32"]), help="Autocast type on a GPU (auto: fp16).")
@runtime_option
@click.option("--bands", "bands", help="Bands by number (3,2,1) or name (red,green,blue) [default: by name, else all].")
@output_options
@click.option("--overwrite", is_flag=True, help="Replace outputs of scenes that are not from this job.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@one_line_errors
def batch(sources: tuple[str, ...], root: Path, model: str | None, card: Path | None, asset: str | None,
          scheduler: str | None, workers: int | None, threads_per_worker: int, retries: int, large_scene: int,
          timeout: float, bands: str | None, no_polygons: bool, quiet: bool, **options: Any) -> None:
    """Segment many scenes (paths, globs, .txt lists, STAC JSON) into OUTPUT/<scene>/ on a dask cluster.

    Scenes whose outputs are complete are skipped on a rerun; interrupted
    and failed ones run again. Exit status 0 only when every scene succeeded.
    """
    from rich.console import Console

    from ..workflow.batch import Cluster, run_batch

    if model is None:
        from ..models.loading import default_model

        model = default_model()
    cluster = Cluster(scheduler, workers, threads_per_worker, retries, large_scene, timeout)
    console = Console()
    with _progress(quiet) as bar:
        task = bar.add_task("batch", total=None, scenes="0/?", mpix="0/?")

        def update(done: int, total: int, px: int, px_total: int) -> None:
            bar.update(task, completed=px, total=px_total or None, scenes=f"{done}/{total}",
                       mpix=f"{px / 1e6:.1f}/{px_total / 1e6:.1f}")

        def connected(link: str | None) -> None:
            if not quiet:
                bar.console.print(f"Dashboard: {link}" if link else
                                  "Dashboard: not available (install bokeh to get one)")
        try:
            result = run_batch(sources, root, model=model, card=card, asset=asset, cluster=cluster,
                               progress=update, on_connect=connected, bands=_bands(bands),
                               polygons=not no_polygons, **options)
        except KeyboardInterrupt:
            click.echo(f"Interrupted; finished scenes are kept in {root}: run the same command again to continue.",
                       err=True)
            sys.exit(130)
    if not quiet:
        _summary_table(result, console)
        if result.outputs:
            console.print(f"Job outputs in {result.root}: {', '.join(sorted(result.outputs))}")
    if not result.ok:
        click.echo(f"Error: {result.summary()}", err=True)
        sys.exit(1)
    if not quiet:
        console.print(result.summary())
