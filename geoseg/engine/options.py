"""Options of one prediction: what the user asks for, and one resolution of it.

:class:`Tiling` and :class:`Compute` are what a caller may leave unset;
:func:`resolve` turns them, with the model's card and the grid, into a
valid :class:`~geoseg.geometry.grid.Layout` and :class:`RunOptions`. predict,
infer, segment and evaluation all call it, so they tile, blend and batch
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..geometry.grid import Grid, Layout
from .blend import Blend, make_window

#: Upper bound on a tile side: a float32 accumulator of a few classes over a
#: block of such tiles must still fit a worker's memory.
MAX_TILE = 8192

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
ENGINES = ("auto", "blocks", "device")
RUNTIMES = ("auto", "torch", "onnx")


def default_overlap(tile: int) -> int:
    """Default overlap: 1/8 of the tile (64 px for 512-px tiles)."""
    return max(16, tile // 8)


def default_margin(overlap: int) -> int:
    """Default low-weight tile margin: a quarter of the overlap."""
    return overlap // 4


@dataclass(frozen=True)
class Tiling:
    """How the scene is cut and blended; ``None`` means the model's or the default value.

    ``tile`` and ``overlap`` are pixels; ``margin`` is the number of outer
    tile pixels given almost no weight (see :mod:`geoseg.engine.blend`).
    """

    tile: int | None = None
    overlap: int | None = None
    blend: Blend = "hann"
    margin: int | None = None
    gsd: str | float = "auto"  # "auto", "off" or metres: see geoseg.engine.adapters.gsd_ratio
    tta: str = "none"  # "none", "flips" or "d4": see geoseg.engine.adapters.TTA

    def __post_init__(self) -> None:
        from .adapters import TTA

        check_positive("tile size", self.tile, "--tile-size")
        if self.tta not in TTA:
            raise ConfigError(f"unknown --tta {self.tta!r}; choose one of: {', '.join(TTA)}")
        if self.gsd not in ("auto", "off"):
            try:
                value = float(self.gsd)
            except (TypeError, ValueError):
                value = float("nan")
            if not value > 0 or value == float("inf"):
                raise ConfigError(f"--gsd must be auto, off or a ground resolution in metres > 0, got {self.gsd!r}")
            object.__setattr__(self, "gsd", value)
        for name in ("overlap", "margin"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 0):
                raise ConfigError(f"{name} must be a whole number of pixels >= 0, got {v!r}; fix --{name} "
                                  "or leave it out for the default")


@dataclass(frozen=True)
class Compute:
    """Where and how the forward passes run.

    ``engine``: ``blocks`` (one dask task per block, host blending) or
    ``device`` (device-resident blocks, batches across blocks; see
    :mod:`geoseg.engine.device`); ``auto`` picks ``device`` for a torch
    model on a GPU. ``precision`` is the autocast type on a GPU (``auto``:
    fp16 there, fp32 on CPU).
    """

    batch_size: int | None = None
    device: str = "auto"
    streams: int | None = None
    precision: str = "auto"
    engine: str = "auto"
    scheduler: Any = None
    num_workers: int | None = None
    runtime: str = "auto"

    def __post_init__(self) -> None:
        check_positive("batch size", self.batch_size, "--batch-size")
        check_positive("streams", self.streams, "--streams")
        check_positive("workers", self.num_workers, "--workers")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose one of: {', '.join(ENGINES)}")


def check_positive(what: str, value: int | None, flag: str) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ConfigError(f"{what} must be a whole number >= 1, got {value!r}; fix {flag}")


@dataclass(frozen=True)
class RunOptions:
    """Options of one prediction, resolved and validated."""

    tile: int
    overlap: int
    blend: Blend = "hann"
    batch_size: int = 4
    confidence: bool = False
    margin: int | None = None  # None: default_margin(overlap)

    @property
    def resolved_margin(self) -> int:
        return default_margin(self.overlap) if self.margin is None else self.margin

    def __getstate__(self) -> dict[str, Any]:
        # the window is made again where it is used: a cluster's tasks carry the options, not megabytes
        return {k: v for k, v in self.__dict__.items() if k != "_window"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def window(self) -> np.ndarray:
        """The (tile, tile) blending window these options describe (made once, shared: do not modify)."""
        w = self.__dict__.get("_window")
        if w is None:
            w = make_window(self.blend, self.tile, self.resolved_margin)
            object.__setattr__(self, "_window", w)
        return w


def max_overlap(tile: int, pad_multiple: int = 1) -> int:
    """The largest overlap a ``tile``-px tile takes: the stride (a multiple of ``pad_multiple``) is at least half."""
    p = max(1, int(pad_multiple))
    return max(0, tile - -(-tile // (2 * p)) * p)


def overlap_for(tile: int, pad_multiple: int = 1) -> int:
    """The default overlap of a ``tile``-px tile: :func:`default_overlap`, within what the tile takes."""
    return min(default_overlap(tile), max_overlap(tile, pad_multiple))


def check_tiling(tile: int, overlap: int, margin: int | None, pad_multiple: int = 1) -> None:
    """Overlap and margin against the tile, in the units the user gave them (the model's pixels)."""
    if overlap > (top := max_overlap(tile, pad_multiple)):
        raise ConfigError(f"overlap {overlap} is too large for tile size {tile}: it can be at most {top}; "
                          f"use --overlap {top} or less, or leave it out for the default "
                          f"({overlap_for(tile, pad_multiple)})")
    if margin is not None and 2 * margin >= tile:
        raise ConfigError(f"margin {margin} must be less than half the tile ({tile} px); use --margin "
                          f"{(tile - 1) // 2} or less, or leave it out for the default ({default_margin(overlap)})")


def resolve(card: Any, shape: tuple[int, int], tiling: Tiling, *, batch_size: int,
            confidence: bool = False, grid: Grid | None = None, block_target: int = 1024) -> tuple[Layout, RunOptions]:
    """One resolution of the tiling options for ``card`` over a grid of ``shape`` (rows, cols).

    Checks the tile against the card (fixed-size models, ``MAX_TILE``),
    builds the layout (stride in the model's ``pad_multiple`` phase) and
    validates the blend window and margin. Nothing is read or written.
    """
    tile = card.tile_size if tiling.tile is None else tiling.tile  # both checked: by Tiling and by the card
    if tile > MAX_TILE:
        raise ConfigError(f"tile size {tile} is larger than {MAX_TILE} px; use --tile-size {card.tile_size}")
    if card.fixed_size and tile != card.tile_size:
        raise ConfigError(f"model {card.name!r} only accepts {card.tile_size}-px tiles; drop --tile-size")
    ov = overlap_for(tile, card.pad_multiple) if tiling.overlap is None else tiling.overlap
    check_tiling(tile, ov, tiling.margin, card.pad_multiple)
    from affine import Affine

    layout = Layout.create(grid or Grid(shape, Affine.identity()), tile=tile, overlap=ov,
                           pad_multiple=card.pad_multiple, block_target=block_target)
    opts = RunOptions(layout.tile, layout.overlap, tiling.blend, batch_size, confidence, tiling.margin)
    opts.window()  # validate the blend and margin before any work
    return layout, opts
