"""The plan of one ``predict`` run: every option resolved and every check done, nothing written.

Whatever can make a run fail for a reason the user controls — the input,
its CRS and bands, the zones file and field, the numbers, the model and its
card, the output folder, the scheduler address — is checked here, before
any work, so a refused run leaves no trace.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..engine.adapters import MAX_NATIVE_TILE, AdaptedSpec, adapt
from ..engine.calibrate import MIN_TILES, block_target, calibrate
from ..engine.options import Compute, RunOptions, Tiling, resolve
from ..errors import ConfigError, OutputExistsError
from ..geometry.grid import Grid, Layout
from ..io.bands import band_mismatch, match_bands, parse_bands, raster_band_names
from ..io.raster import RasterSource, data_bands, open_raster
from ..io.staging import check_output_dir
from ..io.vector import vector_format, zones_layer
from ..models.backends import Backend, TorchBackend, auto_batch_size, available_cores
from ..models.loading import ModelSpec, load_model

#: Calibration times the model on tiles of at most this side (the model's own tile when resampling).
MAX_TILE_CALIBRATION = 1024

#: Every file a run may write, so that an --overwrite run never leaves a file of an older run beside its own.
ALL_OUTPUTS = ("classes.tif", "classes.tif.aux.xml", "classes.qml", "confidence.tif", "stats.csv", "stats.json",
               "run.json", "quicklook.png", "polygons.gpkg", "polygons.geojson", "polygons.parquet",
               "polygons.fgb", "polygons.qml")


@dataclass(frozen=True)
class Outputs:
    """What a run writes besides ``classes.tif`` (areas in m², lengths in metres)."""

    confidence: bool = False
    polygons: bool = True
    min_area: float | None = None
    simplify: float | None = None
    vector_format: str = "gpkg"
    zones: str | Path | None = None
    zone_field: str | None = None
    quicklook: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, flag in (("min_area", "--min-area"), ("simplify", "--simplify")):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ConfigError(f"{flag} must be a number >= 0, got {v}; pass a value >= 0 or leave {flag} out")
        vector_format(self.vector_format)

    def names(self) -> list[str]:
        names = ["classes.tif", "classes.tif.aux.xml", "classes.qml", "stats.csv", "stats.json", "run.json"]
        names += ["confidence.tif"] if self.confidence else []
        names += ["quicklook.png"] if self.quicklook else []
        names += [f"polygons{vector_format(self.vector_format)[1]}", "polygons.qml"] if self.polygons else []
        return names


def split_options(options: dict[str, Any]) -> tuple[Tiling, Compute, Outputs]:
    """Flat keyword options (``tile_size=``, ``device=``, ``min_area=`` …) into the three groups."""
    alias = {"tile_size": "tile"}
    groups: list[dict[str, Any]] = [{}, {}, {}]
    names = [{f.name for f in fields(cls)} for cls in (Tiling, Compute, Outputs)]
    for key, value in options.items():
        k = alias.get(key, key)
        for g, known in zip(groups, names):
            if k in known:
                g[k] = value
                break
        else:
            valid = sorted(set().union(*names) | {"tile_size"} - {"tile"})
            raise ConfigError(f"unknown predict option {key!r}; valid: {', '.join(valid)}")
    return Tiling(**groups[0]), Compute(**groups[1]), Outputs(**groups[2])


@dataclass(frozen=True)
class Plan:
    given: str  # the input as the user named it
    src: str  # the input as this process reads it (absolute path or URL)
    out: Path
    grid: Grid
    bands: list[int]
    net: Backend  # the loaded model
    runner: Any  # what the engine runs: the model, or the model wrapped for --gsd / --tta
    model_ref: Any  # what block tasks load the model from (the runner, or an AdaptedSpec for a cluster)
    card_path: str | None
    layout: Layout
    opts: RunOptions
    compute: Compute
    outputs: Outputs
    engine: str  # "blocks" or "device"
    adapted: dict[str, Any]  # what --gsd and --tta did (geoseg.engine.adapters.adapt)

    @property
    def decimation(self) -> int:
        return int(self.adapted.get("decimation", 1))

    @property
    def source(self) -> RasterSource:
        return RasterSource(self.src, tuple(self.bands), decimation=self.decimation)


_SCHEDULER = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://[^\s/]+(:\d+)?/?$|^[\w.\-]+:\d+$")


def is_local(scheduler: Any) -> bool:
    """True for dask's local schedulers (threads in this process), False for a cluster."""
    return scheduler in (None, "threads", "local", "sync")


