"""``geoseg batch`` on a real dask cluster: a ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1.

The scenes are crops of the real drone orthophoto in ``data/scenes`` (and of
``../shared/data`` where present), placed at a few locations and in two
CRSs. Every class raster a batch writes must be byte-identical to a single
``geoseg.predict`` of the same scene in this process. Both run torch with
one intra-op thread per forward pass (``streams`` = cores), the workers
because the job passes ``--streams`` through, this process because it asks
for the same: with the same thread count the same kernels run in the same
order, so equal bytes are expected, not luck.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

import geoseg
from geoseg.models.backends import available_cores
from geoseg.workflow.sources import expand_sources, unique_ids

from .conftest import REPO, SHARED_DATA

#: the scenes are run at their own 2 cm on purpose (see OPTIONS)
pytestmark = pytest.mark.filterwarnings("ignore:the scene's ground resolution")

BIN = Path(sys.executable).parent
ORTHO = REPO / "data" / "scenes" / "field-ortho.tif"
MODEL = "geoseg-landcover-n"
STREAMS = available_cores()  # one torch thread per forward pass, here and on the workers
#: the drone image at its own 2 cm (the model's 0.8 m would make it one class), 256-px tiles: several per scene
OPTIONS = {"gsd": "off", "tile_size": 256}
CLI = ["--model", MODEL, "--gsd", "off", "--tile-size", "256", "--device", "cpu", "--streams", str(STREAMS)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- scenes and references ------------------------------------------------------------------------------------


def crop(src: Path, dst: Path, window: Window, *, shift: tuple[int, int] = (0, 0), crs: str | None = None,
         **profile) -> Path:
    """A crop of a real raster, moved by ``shift`` (columns, rows) and given ``crs``: real pixels, another place.

    Whole pixels keep every scene of a CRS on one grid, so a mosaic can give their pixels back exactly.
    """
    with rasterio.open(src) as ds:
        data = ds.read(window=window)
        t = ds.window_transform(window)
        prof = {**ds.profile, "width": int(window.width), "height": int(window.height),
                "transform": Affine(t.a, t.b, t.c + shift[0] * t.a, t.d, t.e, t.f + shift[1] * t.e),
                "crs": crs or ds.crs, **profile}
    with rasterio.open(dst, "w", **prof) as out:
        out.write(data)
    return dst


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """23 real scenes (24 with ../shared): 12 + 8 crops in EPSG:32633, 2 crops and the whole image in EPSG:32634."""
    d = tmp_path_factory.mktemp("scenes")
    out: dict[str, Path] = {}
    for r in range(3):
        for c in range(4):
            out[f"a{r}{c}"] = crop(ORTHO, d / f"a{r}{c}.tif", Window(c * 310, r * 280, 310, 280))
    for r in range(2):
        for c in range(4):
            out[f"b{r}{c}"] = crop(ORTHO, d / f"b{r}{c}.tif", Window(c * 310, r * 420, 310, 420), shift=(5000, 0))
    for c in range(2):
        out[f"c{c}"] = crop(ORTHO, d / f"c{c}.tif", Window(c * 600, 200, 600, 400), crs="EPSG:32634")
    out["big"] = crop(ORTHO, d / "big.tif", Window(0, 0, 1243, 841), shift=(0, -5000), crs="EPSG:32634")
    drone = SHARED_DATA / "drone" / "dummy_fotomap_small.tif"
    if drone.exists():  # the shared copy of the drone image, as a scene of its own elsewhere
        out["shared"] = crop(drone, d / "shared.tif", Window(400, 300, 500, 400), shift=(15000, 0))
    return out


def reference(scene: Path, out: Path) -> Path:
    """A single local predict of ``scene``: the bytes every batch must reproduce."""
    geoseg.predict(scene, out, model=MODEL, device="cpu", streams=STREAMS, polygons=False, **OPTIONS)
    return out / "classes.tif"


@pytest.fixture(scope="module")
def references(scenes, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("references")
    return {name: reference(path, d / name) for name, path in scenes.items()}


def assert_same_bytes(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert x.profile == y.profile
        assert np.array_equal(x.read(), y.read()), f"{a} differs from {b}"
    assert a.read_bytes() == b.read_bytes(), f"{a} and {b} hold the same pixels in different bytes"


# --- the cluster ----------------------------------------------------------------------------------------------


class DaskProcesses:
    """``dask scheduler`` and ``dask worker --no-nanny`` processes (a killed worker stays dead)."""

    def __init__(self, root: Path):
        self.root = root
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.workers: list[subprocess.Popen] = []
        (root / "cwd").mkdir()  # the workers' working directory: not the client's
        self.scheduler = self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port",
                                                   self.address.rsplit(":", 1)[1], "--no-dashboard"])

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen([str(BIN / "dask"), *args], cwd=self.root / "cwd", stdout=log, stderr=log)

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.workers if p.poll() is None]

    def ensure(self, n: int = 2) -> None:
        from distributed import Client

        while len(self.alive()) < n:
            self.workers.append(self._start(f"worker-{len(self.workers)}", [
                "worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                "--local-directory", str(self.root / "space")]))
        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(n, timeout=90)
            deadline = time.monotonic() + 30
            while len(c.nthreads()) > n and time.monotonic() < deadline:  # dead ones leave the scheduler
                time.sleep(0.2)

    def stop(self) -> None:
        for group in (self.workers, [self.scheduler]):  # workers first, while their scheduler still answers
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    procs = DaskProcesses(tmp_path_factory.mktemp("dask"))
    try:
        procs.ensure(2)
        yield procs
    finally:
        procs.stop()


def batch(args: list[str], *, cwd: Path | None = None, wait: bool = True) -> Any:
    """``geoseg batch ARGS``: run to the end (a CompletedProcess), or started (a Popen) when not ``wait``."""
    cmd = [str(BIN / "geoseg"), "batch", *args]
    if wait:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest(root: Path) -> dict[str, dict]:
    return {s["id"]: s for s in json.loads((root / "batch.json").read_text())["scenes"]}


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("Error:")]


# --- sources (no cluster) -------------------------------------------------------------------------------------


def test_sources_paths_globs_lists_and_stac(tmp_path, monkeypatch):
    for name in ("x.tif", "y.tif", "sub/x.tif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# scenes\nx.tif\n  sub/x.tif   # the same stem\n\n"
                                       "https://example.org/data/z.tif\n/vsicurl/https://example.org/w.tif\n")
    item = {"type": "Feature", "id": "item-1", "properties": {"datetime": "2024-05-01T10:00:00Z"},
            "assets": {"thumb": {"href": "t.png", "type": "image/png", "roles": ["thumbnail"]},
                       "visual": {"href": "./sub/x.tif", "type": "image/tiff", "roles": ["data"]}}}
    (tmp_path / "item.json").write_text(json.dumps(item))
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": [
        item, {**item, "id": "item 2", "assets": {"a": {"href": "https://example.org/a.tif", "roles": ["data"]},
                                                   "b": {"href": "b.tif", "roles": ["data"]}}}]}))
    monkeypatch.chdir(tmp_path)
    got = expand_sources(["y.tif", "list.txt", "item.json"])
    assert [s.id for s in got] == ["y", "x", "x-2", "z", "w", "item-1"]
    assert got[0].href == str(tmp_path / "y.tif") and got[2].href == str(tmp_path / "sub" / "x.tif")
    assert got[3].href == "https://example.org/data/z.tif" and got[4].href.startswith("/vsicurl/")
    assert got[5].href == str(tmp_path / "sub" / "x.tif") and got[5].datetime == "2024-05-01T10:00:00Z"
    assert [s.id for s in expand_sources(["*.tif"])] == ["x", "y"]
    with pytest.raises(geoseg.GeosegError, match="several assets with role 'data'.*--asset"):
        expand_sources(["items.json"])
    with pytest.raises(geoseg.GeosegError, match="item-1 .* has no asset 'a'"):
        expand_sources(["items.json"], asset="a")
    with pytest.raises(geoseg.GeosegError, match="matches no files"):
        expand_sources(["nothing-*.tif"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_sources(["missing.tif"])
    assert unique_ids(["a b", "a_b", "A_B", "..", "x"]) == ["a_b", "a_b-2", "A_B-3", "scene", "x"]


@pytest.mark.slow
def test_bad_scheduler_addresses_are_one_line(tmp_path):
    scene = crop(ORTHO, tmp_path / "s.tif", Window(0, 0, 64, 64))
    r = batch([str(scene), "-o", str(tmp_path / "out"), "--scheduler", "not an address", *CLI])
    assert r.returncode == 2 and error_lines(r.stderr) == r.stderr.strip().splitlines()
    assert "is not a dask scheduler address" in r.stderr
    assert "leave it out for a local cluster of worker processes" in r.stderr
    port = free_port()
    r = batch([str(scene), "-o", str(tmp_path / "out"), "--scheduler", f"tcp://127.0.0.1:{port}", *CLI])
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1, r.stderr
    assert "cannot reach dask scheduler" in r.stderr and "connection refused" in r.stderr
    assert not (tmp_path / "out").exists(), "nothing written before the scheduler answers"
    # predict alike: at once, and no hidden partial folder left beside the output
    from click.testing import CliRunner

    from geoseg.cli.main import cli

    res = CliRunner().invoke(cli, ["predict", str(scene), "-o", str(tmp_path / "p"), "-q",
                                   "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert res.exit_code == 2 and "connection refused" in res.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["s.tif"]


def test_only_errors_no_retry_mends_are_final(tmp_path):
    from geoseg.errors import (
        BandCountError,
        ConfigError,
        DeviceError,
        InputNotFoundError,
        ModelNotFoundError,
        NotARasterError,
    )
    from geoseg.workflow.scene_task import permanent

    local = tmp_path / "notes.tif"
    local.write_text("x")
    assert permanent(NotARasterError("x"), str(local))  # a local file GDAL cannot read
    assert not permanent(NotARasterError("x"), "https://example.com/scene.tif")  # a server may answer next time
    assert permanent(ConfigError("no CRS"), str(local)) and permanent(BandCountError("2 bands"), str(local))
    for transient in (InputNotFoundError("x"), ModelNotFoundError("x"), DeviceError("x"), RuntimeError("x")):
        assert not permanent(transient, str(local))  # a node without the mount, the model or a working GPU


@pytest.mark.slow
def test_a_scene_geoseg_refuses_fails_once_with_its_own_message(tmp_path):
    """Not a raster: no retry can mend it, so it is tried once and reported as predict would say it."""
    good = crop(ORTHO, tmp_path / "good.tif", Window(0, 0, 256, 256))
    notes = tmp_path / "notes.tif"
    notes.write_text("not a raster")
    r = batch([str(good), str(notes), "-o", str(tmp_path / "out"), "--workers", "1", *CLI])
    m = manifest(tmp_path / "out")
    assert r.returncode == 1 and m["good"]["status"] == "done", r.stderr
    assert m["notes"]["status"] == "failed" and m["notes"]["attempts"] == 1
    assert m["notes"]["error"].startswith(f"{notes} is not a raster GDAL can read"), m["notes"]["error"]
    assert "Traceback" not in r.stderr and "Compute Failed" not in r.stderr, r.stderr


# --- one job of many scenes, through a killed worker and a corrupt input --------------------------------------


def kill_a_busy_worker(root: Path, procs: DaskProcesses, skip: tuple[str, ...] = (),
                       timeout: float = 120) -> str | None:
    """After the first scene is published, SIGKILL a worker in the middle of a scene; return that scene's id.

    (None when the scene published its outputs just as the worker was killed: then it needs no new attempt.)

    The attempt logs name the process of each attempt: a scene whose latest
    attempt ran in a worker and that has no ``run.json`` yet is in progress.
    """
    deadline = time.monotonic() + timeout
    while not any(root.glob("*/run.json")):
        assert time.monotonic() < deadline, "no scene finished"
        time.sleep(0.05)
    pids = {p.pid: p for p in procs.alive()}
    while time.monotonic() < deadline:
        for log in sorted((root / ".geoseg-batch").glob("*.attempts"), key=lambda p: -p.stat().st_mtime):
            lines = log.read_text().splitlines()
            sid, pid = log.name.split(".")[0], int(lines[-1].split("\t")[2]) if lines else -1
            if pid in pids and sid not in skip and not (root / sid / "run.json").exists():
                pids[pid].send_signal(signal.SIGKILL)
                pids[pid].wait()
                return None if (root / sid / "run.json").exists() else sid
        time.sleep(0.01)
    raise AssertionError("no worker was busy with a scene")


@pytest.fixture(scope="module")
def job(scenes, cluster, tmp_path_factory):
    """The CLI over every scene and a truncated GeoTIFF, one worker killed mid-job."""
    d = tmp_path_factory.mktemp("job")
    broken = d / "broken.tif"
    data = scenes["a00"].read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # the header survives, most pixels do not
    listing = d / "scenes.txt"
    listing.write_text("\n".join(str(p) for p in scenes.values()) + f"\n{broken}\n")
    root = d / "out"
    args = [str(listing), "-o", str(root), "--scheduler", cluster.address, "--retries", "1",
            "--large-scene", "500000", *CLI]
    proc = batch(args, wait=False)
    try:
        killed = kill_a_busy_worker(root, cluster, skip=("broken",))  # its attempts are counted below
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    cluster.ensure(2)
    return {"root": root, "args": args, "rc": proc.returncode, "stdout": out, "stderr": err, "killed": killed,
            "scheduler": cluster.address}


@pytest.mark.slow
def test_batch_classes_equal_single_runs_through_a_killed_worker(job, scenes, references):
    root, m = job["root"], manifest(job["root"])
    assert set(m) == {*scenes, "broken"}
    for name in scenes:
        assert m[name]["status"] == "done", m[name]
        assert_same_bytes(root / name / "classes.tif", references[name])
        assert {"classes.tif", "polygons.gpkg", "stats.csv", "run.json"} <= set(m[name]["outputs"])
    assert m["big"]["large"] and not m["a00"]["large"], "the large scene ran from the client"
    if job["killed"] is not None:  # the scene the killed worker was running cost one more attempt
        assert m[job["killed"]]["attempts"] >= 2, m[job["killed"]]
        assert len(m[job["killed"]]["workers"]) == 2, "and ran again on the other worker"
    assert not list(root.glob(".*.geoseg-partial")), "no interrupted run is left behind"
    from distributed import Client

    with Client(job["scheduler"], timeout="30s") as c:  # the surviving worker ran many scenes with one model
        models = c.run(lambda: len(__import__("geoseg.models.loading", fromlist=["x"])._PROCESS_CACHE))
    assert max(models.values()) == 1, models


@pytest.mark.slow
def test_a_corrupt_input_is_named_and_the_others_complete(job):
    m = manifest(job["root"])
    assert job["rc"] == 1
    errors = error_lines(job["stderr"])
    assert len(errors) == 1 and errors == job["stderr"].strip().splitlines()[-1:], job["stderr"]
    assert "1 failed: broken (" in errors[0] and "batch.json" in errors[0]
    assert m["broken"]["status"] == "failed" and m["broken"]["attempts"] == 2  # tried, retried, reported
    assert "\n" not in m["broken"]["error"] and m["broken"]["error"]
    assert "broken" in job["stdout"]  # the summary table names it


@pytest.mark.slow
def test_job_outputs_mosaic_stats_polygons_catalog(job, scenes):
    import geopandas as gpd
    import pyarrow.parquet as pq
    import pystac
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.mlm import MLMExtension
    from pystac.validation import validate_dict

    root, m = job["root"], manifest(job["root"])
    done = [s for s in m if m[s]["status"] == "done"]
    # one mosaic per CRS, giving each scene's pixels back
    assert sorted(p.name for p in root.glob("mosaic*.vrt")) == ["mosaic-EPSG_32633.vrt", "mosaic-EPSG_32634.vrt"]
    for s in done:
        with rasterio.open(root / s / "classes.tif") as c:
            with rasterio.open(root / f"mosaic-{c.crs.to_string().replace(':', '_')}.vrt") as v:
                win = rasterio.windows.from_bounds(*c.bounds, transform=v.transform).round_offsets().round_lengths()
                assert np.array_equal(v.read(1, window=win), c.read(1)), s
                assert v.colormap(1)[0] == c.colormap(1)[0]
    # the job's stats: every scene's rows, with the scene id
    rows = pq.read_table(root / "stats.parquet").to_pylist()
    assert len(rows) == 5 * len(done) and {r["scene"] for r in rows} == set(done)
    for s in done:
        with open(root / s / "stats.csv") as f:
            own = [ln.split(",") for ln in f.read().splitlines()[1:]]
        assert sum(int(r[3]) for r in own) == sum(r["pixels"] for r in rows if r["scene"] == s)
        hist = json.loads((root / s / "run.json").read_text())["counts"]["class_pixels"]
        assert {r["class_name"]: r["pixels"] for r in rows if r["scene"] == s} == hist
    csv_rows = (root / "stats.csv").read_text().splitlines()
    assert len(csv_rows) == len(rows) + 1 and csv_rows[0].startswith("scene,zone,class_id")
    # polygons of every scene in one layer, in EPSG:4326 because the scenes differ in CRS
    poly = gpd.read_parquet(root / "polygons.parquet")
    assert poly.crs.to_epsg() == 4326 and set(poly["scene"]) == set(done)
    for s in ("a00", "big"):
        own = gpd.read_file(root / s / "polygons.gpkg", layer=0)
        assert (poly["scene"] == s).sum() == len(own)
    # the STAC catalog: core schema validated with pystac's bundled schemas, extensions read back
    doc = json.loads((root / "catalog.json").read_text())
    assert doc["type"] == "FeatureCollection" and [f["id"] for f in doc["features"]] == done
    for f in doc["features"]:
        validate_dict(f, extensions=[])  # offline: the item schema of STAC 1.1 and GeoJSON ship with pystac
        item = pystac.Item.from_dict(f)
        assert item.properties["geoseg:datetime_source"] == "file-mtime"
        lon, lat = item.geometry["coordinates"][0][0]
        assert 14 < lon < 24 and 50 < lat < 54, "EPSG:4326 footprint near the ortho (zone 33 or 34)"
        assets = item.assets
        assert assets["classes"].media_type == "image/tiff; application=geotiff; profile=cloud-optimized"
        assert assets["classes"].roles == ["data", "classification"]
        assert assets["polygons"].media_type == "application/geopackage+sqlite3"
        assert assets["stats"].media_type == "text/csv" and "confidence" not in assets
        assert (root / assets["classes"].href).resolve() == (root / f["id"] / "classes.tif")
        classes = ClassificationExtension.ext(assets["classes"]).classes
        assert [(c.value, c.name) for c in classes[:5]] == list(enumerate(
            ["building", "land", "road", "vegetation", "water"]))
        assert classes[0].color_hint == "E31A1C" and classes[-1].value == 255 and classes[-1].nodata
        mlm = MLMExtension.ext(item)
        assert (mlm.mlm_name, mlm.architecture, mlm.tasks) == (MODEL, "geoseg-n-sem", ["semantic-segmentation"])
        assert mlm.input[0].bands == ["red", "green", "blue"] and mlm.input[0].input.shape == [-1, 3, 512, 512]
        assert [c.name for c in mlm.output[0].classes] == ["building", "land", "road", "vegetation", "water"]
        assert assets["model"].roles == ["mlm:model"] and Path(assets["model"].href).is_file()


@pytest.mark.slow
def test_rerun_skips_what_is_complete_and_redoes_the_rest(job, references):
    root = job["root"]
    before = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/run.json")}
    (root / "a01" / "run.json").unlink()  # an incomplete scene: done again
    r = batch(job["args"])
    m = manifest(root)
    assert r.returncode == 1 and "1 failed: broken" in error_lines(r.stderr)[0]
    after = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/run.json")}
    assert {s for s in before if s != "a01" and after[s] != before[s]} == set(), "a complete scene ran again"
    assert m["a01"]["status"] == "done" and not m["a01"]["reused"]
    assert_same_bytes(root / "a01" / "classes.tif", references["a01"])
    assert all(m[s]["reused"] for s in before if s != "a01")
    assert m["broken"]["status"] == "failed" and m["broken"]["attempts"] == 2


@pytest.mark.slow
def test_an_interrupted_scene_continues_from_its_finished_blocks(scenes, references, cluster, tmp_path):
    root = tmp_path / "out"

    def interrupt(done: int, total: int) -> None:
        if done == 1:
            raise RuntimeError("interrupted after the first block")

    with pytest.raises(RuntimeError, match="interrupted"):
        geoseg.predict(scenes["big"], root / "big", model=MODEL, device="cpu", streams=STREAMS, polygons=False,
                       progress=interrupt, **OPTIONS)
    assert (root / ".big.geoseg-partial").is_dir() and not (root / "big").exists()
    r = batch([str(scenes["big"]), "-o", str(root), "--scheduler", cluster.address, "--no-polygons", *CLI])
    assert r.returncode == 0, r.stderr
    m = manifest(root)["big"]
    assert m["status"] == "done" and m["resumed"], m
    assert_same_bytes(root / "big" / "classes.tif", references["big"])


# --- paths relative to the client, STAC input, zones ----------------------------------------------------------


@pytest.mark.slow
def test_relative_model_card_scenes_zones_and_stac_from_another_cwd(scenes, references, cluster, tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from geoseg.models.loading import builtin_models

    proj = tmp_path / "project"
    (proj / "models").mkdir(parents=True)
    card = builtin_models()[MODEL]
    shutil.copy(card.with_suffix(".safetensors"), proj / "models" / "land.safetensors")
    shutil.copy(card, proj / "models" / "land-card.yaml")
    (proj / "img").mkdir()
    for name in ("a10", "a11", "b00"):
        shutil.copy(scenes[name], proj / "img" / f"{name}.tif")
    with rasterio.open(scenes["a10"]) as ds:
        zone = box(*ds.bounds).buffer(-1.0)
        crs = ds.crs
    gpd.GeoDataFrame({"name": ["inner"]}, geometry=[zone], crs=crs).to_file(proj / "zones.gpkg")
    item = {"type": "Feature", "stac_version": "1.1.0", "geometry": None, "links": [],
            "properties": {"datetime": "2023-07-14T09:30:00Z"}}
    (proj / "stac").mkdir()
    (proj / "stac" / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {**item, "id": "flight-a10", "assets": {"ortho": {"href": "../img/a10.tif", "type": "image/tiff",
                                                          "roles": ["data"]}}},
        {**item, "id": "flight-a11", "assets": {"ortho": {"href": "../img/a11.tif", "roles": ["data"]}}}]}))
    args = ["stac/items.json", "img/b*.tif", "-o", "out", "--scheduler", cluster.address, "--model",
            "models/land.safetensors", "--card", "models/land-card.yaml", "--zones", "zones.gpkg",
            "--zone-field", "name", "--no-polygons", *CLI[2:]]
    assert not (cluster.root / "cwd" / "models").exists(), "the workers cannot find relative paths themselves"
    r = batch(args, cwd=proj)
    assert r.returncode == 0, r.stderr
    m = manifest(proj / "out")
    assert list(m) == ["flight-a10", "flight-a11", "b00"] and all(s["status"] == "done" for s in m.values())
    for sid, name in (("flight-a10", "a10"), ("flight-a11", "a11"), ("b00", "b00")):
        assert_same_bytes(proj / "out" / sid / "classes.tif", references[name])
        assert json.loads((proj / "out" / sid / "run.json").read_text())["options"]["model"] == str(
            proj / "models" / "land.safetensors")
    zones = [ln for ln in (proj / "out" / "stats.csv").read_text().splitlines() if ",inner," in ln]
    assert len(zones) == 5 and all(ln.startswith("flight-a10,") for ln in zones), "zones found by the workers"
    assert [p.name for p in (proj / "out").glob("mosaic*.vrt")] == ["mosaic.vrt"]  # one CRS
    feats = {f["id"]: f for f in json.loads((proj / "out" / "catalog.json").read_text())["features"]}
    assert feats["flight-a10"]["properties"]["datetime"] == "2023-07-14T09:30:00Z"
    assert feats["flight-a10"]["properties"]["geoseg:datetime_source"] == "stac-item"
    assert feats["b00"]["properties"]["geoseg:datetime_source"] == "file-mtime"
    assert "polygons" not in feats["b00"]["assets"] and not (proj / "out" / "polygons.parquet").exists()


# --- cloud-native reads: a COG over HTTP with range requests ---------------------------------------------------


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves a folder over HTTP/1.1 with single-range ``Range:`` requests, counting the bytes it sends."""

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root, self.sent, self.lock = root, 0, threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RangeServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.server.root / self.path.split("?")[0].lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start + 1)
            self.wfile.write(data)
            with self.server.lock:
                self.server.sent += len(data)


