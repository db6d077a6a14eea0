"""Progress bars and summary tables shared by the commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress_bar(quiet: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar fed by ``update(done, total)`` calls (None when quiet)."""
    if quiet:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("blocks"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def step(name: str) -> None:  # the steps after the blocks: one line each
            bar.update(task, description=name)
            bar.console.print(f"[dim]{name}[/]")

        update.step = step  # type: ignore[attr-defined]
        yield update


def predict_summary(result: Any) -> None:
    """Pixels, time, throughput and the share of each class, as a table."""
    from rich.console import Console
    from rich.table import Table

    hist = result.histogram
    valid = int(hist[:-1].sum())
    mpix = result.pixels / 1e6
    secs = result.seconds
    console = Console()
    console.print(
        f"[bold]{result.output}[/]: {mpix:.2f} MPix in {secs:.1f} s "
        f"({mpix / max(secs, 1e-9):.2f} MPix/s); tiles run {result.tiles_run}, "
        f"skipped as nodata {result.tiles_skipped}; nodata pixels {int(hist[-1]):,}"
    )
    if result.areas is not None:
        area_summary(result.areas)
        return
    table = Table(title="Classes")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("pixels", justify="right")
    table.add_column("% of valid", justify="right")
    for i, (name, n) in enumerate(zip(result.classes, hist[:-1])):
        table.add_row(str(i), name, f"{int(n):,}", f"{100.0 * n / valid:.2f}" if valid else "-")
    console.print(table)


def area_summary(table: Any) -> None:
    """Per-class area table (m², ha, %)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Class areas (valid area {_ha(table.area_m2.sum() / 1e4)} ha)")
    for col in ("id", "class", "pixels", "m²", "ha", "% of valid"):
        t.add_column(col, justify="left" if col == "class" else "right", no_wrap=col != "class")
    for r in table.rows():
        t.add_row(str(r["class_id"]), r["class_name"], f"{r['pixels']:,}", _m2(r["area_m2"]),
                  _ha(r["area_ha"]), f"{r['percent']:.2f}")
    Console().print(t)


def _ha(v: float) -> str:
    """Hectares readable at any size: 3 significant digits below 10 ha, whole hectares above 10,000."""
    if v == 0:
        return "0"
    if v < 10:
        return f"{v:.3g}"
    return f"{v:,.0f}" if v >= 10_000 else f"{v:,.1f}"


def _m2(v: float) -> str:
    """Square metres, switching to km² where the figure would not fit an 80-column table."""
    if v >= 1e7:
        return f"{v / 1e6:,.1f} km²"
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
