"""Wrappers that change what one forward pass sees, with the engine unchanged around them.

* :class:`AtGroundResolution` runs a model at the ground resolution it was
  trained at: tiles are cut on the scene's own grid, each tile is resampled
  to the model's tile size (antialiased when shrinking), and its logits are
  resampled back to the tile before blending. The class raster stays on the
  scene's grid, and the logits reach that grid before the argmax.
* :class:`TestTimeAugmented` averages the logits of the dihedral transforms
  of each tile (undone on the logits) before blending.

Both take and give what a backend does: ``__call__`` on float32 numpy
(B, C, H, W) batches and ``forward_tensor`` on device tensors, so they work
in every engine, the device-resident one included. Around a model on ONNX
Runtime they stay in numpy (``forward_numpy``; resizing through ONNX
Runtime, :mod:`geoseg.engine.resize`), so a CPU run never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import numpy as np

from ..errors import ConfigError

#: ``--tta`` choices: the (rotations by 90°, horizontal flip) pairs averaged.
TTA = {
    "none": [(0, False)],
    "flips": [(0, False), (0, True), (2, True), (2, False)],  # identity, h-flip, v-flip, both
    "d4": [(k, f) for f in (False, True) for k in range(4)],
}

#: Largest tile, in scene pixels, that a resampled tile may span. Beyond it
#: the scene is first read on a grid of d x d-pixel cells (GDAL average; see
#: geoseg.io.raster.RasterSource's decimation), so memory stays that of ordinary tiles.
MAX_NATIVE_TILE = 2048

#: Tiles are never upsampled more than this: a scene this much coarser than
#: the model has too little detail for it, and resampling cannot add any.
MAX_UPSAMPLE = 8.0

#: ``--gsd auto`` resamples when the scene's ground resolution differs from
#: the model's by more than this factor either way.
GSD_TOLERANCE = 1.25


class _Wrapper:
    def __init__(self, inner: Any):
        self.inner = inner
        self.card = inner.card
        self.device = getattr(inner, "device", "cpu")
        self.precision = getattr(inner, "precision", "fp32")
        self.spec = getattr(inner, "spec", None)
        base = inner
        while isinstance(base, _Wrapper):
            base = base.inner
        # a backend without tensors (ONNX Runtime, a user's numpy model): transforms in numpy too
        self.numpy = not hasattr(base, "forward_tensor")

    @property
    def streams(self) -> int:
        return int(getattr(self.inner, "streams", 1))

    @property
    def threads(self) -> int:
        return int(getattr(self.inner, "threads", 0))

    @property
    def _slots(self) -> Any:
        return getattr(self.inner, "_slots", None) or contextlib.nullcontext()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.numpy:
            with self._slots:
                return self.forward_numpy(np.ascontiguousarray(x, dtype=np.float32))
        import torch

        with self._slots:
            if self.threads and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            with torch.inference_mode():
                t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
                return self.forward_tensor(t).cpu().numpy()

    def forward_tensor(self, x: Any) -> Any:  # pragma: no cover - every wrapper has its own
        raise NotImplementedError

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - every wrapper has its own
        raise NotImplementedError

    def _inner_numpy(self, x: np.ndarray) -> np.ndarray:
        if isinstance(self.inner, _Wrapper):
            return self.inner.forward_numpy(x)
        return np.asarray(self.inner._forward(np.ascontiguousarray(x)), dtype=np.float32)

    def _inner_forward(self, x: Any) -> Any:
        import torch

        if hasattr(self.inner, "forward_tensor"):
            return self.inner.forward_tensor(x)
        return torch.from_numpy(self.inner._forward(x.cpu().numpy())).to(x.device)


class TestTimeAugmented(_Wrapper):
    """Logits averaged over ``TTA[mode]`` transforms of each tile (square tiles)."""

    __test__ = False  # not a pytest class

    def __init__(self, inner: Any, mode: str):
        if mode not in TTA:
            raise ConfigError(f"unknown --tta {mode!r}; choose one of: {', '.join(TTA)}")
        super().__init__(inner)
        self.mode = mode
        self.transforms = TTA[mode]

    def forward_tensor(self, x: Any) -> Any:
        import torch

        out: Any = 0
        for k, flip in self.transforms:
            xt = torch.rot90(x, k, dims=(-2, -1))
            xt = torch.flip(xt, dims=(-1,)) if flip else xt
            y = self._inner_forward(xt.contiguous())
            y = torch.flip(y, dims=(-1,)) if flip else y
            y = torch.rot90(y, -k, dims=(-2, -1))
            out = out + y
        return out / len(self.transforms)

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:
        out: Any = 0
        for k, flip in self.transforms:
            xt = np.rot90(x, k, axes=(-2, -1))
            xt = xt[..., ::-1] if flip else xt
            y = self._inner_numpy(np.ascontiguousarray(xt))
            y = y[..., ::-1] if flip else y
            out = out + np.rot90(y, -k, axes=(-2, -1))
        return np.asarray(out / len(self.transforms), dtype=np.float32)


class AtGroundResolution(_Wrapper):
    """Run ``inner`` on tiles of ``native_tile`` scene pixels resampled to its ``card.tile_size``.

    ``native_tile = round(card.tile_size * ratio)`` where ``ratio`` is the
    model's ground sample distance over the scene's (> 1: the scene is finer
    than the model). The card this wrapper shows has ``tile_size =
    native_tile`` and ``pad_multiple = 1``: the engine tiles and blends on
    the scene's grid as usual.
    """

    def __init__(self, inner: Any, ratio: float, model_tile: int | None = None):
        super().__init__(inner)
        self.ratio = ratio
        self.model_tile = model_tile or inner.card.tile_size
        self.native_tile = max(8, int(round(self.model_tile * ratio)))
        self.card = dataclasses.replace(inner.card, tile_size=self.native_tile, pad_multiple=1, fixed_size=False)

    def forward_tensor(self, x: Any) -> Any:
        from torch.nn import functional as F

        n, m = x.shape[-1], self.model_tile
        small = n > m  # shrinking: average the pixels a model pixel covers (antialiased)
        xm = F.interpolate(x, size=(m, m), mode="bilinear", align_corners=False, antialias=small)
        y = self._inner_forward(xm)
        return F.interpolate(y, size=(x.shape[-2], n), mode="bilinear", align_corners=False, antialias=not small)

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:
        from ..models.backends import available_cores
        from .resize import resize

        n, m = x.shape[-1], self.model_tile
        small = n > m
        threads = self.threads or available_cores()  # 0: the model is on a GPU; the resizing is not
        y = self._inner_numpy(resize(x, (m, m), antialias=small, threads=threads))
        return resize(y, (x.shape[-2], n), antialias=not small, threads=threads)


def scene_gsd(grid: Any) -> float | None:
    """The scene's pixel size in metres (mean of x and y); None without a CRS.

    For a geographic CRS, degrees are taken in metres at the scene's centre
    latitude (a degree of longitude shrinks with its cosine).
    """
    from ..geometry.units import METRES_PER_DEGREE, metres_per_unit

    crs = grid.crs
    if crs is None:
        return None
    rx, ry = grid.resolution
    if crs.is_projected:
        k = metres_per_unit(crs)
        return (rx + ry) / 2 * k
    lat = (grid.transform * (grid.width / 2, grid.height / 2))[1]
    return (rx * math.cos(math.radians(lat)) + ry) / 2 * METRES_PER_DEGREE


def gsd_ratio(model_gsd: float | None, grid: Any, setting: str | float) -> float | None:
    """The resampling ratio ``--gsd`` asks for (model GSD / scene GSD), or None for none.

    ``setting`` is ``"off"``, ``"auto"`` (resample when the ratio is beyond
    :data:`GSD_TOLERANCE` either way and both GSDs are known) or a number of
    metres to run the model at (whatever its card says).
    """
    if setting == "off":
        scene = scene_gsd(grid)
        if model_gsd and scene and not 1 / 2 <= model_gsd / scene <= 2:
            warn(f"the scene's ground resolution ({scene:.3g} m) is {_times(model_gsd / scene)} the model's "
                 f"({model_gsd:.3g} m) and --gsd off keeps it; --gsd auto runs the model at its own")
        return None
    target = model_gsd if setting == "auto" else float(setting)
    if target is not None and (not math.isfinite(target) or target <= 0):
        raise ConfigError(f"--gsd must be auto, off or a ground resolution in metres > 0, got {setting}")
    scene = scene_gsd(grid)
    if target is None or scene is None:
        return None
    ratio = target / scene
    if setting == "auto" and 1 / GSD_TOLERANCE <= ratio <= GSD_TOLERANCE:
        return None
    if ratio < 1 / MAX_UPSAMPLE:
        msg = (f"the scene's ground resolution ({scene:.3g} m) is {_times(ratio)} the model's ({target:.3g} m): "
               f"too coarse to resample (at most {MAX_UPSAMPLE:g}x)")
        if setting != "auto":
            raise ConfigError(f"{msg}; use a model trained nearer {scene:.3g} m, or --gsd off")
        warn(f"{msg}; running at the scene's own resolution — expect a poor map")
        return None
    return ratio


def _times(ratio: float) -> str:
    return f"{ratio:.3g}x finer than" if ratio > 1 else f"{1 / ratio:.3g}x coarser than"


class GroundResolutionWarning(UserWarning):
    """The scene's ground resolution and the model's differ more than the options correct."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, GroundResolutionWarning, stacklevel=3)


