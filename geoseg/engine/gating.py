"""Reads that wait for the wavefront: bounded memory for lazy inputs.

dask's local schedulers start any task that is ready when a worker is idle,
and the reads of an input array are always ready. In a block wavefront only
a few blocks are ready at a time, so idle workers would read the whole
scene ahead of the blocks that need it. Here the input's graph is copied
under new keys, and each of its first computing tasks (the reads, for a
file) is made to wait for the block that comes ``lookahead`` places before
the first block that needs it, in an order that sweeps the input chunk by
chunk. Reads then follow the blocks, and memory follows the chunks in
flight, not the scene.

The rewrite uses dask's task objects (``dask._task_spec``, dask ≥ 2025.1).
Where they are missing, the graph is left as it is: the result is the same,
only the memory bound is lost.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def sweep_order(blocks: Iterable[tuple[int, int]], origin: Any, row_bounds: np.ndarray,
                col_bounds: np.ndarray) -> list[tuple[int, int]]:
    """Blocks ordered by the input chunk that holds their origin, then row-major.

    ``origin(i, j)`` is a block's first (row, col) pixel; ``*_bounds`` are
    the input chunks' cumulative edges. Each block's upper and left
    neighbours come earlier, so this is an order the wavefront can follow.
    """
    def key(b: tuple[int, int]) -> tuple[int, int, int, int]:
        r, c = origin(*b)
        rk = int(np.searchsorted(row_bounds, r, side="right")) - 1
        ck = int(np.searchsorted(col_bounds, c, side="right")) - 1
        return rk, ck, b[0], b[1]

    return sorted(blocks, key=key)


def lookahead() -> int:
    """How many blocks ahead of its first use an input chunk may be read: twice the threads that run them.

    Those of the current dask.distributed client where there is one (its
    workers run the graph), else this machine's cores.
    """
    threads = os.cpu_count() or 1
    if "distributed" in sys.modules:  # only where the user has a client: importing it is slow
        try:
            from distributed import default_client

            threads = max(1, sum(default_client().nthreads().values()))
        except (ValueError, ImportError):  # no client
            pass
    return 2 * threads


def gate_reads(graph: Any, uses: dict[tuple[Any, str], int], order: Sequence[Any], ahead: int,
               prefix: str) -> tuple[dict[Any, Any], dict[tuple[Any, str], Any]]:
    """Copy the part of ``graph`` that computes the keys in ``uses``, with its reads gated.

    ``uses`` maps (input key, copy) to the place, in ``order`` (keys of the
    blocks' outputs), of the first block that takes that copy of the key.
    Each named copy ("main", "halo", ...) is a separate copy of the graph,
    read on its own: a block that needs only a strip of a chunk far ahead of
    the chunk's own blocks takes a copy of its own, read for it and freed
    after it, rather than holding the chunk until the sweep reaches it.
    Returns the new tasks and the new key of each entry of ``uses``; the
    input keys themselves where dask's task objects are not available.
    """
    try:
        from dask._task_spec import convert_legacy_graph
    except ImportError:  # pragma: no cover - older dask: ungated, same result
        return {}, {ku: ku[0] for ku in uses}
    dsk = convert_legacy_graph(dict(graph))
    tasks: dict[Any, Any] = {}
    keys: dict[tuple[Any, str], Any] = {}
    for copy in sorted({c for _, c in uses}):
        mine = {k: pos for (k, c), pos in uses.items() if c == copy}
        new = _gated_copy(dsk, mine, order, ahead, f"{prefix}-{copy}", tasks)
        keys.update({(k, copy): new[k] for k in mine})
    return tasks, keys


def _gated_copy(dsk: dict[Any, Any], uses: dict[Any, int], order: Sequence[Any], ahead: int,
                prefix: str, out: dict[Any, Any]) -> dict[Any, Any]:
    """Add to ``out`` a copy of what computes ``uses``' keys; return the copy's key of each key."""
    from dask._task_spec import DataNode, Task, TaskRef

    first: dict[Any, int] = {}
    for key in sorted(uses, key=uses.__getitem__):
        stack = [key]
        while stack:
            k = stack.pop()
            if k in first or k not in dsk:  # not in the graph: held elsewhere (a persisted future)
                continue
            first[k] = uses[key]  # keys are visited by first use, so this is the earliest
            stack.extend(dsk[k].dependencies)
    new = {k: _renamed(k, prefix) for k in first}
    for k, pos in first.items():
        node = dsk[k].substitute(new, key=new[k])
        gate = pos - ahead
        reads = isinstance(node, Task) and all(d not in dsk or isinstance(dsk[d], DataNode)
                                               for d in dsk[k].dependencies)
        if reads and gate >= 0:
            node = Task(new[k], _after, TaskRef(order[gate]), node)
        out[new[k]] = node
    return {k: new.get(k, k) for k in uses}


def _after(_gate: Any, value: Any) -> Any:
    return value


def _renamed(key: Any, prefix: str) -> Any:
    if isinstance(key, tuple):
        return (f"{prefix}-{key[0]}", *key[1:])
    return f"{prefix}-{key}"
