"""The CLI: outputs, summary, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli.main import cli

from .conftest import smooth_image, write_raster


def geoseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geoseg", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def checkpoint_args(yolo_checkpoint):
    return ["--model", str(yolo_checkpoint), "--device", "cpu"]


def test_help_is_instant_and_does_not_import_torch():
    code = "import sys, geoseg.cli.main; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    t = time.perf_counter()
    r = geoseg("--help")
    assert r.returncode == 0 and "predict" in r.stdout
    assert time.perf_counter() - t < 10  # generous: a process start, never a torch import


@pytest.mark.slow
def test_predict_writes_every_output(tmp_path, rgb_raster, checkpoint_args):
    out = tmp_path / "out"
    r = geoseg("predict", str(rgb_raster), "-o", str(out), "--confidence", *checkpoint_args)
    assert r.returncode == 0, r.stderr
    assert "MPix/s" in r.stdout and "% of valid" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["classes.qml", "classes.tif", "classes.tif.aux.xml", "confidence.tif",
                     "polygons.gpkg", "polygons.qml", "run.json", "stats.csv", "stats.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["tile_size"] == 128 and run["options"]["device"] == "cpu"
    assert run["counts"]["pixels"] == 300 * 420
    assert set(run["versions"]) >= {"geoseg", "torch", "rasterio", "gdal", "dask"}
    with rasterio.open(out / "classes.tif") as ds:
        assert ds.shape == (300, 420)
        assert set(np.unique(ds.read(1))) <= {0, 1, 2}
    assert "<Category>x</Category>" in (out / "classes.tif.aux.xml").read_text()
    assert 'label="y"' in (out / "classes.qml").read_text()


@pytest.mark.slow
def test_default_output_dir_is_stem_geoseg(tmp_path, rgb_raster, checkpoint_args):
    r = geoseg("predict", str(rgb_raster), "-q", *checkpoint_args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "scene_geoseg" / "classes.tif").exists()


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
def test_bad_inputs_get_one_line_errors(tmp_path, rgb_raster, checkpoint_args):
    out = str(tmp_path / "o")
    one_line_error(geoseg("predict", str(tmp_path / "missing.tif"), "-o", out, *checkpoint_args),
                   "does not exist")
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    one_line_error(geoseg("predict", str(text), "-o", out, *checkpoint_args), "not a raster")
    two = write_raster(tmp_path / "two.tif", smooth_image((2, 64, 64)))
    one_line_error(geoseg("predict", str(two), "-o", out, *checkpoint_args), "2 data bands", "expects 3")
    four = write_raster(tmp_path / "four.tif", smooth_image((4, 64, 64)), photometric="MINISBLACK")
    one_line_error(geoseg("predict", str(four), "-o", out, *checkpoint_args), "--bands")
    one_line_error(geoseg("predict", str(rgb_raster), "-o", out, "--blend", "cosine", *checkpoint_args),
                   "unknown blend window", "hann")
    one_line_error(geoseg("predict", str(rgb_raster), "-o", out, "--model", str(tmp_path / "nope.onnx")),
                   "neither a file nor a built-in model")
    assert not Path(out).exists(), "a failed run leaves no output behind"
    assert geoseg("predict", str(rgb_raster), "-o", out, "-q", *checkpoint_args).returncode == 0
    one_line_error(geoseg("predict", str(rgb_raster), "-o", out, *checkpoint_args),
                   "already exists", "--overwrite")
    assert geoseg("predict", str(rgb_raster), "-o", out, "-q", "--overwrite", *checkpoint_args).returncode == 0


def test_bands_option_selects_bands(tmp_path, checkpoint_args):
    four = write_raster(tmp_path / "four.tif", smooth_image((4, 96, 96)), photometric="MINISBLACK")
    r = CliRunner().invoke(cli, ["predict", str(four), "-o", str(tmp_path / "b"), "--bands", "1,2,3",
                                 "-q", *checkpoint_args])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["options"]["bands"] == [1, 2, 3]


@pytest.mark.slow
def test_interrupted_run_publishes_nothing_and_resumes(tmp_path, yolo_checkpoint):
    import geoseg
    from geoseg.errors import PartialRunError

    src = write_raster(tmp_path / "big.tif", smooth_image((3, 1300, 1100), seed=3))
    calls = []

    def boom(done, total):
        calls.append(done)
        if done == 2:
            raise KeyboardInterrupt

    opts = dict(model=yolo_checkpoint, device="cpu", confidence=True, tile_size=64)
    with pytest.raises(KeyboardInterrupt):
        geoseg.predict(src, tmp_path / "x", progress=boom, **opts)
    assert not (tmp_path / "x").exists()  # nothing published
    hidden = [p.name for p in tmp_path.iterdir() if "geoseg" in p.name]
    assert hidden == [".x.geoseg-partial"]  # the finished blocks, under a name that never looks finished
    with pytest.raises(PartialRunError, match=r"[2-9] of \d+ blocks done"):
        geoseg.predict(src, tmp_path / "x", **opts)
    resumed = geoseg.predict(src, tmp_path / "x", resume=True, **opts)
    full = geoseg.predict(src, tmp_path / "y", **opts)
    for name in ("classes.tif", "confidence.tif", "stats.csv"):
        assert (resumed.output / name).read_bytes() == (full.output / name).read_bytes(), name
    assert resumed.tiles_run == full.tiles_run
    assert not (tmp_path / ".x.geoseg-partial").exists()
