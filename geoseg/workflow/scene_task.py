"""What a batch job runs for one scene, on a worker (see :mod:`.batch`).

:func:`run_scene` runs :func:`geoseg.workflow.predict.predict` into the
scene's folder with the worker's one loaded copy of the model, continuing an
interrupted run, and leaves what happened beside the scene's attempt log, so
the client reads it even when the worker is gone by then.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import (
    BandCountError,
    ConfigError,
    GeosegError,
    ModelCardError,
    NotARasterError,
    OutputExistsError,
    PartialRunError,
)
from ..io.staging import Staging
from ..io.styles import write_text_atomic
from ..models.backends import available_cores, resolve_device
from ..models.loading import ModelSpec, cached_model
from .stac import now, verified


def one_line_error(exc: BaseException) -> str:
    """An exception as one line for the manifest and the summary."""
    name = type(exc).__name__
    if name == "KilledWorker":
        return ("every worker that ran it died (KilledWorker): the scene may need more memory than a worker "
                "has, or crashes the process; see the worker logs")
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:299] + "…"
    return text if isinstance(exc, GeosegError) and text else f"{name}: {text}" if text else name


def note_attempt(log: str) -> str:
    try:
        from distributed import get_worker

        where = get_worker().address
    except (ImportError, ValueError):
        where = "client"
    with open(log, "a") as f:
        f.write(f"{now()}\t{where}\t{os.getpid()}\n")
    return where


def budget(host_threads: dict[str, int]) -> tuple[int, int]:
    """(intra-op threads per forward pass, block threads) for one scene on this worker.

    A node's cores are shared among all worker threads on it. In a daemonic
    worker process (dask's default, under a nanny) a scene gets one block
    thread: its polygons could not use a pool of processes there.
    """
    import multiprocessing

    cores = available_cores()
    try:
        from distributed import get_worker

        w = get_worker()
        slots = host_threads.get(urlparse(w.address).hostname or "", 0) or w.state.nthreads
    except (ImportError, ValueError):
        slots = 1
    share = max(1, cores // max(1, slots))
    return share, 1 if multiprocessing.current_process().daemon else share


def predict_resuming(src: str, out: Path, **kwargs: Any) -> tuple[Any, bool]:
    """``predict`` that continues an interrupted run into ``out`` when there is one (else starts over)."""
    from .predict import predict

    if not Staging(out).exists():
        return predict(src, out, **kwargs), False
    try:
        return predict(src, out, resume=True, **kwargs), True
    except ConfigError:
        if not Staging(out).exists():
            raise
        return predict(src, out, resume=False, **kwargs), False  # the partial run used other inputs


def _already_done(out: Path, href: str, spec: ModelSpec, names: Sequence[str], started: str,
                  worker: str) -> dict[str, Any] | None:
    """What an earlier attempt published, when its worker died before reporting it (nothing is run again)."""
    from .plan import ALL_OUTPUTS

    if not verified(out, href, spec.model, names):
        return None
    run = json.loads((out / "run.json").read_text())
    return {"outputs": [n for n in ALL_OUTPUTS if (out / n).exists()], "pixels": run["counts"]["pixels"],
            "started": started, "finished": now(), "worker": worker, "resumed": True,
            "timings": {"seconds": 0.0, **run.get("timings", {})}}


def run_scene(scene: dict[str, Any], out: str, spec: ModelSpec, options: dict[str, Any], overwrite: bool,
              log: str, host_threads: dict[str, int], names: Sequence[str] = ()) -> dict[str, Any]:
    """One scene on a worker: its outputs in ``out``; what happened, for the manifest."""
    started = now()
    worker = note_attempt(log)
    done = _already_done(Path(out), scene["href"], spec, names, started, worker) if names else None
    if done is None:
        threads, blocks = budget(host_threads)
        if spec.streams is None and resolve_device(spec.device) == "cpu":
            spec = replace(spec, streams=max(1, available_cores() // threads))
        t0 = time.perf_counter()
        try:
            res, resumed = predict_resuming(scene["href"], Path(out), model=cached_model(spec),
                                            overwrite=overwrite, num_workers=blocks, **options)
        except GeosegError as e:
            if not permanent(e, scene["href"]):
                raise  # dask tries it again (elsewhere)
            done = {"error": one_line_error(e), "started": started, "finished": now(), "worker": worker}
        else:
            done = {"outputs": sorted(res.files), "pixels": res.pixels, "started": started, "finished": now(),
                    "worker": worker, "resumed": resumed,
                    "timings": {"seconds": time.perf_counter() - t0, **res.timings}}
    # also on disk: the client reads it there, so a worker lost after the scene costs nothing
    write_text_atomic(result_path(log), json.dumps(done))
    return done


def permanent(exc: BaseException, href: str) -> bool:
    """Whether no retry can mend ``exc``: the scene or the options are wrong, not a node, a network or a
    device (a missing mount, a URL that timed out, a GPU that failed are tried again)."""
    if isinstance(exc, NotARasterError):
        return Path(href).is_file()  # a local file GDAL cannot read; a URL may answer next time
    return isinstance(exc, (ConfigError, BandCountError, ModelCardError, OutputExistsError, PartialRunError))


def result_path(log: str | Path) -> Path:
    """Where a scene's task leaves what it returns, beside its attempt log."""
    return Path(log).with_suffix(".result.json")
