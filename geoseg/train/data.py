"""Training data: image + class-mask folders, and georeferenced rasters + vector labels.

Image/mask layout (Ultralytics / Roboflow export)::

    path: datasets/dubai          # root; relative paths resolve against the YAML's folder
    train: images/train           # a folder, a .txt list of image paths, a glob, or a list of these
    val: images/val
    test: images/test             # optional
    masks_dir: masks              # mask path = image path with /images/ -> /masks/, suffix .png
    names: {0: building, 1: land}
    label_mapping: {5: 255}       # optional: source id -> train id (255 = ignore)
    channels: 3                   # optional
    scales: {"tile_4_*": 0.5}     # optional: image name pattern -> resampling factor

Masks are single-channel class ids; 255 is ignored by losses and metrics.
``scales`` brings images of different ground resolutions to a common one
where they carry no georeference: an image matching a pattern is resampled
by its factor (> 1 enlarges) for training, and evaluated as ``predict
--gsd`` would run it at that resolution (tiles resampled, the map on the
image's own grid).

Georeferenced layout (``type: geo``)::

    type: geo
    path: ../shared/data/nrcan/new_brunswick_aerial
    train: [a.tif]                # rasters per split
    val: [b.tif]
    labels: labels.gpkg           # polygons with a class attribute (any CRS)
    class_field: Niveau_3
    names: {0: forest, 1: water}
    label_mapping: {Forest: 0, Hydro: water}  # attribute value -> class id or name (others: 255);
                                  # without it, ids or class names (any case)
    window: 256                   # side of the random windows (pixels)
    samples_per_epoch: 64
"""

from __future__ import annotations

import contextlib
import glob
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import ConfigError
from ..geometry.grid import Grid
from ..io.vector import rasterize_on
from .metrics import IGNORE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


@dataclass
class DatasetSpec:
    """A parsed dataset YAML (either layout)."""

    root: Path
    names: list[str]
    splits: dict[str, Any]
    masks_dir: str = "masks"
    label_mapping: dict[Any, int] = field(default_factory=dict)
    channels: int | None = None
    kind: str = "masks"
    labels: Path | None = None
    class_field: str | None = None
    window: int = 256
    samples_per_epoch: int = 64
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def scale_of(self, image: Path) -> float:
        """The resampling factor ``scales`` gives ``image`` (the first matching pattern; 1 for none)."""
        import fnmatch

        return next((f for pat, f in self.scales.items() if fnmatch.fnmatch(image.name, pat)), 1.0)


def load_dataset_spec(path: str | Path) -> DatasetSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dataset YAML {p} does not exist; check the path (--data, or the recipe's data.dataset)")
    d = yaml.safe_load(p.read_text()) or {}
    if "names" not in d:
        raise ConfigError(f"dataset YAML {p}: missing 'names' ({{id: name}})")
    names_raw = d["names"]
    if isinstance(names_raw, dict):
        try:
            names = [str(names_raw[i]) for i in range(len(names_raw))]
        except KeyError:
            raise ConfigError(f"dataset YAML {p}: 'names' ids must be 0..K-1") from None
    else:
        names = [str(n) for n in names_raw]
    root = (p.parent / d.get("path", ".")).resolve()
    splits = {k: d[k] for k in ("train", "val", "test") if d.get(k) is not None}
    kind = d.get("type", "masks")
    if kind not in ("masks", "geo"):
        raise ConfigError(f"dataset YAML {p}: type must be 'masks' or 'geo', got {kind!r}")
    spec = DatasetSpec(
        root=root, names=names, splits=splits, masks_dir=d.get("masks_dir", "masks"),
        label_mapping=dict(d.get("label_mapping") or {}), channels=d.get("channels"), kind=kind,
        labels=(root / d["labels"]) if d.get("labels") else None, class_field=d.get("class_field"),
        window=int(d.get("window", 256)), samples_per_epoch=int(d.get("samples_per_epoch", 64)),
        scales={str(k): float(v) for k, v in (d.get("scales") or {}).items()},
    )
    if any(not 0.1 <= f <= 10 for f in spec.scales.values()):
        raise ConfigError(f"dataset YAML {p}: 'scales' factors must be in [0.1, 10]")
    if kind == "geo" and (spec.labels is None or spec.class_field is None):
        raise ConfigError(f"dataset YAML {p}: a geo dataset needs 'labels' and 'class_field'")
    return spec


def split_images(spec: DatasetSpec, split: str) -> list[Path]:
    """Image paths of a split: folders, list files, globs, or a list of those."""
    if split not in spec.splits:
        raise ConfigError(f"the dataset has no '{split}' split; it has: {', '.join(spec.splits)}")
    entries = spec.splits[split]
    entries = entries if isinstance(entries, list) else [entries]
    out: list[Path] = []
    for e in entries:
        p = spec.root / str(e)
        if any(ch in str(e) for ch in "*?["):
            out += [Path(x) for x in sorted(glob.glob(str(p)))]
        elif p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix == ".txt" and p.is_file():
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    q = q if q.is_absolute() else spec.root / q
                    if not q.is_file():
                        raise ConfigError(f"split '{split}': {q}, listed in {p}, does not exist")
                    out.append(q)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"split '{split}': {p} is not a folder, list file, glob or image")
    if not out:
        raise ConfigError(f"split '{split}' has no images: {', '.join(str(spec.root / str(e)) for e in entries)} "
                          "matches none")
    return out


