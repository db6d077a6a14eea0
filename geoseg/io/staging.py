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
from typing import Any

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
        self.journal = Journal(self.dir)

    def exists(self) -> bool:
        return self.dir.is_dir()

    def fresh(self) -> None:
        """Start empty (a leftover of an earlier run is removed: nothing in it was ever published)."""
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.mkdir(parents=True)
        except OSError as e:  # the staging folder is ours: name the folder the user asked for
            raise ConfigError(f"cannot create the output folder {self.out} ({e.strerror or e}); "
                              "choose another --output") from None

    #: written into the staging folder once a run is complete, before its files move
    PUBLISHING = "publishing.json"

    def publish(self, names: Iterable[str], replace: Iterable[str] = (), *, record: str = "run.json") -> None:
        """Move ``names`` from the staging folder into ``out``; old files in ``replace`` go.

        Old outputs in ``replace`` that this run does not write again are
        removed too, so with ``replace`` naming every output a run can write
        (``--overwrite``; without it, predict refuses a folder that has any)
        the folder never mixes two runs. ``record`` (the run's record) is
        removed from ``out`` first and moved in last: a folder that has it
        holds one complete run. What is to move is written down first, so a
        run killed while its files move is completed by
        :meth:`finish_publishing` (the next run does that).
        """
        import json

        new = [n for n in names if (self.dir / n).exists()]
        order = [n for n in new if n != record] + [n for n in new if n == record]
        plan = {"move": order, "remove": sorted(set(replace) - set(new)), "record": record}
        tmp = self.dir / f".{self.PUBLISHING}.part"
        tmp.write_text(json.dumps(plan))
        os.replace(tmp, self.dir / self.PUBLISHING)
        self._move(plan)

    def finish_publishing(self) -> bool:
        """Complete the publishing of a run killed while its files moved; True if there was one."""
        import json

        try:
            plan = json.loads((self.dir / self.PUBLISHING).read_text())
        except (OSError, ValueError):
            return False
        self._move(plan)
        return True

    def _move(self, plan: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.dir / plan["record"]).exists():  # else it has moved in already: the publish is complete
            (self.out / plan["record"]).unlink(missing_ok=True)
            for n in plan["remove"]:
                (self.out / n).unlink(missing_ok=True)
            for n in plan["move"]:  # each rename is atomic: a reader sees the old file or the new one
                if (self.dir / n).exists():  # not moved yet (a publish cut short moved some)
                    os.replace(self.dir / n, self.out / n)
        (self.dir / self.PUBLISHING).unlink(missing_ok=True)  # done, before the slower removal of the rest
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Journal:
    """Finished blocks of a run, kept durably in the staging folder so a killed run can resume.

    Each block's confidence (if any) and then its classes go to
    ``blocks/<i>-<j>.<kind>.npy`` under a temporary name first, so a block file
    exists only once it is complete, and a block counts as done only once its
    classes file (the last one written) exists.
    ``state.json`` holds the run's fingerprint (input, model and options):
    a run resumes only with the same fingerprint.
    """

    #: changes when what a finished block leaves on disk changes: an older journal is not resumed
    #: (3: decimated reads average exactly each cell)
    FORMAT = 3

    def __init__(self, staging_dir: Path):
        self.dir = staging_dir / "blocks"
        self.state = staging_dir / "state.json"

    def start(self, fingerprint: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_state({"fingerprint": fingerprint, "steps": []})

    def read_state(self) -> dict | None:
        import json

        try:
            return json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None

    def write_state(self, state: dict) -> None:
        import json

        tmp = self.state.with_name(".state.json.part")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state)

    def step_done(self, name: str, **record: Any) -> None:
        """Record step ``name`` as finished, with what a resumed run needs of it (JSON values)."""
        state = self.read_state() or {}
        state.update(record)
        state["steps"] = [*state.get("steps", []), name]
        self.write_state(state)

    def steps(self) -> list[str]:
        return list((self.read_state() or {}).get("steps", []))

    def save(self, ij: tuple[int, int], classes, confidence=None) -> None:  # type: ignore[no-untyped-def]
        import numpy as np

        # classes last: its file marks the block complete (see done()), so a kill
        # between the two files leaves a block that is simply computed again
        for kind, arr in (("confidence", confidence), ("classes", classes)):
            if arr is None:
                continue
            final = self.dir / f"{ij[0]}-{ij[1]}.{kind}.npy"
            tmp = final.with_name(f".{final.name}.part")
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, final)

    def done(self) -> frozenset[tuple[int, int]]:
        """Blocks whose classes are saved, each file whole.

        Block files are renamed into place but not synced to disk (that would
        cost a sync per block), so after a power loss a renamed file may be
        cut short: such a block (header or data missing) is dropped here and
        computed again.
        """
        out = set()
        needs_conf = bool(((self.read_state() or {}).get("fingerprint") or {}).get("confidence"))
        for p in self.dir.glob("*.classes.npy"):
            i, j = p.name.split(".")[0].split("-")
            conf = p.with_name(f"{i}-{j}.confidence.npy")
            if _whole(p) and (_whole(conf) if needs_conf or conf.exists() else True):
                out.add((int(i), int(j)))
            else:
                p.unlink(missing_ok=True)
                conf.unlink(missing_ok=True)
        return frozenset(out)

    def load(self, ij: tuple[int, int], kind: str = "classes"):  # type: ignore[no-untyped-def]
        import numpy as np

        return np.load(self.dir / f"{ij[0]}-{ij[1]}.{kind}.npy")

    def drop_blocks(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _whole(path: Path) -> bool:
    """An .npy file with its whole header and as many bytes as its data needs (mapped, not read:
    a file of the right length whose pages never reached the disk is not told apart)."""
    import numpy as np

    try:
        np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return True