def block_threads(compute: Compute, net: Any) -> int:
    """Local threads working on blocks: one more than can compute at once.

    While a thread reads, blends or resolves a block, the spare one keeps
    every stream (and core) busy with a forward pass.
    """
    return compute.num_workers or max(available_cores(), net.streams) + 1


def check_scheduler(scheduler: Any, without: str = "local threads") -> None:
    """A ``--scheduler`` that is an address; ``without`` says what leaving it out gives."""
    if is_local(scheduler) or not isinstance(scheduler, str):
        return
    if not _SCHEDULER.match(scheduler):
        raise ConfigError(
            f"--scheduler {scheduler!r} is not a dask scheduler address; use e.g. tcp://127.0.0.1:8786 "
            f"(or leave it out for {without})"
        )


def probe_scheduler(scheduler: str, timeout: float = 10.0, starting: float = 3.0) -> None:
    """Fail soon, with one line, where nothing listens at a tcp:// scheduler address (the client would
    retry a refused connection until its timeout). A refusal is tried again for ``starting`` seconds,
    for a scheduler started just before."""
    import socket
    import time

    m = re.match(r"^(?:tcp://)?\[?([^\s/\]]+?)\]?:(\d+)/?$", scheduler)
    if m is None:  # tls://, ucx://, ...: the client says
        return
    give_up = time.monotonic() + starting
    while True:
        try:
            socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() < give_up:
                time.sleep(0.25)
                continue
            reason = "connection refused"
        except OSError as e:
            reason = str(e) or type(e).__name__
        raise ConfigError(f"cannot reach dask scheduler {scheduler}: {reason}; is it running?") from None


def make_plan(src: str | Path, out: Path, *, model: Any, card: str | Path | None, tiling: Tiling,
              compute: Compute, outputs: Outputs, bands: Sequence[int | str] | None = None) -> Plan:
    """Check everything and resolve every option of a run; nothing is written."""
    check_output_dir(out)
    existing = [n for n in outputs.names() if (out / n).exists()]
    if existing and not outputs.overwrite:
        raise OutputExistsError(f"{out / existing[0]} already exists; pass --overwrite or choose another --output")
    check_scheduler(compute.scheduler)
    with open_raster(src) as ds:
        grid = Grid.from_rio(ds)
        names, count, default = raster_band_names(ds), ds.count, data_bands(ds)
    if grid.crs is None:
        raise ConfigError(f"{src} has no CRS, so areas and polygons cannot be placed; "
                          "assign one with gdal_edit.py -a_srs EPSG:XXXX")
    if outputs.zones is not None:
        _check_zones(Path(outputs.zones), outputs.zone_field)
    if compute.engine == "device" and compute.runtime == "onnx":
        raise ConfigError("--engine device runs torch modules on the GPU, --runtime onnx runs ONNX Runtime; "
                          "drop one of them")
    net = model if isinstance(model, Backend) else load_model(
        model, card=card, device=compute.device, streams=compute.streams, precision=compute.precision,
        runtime="torch" if compute.engine == "device" else compute.runtime)  # the device engine runs modules
    use = _choose_bands(str(src), bands, names, count, default, net.card)
    runner, tiled, adapted = adapt(net, tiling, grid)
    work, d = grid, 1
    if adapted["ratio"] is not None and tiled.tile is not None and tiled.tile > MAX_NATIVE_TILE:
        d = math.ceil(tiled.tile / MAX_NATIVE_TILE)  # read d x d-pixel cells: tiles stay small
        work = grid.coarsened(d)
        target = tiling.gsd if tiling.gsd != "auto" else float(net.card.gsd or 0)
        scene = adapted
        runner, tiled, adapted = adapt(net, replace(tiling, gsd=target), work)
        # the record speaks of the scene (its pixel size, the ratio and tile in its pixels), not of the cells
        adapted.update({k: scene[k] for k in ("scene_gsd_m", "ratio", "native_tile")})
    adapted["decimation"] = d
    adapted["gsd"] = tiling.gsd
    asked, tiling = tiling, tiled
    mc = runner.card
    bs = compute.batch_size or auto_batch_size(net.device, net.card.tile_size if tiling.tile is None else
                                               min(tiling.tile, net.card.tile_size), mc.in_channels)
    engine = _engine(compute, net)
    cpu = engine == "blocks" and is_local(compute.scheduler) and net.device == "cpu"
    # the device engine's per-block cost is host-side (Python, kernel launches): fewer, larger blocks
    target = block_target(work.shape, block_threads(compute, net)) if cpu else DEVICE_BLOCK if \
        engine == "device" else 1024
    layout, opts = resolve(mc, work.shape, tiling, batch_size=bs, confidence=outputs.confidence, grid=work,
                           block_target=target)
    if adapted["ratio"] is not None:  # tile, overlap and margin as given (or defaulted): in the model's pixels
        r = runner.ratio  # pixels of the grid read per model pixel
        adapted["model_tiling"] = {
            "tile_size": runner.model_tile,
            "overlap": round(layout.overlap / r) if asked.overlap is None else asked.overlap,
            "margin": round(opts.resolved_margin / r) if asked.margin is None else asked.margin}
    if cpu and compute.streams is None and not isinstance(model, Backend) and \
            layout.tiles[0] * layout.tiles[1] >= MIN_TILES:
        tile = layout.tile if adapted["ratio"] is None else runner.model_tile
        adapted["calibration"] = calibrate(net, min(tile, MAX_TILE_CALIBRATION), bs)
    model_ref: Any = runner
    if not is_local(compute.scheduler):
        spec = getattr(net, "spec", None)
        if spec is None:
            raise ConfigError("a model passed as an object cannot be sent to a cluster; pass its path")
        model_ref = AdaptedSpec.around(ModelSpec(_absolute(spec.model), _absolute(spec.card) if spec.card else None,
                                                 compute.device, compute.streams, compute.precision,
                                                 getattr(spec, "runtime", "auto")), runner, adapted["tta"])
    path = str(Path(src).resolve()) if Path(str(src)).exists() else str(src)
    return Plan(str(src), path, out, grid, use, net, runner, model_ref, str(card) if card else None, layout, opts,
                compute, outputs, engine, adapted)


