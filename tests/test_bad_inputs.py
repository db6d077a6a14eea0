"""Bad and unusual inputs, options and faults: one line, exit 2, and no output changed.

Every case runs one ``geoseg`` command through click's test runner and
checks that it fails with exactly one line ``Error: <what>; <how to fix>``
on stderr (no traceback), with the expected exit status, and that the
output folder is as it was: absent if it was absent, and for the cases run
over a previous complete run, every file byte-identical. A few unusual
inputs that must succeed (NaN as nodata) have a check of their result.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import yaml
from click.testing import CliRunner

from geoseg.cli.main import cli

from .conftest import smooth_image, write_raster

H, W = 96, 128  # the scene: one 128-px tile wide


@dataclass(frozen=True)
class Case:
    """``args`` has placeholders (see :func:`kit`); ``expect`` is a piece of the error line."""

    id: str
    args: str
    expect: str | None
    prev: bool = False  # run over a copy of a previous complete run
    code: int = 2
    fault: str | None = None  # raised from every raster read (see FAULTS)
    check: Callable[[Path], None] | None = None  # for a run that must succeed
    no_gpu: bool = False  # only meaningful where no CUDA GPU is present


def _classes(out: Path) -> np.ndarray:
    with rasterio.open(out / "classes.tif") as ds:
        return ds.read(1)


def all_nodata(out: Path) -> None:
    assert (_classes(out) == 255).all(), "NaN pixels are nodata, not a class"


def nodata_where_nan(out: Path) -> None:
    c = _classes(out)
    assert (c[:, : W // 2] == 255).all() and (c[:, W // 2 :] < 3).all()


P = "predict {scene} -o {out} {model}"  # a valid predict command, to which each case adds one mistake
M = "-m {ckpt} --device cpu"

CASES = [
    # --- the input raster
    Case("input-missing", "predict {tmp}/missing.tif -o {out} {model}", "does not exist"),
    Case("input-text-named-tif", "predict {notes} -o {out} {model}", "not a raster GDAL can read"),
    Case("input-empty-file", "predict {empty} -o {out} {model}", "not a raster GDAL can read"),
    Case("input-is-a-folder", "predict {tmp} -o {out} {model}", "is a directory"),
    Case("input-truncated-geotiff", "predict {trunc} -o {out} {model}", "truncated or damaged"),
    Case("input-truncated-cog", "predict {trunc_cog} -o {out} {model}", "truncated or damaged"),
    Case("input-vrt-missing-source", "predict {vrt} -o {out} {model}", "gone.tif"),
    Case("input-no-crs", "predict {nocrs} -o {out} {model}", "has no CRS"),
    Case("input-two-bands", "predict {two} -o {out} {model}", "2 data bands"),
    Case("input-four-bands", "predict {four} -o {out} {model}", "choose 3 with --bands"),
    Case("input-all-nan", "predict {nan} -o {out} {model}", None, code=0, check=all_nodata),
    Case("input-half-nan", "predict {half_nan} -o {out} {model}", None, code=0, check=nodata_where_nan),
    Case("bands-zero", P + " --bands 0", "band 0 does not exist"),
    Case("bands-99", P + " --bands 1,2,99", "band 99 does not exist"),
    Case("bands-empty-item", P + " --bands 1,,3", "comma-separated list"),
    Case("bands-too-few", P + " --bands 1,2", "--bands selects 2 bands but model"),
    # --- tiling and compute options
    Case("tile-size-zero", P + " --tile-size 0", "tile size must be a whole number >= 1"),
    Case("tile-size-negative", P + " --tile-size -64", "tile size must be a whole number >= 1"),
    Case("tile-size-huge", P + " --tile-size 100000", "larger than 8192"),
    Case("tile-size-not-multiple", P + " --tile-size 100", "pad_multiple"),
    Case("tile-size-not-a-number", P + " --tile-size big", "not a valid integer"),
    Case("batch-size-zero", P + " --batch-size 0", "batch size must be"),
    Case("batch-size-negative", P + " --batch-size -2", "batch size must be"),
    Case("overlap-negative", P + " --overlap -5", "overlap must be"),
    Case("overlap-too-large", P + " --overlap 500", "it can be at most 64; use --overlap 64 or less"),
    Case("margin-too-large", P + " --margin 5000", "less than half the tile"),
    Case("margin-negative", P + " --margin -3", "margin must be"),
    Case("blend-unknown", P + " --blend nope", "unknown blend window"),
    Case("workers-negative", P + " --workers -1", "workers must be"),
    Case("workers-zero", P + " --workers 0", "workers must be"),
    Case("streams-zero", P + " --streams 0", "--streams"),
    Case("scheduler-not-an-address", P + " --scheduler not-a-scheduler", "not a dask scheduler address"),
    Case("device-tpu", "predict {scene} -o {out} -m {ckpt} --device tpu", "unknown device 'tpu'"),
    Case("device-cuda-without-gpu", "predict {scene} -o {out} -m {ckpt} --device cuda", "no CUDA GPU",
         no_gpu=True),
    Case("precision-unknown", P + " --precision fp8", "--precision"),
    Case("engine-unknown", P + " --engine warp", "--engine"),
    Case("engine-device-onnx", "predict {scene} -o {out} -m {onnx} --device cpu --engine device",
         "needs a torch model"),
    Case("option-typo", P + " --tilesize 256", "--tile-size"),
    Case("no-src", "predict -o {out}", "Missing argument"),
    # --- post-processing and output options
    Case("vector-format-unknown", P + " --vector-format xyz", "unknown vector format"),
    Case("min-area-negative", P + " --min-area -1", "--min-area must be a number >= 0"),
    Case("min-area-nan", P + " --min-area nan", "--min-area must be a number >= 0"),
    Case("simplify-negative", P + " --simplify -1", "--simplify must be a number >= 0"),
    Case("zones-missing", P + " --zones {tmp}/nowhere.gpkg", "zones file"),
    Case("zones-is-a-raster", P + " --zones {scene}", "not a vector file"),
    Case("zones-no-such-field", P + " --zones {zones} --zone-field owner", "no field 'owner'"),
    Case("output-is-a-file", "predict {scene} -o {notes} {model}", "is a file"),
    Case("output-under-a-file", "predict {scene} -o {notes}/out {model}", "which is a file"),
    # --- the model and its card
    Case("model-missing", "predict {scene} -o {out} -m {tmp}/nope.onnx", "neither a file nor a built-in model"),
    Case("model-folder-without-model", "predict {scene} -o {out} -m {models}/empty", "holds no"),
    Case("model-pickle-named-safetensors", "predict {scene} -o {out} -m {pickled} --device cpu",
         "not a safetensors file"),
    Case("model-empty-safetensors", "predict {scene} -o {out} -m {empty_st} --device cpu", "it is empty"),
    Case("model-pt-checkpoint", "predict {scene} -o {out} -m {pt}", "pickled checkpoint"),
    Case("model-unknown-format", "predict {scene} -o {out} -m {h5}", "unknown model format"),
    Case("model-without-card", "predict {scene} -o {out} -m {cardless} --device cpu", "no model card"),
    Case("card-missing", P + " --card {tmp}/nocard.yaml", "does not exist"),
    Case("card-typo-key", P + " --card {cards}/typo.yaml", "did you mean 'tile_size'?"),
    Case("card-unknown-key", P + " --card {cards}/unknown.yaml", "put other metadata under 'extra:'"),
    Case("card-class-count", P + " --card {cards}/four.yaml", "lists 4 classes but the weights predict 3"),
    Case("card-zero-classes", P + " --card {cards}/zero.yaml", "'classes' is empty"),
    Case("card-in-channels", P + " --card {cards}/in4.yaml", "in_channels=4 but the weights take 3"),
    Case("card-no-architecture", P + " --card {cards}/noarch.yaml", "no 'architecture'"),
    Case("card-invalid-yaml", P + " --card {cards}/broken.yaml", "not valid YAML"),
    Case("card-not-a-mapping", P + " --card {cards}/list.yaml", "expected a YAML mapping"),
    Case("card-tile-not-multiple", P + " --card {cards}/tile100.yaml", "multiple of pad_multiple"),
    Case("onnx-class-count", "predict {scene} -o {out} -m {onnx2} --device cpu", "model outputs 2 channels"),
    # --- a folder holding a previous complete run
    Case("prev-without-overwrite", P, "already exists", prev=True),
    Case("prev-overwrite-truncated", "predict {trunc} -o {out} {model} --overwrite", "truncated", prev=True),
    Case("prev-overwrite-tile-zero", P + " --overwrite --tile-size 0", "tile size", prev=True),
    Case("prev-overwrite-pickle", "predict {scene} -o {out} -m {pickled} --overwrite", "safetensors", prev=True),
    Case("prev-overwrite-card-typo", P + " --overwrite --card {cards}/typo.yaml", "tile_size", prev=True),
    Case("prev-overwrite-vector-format", P + " --overwrite --vector-format xyz", "vector format", prev=True),
    Case("prev-overwrite-vrt", "predict {vrt} -o {out} {model} --overwrite", "missing", prev=True),
    # --- faults while running (raised from every raster read), over a previous run
    Case("fault-memory", P + " --overwrite", "out of memory", prev=True, fault="memory"),
    Case("fault-gpu-memory", P + " --overwrite", "out of memory on the GPU", prev=True, fault="cuda-oom"),
    Case("fault-permission", P + " --overwrite", "permission denied", prev=True, fault="eacces"),
    Case("fault-disk-full-read", P + " --overwrite", "disk is full", prev=True, fault="enospc"),
    Case("fault-comm-closed", P + " --overwrite", "connection to the dask cluster closed", prev=True,
         fault="comm-closed"),
    Case("fault-timeout", P + " --overwrite", "did not answer in time", prev=True, fault="timeout"),
    Case("fault-killed-worker", P + " --overwrite", "worker that ran a block died", prev=True,
         fault="killed-worker"),
    Case("fault-workers-lost", P + " --overwrite", "lost its workers", prev=True, fault="workers-lost"),
    Case("fault-scheduler-lost", P + " --overwrite", "lost its workers", prev=True, fault="scheduler-lost"),
    Case("fault-gdal", P + " --overwrite", "GDAL", prev=True, fault="gdal"),
    Case("fault-ogr", P + " --overwrite", "vector file", prev=True, fault="ogr"),
    Case("fault-bug", P + " --overwrite", "unexpected ZeroDivisionError", prev=True, code=1, fault="bug"),
    # --- vectorize
    Case("vectorize-missing", "vectorize {tmp}/missing.tif -o {out}/polygons", "does not exist"),
    Case("vectorize-not-class-raster", "vectorize {scene} -o {out}/polygons", "not a class raster"),
    Case("vectorize-text-file", "vectorize {notes} -o {out}/polygons", "not a raster"),
    Case("vectorize-format", "vectorize {out}/classes.tif -o {out}/p --vector-format xyz", "vector format",
         prev=True),
    Case("vectorize-exists", "vectorize {out}/classes.tif -o {out}/polygons", "already exists", prev=True),
    Case("vectorize-min-area-in-place", "vectorize {out}/classes.tif -o {out}/p --min-area 5",
         "--overwrite", prev=True),
    Case("vectorize-workers", "vectorize {out}/classes.tif -o {out}/p --workers -1", "workers", prev=True),
    Case("vectorize-simplify", "vectorize {out}/classes.tif -o {out}/p --simplify -2", "simplify", prev=True),
    # --- stats
    Case("stats-missing", "stats {tmp}/missing.tif -o {out}", "does not exist"),
    Case("stats-not-class-raster", "stats {scene} -o {out}", "not a class raster"),
    Case("stats-exists", "stats {out}/classes.tif -o {out}", "already exists", prev=True),
    Case("stats-zones-raster", "stats {out}/classes.tif -o {out} --zones {scene} --overwrite", "vector file",
         prev=True),
    Case("stats-zones-missing", "stats {out}/classes.tif -o {out} --zones {tmp}/z.gpkg --overwrite", "zones file",
         prev=True),
    Case("stats-zone-field", "stats {out}/classes.tif -o {out} --zones {zones} --zone-field owner --overwrite",
         "no field 'owner'", prev=True),
    Case("stats-no-crs", "stats {nocrs_classes} -o {out}", "no CRS"),
    # --- val
    Case("val-nothing-to-evaluate", "val {model}", "--data"),
    Case("val-scene-without-reference", "val {model} --scene {scene} -o {out}", "--reference"),
    Case("val-reference-missing", "val {model} --scene {scene} --reference {tmp}/r.tif -o {out}", "does not exist"),
    Case("val-dataset-missing", "val {model} --data {tmp}/d.yaml -o {out}", "does not exist"),
    Case("val-label-map", "val {model} --scene {scene} --reference {zones} --label-map x -o {out}",
         "VALUE=CLASS"),
    Case("val-tile-size-zero", "val {model} --scene {scene} --reference {scene} --tile-size 0", "tile size"),
    Case("val-model-missing", "val -m {tmp}/nope.safetensors --data {tmp}/d.yaml", "neither a file"),
    Case("val-no-model", "val --data {tmp}/d.yaml", "Missing option"),
    # --- export
    Case("export-no-output", "export -m {ckpt}", "Missing option"),
    Case("export-format", "export -m {ckpt} --format tflite -o {out}/m", "--format"),
    Case("export-pickle", "export -m {pickled} -o {out}/m.onnx", "not a safetensors file"),
    Case("export-onnx", "export -m {onnx} -o {out}/m.onnx", "only torch models"),
    Case("export-card-typo", "export -m {ckpt} --card {cards}/typo.yaml -o {out}/m.onnx", "tile_size"),
    Case("export-under-a-file", "export -m {ckpt} -o {notes}/m.onnx", "not a folder"),
    # --- models and the command group
    Case("models-extra-argument", "models extra", "unexpected extra argument"),
    Case("models-unknown-option", "models --all", "No such option"),
    Case("command-unknown", "segment {scene}", "No such command"),
    Case("group-option-unknown", "--verbose predict {scene}", "No such option"),
]


def _faults() -> dict[str, Callable[[], BaseException]]:
    def cuda_oom() -> BaseException:
        import torch

        return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def comm_closed() -> BaseException:
        from distributed.comm.core import CommClosedError

        return CommClosedError("in <TCP (closed) ConnectionPool.gather local=tcp://10.0.0.1:4000>: "
                               "Stream is closed")

    def killed() -> BaseException:
        from distributed.scheduler import KilledWorker

        return KilledWorker("geoseg-block-0-0", SimpleNamespace(address="tcp://10.0.0.2:4000"), 3)

    def scheduler_lost() -> BaseException:
        from distributed.client import FutureCancelledError

        return FutureCancelledError("geoseg-block-0-0", "scheduler-connection-lost")

    def gdal() -> BaseException:
        from rasterio.errors import RasterioIOError

        return RasterioIOError("Read failed. See previous exception for details.")

    def ogr() -> BaseException:
        from pyogrio.errors import DataSourceError

        return DataSourceError("zones.gpkg: not recognized as being in a supported file format")

    return {
        "memory": MemoryError, "cuda-oom": cuda_oom,
        "eacces": lambda: PermissionError(errno.EACCES, "Permission denied", "/data/scene.tif"),
        "enospc": lambda: OSError(errno.ENOSPC, "No space left on device", "/data/.cache"),
        "comm-closed": comm_closed, "timeout": lambda: TimeoutError("no reply from tcp://10.0.0.1:8786 in 30 s"),
        "killed-worker": killed, "workers-lost": lambda: RuntimeError("all workers lost"),
        "scheduler-lost": scheduler_lost, "gdal": gdal, "ogr": ogr,
        "bug": lambda: ZeroDivisionError("division by zero"),
    }


FAULTS = _faults()


# ------------------------------------------------------------------ the files the cases use


def _model(root: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from geoseg.models.registry import create_model

    torch.manual_seed(1)
    m = create_model("geoseg-n-sem", num_classes=3, in_channels=3)
    path = root / "yolo-n.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    card = {"name": "yolo-n-test", "classes": ["x", "y", "z"], "in_channels": 3, "input_scale": 1 / 255,
            "tile_size": 128, "pad_multiple": 32, "architecture": "geoseg-n-sem"}
    path.with_suffix(".yaml").write_text(yaml.safe_dump(card))
    return path


def _cards(root: Path, card: dict[str, Any]) -> Path:
    root.mkdir()
    variants = {
        "typo": {**{k: v for k, v in card.items() if k != "tile_size"}, "tilesize": 128},
        "unknown": {**card, "trained_by": "me"},
        "four": {**card, "classes": ["a", "b", "c", "d"]},
        "zero": {**card, "classes": []},
        "in4": {**card, "in_channels": 4},
        "noarch": {k: v for k, v in card.items() if k != "architecture"},
        "tile100": {**card, "tile_size": 100},
    }
    for name, d in variants.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(d))
    (root / "broken.yaml").write_text("name: x\nclasses: [a, b\n")
    (root / "list.yaml").write_text("- name\n- classes\n")
    return root


def _onnx(path: Path, classes: int) -> Path:
    """A 1x1 convolution from 3 bands to ``classes`` channels, with a static channel dimension."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((classes, 3, 1, 1), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes, "h", "w"])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(
        {"name": path.stem, "classes": ["x", "y", "z"], "in_channels": 3, "tile_size": 128}))
    return path


