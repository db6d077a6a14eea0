"""Running the blocks of a layout through dask, each handed to a sink once.

Block (i, j) is one task that follows blocks (i - 1, j), (i, j - 1) and
(i - 1, j - 1), whose strips it adds (see :func:`~geoseg.engine.blocks.compute_block`),
so blocks run as a wavefront and no accumulator outlives its task.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..geometry.grid import Layout
from .blocks import Sink, Source, Strips, process_block
from .options import RunOptions


class StripStore:
    """Strips waiting for their one consumer block (thread-safe; each is taken exactly once).

    Keys are ``(i, j, k)`` for block (i, j)'s bottom (k=0), right (1) and
    corner (2) strip. A strip lives from the task that makes it to the task
    that takes it, so at most about one row of blocks' strips is held.
    """

    def __init__(self) -> None:
        self._strips: dict[tuple[int, int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def put(self, i: int, j: int, strips: Strips) -> None:
        with self._lock:
            for k, s in enumerate(strips):
                if s is not None:
                    self._strips[i, j, k] = s

    def take(self, i: int, j: int, k: int) -> np.ndarray | None:
        with self._lock:
            return self._strips.pop((i, j, k), None)

    def __len__(self) -> int:
        return len(self._strips)


def _block_in_process(store: StripStore, source: Source, model_ref: Any, layout: Layout,
                      opts: RunOptions, i: int, j: int, sink: Sink, *after: None) -> None:
    """One block on the local scheduler: strips come from and go to ``store``.

    ``after`` are the neighbour tasks this one must follow (their results are None).
    """
    _, strips = process_block(source, model_ref, layout, opts, i, j, store.take(i - 1, j, 0),
                              store.take(i, j - 1, 1), store.take(i - 1, j - 1, 2), sink)
    store.put(i, j, strips)


def frontier(layout: Layout, done: frozenset[tuple[int, int]]) -> set[tuple[int, int]]:
    """Done blocks whose strips a block still to run needs: they run again, for their strips only.

    A block's outgoing strips come from its own tiles alone (the strips it
    receives land on its top-left edges, never on its overhang), so running
    it again gives the same strips, bit for bit.
    """
    nbi, nbj = layout.blocks
    out = set()
    for i, j in done:
        for a, b in ((i + 1, j), (i, j + 1), (i + 1, j + 1)):
            if a < nbi and b < nbj and (a, b) not in done:
                out.add((i, j))
    return out


def stream_blocks(source: Source, model_ref: Any, layout: Layout, opts: RunOptions, sink: Sink, *,
                  scheduler: Any = "threads", num_workers: int | None = None,
                  band_tasks: int = 32, done: frozenset[tuple[int, int]] = frozenset()) -> None:
    """Compute every block through dask and hand each to ``sink(ij, block)`` once.

    Block (i, j) is one task that follows blocks (i - 1, j), (i, j - 1) and
    (i - 1, j - 1), whose strips it adds, so blocks run as a wavefront and no
    accumulator outlives its task.

    ``scheduler`` is a dask local scheduler name (``threads``, ``sync``) or a
    ``distributed.Client``. Locally the sink runs inside each task and strips
    pass through a :class:`StripStore`, each freed the moment it is used. On
    a cluster, strips travel as task results and class blocks stream back to
    this process, which runs the sink; the graph goes out in bands of block
    rows (at least ``band_tasks`` blocks each) with only the last row's strips
    carried over, so memory does not depend on how the cluster orders it.

    ``done`` are blocks a resumed run already has: they are not handed to
    the sink, and only those whose strips a remaining block needs run
    again (locally; on a cluster every block runs).
    """
    import dask

    if done:
        inner, again = sink, frontier(layout, done)

        def sink(ij: tuple[int, int], blk: Any) -> None:
            if ij not in done:
                inner(ij, blk)
    if isinstance(scheduler, str):
        # A plain task graph: nothing to tokenize, so the first block starts at once.
        from dask.local import get_sync
        from dask.threaded import get as get_threaded

        store = StripStore()
        dsk: dict[str, tuple[Any, ...]] = {}
        run = [ij for ij in layout.iter_blocks() if ij not in done or ij in again] if done else \
            list(layout.iter_blocks())
        runset = set(run)
        for i, j in run:
            # a block run again for its strips waits for nothing: the strips it receives are not used
            prev = () if (i, j) in done else ((i - 1, j), (i, j - 1), (i - 1, j - 1))
            after = [f"geoseg-block-{a}-{b}" for a, b in prev if (a, b) in runset]
            dsk[f"geoseg-block-{i}-{j}"] = (_block_in_process, store, source, model_ref, layout, opts, i, j,
                                            sink, *after)
        if scheduler == "sync":
            get_sync(dsk, list(dsk))
        elif scheduler == "threads":
            get_threaded(dsk, list(dsk), num_workers=num_workers)
        else:
            raise ValueError(f"unknown local scheduler {scheduler!r}; use 'threads' or 'sync'")
        return

    from uuid import uuid4

    nbi, nbj = layout.blocks
    band = max(2, -(-band_tasks // nbj))
    run_id = uuid4().hex[:12]  # keys of this run only: another run on the client never gets its results
    carry: list[tuple[Any, Any]] | None = None  # (bottom, corner) of the row above the band
    for i0 in range(0, nbi, band):
        i1 = min(i0 + band, nbi)
        tasks: dict[tuple[int, int], Any] = {}
        for i in range(i0, i1):
            for j in range(nbj):
                if i == i0:
                    top = carry[j][0] if carry else None
                    corner = carry[j - 1][1] if carry and j > 0 else None
                else:
                    top = tasks[i - 1, j][1][0]
                    corner = tasks[i - 1, j - 1][1][2] if j > 0 else None
                left = tasks[i, j - 1][1][1] if j > 0 else None
                tasks[i, j] = dask.delayed(process_block, pure=False, nout=2)(
                    source, model_ref, layout, opts, i, j, top, left, corner, None,
                    dask_key_name=f"geoseg-block-{run_id}-{i}-{j}",
                )
        last = [(tasks[i1 - 1, j][1][0], tasks[i1 - 1, j][1][2]) for j in range(nbj)]
        carry = _run_band_on_cluster(scheduler, tasks, last, sink)


def _run_band_on_cluster(client: Any, tasks: dict[tuple[int, int], Any], last: list[Any],
                         sink: Sink) -> list[tuple[Any, Any]]:
    from distributed import wait

    keys = list(tasks)
    # one submission for the blocks and the strips the next band needs: two graphs sharing the
    # blocks' keys would race on the scheduler (the first may release a key the second still needs)
    submitted = client.compute([*(tasks[k][0] for k in keys), *(x for pair in last for x in pair)])
    futures, strip_futures = submitted[: len(keys)], submitted[len(keys) :]
    pending = dict(zip(futures, keys))
    try:
        # wait() rather than as_completed(with_results=True), which once in a few dozen runs kept waiting
        # for a block the scheduler already held in memory
        while pending:
            done = wait(list(pending), return_when="FIRST_COMPLETED").done
            for fut in done:
                sink(pending.pop(fut), fut.result())
                fut.release()
        strips = client.gather(strip_futures)
    except BaseException:
        client.cancel(submitted)  # a failed band leaves nothing running or held on the cluster
        raise
    return list(zip(strips[0::2], strips[1::2]))
