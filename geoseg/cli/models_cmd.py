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
    table = Table(title="Built-in models (GSD: ground resolution trained at; mIoU, acc.: held-out)")
    table.add_column("name", overflow="fold", max_width=14)
    for col in ("classes", "bands", "GSD m", "range m", "mIoU", "acc."):
        table.add_column(col, no_wrap=col not in ("classes", "bands"), min_width=10 if col == "classes" else None)
    notes = []
    for name, path in found.items():
        c = ModelCard.load(path)
        found_metrics = c.extra.get("metrics")
        m: dict = found_metrics if isinstance(found_metrics, dict) else {}
        miou, acc = m.get("miou"), m.get("pixel_accuracy")
        table.add_row(name, ", ".join(c.classes), ", ".join(c.bands or [str(c.in_channels)]),
                      f"{c.gsd:g}" if c.gsd else "-",
                      "-" if not c.gsd_range else f"{c.gsd_range[0]:g}-{c.gsd_range[1]:g}",
                      f"{miou:.3f}" if miou is not None else "-",
                      f"{acc:.3f}" if acc is not None else "-")
        if c.imagery:
            notes.append(f"{name}: trained on {c.imagery}")
        if isinstance(m.get("iou"), dict):
            per = ", ".join(f"{k} {v:.3f}" for k, v in m["iou"].items() if v is not None)
            notes.append(f"{name}: IoU on the {m.get('split', 'held-out')} split of {m.get('dataset', '?')}: {per}")
    console = Console()
    console.print(table)
    for n in notes:
        console.print(n)
