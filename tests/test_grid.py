import math

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import ConfigError
from geoseg.geometry.grid import Grid, Layout, reflect_index, tile_origins

T0 = Affine(2.0, 0.0, 1000.0, 0.0, -2.0, 5000.0)


def test_grid_slicing_moves_the_transform():
    g = Grid((100, 200), T0, "EPSG:32633")
    sub = g[10:30, 50:80]
    assert sub.shape == (20, 30)
    assert sub.transform == T0 @ Affine.translation(50, 10)
    assert sub.transform.c == 1100.0 and sub.transform.f == 4980.0
    assert sub.crs == g.crs
    assert hash(sub) == hash(g[10:30, 50:80])


def test_tile_origins_reach_the_far_edge():
    o = tile_origins(1000, 256, 192)
    assert o[0] == 0 and o[-1] + 256 >= 1000 and o[-2] + 256 < 1000
    assert len(o) == math.ceil((1000 - 256) / 192) + 1
    assert list(tile_origins(100, 256, 192)) == [0]


@given(n=st.integers(1, 60), lo=st.integers(-200, 200), span=st.integers(1, 300))
def test_reflect_index_matches_numpy_pad(n, lo, span):
    hi = lo + span
    before, after = max(0, -lo), max(0, hi - n)  # reflect on either side, as often as needed
    v = np.arange(n)
    ref = np.zeros(before + n + after, int) if n == 1 else np.pad(v, (before, after), mode="reflect")
    assert np.array_equal(reflect_index(np.arange(lo, hi), n), ref[lo + before : hi + before])


@st.composite
def valid_layouts(draw):
    """(tile, overlap, pad_multiple, the stride it must get): valid by construction.

    The stride is a multiple of ``p`` of at least half the tile; ``overlap``
    is drawn so that rounding the stride down to a multiple of ``p`` lands on it.
    """
    p = draw(st.sampled_from([1, 8, 32]))
    tile = draw(st.integers(2, 12)) * 32
    stride = p * draw(st.integers(-(-tile // (2 * p)), tile // p))
    slack = draw(st.integers(0, min(p - 1, tile - stride)))
    return tile, tile - stride - slack, p, stride


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 1500), w=st.integers(1, 1500), params=valid_layouts(),
    target=st.sampled_from([256, 700, 2048]),
)
def test_blocks_partition_the_grid_and_tiles_cover_it(h, w, params, target):
    tile, overlap, p, stride = params
    layout = Layout.create(Grid((h, w), T0), tile=tile, overlap=overlap,
                           pad_multiple=p, block_target=target)
    assert layout.stride == stride and layout.tile == tile and layout.overlap == tile - stride
    assert layout.stride % p == 0 and layout.block % 16 == 0
    blocks = np.zeros((h, w), np.int32)
    tiles = np.zeros((h, w), np.int32)
    seen = []
    for i, j in layout.iter_blocks():
        r, c = layout.block_slices(i, j)
        blocks[r, c] += 1
        er, ec = layout.block_extent(i, j)
        for r0, c0 in layout.block_tiles(i, j):
            assert r0 % p == 0 and c0 % p == 0
            assert er.start <= r0 and r0 + tile <= er.stop and ec.start <= c0 and c0 + tile <= ec.stop
            tiles[r0 : r0 + tile, c0 : c0 + tile] += 1
            seen.append((r0, c0))
        # the overhang past this block never reaches beyond the next block
        assert er.stop - r.stop <= layout.overlap or i == layout.blocks[0] - 1
    assert (blocks == 1).all(), "every pixel belongs to exactly one block"
    assert (tiles >= 1).all(), "every pixel is covered by a tile, last row/column included"
    assert len(seen) == len(set(seen)) == layout.tiles[0] * layout.tiles[1]
    assert sum(layout.chunks()[0]) == h and sum(layout.chunks()[1]) == w


def test_layout_rejects_bad_sizes_with_a_fix():
    g = Grid((100, 100), T0)
    with pytest.raises(ConfigError, match="--tile-size"):
        Layout.create(g, tile=100, overlap=10, pad_multiple=32)
    with pytest.raises(ConfigError, match="--overlap"):
        Layout.create(g, tile=128, overlap=65, pad_multiple=32)


def test_stride_rounds_to_the_pad_multiple():
    layout = Layout.create(Grid((4000, 4000), T0), tile=512, overlap=50, pad_multiple=32)
    assert layout.stride == 448 and layout.overlap == 64
