"""``geoseg`` entry point: the command group, shared error handling.

Every error is printed as one line, ``Error: <what was wrong>; <how to fix>``,
with exit status 2 (1 for an unexpected error, 130 for Ctrl-C); the
translation of library failures lives in :mod:`geoseg.cli.failures`.
``geoseg --debug`` or ``GEOSEG_DEBUG=1`` re-raises instead, with the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from .. import __version__

F = TypeVar("F", bound=Callable[..., Any])

#: Exceptions click handles itself (``--help``, ``--version``, a prompt's Ctrl-C).
_CLICK_FLOW = (click.exceptions.Exit, click.exceptions.Abort)


def debug_requested() -> bool:
    """``--debug`` on the command line or ``GEOSEG_DEBUG`` set to a true value."""
    if os.environ.get("GEOSEG_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def fail(message: str, code: int = 2) -> None:
    """Print ``Error: message`` as one line on stderr and exit with ``code``."""
    from .failures import one_line

    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(code)


def one_line_errors(fn: F) -> F:
    """Print any error of a command as one line (see :mod:`geoseg.cli.failures`); exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("Interrupted; no complete output was written.", err=True)
            sys.exit(130)
        except (click.ClickException, *_CLICK_FLOW):
            raise
        except Exception as e:
            if debug_requested():
                raise
            from .failures import explain, unexpected

            msg = explain(e)
            fail(msg or unexpected(e), 2 if msg else 1)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _usage_in_one_line() -> Iterator[None]:
    """A click usage error (bad value, unknown option, missing argument) as one line; exit 2."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        if debug_requested() or (ctx is not None and ctx.find_root().params.get("debug")):
            raise
        from .failures import usage

        fail(usage(e, ctx.command_path if ctx is not None else "geoseg"))


class Group(click.Group):
    """The command group; usage errors of it and its commands are printed as one line."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _usage_in_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_in_one_line():
            return super().invoke(ctx)


@click.group("geoseg", cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: GEOSEG_DEBUG=1).")
def cli(debug: bool) -> None:
    """Land-cover maps from large GeoTIFFs and orthomosaics."""
    import warnings

    def one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        click.echo(f"Warning: {message}", err=True)

    if not debug_requested():
        warnings.showwarning = one_line  # type: ignore[assignment]


def _register() -> None:
    from .landcover_cmd import stats, vectorize
    from .models_cmd import models
    from .predict_cmd import predict
    from .train_cmd import export, train, val

    for cmd in (predict, vectorize, stats, models, train, val, export):
        cli.add_command(cmd)
    cli.add_command(__import__("geoseg.cli.batch_cmd", fromlist=["batch"]).batch)


_register()
