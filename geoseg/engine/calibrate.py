"""CPU defaults that fit the machine: streams, threads per stream and block size.

How many forward passes should run side by side, each on how many threads,
depends on the model and the machine: a small network does not scale over
16 threads, so 8 streams of 2 threads beat 1 stream of 16; ONNX Runtime's
own thread pool does best as one stream on every core. Rather than guess,
:func:`calibrate` times the model on a batch of real-shaped input for each
candidate (``streams`` a power of two up to the core count, ``cores //
streams`` threads each) for a fraction of a second, and keeps the fastest.
It runs once per model, tile and machine: the choice is cached in
``~/.cache/geoseg/calibration.json`` (``GEOSEG_CACHE`` overrides the folder).

:func:`block_target` makes blocks small enough that a small scene still has
a wavefront wide enough to keep every stream busy.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..models.backends import available_cores, torch_threads_kept

#: Scenes with fewer tiles than this keep the heuristic default (2 streams):
#: calibrating would cost more than it saves.
MIN_TILES = 64


def candidates(cores: int) -> list[int]:
    """Stream counts to try: 1, 2, 4, … up to ``cores``."""
    out, n = [], 1
    while n <= cores:
        out.append(n)
        n *= 2
    return out


def _cache_file() -> Path:
    root = os.environ.get("GEOSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geoseg")
    return Path(root) / "calibration.json"


def _key(backend: Any, tile: int, batch: int, cores: int) -> str:
    spec = getattr(backend, "spec", None)
    name = getattr(spec, "model", None) or backend.card.name
    path = Path(name)
    if path.exists():  # the same file however it was named, and a new file at the same path is new
        st = path.stat()
        name = f"{path.resolve()}@{st.st_size}:{st.st_mtime_ns}"
    return f"{type(backend).__name__}:{name}:{tile}:{batch}:{cores}"


def calibrate(backend: Any, tile: int, batch: int, *, seconds: float = 1.0) -> dict[str, Any]:
    """Time each stream count on ``backend`` (CPU) and leave it set to the fastest.

    Returns ``{"streams": n, "threads": t, "tiles_per_s": {n: rate, …}, "cached": bool}``.
    """
    cores = available_cores()
    key = _key(backend, tile, batch, cores)
    cache = _read_cache()
    if key in cache:
        backend.set_streams(int(cache[key]["streams"]))
        return {**cache[key], "cached": True}
    x = np.random.default_rng(0).standard_normal((batch, backend.card.in_channels, tile, tile)).astype(np.float32)
    rates: dict[int, float] = {}
    with torch_threads_kept():
        for n in candidates(cores):
            backend.set_streams(n)
            rates[n] = _rate(backend, x, n, seconds)
    best = max(rates, key=lambda n: rates[n])
    backend.set_streams(best)
    result = {"streams": best, "threads": backend.threads, "tiles_per_s": {str(k): v for k, v in rates.items()}}
    cache[key] = result
    _write_cache(cache)
    return {**result, "cached": False}


def _rate(backend: Any, x: np.ndarray, streams: int, seconds: float) -> float:
    """Tiles per second with ``streams`` threads each calling the backend for ``seconds``."""
    backend(x)  # warm up (and make the session for this thread count)
    done = [0] * streams
    stop = time.perf_counter() + seconds

    def work(k: int) -> None:  # at least three batches each, so a slow model is measured too
        while time.perf_counter() < stop or done[k] < 3 * len(x):
            backend(x)
            done[k] += len(x)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, Any]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home: calibrate again next time
        pass


def block_target(shape: tuple[int, int], workers: int, *, largest: int = 1024, smallest: int = 512) -> int:
    """Block side (px) for a scene: at most ``largest``, small enough for ``2 * workers`` blocks when it can.

    A wavefront of blocks starts with one block and widens by one each
    step, so a scene of 2 × 2 blocks leaves cores idle; four times as many
    blocks as workers keeps them busy at the cost of a little more halo.
    """
    side = math.sqrt(shape[0] * shape[1] / max(1, 4 * workers))
    return int(max(smallest, min(largest, side)))