def mask_path(spec: DatasetSpec, image: Path) -> Path:
    """``…/images/…/x.jpg`` -> ``…/<masks_dir>/…/x.png``."""
    parts = list(image.parts)
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        parts[i] = spec.masks_dir
        m = Path(*parts).with_suffix(".png")
    else:
        m = image.parent.parent / spec.masks_dir / (image.stem + ".png")
    if not m.exists():
        raise ConfigError(f"no mask for {image}: expected {m}")
    return m


def read_image(path: Path) -> np.ndarray:
    """(C, H, W) array from any GDAL-readable image (JPEG, PNG, GeoTIFF)."""
    with _opened(path) as ds:
        return ds.read()


def image_shape(path: Path) -> tuple[int, int]:
    """(H, W) of an image, from its header (nothing decoded)."""
    with _opened(path) as ds:
        return ds.height, ds.width


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            yield ds


def read_mask(spec: DatasetSpec, image: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The class ids of ``image``'s mask (label_mapping applied), checked against the image and the classes."""
    path = mask_path(spec, image)
    raw = read_image(path)
    if raw.shape[0] > 1 and not all(np.array_equal(raw[0], b) for b in raw[1:]):
        raise ConfigError(f"mask {path} has {raw.shape[0]} different bands; masks are single-channel class ids "
                          "(export the masks as class-id PNGs, not colours)")
    m = raw[0]
    if m.shape != tuple(shape):
        raise ConfigError(f"mask of {image.name} is {m.shape}, image is {tuple(shape)}")
    m = remap(m, spec.label_mapping)
    bad = np.unique(m[(m >= spec.num_classes) & (m != IGNORE)])
    if bad.size:
        ids = ", ".join(map(str, bad[:5])) + (", …" if bad.size > 5 else "")
        raise ConfigError(f"mask {path} has class ids {ids} outside 0..{spec.num_classes - 1} (255: ignored); "
                          "map them with label_mapping in the dataset YAML, or fix the mask")
    return m


def remap(mask: np.ndarray, mapping: dict[Any, int]) -> np.ndarray:
    if not mapping:
        return mask
    lut = np.arange(256, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[int(src)] = int(dst)
    return lut[mask]


class MaskDataset:
    """Images and class masks of one split, decoded once and kept in memory.

    ``sample(rng, size)`` returns a random (C, size, size) float32 crop (raw
    values) and its (size, size) uint8 mask; images smaller than ``size`` are
    padded (mask padding = ignore).
    """

    def __init__(self, spec: DatasetSpec, split: str):
        self.spec = spec
        self.paths = split_images(spec, split)
        self.items: list[tuple[np.ndarray, np.ndarray]] = []
        for p in self.paths:
            img = read_image(p)
            if spec.channels and img.shape[0] != spec.channels:
                img = img[: spec.channels]
            m = read_mask(spec, p, img.shape[1:])
            img, m = rescale(img, m, spec.scale_of(p))
            self.items.append((img, m))
        self.weights = np.array([m.size for _, m in self.items], np.float64)
        self.weights /= self.weights.sum()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def in_channels(self) -> int:
        return int(self.items[0][0].shape[0])

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        img, mask = self.items[rng.choice(len(self.items), p=self.weights)]
        return random_crop(rng, img, mask, size)

    def class_pixels(self) -> np.ndarray:
        k = self.spec.num_classes
        counts = np.zeros(k, np.int64)
        for _, m in self.items:
            counts += np.bincount(m.ravel(), minlength=256)[:k]
        return counts


def rescale(img: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear, antialiased when shrinking, as predict's ``--gsd``) and mask (nearest) resampled
    by ``factor``."""
    if factor == 1:
        return img, mask
    from ..engine.resize import resize
    from ..models.backends import available_cores

    h, w = mask.shape
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    out = resize(img[None].astype(np.float32), size, antialias=factor < 1, threads=available_cores())[0]
    out = np.clip(np.rint(out), 0, np.iinfo(img.dtype).max).astype(img.dtype) if img.dtype.kind == "u" else out
    rows = np.minimum(((np.arange(size[0]) + 0.5) / factor).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) / factor).astype(np.int64), w - 1)
    return out, mask[rows[:, None], cols[None, :]]


def random_crop(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray,
                size: int) -> tuple[np.ndarray, np.ndarray]:
    c, h, w = img.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        img = np.pad(img, ((0, 0), (0, ph), (0, pw)))
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
        h, w = mask.shape
    r = int(rng.integers(0, h - size + 1))
    q = int(rng.integers(0, w - size + 1))
    return img[:, r : r + size, q : q + size], mask[r : r + size, q : q + size]


class GeoDataset:
    """Random windows from georeferenced rasters, labels rasterized on the fly.

    Vector labels are read once, reprojected to each raster's CRS and
    rasterized per window (``rasterio.features.rasterize``); pixels outside
    every labelled polygon are ignore (255) rather than a guessed background.
    """

    def __init__(self, spec: DatasetSpec, split: str):
        import pyogrio
        import rasterio

        self.spec = spec
        self.paths = split_images(spec, split)
        assert spec.labels is not None and spec.class_field is not None
        gdf = pyogrio.read_dataframe(spec.labels)
        if spec.class_field not in gdf.columns:
            raise ConfigError(
                f"{spec.labels.name} has no field {spec.class_field!r}; fields: {', '.join(gdf.columns[:-1])}"
            )
        gdf["_id"] = label_ids(gdf[spec.class_field], spec.label_mapping, spec.names)
        gdf = gdf[gdf["_id"] != IGNORE]
        self.rasters = []
        for p in self.paths:
            with rasterio.open(p) as ds:
                shapes = gdf.to_crs(ds.crs) if gdf.crs and ds.crs and gdf.crs != ds.crs else gdf
                self.rasters.append((p, ds.shape, list(zip(shapes.geometry, shapes["_id"]))))

    def __len__(self) -> int:
        return self.spec.samples_per_epoch

    @property
    def in_channels(self) -> int:
        import rasterio

        with rasterio.open(self.paths[0]) as ds:
            return ds.count

    def read_window(self, k: int, row: int, col: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        import rasterio
        from rasterio.windows import Window
        from rasterio.windows import transform as wtransform

        path, _, shapes = self.rasters[k]
        win = Window(col, row, size, size)
        with rasterio.open(path) as ds:
            img = ds.read(window=win, boundless=True, fill_value=0)
            t = wtransform(win, ds.transform)
            valid = ds.read_masks(1, window=win, boundless=True) > 0
        mask = rasterize_on(shapes, Grid((size, size), t), fill=IGNORE, dtype="uint8")
        mask[~valid] = IGNORE
        return img, mask

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(rng.integers(len(self.rasters)))
        h, w = self.rasters[k][1]
        r = int(rng.integers(0, max(1, h - size + 1)))
        q = int(rng.integers(0, max(1, w - size + 1)))
        return self.read_window(k, r, q, size)

    def band_stats(self) -> tuple[list[float], list[float]]:
        """Per-band mean and std over every raster of the split (computed once)."""
        import rasterio

        s = s2 = n = 0.0
        for p in self.paths:
            with rasterio.open(p) as ds:
                x = ds.read(masked=True).astype(np.float64)
                s = s + x.sum(axis=(1, 2)).filled(0)
                s2 = s2 + (x**2).sum(axis=(1, 2)).filled(0)
                n = n + x.count(axis=(1, 2))
        mean = np.asarray(s) / np.asarray(n)
        std = np.sqrt(np.maximum(np.asarray(s2) / np.asarray(n) - mean**2, 1e-12))
        return [float(v) for v in mean], [float(v) for v in std]


def label_ids(values: Any, mapping: dict[Any, Any], names: list[str]) -> list[int]:
    """Class ids for label attribute values.

    With a mapping, ``value -> class id or class name`` (unmapped values are
    ignored, 255). Without one, integer values are ids and text values are
    matched to the class names, ignoring case.
    """
    by_name = {n.lower(): i for i, n in enumerate(names)}

    def to_id(v: Any) -> int:
        if isinstance(v, str) and not v.strip().lstrip("-").isdigit():
            if v.lower() not in by_name:
                raise ConfigError(f"label mapping target {v!r} is not a class; classes: {', '.join(names)}")
            return by_name[v.lower()]
        return int(v)

    if mapping:
        m = {str(k): to_id(v) for k, v in mapping.items()}
        return [m.get(str(v), IGNORE) for v in values]
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        return [by_name.get(str(v).lower(), IGNORE) for v in values]


class MixedDataset:
    """A main dataset plus extra ones (same classes and bands) that a share of the samples comes from.

    Band statistics and class weights come from the main dataset; the extras
    add variety (other sensors, other places) to what the model sees.
    """

    def __init__(self, main: MaskDataset | GeoDataset, extras: list[MaskDataset | GeoDataset], share: float):
        for e in extras:
            if list(e.spec.names) != list(main.spec.names):
                raise ConfigError(f"extra dataset {e.spec.root}: classes {list(e.spec.names)} differ from "
                                  f"{list(main.spec.names)}; map its labels onto the same classes")
            if e.in_channels != main.in_channels:
                raise ConfigError(f"extra dataset {e.spec.root}: {e.in_channels} bands, main has {main.in_channels}")
        if not 0 <= share < 1:
            raise ConfigError(f"data.extra_share must be in [0, 1), got {share}")
        self.main, self.extras, self.share = main, extras, share
        self.spec = main.spec
        self.paths = list(main.paths) + [p for e in extras for p in e.paths]

    def __len__(self) -> int:
        return len(self.main) + sum(len(e) for e in self.extras)

    @property
    def in_channels(self) -> int:
        return self.main.in_channels

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.extras and rng.random() < self.share:
            return self.extras[int(rng.integers(len(self.extras)))].sample(rng, size)
        return self.main.sample(rng, size)


def balanced(sample: Any, num_classes: int, share: float, tries: int = 8) -> Any:
    """``sample(rng, size)`` with a ``share`` of its crops aimed at a class drawn uniformly.

    For such a crop, a class is drawn with equal odds for every class, and of
    ``tries`` random crops the one with the most pixels of it is kept. Rare
    classes (roads, vegetation in desert cities) are then seen far more often
    than their share of the pixels, for any dataset layout.
    """
    if not 0 <= share <= 1:
        raise ConfigError(f"data.class_balance must be in [0, 1], got {share}")
    if share == 0:
        return sample

    def draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() >= share:
            return sample(rng, size)
        c = int(rng.integers(num_classes))
        crops = [sample(rng, size) for _ in range(tries)]
        return max(crops, key=lambda im: int(np.count_nonzero(im[1] == c)))

    return draw


def open_dataset(spec: DatasetSpec, split: str) -> MaskDataset | GeoDataset:
    return GeoDataset(spec, split) if spec.kind == "geo" else MaskDataset(spec, split)
