"""Block-wise sieving equals GDAL's sieve of the whole raster, whatever the threshold and block size."""

import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from rasterio.features import sieve as gdal_sieve

from geoseg.post.landcover import _BlockSieve, sieve

from .conftest import smooth_image, write_raster

METRE = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 5400000.0)  # 1 m² pixels: min_area in m² = pixels


def whole_raster_sieve(m: np.ndarray, size: int, nodata: int = 255) -> np.ndarray:
    """The reference: GDAL's sieve over the whole array at once."""
    if size >= m.size:  # GDAL refuses; no region can reach the threshold, so nothing changes
        return m.copy()
    return gdal_sieve(m, size=size, mask=m != nodata, connectivity=4)


def sieve_file(tmp_path, m: np.ndarray, min_area: float, **kw) -> tuple[int, np.ndarray]:
    path = write_raster(tmp_path / "classes.tif", m[None], transform=METRE, nodata=255)
    size = sieve(path, min_area, **kw)
    with rasterio.open(path) as ds:
        return size, ds.read(1)


@pytest.mark.parametrize("block", [None, 512])
def test_a_long_region_over_the_threshold_is_kept(tmp_path, block):
    # a 10 x 8000 px region (80,000 px) against a 50,000 px threshold: it spans more than any block
    # and any halo of a bounded size, but it is not small, so it stays
    m = np.zeros((64, 8200), np.uint8)
    m[20:30, 100:8100] = 1  # the long region
    m[2:12, 200:1500] = 2  # 13,000 px: removed
    m[54:64, 3000:3050] = 3  # 500 px on the raster's edge: removed
    m[:, 8150:] = 255  # nodata stays nodata
    m[40, 8000] = 255
    size, got = sieve_file(tmp_path, m, 50_000.0, **({} if block is None else {"block": block}))
    assert size == 50_000
    assert (got[20:30, 100:8100] == 1).all(), "a region over the threshold was sieved"
    assert not (got == 2).any() and not (got == 3).any()
    np.testing.assert_array_equal(got, whole_raster_sieve(m, size))


def noisy_classes(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Five smooth classes with speckle and a nodata hole: regions of every size, many ties."""
    rng = np.random.default_rng(seed)
    m = (smooth_image((1, *shape), seed=seed)[0] // 52).astype(np.uint8)
    speckle = rng.random(shape) < 0.05
    m[speckle] = rng.integers(0, 5, speckle.sum())
    m[40:70, 100:180] = 255
    m[rng.random(shape) < 0.01] = 255
    return m


@pytest.mark.parametrize("block,min_area", [(64, 12.0), (128, 40.0), (64, 400.0)])
def test_blockwise_sieve_equals_whole_raster_sieve(tmp_path, block, min_area):
    m = noisy_classes((300, 420), seed=int(min_area))
    size, got = sieve_file(tmp_path, m, min_area, block=block)
    assert size == int(min_area)
    want = whole_raster_sieve(m, size)
    assert not np.array_equal(want, m), "the threshold should change something"
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got == 255, m == 255)


def test_one_block_and_a_threshold_over_the_raster(tmp_path):
    m = noisy_classes((100, 120), seed=3)
    _, got = sieve_file(tmp_path, m, 30.0)  # one block: GDAL's own sieve
    np.testing.assert_array_equal(got, whole_raster_sieve(m, 30))
    _, got = sieve_file(tmp_path, m, 1e6)  # no region can reach the threshold: nothing changes
    np.testing.assert_array_equal(got, m)


@st.composite
def class_rasters(draw):
    """Small class rasters: coarse random classes scaled up (regions of many sizes), some nodata."""
    coarse = draw(hnp.arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)),
                             elements=st.integers(0, 3)))
    f = draw(st.integers(1, 4))
    m = np.repeat(np.repeat(coarse, f, axis=0), f, axis=1)
    holes = draw(hnp.arrays(np.bool_, m.shape, elements=st.booleans(), fill=st.just(False)))
    m[holes] = 255
    return m


@settings(max_examples=150, deadline=None)
@given(m=class_rasters(), block=st.integers(1, 20), size=st.integers(2, 60))
def test_blocks_equal_the_whole_raster_for_any_block_and_threshold(m, block, size):
    blocks = _BlockSieve(lambda rows, cols: m[rows, cols], m.shape, block, size, 255)
    got = np.empty_like(m)
    for i, (rows, cols) in enumerate(blocks.windows):
        got[rows, cols] = blocks.sieved(i)
    np.testing.assert_array_equal(got, whole_raster_sieve(m, size))
