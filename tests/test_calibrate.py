"""CPU defaults: calibrated streams, cached; blocks sized for the wavefront."""

from __future__ import annotations

import json

from geoseg.engine.calibrate import block_target, calibrate, candidates
from geoseg.models.backends import available_cores


def test_candidates_are_powers_of_two_up_to_the_cores():
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(16) == [1, 2, 4, 8, 16]
    assert candidates(12) == [1, 2, 4, 8]


def test_calibrate_keeps_the_fastest_and_caches_it(tmp_path, monkeypatch, cnn_model):
    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path))
    backend = cnn_model.backend
    first = calibrate(backend, 64, 4, seconds=0.2)
    rates = {int(k): v for k, v in first["tiles_per_s"].items()}
    assert sorted(rates) == candidates(available_cores()) and not first["cached"]
    assert first["streams"] == max(rates, key=rates.get) == backend.streams
    assert backend.threads == max(1, available_cores() // backend.streams)
    stored = json.loads((tmp_path / "calibration.json").read_text())
    assert [v["streams"] for v in stored.values()] == [first["streams"]]
    backend.set_streams(1)
    again = calibrate(backend, 64, 4, seconds=0.2)
    assert again["cached"] and backend.streams == first["streams"]


def test_block_target_leaves_no_core_idle_on_small_scenes():
    assert block_target((32768, 32768), 3) == 1024  # large scenes: the largest blocks
    assert block_target((2048, 2048), 3) == 591  # about 4 blocks per worker
    assert block_target((300, 300), 3) == 512  # never below the smallest
