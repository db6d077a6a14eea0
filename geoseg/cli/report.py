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

    t = Table(title=f"Class areas (valid area {table.area_m2.sum() / 1e4:,.2f} ha)")
    for col in ("id", "class", "pixels", "m²", "ha", "% of valid"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in table.rows():
        t.add_row(str(r["class_id"]), r["class_name"], f"{r['pixels']:,}", f"{r['area_m2']:,.1f}",
                  f"{r['area_ha']:,.3f}", f"{r['percent']:.2f}")
    Console().print(t)
