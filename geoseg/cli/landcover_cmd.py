"""``geoseg vectorize`` and ``geoseg stats`` for any class raster."""

from __future__ import annotations

from pathlib import Path

import click

from .main import one_line_errors


@click.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file [default: polygons.<format> beside SRC].")
@click.option("--vector-format", "fmt", default="gpkg", show_default=True,
              help="gpkg, geojson, parquet or fgb.")
@click.option("--min-area", type=click.FloatRange(min=0),
              help="Sieve regions smaller than this many m² first (in place).")
@click.option("--simplify", type=click.FloatRange(min=0), help="Coverage simplification tolerance in metres.")
@click.option("--workers", "num_workers", type=click.IntRange(min=1), help="Parallel workers [default: CPU count].")
@click.option("--overwrite", is_flag=True)
@one_line_errors
def vectorize(src: Path, output: Path | None, fmt: str, min_area: float | None,
              simplify: float | None, num_workers: int | None, overwrite: bool) -> None:
    """Polygons of a class raster, merged exactly across blocks, styled for QGIS."""
    from ..post.landcover import sieve
    from ..post.landcover import vectorize as run

    if min_area:
        if not overwrite:
            from ..errors import OutputExistsError

            raise OutputExistsError(f"--min-area rewrites {src} in place; pass --overwrite to allow it")
        sieve(src, min_area)
    out = output or src.with_name("polygons")
    r = run(src, out, fmt=fmt, simplify=simplify, overwrite=overwrite, num_workers=num_workers)
    click.echo(f"wrote {r['polygons']:,} polygons to {r['path']}")


@click.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write stats.csv and stats.json here [default: beside SRC].")
@click.option("--zones", type=click.Path(dir_okay=False, path_type=Path),
              help="Polygons (fields, parcels) for per-zone areas.")
@click.option("--zone-field", help="Zone name attribute [default: the feature index].")
@click.option("--overwrite", is_flag=True, help="Replace an existing stats.csv / stats.json.")
@one_line_errors
def stats(src: Path, output: Path | None, zones: Path | None, zone_field: str | None, overwrite: bool) -> None:
    """Per-class pixels, m², ha and % of the valid area (exact; geodesic for lon/lat)."""
    from ..errors import OutputExistsError
    from ..post.landcover import area_stats, write_stats
    from .report import area_summary

    out = output or src.parent
    existing = [n for n in ("stats.csv", "stats.json") if (out / n).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out / existing[0]} already exists; pass --overwrite or choose another -o")
    table = area_stats(src, zones=zones, zone_field=zone_field)
    out.mkdir(parents=True, exist_ok=True)
    write_stats(table, out, source=str(src))
    area_summary(table)
