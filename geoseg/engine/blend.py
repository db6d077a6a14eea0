"""Blending windows and the weighted accumulation of tile logits.

Overlapping tiles are merged as ``sum(w * logits) / sum(w)`` per pixel, where
``w`` is a 2-D window over the tile. Every window is strictly positive at
every pixel, the outermost row and column included, so no pixel can end with
zero weight (a linear or cosine ramp that reaches 0 at the tile edge leaves
lines of undefined pixels where only one tile reaches).

The outer ``margin`` pixels of a tile are where the network's zero padding
distorts its logits. There the window is scaled by :data:`MARGIN_WEIGHT`:
wherever another tile's interior covers the pixel, the margin contributes
nothing measurable; at the scene's outer edge, covered by one tile only, the
margin still defines the prediction. The named window shapes the interior
(``tile - 2 * margin`` pixels), so the overlap minus both margins is where
neighbouring tiles fade into each other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError
from ..geometry.units import NODATA

WindowFn = Callable[[int], np.ndarray]

#: Relative weight of a tile's margin pixels (see the module docstring).
MARGIN_WEIGHT = 1e-4
Blend = str | WindowFn


def _hann(n: int) -> np.ndarray:
    # Sampled at pixel centres, so both ends are > 0: sin^2(pi (i + 0.5) / n).
    return np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


def _triangular(n: int) -> np.ndarray:
    # 1 at the centre, 1/n at the outermost pixels.
    return 1.0 - np.abs(2.0 * (np.arange(n) + 0.5) / n - 1.0)


def _gaussian(n: int) -> np.ndarray:
    # sigma = n/8 as in nnU-Net's sliding window; exp(-8) ~ 3e-4 at the edges.
    x = np.arange(n) + 0.5 - n / 2.0
    return np.exp(-0.5 * (x / (n / 8.0)) ** 2)


def _mean(n: int) -> np.ndarray:
    return np.ones(n)


BLEND_WINDOWS: dict[str, WindowFn] = {
    "hann": _hann,
    "triangular": _triangular,
    "gaussian": _gaussian,
    "mean": _mean,
}


def make_window(blend: Blend, tile: int, margin: int = 0) -> np.ndarray:
    """The (tile, tile) float32 weight window for a named or callable blend.

    A callable receives the interior side ``n = tile - 2 * margin`` and
    returns either a 1-D profile of length ``n`` (applied separably,
    ``outer(p, p)``) or a full ``(n, n)`` window; weights must be finite and
    > 0. The interior is then extended to the margin (edge values) and the
    margin scaled by :data:`MARGIN_WEIGHT`.
    """
    if margin < 0 or 2 * margin >= tile:
        raise ConfigError(f"margin {margin} must be >= 0 and less than half the tile ({tile})")
    n = tile - 2 * margin
    if isinstance(blend, str):
        try:
            fn = BLEND_WINDOWS[blend]
        except KeyError:
            names = ", ".join(sorted(BLEND_WINDOWS))
            raise ConfigError(
                f"unknown blend window {blend!r}; choose one of: {names}"
            ) from None
        name = blend
    elif callable(blend):
        fn, name = blend, getattr(blend, "__name__", "callable")
    else:
        raise ConfigError(f"blend must be a window name or a callable, got {type(blend).__name__}")
    w = np.asarray(fn(n), dtype=np.float64)
    if w.shape == (n,):
        w = np.outer(w, w)
    if w.shape != (n, n):
        raise ConfigError(
            f"blend window {name!r} returned shape {w.shape}; expected ({n},) or ({n}, {n})"
        )
    if not np.all(np.isfinite(w)) or np.min(w) <= 0:
        raise ConfigError(
            f"blend window {name!r} has weights <= 0 or non-finite; every pixel needs a weight > 0"
        )
    if margin:
        w = np.pad(w, margin, mode="edge")
        edge = np.full(tile, MARGIN_WEIGHT)
        edge[margin:-margin] = 1.0
        w *= np.outer(edge, edge)
    return (w / w.max()).astype(np.float32)


def accumulate(acc: np.ndarray, logits: np.ndarray, window: np.ndarray, row: int, col: int) -> None:
    """Add one tile's weighted logits into ``acc`` in place.

    ``acc`` is (K + 1, H, W) float32: channels ``:K`` hold ``sum(w * logits)``,
    channel ``K`` holds ``sum(w)``. ``logits`` is (K, T, T) float32 at the
    output grid; ``(row, col)`` is the tile origin in ``acc``'s pixel
    coordinates. Where torch is loaded anyway (a torch model), torch runs
    the multiply and the add on views of the same memory; otherwise (ONNX
    Runtime alone, which starts 1.5 s sooner without torch) numpy runs them
    plane by plane, about 0.4 ms for a 256² tile of 3 classes, next to a
    forward pass of 50-100 ms. Both round the product and then the sum, so
    the result is the same to the bit whichever runs it (a fused
    multiply-add rounds once and would not be): a run resumed in a process
    without torch continues exactly what one with torch began.
    """
    k, t, _ = logits.shape
    torch = sys.modules.get("torch")
    # torch is used only once loaded in full: another thread may be importing it right now
    if torch is not None and not getattr(getattr(torch, "__spec__", None), "_initializing", False):
        region = torch.from_numpy(acc[:, row : row + t, col : col + t])
        w = torch.from_numpy(window)
        region[:k].add_(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)) * w)
        region[k].add_(w)
        return
    region = acc[:, row : row + t, col : col + t]
    scratch = np.empty(window.shape, np.float32)
    for c in range(k):
        np.multiply(logits[c], window, out=scratch)
        region[c] += scratch
    region[k] += window


def argmax_classes(scores: np.ndarray) -> np.ndarray:
    """``argmax(scores, axis=0)`` as uint8 (first maximum wins), for (K, H, W) scores.

    One pass per class over contiguous planes: about twice as fast as
    numpy's argmax along the leading axis, with no int64 temporary.
    """
    best = scores[0].copy()
    classes = np.zeros(best.shape, np.uint8)
    better = np.empty(best.shape, bool)
    for k in range(1, scores.shape[0]):
        np.greater(scores[k], best, out=better)
        np.maximum(best, scores[k], out=best)
        np.putmask(classes, better, k)
    return classes


def resolve(acc: np.ndarray, valid: np.ndarray | None = None, *, nodata: int = NODATA,
            confidence: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn an accumulator into a uint8 class map and, optionally, confidence.

    Confidence is the maximum softmax probability of the blended logits,
    float32 in [1/K, 1]; where ``valid`` is False the class is ``nodata`` and
    the confidence -1.
    """
    k = acc.shape[0] - 1
    weight = acc[k]
    if np.any(weight[valid if valid is not None else slice(None)] <= 0):
        raise RuntimeError("a valid pixel received no tile weight; the tiling is wrong")
    classes = argmax_classes(acc[:k])
    conf = None
    if confidence:
        logits = acc[:k] / np.maximum(weight, np.finfo(np.float32).tiny)
        logits -= logits.max(axis=0, keepdims=True)
        conf = (1.0 / np.exp(logits).sum(axis=0)).astype(np.float32)
    if valid is not None:
        classes[~valid] = nodata
        if conf is not None:
            conf[~valid] = -1.0
    return classes, conf