@pytest.fixture
def http_cogs(scenes, tmp_path):
    """COG copies of two scenes, served on 127.0.0.1."""
    d = tmp_path / "www"
    d.mkdir()
    for name in ("big", "c0"):
        with rasterio.open(scenes[name]) as src:
            rasterio.shutil.copy(src, d / f"{name}.tif", driver="COG", BLOCKSIZE=128, COMPRESS="NONE")
    server = RangeServer(d)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_http_cog_is_read_by_ranges_and_batch_takes_urls(http_cogs, scenes, cluster, tmp_path):
    import rasterio.shutil  # noqa: F401 - used by the fixture

    from geoseg.io.raster import open_raster

    size = (http_cogs.root / "big.tif").stat().st_size
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), \
            open_raster(f"/vsicurl/{http_cogs.url}/big.tif") as ds:
        window = ds.read(window=Window(500, 300, 64, 64))
        overview = ds.read(out_shape=(ds.count, ds.height // 8, ds.width // 8))
    assert http_cogs.sent < size / 4, f"{http_cogs.sent} of {size} bytes for a 64 x 64 window and an overview"
    with rasterio.open(scenes["big"]) as local:
        assert np.array_equal(window, local.read(window=Window(500, 300, 64, 64)))
    assert overview.shape[1:] == (841 // 8, 1243 // 8)
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{http_cogs.url}/c0.tif\n/vsicurl/{http_cogs.url}/big.tif\n")
    r = batch([str(listing), "-o", str(tmp_path / "out"), "--scheduler", cluster.address, "--no-polygons", *CLI])
    assert r.returncode == 0, r.stderr
    m = manifest(tmp_path / "out")
    assert m["c0"]["href"] == f"{http_cogs.url}/c0.tif" and m["big"]["href"].startswith("/vsicurl/")
    for name in ("c0", "big"):  # the same classes as a local run of the same COG
        ref = reference(http_cogs.root / f"{name}.tif", tmp_path / "ref" / name)
        assert_same_bytes(tmp_path / "out" / name / "classes.tif", ref)
    feats = json.loads((tmp_path / "out" / "catalog.json").read_text())["features"]
    assert {f["properties"]["geoseg:datetime_source"] for f in feats} == {"processing-time"}


# --- faults: every worker lost; the default local cluster -----------------------------------------------------


@pytest.mark.slow
def test_all_workers_lost_stops_with_one_line(scenes, cluster, tmp_path):
    listing = tmp_path / "scenes.txt"
    listing.write_text("\n".join(str(scenes[n]) for n in scenes if n.startswith(("a", "b"))))
    root = tmp_path / "out"
    proc = batch([str(listing), "-o", str(root), "--scheduler", cluster.address, "--timeout", "3", "--no-polygons",
                  "--retries", "0", *CLI], wait=False)
    try:
        deadline = time.monotonic() + 120
        while not any(root.glob("*/run.json")):
            assert time.monotonic() < deadline and proc.poll() is None, "no scene finished"
            time.sleep(0.02)
        for p in cluster.alive():
            p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=90)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        cluster.ensure(2)
    assert proc.returncode == 1 and 3 <= waited < 60, (waited, err)
    assert len(error_lines(err)) == 1 and err.strip().splitlines()[-1].startswith("Error:"), err
    assert "not finished: all dask workers of" in err and "none came back within 3 s; the job stopped" in err
    m = manifest(root)
    done = [s for s in m.values() if s["status"] == "done"]
    lost = [s for s in m.values() if s["status"] == "failed"]
    assert done and lost and len(done) + len(lost) == len(m)
    assert all(s["error"].startswith("not finished: all dask workers") for s in lost)
    assert all((root / s["id"] / "run.json").exists() for s in done)


@pytest.mark.slow
def test_default_local_cluster(scenes, references, tmp_path):
    r = batch([str(scenes["a20"]), str(scenes["a21"]), "-o", str(tmp_path / "out"), "--workers", "1",
               "--no-polygons", *CLI])
    assert r.returncode == 0, r.stderr
    assert "Dashboard:" in r.stdout and "2 of 2 scenes done" in r.stdout
    for name in ("a20", "a21"):
        assert_same_bytes(tmp_path / "out" / name / "classes.tif", references[name])
