"""Evaluation through the predict engine, so validation measures what predict produces.

* :func:`evaluate_dataset` — every image of a split at native resolution,
  tiled and blended exactly as ``geoseg predict`` does.
* :func:`evaluate_scene` — a whole raster against a reference (label raster or
  vector labels), the confusion matrix streamed block by block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.blocks import as_runnable, predict_array
from ..engine.options import Tiling, resolve
from ..engine.schedule import stream_blocks
from ..errors import ConfigError
from ..geometry.grid import Grid
from ..io.raster import RasterSource, data_bands, open_raster
from ..io.vector import rasterize_on
from .data import DatasetSpec, label_ids, read_image, read_mask, remap, split_images
from .metrics import IGNORE, ConfusionMatrix


def evaluate_dataset(model: Any, spec: DatasetSpec, split: str = "val", *, tile: int | None = None,
                     overlap: int | None = None, blend: Any = "hann", margin: int | None = None,
                     batch_size: int = 4, tta: str = "none",
                     progress: Callable[[int, int], None] | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over an image/mask split (tiling options and ``tta`` as predict's)."""
    model = _with_tta(as_runnable(model), tta)
    tiling = Tiling(tile, overlap, blend, margin)
    if spec.kind != "masks":
        return _evaluate_geo(model, spec, split, tiling=tiling, batch_size=batch_size)
    if spec.num_classes != model.card.num_classes:
        raise ConfigError(
            f"the dataset has {spec.num_classes} classes, the model {model.card.num_classes}"
        )
    cm = ConfusionMatrix(spec.num_classes)
    paths = split_images(spec, split)
    for n, p in enumerate(paths, 1):
        img = read_image(p)[: model.card.in_channels]
        truth = read_mask(spec, p, img.shape[1:])
        runner, tiled = _at_scale(model, spec.scale_of(p), tiling)
        _, opts = resolve(runner.card, img.shape[1:], tiled, batch_size=batch_size)
        cm.update(predict_array(img, runner, opts).classes, truth)
        if progress:
            progress(n, len(paths))
    return cm


def _at_scale(model: Any, factor: float, tiling: Tiling) -> tuple[Any, Tiling]:
    """``model`` run on an image resampled by ``factor``, as ``predict --gsd`` does it (the map on the
    image's own grid), and the tiling in the image's pixels."""
    if factor == 1:
        return model, tiling
    from ..engine.adapters import at_ratio

    return at_ratio(model, 1 / factor, tiling)


def _with_tta(model: Any, tta: str) -> Any:
    from ..engine.adapters import TestTimeAugmented

    return model if tta == "none" or isinstance(model, TestTimeAugmented) else TestTimeAugmented(model, tta)


def _evaluate_geo(model: Any, spec: DatasetSpec, split: str, *, tiling: Tiling,
                  batch_size: int) -> ConfusionMatrix:
    cm = ConfusionMatrix(spec.num_classes)
    for p in split_images(spec, split):
        cm.merge(evaluate_scene(model, p, spec.labels, class_field=spec.class_field,
                                label_mapping=spec.label_mapping, tile=tiling.tile, overlap=tiling.overlap,
                                blend=tiling.blend, margin=tiling.margin, batch_size=batch_size))
    return cm


def evaluate_scene(model: Any, scene: str | Path, reference: str | Path | None, *,
                   class_field: str | None = None, label_mapping: dict[Any, Any] | None = None,
                   tile: int | None = None, overlap: int | None = None, blend: Any = "hann",
                   margin: int | None = None, batch_size: int = 4, tta: str = "none",
                   scheduler: Any = "threads") -> ConfusionMatrix:
    """Stream a confusion matrix over a whole raster; memory bounded by the block size.

    ``reference`` is a label raster on the same grid (class ids, 255 ignored)
    or vector labels (GPKG/GeoJSON) with ``class_field``, rasterized per
    block in the scene's CRS; unlabelled pixels are ignored. ``tta`` as
    predict's ``--tta``.
    """
    model = _with_tta(as_runnable(model), tta)
    if reference is None:
        raise ConfigError("scene evaluation needs reference labels; pass --reference labels.tif or labels.gpkg")
    ref = Path(reference)
    if not ref.exists():
        raise ConfigError(f"reference {ref} does not exist; check --reference")
    with open_raster(scene) as ds:
        grid = Grid.from_rio(ds)
        bands = data_bands(ds)
    layout, opts = resolve(model.card, grid.shape, Tiling(tile, overlap, blend, margin), batch_size=batch_size,
                           grid=grid)
    reader = _reference_reader(ref, grid, class_field, label_mapping or {}, list(model.card.classes))
    cm = ConfusionMatrix(model.card.num_classes)

    lock = threading.Lock()

    def sink(ij: tuple[int, int], blk: Any) -> None:
        rows, cols = layout.block_slices(*ij)
        truth = reader(rows, cols)
        with lock:
            cm.update(blk.classes, truth)

    stream_blocks(RasterSource(str(scene), tuple(bands)), model, layout, opts, sink,
                  scheduler=scheduler)
    return cm


def _reference_reader(ref: Path, grid: Grid, class_field: str | None, mapping: dict[Any, Any],
                      names: list[str]) -> Callable[[slice, slice], np.ndarray]:
    import rasterio
    from rasterio.windows import Window

    if ref.suffix.lower() in (".tif", ".tiff", ".vrt", ".img"):
        with rasterio.open(ref) as ds:
            if (ds.height, ds.width) != grid.shape or ds.transform != grid.transform:
                raise ConfigError(f"reference {ref.name} is not on the scene's grid; resample it first")

        def read_raster(rows: slice, cols: slice) -> np.ndarray:
            with rasterio.open(ref) as ds:
                win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
                return remap(ds.read(1, window=win).astype(np.uint8), mapping)

        return read_raster

    import pyogrio

    if class_field is None:
        raise ConfigError("vector labels need a class field: pass --class-field NAME")
    gdf = pyogrio.read_dataframe(ref)
    if class_field not in gdf.columns:
        raise ConfigError(f"{ref.name} has no field {class_field!r}")
    if grid.crs is not None and gdf.crs is not None and gdf.crs != grid.crs:
        gdf = gdf.to_crs(grid.crs)
    ids = label_ids(gdf[class_field], mapping, names)
    dropped = sorted({str(v) for v, i in zip(gdf[class_field], ids) if i == IGNORE and mapping.get(v) != IGNORE
                      and mapping.get(str(v)) != IGNORE})
    if dropped:
        import warnings

        warnings.warn(f"reference values {', '.join(dropped[:8])}{' …' if len(dropped) > 8 else ''} match no "
                      f"class of the model ({', '.join(names)}) and are ignored; map them with --label-map "
                      "VALUE=CLASS (or VALUE=255 to ignore them silently)", UserWarning, stacklevel=2)
    shapes = [(g, i) for g, i in zip(gdf.geometry, ids) if i != IGNORE and g is not None]

    def read_vector(rows: slice, cols: slice) -> np.ndarray:
        return rasterize_on(shapes, grid[rows, cols], fill=IGNORE, dtype="uint8")

    return read_vector
