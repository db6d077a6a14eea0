"""``geoseg.predict``: a raster of any size in, a folder of outputs out.

Plan (every check, nothing written), then stages into a hidden staging
folder beside the output (inference and class COG, sieve, polygons, stats,
quicklook, run record), then publish: the outputs replace those of an
earlier run together, and a failed run changes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.options import Compute, Tiling
from ..errors import ConfigError, PartialRunError
from ..io.preload import preload
from ..io.raster import bounded_gdal_cache
from ..io.staging import Journal, Staging
from ..io.styles import write_text_atomic
from . import stages
from .plan import ALL_OUTPUTS, Outputs, Plan, make_plan, split_options
from .record import run_record, runtime_of


@dataclass
class PredictResult:
    """Paths written and what happened, as also recorded in ``run.json``."""

    output: Path
    files: dict[str, Path]
    classes: list[str]
    histogram: np.ndarray  # pixels per class, last entry = nodata
    tiles_run: int
    tiles_skipped: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    areas: Any = None  # post.areas.AreaTable of the final class raster
    transfers: dict[str, Any] = field(default_factory=dict)

    @property
    def pixels(self) -> int:
        return int(self.histogram.sum())


def default_output(src: str | Path) -> Path:
    """``<stem>_geoseg`` in the current directory."""
    return Path.cwd() / f"{Path(str(src)).stem}_geoseg"


@bounded_gdal_cache
def predict(src: str | Path, output: str | Path | None = None, *, model: Any, card: str | Path | None = None,
            bands: Sequence[int | str] | None = None, tiling: Tiling | None = None, compute: Compute | None = None,
            outputs: Outputs | None = None, resume: bool | None = None,
            progress: Callable[[int, int], None] | None = None, **options: Any) -> PredictResult:
    """Segment a raster of any size into ``output`` (default ``<stem>_geoseg``).

    Writes ``classes.tif`` (COG, uint8, nodata 255, palette, class names,
    mode overviews), ``classes.qml``, ``polygons.gpkg`` (or another
    ``vector_format``) with ``polygons.qml``, ``stats.csv`` / ``stats.json``,
    ``run.json``, and with the options ``confidence.tif`` and
    ``quicklook.png``. ``model`` is a name, a path or a loaded model (see
    :func:`geoseg.load_model`); ``bands`` are 1-based band indexes
    (default: every band that is not alpha).

    Options come as groups — :class:`~geoseg.engine.options.Tiling`
    (``tile``, ``overlap``, ``blend``, ``margin``),
    :class:`~geoseg.engine.options.Compute` (``batch_size``, ``device``,
    ``streams``, ``precision``, ``engine``, ``scheduler``, ``num_workers``)
    and :class:`~geoseg.workflow.plan.Outputs` (``confidence``,
    ``polygons``, ``min_area`` m², ``simplify`` m, ``vector_format``,
    ``zones``, ``zone_field``, ``quicklook``, ``overwrite``) — or as flat
    keywords of the same names (``tile_size`` for ``tile``).
    ``progress(done, total)`` is called once per finished block.

    A run that is interrupted after its first block keeps its finished
    blocks (and finished steps) in a hidden folder beside ``output``. The
    next run into the same output then needs ``resume=True`` (continue: the
    result is byte-identical to an uninterrupted run) or ``resume=False``
    (start over); with ``None`` it raises :class:`~geoseg.errors.PartialRunError`.
    """
    t0 = time.perf_counter()
    flat = split_options(options)
    tiling, compute, outputs = tiling or flat[0], compute or flat[1], outputs or flat[2]
    out = Path(output) if output is not None else default_output(src)
    if Staging(out).finish_publishing() and resume:  # a complete run killed while its files moved
        return published_result(out)
    plan = make_plan(src, out, model=model, card=card, tiling=tiling, compute=compute, outputs=outputs,
                     bands=bands)
    scheduler, client = stages.connect(plan.compute.scheduler)  # a scheduler nobody runs: nothing written
    staging: Staging | None = None
    try:
        staging = _open_staging(plan, resume)
        if plan.outputs.polygons:
            preload("geoseg.io.vector", "pyogrio.raw")  # the polygons' writer, imported while the blocks run
        t_setup = time.perf_counter()
        counts = _inference_step(plan, staging, progress, scheduler)
        t_infer = time.perf_counter()
        _step(progress, "Polygons and area statistics" if outputs.polygons else "Area statistics")
        vec, areas = stages.post(plan, staging.dir, staging.journal, scheduler)
        t_post = time.perf_counter()
        if outputs.quicklook:
            _step(progress, "Quicklook")
            stages.quicklook(plan, staging.dir)
        t_end = time.perf_counter()
        timings = {"setup_s": t_setup - t0, "inference_s": t_infer - t_setup - counts.cog_s, "cog_s": counts.cog_s,
                   "post_s": t_post - t_infer, "quicklook_s": t_end - t_post, "total_s": t_end - t0}
        write_text_atomic(staging.dir / "run.json", json.dumps(run_record(plan, counts, vec, timings), indent=2))
        names = outputs.names()
        staging.publish(names, replace=ALL_OUTPUTS if outputs.overwrite else ())
    except BaseException:
        if staging is not None and not staging.journal.done() and not staging.journal.steps():
            staging.discard()  # nothing worth resuming
        raise
    finally:
        if client is not None:
            client.close()
    return PredictResult(out, {n: out / n for n in names if (out / n).exists()}, list(plan.net.card.classes),
                         counts.histogram, counts.tiles_run, counts.tiles_skipped, t_end - t0, timings, areas,
                         counts.transfers)


def published_result(out: Path) -> PredictResult:
    """The result of the complete run published in ``out``, from its ``run.json`` (for a ``resume``
    that finds the run was killed only while its files moved: it is finished, not run again)."""
    from ..post.landcover import area_stats

    run = json.loads((out / "run.json").read_text())
    c = run["counts"]
    classes = list(c["class_pixels"])
    hist = np.array([*c["class_pixels"].values(), c["nodata_pixels"]], np.int64)
    files = {n: out / n for n in ALL_OUTPUTS if (out / n).exists()}
    o = run["options"]
    zones = o.get("zones") if o.get("zones") and Path(o["zones"]).exists() else None
    areas = area_stats(out / "classes.tif", zones=zones, zone_field=o.get("zone_field") if zones else None)
    return PredictResult(out, files, classes, hist, c["tiles_run"], c["tiles_skipped_nodata"],
                         float(run["timings"].get("total_s", 0.0)), run["timings"], areas, run.get("transfers", {}))


def _step(progress: Any, name: str) -> None:
    """Tell a progress callback that has a ``step(name)`` attribute which step starts."""
    step = getattr(progress, "step", None)
    if step is not None:
        step(name)


def fingerprint(plan: Plan) -> dict[str, Any]:
    """What the classes depend on: a partial run resumes only when all of it is unchanged."""
    st = Path(plan.src).stat() if Path(plan.src).exists() else None
    spec = getattr(plan.net, "spec", None)
    o = plan.opts
    return {"input": plan.src, "size": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None,
            "model": getattr(spec, "model", plan.net.card.name), "card": plan.net.card.to_dict(),
            "bands": plan.bands, "tile": o.tile, "overlap": o.overlap, "block": plan.layout.block,
            "blend": o.blend if isinstance(o.blend, str) else repr(o.blend), "margin": o.resolved_margin,
            "batch_size": o.batch_size, "engine": plan.engine, "device": plan.net.device,
            "confidence": plan.outputs.confidence, "min_area": plan.outputs.min_area,
            "tta": plan.adapted["tta"], "gsd_ratio": plan.adapted["ratio"],
            "runtime": runtime_of(plan.net)["name"], "journal": Journal.FORMAT}


def _open_staging(plan: Plan, resume: bool | None) -> Staging:
    staging = Staging(plan.out)
    fp = json.loads(json.dumps(fingerprint(plan)))  # as it reads back from state.json
    worth = staging.exists() and (staging.journal.done() or staging.journal.steps())
    if worth and resume is None:
        total = plan.layout.blocks[0] * plan.layout.blocks[1]
        n = len(staging.journal.done())
        raise PartialRunError(
            f"{plan.out} has an interrupted run ({n} of {total} blocks done); continue it with --resume, "
            "or start over with --restart", done=n, total=total)
    if worth and resume:
        state = staging.journal.read_state()
        if state is None or state.get("fingerprint") != fp:
            changed = sorted(k for k in fp if (state or {}).get("fingerprint", {}).get(k) != fp[k])
            raise ConfigError(f"the interrupted run in {plan.out} used another input, model or options "
                              f"({', '.join(changed[:4])}); use the same ones, or start over with --restart")
        return staging
    try:  # nothing worth resuming: start empty
        staging.fresh()
        staging.journal.start(fp)
    except BaseException:
        staging.discard()
        raise
    return staging


def _inference_step(plan: Plan, staging: Staging, progress: Callable[[int, int], None] | None,
                    scheduler: Any) -> Any:
    journal = staging.journal
    if "inference" in journal.steps():
        saved = dict((journal.read_state() or {})["counts"])
        saved["histogram"] = np.asarray(saved["histogram"], np.int64)
        return stages.Counts(**saved)
    counts = stages.inference(plan, staging.dir, progress, journal, scheduler)
    journal.step_done("inference", counts={
        "histogram": counts.histogram.tolist(), "tiles_run": counts.tiles_run, "tiles_skipped": counts.tiles_skipped,
        "blocks": counts.blocks, "transfers": counts.transfers, "cog_s": counts.cog_s, "writes_s": counts.writes_s})
    journal.drop_blocks()
    return counts
