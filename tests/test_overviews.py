"""COG overviews built while blocks stream: exact 2 x 2 reductions, a valid COG, GDAL's levels."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from geoseg.geometry.grid import Grid
from geoseg.io.overviews import levels_for, mean2x2, mode2x2, streamable
from geoseg.io.raster import BlockWriter

from .test_real_data import validate_cog

ND = 255


def _brute_mode(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    out = np.empty((-(-h // 2), -(-w // 2)), x.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            cell = [int(v) for v in x[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel() if v != ND]
            if not cell:
                out[i, j] = ND
                continue
            counts = Counter(cell)
            top = max(counts.values())
            out[i, j] = next(v for v in cell if counts[v] == top)  # the first in row-major order
    return out


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.sampled_from([0, 1, 2, ND])))
def test_mode2x2_is_the_most_frequent_valid_value(x):
    np.testing.assert_array_equal(mode2x2(x, ND), _brute_mode(x))


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 7), st.integers(1, 7)),
              elements=st.sampled_from([-1.0, 0.25, 0.5, 0.75, 1.0])))
def test_mean2x2_averages_the_valid_pixels(x):
    got = mean2x2(x, -1.0)
    for i in range(got.shape[0]):
        for j in range(got.shape[1]):
            cell = [v for v in x[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel() if v != -1.0]
            assert got[i, j] == pytest.approx(np.mean(cell) if cell else -1.0, abs=1e-6)


def test_levels_follow_gdal_auto_rule():
    assert levels_for((512, 512)) == 0
    assert levels_for((513, 100)) == 1
    assert levels_for((16384, 16384)) == 5
    assert levels_for((3000, 2100)) == 3
    assert streamable(1024, 3) == 3
    assert streamable(1020, 3) == 2  # 1020 = 4 x 255: level 3 is reduced from level 2 at the end
    assert streamable(2240, 7) == 6  # the device engine's 2240-px blocks (64 x 35)
    assert streamable(999, 3) == 0


def _class_map(shape, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 5, (shape[0] // 24 + 1, shape[1] // 24 + 1)).astype(np.uint8)
    x = np.kron(small, np.ones((24, 24), np.uint8))[: shape[0], : shape[1]]
    x[rng.random(shape) < 0.1] = rng.integers(0, 5)  # speckle, so that 2 x 2 cells disagree
    x[:300, :200] = ND
    return x


def _write(path, x, block, resampling="mode", nodata=ND, threads=4):
    grid = Grid(x.shape, Affine(0.5, 0, 500000, 0, -0.5, 4100000), crs="EPSG:32633")
    w = BlockWriter(path, grid, dtype=x.dtype.name, nodata=nodata, block=block,
                    colormap={0: (255, 0, 0, 255), 1: (0, 255, 0, 255)} if resampling == "mode" else None,
                    tags={"GEOSEG_CLASSES": '["a"]'}, description="class", resampling=resampling)
    windows = [(slice(r, min(r + block, x.shape[0])), slice(c, min(c + block, x.shape[1])))
               for r in range(0, x.shape[0], block) for c in range(0, x.shape[1], block)]
    random.Random(1).shuffle(windows)  # any order, any thread
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda rc: w.write(rc[0], rc[1], x[rc[0], rc[1]]), windows))
    w.finish()
    return path


def test_streamed_mode_overviews_make_a_valid_cog(tmp_path):
    x = _class_map((3000, 2100))
    path = _write(tmp_path / "classes.tif", x, 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif"]  # no working files left
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [2, 4, 8]
        assert ds.crs == "EPSG:32633" and ds.transform.a == 0.5 and ds.nodata == ND
        assert ds.colormap(1)[1] == (0, 255, 0, 255) and ds.tags()["GEOSEG_CLASSES"] == '["a"]'
        assert ds.descriptions == ("class",)
        np.testing.assert_array_equal(ds.read(1), x)
    expect = x
    for level in range(3):
        expect = mode2x2(expect, ND)
        with rasterio.open(path, overview_level=level) as ovr:
            np.testing.assert_array_equal(ovr.read(1), expect)
    validate_cog(path)


@pytest.mark.parametrize("block", [1020, 999])
def test_levels_blocks_cannot_reach_are_completed_with_the_same_reduction(tmp_path, block):
    x = _class_map((2600, 2100), seed=2)
    path = _write(tmp_path / "classes.tif", x, block)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif"]
    expect = x
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [2, 4, 8]
    for level in range(3):
        expect = mode2x2(expect, ND)
        with rasterio.open(path, overview_level=level) as ovr:
            np.testing.assert_array_equal(ovr.read(1), expect)


def test_streamed_overviews_agree_with_gdals_mode(tmp_path):
    x = _class_map((2600, 2048), seed=3)
    ours = _write(tmp_path / "ours.tif", x, 1024)
    plain = tmp_path / "plain.tif"
    with rasterio.open(ours) as ds:
        profile = {**ds.profile, "driver": "GTiff"}
    with rasterio.open(plain, "w", **profile) as ds:
        ds.write(x, 1)
    gdal = tmp_path / "gdal.tif"
    rasterio.shutil.copy(plain, gdal, driver="COG", OVERVIEWS="AUTO", RESAMPLING="MODE", OVERVIEW_RESAMPLING="MODE")
    with rasterio.open(ours) as a, rasterio.open(gdal) as b:
        assert a.overviews(1) == b.overviews(1) == [2, 4, 8]
    for level in range(3):
        with rasterio.open(ours, overview_level=level) as a, rasterio.open(gdal, overview_level=level) as b:
            p, q = a.read(1), b.read(1)
        # ties (2 + 2 pixels) may go either way, and GDAL reduces each level from the full raster
        assert (p == q).mean() > 0.9 - 0.05 * level
        assert ((p == ND) == (q == ND)).mean() > 0.99


def test_abort_drops_late_blocks_and_leaves_no_files(tmp_path):
    x = _class_map((1500, 1300))
    grid = Grid(x.shape, Affine(0.5, 0, 500000, 0, -0.5, 4100000), crs="EPSG:32633")
    w = BlockWriter(tmp_path / "classes.tif", grid, dtype="uint8", nodata=ND, block=512)
    w.write(slice(0, 512), slice(0, 512), x[:512, :512])
    w.abort()
    assert w.write(slice(512, 1024), slice(0, 512), x[512:1024, :512]) == 0.0  # a block still in flight
    assert list(tmp_path.iterdir()) == []


def test_streamed_average_overviews_for_confidence(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((1500, 1100)).astype(np.float32)
    x[:100] = -1.0
    path = _write(tmp_path / "confidence.tif", x, 500, resampling="average", nodata=-1.0)  # 2 levels streamed
    expect = x
    for level in range(2):
        expect = mean2x2(expect, -1.0)
        with rasterio.open(path, overview_level=level) as ovr:
            np.testing.assert_allclose(ovr.read(1), expect, rtol=1e-6)
