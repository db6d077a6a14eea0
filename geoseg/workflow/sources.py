"""The scenes of a batch job, from what the user named on the command line.

A source is a raster path, a glob, a ``.txt`` list (one path or URL a line,
``#`` starts a comment; relative paths are relative to the list file), or a
STAC Item / ItemCollection JSON file (one scene per item: the asset named
``asset``, else the one with role ``data``; relative hrefs are relative to
the JSON file). URLs (``https://``, ``s3://``, ``/vsicurl/...``) are kept as
they are and read by GDAL with range requests.

Everything here is resolved in the client: local paths become absolute, so
workers with another working directory find the same files.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from ..errors import ConfigError, InputNotFoundError

_GLOB = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Media types of assets that GDAL reads as rasters (an asset without a type is tried too).
_RASTER_TYPES = ("image/tiff", "image/jp2", "application/x-hdf", "application/x-netcdf", "image/vnd.stac.geotiff")


_Found = tuple[str, str, str | None, str | None]  # (source, href, STAC item id, datetime)


@dataclass(frozen=True)
class Scene:
    """One input raster of a batch job.

    ``source`` is what the user named (a path, a list line, ``items.json#id``);
    ``href`` what GDAL reads (an absolute path or a URL); ``id`` the folder
    name of its outputs; ``datetime`` the acquisition time from its STAC item
    (ISO 8601), when there is one.
    """

    id: str
    source: str
    href: str
    datetime: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "href": self.href, "datetime": self.datetime}


def is_url(text: str) -> bool:
    """A URL or a GDAL virtual path: read as it is, never resolved against a folder."""
    return "://" in text or text.startswith("/vsi")


def local_path(href: str) -> Path | None:
    """The local file behind ``href`` (``file://`` URLs included), None for a remote one."""
    if href.startswith("file://"):
        return Path(urlparse(href).path)
    return None if is_url(href) else Path(href)


def absolute(path: str | Path | None) -> str | None:
    """A local path made absolute (URLs and names that are not files stay as they are)."""
    if path is None:
        return None
    text = str(path)
    if is_url(text) or not Path(text).exists():
        return text
    return str(Path(text).resolve())


def expand_sources(sources: Sequence[str | Path], *, asset: str | None = None) -> list[Scene]:
    """Every scene the ``sources`` name, in order, with unique ids.

    Raises :class:`~geoseg.errors.ConfigError` for a glob that matches
    nothing, a STAC item without a usable asset, or no scenes at all, and
    :class:`~geoseg.errors.InputNotFoundError` for a local path that does not
    exist: a job is refused before any work, not left to fail scene by scene.
    """
    found: list[_Found] = []
    for src in sources:
        found.extend(_expand_one(str(src), asset))
    if not found:
        raise ConfigError("no scenes to process; name rasters, globs, a .txt list or a STAC JSON file")
    ids = unique_ids([stac_id or _stem(href) for _, href, stac_id, _ in found])
    return [Scene(i, src, href, dt) for i, (src, href, _, dt) in zip(ids, found)]


def _expand_one(src: str, asset: str | None) -> list[_Found]:
    if is_url(src) and not src.lower().endswith(".json"):
        return [(src, src, None, None)]
    if _GLOB.search(src) and not Path(src).exists():
        matches = sorted(glob.glob(src, recursive=True))
        if not matches:
            raise ConfigError(f"{src!r} matches no files; check the pattern (quote it so the shell does not expand it)")
        out: list[_Found] = []
        for m in matches:
            out.extend(_expand_one(m, asset))
        return out
    suffix = src.lower().rsplit(".", 1)[-1] if "." in src else ""
    if suffix in ("json", "geojson"):
        return _stac_scenes(src, asset)
    path = Path(src)
    if not path.exists():
        raise InputNotFoundError(f"input {src} does not exist; check the path")
    if suffix == "txt":
        return _list_scenes(path)
    return [(src, str(path.resolve()), None, None)]


def _list_scenes(path: Path) -> list[_Found]:
    out: list[_Found] = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = re.split(r"\s+#", line, maxsplit=1)[0].strip()  # a comment after the path
        if is_url(line):
            out.append((line, line, None, None))
            continue
        p = Path(line) if Path(line).is_absolute() else path.parent / line
        if not p.exists():
            raise InputNotFoundError(f"{path.name} line {n}: {line} does not exist (relative paths are relative "
                                     f"to {path.parent.resolve()}); fix the line or remove it")
        out.append((line, str(p.resolve()), None, None))
    return out


def _read_json(src: str) -> dict[str, Any]:
    p = local_path(src)
    try:
        if p is not None:
            text = p.read_text()
        else:
            from urllib.request import urlopen

            with urlopen(src, timeout=60) as r:  # noqa: S310 - a URL the user named
                text = r.read().decode()
        doc = json.loads(text)
    except FileNotFoundError:
        raise InputNotFoundError(f"STAC file {src} does not exist; check the path") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read STAC JSON {src}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{src} is not a STAC Item or ItemCollection (a JSON object was expected)")
    return doc


def _stac_scenes(src: str, asset: str | None) -> list[_Found]:
    doc = _read_json(src)
    kind = doc.get("type")
    if kind == "Feature":
        items = [doc]
    elif kind == "FeatureCollection":
        items = list(doc.get("features") or [])
    else:
        raise ConfigError(f"{src} is not a STAC Item or ItemCollection (type is {kind!r}); "
                          "pass a Feature or FeatureCollection JSON file")
    p = local_path(src)
    base = p.resolve().as_uri() if p is not None else src
    out = []
    for item in items:
        iid = str(item.get("id") or "")
        href = _pick_asset(item, asset, src)
        out.append((f"{src}#{iid}" if iid else src, _resolve_href(href, base), iid or None, _item_datetime(item)))
    return out


def _pick_asset(item: dict[str, Any], asset: str | None, src: str) -> str:
    assets = item.get("assets") or {}
    name = item.get("id", "?")
    if asset is not None:
        if asset not in assets:
            raise ConfigError(f"STAC item {name} in {src} has no asset {asset!r}; "
                              f"assets: {', '.join(assets) or 'none'}")
        return str(assets[asset]["href"])
    data = [k for k, a in assets.items() if "data" in (a.get("roles") or [])
            and (not a.get("type") or str(a["type"]).startswith(_RASTER_TYPES))]
    if len(data) == 1:
        return str(assets[data[0]]["href"])
    what = "several assets with role 'data'" if data else "no raster asset with role 'data'"
    raise ConfigError(f"STAC item {name} in {src} has {what}; choose one with --asset KEY "
                      f"(assets: {', '.join(assets) or 'none'})")


def _resolve_href(href: str, base: str) -> str:
    """An asset href resolved against the STAC file (local results as absolute paths)."""
    if href.startswith("/vsi") or (href.startswith("/") and not base.startswith(("http://", "https://"))):
        return href
    full = urljoin(base, href)
    return str(Path(urlparse(full).path)) if full.startswith("file://") else full


def _item_datetime(item: dict[str, Any]) -> str | None:
    props = item.get("properties") or {}
    return props.get("datetime") or props.get("start_datetime")


def _stem(href: str) -> str:
    name = urlparse(href).path if "://" in href else href
    stem = Path(name.rstrip("/")).name.split("?")[0]
    return stem.rsplit(".", 1)[0] if "." in stem else stem


def unique_ids(names: Iterable[str]) -> list[str]:
    """Folder-safe names, made unique by a ``-2``, ``-3`` … suffix in order of appearance."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in names:
        base = _UNSAFE.sub("_", raw).strip("._") or "scene"
        name, n = base, 1
        while name.lower() in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name.lower())
        out.append(name)
    return out


def scene_pixels(href: str) -> int | None:
    """Width x height of a raster, or None when it cannot be opened (its task then reports why)."""
    import rasterio

    try:
        with rasterio.open(href) as ds:
            return int(ds.width) * int(ds.height)
    except Exception:  # the worker reports it, with retries
        return None


def model_file(model: str) -> tuple[Path | None, str]:
    """The model's file (a built-in name resolved) and its format."""
    from ..models.loading import builtin_models

    p = Path(model)
    if not p.exists() and model in builtin_models():
        p = builtin_models()[model].with_suffix(".safetensors")
    if p.is_dir():
        found = sorted(p.glob("*.onnx")) + sorted(p.glob("*.safetensors"))
        p = found[0] if found else p
    fmt = "onnx" if p.suffix.lower() == ".onnx" else "safetensors"
    return (p if p.is_file() else None), fmt
