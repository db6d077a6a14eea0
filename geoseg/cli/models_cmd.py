"""``geoseg models``: the built-in models."""

from __future__ import annotations

import click

from .main import one_line_errors


@click.command()
@one_line_errors
def models() -> None:
    """List the built-in models with their classes, bands, GSD and held-out scores."""
    from rich.console import Console
    from rich.table import Table

    from ..models.card import ModelCard
    from ..models.loading import builtin_models

    found = builtin_models()
    if not found:
        click.echo("No built-in models are installed; pass --model PATH to a .onnx or .safetensors model.")
        return
    table = Table(title="Built-in models")
    for col in ("name", "classes", "bands", "GSD (m)", "held-out mIoU"):
        table.add_column(col)
    for name, path in found.items():
        c = ModelCard.load(path)
        score = c.extra.get("metrics", {}).get("miou") if isinstance(c.extra.get("metrics"), dict) else None
        table.add_row(name, ", ".join(c.classes), ", ".join(c.bands or [str(c.in_channels)]),
                      f"{c.gsd:g}" if c.gsd else "-", f"{score:.3f}" if score is not None else "-")
    Console().print(table)
