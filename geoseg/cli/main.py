"""``geoseg`` entry point: the command group, shared error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import __version__

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Print any ``GeosegError`` (and a missing-file OSError) as one line; exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import GeosegError

        try:
            return fn(*args, **kwargs)
        except GeosegError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted; no complete output was written.", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
def cli() -> None:
    """Land-cover maps from large GeoTIFFs and orthomosaics."""


def _register() -> None:
    from .landcover_cmd import stats, vectorize
    from .models_cmd import models
    from .predict_cmd import predict
    from .train_cmd import export, train, val

    for cmd in (predict, vectorize, stats, models, train, val, export):
        cli.add_command(cmd)


_register()