def _choose_bands(src: str, bands: Sequence[int | str] | None, names: list[str | None], count: int,
                  default: list[int], card: Any) -> list[int]:
    """``--bands`` (indexes or names), else the card's band names matched to the raster's, else every data band."""
    if bands:
        use = parse_bands(bands, names, src)
    else:
        use = (match_bands(names, card.bands) if card.bands else None) or default
    bad = [b for b in use if b < 1 or b > count]
    if bad:
        raise ConfigError(f"band {bad[0]} does not exist; {src} has bands 1..{count}")
    if len(use) != card.in_channels:
        raise band_mismatch(src, use, names, card, chosen=bool(bands))
    return use


def _absolute(p: str) -> str:
    """A file path made absolute in the client, so workers with another working directory find it."""
    return str(Path(p).resolve()) if Path(p).exists() else p


DEVICE_BLOCK = 2048


def _engine(compute: Compute, net: Backend) -> str:  # net: the loaded backend (not the wrapped runner)
    local = is_local(compute.scheduler)
    torch_gpu = isinstance(net, TorchBackend) and net.device.startswith("cuda")
    if compute.engine == "auto":
        return "device" if torch_gpu and local else "blocks"
    if compute.engine == "device":
        if not isinstance(net, TorchBackend):
            if hasattr(net, "checkpoint"):  # a checkpoint loaded for ONNX Runtime (runtime="auto" on a CPU)
                raise ConfigError("--engine device needs the checkpoint as a torch module; load it with "
                                  "runtime='torch' (--runtime torch)")
            raise ConfigError("--engine device needs a torch model (safetensors); ONNX models run with "
                              "--engine blocks")
        if not local:
            raise ConfigError("--engine device runs in this process; drop --scheduler or use --engine blocks")
    return compute.engine


def _check_zones(path: Path, field: str | None) -> None:
    import pyogrio

    if not path.exists():
        raise ConfigError(f"zones file {path} does not exist; check --zones")
    try:
        info = pyogrio.read_info(path, layer=zones_layer(path))
    except ConfigError:
        raise
    except Exception:
        raise ConfigError(f"zones file {path} is not a vector file GDAL can read; pass a GeoPackage, "
                          "GeoJSON or shapefile") from None
    if field is not None and field not in list(info["fields"]):
        raise ConfigError(f"{path.name} has no field {field!r}; fields: {', '.join(info['fields'])}")
