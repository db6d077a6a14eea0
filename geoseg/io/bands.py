"""Bands by name: a raster's band names (descriptions, colour interpretation) matched to a card's.

Pure string matching plus one reader of a dataset's band names; names are
compared case-insensitively after mapping common synonyms (``nir`` =
``nir08`` = ``near-infrared``, ``swir16`` = ``swir1``, ``r`` = ``red`` …).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..errors import BandCountError, ConfigError

_ALIASES = {
    "r": "red", "g": "green", "b": "blue", "nir": "nir", "nir08": "nir", "nearinfrared": "nir",
    "nearir": "nir", "nir1": "nir", "swir1": "swir16", "swir16": "swir16", "swir2": "swir22",
    "swir22": "swir22", "coastalaerosol": "coastal", "coastal": "coastal", "gray": "gray", "grey": "gray",
    "pan": "pan", "panchromatic": "pan", "rededge": "rededge", "alpha": "alpha",
}

#: GDAL colour interpretations that name a band (Undefined and the palette ones do not).
_NAMED_INTERP = {"red", "green", "blue", "alpha", "gray", "pan", "nir", "swir", "coastal", "rededge"}


def normalise(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    key = key.removeprefix("band")
    return _ALIASES.get(key, key)


def raster_band_names(ds: Any) -> list[str | None]:
    """One name per band (1-based order), or None where the raster does not name it.

    The band description wins; else the colour interpretation when it names
    a band (``red``, ``green``, ``blue``, ``alpha``, ``gray`` …).
    """
    names: list[str | None] = []
    for desc, ci in zip(ds.descriptions, ds.colorinterp):
        if desc and desc.strip():
            names.append(normalise(desc))
        elif ci.name.lower() == "gray" and ds.count > 1:
            names.append(None)  # GDAL's default for the first band of any multi-band GeoTIFF: not a name
        elif ci.name.lower() in _NAMED_INTERP:
            names.append(normalise(ci.name))
        else:
            names.append(None)
    return names


def match_bands(raster: Sequence[str | None], wanted: Sequence[str]) -> list[int] | None:
    """1-based raster bands for the card's band names, in the card's order; None unless all match."""
    index = {n: i + 1 for i, n in reversed(list(enumerate(raster))) if n}
    found = [index.get(normalise(w)) for w in wanted]
    return None if any(f is None for f in found) else [int(f) for f in found if f is not None]


def parse_bands(value: Sequence[int | str], raster: Sequence[str | None], src: str) -> list[int]:
    """``--bands`` given as indexes (``3,2,1``) or names (``red,green,blue``) -> 1-based indexes."""
    out = []
    for v in value:
        if isinstance(v, int) or str(v).strip().isdigit():
            out.append(int(v))
            continue
        hit = match_bands(raster, [str(v)])
        if hit is None:
            raise ConfigError(f"{src} has no band named {v!r}; its bands: {describe(raster)}")
        out.append(hit[0])
    return out


def describe(raster: Sequence[str | None]) -> str:
    return ", ".join(f"{i}={n or '?'}" for i, n in enumerate(raster, 1))


def band_mismatch(src: str, use: Sequence[int], raster: Sequence[str | None], card: Any,
                  chosen: bool = False) -> BandCountError:
    """The error for a band count the model does not take, with a hint that is only as sure as the names.

    ``chosen``: the bands were picked with ``--bands`` (the raster may have enough; the choice has not).
    """
    wanted = list(card.bands or [])
    expect = f" ({', '.join(wanted)})" if wanted else ""
    what = f"--bands selects {len(use)} bands" if chosen else f"{src} has {len(use)} data bands"
    head = f"{what} but model {card.name!r} expects {card.in_channels}{expect}"
    if len(use) < card.in_channels and (not chosen or len(raster) < card.in_channels):
        return BandCountError(f"{head}; use a raster with the bands the model was trained on")
    hit = match_bands(raster, wanted) if wanted else None
    if hit:
        return BandCountError(f"{head}; by band names use --bands {','.join(map(str, hit))}")
    if wanted and any(raster):
        return BandCountError(f"{head}; the raster's bands ({describe(raster)}) do not all match the model's "
                              f"({', '.join(wanted)}): choose {card.in_channels} with --bands in that order")
    return BandCountError(f"{head}; the raster names no bands, so the order is unknown: choose "
                          f"{card.in_channels} with --bands in the model's order"
                          + (f" ({', '.join(wanted)})" if wanted else ""))
