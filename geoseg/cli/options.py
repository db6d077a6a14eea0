"""Options shared by ``geoseg predict`` and ``geoseg batch``, defined once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_OUTPUTS = [
    click.option("--confidence", is_flag=True, help="Also write confidence.tif (max softmax)."),
    click.option("--no-polygons", is_flag=True, help="Skip the polygon layer."),
    click.option("--min-area", type=float, help="Sieve regions smaller than this (m²) from the map."),
    click.option("--simplify", type=float, help="Simplify polygons (coverage-wise) by this many metres."),
    click.option("--vector-format", default="gpkg", show_default=True, help="gpkg, geojson, parquet or fgb."),
    click.option("--zones", type=click.Path(dir_okay=False, path_type=Path),
                 help="Polygons for per-zone class areas in stats.csv."),
    click.option("--zone-field", help="Zone name attribute."),
    click.option("--quicklook", is_flag=True, help="Also write quicklook.png: the classes over the image."),
]


def output_options(fn: F) -> F:
    """The outputs besides classes.tif, as options (the keywords of ``geoseg.workflow.plan.Outputs``)."""
    for option in reversed(_OUTPUTS):
        fn = option(fn)
    return fn


runtime_option = click.option(
    "--runtime", default="auto", show_default=True, type=click.Choice(["auto", "torch", "onnx"]),
    help="How a .safetensors model runs: onnx (a cached ONNX export on ONNX Runtime), torch, or auto "
         "(onnx on CPU, torch on a GPU).")
