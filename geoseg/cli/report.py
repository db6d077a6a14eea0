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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("blocks"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

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
    table = Table(title="Classes")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("pixels", justify="right")
    table.add_column("% of valid", justify="right")
    for i, (name, n) in enumerate(zip(result.classes, hist[:-1])):
        table.add_row(str(i), name, f"{int(n):,}", f"{100.0 * n / valid:.2f}" if valid else "-")
    console.print(table)
