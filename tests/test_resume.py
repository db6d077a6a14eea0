"""A `geoseg predict` killed with SIGKILL resumes to the same outputs and leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyogrio
import pytest

from .conftest import smooth_image, write_raster

GEOSEG = [sys.executable, "-m", "geoseg"]


def _predict(scene: Path, out: Path, model: Path, *extra: str) -> subprocess.Popen:
    cmd = [*GEOSEG, "predict", str(scene), "-o", str(out), "--model", str(model), "--device", "cpu",
           "--tile-size", "64", "--workers", "2", "--streams", "2", "--confidence", "-q", *extra]
    tmp = scene.parent / "tmp"  # spill files of the polygon step land here
    tmp.mkdir(exist_ok=True)
    # a session of its own: its process group is everything the run started
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill point: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_and_check_no_survivors(proc: subprocess.Popen) -> None:
    pgid = os.getpgid(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: whatever it started must follow it
    proc.wait()
    t0 = time.time()
    while _group_alive(pgid) and time.time() - t0 < 10:
        time.sleep(0.05)
    alive = _group_alive(pgid)
    left = []
    if alive:
        left = [(p.pid, p.status(), p.cmdline()[:4]) for p in psutil.process_iter() if _pgid(p.pid) == pgid]
        os.killpg(pgid, signal.SIGKILL)
    assert not alive, f"processes of the killed run survived it: {left}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _outputs(out: Path) -> dict:
    polys = pyogrio.read_dataframe(out / "polygons.gpkg", layer="landcover")
    polys = polys.sort_values(["class_id", "area_m2"]).reset_index(drop=True)
    return {"classes": (out / "classes.tif").read_bytes(), "confidence": (out / "confidence.tif").read_bytes(),
            "stats": (out / "stats.csv").read_text(), "polygons": len(polys),
            "areas": np.round(polys["area_m2"].to_numpy(), 6).tolist(),
            "wkb": sorted(polys.geometry.to_wkb())}


@pytest.mark.slow
def test_sigkill_during_inference_and_polygons_then_resume(tmp_path, yolo_checkpoint):
    scene = write_raster(tmp_path / "scene.tif", smooth_image((3, 1400, 1500), seed=21))
    env_ok = _predict(scene, tmp_path / "ref", yolo_checkpoint)
    assert env_ok.wait() == 0, env_ok.stderr.read()
    ref = _outputs(tmp_path / "ref")

    # 1. killed during inference, after some blocks were saved
    out = tmp_path / "a"
    blocks = tmp_path / ".a.geoseg-partial" / "blocks"
    proc = _predict(scene, out, yolo_checkpoint)
    _wait_for(lambda: blocks.is_dir() and len(list(blocks.glob("*.classes.npy"))) >= 2, proc)
    _kill_and_check_no_survivors(proc)
    assert not out.exists()
    again = subprocess.run([*GEOSEG, "predict", str(scene), "-o", str(out), "--model", str(yolo_checkpoint),
                            "--device", "cpu", "--tile-size", "64", "-q"], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    resumed = _predict(scene, out, yolo_checkpoint, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    got = _outputs(out)
    assert [k for k in ref if got[k] != ref[k]] == []

    # 2. killed during polygons (inference finished and recorded)
    out = tmp_path / "b"
    state = tmp_path / ".b.geoseg-partial" / "state.json"

    def inference_done() -> bool:
        try:
            return "inference" in json.loads(state.read_text()).get("steps", [])
        except (OSError, ValueError):
            return False

    def polygonizing() -> bool:  # inference recorded and the polygon worker processes running
        return inference_done() and len(psutil.Process(proc.pid).children()) >= 2

    proc = _predict(scene, out, yolo_checkpoint)
    _wait_for(polygonizing, proc)
    killed = proc.pid
    _kill_and_check_no_survivors(proc)
    assert not out.exists()
    assert list((tmp_path / "tmp").glob(f"geoseg-pieces-{killed}-*"))  # left behind by the kill
    resumed = _predict(scene, out, yolo_checkpoint, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert _outputs(out) == ref
    # the killed run's spill file of polygon pieces was reclaimed by the next run
    assert not list((tmp_path / "tmp").glob(f"geoseg-pieces-{killed}-*"))
    assert not (tmp_path / ".b.geoseg-partial").exists()


def test_a_block_counts_as_done_only_once_all_its_files_are_saved(tmp_path, monkeypatch):
    """A kill between a block's confidence and classes files leaves it to be computed again."""
    from geoseg.io.staging import Journal

    journal = Journal(tmp_path)
    journal.start({"input": "x"})
    classes = np.ones((4, 4), np.uint8)
    confidence = np.full((4, 4), 0.5, np.float32)
    journal.save((0, 0), classes, confidence)

    real_replace = os.replace
    written: list[str] = []

    def killed_after_first_file(src, dst):  # type: ignore[no-untyped-def]
        if written:
            raise KeyboardInterrupt("killed")
        written.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        journal.save((0, 1), classes, confidence)
    monkeypatch.setattr(os, "replace", real_replace)

    assert journal.done() == frozenset({(0, 0)})
    for ij in journal.done():  # every block that counts as done loads in full
        assert (journal.load(ij) == classes).all()
        assert (journal.load(ij, "confidence") == confidence).all()


