"""Model registry: ``create_model(name, num_classes=..., in_channels=...)``.

Names are ``<family>-<scale>-<task>``, e.g. ``geoseg-n-sem``. Families add
themselves in :data:`_FAMILIES` (explicitly, not by import side effects).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ModelNotFoundError


def _yolo_sem(scale: str) -> Callable[..., Any]:
    def build(*, num_classes: int, in_channels: int = 3) -> Any:
        from .yolo_sem import YoloSem

        return YoloSem(scale, num_classes=num_classes, in_channels=in_channels)

    return build


_FAMILIES: dict[str, Callable[..., Any]] = {
    f"geoseg-{s}-sem": _yolo_sem(s) for s in ("n", "s", "m", "l", "x")
}


def list_models() -> list[str]:
    """Registered architecture names."""
    return list(_FAMILIES)


def create_model(name: str, *, num_classes: int, in_channels: int = 3) -> Any:
    """Build an untrained ``torch.nn.Module`` of a registered architecture."""
    try:
        build = _FAMILIES[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown architecture {name!r}; choose one of: {', '.join(_FAMILIES)}"
        ) from None
    return build(num_classes=num_classes, in_channels=in_channels)
