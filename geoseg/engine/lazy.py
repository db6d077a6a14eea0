"""``segment``: the block engine as a lazy dask / xarray transform.

The input is a (band, y, x) ``xarray.DataArray`` (rioxarray, stackstac,
odc-stac; dask-backed or not), a dask array or a numpy array of raw values.
The result is a lazy uint8 class array on the same grid, chunked by the
layout's output blocks; nothing runs until it is computed or stored.

The graph is the block wavefront of :mod:`geoseg.engine.schedule`, made of
plain dask tasks: block (i, j) reads its extent from the input's chunks,
runs its tiles, adds the strips of blocks (i - 1, j), (i, j - 1) and
(i - 1, j - 1) (task results), and each output chunk takes its classes
from its block's task. So every tile runs once per compute, however the
result is stored (``da.store``, ``.rio.to_raster(..., lock=...)``,
``to_zarr``), and a block's accumulator lives only inside its task: memory
follows the blocks in flight, not the scene.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import BandCountError, ConfigError
from ..geometry.grid import Grid, Layout, reflect_index
from ..geometry.units import NODATA
from .adapters import MAX_NATIVE_TILE, adapt
from .blocks import BlockOut, as_runnable, compute_block
from .gating import gate_reads, lookahead, sweep_order
from .options import RunOptions, Tiling, resolve


def _lazy_block(parts: Any, mask_parts: Any, ridx: np.ndarray, cidx: np.ndarray, nodata: float | None,
                model_ref: Any, layout: Layout, opts: RunOptions, i: int, j: int, top: Any, left: Any,
                corner: Any, _after: Any = None) -> tuple[BlockOut, Any]:
    # ``top``, ``left``, ``corner``: the strips that blocks (i - 1, j), (i, j - 1), (i - 1, j - 1) sent, or None;
    # ``_after``: the classes of the block ``lookahead()`` places earlier in the sweep, which it waits for
    data = _window(parts, ridx, cidx)
    ok = valid_mask(data, nodata)
    if mask_parts is not None:  # (row, col) chunks of (h, w): one band of chunks of one band
        ok &= _window([[[m[None] for m in row] for row in mask_parts]], ridx, cidx)[0].astype(bool)
    return compute_block(data, ok, model_ref, layout, opts, i, j, top, left, corner)


def _window(parts: list[Any], ridx: np.ndarray, cidx: np.ndarray) -> np.ndarray:
    """Pixels (``ridx``, ``cidx``) of the (band, row, col) nested list of (C, h, w) chunks ``parts``.

    Each chunk is cut to the rows and columns wanted before the pieces are
    joined, so no copy of the whole chunks is made.
    """
    from dask.array.core import concatenate3

    rows_at = np.cumsum((0, *(row[0].shape[-2] for row in parts[0])))
    cols_at = np.cumsum((0, *(chunk.shape[-1] for chunk in parts[0][0])))
    lo_r, hi_r, lo_c, hi_c = int(ridx.min()), int(ridx.max()) + 1, int(cidx.min()), int(cidx.max()) + 1
    cut = [[[chunk[..., max(lo_r - rows_at[r], 0): min(hi_r, rows_at[r + 1]) - rows_at[r],
                   max(lo_c - cols_at[c], 0): min(hi_c, cols_at[c + 1]) - cols_at[c]]
             for c, chunk in enumerate(row)] for r, row in enumerate(band)] for band in parts]
    return concatenate3(cut)[:, ridx - lo_r][:, :, cidx - lo_c]


def valid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """(h, w) validity of raw (C, h, w) values.

    As GDAL's dataset mask: a pixel is nodata only where every band holds
    the ``nodata`` value. NaN is never a valid measurement, so a pixel with
    NaN in any band is invalid whether or not nodata is declared.
    """
    valid = np.ones(data.shape[1:], bool)
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        valid = (data != np.asarray(nodata, dtype=data.dtype)).any(axis=0)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return valid


def _covering(bounds: np.ndarray, idx: np.ndarray) -> tuple[int, range]:
    """(first pixel, chunk indexes) of the input chunks along one axis that hold pixels ``idx``.

    A block task takes those chunks whole and cuts its window itself: a
    separate slicing task per block would be run as soon as a chunk is read
    (it is cheap, and frees nothing), so the windows of blocks far ahead of
    the wavefront would pile up in memory.
    """
    first = int(np.searchsorted(bounds, idx.min(), side="right")) - 1
    last = int(np.searchsorted(bounds, idx.max(), side="right")) - 1
    return int(bounds[first]), range(first, last + 1)


def _classes(blk: tuple[BlockOut, Any]) -> np.ndarray:
    return blk[0].classes


def _strip(blk: tuple[BlockOut, Any], k: int) -> np.ndarray:
    return blk[1][k]


def _confidence(blk: tuple[BlockOut, Any]) -> np.ndarray:
    conf = blk[0].confidence
    assert conf is not None  # the graph asks for confidence only when it computed it
    return conf


def _as_dask(x: Any) -> tuple[Any, Any]:
    """(dask array (C, H, W), DataArray or None) for any supported input."""
    import dask.array as da

    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a dependency
        xr = None  # type: ignore[assignment]
    if xr is not None and isinstance(x, xr.DataArray):
        if x.ndim == 2:
            x = x.expand_dims("band")
        if x.ndim != 3:
            raise ConfigError(f"segment needs a (band, y, x) DataArray, got dims {x.dims}")
        data = x.data if isinstance(x.data, da.Array) else da.from_array(x.data, chunks=(-1, 2048, 2048))
        return data, x
    if isinstance(x, da.Array):
        data = x
    elif isinstance(x, np.ndarray):
        data = da.from_array(x[None] if x.ndim == 2 else x, chunks=(-1, 2048, 2048) if x.ndim <= 3 else "auto")
    else:
        raise ConfigError(
            f"segment takes an xarray.DataArray, a dask array or a numpy array, not {type(x).__name__}; "
            "for a file use geoseg.predict or rioxarray.open_rasterio(path, chunks={\"x\": 2048, \"y\": 2048})"
        )
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ConfigError(f"segment needs a (band, y, x) array, got {data.ndim} dimensions")
    return data, None


def _invalid_to_nan(block: np.ndarray, *m: np.ndarray, nodata: float | None) -> np.ndarray:
    ok = valid_mask(block, nodata) & (m[0][0].astype(bool) if m else True)
    out = block.astype(np.float32)
    out[:, ~ok] = np.nan
    return out


def _nanmean(a: np.ndarray, axis: Any = None) -> np.ndarray:
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: NaN, which is nodata
        return np.nanmean(a, axis=axis)


def _coarsen(data: Any, nodata: float | None, mask: Any, d: int) -> Any:
    """Mean of the valid pixels of each d x d cell (NaN where a cell has none), as float32.

    (Module-level functions only: a cluster's workers unpickle the graph.)
    """
    import functools

    import dask.array as da

    x = data.map_blocks(functools.partial(_invalid_to_nan, nodata=nodata),
                        *([mask[None]] if mask is not None else []), dtype=np.float32)
    h, w = data.shape[1:]
    ph, pw = -h % d, -w % d
    if ph or pw:
        x = da.pad(x, ((0, 0), (0, ph), (0, pw)), constant_values=np.nan)
    x = x.rechunk((-1, _multiple(x.chunks[1][0], d), _multiple(x.chunks[2][0], d)))
    return da.coarsen(_nanmean, x, {1: d, 2: d})


def _multiple(n: int, d: int) -> int:
    return max(d, n // d * d)


def _expand(a: Any, d: int, shape: tuple[int, int], valid: Any, fill: float) -> Any:
    """Cells of d x d pixels back on the full grid, nodata where the full-resolution pixel is invalid."""
    import dask.array as da

    big = a.repeat(d, axis=0).repeat(d, axis=1)[: shape[0], : shape[1]].rechunk(valid.chunks)
    return da.where(valid, big, np.asarray(fill, dtype=a.dtype))


def _valid_after_blocks(valid: Any, classes: Any, d: int, token: str) -> Any:
    """``valid`` (full resolution) with each chunk's reads waiting for the coarse blocks it is paired with.

    A chunk of the result needs the coarse classes of every block over it;
    the one at its lower right comes last in any order the wavefront takes,
    so the chunk's reads wait for it, and the full-resolution input is read
    as the blocks reach it, not ahead of them (see :func:`gate_reads`).
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    rb, cb = (np.cumsum((0, *c)) for c in classes.chunks)
    ra, ca = (np.cumsum((0, *c)) for c in valid.chunks)
    gates: list[Any] = []
    uses: dict[Any, int] = {}
    for r in range(len(valid.chunks[0])):
        i = int(np.searchsorted(rb, (ra[r + 1] - 1) // d, side="right")) - 1
        for c in range(len(valid.chunks[1])):
            j = int(np.searchsorted(cb, (ca[c + 1] - 1) // d, side="right")) - 1
            uses[((valid.name, r, c), "main")] = len(gates)
            gates.append((classes.name, i, j))
    tasks, new = gate_reads(valid.__dask_graph__(), uses, gates, 0, f"geoseg-valid-{token}")
    name = new[((valid.name, 0, 0), "main")][0]
    if not tasks or name == valid.name:  # nothing to gate (or dask without task objects)
        return valid
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=[valid, classes])
    return da.Array(graph, name, chunks=valid.chunks, dtype=bool)


def _grid_of(xarr: Any, shape: tuple[int, int]) -> Grid:
    """The input's grid (CRS and transform through rioxarray), or a bare pixel grid."""
    from affine import Affine

    if xarr is not None and _has_rioxarray():
        try:
            return Grid(shape, xarr.rio.transform(recalc=False), xarr.rio.crs)
        except Exception:  # no regular georeferenced grid: nothing to resample by
            pass
    return Grid(shape, Affine.identity(), None)


def _as_mask(mask: Any, shape: tuple[int, int]) -> Any:
    import dask.array as da

    if mask is None:
        return None
    m = getattr(mask, "data", mask)  # a DataArray's array
    m = m if isinstance(m, da.Array) else da.from_array(np.asarray(m), chunks=2048)
    if tuple(m.shape) != shape:
        raise ConfigError(f"mask has shape {tuple(m.shape)}, the input's grid is {shape}")
    return m


def _nodata_of(xarr: Any, nodata: float | None) -> float | None:
    if nodata is not None or xarr is None:
        return nodata
    for key in ("_FillValue", "nodata"):
        if key in xarr.attrs:
            return xarr.attrs[key]
    rio = getattr(xarr, "rio", None) if _has_rioxarray() else None
    if rio is not None:
        return rio.nodata
    return None


def _has_rioxarray() -> bool:
    try:
        import rioxarray  # noqa: F401
    except ImportError:
        return False
    return True


def _block_windows(data: Any, mask: Any, layout: Layout,
                   order: list[tuple[int, int]]) -> tuple[dict[Any, Any], dict[Any, int]]:
    """Per block: (input chunk parts, mask chunk parts or None, row index, col index) into those
    chunks, with each part named (chunk key, copy); and the place in ``order`` where each part is first used.

    A chunk row below the block's own is taken as the "halo" copy, read again
    for the blocks that reach into it from above (see :func:`gate_reads`).
    """
    h, w = layout.grid.shape
    rb, cb = (np.cumsum((0, *c)) for c in data.chunks[1:])
    windows: dict[Any, Any] = {}
    uses: dict[Any, int] = {}
    for pos, (i, j) in enumerate(order):
        rows, cols = layout.block_extent(i, j)
        ridx = reflect_index(np.arange(rows.start, rows.stop), h)
        cidx = reflect_index(np.arange(cols.start, cols.stop), w)
        (r0, rkeys), (c0, ckeys) = _covering(rb, ridx), _covering(cb, cidx)
        home = int(np.searchsorted(rb, i * layout.block, side="right")) - 1
        copy = {r: "halo" if r > home else "main" for r in rkeys}
        parts = [[[((data.name, b, r, c), copy[r]) for c in ckeys] for r in rkeys] for b in range(len(data.chunks[0]))]
        mparts = [[((mask.name, r, c), copy[r]) for c in ckeys] for r in rkeys] if mask is not None else None
        for key in [k for band in parts for row in band for k in row] + [k for row in mparts or [] for k in row]:
            uses.setdefault(key, pos)
        windows[(i, j)] = parts, mparts, ridx - r0, cidx - c0
    return windows, uses


def segment_graph(data: Any, mask: Any, model_ref: Any, layout: Layout, opts: RunOptions, nodata: float | None,
                  token: str) -> tuple[Any, Any]:
    """Dask arrays (classes, confidence or None) for raw ``data`` (C, H, W) over ``layout``.

    ``mask`` is None or a dask (H, W) array, True where pixels are valid.
    Blocks are swept input chunk by input chunk (:func:`sweep_order`); no
    block starts more than :func:`lookahead` places ahead of the sweep, and
    the input is read as the sweep reaches it (:func:`gate_reads`).
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    bname, cname, fname = f"geoseg-block-{token}", f"geoseg-classes-{token}", f"geoseg-confidence-{token}"
    if mask is not None:
        mask = mask.rechunk(data.chunks[1:])
    bounds = [np.cumsum((0, *c)) for c in data.chunks[1:]]
    order = sweep_order(layout.iter_blocks(), lambda i, j: (i * layout.block, j * layout.block), *bounds)
    windows, uses = _block_windows(data, mask, layout, order)
    graph = data.__dask_graph__() if mask is None else {**data.__dask_graph__(), **mask.__dask_graph__()}
    ahead = lookahead()
    # A read waits for the classes of an earlier block: a small key, freed once the read has run.
    blocks, new = gate_reads(graph, uses, [(cname, i, j) for i, j in order], ahead, f"geoseg-input-{token}")
    cls: dict[Any, Any] = {}
    cnf: dict[Any, Any] = {}
    for pos, (i, j) in enumerate(order):
        parts, mparts, ridx, cidx = windows[(i, j)]
        keys = [[[new[k] for k in row] for row in band] for band in parts]
        mkeys = [[new[k] for k in row] for row in mparts] if mparts is not None else None
        # Each strip is a key of its own, so it is freed as soon as the one block that adds it has run.
        nb = [(f"{bname}-strip{k}", a, b) if a >= 0 and b >= 0 else None
              for k, (a, b) in enumerate(((i - 1, j), (i, j - 1), (i - 1, j - 1)))]
        after = (cname, *order[pos - ahead]) if pos >= ahead else None
        blocks[(bname, i, j)] = (_lazy_block, keys, mkeys, ridx, cidx, nodata, model_ref, layout, opts, i, j, *nb,
                                 after)
        for key in nb:
            if key is not None:
                blocks.setdefault(key, (_strip, (bname, *key[1:]), int(key[0][-1])))
        cls[(cname, i, j)] = (_classes, (bname, i, j))
        if opts.confidence:
            cnf[(fname, i, j)] = (_confidence, (bname, i, j))
    # One layer holds the blocks, strips, input copies and classes: the reads and blocks wait for class
    # keys, and culling a layer follows its own keys, so a slice of the result keeps what it needs.
    blocks.update(cls)
    chunks = layout.chunks()
    base = HighLevelGraph.from_collections(cname, blocks, dependencies=[data] if mask is None else [data, mask])
    classes = da.Array(base, cname, chunks=chunks, dtype=np.uint8)
    conf = None
    if opts.confidence:
        layers, dependencies = {**base.layers, fname: cnf}, {**base.dependencies, fname: {cname}}
        conf = da.Array(HighLevelGraph(layers, dependencies), fname, chunks=chunks, dtype=np.float32)
    return classes, conf


def segment(x: Any, model: Any, *, tile_size: int | None = None, overlap: int | None = None,
            blend: Any = "hann", margin: int | None = None, batch_size: int | None = None,
            bands: list[int | str] | None = None, confidence: bool = False, nodata: float | None = None,
            mask: Any = None, gsd: str | float = "auto", tta: str = "none") -> Any:
    """Lazily segment a (band, y, x) raster of raw values with ``model``.

    ``x`` is an ``xarray.DataArray`` (dask-backed or not), a dask array or a
    numpy array (a 2-D one is one band); ``bands`` are 1-based indexes into
    its first axis, or names matched to a DataArray's band descriptions
    (rioxarray's ``long_name``) (default: all). ``nodata`` defaults to the DataArray's ``_FillValue`` / rioxarray
    nodata; NaN is always treated as nodata. ``mask`` is an optional (y, x)
    array (numpy, dask or DataArray), True or non-zero where pixels are
    valid — an alpha band, say: ``mask=da.sel(band=4) > 0``. Tiling options
    are those of :func:`geoseg.predict`, ``gsd`` and ``tta`` included
    (``gsd`` needs a DataArray with a CRS and transform; where the model's
    ground resolution is far coarser, the array is first averaged over
    d × d cells, as :func:`geoseg.predict` reads it, and the classes are
    brought back to the array's own grid).

    Returns, for a DataArray, a lazy ``DataArray`` of uint8 classes (dims
    ``y``, ``x``, the input's coordinates, CRS and transform; nodata 255;
    ``class_names`` and ``class_colors`` in attrs), or with ``confidence``
    a ``Dataset`` of ``classes`` and ``confidence`` (float32 max softmax,
    -1 where nodata). For a dask or numpy input, a dask array (or a pair).
    """
    import dask.base

    data, xarr = _as_dask(x)
    if bands:
        from ..io.bands import parse_bands

        c = data.shape[0]
        names = xarr.attrs.get("long_name") if xarr is not None else None  # rioxarray: the band descriptions
        names = list(names) if isinstance(names, (list, tuple)) and len(names) == c else [None] * c
        use = parse_bands(bands, names, "the input")  # indexes, or names matched to those descriptions
        bad = [b for b in use if b < 1 or b > c]
        if bad:
            raise ConfigError(f"band {bad[0]} does not exist; the input has bands 1..{c}")
        data = data[[b - 1 for b in use]]
    net = as_runnable(model)
    shape = tuple(data.shape[1:])
    nd = _nodata_of(xarr, nodata)
    m = _as_mask(mask, shape)
    asked = Tiling(tile_size, overlap, blend, margin, gsd, tta)
    grid = _grid_of(xarr, shape)
    runner, tiling, info = adapt(net, asked, grid)
    d = 1
    if info["ratio"] is not None and tiling.tile is not None and tiling.tile > MAX_NATIVE_TILE:
        d = math.ceil(tiling.tile / MAX_NATIVE_TILE)  # average d x d cells first, as predict reads them
        runner, tiling, _ = adapt(net, replace(asked, gsd=float(net.card.gsd or 0) if gsd == "auto" else gsd),
                                  grid.coarsened(d))
        full, full_nd, data, m, nd = data, nd, _coarsen(data, nd, m, d), None, None
    card = runner.card
    if data.shape[0] != card.in_channels:
        raise BandCountError(
            f"the input has {data.shape[0]} bands but model {card.name!r} expects {card.in_channels}; "
            "pick them with bands=[...]"
        )
    layout, opts = resolve(card, tuple(data.shape[1:]), tiling, batch_size=batch_size or 4, confidence=confidence)
    token = dask.base.tokenize(data.name, id(net), layout.tile, layout.overlap, layout.tiles_per_block,
                               repr(opts), nd, getattr(m, "name", None))
    ref = _model_ref(model, net, runner, tta)
    classes, conf = segment_graph(data, m, ref, layout, opts, nd, token)
    if d > 1:
        valid = full.map_blocks(valid_mask, full_nd, drop_axis=0, dtype=bool)
        mask_full = _as_mask(mask, shape)
        valid = valid if mask_full is None else valid & mask_full.astype(bool)
        valid = _valid_after_blocks(valid, classes, d, token)
        classes, conf = (_expand(a, d, shape, valid, fill) if a is not None else None
                         for a, fill in ((classes, NODATA), (conf, -1.0)))
    if xarr is None:
        return (classes, conf) if confidence else classes
    return _wrap(xarr, classes, conf, card)


def _model_ref(model: Any, net: Any, runner: Any, tta: str) -> Any:
    """What the block tasks load the model from: a spec stays a spec (a cluster's workers load it once
    from its path), wrapped for --gsd / --tta as an AdaptedSpec; a loaded model is used as it is."""
    from ..models.loading import ModelSpec
    from .adapters import AdaptedSpec

    if not isinstance(model, (ModelSpec, AdaptedSpec)):
        return runner
    if runner is net:
        return model
    return AdaptedSpec.around(model.spec if isinstance(model, AdaptedSpec) else model, runner, tta)


def _wrap(xarr: Any, classes: Any, conf: Any, card: Any) -> Any:
    import xarray as xr

    from ..io.styles import hex_color

    ydim, xdim = xarr.dims[-2], xarr.dims[-1]
    coords = {k: v for k, v in xarr.coords.items() if ydim in v.dims or xdim in v.dims or v.ndim == 0}
    coords = {k: v for k, v in coords.items() if "band" not in v.dims}
    attrs = {"class_names": list(card.classes), "class_colors": [hex_color(p) for p in card.palette()],
             "long_name": "class", "model": card.name}
    out = xr.DataArray(classes, dims=(ydim, xdim), coords=coords, name="classes", attrs=attrs)
    crs = transform = None
    if _has_rioxarray():
        try:
            crs, transform = xarr.rio.crs, xarr.rio.transform(recalc=False)
        except Exception:  # coordinates without a regular grid: leave the georeferencing to the coords
            crs = transform = None
    if crs is not None or transform is not None:
        out = _georef(out, crs, transform, NODATA)
    else:
        out.attrs["_FillValue"] = NODATA
    if conf is None:
        return out
    cf = xr.DataArray(conf, dims=(ydim, xdim), coords=coords, name="confidence",
                      attrs={"long_name": "confidence (max softmax)"})
    cf = _georef(cf, crs, transform, -1.0) if crs is not None else cf
    return xr.Dataset({"classes": out, "confidence": cf})


def _georef(da_: Any, crs: Any, transform: Any, nodata: float) -> Any:
    if crs is not None:
        da_ = da_.rio.write_crs(crs)
    if transform is not None:
        da_ = da_.rio.write_transform(transform)
    return da_.rio.write_nodata(nodata, encoded=False)
