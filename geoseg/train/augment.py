"""Augmentations that suit overhead imagery, applied to image and mask alike (numpy).

Overhead scenes have no "up": all eight symmetries of the square (D4: flips
and 90° rotations) are valid. Scale jitter resamples the crop (bilinear for
the image, nearest for the mask) to mimic other ground resolutions; colour
jitter changes brightness and contrast per image (the image only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    d4: bool = True
    scale_min: float = 0.75
    scale_max: float = 1.25
    brightness: float = 0.15  # +- fraction of the value range
    contrast: float = 0.15  # +- fraction


def d4(img: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Element ``k`` (0..7) of the dihedral group: k % 4 quarter turns, then a flip if k >= 4."""
    img, mask = np.rot90(img, k % 4, axes=(1, 2)), np.rot90(mask, k % 4)
    if k >= 4:
        img, mask = img[:, :, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def rescale(img: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample a square crop to ``size`` (bilinear image, nearest mask)."""
    import torch
    from torch.nn import functional as F

    if img.shape[-1] == size:
        return img, mask
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
    m = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
    ti = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()
    tm = F.interpolate(m, size=(size, size), mode="nearest")[0, 0].numpy().astype(np.uint8)
    return ti, tm


def augment_sample(rng: np.random.Generator, sample_fn, size: int, cfg: AugmentConfig,
                   value_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw a crop of a jittered size from ``sample_fn(rng, s)``, rescale to ``size``, D4, colour.

    The crop side is ``size`` times a log-uniform factor in [scale_min, scale_max]
    (as likely to halve as to double the ground resolution).
    """
    s = int(round(size * np.exp(rng.uniform(np.log(cfg.scale_min), np.log(cfg.scale_max)))))
    img, mask = sample_fn(rng, max(8, s))
    img, mask = rescale(img.astype(np.float32), mask, size)
    if cfg.d4:
        img, mask = d4(img, mask, int(rng.integers(8)))
    if cfg.brightness or cfg.contrast:
        mean = img.mean(axis=(1, 2), keepdims=True)
        c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        b = rng.uniform(-cfg.brightness, cfg.brightness) * value_range
        img = (img - mean) * c + mean + b
    return img.astype(np.float32), mask
