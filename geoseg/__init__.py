"""geoseg: land-cover maps from large rasters with YOLO-style semantic segmentation.

The public API is imported lazily so that ``import geoseg`` (and
``geoseg --help``) never pays for torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "Model", "infer", "segment", "predict", "create_model", "ModelCard",
           "Grid", "GeosegError"]

_LAZY = {
    "load_model": ("geoseg.api", "load_model"),
    "Model": ("geoseg.api", "Model"),
    "infer": ("geoseg.api", "infer"),
    "segment": ("geoseg.api", "segment"),
    "predict": ("geoseg.api", "predict"),
    "create_model": ("geoseg.models.registry", "create_model"),
    "ModelCard": ("geoseg.models.card", "ModelCard"),
    "Grid": ("geoseg.geometry.grid", "Grid"),
    "GeosegError": ("geoseg.errors", "GeosegError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