def test_a_run_killed_while_its_files_move_is_completed_by_the_next(tmp_path, monkeypatch, yolo_checkpoint):
    """Publishing is two-phase: the record (run.json) goes first and comes back last, and the
    next run into the folder completes a publish that was cut short, so no folder mixes two runs."""
    import geoseg
    from geoseg.io.staging import Staging

    scene = write_raster(tmp_path / "scene.tif", smooth_image((3, 160, 200)))
    out = tmp_path / "out"
    opts = dict(model=yolo_checkpoint, device="cpu", tile_size=64, overlap=16, polygons=False, overwrite=True)
    geoseg.predict(scene, out, confidence=True, **opts)
    assert (out / "confidence.tif").exists() and (out / "run.json").exists()
    first = json.loads((out / "run.json").read_text())

    real_replace = os.replace
    moved: list[str] = []

    def killed_after_two_files(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst).parent == out:
            if len(moved) == 2:
                raise KeyboardInterrupt("killed")
            moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_two_files)
    with pytest.raises(KeyboardInterrupt):
        geoseg.predict(scene, out, confidence=False, **opts)
    monkeypatch.setattr(os, "replace", real_replace)

    assert "run.json" not in moved
    assert not (out / "run.json").exists()  # the folder does not claim a complete run
    assert not (out / "confidence.tif").exists()  # the first run's output that the second does not write
    staging = Staging(out)
    assert (staging.dir / Staging.PUBLISHING).exists()
    assert staging.finish_publishing()
    assert not staging.exists() and not staging.finish_publishing()
    second = json.loads((out / "run.json").read_text())
    assert second["options"]["confidence"] is False and first["options"]["confidence"] is True
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["classes.tif", "classes.tif.aux.xml", "classes.qml", "stats.csv", "stats.json", "run.json"])

    # and through predict: a cut-short publish is completed before the next run starts
    monkeypatch.setattr(os, "replace", killed_after_two_files)
    moved.clear()
    with pytest.raises(KeyboardInterrupt):
        geoseg.predict(scene, out, confidence=True, **opts)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "run.json").exists()
    geoseg.predict(scene, out, confidence=True, **opts)
    assert not staging.exists()
    assert json.loads((out / "run.json").read_text())["options"]["confidence"] is True
    assert (out / "confidence.tif").exists()


def test_a_block_file_cut_short_counts_as_not_done(tmp_path):
    """Block files are renamed into place without a sync: after a power loss one may be truncated."""
    from geoseg.io.staging import Journal

    journal = Journal(tmp_path)
    journal.start({"input": "x"})
    classes = np.ones((64, 64), np.uint8)
    for ij in ((0, 0), (0, 1), (1, 0)):
        journal.save(ij, classes, np.full((64, 64), 0.5, np.float32))
    cut = journal.dir / "0-1.classes.npy"
    cut.write_bytes(cut.read_bytes()[:-100])
    conf = journal.dir / "1-0.confidence.npy"
    conf.write_bytes(conf.read_bytes()[:50])  # the header itself cut
    assert journal.done() == frozenset({(0, 0)})
    assert not cut.exists() and not conf.exists()  # dropped, to be computed again
    assert (journal.load((0, 0)) == classes).all()


def test_resume_after_a_kill_while_files_move_finishes_that_run(tmp_path, monkeypatch, yolo_checkpoint):
    import geopandas as gpd
    import rasterio
    import shapely

    import geoseg
    from geoseg.io.staging import Staging

    scene = write_raster(tmp_path / "scene.tif", smooth_image((3, 160, 200)))
    with rasterio.open(scene) as ds:
        b, crs = ds.bounds, ds.crs
    zones = tmp_path / "zones.gpkg"
    west = shapely.box(b.left, b.bottom, (b.left + b.right) / 2, b.top)
    gpd.GeoDataFrame({"name": ["west"]}, geometry=[west], crs=crs).to_file(zones)
    out = tmp_path / "out"
    opts = dict(model=yolo_checkpoint, device="cpu", tile_size=64, overlap=16, polygons=False, zones=zones,
                zone_field="name")
    real_replace = os.replace
    moved: list[str] = []

    def killed_after_one_file(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst).parent == out:
            if moved:
                raise KeyboardInterrupt("killed")
            moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        geoseg.predict(scene, out, **opts)
    monkeypatch.setattr(os, "replace", real_replace)
    staged = json.loads((Staging(out).dir / "run.json").read_text())

    res = geoseg.predict(scene, out, resume=True, **opts)  # nothing is run again: the run was complete
    assert json.loads((out / "run.json").read_text()) == staged
    assert res.tiles_run == staged["counts"]["tiles_run"] and res.pixels == 160 * 200
    assert res.timings == staged["timings"] and int(res.areas.pixels.sum()) == 160 * 200
    written = json.loads((out / "stats.json").read_text())["zones"]
    assert written and json.loads(json.dumps(res.areas.zone_rows())) == written  # the zone table, as written
    assert sorted(res.files) == sorted(["classes.tif", "classes.tif.aux.xml", "classes.qml", "stats.csv",
                                        "stats.json", "run.json"])
    assert not Staging(out).exists()


def test_a_publish_killed_after_its_last_move_keeps_the_record(tmp_path):
    """Killed after run.json moved in but before the staging folder was removed: the run is complete."""
    from geoseg.io.staging import Staging

    out = tmp_path / "out"
    staging = Staging(out)
    staging.fresh()
    for name in ("classes.tif", "run.json"):
        (staging.dir / name).write_text(name)
    (staging.dir / "blocks").mkdir()
    real_rmtree = shutil.rmtree

    def killed(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed")

    shutil.rmtree = killed  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            staging.publish(["classes.tif", "run.json"])
    finally:
        shutil.rmtree = real_rmtree  # type: ignore[assignment]
    assert (out / "run.json").read_text() == "run.json" and staging.exists()
    (staging.dir / Staging.PUBLISHING).write_text(json.dumps({"move": ["classes.tif", "run.json"], "remove": [],
                                                              "record": "run.json"}))  # as if killed before its removal
    assert staging.finish_publishing()
    assert (out / "run.json").read_text() == "run.json" and (out / "classes.tif").exists()
    assert not staging.exists()