def adapt(net: Any, tiling: Any, grid: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The model the engine runs for these options, the tiling to lay out, and what was done.

    Applies ``tiling.tta`` and ``tiling.gsd`` (see :func:`gsd_ratio`); with
    resampling, ``tile``/``overlap``/``margin`` given by the user are in the
    model's pixels and are scaled to the scene's.
    """
    card = net.card
    runner = net
    scene = scene_gsd(grid)
    info: dict[str, Any] = {"gsd": tiling.gsd, "scene_gsd_m": scene, "model_gsd_m": card.gsd, "ratio": None,
                            "tta": tiling.tta, "passes_per_tile": len(TTA[tiling.tta])}
    if tiling.tta != "none":
        runner = TestTimeAugmented(runner, tiling.tta)
    ratio = gsd_ratio(card.gsd, grid, tiling.gsd)
    if ratio is None:
        return runner, tiling, info
    runner, tiling = at_ratio(runner, ratio, tiling)
    info["ratio"] = ratio
    info["run_gsd_m"] = scene * ratio if scene else None  # the ground resolution the model runs at
    info["native_tile"] = runner.native_tile
    return runner, tiling, info


def at_ratio(runner: Any, ratio: float, tiling: Any) -> tuple[Any, Any]:
    """``runner`` on input resampled by ``1 / ratio`` (scene pixel / model pixel), with the map on the
    input's own grid; and ``tiling``, whose ``tile``/``overlap``/``margin`` are in the model's pixels,
    in the input's pixels."""
    card = runner.card
    model_tile = tiling.tile or card.tile_size
    if card.fixed_size and model_tile != card.tile_size:
        raise ConfigError(f"model {card.name!r} only accepts {card.tile_size}-px tiles; drop --tile-size")
    if model_tile % card.pad_multiple:
        raise ConfigError(f"tile size {model_tile} is not a multiple of the model's pad_multiple {card.pad_multiple}")
    from .options import check_tiling

    # what the user gave, checked in the model's pixels they gave it in (the scene's tiles, cut on its own
    # grid, have no pad_multiple: each is resampled to model_tile); in the scene's pixels it is only scaled
    check_tiling(model_tile, tiling.overlap or 0, tiling.margin)
    runner = AtGroundResolution(runner, ratio, model_tile)
    native = runner.native_tile

    def scale(v: int | None, top: int) -> int | None:
        return None if v is None else min(top, int(round(v * ratio)))

    return runner, dataclasses.replace(tiling, tile=native, overlap=scale(tiling.overlap, native // 2),
                                       margin=scale(tiling.margin, (native - 1) // 2))


@dataclasses.dataclass(frozen=True)
class AdaptedSpec:
    """A picklable recipe for the wrapped model (a cluster worker loads the backend once, then wraps it)."""

    spec: Any  # geoseg.models.loading.ModelSpec
    tta: str = "none"
    ratio: float | None = None
    model_tile: int | None = None

    @classmethod
    def around(cls, spec: Any, runner: Any, tta: str) -> AdaptedSpec:
        """The recipe for ``runner``, what :func:`adapt` made with ``tta``, around the model ``spec`` loads."""
        return cls(spec, tta, getattr(runner, "ratio", None), getattr(runner, "model_tile", None))

    def load(self) -> Any:
        from ..models.loading import cached_model

        runner: Any = cached_model(self.spec)
        if self.tta != "none":
            runner = TestTimeAugmented(runner, self.tta)
        if self.ratio is not None:
            runner = AtGroundResolution(runner, self.ratio, self.model_tile)
        return runner
