"""Importing modules a run will need in a background thread, while it does other work.

``import pyogrio`` (the polygons' writer) also imports pandas, pyarrow,
pyproj and geopandas: about half a second that a predict run would spend
after inference. Started before inference, the import overlaps it instead.
"""

from __future__ import annotations

import importlib
import sys
import threading

_threads: list[threading.Thread] = []
_lock = threading.Lock()


def preload(*modules: str) -> None:
    """Start importing ``modules`` (those not imported yet) in a daemon thread."""
    todo = [m for m in modules if m not in sys.modules]
    if not todo:
        return
    t = threading.Thread(target=_import, args=(todo,), name="geoseg-preload", daemon=True)
    with _lock:
        _threads.append(t)
    t.start()


def wait_preloaded() -> None:
    """Wait for every :func:`preload`: a process forked meanwhile would inherit a held import lock."""
    with _lock:
        threads, _threads[:] = list(_threads), []
    for t in threads:
        t.join()


def _import(modules: list[str]) -> None:
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception:  # noqa: BLE001 - an import that fails here fails again, with its message, where it is used
            pass
