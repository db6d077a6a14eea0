"""The model card: the YAML that travels with every model.

See ``docs/model-card.md`` for the schema. The card says how raw raster
values become model input (``input_scale``, ``mean``, ``std``), which bands
the model reads, how it must be tiled (``tile_size``, ``pad_multiple``,
``fixed_size``) and what its outputs mean (``classes``, ``colors``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import ModelCardError

#: Colours for cards that give none (tab10-like, readable on imagery).
DEFAULT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)

#: Metadata a card may carry at the top level besides the schema: kept in
#: ``ModelCard.extra`` and written back unchanged. Any other key is refused
#: as a likely typo; free-form metadata goes under an ``extra:`` mapping.
METADATA_KEYS = ("provenance", "metrics", "gsd_note", "notes")


@dataclass(frozen=True)
class ModelCard:
    """What a model needs to be run and its output read. Units in field docs."""

    name: str
    classes: tuple[str, ...]
    in_channels: int
    bands: tuple[str, ...] | None = None
    colors: tuple[str, ...] | None = None
    input_scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tile_size: int = 512
    pad_multiple: int = 32
    fixed_size: bool = False
    gsd: float | None = None  # metres per pixel the model was trained at
    gsd_range: tuple[float, ...] | None = None  # (min, max) metres per pixel seen in training
    imagery: str | None = None  # the kind of imagery it was trained on (sensor, platform, bands)
    architecture: str | None = None
    description: str = ""
    license: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"model card {self.name!r}"
        if not self.classes:
            raise ModelCardError(f"{where}: 'classes' is empty; list the class names, index = id")
        if len(self.classes) > 255:
            raise ModelCardError(f"{where}: {len(self.classes)} classes; at most 255 fit a uint8 map")
        if self.bands is not None and len(self.bands) != self.in_channels:
            raise ModelCardError(
                f"{where}: {len(self.bands)} band names but in_channels={self.in_channels}; "
                "give one name per input band"
            )
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) != self.in_channels:
                raise ModelCardError(
                    f"{where}: '{key}' has {len(v)} values, expected one per band ({self.in_channels}); "
                    f"fix '{key}'"
                )
        if self.std is not None and min(self.std) <= 0:
            raise ModelCardError(f"{where}: 'std' has a value <= 0; every std must be > 0")
        if self.colors is not None and len(self.colors) != len(self.classes):
            raise ModelCardError(
                f"{where}: {len(self.colors)} colors for {len(self.classes)} classes; give one colour per class"
            )
        if self.tile_size <= 0 or self.pad_multiple <= 0 or self.tile_size % self.pad_multiple:
            raise ModelCardError(
                f"{where}: tile_size {self.tile_size} must be a positive multiple of "
                f"pad_multiple {self.pad_multiple}; fix tile_size or pad_multiple in the card"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def palette(self) -> list[tuple[int, int, int]]:
        """RGB triples, one per class (the card's colours or a default cycle)."""
        cols = self.colors or tuple(
            DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(self.num_classes)
        )
        return [_hex_to_rgb(c, self.name) for c in cols]

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw (..., C, H, W) values to float32 model input: ``(raw * input_scale - mean) / std``."""
        x = raw.astype(np.float32, copy=True)
        # one multiply and one subtract: (raw * s - m) / d == raw * (s / d) - m / d
        d = np.asarray(self.std if self.std is not None else [1.0] * x.shape[-3], np.float64)[:, None, None]
        m = np.asarray(self.mean if self.mean is not None else [0.0] * x.shape[-3], np.float64)[:, None, None]
        if self.input_scale != 1.0 or self.std is not None:
            x *= (self.input_scale / d).astype(np.float32)
        if self.mean is not None:
            x -= (m / d).astype(np.float32)
        return x

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}
        out.update({k: v for k, v in extra.items() if k in METADATA_KEYS})
        rest = {k: v for k, v in extra.items() if k not in METADATA_KEYS}
        if rest:
            out["extra"] = rest
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "card") -> ModelCard:
        if not isinstance(data, dict):
            raise ModelCardError(f"{source}: expected a YAML mapping, got {type(data).__name__}; "
                                 "write the card as 'key: value' lines")
        d = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = d.pop("extra", None) or {}
        if not isinstance(extra, dict):
            raise ModelCardError(f"{source}: 'extra' must be a mapping of metadata, got {type(extra).__name__}")
        for k in d:
            if k not in known and k not in METADATA_KEYS:
                raise ModelCardError(f"{source}: {_unknown_key(k, known)}")
        for key in ("name", "classes"):
            if key not in d:
                raise ModelCardError(f"{source}: missing required key '{key}'; add it to the card")
        classes = d["classes"]
        if isinstance(classes, dict):  # {id: name}, ids 0..K-1
            try:
                classes = [classes[i] for i in range(len(classes))]
            except KeyError:
                raise ModelCardError(f"{source}: 'classes' ids must be 0..K-1; number them from 0 without "
                                     "gaps") from None
        d["classes"] = classes
        if "in_channels" not in d:
            if "bands" not in d:
                raise ModelCardError(f"{source}: give 'bands' (names) or 'in_channels'")
            d["in_channels"] = len(d["bands"])
        kwargs: dict[str, Any] = {}
        extra = dict(extra)
        for k, v in d.items():
            if k in known:
                kwargs[k] = tuple(v) if isinstance(v, list) else v
            else:
                extra[k] = v
        try:
            for k in ("input_scale", "gsd"):
                if kwargs.get(k) is not None:
                    kwargs[k] = float(kwargs[k])
            for k in ("mean", "std", "gsd_range"):
                if kwargs.get(k) is not None:
                    kwargs[k] = tuple(float(x) for x in kwargs[k])
            if kwargs.get("gsd_range") is not None and len(kwargs["gsd_range"]) != 2:
                raise ModelCardError(f"{source}: 'gsd_range' must be [min, max] metres per pixel")
            for k in ("tile_size", "pad_multiple", "in_channels"):
                if k in kwargs:
                    kwargs[k] = int(kwargs[k])
            kwargs["classes"] = tuple(str(c) for c in kwargs["classes"])
            return cls(**kwargs, extra=extra)
        except (TypeError, ValueError) as e:
            if isinstance(e, ModelCardError):
                raise
            raise ModelCardError(f"{source}: {e}; fix that value in the card") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        p = Path(path)
        if not p.is_file():
            raise ModelCardError(f"model card {p} does not exist; pass --card PATH to the card YAML")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ModelCardError(f"model card {p} is not valid YAML ({str(e).splitlines()[0]}{where}); "
                                 "fix its syntax") from None
        return cls.from_dict(data, source=f"model card {p}")


def _unknown_key(key: Any, known: set[str]) -> str:
    """``unknown card key 'tilesize'; did you mean 'tile_size'?`` (or the valid keys)."""
    valid = sorted(known | set(METADATA_KEYS))
    near = difflib.get_close_matches(str(key), valid, n=1)
    if near:
        return f"unknown card key {str(key)!r}; did you mean {near[0]!r}?"
    return (f"unknown card key {str(key)!r}; valid keys: {', '.join(valid)} "
            "(put other metadata under 'extra:')")


def _hex_to_rgb(c: str, name: str) -> tuple[int, int, int]:
    s = str(c).lstrip("#")
    if len(s) != 6:
        raise ModelCardError(f"model card {name!r}: colour {c!r} is not '#rrggbb'")
    try:
        return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)
    except ValueError:
        raise ModelCardError(f"model card {name!r}: colour {c!r} is not '#rrggbb'") from None
