"""A run's outputs are built in a hidden folder beside the target and published together.

Until :meth:`Staging.publish`, nothing in the output folder changes: a
failed or killed run leaves the previous outputs exactly as they were. The
staging folder's name starts with a dot and says what it is
(``.<name>.geoseg-partial``), so a leftover is never mistaken for a result;
the next run in the same place removes it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError


def check_output_dir(out: Path) -> None:
    """Refuse an output path that cannot be a folder (a file, or a file above it)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"is under {p}, which is a file"
                raise ConfigError(f"output {out} {what}; choose another --output folder")
            if not os.access(p, os.W_OK):
                raise ConfigError(f"cannot write in {p}; choose another --output folder")
            return


class Staging:
    """``dir`` is where outputs are written; :meth:`publish` moves them to ``out``."""

    def __init__(self, out: Path):
        self.out = out
        self.dir = out.parent / f".{out.name}.geoseg-partial"
        if self.dir.exists():  # a killed earlier run: nothing in it was ever published
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def publish(self, names: Iterable[str], replace: Iterable[str] = ()) -> None:
        """Move ``names`` from the staging folder into ``out``; old files in ``replace`` go first.

        Old outputs of a previous run that this run does not write again are
        removed too, so the folder never mixes two runs.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        new = [n for n in names if (self.dir / n).exists()]
        for n in new:  # each rename is atomic: a reader sees the old file or the new one
            os.replace(self.dir / n, self.out / n)
        for n in set(replace) - set(new):
            (self.out / n).unlink(missing_ok=True)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
