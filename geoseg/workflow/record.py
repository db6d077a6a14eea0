"""``run.json``: the resolved options, the model card, counts, timings and versions of a run."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np

from .plan import Plan
from .stages import Counts


def run_record(plan: Plan, counts: Counts, vec: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    mc, layout, c, o = plan.net.card, plan.layout, plan.compute, plan.outputs
    blend = plan.opts.blend
    hist = counts.histogram
    record = {
        "input": plan.given,
        "output": str(plan.out),
        "grid": {"shape": list(plan.grid.shape), "transform": list(plan.grid.transform)[:6],
                 "crs": plan.grid.crs.to_string() if plan.grid.crs else None},
        "options": {
            "model": getattr(getattr(plan.net, "spec", None), "model", mc.name), "card": plan.card_path,
            # as given (in the model's pixels where the scene is resampled; "layout" has the engine's)
            **plan.adapted.get("model_tiling", {"tile_size": layout.tile, "overlap": layout.overlap,
                                                "margin": plan.opts.resolved_margin}),
            "blend": blend if isinstance(blend, str) else repr(blend),
            "batch_size": plan.opts.batch_size, "device": plan.net.device,
            "engine": plan.engine, "precision": getattr(plan.net, "precision", "fp32"),
            "runtime": runtime_of(plan.net),
            "streams": plan.net.streams, "threads_per_stream": plan.net.threads, "bands": plan.bands,
            "confidence": o.confidence,
            "scheduler": c.scheduler if c.scheduler is None or isinstance(c.scheduler, str) else str(c.scheduler),
            "polygons": o.polygons, "min_area_m2": o.min_area, "simplify_m": o.simplify,
            "vector_format": o.vector_format, "zones": str(o.zones) if o.zones else None,
            "zone_field": o.zone_field, "quicklook": o.quicklook,
        },
        # the tiles the engine lays out, in pixels of the grid it reads: the scene's, or its d x d cells
        "layout": {"tile": layout.tile, "overlap": layout.overlap, "stride": layout.stride,
                   "margin": plan.opts.resolved_margin, "block_size": layout.block,
                   "pixel": "scene" if plan.decimation == 1 else f"{plan.decimation}x{plan.decimation} cells"},
        "ground_resolution_and_tta": {k: v for k, v in plan.adapted.items() if k not in ("calibration",
                                                                                       "model_tiling")},
        "calibration": plan.adapted.get("calibration"),
        "vectorize": vec,
        "model_card": mc.to_dict(),
        "counts": {"pixels": int(hist.sum()), "nodata_pixels": int(hist[-1]),
                   "tiles_run": counts.tiles_run, "tiles_skipped_nodata": counts.tiles_skipped,
                   "blocks": counts.blocks, "class_pixels": dict(zip(mc.classes, map(int, hist[:-1])))},
        "timings": timings,
        "versions": versions(),
    }
    # storing finished blocks, seconds summed over the threads that do it (journal for resume,
    # the working GeoTIFFs, the overview levels)
    record["block_writes_s"] = {k: round(v, 4) for k, v in counts.writes_s.items()}
    if counts.transfers:
        record["transfers"] = counts.transfers
    return record


def versions() -> dict[str, str]:
    import dask
    import rasterio

    from .. import __version__

    v = {"geoseg": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__, "dask": dask.__version__}
    from importlib.metadata import PackageNotFoundError, version

    # a module loaded already tells its own version; otherwise the metadata does (importing torch costs 1.5 s;
    # ONNX Runtime's GPU build is installed as onnxruntime-gpu)
    for name, dists in (("torch", ("torch",)), ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"))):
        loaded = getattr(sys.modules.get(name), "__version__", None)
        if isinstance(loaded, str):
            v[name] = loaded
            continue
        for dist in dists:
            try:
                v[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    v["cpus"] = str(os.cpu_count())
    return v


def runtime_of(net: Any) -> dict[str, Any]:
    """What ran the forward passes: the runtime, and for a checkpoint on ONNX Runtime, its cached export."""
    from ..models.backends import OnnxBackend

    if isinstance(net, OnnxBackend):
        out: dict[str, Any] = {"name": "onnxruntime"}
        if hasattr(net, "checkpoint"):
            out["export_of"] = str(net.checkpoint)
            out["export"] = str(net.path)
        return out
    out = {"name": "torch"}
    if getattr(net, "runtime_note", None):
        out["note"] = net.runtime_note
    return out
