import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from geoseg.engine.blend import BLEND_WINDOWS, accumulate, make_window, resolve
from geoseg.errors import ConfigError


@pytest.mark.parametrize("name", sorted(BLEND_WINDOWS))
def test_named_windows_are_positive_everywhere(name):
    w = make_window(name, 64)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert w.min() > 0, "the outermost row/column must keep a weight"
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])


@given(name=st.sampled_from(sorted(BLEND_WINDOWS)), value=st.floats(-50, 50),
       offsets=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=6))
def test_blending_constant_logits_gives_the_constant(name, value, offsets):
    t = 32
    acc = np.zeros((3, 72, 72), np.float32)
    win = make_window(name, t)
    logits = np.zeros((2, t, t), np.float32)
    logits[0] = value
    logits[1] = value - 1.0
    for r, c in offsets:
        accumulate(acc, logits, win, r, c)
    covered = acc[2] > 0
    blended = acc[0][covered] / acc[2][covered]
    assert np.allclose(blended, value, rtol=1e-5, atol=1e-4)
    classes, conf = resolve(acc, covered, confidence=True)
    assert (classes[covered] == 0).all() and (classes[~covered] == 255).all()
    assert np.allclose(conf[covered], 1 / (1 + np.exp(-1.0)), atol=1e-5)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="gaussian, hann, mean, triangular"):
        make_window("cosine", 32)


def test_callable_windows_and_their_checks():
    w = make_window(lambda n: np.linspace(1, 2, n), 16)
    assert w.shape == (16, 16)
    with pytest.raises(ConfigError, match="weights <= 0"):
        make_window(lambda n: np.linspace(0, 1, n), 16)  # a ramp to 0 leaves unweighted pixels
    with pytest.raises(ConfigError, match="shape"):
        make_window(lambda n: np.ones(n + 1), 16)


def test_argmax_classes_equals_numpy_argmax_ties_included():
    from geoseg.engine.blend import argmax_classes

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (6, 37, 41)).astype(np.float32)  # many ties
    got = argmax_classes(scores)
    assert got.dtype == np.uint8
    assert np.array_equal(got, np.argmax(scores, axis=0))


def test_accumulation_is_the_same_to_the_bit_with_torch_loaded_or_not(monkeypatch):
    """A run resumed in a process without torch must continue exactly what one with torch began."""
    import sys

    import torch  # noqa: F401 - loaded: accumulate takes the torch path

    rng = np.random.default_rng(3)
    window = make_window("hann", 64, 8)
    tiles = [(rng.normal(0, 7, (5, 64, 64)).astype(np.float32), r, c) for r, c in ((0, 0), (0, 40), (40, 0), (40, 40))]
    with_torch = np.zeros((6, 104, 104), np.float32)
    for lg, r, c in tiles:
        accumulate(with_torch, lg, window, r, c)
    monkeypatch.setitem(sys.modules, "torch", None)  # as in a process that never imported it
    without = np.zeros_like(with_torch)
    for lg, r, c in tiles:
        accumulate(without, lg, window, r, c)
    assert with_torch.tobytes() == without.tobytes()