def _truncated(path: Path, src: Path, **copy: Any) -> Path:
    rasterio.shutil.copy(src, path, **copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _vrt(path: Path) -> Path:
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
        '<SourceFilename relativeToVRT="1">gone.tif</SourceFilename>'
        f'<SourceBand>{b}</SourceBand><SourceProperties RasterXSize="{W}" RasterYSize="{H}" DataType="Byte" '
        f'BlockXSize="{W}" BlockYSize="8"/><SrcRect xOff="0" yOff="0" xSize="{W}" ySize="{H}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{W}" ySize="{H}"/></SimpleSource></VRTRasterBand>'
        for b in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="{W}" rasterYSize="{H}"><SRS>EPSG:32633</SRS>'
                    f"<GeoTransform>500000, 0.5, 0, 5400000, 0, -0.5</GeoTransform>{bands}</VRTDataset>")
    return path


def _zones(path: Path) -> Path:
    import geopandas as gpd
    from shapely.geometry import box

    gpd.GeoDataFrame({"name": ["a", "b"]}, geometry=[box(500000, 5399952, 500032, 5400000),
                                                      box(500032, 5399952, 500064, 5400000)],
                     crs="EPSG:32633").to_file(path)
    return path


def _rasters(root: Path) -> dict[str, Path]:
    img = smooth_image((3, H, W))
    scene = write_raster(root / "scene.tif", img)
    big = write_raster(root / "big.tif", smooth_image((3, 256, 256), seed=2), tiled=True,
                       blockxsize=128, blockysize=128)
    half = np.where(np.arange(W) < W // 2, np.nan, img.astype(np.float32))
    (root / "notes.tif").write_text("these are notes, not a raster\n")
    (root / "empty.tif").write_bytes(b"")
    nocrs = write_raster(root / "nocrs_classes.tif", np.zeros((1, H, W), np.uint8), crs=None, nodata=255)
    return {
        "scene": scene, "notes": root / "notes.tif", "empty": root / "empty.tif",
        "trunc": _truncated(root / "trunc.tif", big),
        "trunc_cog": _truncated(root / "trunc_cog.tif", big, driver="COG"),
        "vrt": _vrt(root / "missing-source.vrt"),
        "nocrs": write_raster(root / "nocrs.tif", img, crs=None), "nocrs_classes": nocrs,
        "two": write_raster(root / "two.tif", img[:2]),
        "four": write_raster(root / "four.tif", np.concatenate([img, img[:1]]), photometric="MINISBLACK"),
        "nan": write_raster(root / "nan.tif", np.full((3, 64, 64), np.nan, np.float32)),
        "half_nan": write_raster(root / "half_nan.tif", half.astype(np.float32)),
        "zones": _zones(root / "zones.gpkg"),
    }


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every file the cases name, made once: rasters good and bad, models, cards."""
    root = tmp_path_factory.mktemp("kit")
    files = _rasters(root)
    models = root / "models"
    models.mkdir()
    (models / "empty").mkdir()
    ckpt = _model(models)
    card = yaml.safe_load(ckpt.with_suffix(".yaml").read_text())
    (models / "pickled.safetensors").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    (models / "empty.safetensors").write_bytes(b"")
    (models / "old.pt").write_bytes(pickle.dumps({}))
    (models / "keras.h5").write_bytes(b"\x89HDF\r\n")
    for name in ("pickled", "empty", "old", "keras"):
        (models / f"{name}.yaml").write_text(yaml.safe_dump(card))
    shutil.copy(ckpt, models / "cardless.safetensors")
    files.update(ckpt=ckpt, models=models, pickled=models / "pickled.safetensors",
                 empty_st=models / "empty.safetensors",
                 pt=models / "old.pt", h5=models / "keras.h5", cardless=models / "cardless.safetensors",
                 onnx=_onnx(models / "tiny3.onnx", 3), onnx2=_onnx(models / "tiny2.onnx", 2),
                 cards=_cards(root / "cards", card))
    return files


@pytest.fixture(scope="module")
def previous_run(kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run of the scene, copied into the cases that run over a previous run."""
    out = tmp_path_factory.mktemp("prev") / "out"
    r = CliRunner().invoke(cli, ["predict", str(kit["scene"]), "-o", str(out), "-q", "--confidence",
                                 "-m", str(kit["ckpt"]), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------ the checks


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]] | None:
    """Name -> (size, mtime, sha256) of every file under ``folder``; None where it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(r: Any, code: int) -> str:
    """The one line a failed command printed, after checking the exit status and the shape of stderr."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("Error: ") and "; " in line, line
    return line


def _args(case: Case, kit: dict[str, Path], tmp: Path, out: Path) -> list[str]:
    names = {k: str(v) for k, v in kit.items()}
    names.update(tmp=str(tmp), out=str(out), model=M.format(**names), ckpt=names["ckpt"])
    args = case.args.format(**names).split()
    return [*args, "-q"] if args[0] == "predict" else args


def _inject(monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    from geoseg.io.raster import RasterSource

    def fail(self: Any, rows: slice, cols: slice) -> Any:
        raise FAULTS[fault]()

    monkeypatch.setattr(RasterSource, "read", fail)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, kit: dict[str, Path], previous_run: Path, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    if case.no_gpu:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEOSEG_DEBUG", raising=False)
    out = tmp_path / "out"
    if case.prev:
        shutil.copytree(previous_run, out)
    if case.fault:
        _inject(monkeypatch, case.fault)
    before = snapshot(out)
    r = CliRunner().invoke(cli, _args(case, kit, tmp_path, out))
    if case.check is not None:
        assert r.exit_code == case.code, (r.output, r.exception)
        case.check(out)
        return
    line = error_line(r, case.code)
    assert case.expect is not None and case.expect in line, line
    assert snapshot(out) == before, "a refused or failed run changed the output folder"


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------ a full disk, and --debug


def _tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (needs root); False where that is not possible."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _fill(folder: Path) -> None:
    """Write into ``folder`` until the disk is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk_is_one_line_and_keeps_previous_outputs(kit: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "disk"
    real = _tmpfs(disk, "4m")
    if not real:  # no tmpfs here: the COG write fails as on a full disk
        disk.mkdir(exist_ok=True)
    try:
        out = disk / "out"
        args = ["predict", str(kit["scene"]), "-o", str(out), "-q", "-m", str(kit["ckpt"]), "--device", "cpu"]
        assert CliRunner().invoke(cli, args).exit_code == 0
        before = snapshot(out)
        if real:
            _fill(disk)
        else:
            def full(*a: Any, **k: Any) -> None:
                raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))

            monkeypatch.setattr(rasterio.shutil, "copy", full)
        line = error_line(CliRunner().invoke(cli, [*args, "--overwrite"]), 2)
        assert "disk is full" in line and "--output" in line, line
        assert snapshot(out) == before
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=True)


def test_debug_shows_the_original_exception(kit: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from geoseg.errors import InputNotFoundError, NotARasterError

    monkeypatch.delenv("GEOSEG_DEBUG", raising=False)
    args = ["predict", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "o"), "-m", str(kit["ckpt"])]
    r = CliRunner().invoke(cli, ["--debug", *args])
    assert isinstance(r.exception, InputNotFoundError)
    monkeypatch.setenv("GEOSEG_DEBUG", "1")
    r = CliRunner().invoke(cli, ["predict", str(kit["notes"]), "-o", str(tmp_path / "o"), "-m", str(kit["ckpt"])])
    assert isinstance(r.exception, NotARasterError)
    monkeypatch.setenv("GEOSEG_DEBUG", "0")
    assert error_line(CliRunner().invoke(cli, args), 2).startswith("Error: input raster")
    r = CliRunner().invoke(cli, ["--debug", *args, "--tile-size", "big"])  # click's own usage text
    assert r.exit_code == 2 and "Usage:" in r.stderr


def test_an_output_folder_that_cannot_be_made_is_named_as_given(kit: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The hidden staging folder is an implementation detail: the error names the --output folder."""
    real_mkdir = Path.mkdir

    def refuse(self: Path, *a: Any, **k: Any) -> None:
        if self.name.endswith(".geoseg-partial"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "maps"
    args = ["predict", str(kit["scene"]), "-o", str(out), "-q", "-m", str(kit["ckpt"]), "--device", "cpu"]
    line = error_line(CliRunner().invoke(cli, args), 2)
    assert line == f"Error: cannot create the output folder {out} (Read-only file system); choose another --output"
    assert not out.exists()
